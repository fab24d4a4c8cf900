"""Does the CPU machine model pick the fastest layout? Every candidate measured, against the pick.

    python bench/cost_model.py                    # ~7 min on 2 cores; writes bench/results/cost_model.md
    python bench/cost_model.py --target x86_64    # the AVX2 code and model: cost_model_x86_64.md

ChooseLayout prices every block shape of a weight with the target's machine model
(``codegen/cpu_cost.py``) and keeps the cheapest (sparse only when 1/0.85 x under dense).
Here, for weights of two shapes (unstructured and block-pruned, 25-95% sparse) and m = 1-64,
the kernels of dense and of 13 block shapes -- and of the model's pick -- are each timed warm
(TVM's ``time_evaluator``, back to back, 2 threads), and the pick is compared with the fastest
candidate (*regret*) and with the dense kernel. A model whose picks run slower than dense
makes pruning a slow-down; ``bscompile tune`` measures instead of modelling, per site.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (sets thread env vars first)
from kernels import block_pruned  # noqa: E402

import numpy as np  # noqa: E402
import tvm  # noqa: E402

from bscompile.codegen import cpu  # noqa: E402
from bscompile.codegen.layout import DENSE_ROWS, BlockShape, BSRMatrix  # noqa: E402
import bscompile.passes.outline_linear_sites  # noqa: E402,F401 - registers the "linear" site kind
from bscompile.passes.analyze_sparsity import analyze  # noqa: E402
from bscompile.passes.choose_layout import decide  # noqa: E402
from bscompile.target import resolve_target  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"
SHAPES = [(1760, 1760), (4096, 1024)]
WEIGHTS = [("unstructured", 1, (0.8, 0.9, 0.95)), ("4x4", 4, (0.25, 0.5, 0.8, 0.9, 0.95)), ("16x16", 16, (0.5, 0.9))]
MS = (1, 4, 16, 64)
#: Earlier models, for comparison: what replaces the target's constants.
FORMER = {"the constants before 2026-12-07 (12 GB/s, 8e9 vector FMAs/s at any width)":
          {"bandwidth": 12e9, "vector_fma_rate": 8e9, "batch_fma_cost": 1.0},
          "this model without the batch variant's FMA cost": {"batch_fma_cost": 1.0}}
CANDIDATES = [(1, 1), (2, 1), (4, 1), (8, 1), (16, 1), (1, 4), (2, 2), (4, 4), (8, 8), (16, 16), (4, 8), (8, 4), (32, 32)]


def time_layout(mat: BSRMatrix, m: int, x: np.ndarray, spec, lanes: int) -> float:
    """Median seconds of the default-schedule kernel of ``mat`` at ``m`` rows, back to back."""
    dev = tvm.cpu(0)
    func = cpu.linear_kernel(mat, m, cpu.default_schedule(mat, m, lanes, cores=spec.cores))
    lib = tvm.compile(tvm.IRModule({"k": func.with_attr("global_symbol", "k")}), target=spec.tvm_target())
    n = mat.shape[0]
    args = [tvm.runtime.tensor(a, dev) for a in (x, mat.data, mat.indices, mat.indptr,
                                                 np.zeros(mat.padded_shape[0], np.float32), np.zeros((m, n), np.float32))]
    number = max(1, int(2e5 // max(mat.nnz_blocks * m, 1))) + 3
    return float(np.median(lib.mod.time_evaluator("k", dev, number=number, repeat=5, min_repeat_ms=10)(*args).results))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", default="llvm", help="an LLVM CPU target of this machine (llvm: its own CPU)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    spec = resolve_target(args.target)
    family = spec.kernel_family()
    lanes = family.machine.lanes
    formers = [type(family)(dataclasses.replace(family.machine, **c)) for c in FORMER.values()]
    rng = np.random.default_rng(0)
    rows = []
    for n, k in SHAPES:
        for struct, b, sparsities in WEIGHTS:
            for sp in sparsities:
                w = block_pruned(rng, n, k, b, sp)
                sparsity = analyze(w)
                for m in MS:
                    site = {"kind": "linear", "shape": [n, k], "m": m, "name": "w", "fingerprint": "-"}
                    picks = [(lambda d: "dense" if d["layout"] == "dense" else d["block"])(decide(site, sparsity, f))
                             for f in (family, *formers)]
                    x = rng.standard_normal((m, k)).astype(np.float32)
                    times = {"dense": time_layout(BSRMatrix.dense(w, DENSE_ROWS), m, x, spec, lanes)}
                    for name in [f"{r}x{c}" for r, c in CANDIDATES] + picks:
                        if name not in times:
                            mat = BSRMatrix.from_dense(w, BlockShape.parse(name))
                            times[name] = time_layout(mat, m, x, spec, lanes)
                    best = min(times, key=times.get)
                    rows.append({"shape": f"{n}x{k}", "weight": struct, "sparsity": sp, "m": m, "picks": picks,
                                 "best": best, "times_us": {c: t * 1e6 for c, t in times.items()}})
                    pick = picks[0]
                    common.log(t0, f"{n}x{k} {struct} {sp:.0%} m={m}: pick {pick} {times[pick] * 1e6:.0f} us, "
                                   f"best {best} {times[best] * 1e6:.0f}, dense {times['dense'] * 1e6:.0f}")
    info = common.machine_info()
    stem = "cost_model" if args.target == "llvm" else f"cost_model_{args.target}"
    (OUT / f"{stem}.json").write_text(json.dumps({"machine": info, "model": repr(family.machine), "rows": rows},
                                                    indent=1))
    def summary(i: int) -> str:
        """Regret (pick / fastest) of the i-th model's picks: geomean, per m, worst; picks slower than dense."""
        regret = [r["times_us"][r["picks"][i]] / r["times_us"][r["best"]] for r in rows]
        by_m = collections.defaultdict(list)
        for r, g in zip(rows, regret):
            by_m[r["m"]].append(np.log(g))
        slower = sum(r["times_us"][r["picks"][i]] > 1.1 * r["times_us"]["dense"] for r in rows)
        return (f"geomean regret {np.exp(np.mean(np.log(regret))):.2f}x ("
                + ", ".join(f"m={m} {np.exp(np.mean(v)):.2f}x" for m, v in sorted(by_m.items()))
                + f"); picks more than 1.1x slower than dense: {slower} of {len(rows)}; worst regret {max(regret):.2f}x")
    lines = ["# Does the CPU machine model pick the fastest layout?", "",
             "- command: `TVM_THREAD_POOL_SPIN_COUNT=0 OMP_WAIT_POLICY=PASSIVE python bench/cost_model.py"
             + ("" if args.target == "llvm" else f" --target {args.target}") + f"` ({spec.description})",
             f"- machine: {info['cpu']}, {info['cores']} cores, {info['threads']} threads; {info['date']}; "
             f"load {os.getloadavg()[0]:.1f} at the end; wall {(time.perf_counter() - t0) / 60:.1f} min",
             f"- model: `{family.machine!r}`", "",
             "Per weight and m: the model's pick (ChooseLayout's `decide`), the fastest of dense and 13 block shapes "
             "(and the pick), each kernel timed warm on its own. *regret* = pick / fastest.", "",
             f"- **this model**: {summary(0)}."]
    lines += [f"- {name} (`{c}`): {summary(i)}." for i, (name, c) in enumerate(FORMER.items(), 1)]
    lines += ["", "| shape | weight | sparsity | m | pick | pick us | fastest | fastest us | dense us | regret | pick / dense "
              + "".join(f"| earlier model {i} pick | its regret " for i in range(1, len(FORMER) + 1)) + "|",
              "|---" * (11 + 2 * len(FORMER)) + "|"]
    for r in rows:
        t, (pick, *was) = r["times_us"], r["picks"]
        lines.append(f"| {r['shape']} | {r['weight']} | {r['sparsity']:.0%} | {r['m']} | {pick} | {t[pick]:.0f} | "
                     f"{r['best']} | {t[r['best']]:.0f} | {t['dense']:.0f} | {t[pick] / t[r['best']]:.2f}x | "
                     f"{t[pick] / t['dense']:.2f} | " + "".join(f"{p} | {t[p] / t[r['best']]:.2f}x | " for p in was).rstrip())
    (OUT / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:12]))


if __name__ == "__main__":
    main()
