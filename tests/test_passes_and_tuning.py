"""Layouts, block statistics, the conv1d rewrite, the cost model's choices and autotuning."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_models import mlp, ort_run, recurrent, sparsify

import bscompile
from bscompile.codegen.layout import CANDIDATE_EDGES, BlockShape, BSRMatrix, all_block_stats, block_stats
from bscompile.driver import analyze_model
from bscompile.passes.analyze_sparsity import analyze
from bscompile.passes.choose_layout import decide
from bscompile.records import record_key, save_records
from bscompile.sites import weight_entries
from bscompile.target import resolve_target
from bscompile.tune import tune_model


@pytest.mark.parametrize("shape,block", [((100, 77), (4, 8)), ((64, 64), (16, 1)), ((33, 1000), (12, 2)),
                                         ((7, 5), (32, 32))])
def test_bsr_roundtrip(rng, shape, block):
    w = sparsify(rng.standard_normal(shape).astype(np.float32), rng, "unstructured", 0.2).astype(np.float32)
    mat = BSRMatrix.from_dense(w, BlockShape(*block))
    np.testing.assert_array_equal(mat.to_dense(), w)
    np.testing.assert_array_equal(BSRMatrix.dense(w, 16).to_dense(), w)


def test_hierarchical_block_stats_match_direct(rng):
    w = sparsify(rng.standard_normal((300, 170)).astype(np.float32), rng, "4x8", 0.15)
    direct = [block_stats(w, BlockShape(r, c)) for r in CANDIDATE_EDGES for c in CANDIDATE_EDGES]
    assert all_block_stats(w) == direct


def test_conv1d_runs_as_linear_site(rng):
    w = sparsify(rng.standard_normal((32, 16, 5)).astype(np.float32), rng, "unstructured", 0.3).astype(np.float32)
    b = rng.standard_normal(32).astype(np.float32)
    g = helper.make_graph([helper.make_node("Conv", ["x", "w", "b"], ["y"], strides=[2], pads=[2, 2], name="conv")],
                          "c", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16, 41])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 32, 21])],
                          [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    art = bscompile.compile(model)
    assert [s["name"] for s in art.manifest.weights] == ["w"]
    x = rng.standard_normal((2, 16, 41)).astype(np.float32)
    np.testing.assert_allclose(art.load().run({"x": x})["y"], ort_run(model, {"x": x})["y"], rtol=1e-4, atol=1e-5)


def test_cost_model_keeps_dense_weights_dense_and_sparse_sparse(rng):
    model, _ = mlp([512, 512, 512], 4, ["dense", "8x8"], rng)
    _, mod, _ = analyze_model(model)
    dense_site, sparse_site = weight_entries(mod)
    assert dense_site["decision"]["layout"] == "dense"
    assert sparse_site["decision"]["layout"] == "bsr"
    assert sparse_site["decision"]["block"] in ("8x8", "8x16", "8x32", "16x8", "4x8")  # the pruning block or a neighbour


@pytest.mark.parametrize("m", [16, 64])
def test_avx512_model_keeps_whole_16x16_blocks_at_large_batch(m):
    """bench/cost_model.py (2026-12-07): on a 16x16-pruned 1760x1760 weight at 90% and m >= 16,
    16x16 "rows" ran 1.2-1.9x faster than the 8x16 / 4x16 "batch" kernels the model chose
    while it priced both variants' FMAs alike."""
    w = np.kron(np.random.default_rng(5).random((110, 110)) >= 0.9, np.ones((16, 16), np.float32))
    site = {"kind": "linear", "shape": [1760, 1760], "m": m, "name": "w", "fingerprint": "-"}
    family = resolve_target("x86_64", cpu="znver4").kernel_family()
    assert decide(site, analyze(w), family)["block"] == "16x16"


def test_board_machine_models_differ_from_the_host():
    """A board's model is its own: an aarch64 target ranks with NEON lanes and the board's bandwidth."""
    assert resolve_target("rpi4").kernel_family().machine.lanes == 4
    assert resolve_target("x86_64").kernel_family().machine.lanes == 8
    assert resolve_target("cuda").kernel_family().gpu.name == "A100"


