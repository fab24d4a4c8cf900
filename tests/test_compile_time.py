"""Compile-time work (issue 12): the fast weight fingerprint, block statistics and BSR
packing must equal their plain definitions; ``--time-passes`` reports every pass."""

import hashlib

import numpy as np
import onnx
import pytest
import scipy.sparse as sp
from onnx_models import mlp

from bscompile.cli import main
from bscompile.codegen.layout import BlockShape, BSRMatrix, all_block_stats, block_stats, padded
from bscompile.sites import fingerprint


def _sha1_of_bytes(w) -> str:
    """The definition: SHA-1 of the shape and the C-order float32 bytes, -0.0 read as 0.0."""
    w = np.ascontiguousarray(w, dtype=np.float32) + np.float32(0)
    return hashlib.sha1(repr(w.shape).encode() + w.tobytes()).hexdigest()


def _sparse(rng, shape, density=0.1):
    w = rng.standard_normal(shape).astype(np.float32) * (rng.random(shape) < density)
    w.flat[0] = -0.0
    return w


def test_fingerprint_is_sha1_of_the_c_order_bytes(rng):
    a = _sparse(rng, (600, 300))
    b = rng.standard_normal((2, 70, 30))  # float64, 3-D, as ONNX initializers come
    views = [a, a.T, a[::3], a[:, 5:77], a.T[10:20], a.reshape(2, -1).T, a.reshape(-1, 2).T, b, b.T, b[1].T,
             np.asfortranarray(b[0]), np.zeros((0, 4), np.float32), np.float32(-0.0), np.arange(12).reshape(3, 4).T]
    for v in views:
        assert fingerprint(v) == _sha1_of_bytes(v), np.shape(v)
    assert fingerprint(a) != fingerprint(a.T) and fingerprint(a) == fingerprint(a + np.float32(0))


@pytest.mark.parametrize("shape", [(96, 64), (37, 91), (1, 1), (5, 200)])
def test_all_block_stats_equals_per_shape_counts(rng, shape):
    w = _sparse(rng, shape, 0.05)
    for st in all_block_stats(w):
        assert st == block_stats(w, st.block), st.block


@pytest.mark.parametrize("shape,block", [((64, 48), (4, 4)), ((37, 91), (4, 8)), ((10, 7), (16, 1)), ((3, 100), (2, 32))])
def test_bsr_from_dense_equals_scipy(rng, shape, block):
    w = _sparse(rng, shape, 0.05)
    w[-1, -1] = np.nan  # a non-finite value is stored like any non-zero
    r, c = block
    ref = sp.bsr_array(np.pad(w, ((0, padded(shape[0], r) - shape[0]), (0, padded(shape[1], c) - shape[1]))),
                       blocksize=block)
    ref.sort_indices()
    got = BSRMatrix.from_dense(w, BlockShape(r, c))
    np.testing.assert_array_equal(got.data, ref.data.transpose(0, 2, 1))
    np.testing.assert_array_equal(got.indices, ref.indices)
    np.testing.assert_array_equal(got.indptr, ref.indptr)
    assert got.data.flags.c_contiguous and got.indices.dtype == got.indptr.dtype == np.int32
    np.testing.assert_array_equal(got.to_dense(), w)
    empty = BSRMatrix.from_dense(np.zeros(shape, np.float32), BlockShape(r, c))  # one zero block, buffers non-empty
    assert empty.nnz_blocks == 1 and not empty.data.any() and not empty.indptr.any()


def test_time_passes_reports_every_pass_and_peak_memory(rng, tmp_path, capsys):
    model, _ = mlp([64, 128, 16], "batch", ["4x4", "dense"], rng)
    onnx.save(model, tmp_path / "m.onnx")
    assert main(["compile", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "m.bsc"), "--time-passes", "-q"]) == 0
    out = capsys.readouterr().out
    for name in ("import ONNX", "Relax pipeline", "AnalyzeSparsity", "LowerWeightSites", "build",
                 "code generation (LLVM)", "peak memory"):
        assert name in out, name
    rows = {ln.split(None, 3)[3].strip(): [float(v) for v in ln.split(None, 3)[:3]]
            for ln in out.splitlines()[1:] if ln[:8].strip().replace(".", "").isdigit()}
    passes = ["FoldConstant", "CheckIndices", "OutlineLinearSites", "AnalyzeSparsity", "ChooseLayout",
              "LowerWeightSites", "OwnOutputs"]
    assert sum(rows[p][0] for p in passes) <= rows["Relax pipeline"][0] + 0.01  # passes nest in their phase
    assert all(rows[p][2] > 0 for p in passes)  # resident memory after each pass


