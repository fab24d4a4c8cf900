"""FuseLoopKernels: a real loop whose step is PrimFuncs runs as one kernel (Before/Expected, cases
it must leave alone, and end to end against the unfused loop and onnxruntime)."""

import numpy as np
import onnxruntime as ort
import pytest
import tvm
from onnx import TensorProto, helper
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

import bscompile
from bscompile.models.onnx_cells import CELLS, scan_model
from bscompile.passes.fuse_loop_kernels import FuseLoopKernels
from test_loops import IN, B, _cell_scan, _states

# The frontend's loop structure (bscompile.frontend.loops) as TVM's FuseTIR leaves it, for a
# running sum: s' = s + x[t], every step's s' written to row t of o.


@I.ir_module(check_well_formed=False)
class Before:
    @T.prim_func(private=True, s_tir=True)
    def less(a: T.Buffer((), "int64"), b: T.Buffer((), "int64"), c: T.Buffer((), "bool")):
        c[()] = a[()] < b[()]

    @T.prim_func(private=True, s_tir=True)
    def inc(a: T.Buffer((), "int64"), c: T.Buffer((), "int64")):
        c[()] = a[()] + T.int64(1)

    @T.prim_func(private=True, s_tir=True)
    def stop_at(a: T.Buffer((), "int64"), n: T.Buffer((), "int64"), c: T.Buffer((), "int64")):
        c[()] = T.min(a[()] + T.int64(256), n[()])

    @T.prim_func(private=True, s_tir=True)
    def add_row(s: T.Buffer((T.int64(2),), "float32"), x_h: T.handle, t: T.Buffer((), "int64"),
                y: T.Buffer((T.int64(2),), "float32")):
        n = T.int64()
        x = T.match_buffer(x_h, (n, T.int64(2)), "float32")
        for i in range(T.int64(2)):
            y[i] = s[i] + x[t[()], i]

    @T.prim_func(private=True, s_tir=True)
    def write_row(o_h: T.handle, t: T.Buffer((), "int64"), y: T.Buffer((T.int64(2),), "float32")):
        n = T.int64()
        o = T.match_buffer(o_h, (n, T.int64(2)), "float32")
        for i in range(T.int64(2)):
            o[t[()], i] = y[i]

    @R.function(private=True)
    def loop_step(t: R.Tensor((), "int64"), s: R.Tensor((2,), "float32"), x: R.Tensor(("k", 2), "float32")) -> R.Tuple(R.Tensor((2,), "float32"), R.Tensor((2,), "float32")):
        cls = Before
        with R.dataflow():
            y = R.call_tir(cls.add_row, (s, x, t), out_ty=R.Tensor((2,), "float32"))
            gv = (y, y)
            R.output(gv)
        return gv

    @R.function(private=True)
    def loop(t: R.Tensor((), "int64"), stop: R.Tensor((), "int64"), n: R.Tensor((), "int64"),
             s: R.Tensor((2,), "float32"), x: R.Tensor(("k", 2), "float32"), o: R.Tensor(("k", 2), "float32")) -> R.Tuple(R.Tensor((2,), "float32"), R.Tensor(("k", 2), "float32")):
        cls = Before
        c = R.call_tir(cls.less, (t, stop), out_ty=R.Tensor((), "bool"))
        if c:
            with R.dataflow():
                st = cls.loop_step(t, s, x)
                s1 = st[0]
                y = st[1]
                o1 = R.call_tir_inplace(cls.write_row, (o, t, y), out_ty=R.Tensor((k, 2), "float32"), inplace_indices=[0])
                t1 = R.call_tir(cls.inc, (t,), out_ty=R.Tensor((), "int64"))
                r = cls.loop(t1, stop, n, s1, x, o1)
                R.output(r)
            res = r
        else:
            res = (s, o)
        return res

    @R.function(private=True)
    def loop_chunks(t: R.Tensor((), "int64"), n: R.Tensor((), "int64"), s: R.Tensor((2,), "float32"),
                    x: R.Tensor(("k", 2), "float32"), o: R.Tensor(("k", 2), "float32")) -> R.Tuple(R.Tensor((2,), "float32"), R.Tensor(("k", 2), "float32")):
        R.func_attr({"bscompile.loop": {"reversed_outputs": [0]}})
        cls = Before
        c = R.call_tir(cls.less, (t, n), out_ty=R.Tensor((), "bool"))
        if c:
            stop = R.call_tir(cls.stop_at, (t, n), out_ty=R.Tensor((), "int64"))
            r = cls.loop(t, stop, n, s, x, o)
            r1 = cls.loop_chunks(stop, n, r[0], x, r[1])
            res = r1
        else:
            res = (s, o)
        return res

    @R.function
    def main(x: R.Tensor(("time", 2), "float32"), s0: R.Tensor((2,), "float32"),
             n: R.Tensor((), "int64")) -> R.Tuple(R.Tensor((2,), "float32"), R.Tensor(("time", 2), "float32")):
        time = T.int64()
        cls = Before
        o = R.zeros(R.shape([time, 2]), "float32")  # the scan buffer: the caller's own, fresh
        r = cls.loop_chunks(R.const(0, "int64"), n, s0, x, o)
        return r



