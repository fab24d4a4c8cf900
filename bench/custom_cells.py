"""Custom recurrent cells (not ONNX operators) as ONNX Scan over a symbolic length: one fused
kernel vs the looped form vs onnxruntime.

    python bench/custom_cells.py      # ~2 min; writes bench/results/custom_cells.{md,json}

The cells of :mod:`bscompile.models.onnx_cells` (a minimal gated unit, an LSTM with peepholes,
a layer-normalised tanh RNN; dense random weights), input = hidden, 64 steps, batch 1, the
time axis symbolic. Each file compiled by bscompile twice -- as it compiles by default
(``FuseLoopKernels``: the whole time loop one kernel) and with that pass disabled (the VM
runs the loop function step by step) -- and run by onnxruntime (its own Scan). Every
implementation warm for itself (``common.interleaved``), one process, one run.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (sets thread env vars first)

import numpy as np  # noqa: E402
import tvm  # noqa: E402

import bscompile  # noqa: E402
from bscompile.models.onnx_cells import CELLS, initial_states, scan_model  # noqa: E402

HIDDEN = (128, 512)
STEPS, BATCH = 64, 1
OUT = Path(__file__).resolve().parent / "results"


def main() -> None:
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    rows, meta = [], {"cases": []}
    for hidden in HIDDEN:
        for name in CELLS:
            model = scan_model(name, rng, hidden, hidden, BATCH, "time")
            c0 = time.perf_counter()
            fused = bscompile.compile(model).load()
            compile_s = time.perf_counter() - c0
            with tvm.transform.PassContext(disabled_pass=["FuseLoopKernels"]):
                looped = bscompile.compile(model).load()
            sess = common.ort_session(model.SerializeToString())
            feeds = {"x": rng.standard_normal((BATCH, STEPS, hidden)).astype(np.float32),
                     **initial_states(name, rng, BATCH, hidden)}
            want = sess.run(None, feeds)
            err = max(float(np.abs(g - w).max()) for g, w in zip(fused.run(feeds).values(), want))
            fns = {"fused": lambda: fused.run(feeds), "looped": lambda: looped.run(feeds),
                   "onnxruntime": lambda: sess.run(None, feeds)}
            t = common.interleaved(fns, reps=60)
            case = {"cell": name, "hidden": hidden, "compile_s": compile_s, "max_abs_err_vs_ort": err,
                    "ms": {k: v * 1e3 for k, v in t.items()}}
            meta["cases"].append(case)
            rows.append(f"| {name} | {hidden} | {t['fused'] * 1e3:.3f} | {t['looped'] * 1e3:.3f} | "
                        f"{t['onnxruntime'] * 1e3:.3f} | {t['looped'] / t['fused']:.2f}x | "
                        f"{t['onnxruntime'] / t['fused']:.2f}x | {t['fused'] * 1e6 / STEPS:.1f} | {compile_s:.1f} | "
                        f"{err:.1e} |")
            common.log(t0, rows[-1])
    info = common.machine_info()
    cmd = "python bench/custom_cells.py"
    OUT.mkdir(exist_ok=True)
    (OUT / "custom_cells.json").write_text(json.dumps({"machine": info, "command": cmd, **meta}, indent=1))
    lines = ["# Custom recurrent cells: the time loop as one kernel", "",
             f"`TVM_THREAD_POOL_SPIN_COUNT=0 OMP_WAIT_POLICY=PASSIVE {cmd}` — {info['date']}, {info['cpu']} "
             f"({info['cores']} cores, shared), {info['threads']} threads for both libraries, fp32. Cells of "
             "`bscompile.models.onnx_cells` as one ONNX `Scan` over a symbolic time axis, input = hidden, "
             f"{STEPS} steps, batch {BATCH}, dense random weights. `fused`: bscompile as it compiles by default "
             "(`FuseLoopKernels`: the time loop one kernel); `looped`: the same with that pass disabled (the VM runs "
             "the loop function step by step); onnxruntime runs its own `Scan` on the same file. Median ms per call, "
             "each warm for itself (back-to-back calls, the three taking turns in rounds).", "",
             "| cell | hidden | fused ms | looped ms | onnxruntime ms | fused vs looped | fused vs onnxruntime | "
             "fused µs/step | compile s | max abs err vs ort |",
             "|---|---|---|---|---|---|---|---|---|---|", *rows, ""]
    (OUT / "custom_cells.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
