"""GPU benchmark: bscompile's CUDA kernels against cuBLAS, PyTorch BSR, cuSPARSE and cuDNN.

    python bench/gpu.py --build-only             # no GPU: generate + compile every kernel (sm_90)
    python bench/gpu.py --build-only --nvcc      # ... and compile the CUDA source with nvcc
    python bench/gpu.py --emulate [--quick]      # no GPU: every kernel run once on the CUDA emulator, checked
    python bench/gpu.py                          # on a GPU machine with PyTorch (CUDA build)
    python bench/gpu.py --quick                  # a few cells only

GPU mode, for every cell: correctness of bscompile's kernel against PyTorch in
float64 on fresh random inputs, then timings with CUDA events (warm-up, median of
``--reps`` individually timed calls, all implementations interleaved) of

- block-sparse linear ``y = x @ W.T + b``: shapes 1760x1760 at 90% and 7680x2560 at
  95% block sparsity, blocks 4x4 to 32x32, batch 1 to 64; against cuBLAS dense
  (``F.linear``), PyTorch BSR (``to_sparse_bsr`` + ``F.linear``) and cuSPARSE CSR
  (``to_sparse_csr`` + ``torch.sparse.mm``);
- a whole GRU layer (hidden 1760 and 2304, batch 4, 90% and 70% sparsity, 50 steps,
  input size = hidden), compiled by ``bscompile.compile`` from ONNX, against
  cuDNN's GRU (``torch.nn.GRU``);
- the GRU recurrence alone with bscompile's default per-step kernels and with the opt-in
  persistent kernel (``codegen/cuda_persistent.py``), outputs compared, where it fits on chip.

Writes bench/results/gpu.{md,json}. The kernels are compiled for the GPU's own
architecture (``--arch`` to override). TVM 0.27 JIT-compiles the CUDA source when a
module is loaded: with NVRTC if ``cuda-bindings`` is installed, else this script sets
``TVM_CUDA_COMPILE_MODE=nvcc`` (nvcc must be on PATH).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

OUT = ROOT / "bench" / "results"
LINEAR_CASES = [((1760, 1760), 0.90), ((7680, 2560), 0.95)]
BLOCKS = [4, 8, 16, 32]
BATCHES = [1, 4, 16, 64]
GRU_HIDDEN = [1760, 2304]
GRU_SPARSITY = [0.90, 0.70]
GRU_BATCH, GRU_STEPS, GRU_BLOCK = 4, 50, 8


def block_mask(rng, n, k, b, density):
    keep = rng.random((-(-n // b), -(-k // b))) < density
    return np.repeat(np.repeat(keep, b, 0), b, 1)[:n, :k]


def sparse_weight(rng, n, k, b, sparsity):
    w = rng.standard_normal((n, k)).astype(np.float32) / np.sqrt(k)
    return (w * block_mask(rng, n, k, b, 1 - sparsity)).astype(np.float32)


# ---------------------------------------------------------------- building (no GPU needed)

def cuda_spec(arch: str):
    from bscompile.target import with_arch

    return with_arch("cuda", arch)


def build_linear(w: np.ndarray, b: int, m: int, spec):
    """bscompile's kernel for ``w`` in BSR ``b x b`` at batch ``m``: (executable, BSRMatrix, schedule)."""
    import tvm

    from bscompile.codegen import cuda
    from bscompile.codegen.layout import BlockShape, BSRMatrix

    mat = BSRMatrix.from_dense(w, BlockShape(b, b))
    sched = cuda.default_schedule(mat, m)
    func = cuda.linear_kernel(mat, m, sched).with_attr("global_symbol", "main")
    with spec.tvm_target() as tgt:
        ex = tvm.compile(tvm.IRModule({"main": func}), target=tgt)
    return ex, mat, sched


