"""The cost of symbolic shapes: one artifact for any batch and length against artifacts
specialised to the shape (``--input-shape``), on the same ONNX file.

    python bench/symbolic.py            # Linear 1760x1760, GRU(512->1024, 50 steps) and its input
                                        # projection alone (50 x batch rows), batch 1 and 64
    python bench/symbolic.py --quick    # smaller layers (a check that the script runs)

Weights are pruned to 90% with 4x4 blocks (random values). Per case and batch the
symbolic artifact and the specialised one run interleaved through ``run()`` in one
process (warm: each timed call follows a call of the same artifact), medians of many
calls. The ratio symbolic / specialised is the cost of symbolic shapes (target <= 1.05).
Writes bench/results/symbolic.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import bscompile  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"
BATCHES = (1, 64)
#: Rounds of interleaved timing per case: the ratio reported is their median.
ROUNDS = 5


def _pruned(rng, shape, fan_in: int) -> np.ndarray:
    """90%-sparse 4x4 blocks along the last two axes."""
    w = rng.standard_normal(shape).astype(np.float32) / np.sqrt(fan_in)
    n, k = shape[-2:]
    keep = rng.random((*shape[:-2], n // 4, k // 4)) < 0.1
    return (w * np.repeat(np.repeat(keep, 4, -2), 4, -1)).astype(np.float32)


def linear_model(rng, n: int, k: int | None = None) -> onnx.ModelProto:
    """y[batch, n] = x[batch, k] @ W.T + b (k = n by default)."""
    k = k or n
    w, b = _pruned(rng, (n, k), k), rng.standard_normal(n).astype(np.float32)
    g = helper.make_graph([helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1, name="fc")], "linear",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])],
                          [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def gru_model(rng, inp: int, hidden: int) -> onnx.ModelProto:
    """x[time, batch, inp] -> GRU(hidden), as PyTorch exports it (linear_before_reset=1)."""
    inits = [numpy_helper.from_array(_pruned(rng, (1, 3 * hidden, inp), inp), "W"),
             numpy_helper.from_array(_pruned(rng, (1, 3 * hidden, hidden), hidden), "R"),
             numpy_helper.from_array(rng.standard_normal((1, 6 * hidden)).astype(np.float32) * 0.1, "B")]
    node = helper.make_node("GRU", ["x", "W", "R", "B"], ["y", "h"], hidden_size=hidden, linear_before_reset=1,
                            name="gru")
    g = helper.make_graph([node], "gru", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["time", "batch", inp])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
                           helper.make_tensor_value_info("h", TensorProto.FLOAT, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def run(quick: bool) -> dict:
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    n, (inp, hid), seq = (512, (128, 256), 20) if quick else (1760, (512, 1024), 50)
    cases = [
        (f"Linear {n}x{n}", linear_model(rng, n), lambda b: {"x": (b, n)}),
        (f"GRU {inp}->{hid}, {seq} steps", gru_model(rng, inp, hid), lambda b: {"x": (seq, b, inp)}),
        # The GRU's input projection alone: a Linear over its T x B rows (3200 at batch 64).
        (f"Linear {inp}->{3 * hid} over {seq} x batch rows (the GRU's input projection)",
         linear_model(rng, 3 * hid, inp), lambda b: {"x": (seq * b, inp)}),
    ]
    rows = []
    for name, model, shapes_of in cases:
        tc = time.perf_counter()
        symbolic = bscompile.compile(model).load()
        common.log(t0, f"{name}: symbolic artifact compiled in {time.perf_counter() - tc:.1f} s")
        for b in BATCHES:
            shapes = shapes_of(b)
            static = bscompile.compile(model, input_shapes=shapes).load()
            feeds = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
            for key, v in static.run(feeds).items():  # same numbers, or the comparison means nothing
                np.testing.assert_allclose(symbolic.run(feeds)[key], v, rtol=1e-4, atol=1e-5)
            fns = {"specialised": lambda: static.run(feeds), "symbolic": lambda: symbolic.run(feeds)}
            first = common.interleaved(fns, 3)
            reps = common.reps_for(max(first.values()), budget=2.0, lo=7, hi=300)
            rounds = [common.interleaved(fns, reps) for _ in range(ROUNDS)]  # the spread shows the host's noise
            ratios = sorted(t["symbolic"] / t["specialised"] for t in rounds)
            t = {k: float(np.median([r[k] for r in rounds])) for k in fns}
            rows.append({"case": name, "batch": b, "specialised_us": t["specialised"] * 1e6,
                         "symbolic_us": t["symbolic"] * 1e6, "ratio": float(np.median(ratios)),
                         "ratio_range": [ratios[0], ratios[-1]], "load": os.getloadavg()[0]})
            common.log(t0, f"{name} batch {b}: specialised {t['specialised'] * 1e6:.1f} us, "
                           f"symbolic {t['symbolic'] * 1e6:.1f} us ({rows[-1]['ratio']:.3f}x, "
                           f"rounds {ratios[0]:.3f}-{ratios[-1]:.3f})")
    return {"machine": common.machine_info(), "quick": quick, "rows": rows}


def write(res: dict, cmd: str) -> None:
    OUT.mkdir(exist_ok=True)
    (OUT / "symbolic.json").write_text(json.dumps(res, indent=1))
    m = res["machine"]
    lines = ["# Symbolic shapes vs shape-specialised artifacts", "",
             f"`{cmd}` -- {m['date']}, {m['cpu']} ({m['cores']} cores, {m['threads']} threads), "
             f"bscompile {m['bscompile']}, TVM {m['tvm']}. TVM_THREAD_POOL_SPIN_COUNT=0, OMP_WAIT_POLICY=PASSIVE.", "",
             "One symbolic artifact (any batch, any length) against one artifact compiled for each shape, "
             "interleaved in one process through `run()`, warm. 90%-sparse 4x4 blocks.", "",
             f"Ratio: median over {ROUNDS} rounds of interleaved calls (range in brackets: the shared host's "
             "noise; load = 1-minute load average of the 2-core host during the case).", "",
             "| case | batch | specialised (us) | symbolic (us) | symbolic / specialised | load |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        lo, hi = r["ratio_range"]
        lines.append(f"| {r['case']} | {r['batch']} | {r['specialised_us']:.1f} | {r['symbolic_us']:.1f} "
                     f"| {r['ratio']:.3f} [{lo:.3f}-{hi:.3f}] | {r['load']:.1f} |")
    worst = max(r["ratio"] for r in res["rows"])
    lines += ["", f"Target: <= 1.05. Worst ratio: {worst:.3f} ({'met' if worst <= 1.05 else 'not met'})."]
    (OUT / "symbolic.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller layers")
    args = ap.parse_args()
    res = run(args.quick)
    write(res, "python bench/symbolic.py" + (" --quick" if args.quick else ""))
    print((OUT / "symbolic.md").read_text())


if __name__ == "__main__":
    main()
