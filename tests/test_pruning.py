"""WP/BP/GL mechanics of bscompile.models: schedule values, masks, targets, blocks, torch.ao compatibility."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is needed to train/prune (pip install .[test])")
from torch import nn  # noqa: E402

from torch.ao.pruning import CubicSL, LambdaSL, WeightNormSparsifier  # noqa: E402

from bscompile.models.group_lasso import block_norms, group_lasso_penalty  # noqa: E402
from bscompile.models.schedule import NarangSL, PruneSchedule  # noqa: E402
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


def test_group_lasso_gradient_is_finite_on_zero_blocks(rng):
    w = torch.tensor(rng.standard_normal((8, 8)), dtype=torch.float32, requires_grad=True)
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
    cfg = make_config(m, input_overrides={"sparse_block_shape": (1, 8)},
                      recurrent_overrides={"sparse_block_shape": (4, 4), "sparsity_level": 0.5})
    sp = BlockPruner(0.9)
    sp.prepare(m, cfg)
    by = {g["tensor_fqn"]: g for g in sp.groups}
    assert by["rnn.weight_hh_l1_reverse"]["sparse_block_shape"] == (4, 4)
    assert by["rnn.weight_hh_l1_reverse"]["sparsity_level"] == 0.5
    assert by["rnn.weight_ih_l0"]["sparse_block_shape"] == (1, 8)
    assert by["rnn.weight_ih_l0"]["sparsity_level"] == 0.9


def _pair(rng, shape, block, reduction, norm, level=0.7):
    """The same Linear weights under our BlockPruner and torch.ao's WeightNormSparsifier."""
    w = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
    ours, theirs = nn.Sequential(nn.Linear(shape[1], shape[0])), nn.Sequential(nn.Linear(shape[1], shape[0]))
    with torch.no_grad():
        ours[0].weight.copy_(w)
        theirs[0].weight.copy_(w)
    sp = BlockPruner(level, block, reduction)
    sp.prepare(ours, [{"tensor_fqn": "0.weight"}])
    ref = WeightNormSparsifier(sparsity_level=level, sparse_block_shape=block, norm=norm)
    ref.prepare(theirs, [{"tensor_fqn": "0.weight"}])
    return sp, ref, theirs


@pytest.mark.parametrize("block", [(1, 1), (4, 4), (1, 4), (8, 2)])
@pytest.mark.parametrize(("reduction", "norm"), [("rms", 2), ("mean", 1)])
def test_cubic_schedule_drives_same_masks_as_weight_norm_sparsifier(rng, block, reduction, norm):
    """torch.ao's CubicSL on both: on fixed weights the nested lowest-k sets make the masks equal at every step.

    WeightNormSparsifier scores a block by avg_pool of w² (norm=2) or |w| (norm=1), ranked like our
    ``rms`` / ``mean``, and prunes round(sparsity_level · blocks) blocks, as we do on evenly tiled weights.
    """
    sp, ref, theirs = _pair(rng, (48, 32), block, reduction, norm)
    ours_s = CubicSL(sp, init_sl=0.0, init_t=2, delta_t=1, total_t=8, initially_zero=True)
    ref_s = CubicSL(ref, init_sl=0.0, init_t=2, delta_t=1, total_t=8, initially_zero=True)
    levels = []
    for _ in range(12):
        sp.step()
        ref.step()
        m_ref = theirs[0].parametrizations.weight[0].mask.bool()
        assert torch.equal(sp.state["0.weight"]["mask"], m_ref), sp.groups[0]["sparsity_level"]
        levels.append(sp.groups[0]["sparsity_level"])
        ours_s.step()
        ref_s.step()
    assert levels == sorted(levels) and levels[2] == 0.0 and levels[-1] == pytest.approx(0.7)
    # hand-computed cubic: s_t = s_f + (s_0 − s_f)(1 − (t − t_0)/(Δt·n))³ at t = 5
    assert levels[5] == pytest.approx(0.7 + (0 - 0.7) * (1 - 3 / 8) ** 3)
    assert sp.sparsity()["0.weight"] == pytest.approx(round(0.7 * 48 * 32 / (block[0] * block[1]))
                                                      * block[0] * block[1] / (48 * 32))


def test_lambda_sl_drives_target_mode_and_masks_never_revive(rng):
    """LambdaSL lowers sparsity_level again: the reference re-grows its mask, ours keeps what it pruned."""
    sp, ref, theirs = _pair(rng, (32, 32), (4, 4), "rms", 2, level=0.5)
    factors = [0.0, 0.5, 1.0, 0.5, 0.5]
    ours_s, ref_s = LambdaSL(sp, lambda e: factors[e]), LambdaSL(ref, lambda e: factors[e])
    got, got_ref = [], []
    for _ in range(4):
        sp.step()
        ref.step()
        got.append(sp.sparsity()["0.weight"])
        got_ref.append(float((~theirs[0].parametrizations.weight[0].mask.bool()).float().mean()))
        ours_s.step()
        ref_s.step()
    # levels 0, .25, .5, .25 of 64 blocks: 0, 16, 32 blocks; ours keeps 32 when the level drops again
    assert got == [0.0, 0.25, 0.5, 0.5]
    assert got_ref == [0.0, 0.25, 0.5, 0.25]


