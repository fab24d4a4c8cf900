"""Model zoo of bscompile.models: pruned RNNs train, run and export; corpus; reproduce --quick."""

from __future__ import annotations

import json
import warnings
from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is needed to train/prune (pip install .[test])")
from torch import nn  # noqa: E402

from bscompile.models.charlm import CharLM, bits_per_char, load_corpus  # noqa: E402
from bscompile.models.deepspeech import DeepSpeech, DeepSpeechConfig  # noqa: E402
from bscompile.models.export import (  # noqa: E402
    check_onnx,
    export_onnx,
    onnx_gate_order,
    onnx_recurrent_weights,
    run_onnx,
)
from bscompile.models.schedule import NarangSL  # noqa: E402
from bscompile.models.sparsifier import BlockPruner, make_config, prune_once  # noqa: E402

torch.set_num_threads(1)


def test_corpus_split_is_fixed_and_covers_vocab():
    c = load_corpus()
    assert len(c.train) > 300_000 and len(c.val) > 30_000
    assert abs(len(c.val) / (len(c.train) + len(c.val)) - 0.1) < 1e-4
    assert int(c.train.max()) < len(c.vocab) and int(c.val.max()) < len(c.vocab)
    assert torch.equal(load_corpus().val[:1000], c.val[:1000])  # deterministic
    assert c.encode("def ").tolist() == [c.vocab.index(ch) for ch in "def "]


def test_larger_corpus_adds_stdlib_source_split_per_part():
    small, big = load_corpus(), load_corpus(source="pydoc+stdlib")
    assert set(small.vocab) <= set(big.vocab) and len(big.train) > 10 * len(small.train)
    # each part is split 90/10: validation starts with the pydoc tail, then the stdlib tail
    assert big.decode(big.val[:200]) == small.decode(small.val[:200])
    assert abs(len(big.val) / (len(big.train) + len(big.val)) - 0.1) < 1e-4
    with pytest.raises(ValueError, match="unknown corpus"):
        load_corpus(source="wikipedia")


def test_bits_per_char_of_uniform_model_is_log2_vocab():
    m = CharLM(10, emb=4, hidden=8)
    with torch.no_grad():
        m.proj.weight.zero_()
        m.proj.bias.zero_()
    ids = torch.randint(0, 10, (2000,))
    assert bits_per_char(m, ids, streams=4, chunk=64) == pytest.approx(np.log2(10), abs=1e-5)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_pruned_rnn_trains_runs_and_exports(cell, tmp_path):
    """BP on every RNN weight (both directions) + linear; flat weights stay usable; ONNX matches."""
    torch.manual_seed(0)
    rnn_cls = {"gru": nn.GRU, "lstm": nn.LSTM}[cell]

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = rnn_cls(12, 16, num_layers=2, bidirectional=True, batch_first=True)
            self.fc = nn.Linear(32, 8)

        def forward(self, x):
            return self.fc(self.rnn(x)[0])

    m = Model()
    sp = BlockPruner(0.75, (4, 4))
    sp.prepare(m, make_config(m))
    sched = NarangSL(sp, 2, 8, 16, 2)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    x, y = torch.randn(3, 7, 12), torch.randn(3, 7, 8)
    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. "RNN module weights are not part of single contiguous chunk"
        for _ in range(30):
            loss = (m(x) - y).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sp.step()
            sched.step()
            losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], "pruned model did not train"
    sp.squash_mask()
    assert len(sp.groups) == 9  # 2 layers × 2 directions × (ih, hh) + fc
    for fqn, s in sp.sparsity().items():
        assert abs(s - 0.75) < 0.01, (fqn, s)
    # flat weights still alias the parameters, so the fused kernel sees the zeros
    for w, p in zip(m.rnn._flat_weights, m.rnn.parameters()):
        assert w is p

    path = export_onnx(m, (x,), tmp_path / f"{cell}.onnx", ["x"], ["y"])
    err = check_onnx(m, path, {"x": x}, atol=1e-5)
    assert err <= 1e-5
    nodes = onnx_recurrent_weights(path)
    assert [n["op"] for n in nodes] == [cell.upper()] * 2
    for layer, node in enumerate(nodes):
        for kind, key in (("ih", "W"), ("hh", "R")):
            for d, sfx in enumerate(("", "_reverse")):
                mask = sp.state[f"rnn.weight_{kind}_l{layer}{sfx}"]["mask"].numpy()
                w_onnx = node[key][d]
                np.testing.assert_array_equal(w_onnx == 0, ~onnx_gate_order(mask, cell.upper()))
                w_torch = getattr(m.rnn, f"weight_{kind}_l{layer}{sfx}").detach().numpy()
                np.testing.assert_array_equal(w_onnx, onnx_gate_order(w_torch, cell.upper()))


