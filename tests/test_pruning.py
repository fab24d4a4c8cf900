"""WP/BP/GL mechanics of bscompile.models: schedule values, masks, targets, blocks."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is needed to train/prune (pip install .[test])")
from torch import nn  # noqa: E402

from bscompile.models.group_lasso import block_norms, group_lasso_penalty  # noqa: E402
from bscompile.models.schedule import PruneSchedule  # noqa: E402
from bscompile.models.sparsifier import (  # noqa: E402
    BlockPruner,
    block_scores,
    make_config,
    prune_once,
)

torch.set_num_threads(1)


# --- schedule -----------------------------------------------------------------

def test_threshold_matches_hand_computed_values():
    s = PruneSchedule(start_itr=10, ramp_itr=20, end_itr=30, freq=2, theta=0.1)
    assert s.phi == pytest.approx(0.15)
    # before/at start: 0; ramp phase θ(itr−start+1)/freq; then (θ(ramp−start+1)+φ(itr−ramp+1))/freq
    expected = {0: 0.0, 10: 0.0, 11: 0.1, 15: 0.3, 19: 0.5, 20: 0.625, 25: 1.0, 29: 1.3, 30: 1.3, 100: 1.3}
    for itr, eps in expected.items():
        assert s.threshold(itr) == pytest.approx(eps, abs=1e-12), itr


def test_theta_from_percentile_formula():
    s = PruneSchedule(start_itr=10, ramp_itr=20, end_itr=30, freq=2)
    # θ = 2·q·freq / (2·(ramp−start) + 3·(end−ramp)) = 2·1·2 / (20 + 30)
    assert s.theta_for_final_threshold(1.0) == pytest.approx(0.08)
    t = s.with_theta_for(1.0)
    assert (t.theta, t.phi) == (pytest.approx(0.08), pytest.approx(0.12))
    # final threshold ≈ q (exactly q·(1 + (1+1)/... ) because of the paper's +1 terms)
    assert t.threshold(29) == pytest.approx((0.08 * 11 + 0.12 * 10) / 2)


def test_update_iterations():
    s = PruneSchedule(start_itr=10, ramp_itr=20, end_itr=25, freq=4, theta=1.0)
    assert [i for i in range(40) if s.is_update_itr(i)] == [14, 18, 22, 25]


# --- block scores / norms -------------------------------------------------------

def _np_blocks(w: np.ndarray, r: int, c: int):
    for i in range(0, w.shape[0], r):
        for j in range(0, w.shape[1], c):
            yield i // r, j // c, np.abs(w[i : i + r, j : j + c]).ravel()


@pytest.mark.parametrize("block", [(4, 4), (1, 8), (12, 2), (3, 5)])
def test_block_reductions_match_numpy(block):
    w = torch.randn(25, 18, generator=torch.Generator().manual_seed(0))  # ragged for all blocks
    ref = {
        "max": np.max, "mean": np.mean, "rms": lambda a: np.sqrt(np.mean(a**2)),
        "geomean": lambda a: np.exp(np.mean(np.log(a))),
        "median": lambda a: np.sort(a)[(len(a) - 1) // 2],  # torch: lower median
    }
    for red, f in ref.items():
        got = block_scores(w, block, red).numpy()
        for bi, bj, a in _np_blocks(w.numpy(), *block):
            assert got[bi, bj] == pytest.approx(f(a), rel=1e-5), (red, bi, bj)
    norms = block_norms(w, block).numpy()
    for bi, bj, a in _np_blocks(w.numpy(), *block):
        assert norms[bi, bj] == pytest.approx(np.linalg.norm(a), rel=1e-5)


def test_group_lasso_gradient_is_finite_on_zero_blocks():
    w = torch.randn(8, 8, requires_grad=True)
    with torch.no_grad():
        w[:4, :4] = 0
    pen = group_lasso_penalty([w], (4, 4), lam=0.5)
    pen.backward()
    ref = 0.5 * sum(np.linalg.norm(a) for _, _, a in _np_blocks(w.detach().numpy(), 4, 4))
    assert pen.item() == pytest.approx(ref, rel=1e-6)
    assert torch.isfinite(w.grad).all() and (w.grad[:4, :4] == 0).all()


# --- sparsifier ------------------------------------------------------------------

class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(24, 32, num_layers=2, bidirectional=True, batch_first=True)
        self.fc = nn.Linear(64, 48)

    def forward(self, x):
        return self.fc(self.rnn(x)[0])


def test_config_covers_every_layer_and_direction():
    for cls in (nn.GRU, nn.LSTM, nn.RNN):
        m = nn.Sequential(cls(8, 16, num_layers=2, bidirectional=True), nn.Linear(32, 4))
        names = sorted(c["tensor_fqn"] for c in make_config(m))
        expect = sorted(
            [f"0.weight_{k}_l{layer}{d}" for k in ("ih", "hh") for layer in (0, 1) for d in ("", "_reverse")]
            + ["1.weight"]
        )
        assert names == expect
    m = Net()
    cfg = make_config(m, input_overrides={"block": (1, 8)}, recurrent_overrides={"block": (4, 4)})
    assert {c["tensor_fqn"]: c["block"] for c in cfg}["rnn.weight_hh_l1_reverse"] == (4, 4)
    assert {c["tensor_fqn"]: c["block"] for c in cfg}["rnn.weight_ih_l0"] == (1, 8)


def _train_with_pruner(model, pruner, iters, seed=0):
    """Noisy SGD-like updates so weights move while the schedule runs; records masks."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randn(4, 5, 24, generator=g)
    masks = []
    for _ in range(iters):
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        pruner.step()
        masks.append({k: v["mask"].clone() for k, v in pruner.state.items()})
    return masks