def _static_wp(n: int):
    """WP with no ceiling (sparsity_level 1) on a Linear whose weights no optimizer moves."""
    torch.manual_seed(0)
    lin = nn.Linear(n, n)
    sp = BlockPruner(1.0, (1, 1))
    sp.prepare(lin, [{"tensor_fqn": "weight"}])
    return lin, lin.weight.detach().clone(), sp


def test_narang_scheduler_sets_hand_computed_thresholds():
    """Paper mode with a given θ: ε at each update iteration is Algorithm 1's value, masks move only then."""
    lin, w0, sp = _static_wp(16)
    sched = NarangSL(sp, start_itr=10, ramp_itr=20, end_itr=30, freq=2, theta=0.01, percentile=0.9)
    seen = {}
    for itr in range(1, 36):
        g = sp.groups[0]
        if g["enable_mask_update"] and sp.enable_mask_update:
            seen[itr] = g["threshold"]
        sp.step()
        sched.step()
    # θ = 0.01, φ = 0.015, freq 2: ramp phase θ(itr−10+1)/2, then (θ·11 + φ(itr−20+1))/2, frozen at
    # its itr = end − 1 value; updates every 2 iterations after start and at end
    expect = {i: 0.01 * (i - 9) / 2 for i in (12, 14, 16, 18)}
    expect.update({i: (0.01 * 11 + 0.015 * (min(i, 29) - 19)) / 2 for i in (20, 22, 24, 26, 28, 30)})
    assert seen.keys() == expect.keys()
    for i, eps in expect.items():
        assert seen[i] == pytest.approx(eps, abs=1e-12), i
    assert [h[0] for h in sp.state["weight"]["history"]] == sorted(expect)
    assert torch.equal(lin.weight == 0, w0.abs() < expect[30])


def test_paper_mode_theta_from_percentile():
    """Without θ, it comes from the 90th percentile of the scores at the first update; ε alone decides."""
    lin, w0, sp = _static_wp(64)
    sched = NarangSL(sp, 2, 6, 10, 2, percentile=0.9)
    for _ in range(12):
        sp.step()
        sched.step()
    q = float(np.quantile(w0.abs().numpy(), 0.9))
    s = sched.schedules[0]
    assert s.theta == pytest.approx(2 * q * 2 / (2 * 4 + 3 * 4), rel=1e-6)
    eps = s.threshold(10)
    assert torch.equal(lin.weight == 0, w0.abs() < eps)


def test_narang_scheduler_per_group_lists():
    """Input and recurrent weights on their own schedules and targets (lists, one entry per group)."""
    torch.manual_seed(0)
    rnn = nn.GRU(16, 16)
    sp = BlockPruner(0.5, (4, 4))
    sp.prepare(rnn, make_config(rnn, recurrent_overrides={"sparsity_level": 0.75}))
    assert [g["tensor_fqn"] for g in sp.groups] == ["weight_ih_l0", "weight_hh_l0"]
    sched = NarangSL(sp, start_itr=[2, 6], ramp_itr=[4, 8], end_itr=[6, 12], freq=[2, 3])
    for _ in range(14):
        sp.step()
        sched.step()
    hist = {k: [h[0] for h in v["history"]] for k, v in sp.state.items()}
    assert set(hist["weight_ih_l0"]) <= {4, 6} and set(hist["weight_hh_l0"]) <= {9, 12}
    assert sp.sparsity() == {"weight_ih_l0": 0.5, "weight_hh_l0": 0.75}
    with pytest.raises(ValueError, match="length 2"):
        NarangSL(sp, [1, 2, 3], 4, 5)


def _train_with_pruner(model, pruner, sched, iters, seed=0):
    """Noisy Adam updates so weights move while the schedule runs; records masks."""
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
        sched.step()
        masks.append({k: v["mask"].clone() for k, v in pruner.state.items()})
    return masks


