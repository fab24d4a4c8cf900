"""Mutation table of the CUDA emulator: which injected fault is reported, and how.

    python bench/cuda_emulator.py        # writes bench/results/cuda_emulator.md

Runs tests/cuda_emu_worker.py's ``mutations`` job (faults injected into the generated
CUDA source of a block-sparse linear kernel and a fused GRU step kernel, each run with
threads and blocks forward, reversed and in a seeded random order) and, for the fault
only a sanitizer sees, its ASan+UBSan job (and TSan for a cross-block race); lists what the
CI tests emulate.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import cuda_emu_worker as W  # noqa: E402

from bscompile.runtime.cuda_emulator.build import sanitizer_env  # noqa: E402

OUT = ROOT / "bench" / "results" / "cuda_emulator.md"
#: faults that a race detector should see too (blocks of one launch racing on global memory)
ALSO_TSAN = ("single-buffered recurrent state",)
WORKER = ROOT / "tests" / "cuda_emu_worker.py"
CI_TIME = "\n## Wall time of the CI test"


def _job(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(WORKER), *map(str, args)], capture_output=True, text=True, env=env,
                          cwd=WORKER.parent)


def _how(result: dict) -> str:
    errs = [o["error"] for o in result["orders"] if o["error"]]
    if errs:
        msg = errs[0].split(": ", 2)[-1]  # drop "cuda emulator: <kernel>: "
        return f"emulator error in {len(errs)}/{len(result['orders'])} orders: “{msg}”"
    bad = [o for o in result["orders"] if o["nan"] or o["max_abs_err"] > 1e-3]
    if bad:
        nan = any(o["nan"] for o in bad)
        worst = max(o["max_abs_err"] for o in bad)
        return (f"wrong result vs NumPy in {len(bad)}/{len(result['orders'])} orders ("
                + ("NaN: poisoned shared memory read" if nan else f"max abs err {worst:.3g}") + ")")
    return "NOT REPORTED"


def main() -> int:
    seed = 1
    t0 = time.perf_counter()
    p = _job("mutations", seed)
    if p.returncode:
        print(p.stderr[-3000:], file=sys.stderr)
        return 1
    res = json.loads(p.stdout.splitlines()[-1])["results"]
    rows = []
    for name, (kernel, _, mode) in W.MUTATIONS.items():
        target = {"lin": f"linear {W.MUT_LINEAR.name}", "rec": f"GRU step {W.MUT_RECURRENT.name}"}[kernel]
        if mode:
            q = _job("mutation-asan", seed, name, env=sanitizer_env())
            line = next((ln for ln in q.stderr.splitlines() if "ERROR: AddressSanitizer" in ln), "")
            summary = next((ln for ln in q.stderr.splitlines() if ln.startswith("SUMMARY")), "")
            how = (f"ASan+UBSan run: “{line.split('ERROR: ')[-1].split(' on address')[0]}” "
                   f"({summary.split(' in ')[-1] if ' in ' in summary else '?'})") if line else "NOT REPORTED"
        else:
            how = _how(res[name])
        if name in ALSO_TSAN:
            q = _job("mutation-tsan", seed, name, env=sanitizer_env(mode="thread"))
            summary = next((ln for ln in q.stderr.splitlines() if ln.startswith("SUMMARY: ThreadSanitizer")), "")
            how += (f"; TSan run: “{summary.split('SUMMARY: ')[-1].split(' (')[0]}” ({summary.split(' in ')[-1]})"
                    if summary else "; TSan run: NOT REPORTED")
        rows.append(f"| {name} | {target} | {how} |")
    controls = all(_how(res[f"control {k}"]) == "NOT REPORTED" for k in ("lin", "rec"))
    seconds = time.perf_counter() - t0
    text = f"""# CUDA emulator: injected faults and how they are reported

Command: `python bench/cuda_emulator.py` (seed {seed}); {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC,
{platform.machine()} Linux, {os.cpu_count()} cores (shared), no GPU; {seconds:.0f} s.

Each fault is injected into the CUDA source TVM generated for bscompile's kernels
(`tests/cuda_emu_worker.py`, `MUTATIONS`), which is then compiled for the emulator and
run with threads and blocks forward, reversed and in a seeded random order. The
unmutated kernels pass in every order: {"yes" if controls else "NO"}. The CI test
`tests/test_cuda_emulator.py::test_injected_faults_are_reported` (`test_address_sanitizer_pass` for
the bounds guard, `test_thread_sanitizer_cross_block_races` for the race) asserts every row.

| fault | kernel | how it is reported |
|---|---|---|
""" + "\n".join(rows) + f"""

What CI emulates (`tests/test_cuda_emulator.py`): {len(W.LINEAR_CASES)} linear kernel schedules (BSR blocks
1x1 to 32x32 and the dense layout, ragged shapes, batch 1 to 64, staged / unstaged x, 1 to 8 warps,
float4 / float2 / scalar lanes) and {len(W.RECURRENT_CASES)} recurrent ones (GRU fused / unfused / split,
LSTM, RNN, reverse, sequence_lens, clip) and {len(W.DYNAMIC_CASES)} of the dynamic-selection kernel (gate,
selection, tile product: 4x4 to 32x32 tiles, k = 1 to every tile, a static block mask, batch 1 to 17)
against NumPy; 7 whole CUDA artifacts (the bundled hidden-256 GRU, a bidirectional LSTM, a 2-layer GRU,
a bidirectional dense RNN, a GRU with run-time weights, a block-sparse MLP, a DeepSpeech-like conv + 2-layer bidirectional GRU) through `bscompile.load`
against onnxruntime with their launch sequences; each in three thread/block orders; 4 cases of the
opt-in persistent kernel with co-resident blocks (and its deadlock report when blocks run one at a
time); plus an ASan+UBSan pass over part of the sweep (every dynamic-selection case included) and a TSan
pass over the recurrent step kernels and {len(W.TSAN_DYNAMIC)} dynamic-selection cases.
"""
    # the CI wall-time section is measured by hand (see its command): keep it
    old = OUT.read_text() if OUT.exists() else ""
    OUT.write_text(text + (old[old.index(CI_TIME):] if CI_TIME in old else ""))
    print(text)
    return 0 if controls and "NOT REPORTED" not in text else 1


if __name__ == "__main__":
    sys.exit(main())
