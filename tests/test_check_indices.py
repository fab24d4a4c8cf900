"""CheckIndices: data-dependent indices are checked at run time (TVM-style pass tests,
then compiled ONNX models against onnxruntime and on out-of-range input)."""

import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
import tvm
from onnx import TensorProto, helper
from onnx_models import OPSET, gru_with_lens, ort_run
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

import bscompile
from bscompile.errors import InputError, UnsupportedModelError
from bscompile.frontend.onnx import import_onnx
from bscompile.passes.check_indices import CHECK_ATTR, CheckIndices

W = np.arange(10, dtype=np.float32).reshape(5, 2)


def assert_checked(before: tvm.IRModule, expected: tvm.IRModule, raises: bool = True) -> None:
    """The pass turns ``before`` into ``expected``, and leaves its own output alone (idempotent)."""
    after = CheckIndices(raises)(before)
    tvm.ir.assert_structural_equal(after, expected)
    tvm.ir.assert_structural_equal(CheckIndices(raises)(after), after)


def test_gather_index_is_checked_and_wrapped():
    @I.ir_module
    class Before:
        @R.function
        def main(tokens: R.Tensor((1, 4), "int64")) -> R.Tensor((1, 4, 2), "float32"):
            with R.dataflow():
                neg = R.less(tokens, R.const(0, "int64"))
                shifted = R.add(tokens, R.const(5, "int64"))
                idx = R.where(neg, shifted, tokens)
                Gather_3 = R.take(R.const(W), idx, axis=0, mode="fast")
                R.output(Gather_3)
            return Gather_3

    @I.ir_module
    class Expected:
        @T.prim_func(s_tir=True, private=True)
        def check_index(x: T.Buffer((1, 4), "int64"), y: T.Buffer((1, 4), "int64")):
            T.func_attr({"tir.noalias": True, "op_pattern": 8, CHECK_ATTR: True})
            with T.sblock("root"):
                xf = T.decl_buffer((4,), "int64", data=x.data)
                yf = T.decl_buffer((4,), "int64", data=y.data)
                for i in range(4):
                    if xf[i] < T.int64(-5) or xf[i] >= T.int64(5):
                        T.evaluate(T.call_packed("bscompile.index_error", "input 'tokens' holds index ",
                                                 T.Cast("int64", xf[i]), T.Cast("int64", T.int64(-5)),
                                                 T.Cast("int64", T.int64(5)), " at node Gather_3"))
                    yf[i] = T.Select(xf[i] < T.int64(0), xf[i] + T.int64(5), xf[i])

        @R.function
        def main(tokens: R.Tensor((1, 4), "int64")) -> R.Tensor((1, 4, 2), "float32"):
            cls = Expected
            with R.dataflow():
                neg = R.less(tokens, R.const(0, "int64"))
                shifted = R.add(tokens, R.const(5, "int64"))
                idx = R.where(neg, shifted, tokens)  # dead: the pipeline's DCE drops it
                checked = R.call_tir(cls.check_index, (tokens,), out_ty=R.Tensor((1, 4), "int64"))
                Gather_3 = R.take(R.const(W), checked, axis=0, mode="fast")
                R.output(Gather_3)
            return Gather_3

    assert_checked(Before, Expected)


def test_unnormalised_index_is_checked_from_zero():
    """gather_elements without the frontend's negative-index normalisation: [0, n), no wrap."""

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((5, 2), "float32"), idx: R.Tensor((3, 2), "int32")) -> R.Tensor((3, 2), "float32"):
            with R.dataflow():
                lv = R.gather_elements(x, idx, axis=0)
                R.output(lv)
            return lv

    @I.ir_module
    class Expected:
        @T.prim_func(s_tir=True, private=True)
        def check_index(x: T.Buffer((3, 2), "int32"), y: T.Buffer((3, 2), "int32")):
            T.func_attr({"tir.noalias": True, "op_pattern": 8, CHECK_ATTR: True})
            with T.sblock("root"):
                xf = T.decl_buffer((6,), "int32", data=x.data)
                yf = T.decl_buffer((6,), "int32", data=y.data)
                for i in range(6):
                    if xf[i] < 0 or xf[i] >= 5:
                        T.evaluate(T.call_packed("bscompile.index_error", "input 'idx' holds index ",
                                                 T.Cast("int64", xf[i]), T.Cast("int64", 0), T.Cast("int64", 5), ""))
                    yf[i] = xf[i]

        @R.function
        def main(x: R.Tensor((5, 2), "float32"), idx: R.Tensor((3, 2), "int32")) -> R.Tensor((3, 2), "float32"):
            cls = Expected
            with R.dataflow():
                checked = R.call_tir(cls.check_index, (idx,), out_ty=R.Tensor((3, 2), "int32"))
                lv = R.gather_elements(x, checked, axis=0)
                R.output(lv)
            return lv

    assert_checked(Before, Expected)