@pytest.mark.parametrize("block", [(1, 1), (4, 4), (1, 8), (12, 2)])
def test_target_sparsity_reached_and_masks_monotone(block):
    torch.manual_seed(0)
    m = Net()
    sp = BlockPruner(PruneSchedule(5, 15, 30, 3), block=block, target_sparsity=0.9)
    sp.prepare(m, make_config(m))
    masks = _train_with_pruner(m, sp, 40)
    for prev, cur in zip(masks, masks[1:]):
        for k in cur:
            assert not (cur[k] & ~prev[k]).any(), f"{k}: a pruned weight came back"
    for fqn, s in sp.sparsity().items():
        # measured on the weights: block count rounding and ragged edge blocks stay within 1 %
        assert abs(s - 0.9) < 0.01, (fqn, s)
    # history: thresholds non-decreasing, last update at end_itr
    for h in (v["history"] for v in sp.state.values()):
        assert [t for t, _, _ in h][-1] == 30
        assert all(a[1] <= b[1] for a, b in zip(h, h[1:]))


def test_paper_mode_prunes_below_the_scheduled_threshold():
    """Without a target, θ comes from the 90th percentile and only ε decides."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 64)
    w0 = lin.weight.detach().clone()
    sched = PruneSchedule(2, 6, 10, 2)
    sp = BlockPruner(sched, block=(1, 1))
    sp.prepare(lin, [{"tensor_fqn": "weight"}])
    for _ in range(12):  # weights are static: no optimizer
        sp.step()
    q = float(np.quantile(w0.abs().numpy(), 0.9))
    s = sp.groups[0]["schedule"]
    assert s.theta == pytest.approx(2 * q * 2 / (2 * 4 + 3 * 4), rel=1e-6)
    eps = s.threshold(10)
    assert torch.equal(lin.weight == 0, w0.abs() < eps)
    assert sp.sparsity()["weight"] == pytest.approx(float((w0.abs() < eps).float().mean()))


@pytest.mark.parametrize("reduction", ["max", "mean", "rms", "geomean", "median"])
@pytest.mark.parametrize("block", [(4, 4), (12, 2), (1, 8), (3, 5)])
def test_blocks_all_zero_or_untouched(block, reduction):
    torch.manual_seed(1)
    lin = nn.Linear(30, 50, bias=True)  # ragged for (4,4), (12,2), (3,5)... on purpose
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    sp = prune_once(lin, 0.75, block, reduction, [{"tensor_fqn": "weight"}])
    w = lin.weight.detach()
    r, c = block
    n_zero = 0
    for i in range(0, w.shape[0], r):
        for j in range(0, w.shape[1], c):
            blk = w[i : i + r, j : j + c]
            if (blk == 0).all():
                n_zero += 1
            else:
                assert torch.equal(blk, w0[i : i + r, j : j + c])
    assert n_zero > 0
    # target counted in weights; ragged edge blocks are smaller, resolution is half a block
    assert abs(float((w == 0).float().mean()) - 0.75) <= r * c / 2 / w.numel() + 1e-9
    assert torch.equal(lin.bias, b0)  # biases untouched
    # the pruned blocks are the lowest-scoring ones
    scores = block_scores(w0, block, reduction)
    kept = sp.state["weight"]["block_mask"]
    assert scores[~kept].max() <= scores[kept].min()


def test_squash_leaves_zeros_and_stops_masking():
    torch.manual_seed(0)
    m = Net()
    sp = BlockPruner(PruneSchedule(1, 2, 4, 1), block=(4, 4), target_sparsity=0.8)
    sp.prepare(m, None)
    _train_with_pruner(m, sp, 5)
    sp.squash_mask()
    for g in sp.groups:
        w = getattr(g["module"], g["tensor_name"])
        assert torch.equal(w == 0, ~sp.state[g["tensor_fqn"]]["mask"])
    with torch.no_grad():
        m.fc.weight.fill_(1.0)
    sp.step()
    assert (m.fc.weight == 1).all()


def test_state_dict_round_trip():
    torch.manual_seed(0)
    m = Net()
    sp = BlockPruner(PruneSchedule(1, 3, 6, 1), block=(4, 4), target_sparsity=0.5)
    sp.prepare(m, None)
    _train_with_pruner(m, sp, 4)
    m2 = Net()
    m2.load_state_dict(m.state_dict())
    sp2 = BlockPruner(PruneSchedule(1, 3, 6, 1), block=(4, 4), target_sparsity=0.5)
    sp2.prepare(m2, None)
    sp2.load_state_dict(sp.state_dict())
    assert sp2.itr == 4
    _train_with_pruner(m, sp, 3, seed=1)
    _train_with_pruner(m2, sp2, 3, seed=1)
    for k in sp.state:
        assert torch.equal(sp.state[k]["mask"], sp2.state[k]["mask"]), k
    assert sp2.sparsity() == pytest.approx(sp.sparsity(), abs=1e-9)