def gru_onnx(hidden: int, sparsity: float, rng, block: int = GRU_BLOCK):
    """A one-layer ONNX GRU (PyTorch's convention: linear_before_reset=1, gates zrh) and its weights."""
    from onnx import TensorProto, helper, numpy_helper

    h, t, bsz = hidden, GRU_STEPS, GRU_BATCH
    w = np.stack([sparse_weight(rng, 3 * h, h, block, sparsity)])
    r = np.stack([sparse_weight(rng, 3 * h, h, block, sparsity)])
    bias = (rng.standard_normal((1, 6 * h)) * 0.1).astype(np.float32)
    node = helper.make_node("GRU", ["x", "W", "R", "B"], ["Y", "Yh"], hidden_size=h, linear_before_reset=1)
    graph = helper.make_graph(
        [node], "gru", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [t, bsz, h])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [t, 1, bsz, h]),
         helper.make_tensor_value_info("Yh", TensorProto.FLOAT, [1, bsz, h])],
        [numpy_helper.from_array(a, n) for a, n in ((w, "W"), (r, "R"), (bias, "B"))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return model, (w[0], r[0], bias[0])


def build_gru(hidden: int, sparsity: float, spec, rng):
    import bscompile

    model, weights = gru_onnx(hidden, sparsity, rng)
    art = bscompile.compile(model, target=spec, block=f"{GRU_BLOCK}x{GRU_BLOCK}")
    return art, weights


def build_recurrence(r: np.ndarray, hidden: int, spec):
    """The GRU recurrence alone, both schedules: the per-step kernels (default) and the opt-in
    persistent kernel (``None`` when the layer does not fit on chip). Returns (executable, mat, names)."""
    import tvm

    from bscompile.codegen import cuda, cuda_persistent
    from bscompile.codegen.layout import BlockShape, BSRMatrix
    from bscompile.codegen.recurrent_cells import CellSpec

    cell = CellSpec("gru", hidden, linear_before_reset=True)
    mat = BSRMatrix.from_dense(r, BlockShape(GRU_BLOCK, GRU_BLOCK))
    scheds = [cuda.default_schedule(mat, GRU_BATCH)]
    funcs = {"per_step": cuda.recurrent_kernel(cell, [mat], GRU_STEPS, GRU_BATCH, scheds)}
    try:
        funcs["persistent"] = cuda_persistent.recurrent_kernel(
            cell, [mat], GRU_STEPS, GRU_BATCH, scheds, max_shared=cuda_persistent.max_shared_for(spec.target["arch"]))
    except cuda_persistent.PersistentUnsupported as err:
        print(f"  persistent kernel n/a for hidden {hidden}: {err}", flush=True)
    funcs = {k: f.with_attr("global_symbol", k) for k, f in funcs.items()}
    with spec.tvm_target() as tgt:
        ex = tvm.compile(tvm.IRModule(funcs), target=tgt)
    return ex, mat, sorted(funcs)


def recurrence_args(mat, hidden: int, rng) -> list[np.ndarray]:
    """Inputs of the recurrence kernels (xp with the input projection, R in BSR, biases, h0, ...)."""
    from bscompile.codegen.layout import BSRMatrix

    g = 3 * hidden
    one = BSRMatrix.dense(np.zeros((1, 1), np.float32), 1)
    rbias = np.zeros(mat.padded_shape[0], np.float32)
    rbias[:g] = rng.standard_normal(g) * 0.1
    zeros = np.zeros((GRU_BATCH, hidden), np.float32)
    return [rng.standard_normal((GRU_STEPS, GRU_BATCH, g)).astype(np.float32), mat.data, mat.indices, mat.indptr,
            rbias, one.data, one.indices, one.indptr, np.zeros(1, np.float32),
            rng.standard_normal((GRU_BATCH, hidden)).astype(np.float32), zeros,
            np.full(GRU_BATCH, GRU_STEPS, np.int32), np.zeros(3 * hidden, np.float32)]


def linear_cells(quick: bool):
    cases = LINEAR_CASES[:1] if quick else LINEAR_CASES
    blocks = [8, 16] if quick else BLOCKS
    batches = [1, 16] if quick else BATCHES
    return [(shape, sp, b, m) for shape, sp in cases for b in blocks for m in batches]


def gru_cells(quick: bool):
    return [(2304, 0.9)] if quick else [(h, s) for h in GRU_HIDDEN for s in GRU_SPARSITY]


def build_only(args) -> int:
    from bscompile.codegen.cuda_ptxas import compile_source, cuda_sources, nvcc_path

    spec = cuda_spec(args.arch or "sm_90")
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    sources = []
    weights = {}
    for (n, k), sp, b, m in linear_cells(args.quick):
        key = (n, k, sp, b)
        if key not in weights:
            weights[key] = sparse_weight(rng, n, k, b, sp)
        ex, mat, sched = build_linear(weights[key], b, m, spec)
        sources += cuda_sources(ex)
        print(f"built {n}x{k} {sp:.0%} block {b}x{b} batch {m}: {mat.nnz_blocks} blocks, {sched}", flush=True)
    for h, sp in gru_cells(args.quick):
        art, _ = build_gru(h, sp, spec, rng)
        sources += cuda_sources(art.executable)
        layouts = ", ".join(f"{w['name']}: {w['decision']['layout']} {w['decision']['block']}"
                            for w in art.manifest.weights)
        print(f"built GRU hidden {h} {sp:.0%} sparse: {layouts}", flush=True)
        ex, _, names = build_recurrence(sparse_weight(rng, 3 * h, h, GRU_BLOCK, sp), h, spec)
        sources += cuda_sources(ex)
        print(f"built GRU recurrence hidden {h} {sp:.0%} sparse: {', '.join(names)}", flush=True)
    print(f"{len(sources)} CUDA modules for {spec.target['arch']} in {time.perf_counter() - t0:.1f} s")
    if args.nvcc:
        if nvcc_path() is None:
            print("nvcc not found: skipping the nvcc compile")
            return 1
        spills = 0
        for src in sources:
            for kr in compile_source(src, spec.target["arch"]):
                spills += kr.spills
        print(f"nvcc: all {len(sources)} modules compile for {spec.target['arch']}; spilling kernels: {spills}")
        return 1 if spills else 0
    return 0


def emulate(args) -> int:
    """No GPU: run every kernel the benchmark would time once on the CUDA emulator, checked
    against NumPy in float64 (linear) or against the per-step kernels (persistent recurrence)."""
    import tvm

    from bscompile.runtime import cuda_emulator as emu

    emu.install()
    spec = cuda_spec(args.arch or "sm_90")
    rng = np.random.default_rng(4)
    dev = tvm.cuda(0)  # host memory under the emulator
    worst = 0.0
    for (n, k), sp, b, m in linear_cells(args.quick):
        w = sparse_weight(rng, n, k, b, sp)
        ex, mat, sched = build_linear(w, b, m, spec)
        emu.emulate_host_module(ex)
        x = rng.standard_normal((m, k)).astype(np.float32)
        bias = np.zeros(mat.padded_shape[0], np.float32)
        bias[:n] = rng.standard_normal(n)
        y = tvm.runtime.empty((m, n), "float32", dev)
        t0 = time.perf_counter()
        ex.mod["main"](*[tvm.runtime.tensor(a, dev) for a in (x, mat.data, mat.indices, mat.indptr, bias)], y)
        ref = x.astype(np.float64) @ w.T.astype(np.float64) + bias[:n]
        err = float(np.abs(y.numpy() - ref).max() / (np.abs(x) @ np.abs(w.T) + np.abs(bias[:n])).max())
        worst = max(worst, err)
        print(f"emulated {n}x{k} {sp:.0%} block {b}x{b} batch {m}: rel err {err:.1e} "
              f"({time.perf_counter() - t0:.2f} s)", flush=True)
    for h, sp in gru_cells(args.quick):
        ex, mat, names = build_recurrence(sparse_weight(rng, 3 * h, h, GRU_BLOCK, sp), h, spec)
        emu.emulate_host_module(ex)
        ins = recurrence_args(mat, h, rng)
        ys = {}
        for name in names:  # (the persistent kernel spin-waits: the emulator runs its blocks co-resident)
            out = [tvm.runtime.empty(s, "float32", dev) for s in ((GRU_STEPS, GRU_BATCH, h), (GRU_BATCH, h),
                                                                   (GRU_BATCH, h))]
            t0 = time.perf_counter()
            ex.mod[name](*[tvm.runtime.tensor(a, dev) for a in ins], *out)
            ys[name] = out[0].numpy()
            print(f"emulated GRU recurrence h={h} {sp:.0%} {name}: {time.perf_counter() - t0:.2f} s", flush=True)
        if "persistent" in ys:
            err = float(np.abs(ys["persistent"] - ys["per_step"]).max())
            worst = max(worst, err)
            print(f"  persistent vs per-step: max abs err {err:.1e}", flush=True)
    print(f"all emulated kernels {'ok' if worst < 1e-4 else 'FAIL'} (worst error {worst:.1e})")
    return 0 if worst < 1e-4 else 1


# ---------------------------------------------------------------- GPU run

def _setup_jit():
    try:
        import cuda.bindings  # noqa: F401  (NVRTC, TVM's default JIT)
    except ImportError:
        if shutil.which("nvcc") is None:
            sys.exit("need NVRTC (pip install cuda-bindings) or nvcc on PATH: TVM compiles CUDA at load time")
        os.environ.setdefault("TVM_CUDA_COMPILE_MODE", "nvcc")


def time_events(fn, reps: int, warmup: int = 10) -> float:
    """Median milliseconds of ``reps`` individually timed calls (CUDA events)."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _tvm_tensor(t):
    import tvm

    return tvm.runtime.from_dlpack(t) if hasattr(tvm.runtime, "from_dlpack") else tvm.nd.from_dlpack(t)


def check(name: str, got, ref, scale) -> float:
    """Max error relative to the magnitude of the terms (|x| @ |W|.T + |b|)."""
    err = float(((got.double() - ref).abs() / (scale + 1e-30)).max())
    status = "ok" if err < 1e-4 else "FAIL"
    print(f"  check {name}: rel err {err:.2e} {status}", flush=True)
    if status == "FAIL":
        raise SystemExit(f"{name}: result differs from PyTorch float64 (rel err {err:.2e})")
    return err


def run_linear(args, spec, rows):
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(1)
    dev = torch.device("cuda")
    weights = {}
    for (n, k), sp, b, m in linear_cells(args.quick):
        key = (n, k, sp, b)
        if key not in weights:
            weights[key] = sparse_weight(rng, n, k, b, sp)
        w_np = weights[key]
        ex, mat, sched = build_linear(w_np, b, m, spec)
        import tvm

        f = tvm.runtime.load_module(_export(ex)) if args.via_export else ex.mod
        func = f["main"]
        w = torch.from_numpy(w_np).to(dev)
        bias = torch.from_numpy(rng.standard_normal(n).astype(np.float32)).to(dev)
        bias_pad = torch.zeros(mat.padded_shape[0], device=dev)
        bias_pad[:n] = bias
        data = torch.from_numpy(mat.data).to(dev)
        indices = torch.from_numpy(mat.indices).to(dev)
        indptr = torch.from_numpy(mat.indptr).to(dev)
        x = torch.randn(m, k, device=dev)
        y = torch.empty(m, n, device=dev)
        targs = [_tvm_tensor(t) for t in (x, data, indices, indptr, bias_pad, y)]
        ours = lambda: func(*targs)  # noqa: E731
        ours()
        torch.cuda.synchronize()
        ref = x.double() @ w.double().T + bias.double()
        scale = x.double().abs() @ w.double().abs().T + bias.double().abs()
        err = check(f"{n}x{k} {sp:.0%} {b}x{b} m={m}", y, ref, scale)
        w_bsr = w.to_sparse_bsr((b, b))
        w_csr = w.to_sparse_csr()
        impls = {"bscompile": ours, "cublas_dense": lambda: F.linear(x, w, bias)}
        try:
            F.linear(x, w_bsr, bias)
            impls["torch_bsr"] = lambda: F.linear(x, w_bsr, bias)
        except Exception as e:  # noqa: BLE001 - report and go on
            print(f"  torch BSR F.linear unavailable: {e}".splitlines()[0])
        impls["cusparse_csr"] = lambda: torch.sparse.mm(w_csr, x.T).T + bias
        times = {name: [] for name in impls}
        for _ in range(args.rounds):  # interleave implementations
            for name, fn in impls.items():
                times[name].append(time_events(fn, args.reps))
        med = {name: statistics.median(v) for name, v in times.items()}
        row = {"kind": "linear", "shape": [n, k], "sparsity": sp, "block": b, "batch": m,
               "nnz_blocks": mat.nnz_blocks, "schedule": sched.to_json(), "rel_err": err,
               "ms": med, "speedup_vs_dense": med["cublas_dense"] / med["bscompile"]}
        rows.append(row)
        print(f"{n}x{k} {sp:.0%} {b}x{b} m={m}: " + ", ".join(f"{k_}: {v * 1e3:.1f} us" for k_, v in med.items())
              + f"  ({row['speedup_vs_dense']:.2f}x vs cuBLAS)", flush=True)


def _export(ex) -> str:
    import tempfile

    path = os.path.join(tempfile.mkdtemp(prefix="bsc-gpu-"), "lib.so")
    ex.export_library(path)
    return path


def torch_gru(hidden, weights, dev):
    """cuDNN GRU with the ONNX weights (gate order zrh -> PyTorch's rzn)."""
    import torch

    w, r, bias = weights
    h = hidden
    perm = np.concatenate([np.arange(h, 2 * h), np.arange(0, h), np.arange(2 * h, 3 * h)])
    gru = torch.nn.GRU(h, h).to(dev)
    with torch.no_grad():
        gru.weight_ih_l0.copy_(torch.from_numpy(w[perm]))
        gru.weight_hh_l0.copy_(torch.from_numpy(r[perm]))
        gru.bias_ih_l0.copy_(torch.from_numpy(bias[:3 * h][perm]))
        gru.bias_hh_l0.copy_(torch.from_numpy(bias[3 * h:][perm]))
    return gru


def run_gru(args, spec, rows):
    import torch
    import tvm
    from tvm import relax

    rng = np.random.default_rng(2)
    dev = torch.device("cuda")
    for h, sp in gru_cells(args.quick):
        art, weights = build_gru(h, sp, spec, rng)
        if args.via_export:
            vm = relax.VirtualMachine(tvm.runtime.load_module(_export(art.executable)), tvm.cuda(0))
        else:
            vm = relax.VirtualMachine(art.executable, tvm.cuda(0))
        x = torch.randn(GRU_STEPS, GRU_BATCH, h, device=dev)
        xt = _tvm_tensor(x)
        out = vm["main"](xt)
        y_ours = torch.from_dlpack(out[0]).reshape(GRU_STEPS, GRU_BATCH, h)
        gru = torch_gru(h, weights, dev)
        with torch.no_grad():
            ref, _ = gru.double()(x.double())
            scale = ref.abs().max()
            err = check(f"GRU h={h} {sp:.0%}", y_ours, ref, scale)
            gru = gru.float()
            torch.backends.cudnn.enabled = True
            impls = {"bscompile": lambda: vm["main"](xt), "cudnn_gru": lambda: gru(x)}
            times = {name: [] for name in impls}
            for _ in range(args.rounds):
                for name, fn in impls.items():
                    times[name].append(time_events(fn, max(args.reps // 5, 10), warmup=3))
        med = {name: statistics.median(v) for name, v in times.items()}
        row = {"kind": "gru", "hidden": h, "sparsity": sp, "batch": GRU_BATCH, "steps": GRU_STEPS,
               "block": GRU_BLOCK, "rel_err": err, "ms": med,
               "layouts": [w["decision"] for w in art.manifest.weights],
               "speedup_vs_cudnn": med["cudnn_gru"] / med["bscompile"]}
        rows.append(row)
        print(f"GRU h={h} {sp:.0%}: " + ", ".join(f"{k}: {v:.3f} ms" for k, v in med.items())
              + f"  ({row['speedup_vs_cudnn']:.2f}x vs cuDNN)", flush=True)


def run_recurrence(args, spec, rows):
    """Per-step kernels vs the persistent kernel on the GRU recurrence (same inputs, outputs compared)."""
    import torch
    import tvm

    rng = np.random.default_rng(3)
    for h, sp in gru_cells(args.quick):
        ex, mat, names = build_recurrence(sparse_weight(rng, 3 * h, h, GRU_BLOCK, sp), h, spec)
        mod = tvm.runtime.load_module(_export(ex)) if args.via_export else ex
        ins = [tvm.runtime.tensor(a, tvm.cuda(0)) for a in recurrence_args(mat, h, rng)]
        outs = {n: [tvm.runtime.empty(s, "float32", tvm.cuda(0))
                    for s in ((GRU_STEPS, GRU_BATCH, h), (GRU_BATCH, h), (GRU_BATCH, h))] for n in names}
        calls = {n: (lambda n=n: mod[n](*ins, *outs[n])) for n in names}
        for fn in calls.values():
            fn()
        torch.cuda.synchronize()
        ref = outs["per_step"][0].numpy()
        err = {n: float(np.abs(outs[n][0].numpy() - ref).max() / (np.abs(ref).max() + 1e-30)) for n in names}
        if max(err.values()) > 1e-4:
            raise SystemExit(f"GRU recurrence h={h}: persistent kernel differs from the per-step kernels ({err})")
        times = {n: [] for n in names}
        for _ in range(args.rounds):
            for n, fn in calls.items():
                times[n].append(time_events(fn, max(args.reps // 5, 10), warmup=3))
        med = {n: statistics.median(v) for n, v in times.items()}
        rows.append({"kind": "recurrence", "hidden": h, "sparsity": sp, "batch": GRU_BATCH, "steps": GRU_STEPS,
                     "block": GRU_BLOCK, "ms": med, "rel_err_vs_per_step": err})
        print(f"GRU recurrence h={h} {sp:.0%}: " + ", ".join(f"{k}: {v:.3f} ms" for k, v in med.items()), flush=True)


def write_results(rows, device: str, arch: str):
    OUT.mkdir(parents=True, exist_ok=True)
    meta = {"device": device, "arch": arch, "host": platform.node(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    (OUT / "gpu.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# GPU benchmark ({device}, {arch}, fp32)", "",
             "Median of CUDA-event timings; bscompile's output checked against PyTorch float64 first.", "",
             "## Block-sparse linear (us)", "",
             "| shape | sparsity | block | batch | bscompile | cuBLAS dense | torch BSR | cuSPARSE CSR | vs dense |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["kind"] != "linear":
            continue
        ms = r["ms"]
        cell = lambda k: f"{ms[k] * 1e3:.1f}" if k in ms else "n/a"  # noqa: E731
        lines.append(f"| {r['shape'][0]}x{r['shape'][1]} | {r['sparsity']:.0%} | {r['block']}x{r['block']} | "
                     f"{r['batch']} | {cell('bscompile')} | {cell('cublas_dense')} | {cell('torch_bsr')} | "
                     f"{cell('cusparse_csr')} | {r['speedup_vs_dense']:.2f}x |")
    lines += ["", f"## GRU layer (batch {GRU_BATCH}, {GRU_STEPS} steps, ms)", "",
              "| hidden | sparsity | bscompile | cuDNN GRU | speedup |", "|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["kind"] == "gru":
            lines.append(f"| {r['hidden']} | {r['sparsity']:.0%} | {r['ms']['bscompile']:.3f} | "
                         f"{r['ms']['cudnn_gru']:.3f} | {r['speedup_vs_cudnn']:.2f}x |")
    lines += ["", f"## GRU recurrence: per-step kernels vs persistent kernel (batch {GRU_BATCH}, {GRU_STEPS} steps, "
              "ms)", "", "| hidden | sparsity | per-step | persistent | speedup |", "|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["kind"] == "recurrence":
            ms = r["ms"]
            pers = f"{ms['persistent']:.3f}" if "persistent" in ms else "n/a (weights do not fit on chip)"
            speed = f"{ms['per_step'] / ms['persistent']:.2f}x" if "persistent" in ms else ""
            lines.append(f"| {r['hidden']} | {r['sparsity']:.0%} | {ms['per_step']:.3f} | {pers} | {speed} |")
    (OUT / "gpu.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT / 'gpu.md'} and gpu.json")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build-only", action="store_true", help="no GPU: generate and compile the kernels only")
    ap.add_argument("--nvcc", action="store_true", help="with --build-only: also compile the CUDA source with nvcc")
    ap.add_argument("--emulate", action="store_true", help="no GPU: run every kernel once on the CUDA emulator "
                    "and check it (no timings)")
    ap.add_argument("--arch", help="sm_80 | sm_87 | sm_89 | sm_90 (default: the GPU's, or sm_90 with --build-only)")
    ap.add_argument("--quick", action="store_true", help="a few cells only")
    ap.add_argument("--reps", type=int, default=100, help="timed calls per implementation and round")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    ap.add_argument("--skip-gru", action="store_true")
    ap.add_argument("--skip-linear", action="store_true")
    ap.add_argument("--via-export", action="store_true", help="load kernels through export_library + load_module")
    args = ap.parse_args(argv)
    if args.build_only:
        return build_only(args)
    if args.emulate:
        return emulate(args)
    import torch

    if not torch.cuda.is_available():
        sys.exit("no CUDA device visible to PyTorch; use --build-only on a machine without a GPU")
    _setup_jit()
    major, minor = torch.cuda.get_device_capability()
    arch = args.arch or f"sm_{major}{minor}"
    spec = cuda_spec(arch)
    device = torch.cuda.get_device_name()
    print(f"{device}, compiling for {arch}", flush=True)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 cuBLAS, as bscompile's kernels
    torch.backends.cudnn.allow_tf32 = False
    rows: list[dict] = []
    if not args.skip_linear:
        run_linear(args, spec, rows)
    if not args.skip_gru:
        run_gru(args, spec, rows)
        run_recurrence(args, spec, rows)
    write_results(rows, device, arch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