@I.ir_module(check_well_formed=False)
class Expected:
    @T.prim_func(private=True, s_tir=True)
    def loop_kernel(t0: T.Buffer((), "int64"), n: T.Buffer((), "int64"), r0: T.Buffer((T.int64(2),), "float32"),
                    r1_h: T.handle, r2_h: T.handle, state3: T.Buffer((T.int64(2),), "float32")):
        T.func_attr({"tir.noalias": True, "s_tir": True})
        k = T.int64()
        r1 = T.match_buffer(r1_h, (k, T.int64(2)), "float32")
        r2 = T.match_buffer(r2_h, (k, T.int64(2)), "float32")
        t = T.sblock_alloc_buffer((), "int64")
        add_row_out = T.sblock_alloc_buffer((T.int64(2),))
        inc_out = T.sblock_alloc_buffer((), "int64")
        for i0 in range(T.int64(2)):
            state3[i0] = r0[i0]
        for it in range(t0[()], t0[()] + T.max(n[()] - t0[()], T.int64(0))):
            t[()] = it
            for i in range(T.int64(2)):
                add_row_out[i] = state3[i] + r1[t[()], i]
            for i in range(T.int64(2)):
                r2[t[()], i] = add_row_out[i]
            inc_out[()] = t[()] + T.int64(1)
            for i0 in range(T.int64(2)):
                state3[i0] = add_row_out[i0]

    @R.function
    def main(x: R.Tensor(("time", 2), "float32"), s0: R.Tensor((2,), "float32"),
             n: R.Tensor((), "int64")) -> R.Tuple(R.Tensor((2,), "float32"), R.Tensor(("time", 2), "float32")):
        time = T.int64()
        cls = Expected
        o = R.zeros(R.shape([time, 2]), "float32")
        r = R.call_tir_inplace(cls.loop_kernel, (R.const(0, "int64"), n, s0, x, o),
                               out_ty=[R.Tensor((2,), "float32"), R.Tensor((time, 2), "float32")], inplace_indices=[-1, 4])
        return r



def test_fuse_loop_kernels():
    tvm.ir.assert_structural_equal(FuseLoopKernels()(Before), Expected)


# a step that calls a packed function: nothing to inline
@R.function(private=True)
def packed_step(t: R.Tensor((), "int64"), s: R.Tensor((2,), "float32"),
                x: R.Tensor(("k", 2), "float32")) -> R.Tuple(R.Tensor((2,), "float32"), R.Tensor((2,), "float32")):
    y = R.call_pure_packed("test.double", s, ty_args=R.Tensor((2,), "float32"))
    return (y, y)


def test_leaves_a_step_with_a_packed_call_alone():
    mod = tvm.IRModule(dict(Before.functions))
    mod.update_func(mod.get_global_var("loop_step"), packed_step)
    tvm.ir.assert_structural_equal(FuseLoopKernels()(mod), mod)


def test_leaves_an_in_place_write_into_a_parameter_alone():
    """Before with the scan buffer a parameter of main: the kernel would write the caller's array."""
    time = tvm.tirx.Var("time", "int64")
    params = [relax.Var("x", relax.TensorType([time, 2], "float32")), relax.Var("s0", relax.TensorType([2], "float32")),
              relax.Var("n", relax.TensorType([], "int64")), relax.Var("o", relax.TensorType([time, 2], "float32"))]
    x, s0, n, o = params
    bb = relax.BlockBuilder(tvm.IRModule({gv: f for gv, f in Before.functions.items() if gv.name_hint != "main"}))
    with bb.function("main", params):
        r = bb.emit(relax.Call(bb.get().get_global_var("loop_chunks"), [relax.const(0, "int64"), n, s0, x, o]))
        bb.emit_func_output(r)
    mod = bb.get()
    tvm.ir.assert_structural_equal(FuseLoopKernels()(mod), mod)


