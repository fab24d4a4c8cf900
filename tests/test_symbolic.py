"""Symbolic batch and sequence length: one artifact runs any batch >= 1 and length >= 1.

Numerics against onnxruntime on fresh random inputs (fp32: rtol 1e-4, atol 1e-5), at
batches 1, 3, 17, 64 and lengths 1, 7, 200 (every batch and every length, in six
pairs), for a GRU with per-row ``sequence_lens``, a bidirectional LSTM, an RNN, a
Linear stack and a DeepSpeech-like model (strided Conv1d + GRU + Linear).
"""

import dataclasses
import json

import numpy as np
import onnx
import pytest
import tvm
from onnx_models import SYMBOLIC_MODELS, assert_product_close, f32, gru_with_lens, mlp, ort_run, recurrent, sparsify, symbolic_model

import bscompile
from bscompile.codegen.family import M_BUCKETS
from bscompile.errors import BscompileError, InputError
from bscompile.sites import LAYOUT, SITE, attr

RTOL, ATOL = 1e-4, 1e-5
#: (batch, length): every batch of 1, 3, 17, 64 and every length of 1, 7, 200
SHAPES = [(1, 1), (3, 7), (17, 200), (64, 7), (1, 200), (64, 1)]


@pytest.mark.parametrize("name", SYMBOLIC_MODELS)
def test_one_artifact_runs_any_batch_and_length(rng, name):
    model, feeds_of = symbolic_model(name, rng)
    art = bscompile.compile(model)
    assert all(s.symbolic for s in art.manifest.inputs)
    mod = art.load()
    for b, t in SHAPES:
        feeds = feeds_of(b, t, rng)
        got, want = mod.run(feeds), ort_run(model, feeds)
        for out in want:
            np.testing.assert_allclose(got[out], want[out], rtol=RTOL, atol=ATOL, err_msg=f"{out} batch {b} length {t}")


def test_shape_specialised_compile_still_works(rng):
    model = recurrent("GRU", 12, 24, "time", "batch", 1, False, "4x4", rng)
    art = bscompile.compile(model, input_shapes={"x": (5, 3, 12)})
    assert [s.shape for s in art.manifest.inputs] == [(5, 3, 12)]
    assert {w["m"] for w in art.manifest.weights} == {15, 3}  # x rows (time x batch), recurrent batch
    assert all("buckets" not in w["decision"] for w in art.manifest.weights)
    mod = art.load()
    x = f32(rng.standard_normal((5, 3, 12)))
    np.testing.assert_allclose(mod.run({"x": x})["y"], ort_run(model, {"x": x})["y"], rtol=RTOL, atol=ATOL)
    with pytest.raises(InputError, match=r"has shape \[5, 4, 12\], expected \[5, 3, 12\]"):
        mod.run({"x": f32(np.zeros((5, 4, 12)))})


def _kernels(mod: tvm.IRModule) -> dict[str, tvm.tirx.PrimFunc]:
    return {attr(f, SITE)["name"]: f for _, f in mod.functions.items()
            if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None and SITE in f.attrs}


def test_dispatch_picks_schedules_per_bucket(rng):
    """A 4x4-pruned weight with a symbolic batch: the cost model vectorises small batches over
    whole blocks and large ones over the batch, so the kernel's buckets differ; read from the
    lowered IR's attributes, and the kernel branches on m."""
    from bscompile.passes.pipeline import bscompile_passes
    from bscompile.frontend.onnx import import_onnx
    from bscompile.target import resolve_target

    from bscompile.codegen.layout import BlockShape

    model, _ = mlp([256, 256], "batch", ["4x4"], rng)
    family = resolve_target("llvm").kernel_family()
    # The 4x4 layout is forced: left free, the cost model may store this weight as 8x4
    # (taller blocks, "rows" at every m), which is a fine choice but not this test's subject.
    passes = bscompile_passes(family, force_block=BlockShape(4, 4))
    with resolve_target("llvm").tvm_target():
        mod = tvm.transform.Sequential(passes)(import_onnx(model).mod)
    (kernel,) = _kernels(mod).values()
    site, layout = attr(kernel, SITE), attr(kernel, LAYOUT)
    assert site["m"] == "batch" and layout["layout"] == "bsr"
    buckets = layout["buckets"]
    assert buckets[0]["lo"] == 1 and buckets[-1]["hi"] is None
    assert all(a["hi"] + 1 == b["lo"] for a, b in zip(buckets, buckets[1:]))  # a partition of m >= 1
    variants = [b["schedules"][0]["variant"] for b in buckets]
    assert variants[0] != variants[-1] and variants[-1] == "batch", variants
    assert all(a["schedules"] != b["schedules"] for a, b in zip(buckets, buckets[1:]))  # merged when equal
    assert "if batch <= " in kernel.script() or "if m <= " in kernel.script()