def test_charlm_gru_export_has_linear_before_reset(tmp_path):
    import onnx

    torch.manual_seed(0)
    m = CharLM(20, emb=8, hidden=16)
    prune_once(m, 0.9, (4, 4))
    tokens = torch.randint(0, 20, (1, 50))
    path = export_onnx(m, (tokens,), tmp_path / "lm.onnx", ["tokens"], ["logits"])
    assert check_onnx(m, path, {"tokens": tokens}) <= 1e-5
    grus = [n for n in onnx.load(str(path)).graph.node if n.op_type == "GRU"]
    assert len(grus) == 2
    assert all({a.name: a.i for a in n.attribute}["linear_before_reset"] == 1 for n in grus)


def test_deepspeech_shape_prune_and_export(tmp_path):
    torch.manual_seed(0)
    cfg = DeepSpeechConfig(hidden=32, cell="rnn", layers=2, features=20, conv_channels=16)
    m = DeepSpeech(cfg).eval()
    feats = torch.randn(1, 40, 20)
    assert m(feats).shape == (1, 20, 29)
    sp = prune_once(m, 0.9, (4, 4))
    assert all(abs(s - 0.9) < 0.01 for s in sp.sparsity().values())
    path = export_onnx(m, (feats,), tmp_path / "ds.onnx", ["features"], ["logprobs"])
    assert check_onnx(m, path, {"features": feats}) <= 1e-5
    assert [n["op"] for n in onnx_recurrent_weights(path)] == ["RNN", "RNN"]
    from bscompile.models.deepspeech import export_pruned

    rep = export_pruned(tmp_path / "ds_lstm.onnx", replace(cfg, cell="lstm"), 0.8, (4, 4), frames=16, atol=1e-5)
    assert rep["max_abs_err"] <= 1e-5
    assert all(abs(v - 0.8) < 0.01 for k, v in rep.items() if k != "max_abs_err")
    assert "out.weight" not in rep and "fc.weight" in rep