def test_leaves_modules_without_loops_alone():
    tvm.ir.assert_structural_equal(FuseLoopKernels()(Expected), Expected)


def _symbolic_scan(rng, cell: str):
    model = _cell_scan(rng, 0, 0, cell)
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "time"
    model.graph.output[-1].type.tensor_type.shape.dim[0].dim_param = "time"
    return model


@pytest.mark.parametrize("cell", sorted(CELLS))
def test_fused_loop_is_the_loop(rng, tmp_path, cell):
    """A custom cell over a symbolic length: one kernel (the IR after the pass has no step
    function), whose results are the unfused loop's (rtol 1e-5, atol 5e-6: LLVM may contract the
    inlined code differently, and 50 steps of a recurrence grow the difference: a peephole LSTM
    (seed 736721174) differed by 1.7e-6 on a value of 0.067 at step 20) and onnxruntime's (rtol
    1e-4, atol 1e-5) at 1, 7 and 50 steps."""
    model = _symbolic_scan(rng, cell)
    fused = bscompile.compile(model, dump_ir=tmp_path).load()
    after = next(tmp_path.glob("*_FuseLoopKernels.py")).read_text()
    assert "loop_kernel" in after and "def loop_step" not in after
    with tvm.transform.PassContext(disabled_pass=["FuseLoopKernels"]):
        looped = bscompile.compile(model).load()
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for steps in (1, 7, 50):
        feeds = {"x": rng.standard_normal((B, steps, IN)).astype(np.float32), **_states(rng, cell)}
        got, ref, want = fused.run(feeds), looped.run(feeds), sess.run(None, feeds)
        for (name, g), r, w in zip(got.items(), ref.values(), want, strict=True):
            np.testing.assert_allclose(g, r, rtol=1e-5, atol=5e-6, err_msg=f"{name}, {steps} steps")
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5, err_msg=f"{name}, {steps} steps")


def _fused_against_ort(model, feeds_list, tmp_path) -> None:
    """``model`` compiles to one loop kernel and matches onnxruntime (rtol 1e-4, atol 1e-5)."""
    compiled = bscompile.compile(model, dump_ir=tmp_path).load()
    assert "loop_kernel" in next(tmp_path.glob("*_FuseLoopKernels.py")).read_text()
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for feeds in feeds_list:
        for (name, g), w in zip(compiled.run(feeds).items(), sess.run(None, feeds), strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5, err_msg=f"{name}, x {feeds['x'].shape}")


def test_symbolic_batch_and_length(rng, tmp_path):
    """Symbolic batch too: the states' shapes are symbolic in the kernel (the site kernels' int32
    sizes take the kernel's int64 ones)."""
    model = scan_model("layer_norm_rnn", rng, IN, 8, "batch", "time", scale=1.6)
    _fused_against_ort(model, [{"x": rng.standard_normal((b, t, IN)).astype(np.float32),
                                "h0": rng.standard_normal((b, 8)).astype(np.float32)} for b, t in ((1, 3), (4, 9))],
                       tmp_path)


def test_two_scan_outputs_one_reversed(rng, tmp_path):
    model = scan_model("mgu", rng, IN, 8, 2, "time", scale=1.6)
    scan = model.graph.node[0]
    body = next(a for a in scan.attribute if a.name == "body").g
    body.node.append(helper.make_node("Add", ["state0_next", "state0_next"], ["y2"]))
    body.output.append(helper.make_tensor_value_info("y2", TensorProto.FLOAT, [2, 8]))
    scan.output.append("ys2")
    next(a for a in scan.attribute if a.name == "scan_output_axes").ints.append(0)
    scan.attribute.append(helper.make_attribute("scan_output_directions", [0, 1]))
    model.graph.output.append(helper.make_tensor_value_info("ys2", TensorProto.FLOAT, ["time", 2, 8]))
    _fused_against_ort(model, [{"x": rng.standard_normal((2, 7, IN)).astype(np.float32),
                                "h0": rng.standard_normal((2, 8)).astype(np.float32)}], tmp_path)
