"""A short fuzzing run in CI (the long campaign and its figures: bench/results/fuzz.md).

Runs ``bench/fuzz.py`` for about a minute on a fresh seed (printed on failure): mutated
ONNX files, inputs, artifacts and CLI arguments, each case through the real CLI in a
forked child. Any signal, hang, traceback, internal error, multi-line error, partial
file or answer different from onnxruntime fails the test with the findings listed.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

FUZZ = Path(__file__).resolve().parents[1] / "bench" / "fuzz.py"


def test_short_fuzz_campaign(rng, tmp_path):
    seed = int(rng.integers(2**31))
    out = tmp_path / "fuzz.json"
    env = dict(os.environ, TVM_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(FUZZ), "--seconds", "60", "--seed", str(seed), "--timeout", "60",
                           "--json", str(out)], capture_output=True, text=True, timeout=170, env=env, cwd=tmp_path)
    assert out.exists(), f"seed {seed}: fuzz.py did not finish: {proc.stderr[-2000:]}"
    summary = json.loads(out.read_text())
    assert summary["cases"] >= 10, f"seed {seed}: only {summary['cases']} cases ran"
    assert not summary["setup_problems"], f"seed {seed}: {summary['setup_problems']}"
    found = "\n".join(f"[{f['family']}] {f['case']}: {f['signature']}\n  argv {f['argv']}\n  {f['stderr_tail']}"
                      for f in summary["findings"])
    assert summary["failures"] == 0, f"seed {seed} (rerun: python bench/fuzz.py --seed {seed}):\n{found}"