def test_symbolic_kernel_tails_in_every_variant(rng):
    """The linear kernel on a symbolic m with three buckets (block / rows with M tiles of 4 /
    parallel batch vectors of 8) at m that leave tails in each, against NumPy (rtol 1e-5, atol 1e-4)."""
    from bscompile.codegen import cpu
    from bscompile.codegen.layout import BlockShape, BSRMatrix
    from bscompile.target import resolve_target

    n, k = 37, 45  # neither a multiple of the block
    w = f32(sparsify(rng.standard_normal((n, k)), rng, "4x4", 0.4))
    mat = BSRMatrix.from_dense(w, BlockShape(4, 4))
    base = cpu.default_schedule(mat, 1)
    cases = ((1, 1, dataclasses.replace(base, variant="block", m_tile=1, unroll_c=True)),
             (2, 7, dataclasses.replace(base, variant="rows", m_tile=4)),
             (8, None, cpu.CpuSchedule(1, True, True, "batch", 8)))  # parallel: transposes in parallel at 3000
    func = cpu.linear_kernel(mat, None, cases).with_attr("global_symbol", "k")
    lib = tvm.compile(tvm.IRModule({"k": func}), target=resolve_target("llvm").tvm_target())
    bias = np.zeros(mat.padded_shape[0], np.float32)
    bias[:n] = rng.standard_normal(n)
    for m in (1, 2, 5, 7, 8, 13, 17, 3000):
        x = f32(rng.standard_normal((m, k)))
        y = tvm.runtime.empty((m, n), "float32")
        lib["k"](*[tvm.runtime.tensor(a) for a in (x, mat.data, mat.indices, mat.indptr, bias)], y)
        assert_product_close(y.numpy(), x, w, bias[:n], err_msg=f"m={m}")


