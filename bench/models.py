"""Whole models: bscompile against onnxruntime on the same ONNX files.

    python bench/models.py            # bundled char GRU LM + DeepSpeech-like at hidden 1760 and 2560
    python bench/models.py --quick    # bundled model + DeepSpeech-like at hidden 704

Each (model, batch) runs in a fresh process that reads the models from files, so the
hidden-2560 model (1.2 GB of fp32 weights in ONNX) fits a 24 GB machine.

Models are pruned to 90% with 4x4 blocks (BP, one-shot on random weights for the
DeepSpeech-like model, trained for the bundled LM). For each model and batch (1, 8;
sequence 50) onnxruntime runs the dense file (the same architecture with every weight
non-zero) and the pruned file, and bscompile compiles the pruned file; the three run in one
process, each warm for itself (its own back-to-back calls, in turns: ``common.interleaved``).
Compile time is reported. Writes bench/results/models.{md,json}.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import numpy_helper  # noqa: E402

import bscompile  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"
BUNDLED = Path(bscompile.__file__).parent / "data" / "char_gru_bp4x4.onnx"


def with_batch(src: Path, batch: int, dst: Path) -> Path:
    """A copy of ``src`` whose first input and outputs have batch ``batch``."""
    m = onnx.load(src)
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = batch
    for o in m.graph.output:
        o.type.tensor_type.shape.dim[0].dim_value = batch
    onnx.save(m, dst)
    return dst


def densified(src: Path, dst: Path, rng) -> Path:
    """The same model with the pruned zeros of every weight matrix refilled (the dense baseline)."""
    m = onnx.load(src)
    for i, init in enumerate(m.graph.initializer):
        a = numpy_helper.to_array(init)
        if a.dtype == np.float32 and a.ndim >= 2 and (a == 0).mean() > 0.5:
            fill = rng.standard_normal(a.shape).astype(np.float32) * float(np.abs(a[a != 0]).mean() if a.any() else 0.01)
            m.graph.initializer[i].CopyFrom(numpy_helper.from_array(np.where(a == 0, fill, a), init.name))
    onnx.save(m, dst)
    return dst


def bench_model(name: str, pruned: Path, dense: Path, rng, log) -> dict:
    """Compile ``pruned``, then time it against onnxruntime on ``dense`` and ``pruned``.

    Everything is read from files and the compiler's state is dropped before the
    sessions open, so the peak memory is one model's, not the sum of its copies."""
    t0 = time.perf_counter()
    art = bscompile.compile(str(pruned))
    compile_s = time.perf_counter() - t0
    bsc_path = art.export(pruned.with_suffix(".bsc"))
    manifest = art.manifest
    del art
    gc.collect()
    mod = bscompile.load(bsc_path)
    feeds = {s.name: (rng.integers(0, 50, s.shape) if np.dtype(s.dtype).kind in "iu"
                      else rng.standard_normal(s.shape)).astype(s.dtype) for s in mod.inputs}
    s_dense, s_pruned = common.ort_session(str(dense)), common.ort_session(str(pruned))
    ref = s_pruned.run(None, feeds)
    got = list(mod.run(feeds).values())
    err = max(float(np.abs(a - b).max()) for a, b in zip(got, ref))
    fns = {"ort_dense": lambda: s_dense.run(None, feeds), "ort_pruned": lambda: s_pruned.run(None, feeds),
           "bscompile": lambda: mod.run(feeds)}
    probe = common.interleaved(fns, 1)
    t = common.interleaved(fns, common.reps_for(max(probe.values()), budget=8, lo=5, hi=30))
    summary = manifest.summary()
    row = {"model": name, "batch": mod.inputs[0].shape[0], "compile_s": compile_s, "max_abs_err_vs_ort": err,
           **{f"{k}_ms": v * 1e3 for k, v in t.items()},
           "speedup_vs_ort_dense": t["ort_dense"] / t["bscompile"],
           "speedup_vs_ort_pruned": t["ort_pruned"] / t["bscompile"],
           "weights": summary["weights"], "dense_MB": summary["dense_bytes"] / 1e6,
           "stored_MB": summary["stored_bytes"] / 1e6,
           "layouts": sorted({f"{w['decision']['layout']} {w['decision']['block']}" if w["decision"]["layout"] == "bsr"
                              else "dense" for w in manifest.weights})}
    log(f"{name} batch {row['batch']}: bscompile {row['bscompile_ms']:.2f} ms, ort dense {row['ort_dense_ms']:.2f} ms "
        f"({row['speedup_vs_ort_dense']:.1f}x), ort pruned {row['ort_pruned_ms']:.2f} ms; compile {compile_s:.1f} s; "
        f"err {err:.2e}")
    return row


