"""Kernel building blocks checked against NumPy."""

import re

import numpy as np
import pytest
import tvm
from onnx_models import assert_product_close
from tvm.script import tirx as T

from bscompile.codegen.recurrent_cells import ACTIVATIONS, Activation
from bscompile.target import resolve_target

N = 4096


def _apply(expr_fn) -> callable:
    @T.prim_func(s_tir=True)
    def f(x: T.Buffer((N,), "float32"), y: T.Buffer((N,), "float32")):
        T.func_attr({"global_symbol": "f", "tir.noalias": True})
        for io in T.serial(N // 8):
            for ii in T.vectorized(8):
                y[io * 8 + ii] = expr_fn(x[io * 8 + ii])

    lib = tvm.compile(tvm.IRModule({"f": f}), target=resolve_target("llvm").tvm_target())

    def run(x):
        y = tvm.runtime.empty((N,), "float32")
        lib["f"](tvm.runtime.tensor(x), y)
        return y.numpy()

    return run


def test_vectorised_exp_sigmoid_tanh_accuracy(rng):
    x = np.concatenate([rng.uniform(-87, 88, N // 2), rng.standard_normal(N // 2) * 3]).astype(np.float32)
    x64 = x.astype(np.float64)
    sig = _apply(Activation("Sigmoid"))(x)
    np.testing.assert_allclose(sig, 1 / (1 + np.exp(-x64)), rtol=1e-6, atol=1e-7)
    th = _apply(Activation("Tanh"))(x)
    np.testing.assert_allclose(th, np.tanh(x64), rtol=1e-6, atol=2e-7)
    from bscompile.codegen.recurrent_cells import vexp

    e = _apply(vexp)(x)
    np.testing.assert_allclose(e, np.exp(x64), rtol=4e-7)


def test_every_activation_matches_onnx_definition(rng):
    x = (rng.standard_normal(N) * 4).astype(np.float32)
    x64 = x.astype(np.float64)
    ref = {
        "Sigmoid": 1 / (1 + np.exp(-x64)), "Tanh": np.tanh(x64), "Relu": np.maximum(x64, 0),
        "LeakyRelu": np.where(x64 >= 0, x64, 0.01 * x64), "ThresholdedRelu": np.where(x64 > 1, x64, 0),
        "HardSigmoid": np.clip(0.2 * x64 + 0.5, 0, 1), "Affine": x64, "ScaledTanh": np.tanh(x64),
        "Elu": np.where(x64 >= 0, x64, np.exp(x64) - 1), "Softsign": x64 / (1 + np.abs(x64)),
        "Softplus": np.log1p(np.exp(x64)),
    }
    assert set(ref) == set(ACTIVATIONS)
    for name, want in ref.items():
        np.testing.assert_allclose(_apply(Activation(name))(x), want, rtol=1e-5, atol=1e-6, err_msg=name)


# Every linear-kernel variant against NumPy, on shapes the block does not divide.
KERNEL_CASES = [
    # (n, k, block r x c, batch, schedule overrides)
    (100, 70, (4, 4), 1, {}),  # "block" variant, q chains + remainder
    (100, 70, (4, 4), 3, {}),  # "block", m_tile 3
    (64, 96, (4, 8), 2, {}),
    (50, 33, (2, 4), 5, {}),
    (50, 33, (4, 1), 1, {}),  # half-vector blocks
    (100, 70, (4, 4), 4, {"variant": "rows"}),
    (72, 40, (8, 8), 3, {}),  # "rows"
    (40, 90, (16, 16), 2, {"parallel": True}),
    (100, 70, (4, 4), 19, {}),  # "batch", m_vec 16 with padding
    (130, 70, (4, 4), 40, {"parallel": True}),  # "batch", chunked block rows (33 rows, 4 chunks)
    (64, 700, (2, 8), 200, {"parallel": True}),  # "batch", parallel transpose
    (100, 70, (4, 4), 8, {"variant": "block", "m_tile": 4}),
    # blocks dividing K: "block" reads x's columns with a shuffle instead of a replicated copy
    (100, 72, (4, 4), 3, {}),
    (64, 96, (2, 8), 5, {"variant": "block"}),
    (48, 64, (4, 2), 7, {"variant": "block", "m_tile": 4}),
    (40, 96, (1, 16), 2, {"variant": "block"}),
    # straight-line code for the weight's pattern (batch 1, N a multiple of the block height)
    (96, 70, (4, 4), 1, {"variant": "unrolled"}),
    (64, 48, (2, 8), 1, {"variant": "unrolled"}),
    (40, 64, (1, 8), 1, {"variant": "unrolled"}),
    (96, 72, (4, 4), 1, {"variant": "unrolled"}),
    # two threads claiming chunks of block rows (at most CLAIM_ITEMS = 16): 63 / 9 / 70 block rows
    # in 16 chunks of 4 (the last one short) / 9 of 1 / 14 of 5, every variant that runs on the pool
    (504, 90, (8, 8), 3, {"parallel": True, "claim": True}),  # "rows", m tail
    (36, 72, (4, 4), 4, {"variant": "block", "m_tile": 4, "parallel": True, "claim": True}),
    (280, 70, (4, 4), 40, {"parallel": True, "claim": True}),  # "batch", K and m padded
]


@pytest.mark.parametrize("n,k,blk,m,over", KERNEL_CASES, ids=lambda v: str(v).replace(" ", ""))
def test_linear_kernel_variants_match_numpy(rng, n, k, blk, m, over):
    """y = x @ W.T + bias for a 70%-block-sparse W, to float32 accumulation error
    (``onnx_models.assert_product_close``)."""
    import dataclasses

    from bscompile.codegen import cpu
    from bscompile.codegen.layout import BlockShape, BSRMatrix

    r, c = blk
    keep = rng.random((-(-n // r), -(-k // c))) >= 0.7
    w = rng.standard_normal((n, k)).astype(np.float32) * np.kron(keep, np.ones((r, c)))[:n, :k]
    mat = BSRMatrix.from_dense(w.astype(np.float32), BlockShape(r, c))
    sched = dataclasses.replace(cpu.default_schedule(mat, m), **over)
    if not over:  # the default schedule is the variant the case was written for
        assert sched.variant == ("batch" if m >= 8 else "rows" if r >= 8 else "block"), sched
    func = cpu.linear_kernel(mat, m, sched).with_attr("global_symbol", "k")
    # no mutable scalar (``v: T.int32 = ...``): each costs a workspace allocation per iteration
    assert re.search(r": T\.(int|float)32 = ", func.script()) is None
    lib = tvm.compile(tvm.IRModule({"k": func}), target=resolve_target("llvm").tvm_target())
    if sched.claim and sched.variant == "rows":  # the claim flags stay on the stack (no workspace per call)
        assert "AllocWorkspace" not in lib.mod.inspect_source("ll")
    x = rng.standard_normal((m, k)).astype(np.float32)
    bias = np.zeros(mat.padded_shape[0], np.float32)
    bias[:n] = rng.standard_normal(n)
    y = tvm.runtime.empty((m, n), "float32")
    lib["k"](*[tvm.runtime.tensor(a) for a in (x, mat.data, mat.indices, mat.indptr, bias)], y)
    assert_product_close(y.numpy(), x, w, bias[:n])


def test_two_core_targets_claim_block_rows_others_split_them(rng, monkeypatch):
    """A parallel linear kernel's threads claim chunks of block rows where the target names a
    2-core machine -- this machine (``--target llvm``) on a 2-core host, a Graviton2 instance's 2
    vCPUs -- and split them statically elsewhere: a 4-core board, a many-core host (claiming uses
    two threads), a target that names only a CPU (a preset, a JSON dict: cores not known).
    Recurrent kernels keep their split and refuse a record that claims; serial schedules never
    claim; the tuner tries the static split too."""
    import dataclasses

    from bscompile.codegen.layout import BlockShape, BSRMatrix

    w = rng.standard_normal((1024, 1024)).astype(np.float32)
    mat = BSRMatrix.from_dense(w, BlockShape(4, 4))  # dense: 1M weights, parallel at any m
    host_json = '{"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "skylake-avx512"}'
    for name, host_cores, claims in (("llvm", 2, True), ("llvm", 16, False), ("graviton2", 16, True),
                                     ("neoverse-n1", 2, False), ("x86_64", 2, False), (host_json, 2, False),
                                     ("rpi4", 2, False), ("cortex-a76", 2, False)):
        monkeypatch.setattr("bscompile.target.physical_cores", lambda n=host_cores: n)
        gens = resolve_target(name).kernel_family().generators
        lin = gens["linear"].schedule_space({}, mat, 64)
        assert lin[0].parallel and lin[0].claim == claims, (name, host_cores, lin[0])
        assert not any(s.claim and not s.parallel for s in lin), (name, lin)
        if claims:  # every parallel variant claims, each with its static twin
            assert all(dataclasses.replace(s, claim=False) in lin for s in lin if s.parallel), (name, lin)
        else:
            assert not any(s.claim for s in lin), (name, lin)
        assert not any(s.claim for s in gens["recurrent"].schedule_space({}, mat, 1)), name
        with pytest.raises(ValueError, match="recurrent"):
            gens["recurrent"].schedule_from_json(dataclasses.replace(lin[0], claim=True).to_json())
