"""Gated (dynamic block-sparse) LSTM layer vs bscompile's dense LSTM kernel and onnxruntime.

    python bench/dynamic_rnn.py        # ~4 min; writes bench/results/dynamic_rnn.{md,json}

One layer, input 1024, hidden 1024, 50 steps, batch 1, tiles 128x128 (gate = in/bs^2 = 6%
of a dense mat-vec), fp32. ``DynamicBlockLSTM`` (keep 0.5, 0.25) exported by tracing (the
unrolled form: every step's hh product one dynamic site, the input product of all steps
one m=50 dynamic site) and by dynamo with ``time_loop="scan"`` (ONNX ``Scan`` over a
symbolic length, which FuseDynamicRecurrences turns into one ``dynamic_recurrent`` kernel
running the whole time loop, the input product of all steps one dynamic site with the
symbolic length as m); ``nn.LSTM`` with the same weights exported to ONNX ``LSTM``. Each
file compiled by bscompile (``Module.run``) and run by onnxruntime. Timing as
bench/dynamic.py: every implementation warm for itself (two untimed calls, then its timed
calls back to back, in rounds), process CPU time and wall time per call, one run.
Gate scores are scaled 10x (selection and normalised gates unchanged) so that the
numerics check sees a clear selection margin. Then the studies' language models (LSTM and GRU:
dense, keep 0.5 and 0.25; random weights: speed does not depend on training), end to end, the
same way.
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (sets thread env vars first)

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import torch  # noqa: E402

import bscompile  # noqa: E402
from bscompile.models import DynamicBlockLSTM  # noqa: E402
from bscompile.models.charlm import CharLM  # noqa: E402
from bscompile.models.reproduce import _LogitsOnly, export_run  # noqa: E402

IN, H, T, B, BS = 1024, 1024, 50, 1, 128
KEEPS = (0.5, 0.25)
N_INPUTS = 8
#: the language model of the dynamic study (models/results/dynamic_rnn/lstm): vocabulary,
#: embedding, hidden, tiles, characters per sequence
LM_VOCAB, LM_EMB, LM_H, LM_BS, LM_SEQ = 172, 64, 512, 64, 64
LM_CELLS = ("lstm", "gru")  # the two studies: models/results/dynamic_rnn/lstm and models/results/dynamic_rnn
OUT_DIR = Path(__file__).resolve().parent / "results"


class _WithState(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x, h0, c0):
        return self.m(x, (h0, c0))


def _export(m, scan: bool = False) -> bytes:
    z, z1 = torch.zeros(1, B, H), torch.ones(1, B, H)  # (distinct: dynamo folds aliased inputs into one)
    if scan:  # dynamo: ONNX Scan over a symbolic time axis (the model's time_loop="scan")
        prog = torch.onnx.export(_WithState(m).eval(), (torch.zeros(T, B, IN), z, z1), dynamo=True, verbose=False,
                                 input_names=["x", "h0", "c0"], dynamic_shapes=({0: torch.export.Dim("T")}, None, None))
        return prog.model_proto.SerializeToString()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_WithState(m).eval(), (torch.zeros(T, B, IN), z, z1), buf, dynamo=False, opset_version=17,
                          input_names=["x", "h0", "c0"])
    return buf.getvalue()


def _time(fns: dict, reps: int, rounds: int = 3) -> dict:
    wall = {k: [] for k in fns}
    cpu_t = {k: [] for k in fns}
    per = max(1, -(-reps // rounds))
    for r in range(rounds):
        for name, f in fns.items():
            f(0), f(1)
            for j in range(per):
                c, t = time.process_time(), time.perf_counter()
                f((r * per + j) % N_INPUTS)
                wall[name].append(time.perf_counter() - t)
                cpu_t[name].append(time.process_time() - c)
    return {k: {"cpu_ms": float(np.median(cpu_t[k])) * 1e3, "wall_ms": float(np.median(wall[k])) * 1e3,
                "wall_p10_ms": float(np.percentile(wall[k], 10)) * 1e3} for k in fns}


def _lm(meta: dict, t0: float) -> dict:
    """The studies' character language models, LSTM and GRU (random weights: the speed does not
    depend on training), exported as the studies export them -- ``nn.LSTM``/``nn.GRU`` to ONNX
    ``LSTM``/``GRU``, the gated ones in their scan form -- compiled by bscompile and run by
    onnxruntime on the same file."""
    import tempfile

    rng = np.random.default_rng(1)
    tokens = [rng.integers(0, LM_VOCAB, (1, LM_SEQ)) for _ in range(N_INPUTS)]
    fns, tmp = {}, Path(tempfile.mkdtemp())
    meta.update(lm_compile_s={}, lm_max_abs_err_vs_ort={})
    runs = [r for c in LM_CELLS for r in [(f"lm_{c}_dense", c, 1.0)] + [(f"lm_{c}_dyn{k}", f"dyn{c}", k) for k in KEEPS]]
    for name, cell, keep in runs:
        torch.manual_seed(0)
        model = CharLM(LM_VOCAB, emb=LM_EMB, hidden=LM_H, layers=1, cell=cell, block=LM_BS, keep=keep).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            path = export_run(_LogitsOnly(model), torch.from_numpy(tokens[0]), tmp / f"{name}.onnx")
        art = bscompile.compile(str(path))
        mod, sess = art.load(), common.ort_session(path.read_bytes())
        meta["lm_compile_s"][name] = art.manifest.compile_seconds
        fns[f"bsc_{name}"] = lambda i, mod=mod: mod.run({"tokens": tokens[i]})
        fns[f"ort_{name}"] = lambda i, s=sess: s.run(None, {"tokens": tokens[i]})
        err = float(np.abs(fns[f"bsc_{name}"](2)["logits"] - fns[f"ort_{name}"](2)[0]).max())
        meta["lm_max_abs_err_vs_ort"][name] = err
        common.log(t0, f"compiled {name} in {art.manifest.compile_seconds:.1f} s, max abs err {err:.1e}")
    return fns


def main() -> None:
    t0 = time.perf_counter()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    dense = torch.nn.LSTM(IN, H).eval()
    files = {"dense": _export(dense)}
    for keep in KEEPS:
        for scan in (False, True):
            m = DynamicBlockLSTM(IN, H, block=BS, keep=keep, time_loop="scan" if scan else "python").eval()
            m.load_dense(dense)
            with torch.no_grad():
                for lin in (m.layers[0].ih, m.layers[0].hh):
                    lin.gate.weight.mul_(10)
                    lin.gate.bias.mul_(10)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                files[f"dyn{keep}" + ("-scan" if scan else "")] = _export(m, scan)
    common.log(t0, "exported")
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((T, B, IN)).astype(np.float32) for _ in range(N_INPUTS)]
    z = np.zeros((1, B, H), np.float32)
    fns, meta = {}, {"compile_s": {}, "sites": {}, "max_rel_err_vs_ort": {}}
    for name, blob in files.items():
        art = bscompile.compile(onnx.load_from_string(blob))
        meta["compile_s"][name] = art.manifest.compile_seconds
        meta["sites"][name] = sorted({f"{w['kind']} m={w['m']}" for w in art.manifest.weights})
        mod, sess = art.load(), common.ort_session(blob)
        fns[f"bsc_{name}"] = lambda i, mod=mod: mod.run({"x": xs[i], "h0": z, "c0": z})
        fns[f"ort_{name}"] = lambda i, s=sess: s.run(None, {"x": xs[i], "h0": z, "c0": z})
        got, want = list(fns[f"bsc_{name}"](2).values())[0], fns[f"ort_{name}"](2)[0]
        meta["max_rel_err_vs_ort"][name] = float(np.abs(got - want).max() / np.abs(want).max())
        common.log(t0, f"compiled {name} in {art.manifest.compile_seconds:.1f} s, err {meta['max_rel_err_vs_ort'][name]:.1e}")
    meta["load_before"] = os.getloadavg()[0]
    meta["times"] = _time(fns, 60)
    lm_fns = _lm(meta, t0)
    meta["lm_times"] = _time(lm_fns, 100)
    meta["load_after"] = os.getloadavg()[0]
    info = common.machine_info()
    cmd = "python bench/dynamic_rnn.py"
    OUT_DIR.mkdir(exist_ok=True)
    (OUT_DIR / "dynamic_rnn.json").write_text(json.dumps({"machine": info, "command": cmd, **meta}, indent=1))
    t = meta["times"]
    lines = ["# Gated LSTM layer (dynamic block selection) vs dense LSTM", "",
             f"`TVM_THREAD_POOL_SPIN_COUNT=0 OMP_WAIT_POLICY=PASSIVE {cmd}` — {info['date']}, "
             f"{info['cpu']} ({info['cores']} cores, shared: load {meta['load_before']:.1f} -> {meta['load_after']:.1f}), "
             f"{info['threads']} threads, fp32. One layer, input {IN}, hidden {H}, {T} steps, batch {B}, tiles "
             f"{BS}x{BS} (gate {IN / BS**2:.0%} of a dense mat-vec). `dynK`: traced export (unrolled, fixed "
             "length); `dynK-scan`: dynamo export with `time_loop=\"scan\"` (ONNX `Scan`, symbolic length: the "
             "loop fused into one `dynamic_recurrent` kernel, the input product hoisted over all steps). Speed-up = "
             "bscompile dense LSTM (ONNX `LSTM`) / this, CPU time (wall p10 in brackets).", "",
             "| implementation | CPU ms | speed-up | wall ms median | wall p10 | speed-up (p10) | compile s | max rel err vs ort |",
             "|---|---|---|---|---|---|---|---|"]
    base = t["bsc_dense"]
    for k, v in t.items():
        name = k.split("_", 1)[1]
        lines.append(f"| {k} | {v['cpu_ms']:.1f} | {base['cpu_ms'] / v['cpu_ms']:.2f}x | {v['wall_ms']:.1f} | "
                     f"{v['wall_p10_ms']:.1f} | {base['wall_p10_ms'] / v['wall_p10_ms']:.2f}x | "
                     + (f"{meta['compile_s'][name]:.1f} | {meta['max_rel_err_vs_ort'][name]:.1e} |" if k.startswith("bsc") else "| |"))
    lines += ["", "Sites: " + "; ".join(f"{k}: {', '.join(v)}" for k, v in meta["sites"].items()), ""]
    lt = meta["lm_times"]
    lines += ["## The language model", "",
              f"The dynamic studies' character LMs (`CharLM`: embedding {LM_EMB}, one LSTM or GRU layer of {LM_H}, "
              f"{LM_BS}x{LM_BS} tiles, vocabulary {LM_VOCAB}; random weights), {LM_SEQ} characters, batch 1, "
              "exported as the studies export them (dense: ONNX `LSTM`/`GRU`; gated: `Scan`). Speed-ups from wall p10, "
              "against the dense model of the same cell.", "",
              "| model | bscompile wall p10 ms | vs bscompile dense | onnxruntime wall p10 ms | vs onnxruntime "
              "(same file) | µs/char | compile s | max abs err vs ort |", "|---|---|---|---|---|---|---|---|"]
    for name in meta["lm_compile_s"]:
        b, o = lt[f"bsc_{name}"]["wall_p10_ms"], lt[f"ort_{name}"]["wall_p10_ms"]
        dense = lt[f"bsc_{name.rsplit('_', 1)[0]}_dense"]["wall_p10_ms"]
        lines.append(f"| {name[3:]} | {b:.3f} | {dense / b:.2f}x | {o:.3f} | "
                     f"{o / b:.2f}x | {b * 1e3 / LM_SEQ:.1f} | {meta['lm_compile_s'][name]:.1f} | "
                     f"{meta['lm_max_abs_err_vs_ort'][name]:.1e} |")
    lines.append("")
    (OUT_DIR / "dynamic_rnn.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