def test_sites_are_named_from_the_ir_through_layout_ops(rng):
    """Initializers are named constants: a Gemm's transB, a Transpose node, a Cast from float16 and
    a GRU's per-direction slices keep the initializer's name; a weight the graph computes has none."""
    from onnx import TensorProto, helper, numpy_helper

    from bscompile.driver import analyze_model
    from bscompile.sites import weight_entries

    f = lambda *s: _sparse(rng, s, 0.3)  # noqa: E731
    inits = [numpy_helper.from_array(a, n) for a, n in [
        (f(16, 8), "A"), (f(16, 12), "B"), (f(6, 12), "C"), (f(6, 10).astype(np.float16), "D"),
        (f(2, 30, 10), "W"), (f(2, 30, 10), "R"), (f(10, 5), "E"), (np.float32([2.0]), "two")]]
    nodes = [helper.make_node("Gemm", ["x", "A"], ["a"], transB=1), helper.make_node("MatMul", ["a", "B"], ["b"]),
             helper.make_node("Transpose", ["C"], ["ct"]), helper.make_node("MatMul", ["b", "ct"], ["c"]),
             helper.make_node("Cast", ["D"], ["d32"], to=TensorProto.FLOAT), helper.make_node("MatMul", ["c", "d32"], ["d"]),
             helper.make_node("Reshape", ["d", "shape"], ["seq"]),
             helper.make_node("GRU", ["seq", "W", "R"], ["y", "h"], hidden_size=10, direction="bidirectional",
                              linear_before_reset=1),
             helper.make_node("Mul", ["E", "two"], ["e2"]), helper.make_node("MatMul", ["h", "e2"], ["out"])]
    inits.append(numpy_helper.from_array(np.int64([4, 1, 10]), "shape"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 1, 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    _, mod, _ = analyze_model(model)
    names = sorted(w["name"] for w in weight_entries(mod))
    computed = [n for n in names if n.startswith("weight_")]
    assert names == sorted(["A", "B", "C", "D", "W[0]", "W[1]", "R[0]", "R[1]", *computed]) and len(computed) == 1


def test_weights_read_from_the_mapped_file_equal_numpy_helper(rng, tmp_path):
    """read_model leaves plain-typed initializers' raw data in the file (memory-mapped) and
    convert_initializers reads them from there: every weight equals onnx's own reading of it;
    other types (bfloat16) and tensors stored as typed fields stay in the proto; a truncated
    file is a one-line error."""
    import ml_dtypes
    from onnx import TensorProto, helper, numpy_helper

    from bscompile.errors import BscompileError
    from bscompile.frontend.onnx import convert_initializers, read_model

    arrays = {"f32": _sparse(rng, (37, 11)), "i64": rng.integers(-9, 9, (5, 3)), "f16": rng.random(7).astype(np.float16),
              "b": rng.random((2, 2)) < 0.5, "scalar": np.float32(rng.standard_normal()), "empty": np.zeros((0, 4), np.float32),
              "u8": rng.integers(0, 255, 9).astype(np.uint8), "f64": rng.standard_normal((3, 3))}
    inits = [numpy_helper.from_array(np.asarray(a), n) for n, a in arrays.items()]
    bf = rng.standard_normal(6).astype(ml_dtypes.bfloat16)
    inits += [helper.make_tensor("bf16", TensorProto.BFLOAT16, [6], bf.view(np.uint16).tobytes(), raw=True),
              helper.make_tensor("typed", TensorProto.FLOAT, [3], [1.0, -2.0, 3.5])]  # float_data, no raw_data
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], inits)
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph), path)
    proto, raw = read_model(path)
    split = {t.name for t, s in zip(proto.graph.initializer, raw.spans) if s is not None}
    assert split == set(arrays) - {"empty"} or split == set(arrays)
    assert not any(t.raw_data for t in proto.graph.initializer if t.name in split)
    got = convert_initializers(proto, raw)
    for t in onnx.load(path).graph.initializer:
        want = numpy_helper.to_array(t)
        have = got[t.name].value.numpy()
        assert have.dtype == want.dtype and have.shape == want.shape, t.name
        assert have.tobytes() == want.tobytes(), t.name  # (bit for bit: -0.0 and NaN payloads too)
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(BscompileError, match="is not an ONNX model"):
        read_model(path)


@pytest.mark.parametrize("at", [(0, 0), (7, 3), (12, 4)])
def test_weight_copies_are_checked_finite_in_every_chunk(rng, at):
    """convert_initializers copies and checks a weight a chunk at a time: a non-finite value in
    any chunk (here of 7 elements: first, middle, last) is refused with its position, and a
    finite weight is copied bit for bit."""
    from bscompile.errors import UnsupportedModelError
    from bscompile.frontend.onnx import _checked_copy

    w = rng.standard_normal((13, 5)).astype(np.float32)
    assert _checked_copy("w", w, chunk=7).numpy().tobytes() == w.tobytes()
    w[at] = -np.inf
    with pytest.raises(UnsupportedModelError, match=rf"weight 'w' holds -inf at \[{at[0]}, {at[1]}\]"):
        _checked_copy("w", w, chunk=7)