def test_safe_indexing_is_left_alone():
    """take in clip/wrap mode, constant in-range indices."""

    @I.ir_module
    class Before:
        @R.function
        def main(tokens: R.Tensor((1, 4), "int64")):
            with R.dataflow():
                a = R.take(R.const(W), tokens, axis=0, mode="clip")
                b = R.take(R.const(W), tokens, axis=0, mode="wrap")
                c = R.take(R.const(W), R.const(np.array([0, 4, 2], np.int64)), axis=0, mode="fast")
                R.output(a, b, c)
            return (a, b, c)

    tvm.ir.assert_structural_equal(CheckIndices()(Before), Before)


def test_symbolic_index_shape_is_checked():
    """Dynamic ONNX dims (``dynamic_axes``): the kernel takes the index's shape as its own variables."""

    @I.ir_module
    class Before:
        @R.function
        def main(tokens: R.Tensor(("batch", "seq"), "int64")) -> R.Tensor(("batch", "seq", 2), "float32"):
            batch, seq = T.int64(), T.int64()
            with R.dataflow():
                neg = R.less(tokens, R.const(0, "int64"))
                shifted = R.add(tokens, R.const(5, "int64"))
                idx = R.where(neg, shifted, tokens)
                Gather_3 = R.take(R.const(W), idx, axis=0, mode="fast")
                R.output(Gather_3)
            return Gather_3

    @I.ir_module
    class Expected:
        @T.prim_func(s_tir=True, private=True)
        def check_index(var_x: T.handle, var_y: T.handle):
            T.func_attr({"tir.noalias": True, "op_pattern": 8, CHECK_ATTR: True})
            n0, n1 = T.int64(), T.int64()
            x = T.match_buffer(var_x, (n0, n1), "int64")
            y = T.match_buffer(var_y, (n0, n1), "int64")
            with T.sblock("root"):
                xf = T.decl_buffer((n0 * n1,), "int64", data=x.data)
                yf = T.decl_buffer((n0 * n1,), "int64", data=y.data)
                for i in range(n0 * n1):
                    if xf[i] < T.int64(-5) or xf[i] >= T.int64(5):
                        T.evaluate(T.call_packed("bscompile.index_error", "input 'tokens' holds index ",
                                                 T.Cast("int64", xf[i]), T.Cast("int64", T.int64(-5)),
                                                 T.Cast("int64", T.int64(5)), " at node Gather_3"))
                    yf[i] = T.Select(xf[i] < T.int64(0), xf[i] + T.int64(5), xf[i])

        @R.function
        def main(tokens: R.Tensor(("batch", "seq"), "int64")) -> R.Tensor(("batch", "seq", 2), "float32"):
            batch, seq = T.int64(), T.int64()
            cls = Expected
            with R.dataflow():
                neg = R.less(tokens, R.const(0, "int64"))
                shifted = R.add(tokens, R.const(5, "int64"))
                idx = R.where(neg, shifted, tokens)  # dead: the pipeline's DCE drops it
                checked = R.call_tir(cls.check_index, (tokens,), out_ty=R.Tensor((batch, seq), "int64"))
                Gather_3 = R.take(R.const(W), checked, axis=0, mode="fast")
                R.output(Gather_3)
            return Gather_3

    assert_checked(Before, Expected)