@pytest.mark.parametrize("block", [(1, 1), (4, 4), (1, 8), (12, 2)])
def test_target_mode_reaches_target_and_masks_monotone(block):
    torch.manual_seed(0)
    m = Net()
    sp = BlockPruner(0.9, block)
    sp.prepare(m, make_config(m))
    sched = NarangSL(sp, 5, 15, 30, 3)
    masks = _train_with_pruner(m, sp, sched, 40)
    for prev, cur in zip(masks, masks[1:]):
        for k in cur:
            assert not (cur[k] & ~prev[k]).any(), f"{k}: a pruned weight came back"
    for fqn, s in sp.sparsity().items():
        # measured on the weights: block count rounding and ragged edge blocks stay within 1 %
        assert abs(s - 0.9) < 0.01, (fqn, s)
    for h in (v["history"] for v in sp.state.values()):
        assert h[-1][0] <= 30  # no mask moves after end_itr
        eps = [e for _, e, _ in h if e is not None]
        assert eps == sorted(eps) and len(eps) >= 5
        assert all(a[2] <= b[2] for a, b in zip(h, h[1:]))


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


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="reduction"):
        BlockPruner(0.5, (4, 4), "l3")
    with pytest.raises(ValueError, match="sparsity_level"):
        BlockPruner(1.5)
    m = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(ValueError, match="sparse_block_shape"):
        BlockPruner(0.5).prepare(m, [{"tensor_fqn": "0.weight", "sparse_block_shape": (0, 4)}])
    with pytest.raises(TypeError, match="BlockPruner"):
        ref = WeightNormSparsifier()
        ref.prepare(m, [{"tensor_fqn": "0.weight"}])
        NarangSL(ref, 1, 2, 3)


def test_squash_leaves_zeros_and_stops_masking():
    torch.manual_seed(0)
    m = Net()
    sp = BlockPruner(0.8, (4, 4))
    sp.prepare(m, None)
    _train_with_pruner(m, sp, NarangSL(sp, 1, 2, 4, 1), 5)
    sp.squash_mask()
    for g in sp.groups:
        w = getattr(g["module"], g["tensor_name"])
        assert torch.equal(w == 0, ~sp.state[g["tensor_fqn"]]["mask"])
    with torch.no_grad():
        m.fc.weight.fill_(1.0)
    sp.step()
    assert (m.fc.weight == 1).all()


def test_squash_mask_keeps_params_like_torch_ao(rng):
    """Single-tensor modules get torch.ao's exact ``sparse_params``; an RNN gets one dict per tensor."""
    sp, ref, theirs = _pair(rng, (16, 16), (4, 4), "rms", 2)
    sp.step()
    ref.step()
    keep = ("sparsity_level", "sparse_block_shape")
    sp.squash_mask(params_to_keep=keep)
    ref.squash_mask(params_to_keep=keep)
    assert sp.model[0].sparse_params == theirs[0].sparse_params == {"sparsity_level": 0.7,
                                                                     "sparse_block_shape": (4, 4)}
    m = Net()
    sp = BlockPruner(0.5, (4, 4))
    sp.prepare(m, None)
    sp.step()
    sp.squash_mask(params_to_keep=("sparsity_level",), params_to_keep_per_layer={"fc": ("sparse_block_shape",)})
    assert m.fc.sparse_params == {"sparsity_level": 0.5, "sparse_block_shape": (4, 4)}
    assert m.rnn.sparse_params["weight_hh_l1_reverse"] == {"sparsity_level": 0.5}
    assert len(m.rnn.sparse_params) == 8
    m2 = nn.Sequential(nn.Linear(8, 8))
    sp2 = BlockPruner(0.5)
    sp2.prepare(m2, None)
    with pytest.raises(KeyError, match="zeros_per_block"):
        sp2.squash_mask(params_to_keep=("zeros_per_block",))
    assert not hasattr(m2[0], "sparse_params")


