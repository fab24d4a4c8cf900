"""What the run-time index check (``passes.check_indices``) costs the bundled char-GRU.

    python bench/check_cost.py              # ~1 min; prints a markdown table
    python bench/check_cost.py --symbolic   # the same model exported with dynamic axes (batch, seq)

Compiles the bundled model with and without the ``CheckIndices`` pass and times both in one
process, interleaved call by call: through ``CompiledModule.run`` and kernel-only
(TVM's ``time_evaluator``), medians over rounds.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (sets thread env vars first)

import numpy as np  # noqa: E402
import onnx  # noqa: E402

import bscompile  # noqa: E402
from bscompile.passes import pipeline  # noqa: E402

MODEL = Path(bscompile.__file__).parent / "data" / "char_gru_bp4x4.onnx"


def bundled_model(symbolic: bool) -> onnx.ModelProto:
    """The bundled model; ``symbolic``: its input dims named, as ``dynamic_axes`` exports them."""
    model = onnx.load(MODEL)
    if symbolic:
        for dim, name in zip(model.graph.input[0].type.tensor_type.shape.dim, ("batch", "seq")):
            dim.dim_param = name
    return model


def compile_variant(model: onnx.ModelProto, check: bool) -> bscompile.CompiledModule:
    """The bundled model compiled by the "bscompile" pipeline, without ``CheckIndices`` if not ``check``
    (the registered pipeline reads ``pipeline.bscompile_passes`` at call time)."""
    passes = pipeline.bscompile_passes
    if not check:
        pipeline.bscompile_passes = lambda *a, **kw: [p for p in passes(*a, **kw) if p.info.name != "CheckIndices"]
    try:
        return bscompile.compile(model).load()
    finally:
        pipeline.bscompile_passes = passes


def check_kernel_alone(symbolic: bool, reps: int = 2000) -> float:
    """Seconds per call of the bundled model's check kernel alone (50 int64 token ids; the
    symbolic variant with its shape as kernel variables): the cost the check adds, free of
    the run-to-run noise of whole-model timings on a shared machine."""
    import tvm

    from bscompile.passes.check_indices import check_kernel

    shape = (tvm.tirx.Var("b", "int64"), tvm.tirx.Var("s", "int64")) if symbolic else (1, 50)
    func = check_kernel(shape, "int64", (103,), True, "input 'tokens' holds index ", " at node Gather")
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target="llvm")
    ids = np.random.default_rng(0).integers(-103, 103, (1, 50))
    x, y = tvm.runtime.tensor(ids), tvm.runtime.tensor(np.zeros_like(ids))
    return float(np.median(lib.mod.time_evaluator("main", tvm.cpu(), number=reps, repeat=5)(x, y).results))


def main(rounds: int = 15, reps: int = 200, symbolic: bool = False) -> None:
    model = bundled_model(symbolic)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    mods = {"checked": compile_variant(model, True), "unchecked": compile_variant(model, False)}
    feeds = {"tokens": np.random.default_rng(0).integers(0, 103, (1, 50)).astype(np.int64)}
    ref = mods["unchecked"].run(feeds)["logits"]
    np.testing.assert_array_equal(mods["checked"].run(feeds)["logits"], ref)
    run_t = {k: [] for k in mods}
    kern_t = {k: [] for k in mods}
    for _ in range(rounds):
        for k, t in common.interleaved({k: (lambda m=m: m.run(feeds)) for k, m in mods.items()}, reps).items():
            run_t[k].append(t)
        for k, m in mods.items():
            kern_t[k].append(float(np.median(m.benchmark(feeds, number=reps, repeat=1))))
    info = common.machine_info()
    print(f"{info['cpu']}, {info['threads']} threads, {info['date']}, {rounds} rounds of {reps} calls, "
          f"{'symbolic' if symbolic else 'static'} input shape, load average {os.getloadavg()[0]:.2f}\n")
    print("| variant | run() us | kernels only us |\n|---|---|---|")
    for k in mods:
        print(f"| {k} | {np.median(run_t[k]) * 1e6:.1f} | {np.median(kern_t[k]) * 1e6:.1f} |")
    alone = check_kernel_alone(symbolic)
    print(f"\ncheck kernel alone: {alone * 1e6:.3f} us per call = {alone / np.median(run_t['unchecked']) * 100:.3f}% "
          f"of an unchecked run() ({alone / np.median(kern_t['unchecked']) * 100:.3f}% of its kernels)")
    print(f"\nwhole run: {time.perf_counter() - wall0:.0f} s wall, {time.process_time() - cpu0:.0f} s CPU")
    for name, t in (("run()", run_t), ("kernels only", kern_t)):
        ratios = np.array(t["checked"]) / np.array(t["unchecked"]) - 1
        print(f"\ncheck cost, {name}: median of per-round ratios {np.median(ratios) * 100:+.2f}% "
              f"(rounds: {', '.join(f'{r * 100:+.1f}' for r in ratios)})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--symbolic", action="store_true", help="dynamic axes: symbolic batch and seq")
    parser.add_argument("--rounds", type=int, default=15)
    main(rounds=parser.parse_args().rounds, symbolic=parser.parse_args().symbolic)