def test_runtime_checks_symbolic_inputs(rng):
    model = gru_with_lens(rng, hidden=8, inp=4)
    mod = bscompile.compile(model).load()
    assert [s.shape for s in mod.inputs] == [("time", "batch", 4), ("batch",)]
    ok = {"x": f32(rng.standard_normal((3, 2, 4))), "lens": np.array([3, 1], np.int32)}
    first = mod.run(ok)["y"].copy()
    other = {"x": f32(rng.standard_normal((5, 4, 4))), "lens": np.array([5, 2, 1, 4], np.int32)}
    np.testing.assert_allclose(mod.run(other)["y"], ort_run(model, other)["y"], rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(mod.run(ok)["y"], first)  # back to a staged shape
    bad = [
        ({**ok, "x": ok["x"][0]}, r"input 'x' has shape \[2, 4\], expected \['time', 'batch', 4\]"),
        ({**ok, "x": f32(np.zeros((3, 2, 5)))}, r"expected \['time', 'batch', 4\]"),
        ({**ok, "x": f32(np.zeros((0, 2, 4)))}, r"dim 'time' must be >= 1"),
        ({**ok, "lens": np.array([3, 1, 1], np.int32)}, r"input 'lens' has batch=3 but input 'x' has batch=2"),
        ({**ok, "lens": ok["lens"].astype(np.int64)}, r"input 'lens' has dtype int64, expected int32"),
    ]
    for feeds, msg in bad:
        with pytest.raises(InputError, match=msg) as err:
            mod.run(feeds)
        assert "\n" not in str(err.value)


def test_manifest_and_inspect_show_symbolic_dims(rng, tmp_path, capsys):
    from bscompile.cli import main
    from bscompile.runtime.artifact import read_artifact

    model = recurrent("GRU", 12, 24, "time", "batch", 1, False, "4x4", rng)
    onnx.save(model, tmp_path / "gru.onnx")
    assert main(["inspect", str(tmp_path / "gru.onnx")]) == 0
    out = capsys.readouterr().out
    assert "input x[time, batch, 12] float32  symbolic: time, batch" in out
    assert "m=1: " in out  # the per-bucket dispatch of each site
    assert main(["compile", str(tmp_path / "gru.onnx"), "-o", str(tmp_path / "gru.bsc"), "-q"]) == 0
    manifest, _ = read_artifact(tmp_path / "gru.bsc")
    raw = json.loads(json.dumps(manifest.to_json()))
    assert raw["format_version"] == 2 and raw["inputs"][0]["shape"] == ["time", "batch", 12]
    assert raw["outputs"][0]["shape"] == ["time", "batch", 24]
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "gru.bsc")]) == 0  # an artifact: its manifest
    out = capsys.readouterr().out
    assert "artifact" in out and "input x[time, batch, 12] float32  symbolic: time, batch" in out
    assert f"output {raw['outputs'][0]['name']}[time, batch, 24] float32" in out
    assert main(["inspect", str(tmp_path / "gru.bsc"), "--input-shape", "x=3,2,12"]) == 2
    assert "--input-shape: options of compiling" in capsys.readouterr().err


def test_cuda_persistent_rnn_asks_for_static_shapes(rng):
    """CUDA kernels take symbolic shapes (tests/test_cuda_emulator.py runs them); the opt-in
    persistent recurrent kernel sizes its grid for one batch and length, so a symbolic
    one is a one-line error asking for --input-shape."""
    from bscompile.target import with_persistent_rnn

    model = recurrent("GRU", 12, 24, "time", "batch", 1, False, "4x4", rng)
    with pytest.raises(BscompileError, match=r"static shapes only.*symbolic.*--input-shape"):
        bscompile.compile(model, target=with_persistent_rnn("cuda"))


def test_tune_per_bucket(rng):
    """The tuner measures each bucket's m and writes one record per bucket for one layout;
    compiling with them puts each bucket's measured schedule into the kernel's buckets."""
    from bscompile.records import record_key
    from bscompile.tune import tune_model

    model, _ = mlp([64, 32], "batch", ["4x4"], rng)
    records = tune_model(model, {"target": "llvm", "sparse": True}, top_k=1)
    assert [r.m for r in records] == [rep for _, _, rep in M_BUCKETS]
    assert [r.bucket for r in records] == [[lo, hi] for lo, hi, _ in M_BUCKETS]
    assert len({(r.layout, r.block) for r in records}) == 1
    assert all(c["time_us"] is not None for r in records for c in r.candidates)
    art = bscompile.compile(model, records={record_key(r.key, r.m): r for r in records})
    (w,) = art.manifest.weights
    assert w["decision"]["reason"].startswith("tuned")
    got = {(b["lo"], b["hi"]): b["schedules"][0] for b in w["decision"]["buckets"]}
    for r in records:  # merged buckets keep the first bucket's schedule
        lo, hi = r.bucket
        span = next(key for key in got if key[0] <= lo and (key[1] is None or (hi is not None and hi <= key[1])))
        if span[0] == lo:
            assert got[span] == r.schedule
    mod = art.load()
    for b in (1, 5, 40):
        x = f32(rng.standard_normal((b, 64)))
        np.testing.assert_allclose(mod.run({"x": x})["y"], ort_run(model, {"x": x})["y"], rtol=RTOL, atol=ATOL)