def test_bundled_model_matches_its_sidecar():
    from bscompile.models.charlm import BUNDLED

    if not BUNDLED.exists():
        pytest.skip(f"{BUNDLED} not generated (python -m bscompile.models.charlm --export-bundled)")
    meta = json.loads(BUNDLED.with_suffix(".json").read_text())
    assert BUNDLED.stat().st_size < 5e6
    assert meta["vocab"] == load_corpus().vocab
    assert all(abs(s - 0.9) < 0.01 for s in meta["sparsity"].values())
    (logits,) = run_onnx(BUNDLED, {"tokens": np.zeros((1, 50), dtype=np.int64)})
    assert logits.shape == (1, 50, len(meta["vocab"])) and np.isfinite(logits).all()
    nodes = onnx_recurrent_weights(BUNDLED)
    for n in nodes:  # 4x4 zero blocks survive the export (gate reorder keeps 4-row alignment)
        for key in ("W", "R"):
            w = n[key][0]
            blocks = (w.reshape(w.shape[0] // 4, 4, w.shape[1] // 4, 4) == 0).all(axis=(1, 3))
            assert abs(blocks.mean() - 0.9) < 0.01


def test_reproduce_quick(tmp_path):
    from bscompile.models.reproduce import main

    main(["--quick", "--state", str(tmp_path / "state"), "--out", str(tmp_path / "out")])
    for f in ("results.md", "results.json", "learning_curves.png", "schedule.png", "bpc_vs_sparsity.png"):
        assert (tmp_path / "out" / f).stat().st_size > 0, f
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {r["name"] for r in res["runs"]} >= {"dense large", "dense small", "WP", "BP 4x4", "GL 4x4", "GLP 4x4"}
    for r in res["runs"]:
        assert (tmp_path / "state" / f"{r['key']}.onnx").exists() and r["onnx_max_abs_err"] <= 1e-5
        # big blocks on the tiny quick model leave a handful of blocks per matrix: no 1 % resolution
        if r["method"] != "dense" and r["block"][0] * r["block"][1] <= 16 and r["prune_config"]["percentile"] is None:
            target = r["prune_config"]["target"]
            assert abs(r["sparsity"] - target) < 0.01, (r["name"], r["sparsity"])
    text = (tmp_path / "out" / "results.md").read_text()
    assert "## Methods at ~90% sparsity" in text and "| BP 4x4 |" in text
    assert not list((tmp_path / "state").glob("*.ckpt"))  # finished runs leave results, not checkpoints


@pytest.mark.parametrize(("method", "schedule", "cell"), [("bp", "narang", "gru"), ("gl", "narang", "gru"),
                                                     ("glp", "cubic", "gru"), ("dense", "narang", "dyngru"),
                                                     ("keep", "narang", "dynlstm")])
def test_training_resumes_from_checkpoint_bit_for_bit(tmp_path, monkeypatch, method, schedule, cell):
    """A run killed after a checkpoint and resumed ends exactly like an uninterrupted one (also the gated
    GRU, and the gated LSTM with its keep lowered during training)."""
    from bscompile.models import charlm
    from bscompile.models.charlm import PruneConfig, TrainConfig, train

    corpus = load_corpus()
    cfg = TrainConfig(iters=30, batch=4, seq=12, log_every=5, eval_every=10)
    pc = PruneConfig(method, (4, 4), "max", 0.8, lam=1e-3, start=0.2, ramp=0.4, end=0.7, updates=5, schedule=schedule)
    val = replace(corpus, val=corpus.val[:2000])

    def fresh():
        torch.manual_seed(0)
        return CharLM(len(corpus.vocab), emb=8, hidden=16, cell=cell, block=8, keep=0.5)

    ref, _ = train(fresh(), val, cfg, pc)
    save = charlm._save_atomic
    calls = []

    def crash_after_second_save(obj, path):
        save(obj, path)
        calls.append(obj["itr"])
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(charlm, "_save_atomic", crash_after_second_save)
    ckpt = tmp_path / "run.ckpt"
    with pytest.raises(KeyboardInterrupt):
        train(fresh(), val, cfg, pc, ckpt=ckpt, ckpt_every=8)
    assert calls == [8, 16]
    monkeypatch.setattr(charlm, "_save_atomic", save)
    got, _ = train(fresh(), val, cfg, pc, ckpt=ckpt, ckpt_every=8)
    assert got["val_bpc"] == ref["val_bpc"]
    assert got["train_curve"] == ref["train_curve"] and got["prune_history"] == ref["prune_history"]
    assert abs(got["sparsity"] - (0.8 if method not in ("dense", "keep") else 0.0)) < 0.01


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_dynamic_study_quick(tmp_path, cell):
    """The gated-RNN study (issue 15) runs its whole --quick queue, resumes, and writes its table."""
    import onnx

    from bscompile.models.dynamic_study import QUICK, main

    state, out = tmp_path / "state", tmp_path / "out"
    argv = ["--cell", cell, "--quick", "--state", str(state), "--out", str(out)]
    main(argv)
    res = json.loads((out / "results.json").read_text())
    runs = {r["name"]: r for r in res["runs"]}
    assert list(runs) == [r.name for r in QUICK.plan(res["vocab"])]
    frac = QUICK.fraction("dynamic", QUICK.hidden_large, 0.5)
    emb, h, bs = QUICK.emb, QUICK.hidden_large, QUICK.block  # gates: in x (in/bs)(out/bs) per product, / dense
    assert abs(frac - (0.5 + (emb * (emb // bs) + h * (h // bs)) * (h // bs) / (emb * h + h * h))) < 1e-12
    for name, r in runs.items():
        assert r["onnx_max_abs_err"] <= 1e-5 and r["cell"] == ("dyn" if name.startswith("gated") else "") + cell
        ops = {n.op_type for n in onnx.load(str(state / f"{r['key']}.onnx")).graph.node}
        assert ("Scan" in ops) == name.startswith("gated"), (name, ops)  # gated: the scan form
        if name.startswith(("BP", "WP")):  # density = the gated model's compute fraction
            keep = float(name.rsplit(" ", 1)[1])
            assert abs(1 - r["sparsity"] - QUICK.fraction("dynamic", h, keep)) < 0.01, (name, r["sparsity"])
    assert runs["dense @ keep 0.25"]["hidden"] < runs["dense @ keep 0.5"]["hidden"] < h
    text = (out / "results.md").read_text()
    assert f"| gated keep 0.5 | dyn{cell} |" in text and "target: gated keep 0.5 within 2% of dense" in text
    assert (out / "quality_vs_compute.png").stat().st_size > 0 and not list(state.glob("*.ckpt"))
    before = (state / "dense-s0.json").read_text()
    main(argv)  # nothing pending: no run trains again
    assert (state / "dense-s0.json").read_text() == before
    assert f"| gated keep 0.5 gradual | dyn{cell} |" in text and "keep 1 → 0.5 (CubicSL)" in text
    # another machine: the committed results.json seeds an empty state directory (--from-results)
    fresh = tmp_path / "fresh"
    main(["--cell", cell, "--quick", "--state", str(fresh), "--out", str(out), "--from-results", "--report-only"])
    again = json.loads((out / "results.json").read_text())
    assert [(r["key"], r["val_bpc"]) for r in again["runs"]] == [(r["key"], r["val_bpc"]) for r in res["runs"]]
    assert {f.name for f in fresh.glob("*.json")} == {f.name for f in state.glob("*.json")} - {"setup.json"}