@pytest.mark.parametrize("target,cpu,lanes", [("x86_64", None, 8), ("x86_64", "skylake-avx512", 16),
                                              ("x86_64", "haswell", 8),
                                              ('{"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver4"}',
                                               None, 16),
                                              ('{"kind": "llvm", "mtriple": "x86_64-linux-gnu"}', None, 8)])
def test_x86_lanes_follow_the_target_cpu(target, cpu, lanes):
    """An AVX-512 CPU named by --cpu or in a target JSON gets 16-lane kernels and the AVX-512
    model (they kept the AVX2 preset's 8 lanes, whatever LLVM was told to emit for)."""
    spec = resolve_target(target, cpu)
    assert (spec.vector_lanes, spec.kernel_family().machine.lanes) == (lanes, lanes)


def test_tuning_records_roundtrip_and_apply(rng, tmp_path):
    model, _ = mlp([256, 128, 64], 4, ["4x4", "dense"], rng)
    records = tune_model(model, {"target": "llvm", "sparse": True}, top_k=2)
    assert [r.name for r in records] == ["fc0.weight", "fc1.weight"]
    space = resolve_target("llvm").kernel_family().schedule_space
    for r in records:
        assert r.kind == "linear" and r.m == 4
        measured = [c for c in r.candidates if c["layout"] == "dense"]
        site = {"kind": "linear", "shape": [r_n(r), r_k(r)], "m": 4}
        assert len(measured) == len(space(site, BSRMatrix.dense(np.zeros((r_n(r), r_k(r)), np.float32), 16), 4))
        assert all(c["time_us"] > 0 for c in r.candidates)
    save_records(tmp_path / "t.json", records)
    art = bscompile.compile(model, records=str(tmp_path / "t.json"))
    for w, r in zip(art.manifest.weights, records):
        assert w["decision"]["reason"].startswith("tuned")
        assert (w["decision"]["layout"], w["decision"]["block"], w["decision"]["schedule"]) == \
            (r.layout, r.block, r.schedule)
    x = rng.standard_normal((4, 256)).astype(np.float32)
    np.testing.assert_allclose(art.load().run({"x": x})["y"], ort_run(model, {"x": x})["y"], rtol=1e-4, atol=1e-5)
    with pytest.raises(bscompile.BscompileError, match="measured for target"):
        bscompile.compile(model, target="rpi4", records=str(tmp_path / "t.json"))


def r_n(rec):
    return {"fc0.weight": 128, "fc1.weight": 64}[rec.name]


def r_k(rec):
    return {"fc0.weight": 256, "fc1.weight": 128}[rec.name]


def test_tuning_resumes_from_its_log(rng, tmp_path):
    model, _ = mlp([128, 64, 32], 2, ["4x4", "8x8"], rng)
    log = tmp_path / "t.json"
    first = tune_model(model, {"target": "llvm", "sparse": True}, top_k=1, log=log)
    save_records(log, first[:1])  # as if interrupted after the first site
    lines = []
    again = tune_model(model, {"target": "llvm", "sparse": True}, lines.append, top_k=1, log=log)
    assert again[0] == first[0]  # read back, not measured again
    assert any("already tuned" in ln for ln in lines) and sum("tuning site" in ln for ln in lines) == 1
    assert [r.name for r in again] == ["fc0.weight", "fc1.weight"]


def test_tuning_a_recurrent_site_times_the_recurrent_kernel(rng):
    """Batch 8 (where linear sites would try the "batch" variant, which recurrent kernels lack)."""
    model = recurrent("GRU", 16, 32, 3, 8, 1, False, "4x4", rng)
    records = tune_model(model, {"target": "llvm", "sparse": True}, top_k=1)
    rec = next(r for r in records if r.kind == "recurrent")
    assert rec.name == "l0.R[0]" and rec.m == 8
    assert all(c["time_us"] is not None for c in rec.candidates)
    assert not any(c["schedules"][0]["variant"] == "batch" for c in rec.candidates)
    art = bscompile.compile(model, records={record_key(r.key, r.m): r for r in records})
    x = rng.standard_normal((3, 8, 16)).astype(np.float32)
    got, want = art.load().run({"x": x}), ort_run(model, {"x": x})
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-5)