def test_symbolic_extent_is_a_kernel_argument():
    """Indexing a dynamic-dim tensor: its extent reaches the kernel as an int64 argument."""

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor(("n", 2), "float32"), idx: R.Tensor((3,), "int32")) -> R.Tensor((3, 2), "float32"):
            n = T.int64()
            with R.dataflow():
                Gather_4 = R.take(x, idx, axis=0, mode="fast")
                R.output(Gather_4)
            return Gather_4

    @I.ir_module
    class Expected:
        @T.prim_func(s_tir=True, private=True)
        def check_index(x: T.Buffer((3,), "int32"), b0: T.int64, y: T.Buffer((3,), "int32")):
            T.func_attr({"tir.noalias": True, "op_pattern": 8, CHECK_ATTR: True})
            with T.sblock("root"):
                xf = T.decl_buffer((3,), "int32", data=x.data)
                yf = T.decl_buffer((3,), "int32", data=y.data)
                for i in range(3):
                    if xf[i] < 0 or xf[i] >= T.Cast("int32", b0):
                        T.evaluate(T.call_packed("bscompile.index_error", "input 'idx' holds index ",
                                                 T.Cast("int64", xf[i]), T.Cast("int64", 0),
                                                 T.Cast("int64", T.Cast("int32", b0)), " at node Gather_4"))
                    yf[i] = xf[i]

        @R.function
        def main(x: R.Tensor(("n", 2), "float32"), idx: R.Tensor((3,), "int32")) -> R.Tensor((3, 2), "float32"):
            n = T.int64()
            cls = Expected
            with R.dataflow():
                checked = R.call_tir(cls.check_index, (idx, n), out_ty=R.Tensor((3,), "int32"))
                Gather_4 = R.take(x, checked, axis=0, mode="fast")
                R.output(Gather_4)
            return Gather_4

    assert_checked(Before, Expected)


def test_constant_index_out_of_range_is_a_compile_error():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((5, 2), "float32")):
            with R.dataflow():
                Gather_0 = R.take(x, R.const(np.array([1, 5], np.int64)), axis=0, mode="fast")
                R.output(Gather_0)
            return Gather_0

    with pytest.raises(UnsupportedModelError, match=r"constant index 5 outside \[0, 5\) at node Gather_0"):
        CheckIndices()(Before)


def test_cuda_wraps_and_clamps_instead_of_raising():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((5, 2), "float32"), idx: R.Tensor((3,), "int64")):
            with R.dataflow():
                neg = R.less(idx, R.const(0, "int64"))
                shifted = R.add(idx, R.const(5, "int64"))
                wrapped = R.where(neg, shifted, idx)
                lv = R.take(x, wrapped, axis=0, mode="fast")
                R.output(lv)
            return lv

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((5, 2), "float32"), idx: R.Tensor((3,), "int64")):
            with R.dataflow():
                neg = R.less(idx, R.const(0, "int64"))
                shifted = R.add(idx, R.const(5, "int64"))
                wrapped = R.where(neg, shifted, idx)
                neg1 = R.less(idx, R.const(0, "int64"))
                shifted1 = R.add(idx, R.const(5, "int64"))
                wrapped1 = R.where(neg1, shifted1, idx)
                low = R.maximum(wrapped1, R.const(0, "int64"))
                c = R.minimum(low, R.const(4, "int64"))
                lv = R.take(x, c, axis=0, mode="fast")
                R.output(lv)
            return lv

    assert_checked(Before, Expected, raises=False)  # (CUDA: KernelFamily.raises)


# --- compiled ONNX models: valid indices match onnxruntime, invalid ones are one clear error -------


