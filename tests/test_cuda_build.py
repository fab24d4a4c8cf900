"""CUDA build-side proof (no GPU needed): models and kernels compile for sm_80 and sm_90.

For each architecture this builds a block-sparse MLP, a sparse GRU, a bidirectional
dense LSTM (hidden size not a multiple of the block height: the unfused step path)
and a GRU whose weights are graph inputs (sites the passes cannot analyse), plus
the block-sparse kernels at the papers' shapes over block sizes and batches and a
split GRU (``linear_before_reset=0``) recurrence and the opt-in persistent GRU kernel;
exports the artifacts; compiles the
generated CUDA source with ``nvcc -cubin`` and the flags TVM compiles with at load time
(``--use_fast_math``, its ptxas options); fails on any compile error or
any spilling kernel. The ptxas table goes to the test's temporary folder: only
``python bench/cuda_ptxas.py`` (the same builds) rewrites ``bench/results/cuda_ptxas.md``.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm

import bscompile
from bscompile.codegen import cuda, cuda_dynamic, cuda_persistent
from bscompile.codegen.cuda_ptxas import KernelResources, compile_source, cuda_sources, markdown_report, nvcc_path
from bscompile.codegen.layout import BlockShape, BSRMatrix
from bscompile.codegen.recurrent_cells import CellSpec
from bscompile.errors import BscompileError
from bscompile.target import resolve_target, with_arch
from onnx_models import mlp, recurrent, weights_as_inputs

ARCHS = ("sm_80", "sm_90")



def _models():
    rng = np.random.default_rng(0)
    out = {}
    out["mlp_bsr"], _ = mlp([512, 1024, 256, 10], 8, ["8x8", "4x4", "unstructured"], rng)
    out["gru_4x4"] = recurrent("GRU", 64, 128, 12, 4, 1, False, "4x4", rng)
    out["lstm_bidir_dense"] = recurrent("LSTM", 24, 20, 5, 2, 1, True, "dense", rng)
    out["gru_runtime_weights"] = weights_as_inputs(recurrent("GRU", 16, 32, 4, 2, 1, False, "dense", rng),
                                                    {"l0.W", "l0.R"})
    return out


def _kernel_module(arch_target: tvm.target.Target) -> tvm.IRModule:
    """The bench's sparse kernels (papers' shapes, blocks 4..32, batch 1..256) in one module."""
    rng = np.random.default_rng(1)
    funcs = {}
    for (n, k), density in (((1760, 1760), 0.1), ((7680, 2560), 0.05)):
        for b in (4, 8, 16, 32):
            keep = rng.random((n // b, k // b)) < density
            w = (np.repeat(np.repeat(keep, b, 0), b, 1) * rng.standard_normal((n, k))).astype(np.float32)
            mat = BSRMatrix.from_dense(w, BlockShape(b, b))
            for m in (1, 16, 64, 256):
                f = cuda.linear_kernel(mat, m, cuda.default_schedule(mat, m))
                name = f"bsr_{n}x{k}_b{b}_m{m}"
                funcs[name] = f.with_attr("global_symbol", name)
    # split GRU (linear_before_reset=0): the two-kernel step
    hid = 256
    cell = CellSpec("gru", hid)
    mats = [BSRMatrix.from_dense(rng.standard_normal(s).astype(np.float32), BlockShape(8, 8))
            for s in ((2 * hid, hid), (hid, hid))]
    f = cuda.recurrent_kernel(cell, mats, 6, 4, [cuda.default_schedule(m, 4) for m in mats])
    funcs["gru_split_h256"] = f.with_attr("global_symbol", "gru_split_h256")
    # the opt-in persistent kernel (spin-waits on step stamps, weights in dynamic shared memory)
    r = rng.standard_normal((3 * hid, hid)).astype(np.float32) * np.kron(rng.random((3 * hid // 8, hid // 8)) < 0.1,
                                                                          np.ones((8, 8), np.float32))
    mat = BSRMatrix.from_dense(r, BlockShape(8, 8))
    cell = CellSpec("gru", hid, linear_before_reset=True)
    f = cuda_persistent.recurrent_kernel(cell, [mat], 6, 4, [cuda.default_schedule(mat, 4)])
    funcs["gru_persistent_h256"] = f.with_attr("global_symbol", "gru_persistent_h256")
    # dynamic block selection: the site at a symbolic m, the gated LSTM recurrence (symbolic length)
    f = cuda_dynamic.dynamic_linear_kernel(1024, 4096, 128, 128, None, 256)
    funcs["dynamic_1024x4096_b128"] = f.with_attr("global_symbol", "dynamic_1024x4096_b128")
    cell = CellSpec("lstm", 1024, gate_order=(0, 3, 1, 2))
    f = cuda_dynamic.dynamic_recurrent_kernel(cell, 128, 128, 256, 1, None)
    funcs["dynamic_lstm_h1024_b128"] = f.with_attr("global_symbol", "dynamic_lstm_h1024_b128")
    return tvm.IRModule(funcs)


def test_target_table():
    spec = resolve_target("cuda")
    assert spec.device == "cuda" and spec.target["arch"] == "sm_80"
    assert with_arch("cuda", "sm_90").target["arch"] == "sm_90"
    assert resolve_target({"kind": "cuda", "arch": "sm_89"}).device == "cuda"
    with pytest.raises(BscompileError, match="^unknown CUDA architecture 'sm_12'; known: "):
        with_arch("cuda", "sm_12")


def ptxas_rows(workdir) -> list[tuple[str, KernelResources]]:
    """Build the models and the kernel module for every arch, compile their CUDA source with
    nvcc (TVM's load-time flags): ``(model, ptxas resources)`` per kernel and arch."""
    rows = []
    models = _models()
    for arch in ARCHS:
        spec = with_arch("cuda", arch)
        sources = {}
        for name, model in models.items():
            art = bscompile.compile(model, target=spec)
            path = art.export(workdir / f"{name}_{arch}.bsc")
            assert path.stat().st_size > 0
            assert art.manifest.device == "cuda"
            (src,) = cuda_sources(art.executable)
            sources[name] = src
        with spec.tvm_target() as tgt:
            ex = tvm.compile(_kernel_module(tgt), target=tgt)
        (sources["kernels"],) = cuda_sources(ex)
        for name, src in sources.items():
            kernels = compile_source(src, arch, workdir=str(workdir))
            assert kernels, f"{name}: ptxas reported no kernels"
            rows += [(name, k) for k in kernels]
    return rows


def ptxas_report(rows: list[tuple[str, KernelResources]], header: str) -> str:
    return markdown_report(rows, lambda kernel: not _tvm_light(kernel), ARCHS, header)


@pytest.mark.skipif(nvcc_path() is None, reason="nvcc is not installed: cannot compile CUDA here")
def test_cuda_build_nvcc_ptxas(tmp_path):
    rows = ptxas_rows(tmp_path)
    failures = [f"{name} {k.arch} {k.kernel}: {k.spill_stores} B spill stores, {k.spill_loads} B spill loads"
                for name, k in rows if k.spills]
    report = tmp_path / "cuda_ptxas.md"  # not bench/results: that is `python bench/cuda_ptxas.py`'s
    report.write_text(ptxas_report(rows, "Written by the test"))
    text = report.read_text()
    assert f"Spilling kernels: {len(failures)}." in text
    assert all(f"`{k.kernel}`" in text for _, k in rows if not _tvm_light(k.kernel))
    assert not failures, "kernels spill:\n" + "\n".join(failures)


def _tvm_light(kernel: str) -> bool:
    return not any(kernel.startswith(p) for p in ("linear_", "recurrent_", "bsr_", "gru_split", "gru_persistent"))
