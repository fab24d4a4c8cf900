"""ShareIdenticalKernels: sites whose generated code is the same share one kernel."""

import re

import numpy as np
import pytest
import tvm
from onnx_models import ort_run, recurrent
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

import bscompile
from bscompile.passes.share_identical_kernels import ShareIdenticalKernels


def _module(share_c: bool):
    """Kernels ``a`` and ``b``: the same code, each with its own site and layout; ``c``: another
    shape (or, with ``share_c``, the same code as ``a`` but no site: TVM's own); ``main`` calls all."""
    n = 4 if share_c else 8

    @I.ir_module
    class Module:
        @T.prim_func(private=True)
        def a(x: T.Buffer((4,), "float32"), y: T.Buffer((4,), "float32")):
            T.func_attr({"bscompile.site": {"name": "W0"}, "bscompile.layout": {"layout": "bsr"}})
            for i in range(4):
                y[i] = x[i] * T.float32(2)

        @T.prim_func(private=True)
        def b(x: T.Buffer((4,), "float32"), y: T.Buffer((4,), "float32")):
            T.func_attr({"bscompile.site": {"name": "W1"}, "bscompile.layout": {"layout": "bsr"},
                         "bscompile.sparsity": {"density": 0.5}})
            for i in range(4):
                y[i] = x[i] * T.float32(2)

        @T.prim_func(private=True)
        def c(x: T.Buffer((n,), "float32"), y: T.Buffer((n,), "float32")):
            for i in range(n):
                y[i] = x[i] * T.float32(2)

        @R.function
        def main(x: R.Tensor((4,), "float32"), z: R.Tensor((n,), "float32")):
            cls = Module
            y1 = R.call_tir(cls.a, (x,), out_ty=R.Tensor((4,), "float32"))
            y2 = R.call_tir(cls.b, (y1,), out_ty=R.Tensor((4,), "float32"))
            y3 = R.call_tir(cls.c, (z,), out_ty=R.Tensor((n,), "float32"))
            return (y2, y3)

    return Module


def _merged(share_c: bool):
    """``_module(share_c)`` with ``b`` merged into ``a`` (``c`` left as it is)."""
    n = 4 if share_c else 8

    @I.ir_module
    class Expected:
        @T.prim_func(private=True)
        def a(x: T.Buffer((4,), "float32"), y: T.Buffer((4,), "float32")):
            T.func_attr({"bscompile.site": {"name": "W0"}, "bscompile.layout": {"layout": "bsr"}})
            for i in range(4):
                y[i] = x[i] * T.float32(2)

        @T.prim_func(private=True)
        def c(x: T.Buffer((n,), "float32"), y: T.Buffer((n,), "float32")):
            for i in range(n):
                y[i] = x[i] * T.float32(2)

        @R.function
        def main(x: R.Tensor((4,), "float32"), z: R.Tensor((n,), "float32")):
            cls = Expected
            y1 = R.call_tir(cls.a, (x,), out_ty=R.Tensor((4,), "float32"))
            y2 = R.call_tir(cls.a, (y1,), out_ty=R.Tensor((4,), "float32"))
            y3 = R.call_tir(cls.c, (z,), out_ty=R.Tensor((n,), "float32"))
            return (y2, y3)

    return Expected


def test_identical_site_kernels_become_one():
    tvm.ir.assert_structural_equal(ShareIdenticalKernels()(_module(share_c=False)), _merged(share_c=False))


def test_kernels_without_a_site_are_left_alone():
    """``c`` has ``a``'s code but no site (a fused operator of TVM's): neither merged nor a target."""
    tvm.ir.assert_structural_equal(ShareIdenticalKernels()(_module(share_c=True)), _merged(share_c=True))


def test_nothing_to_share_is_the_same_module():
    once = ShareIdenticalKernels()(_module(share_c=False))
    assert ShareIdenticalKernels()(once).same_as(once)


@pytest.mark.parametrize("op", ["GRU", "LSTM"])
def test_stacked_bidirectional_rnn_shares_kernels_and_matches_onnxruntime(rng, tmp_path, op):
    """Two bidirectional layers of one size and sparsity: the layers' recurrences of one direction
    get the same kernel, built once, and the artifact still matches onnxruntime (rtol 1e-4,
    atol 1e-5) on fresh inputs."""
    model = recurrent(op, 16, 32, 5, 2, layers=2, bidirectional=True, kind="4x4", rng=rng)
    art = bscompile.compile(model, dump_ir=tmp_path)
    sites = [w["kind"] for w in art.manifest.weights].count("recurrent")
    (dump,) = tmp_path.glob("*_ShareIdenticalKernels.py")  # (the pipeline's last pass)
    built = dump.read_text()
    kernels = set(re.findall(r"def (recurrent_\w+)\(", built))
    assert sites == 4 and len(kernels) == 2, (sites, kernels)
    # the manifest still lists every site by its own name (recorded before the merge)
    assert len({w["name"] for w in art.manifest.weights}) == len(art.manifest.weights), art.manifest.weights
    x = rng.standard_normal((5, 2, 16)).astype(np.float32)
    got, want = art.load().run({"x": x}), ort_run(model, {"x": x})
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-5, err_msg=name)