def _model(op, inputs, attrs, data_shape, idx_shape, out_shape, updates_shape=None):
    nodes = [helper.make_node(op, inputs, ["y"], name="idx_node", **attrs)]
    vis = [helper.make_tensor_value_info("data", TensorProto.FLOAT, data_shape),
           helper.make_tensor_value_info("ids", TensorProto.INT64, idx_shape)]
    if updates_shape:
        vis.append(helper.make_tensor_value_info("upd", TensorProto.FLOAT, updates_shape))
    graph = helper.make_graph(nodes, op, vis, [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


CASES = {  # op -> (model, index range [lo, hi) of valid ids)
    "Gather": (_model("Gather", ["data", "ids"], {"axis": 1}, [3, 7], [2, 4], [3, 2, 4]), (-7, 7)),
    "GatherElements": (_model("GatherElements", ["data", "ids"], {"axis": 0}, [6, 3], [4, 3], [4, 3]), (-6, 6)),
    "GatherND": (_model("GatherND", ["data", "ids"], {}, [4, 5, 2], [3, 2], [3, 2]), (-4, 4)),
    "ScatterElements": (_model("ScatterElements", ["data", "ids", "upd"], {"axis": 1}, [3, 6], [3, 2], [3, 6],
                               [3, 2]), (-6, 6)),
    "ScatterND": (_model("ScatterND", ["data", "ids", "upd"], {}, [5, 3], [2, 1], [5, 3], [2, 3]), (-5, 5)),
}


@pytest.fixture(scope="module")
def compiled():
    return {op: bscompile.compile(m).load() for op, (m, _) in CASES.items()}


@pytest.mark.parametrize("op", list(CASES))
def test_index_ops_match_onnxruntime_and_reject_out_of_range(op, compiled, rng):
    model, (lo, hi) = CASES[op]
    mod = compiled[op]
    feeds = {s.name: rng.standard_normal(s.shape).astype(np.float32) for s in mod.inputs}
    spec = next(s for s in mod.inputs if s.name == "ids")
    ids = rng.integers(lo, hi, spec.shape)
    if op.startswith("Scatter"):  # distinct targets, so the result does not depend on the write order
        rows = int(np.prod(spec.shape)) // spec.shape[-1] if op == "ScatterElements" else 1
        per = spec.shape[-1] if op == "ScatterElements" else spec.shape[0]
        ids = np.stack([rng.permutation(hi)[:per] for _ in range(rows)]).reshape(spec.shape)
        ids = np.where(rng.random(ids.shape) < 0.5, ids - hi, ids)  # negative ids name the same targets
    feeds["ids"] = ids.astype(np.int64)
    out = mod.run(feeds)["y"]
    np.testing.assert_allclose(out, ort_run(model, feeds)["y"], rtol=1e-6, atol=0)
    for bad in (hi, lo - 1, 10**9):
        feeds["ids"] = feeds["ids"].copy()
        feeds["ids"].flat[-2 if op == "GatherND" else -1] = bad  # GatherND: coordinate 0 (extent 4, not 5)
        with pytest.raises(InputError, match=rf"^input 'ids' holds index {bad} outside \[{lo}, {hi}\) "
                                             "at node idx_node$"):
            mod.run(feeds)


def _reverse_gru(rng, seq=5, batch=2, inp=3, hid=4) -> onnx.ModelProto:
    """A reverse GRU fed ``sequence_lens``: it reads x[lens - 1 - t]."""
    inits = [onnx.numpy_helper.from_array(rng.standard_normal((1, 3 * hid, inp)).astype(np.float32), "W"),
             onnx.numpy_helper.from_array(rng.standard_normal((1, 3 * hid, hid)).astype(np.float32), "R")]
    node = helper.make_node("GRU", ["x", "W", "R", "", "lens"], ["y", "hn"], hidden_size=hid, direction="reverse",
                            name="gru")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [seq, batch, inp]),
                                            helper.make_tensor_value_info("lens", TensorProto.INT32, [batch])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [seq, 1, batch, hid])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def test_sequence_lengths_from_the_caller_are_checked(rng):
    """A reverse GRU reads x[lens - 1]: lens outside [0, seq] was an out-of-bounds read (segfault)."""
    seq, batch, inp = 5, 2, 3
    model = _reverse_gru(rng, seq, batch, inp)
    mod = bscompile.compile(model).load()
    x = rng.standard_normal((seq, batch, inp)).astype(np.float32)
    for lens in ([seq, 3], [0, 1]):
        feeds = {"x": x, "lens": np.array(lens, np.int32)}
        np.testing.assert_allclose(mod.run(feeds)["y"], ort_run(model, feeds)["y"], rtol=1e-4, atol=1e-5)
    for bad in (seq + 1, -1, 10**9):
        with pytest.raises(InputError, match=rf"^input 'lens' holds sequence length {bad} outside \[0, {seq + 1}\)$"):
            mod.run({"x": x, "lens": np.array([1, bad], np.int32)})


