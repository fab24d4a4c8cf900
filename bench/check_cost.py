"""What the run-time index check (``passes.check_indices``) costs the bundled char-GRU.

    python bench/check_cost.py     # ~1 min; prints a markdown table

Compiles the bundled model with and without the ``CheckIndices`` pass and times both in one
process, interleaved call by call: through ``CompiledModule.run`` and kernel-only
(TVM's ``time_evaluator``), medians over rounds.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (sets thread env vars first)

import numpy as np  # noqa: E402

import bscompile  # noqa: E402
from bscompile.passes import pipeline  # noqa: E402
from bscompile.passes.check_indices import CheckIndices  # noqa: E402

MODEL = Path(bscompile.__file__).parent / "data" / "char_gru_bp4x4.onnx"


def compile_variant(check: bool) -> bscompile.CompiledModule:
    phases = pipeline.phases
    if not check:
        pipeline.phases = lambda plan: [(name, [p for p in passes if not isinstance(p, CheckIndices)])
                                        for name, passes in phases(plan)]
    try:
        return bscompile.compile(MODEL).load()
    finally:
        pipeline.phases = phases


def main(rounds: int = 15, reps: int = 200) -> None:
    mods = {"checked": compile_variant(True), "unchecked": compile_variant(False)}
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
    print(f"{info['cpu']}, {info['threads']} threads, {info['date']}, {rounds} rounds of {reps} calls\n")
    print("| variant | run() us | kernels only us |\n|---|---|---|")
    for k in mods:
        print(f"| {k} | {np.median(run_t[k]) * 1e6:.1f} | {np.median(kern_t[k]) * 1e6:.1f} |")
    for name, t in (("run()", run_t), ("kernels only", kern_t)):
        ratios = np.array(t["checked"]) / np.array(t["unchecked"]) - 1
        print(f"\ncheck cost, {name}: median of per-round ratios {np.median(ratios) * 100:+.2f}% "
              f"(rounds: {', '.join(f'{r * 100:+.1f}' for r in ratios)})")


if __name__ == "__main__":
    main()
