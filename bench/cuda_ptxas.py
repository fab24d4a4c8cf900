"""ptxas resources (registers, spills) of bscompile's CUDA kernels, for sm_80 and sm_90.

    python bench/cuda_ptxas.py        # writes bench/results/cuda_ptxas.md (needs nvcc, no GPU)

The same builds as the CI test tests/test_cuda_build.py (which writes its table to a
temporary folder only): the test models and the benchmark's kernels, compiled with nvcc
and the flags TVM compiles with at load time.
"""

from __future__ import annotations

import datetime
import os
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_cuda_build import ptxas_rows, ptxas_report  # noqa: E402

OUT = ROOT / "bench" / "results" / "cuda_ptxas.md"


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="bscompile-ptxas-") as tmp:
        rows = ptxas_rows(Path(tmp))
    text = ptxas_report(rows, f"Written by `python bench/cuda_ptxas.py` on "
                              f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
                              f"{platform.machine()} Linux, {os.cpu_count()} cores, no GPU")
    OUT.write_text(text)
    print(text)
    return 1 if any(k.spills for _, k in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
