"""OwnOutputs: outputs never alias the input staging buffers, a constant, or each other."""

import numpy as np
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper
from onnx_models import OPSET, ort_run
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

import bscompile
from bscompile.codegen.cuda_ptxas import nvcc_path
from bscompile.passes.own_outputs import OwnOutputs


def test_views_of_inputs_and_duplicates_are_copied():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((2, 3), "float32")):
            with R.dataflow():
                r = R.reshape(x, R.shape([3, 2]))
                y = R.nn.relu(x)
                R.output(r, y)
            return (x, r, y, y)

    @I.ir_module
    class Expected:
        @T.prim_func(s_tir=True, private=True)
        def copy_output(x: T.Buffer((2, 3), "float32"), y: T.Buffer((2, 3), "float32")):
            T.func_attr({"tir.noalias": True, "op_pattern": 8})
            with T.sblock("root"):
                xf = T.decl_buffer((6,), "float32", data=x.data)
                yf = T.decl_buffer((6,), "float32", data=y.data)
                for i in range(6):
                    yf[i] = xf[i]

        @T.prim_func(s_tir=True, private=True)
        def copy_output1(x: T.Buffer((3, 2), "float32"), y: T.Buffer((3, 2), "float32")):
            T.func_attr({"tir.noalias": True, "op_pattern": 8})
            with T.sblock("root"):
                xf = T.decl_buffer((6,), "float32", data=x.data)
                yf = T.decl_buffer((6,), "float32", data=y.data)
                for i in range(6):
                    yf[i] = xf[i]

        @R.function
        def main(x: R.Tensor((2, 3), "float32")):
            cls = Expected
            with R.dataflow():
                r = R.reshape(x, R.shape([3, 2]))
                y = R.nn.relu(x)
                R.output(r, y)
            owned = R.call_tir(cls.copy_output, (x,), out_ty=R.Tensor((2, 3), "float32"))
            owned1 = R.call_tir(cls.copy_output1, (r,), out_ty=R.Tensor((3, 2), "float32"))
            owned2 = R.call_tir(cls.copy_output, (y,), out_ty=R.Tensor((2, 3), "float32"))
            return (owned, owned1, y, owned2)

    tvm.ir.assert_structural_equal(OwnOutputs()(Before), Expected)
    # CUDA results are copied to the host anyway: no copy kernel (its flat loop is no GPU schedule)
    tvm.ir.assert_structural_equal(OwnOutputs(copied=True)(Before), Before)


def test_computed_outputs_are_left_alone():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((2, 3), "float32")):
            with R.dataflow():
                y = R.nn.relu(x)
                z = R.permute_dims(x)  # a copy in TVM, not a view
                R.output(y, z)
            return (y, z)

    tvm.ir.assert_structural_equal(OwnOutputs()(Before), Before)


def test_symbolic_pass_through_is_copied():
    """A dynamic-dim input returned as is: the copy kernel takes the shape as its own variables."""

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor(("n", 3), "float32")):
            n = T.int64()
            with R.dataflow():
                y = R.nn.relu(x)
                R.output(y)
            return (x, y)

    @I.ir_module
    class Expected:
        @T.prim_func(s_tir=True, private=True)
        def copy_output(var_x: T.handle, var_y: T.handle):
            T.func_attr({"tir.noalias": True, "op_pattern": 8})
            n0 = T.int64()
            x = T.match_buffer(var_x, (n0, 3), "float32")
            y = T.match_buffer(var_y, (n0, 3), "float32")
            with T.sblock("root"):
                xf = T.decl_buffer((n0 * 3,), "float32", data=x.data)
                yf = T.decl_buffer((n0 * 3,), "float32", data=y.data)
                for i in range(n0 * 3):
                    yf[i] = xf[i]

        @R.function
        def main(x: R.Tensor(("n", 3), "float32")):
            n = T.int64()
            cls = Expected
            with R.dataflow():
                y = R.nn.relu(x)
                R.output(y)
            owned = R.call_tir(cls.copy_output, (x,), out_ty=R.Tensor((n, 3), "float32"))
            return (owned, y)

    tvm.ir.assert_structural_equal(OwnOutputs()(Before), Expected)


@pytest.mark.parametrize("rows", [2, "rows"], ids=["static", "symbolic"])
def test_outputs_survive_the_next_call_and_cannot_corrupt_the_model(rows, rng):
    """Also with a dynamic dim (``dynamic_axes``): symbolic outputs were left aliasing the input."""
    cst = rng.standard_normal((2, 3)).astype(np.float32)
    nodes = [helper.make_node("Identity", ["x"], ["a"], name="id"),
             helper.make_node("Reshape", ["x", "shp"], ["b"], name="rs"),
             helper.make_node("Identity", ["cst"], ["c"], name="idc"),
             helper.make_node("Relu", ["x"], ["d"], name="relu"),
             helper.make_node("Identity", ["d"], ["e"], name="ide")]
    graph = helper.make_graph(
        nodes, "alias", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, 3])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in "abcde"],
        [numpy_helper.from_array(np.array([3, 2] if rows == 2 else [-1], np.int64), "shp"),
         numpy_helper.from_array(cst, "cst")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    mod = bscompile.compile(model).load()
    x1, x2 = (rng.standard_normal((2, 3)).astype(np.float32) for _ in range(2))
    first = mod.run({"x": x1})
    want = ort_run(model, {"x": x1})
    second = mod.run({"x": x2})
    for name in "abcde":
        np.testing.assert_array_equal(first[name], want[name], err_msg=name)  # not overwritten by the 2nd call
    np.testing.assert_array_equal(second["b"], x2.reshape(want["b"].shape))
    first["c"][:] = 0  # the caller owns it: writing to it must not change the model's constant
    first["d"][:] = 0
    third = mod.run({"x": x1})
    np.testing.assert_array_equal(third["c"], cst)
    np.testing.assert_array_equal(first["e"], want["e"])  # d and e do not share memory
    np.testing.assert_array_equal(third["e"], want["e"])


@pytest.mark.skipif(nvcc_path() is None, reason="nvcc is not installed: cannot build for CUDA here")
def test_cuda_builds_pass_through_outputs_and_checked_gathers():
    """On CUDA results are copied to the host anyway: no copy kernel (whose flat loop is no GPU
    schedule), and indices are clamped (device code cannot raise)."""
    table = numpy_helper.from_array(np.ones((10, 4), np.float32), "table")
    nodes = [helper.make_node("Identity", ["x"], ["a"], name="id"),
             helper.make_node("Gather", ["table", "ids"], ["g"], name="G")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
                                           helper.make_tensor_value_info("ids", TensorProto.INT64, [3])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in "ag"], [table])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    assert bscompile.compile(model, target="cuda").manifest.device == "cuda"