def run_case(hidden: int | None, batch: int, tmp: str) -> dict:
    """One (model, batch) in this process: ``hidden=None`` is the bundled char GRU LM."""
    t0 = time.perf_counter()
    log = lambda msg: common.log(t0, msg)  # noqa: E731
    rng = np.random.default_rng(batch)
    tmp = Path(tmp)
    if hidden is None:
        name, src = "char-GRU LM (bundled, 2x256)", BUNDLED
    else:
        from bscompile.models.deepspeech import DeepSpeechConfig, export_pruned

        name, src = f"DeepSpeech-like GRU {hidden} (3 bi-GRU layers)", tmp / f"ds{hidden}.onnx"
        if not src.exists():  # the exported graph takes its batch from the input
            log(f"exporting DeepSpeech-like hidden {hidden}")
            export_pruned(src, DeepSpeechConfig(hidden=hidden), sparsity=0.9, block=(4, 4), frames=100, batch=1,
                          atol=1e-2)
    stem = tmp / f"{src.stem}_b{batch}"
    pruned = with_batch(src, batch, stem.with_suffix(".onnx"))
    dense = densified(pruned, tmp / f"{stem.name}_dense.onnx", rng)
    return bench_model(name, pruned, dense, rng, log)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--hidden", type=int, nargs="+", default=[1760, 2560], help="DeepSpeech-like hidden sizes")
    args = ap.parse_args()
    t0 = time.perf_counter()
    info = common.machine_info()
    rows = []
    hiddens = [704] if args.quick else args.hidden
    with tempfile.TemporaryDirectory() as tmp:
        for hidden, batch in [(None, 1), (None, 8)] + [(h, b) for h in hiddens for b in (1, 8)]:
            # A fresh process per case: its memory (protos, sessions, compiler) goes back to the OS.
            rows.append(common.in_fresh_process(run_case, hidden, batch, tmp))
            write_report(rows, info, args, time.perf_counter() - t0)  # partial results survive


def write_report(rows, info, args, wall) -> None:
    cmd = "python bench/models.py" + (" --quick" if args.quick else "") + \
        (f" --hidden {' '.join(map(str, args.hidden))}" if not args.quick and args.hidden != [1760, 2560] else "")
    lines = [f"# Whole-model benchmark, fp32, {info['threads']} threads", "",
             f"- command: `{cmd}`", f"- machine: {info['cpu']}, {info['cores']} cores",
             f"- date: {info['date']}; wall time {wall / 60:.1f} min",
             f"- versions: bscompile {info['bscompile']}, TVM {info['tvm']}, onnxruntime {info['onnxruntime']}", "",
             "Pruned to 90% with 4x4 blocks; sequence 50 (the DeepSpeech-like model: 100 input frames, "
             "stride-2 convolution). *ort dense*: onnxruntime on the same architecture with all weights non-zero; "
             "*ort pruned*: onnxruntime on the pruned file bscompile compiled. Medians per call, each library warm "
             "for itself (its own back-to-back calls, the three taking turns in rounds).", "",
             "| model | batch | bscompile ms | ort dense ms | ort pruned ms | vs ort dense | vs ort pruned | "
             "weights MB dense → stored | layouts | compile s | max abs err |", "|" + "---|" * 11]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | {r['bscompile_ms']:.2f} | {r['ort_dense_ms']:.2f} | "
                     f"{r['ort_pruned_ms']:.2f} | {r['speedup_vs_ort_dense']:.1f}x | {r['speedup_vs_ort_pruned']:.1f}x | "
                     f"{r['dense_MB']:.1f} → {r['stored_MB']:.1f} | {', '.join(r['layouts'])} | {r['compile_s']:.1f} | "
                     f"{r['max_abs_err_vs_ort']:.1e} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "models_quick" if args.quick else "models"
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    (out / f"{stem}.json").write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
