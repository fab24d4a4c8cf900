"""Layouts, block statistics, the conv1d rewrite, the cost model's choices and autotuning."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_models import mlp, ort_run, sparsify

import bscompile
from bscompile.codegen.layout import CANDIDATE_EDGES, BlockShape, BSRMatrix, all_block_stats, block_stats
from bscompile.driver import analyze_model
from bscompile.tune import load_records, save_records, tune_model


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
    _, plan, _, _ = analyze_model(model)
    dense_site, sparse_site = plan.sites
    assert dense_site.decision.layout == "dense"
    assert sparse_site.decision.layout == "bsr"
    assert sparse_site.decision.est_time_s < sparse_site.decision.dense_est_time_s


def test_tuning_records_roundtrip_and_apply(rng, tmp_path):
    model, _ = mlp([256, 128, 64], 4, ["4x4", "dense"], rng)
    records = tune_model(model, {"target": "llvm", "sparse": True})
    assert len(records) == 2
    for r in records:
        assert r.time_us <= r.dense_time_us  # dense is always a candidate
        assert any(c["layout"] == "dense" for c in r.candidates)
    save_records(tmp_path / "t.json", records)
    loaded = load_records(tmp_path / "t.json")
    art = bscompile.compile(model, records=str(tmp_path / "t.json"))
    assert all(w["decision"]["reason"].startswith("tuned") for w in art.manifest.weights)
    assert len(loaded) == 2
    x = rng.standard_normal((4, 256)).astype(np.float32)
    np.testing.assert_allclose(art.load().run({"x": x})["y"], ort_run(model, {"x": x})["y"], rtol=1e-4, atol=1e-5)
