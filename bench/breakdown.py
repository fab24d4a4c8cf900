"""Where the time goes: kernel-only time against the time through Python, and the cold call.

    python bench/breakdown.py      # ~3 min on 2 cores; writes bench/results/breakdown.md

For the target cells of ``bench/kernels.py`` (90% sparsity, 4x4-16x16 blocks) it
times the kernel bscompile chose on its own (TVM's ``time_evaluator``, back to back)
and through ``CompiledModule.run`` (what the kernel benchmark times), and reports the
kernel's achieved bandwidth and GFLOP/s against the roofline. It then splits the
per-call overhead of a tiny model and measures what a cold call costs with and
without a twin warming the code (see ``bench/common.py``).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (sets thread env vars first)

import numpy as np  # noqa: E402
from allocations import builtin_cost_us  # noqa: E402
from kernels import block_pruned, matmul_model  # noqa: E402

import bscompile  # noqa: E402
from bscompile.codegen import cpu  # noqa: E402
from bscompile.codegen.layout import DENSE_ROWS, BlockShape, BSRMatrix  # noqa: E402
from bscompile.target import TargetSpec, resolve_target  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "breakdown.md"
CELLS = [((1760, 1760), m, b) for m in (1, 4, 16, 64) for b in (4, 8, 16)] + \
        [((4096, 1024), m, b) for m in (1, 64) for b in (4, 16)]


def time_kernel(func, mat: BSRMatrix, m: int, spec: TargetSpec, repeat: int) -> float:
    """Median seconds of one linear kernel alone, back to back (TVM's time_evaluator)."""
    import tvm

    lib = tvm.compile(tvm.IRModule({"k": func.with_attr("global_symbol", "k")}), target=spec.tvm_target())
    dev = tvm.cpu(0)
    n, k = mat.shape
    rng = np.random.default_rng(0)
    args = [rng.standard_normal((m, k)).astype(np.float32), mat.data, mat.indices, mat.indptr,
            np.zeros(mat.padded_shape[0], np.float32), np.zeros((m, n), np.float32)]
    args = [tvm.runtime.tensor(a, dev) for a in args]
    timer = lib.mod.time_evaluator("k", dev, number=max(1, int(2e5 // max(mat.nnz_blocks * m, 1))) + 3,
                                   repeat=repeat, min_repeat_ms=20)
    return float(np.median(timer(*args).results))


def kernel_rows(roof: dict, rng) -> list[str]:
    spec = resolve_target("llvm")
    lines = ["| shape | batch | block | layout, variant | kernel us | via run() us | kernel GB/s | kernel GFLOP/s | "
             "of roofline |", "|" + "---|" * 9]
    for (n, k), m, b in CELLS:
        w = block_pruned(rng, n, k, b, 0.9)
        art = bscompile.compile(matmul_model(w, m))
        d = art.manifest.weights[0]["decision"]
        mat = BSRMatrix.dense(w, DENSE_ROWS) if d["layout"] == "dense" else \
            BSRMatrix.from_dense(w, BlockShape.parse(d["block"]))
        sched = cpu.CpuSchedule(**d["schedule"])
        t_kernel = time_kernel(cpu.linear_kernel(mat, m, sched), mat, m, spec, repeat=7)
        mod = art.load()
        x = rng.standard_normal((m, k)).astype(np.float32)
        t_run = common.interleaved({"run": lambda: mod.run({"x": x})}, 200)["run"]
        gbs = (mat.nbytes + 4 * m * (n + k)) / t_kernel / 1e9
        gflops = 2 * np.count_nonzero(w) * m / t_kernel / 1e9
        frac = max(gbs / roof["bandwidth_GBps"], gflops / roof["peak_GFLOPs"])
        lines.append(f"| {n}x{k} | {m} | {b}x{b} | {d['layout']} {d['block']}, {sched.variant} | {t_kernel * 1e6:.1f} | "
                     f"{t_run * 1e6:.1f} | {gbs:.1f} | {gflops:.1f} | {frac * 100:.0f}% |")
        print(lines[-1], flush=True)
    return lines


def call_rows(rng) -> list[str]:
    w = block_pruned(rng, 64, 64, 4, 0.9)
    art = bscompile.compile(matmul_model(w, 1))
    mod, twin = art.load(), art.load()
    x = rng.standard_normal((1, 64)).astype(np.float32)
    args = mod._args({"x": x})
    t = common.interleaved({"run": lambda: mod.run({"x": x}), "args": lambda: mod._args({"x": x}),
                            "vm": lambda: mod._main(*args)}, 300)
    kernel = float(np.median(mod.benchmark({"x": x}, number=100, repeat=7)))
    cold = common.interleaved({"run": lambda: mod.run({"x": x})}, 60, cold=True)["run"]
    cold_twin = common.interleaved({"run": lambda: mod.run({"x": x})}, 60, cold=True,
                                   twins={"run": lambda: twin.run({"x": x})})["run"]
    us = lambda v: f"{v * 1e6:.1f} us"  # noqa: E731
    return ["| what | time |", "|---|---|",
            f"| `run()` warm, total | {us(t['run'])} |",
            f"| of which input checks + staging copy (`_args`) | {us(t['args'])} |",
            f"| of which the Relax VM call incl. the kernel | {us(t['vm'])} |",
            f"| the VM alone, TVM timer | {us(kernel)} |",
            f"| `run()` after a full cache flush | {us(cold)} |",
            f"| `run()` after a flush and a twin call (the benchmark's *cold*) | {us(cold_twin)} |"]


def model_rows(batch: int, runs: int = 20) -> list[str]:
    """Time per VM call of the bundled char GRU (TVM's VM instrument hook), summed over ``runs``."""
    import collections
    import tempfile

    import tvm_ffi
    from models import BUNDLED, with_batch

    with tempfile.TemporaryDirectory() as tmp:
        art = bscompile.compile(str(with_batch(BUNDLED, batch, Path(tmp) / "m.onnx")))
    mod = art.load()
    feeds = {s.name: np.zeros(s.shape, s.dtype) for s in mod.inputs}
    plain = common.interleaved({"run": lambda: mod.run(feeds)}, runs)["run"]
    spent: dict[str, float] = collections.defaultdict(float)
    calls: dict[str, int] = collections.defaultdict(int)
    start: dict[str, float] = {}

    def instrument(func, name, before, ret, *args):
        if before:
            start[name] = time.perf_counter()
        else:
            spent[name] += time.perf_counter() - start[name]
            calls[name] += 1
        return 0

    per_builtin = builtin_cost_us()
    mod._vm.set_instrument(tvm_ffi.convert(instrument))
    for _ in range(runs):
        mod.run(feeds)
    mod._vm.set_instrument(None)
    total = sum(spent.values())
    lines = [f"Batch {batch}: `run()` takes {plain * 1e6:.0f} us uninstrumented; the instrumented calls sum to "
             f"{total / runs * 1e6:.0f} us per run (each includes 1-5 us of hook overhead, more with more arguments: "
             "the VM's builtins themselves cost ~0.1 us each unhooked, `bench/results/allocations.md`).", "",
             "| VM call | calls per run | us per run, hooked | share of hooked | unhooked, estimated |",
             "|---|---|---|---|---|"]
    for name, t in sorted(spent.items(), key=lambda kv: -kv[1])[:12]:
        n = calls[name] // runs
        est = f"{n * per_builtin:.1f} us ({n * per_builtin / plain * 1e-4:.1f}% of run())" \
            if name.startswith("vm.builtin") else "kernel"
        lines.append(f"| `{name}` | {n} | {t / runs * 1e6:.1f} | {t / total * 100:.0f}% | {est} |")
    return lines


def main():
    t0 = time.perf_counter()
    info = common.machine_info()
    roof = common.measure_roofline()
    rng = np.random.default_rng(0)
    kr = kernel_rows(roof, rng)
    cr = call_rows(rng)
    mr = model_rows(1) + [""] + model_rows(8)
    text = "\n".join([
        "# Profile: kernel time, call overhead, cold calls", "",
        "- command: `python bench/breakdown.py`", f"- machine: {info['cpu']}, {info['cores']} cores; "
        f"{info['threads']} threads", f"- date: {info['date']}; wall time {(time.perf_counter() - t0) / 60:.1f} min",
        f"- roofline: {roof['bandwidth_GBps']:.1f} GB/s, {roof['peak_GFLOPs']:.0f} GFLOP/s (best of 20)", "",
        "## The chosen kernels alone and through Python (90% sparsity, warm)", "",
        "*kernel*: TVM's timer on the kernel bscompile chose, back to back; *via run()*: the same weight "
        "through `CompiledModule.run` as `bench/kernels.py` times it. *of roofline*: the larger of achieved "
        "bandwidth / roofline bandwidth and achieved GFLOP/s / peak (above 100%: the warm weights come from L3, "
        "faster than the DRAM roofline).", "", *kr, "",
        "## One call of a 64x64 layer", "", *cr, "",
        "## The bundled char GRU LM, per VM call", "", *mr, ""])
    OUT.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