def test_sequence_lengths_with_a_symbolic_sequence_are_checked(rng):
    """A dynamic-axes GRU (symbolic time and batch): lens > time used to be clamped silently by the
    CPU kernel (onnxruntime refuses it); now it is the same error as for a static sequence."""
    model = gru_with_lens(rng, hidden=8, inp=4)
    mod = bscompile.compile(model).load()
    seq, batch = 5, 3
    x = rng.standard_normal((seq, batch, 4)).astype(np.float32)
    for lens in ([seq, 2, 0], [1, seq, 3]):
        feeds = {"x": x, "lens": np.array(lens, np.int32)}
        np.testing.assert_allclose(mod.run(feeds)["y"], ort_run(model, feeds)["y"], rtol=1e-4, atol=1e-5)
    for bad in (seq + 1, -1, 10**9):
        with pytest.raises(InputError, match=rf"^input 'lens' holds sequence length {bad} outside \[0, {seq + 1}\)$"):
            mod.run({"x": x, "lens": np.array([1, bad, 2], np.int32)})


def test_checked_sequence_lengths_are_not_checked_again(rng):
    """The recurrent site's ``lens`` operand is checked once: a second run of the pass (e.g. a
    user's pipeline repeating it) leaves the module alone."""
    mod = relax.transform.FoldConstant()(import_onnx(gru_with_lens(rng, hidden=8, inp=4), None).mod)
    once = CheckIndices()(mod)
    assert sum(isinstance(f, tvm.tirx.PrimFunc) and CHECK_ATTR in (f.attrs or {}) for f in once.functions.values()) == 1
    tvm.ir.assert_structural_equal(CheckIndices()(once), once)


@pytest.mark.skipif(shutil.which("g++") is None, reason="the CUDA emulator compiles kernels with g++")
def test_cuda_clamps_sequence_lengths(rng, tmp_path):
    """CUDA kernels cannot raise: lens > seq is clamped to seq. Before, the reverse direction read
    x[lens - 1 - t] out of bounds (a wrong answer on the emulator, garbage on a GPU)."""
    seq, batch, inp = 5, 2, 4
    model = _reverse_gru(rng, seq, batch, inp, hid=8)
    bscompile.compile(model, target="cuda").export(tmp_path / "g.bsc")
    x = rng.standard_normal((seq, batch, inp)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "lens.npy", np.array([seq + 1000, 3], np.int32))
    proc = subprocess.run([sys.executable, "-m", "bscompile.cli", "run", str(tmp_path / "g.bsc"), "--emulate",
                           "--input", f"x={tmp_path / 'x.npy'}", "--input", f"lens={tmp_path / 'lens.npy'}",
                           "--output", str(tmp_path / "y.npz")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    want = ort_run(model, {"x": x, "lens": np.array([seq, 3], np.int32)})["y"]
    np.testing.assert_allclose(np.load(tmp_path / "y.npz")["y"], want, rtol=1e-4, atol=1e-5)


def test_a_clamp_to_other_bounds_is_still_checked():
    """``minimum(maximum(x, 0), C)`` is in range only when C is exactly the extent - 1: a C whose
    first value fits and whose others do not (or a C of another shape) still gets a check kernel."""

    def clamped(hi):
        @I.ir_module
        class Before:
            @R.function
            def main(data: R.Tensor((10, 4), "float32"), x: R.Tensor((10, 4), "int64")):
                with R.dataflow():
                    low = R.maximum(x, R.const(0, "int64"))
                    c = R.minimum(low, R.const(hi, "int64"))
                    lv = R.gather_elements(data, c, axis=0)
                    R.output(lv)
                return lv

        return Before

    def checks(mod):
        return sum(isinstance(f, tvm.tirx.PrimFunc) and CHECK_ATTR in (f.attrs or {}) for f in mod.functions.values())

    assert checks(CheckIndices()(clamped(np.array(9, np.int64)))) == 0  # exactly in range: left alone
    for hi in (np.array([9, 1000, 1000, 1000], np.int64), np.array([[9, 9, 9, 9]], np.int64), np.array(10, np.int64)):
        assert checks(CheckIndices()(clamped(hi))) == 1, hi