class _SparseLinear(nn.Module):
    """A stand-in sparse module: keeps the nonzeros of a dense Linear as a sparse COO weight."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.weight, self.bias = weight.to_sparse(), bias

    @classmethod
    def from_dense(cls, mod: nn.Linear) -> "_SparseLinear":
        return cls(mod.weight.detach().clone(), mod.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sparse.mm(self.weight, x.T).T + self.bias


def test_convert_swaps_pruned_modules_or_raises():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Sequential(nn.Linear(16, 8)), nn.Linear(8, 4))
    sp = BlockPruner(0.75, (4, 4))
    sp.prepare(m, [{"tensor_fqn": "0.weight"}, {"tensor_fqn": "2.0.weight"}])
    sp.step()
    x = torch.randn(3, 16)
    ref = m(x)
    conv = sp.convert(m, {nn.Linear: _SparseLinear})
    assert isinstance(conv[0], _SparseLinear) and isinstance(conv[2][0], _SparseLinear)
    assert type(conv[3]) is nn.Linear  # not pruned: left alone
    assert conv[0].weight._nnz() == 64 and type(m[0]) is nn.Linear  # not in place by default
    torch.testing.assert_close(conv(x), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(NotImplementedError, match="mapping"):
        sp.convert(m)
    with pytest.raises(ValueError, match="no pruned module"):
        sp.convert(m, {nn.GRU: _SparseLinear})


def test_state_dict_round_trip():
    torch.manual_seed(0)
    m = Net()
    sp = BlockPruner(0.5, (4, 4))
    sp.prepare(m, None)
    sched = NarangSL(sp, 1, 3, 6, 1)
    _train_with_pruner(m, sp, sched, 4)
    m2 = Net()
    m2.load_state_dict(m.state_dict())
    sp2 = BlockPruner(0.5, (4, 4))
    sp2.prepare(m2, None)
    sched2 = NarangSL(sp2, 1, 3, 6, 1)
    sp2.load_state_dict(sp.state_dict())
    sched2.load_state_dict(sched.state_dict())
    assert sp2.itr == 4 and sched2.last_epoch == sched.last_epoch
    _train_with_pruner(m, sp, sched, 3, seed=1)
    _train_with_pruner(m2, sp2, sched2, 3, seed=1)
    for k in sp.state:
        assert torch.equal(sp.state[k]["mask"], sp2.state[k]["mask"]), k
        assert sp.state[k]["history"] == sp2.state[k]["history"]
    assert sp2.sparsity() == pytest.approx(sp.sparsity(), abs=1e-9)


# --- gradual dynamic sparseness (the gated layers' keep) ------------------------


def test_keep_schedule_starts_dense_and_reaches_the_model_keep():
    """DynamicKeepSparsifier under CubicSL: every tile kept (scores shifted positive) before the window,
    keep falling along the cubic inside it (vs the formula written out), the model's keep after it."""
    from torch.nn.utils import parametrize

    from bscompile.models.dynamic import DynamicBlockLinear
    from bscompile.models.dynamic_rnn import DynamicBlockLSTM
    from bscompile.models.keep_schedule import DynamicKeepSparsifier

    torch.manual_seed(0)
    model = DynamicBlockLSTM(16, 32, block=8, keep=0.25)
    gated = [m for m in model.modules() if isinstance(m, DynamicBlockLinear)]
    bias0 = [m.gate.bias.detach().clone() for m in gated]
    sp = DynamicKeepSparsifier()
    sp.prepare(model, None)
    sched = CubicSL(sp, init_sl=0.0, init_t=4, delta_t=1, total_t=10, initially_zero=True)
    assert len(sp.groups) == len(gated) == 2
    for m, b in zip(gated, bias0):
        assert torch.equal(m.gate.bias, b + 1.0) and not parametrize.is_parametrized(m)
        assert m.keep == 1.0 and m.k == m.num_tiles
    keeps = []
    for _ in range(20):
        sp.step()
        sched.step()
        keeps.append(gated[1].keep)
    for t, keep in enumerate(keeps):  # step t applied the level the scheduler set at epoch t
        want = 1.0 if t < 4 else max(0.25, 1.0 - 0.75 * (1 - (1 - (t - 4) / 10) ** 3))
        assert keep == pytest.approx(want, abs=1e-12), (t, keeps)
    assert keeps[-1] == 0.25 and gated[0].k == gated[0].num_tiles // 4
    assert 0.25 < keeps[6] < 1.0
    sp.squash_mask()
    assert all(m.keep == 0.25 for m in gated)


def test_keep_schedule_state_round_trip_and_refusal():
    from bscompile.models.dynamic import DynamicBlockLinear
    from bscompile.models.dynamic_rnn import DynamicBlockGRU
    from bscompile.models.keep_schedule import DynamicKeepSparsifier

    def keeps(model):
        return [m.keep for m in model.modules() if isinstance(m, DynamicBlockLinear)]

    def prepared():
        torch.manual_seed(0)
        model = DynamicBlockGRU(8, 16, block=8, keep=0.5)
        sp = DynamicKeepSparsifier()
        sp.prepare(model, None)
        return model, sp, CubicSL(sp, init_sl=0.0, init_t=2, delta_t=1, total_t=8, initially_zero=True)

    m1, sp1, s1 = prepared()
    for _ in range(5):
        sp1.step()
        s1.step()
    m2, sp2, s2 = prepared()
    sp2.load_state_dict(sp1.state_dict())
    s2.load_state_dict(s1.state_dict())
    assert keeps(m2) == keeps(m1) and 0.5 < keeps(m2)[0] < 1.0
    for _ in range(6):
        for sp, s in ((sp1, s1), (sp2, s2)):
            sp.step()
            s.step()
    assert sp1.state == sp2.state and keeps(m2) == [0.5, 0.5]
    with pytest.raises(ValueError, match="no DynamicBlockLinear"):
        DynamicKeepSparsifier().prepare(nn.Linear(4, 4), None)
