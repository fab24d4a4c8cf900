"""Shared benchmark plumbing: thread settings, interleaved timing, cache flushing, roofline.

Every benchmark runs all implementations of a case in one process and reports
medians. "warm" is warm for each library: its own back-to-back calls (a run of
calls of one function, after untimed ones), the libraries taking turns run by run so
that a drifting host affects all of them alike; a call of another library never sits
between two timed calls, since it would evict a large dense weight from the
last-level cache and turn "warm" dense into cold. "cold" times a
call whose weights are in no cache: a read of a buffer larger than the last-level
cache evicts everything, then a *twin* of the implementation (the same code with its
own copy of the weights) runs once, so code, interpreter and library state and the
activations are warm again and only the weights come from memory. Without the twin a
cold call of any library through Python costs ~140 us more on this machine (a 64x64
layer: 10 us warm, 144 us after a flush), which would swamp every small kernel.
"""

from __future__ import annotations

import os

THREADS = int(os.environ.get("BENCH_THREADS", "2"))
# Must be set before TVM / onnxruntime / torch start their thread pools.
os.environ["TVM_NUM_THREADS"] = str(THREADS)
os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ["OMP_NUM_THREADS"] = str(THREADS)

import datetime  # noqa: E402
import multiprocessing  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import timeit  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from typing import Callable  # noqa: E402

import numpy as np  # noqa: E402

_FLUSH = np.ones(64 * 2**20 // 8)  # 64 MiB, larger than any LLC here


def log(t0: float, msg: str) -> None:
    """Progress line with the seconds since ``t0``."""
    print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)


def in_fresh_process(fn: Callable, *args):
    """``fn(*args)`` in a new (spawned) process: its memory (loaded modules, sessions,
    weight copies) goes back to the OS when it returns. ``fn`` must be importable."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def flush_caches() -> None:
    _FLUSH.sum()


def interleaved(fns: dict[str, Callable[[], object]], reps: int, cold: bool = False,
                twins: dict[str, Callable[[], object]] | None = None, runs: int = 3) -> dict[str, float]:
    """Median seconds per call of each function over ``reps`` timed calls.

    Warm: ``runs`` rounds in which each function in turn makes two untimed calls and
    then ``reps / runs`` timed back-to-back calls (warm for itself). ``cold``: before
    each timed call, flush the caches, then run ``twins[name]`` (if given), which warms
    everything but the timed function's own weights; functions take turns call by call."""
    twins = twins or {}
    for f in list(fns.values()) + list(twins.values()):  # first-call allocations
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    if cold:
        for _ in range(reps):
            for name, f in fns.items():
                flush_caches()
                if name in twins:
                    twins[name]()
                t0 = time.perf_counter()
                f()
                times[name].append(time.perf_counter() - t0)
    else:
        per_run = max(1, -(-reps // runs))
        for _ in range(runs):
            for name, f in fns.items():
                f()
                f()
                for _ in range(per_run):
                    t0 = time.perf_counter()
                    f()
                    times[name].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) for k, v in times.items()}


def reps_for(seconds_per_call: float, budget: float = 0.6, lo: int = 5, hi: int = 40) -> int:
    return int(np.clip(budget / max(seconds_per_call, 1e-6), lo, hi))


def machine_info() -> dict:
    model = "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name"))
    except (OSError, StopIteration):
        pass
    import onnxruntime
    import tvm

    import bscompile

    info = {"cpu": model, "cores": os.cpu_count(), "threads": THREADS, "machine": platform.machine(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "bscompile": bscompile.__version__, "tvm": tvm.__version__, "onnxruntime": onnxruntime.__version__}
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        pass
    return info


def measure_roofline() -> dict:
    """Read bandwidth (GB/s) and peak fp32 GFLOP/s attainable with THREADS threads (PyTorch).

    Best of 20 runs each: a roofline is what the machine can reach, and on a shared
    host the median drifts with the neighbours' load."""
    import torch

    torch.set_num_threads(THREADS)
    big = torch.ones(128 * 2**20 // 4)  # 128 MiB
    bw = big.numel() * 4 / min(timeit.repeat(big.sum, number=1, repeat=20))
    a = torch.randn(1536, 1536)
    flops = 2 * 1536**3 / min(timeit.repeat(lambda: a @ a, number=1, repeat=20))
    return {"bandwidth_GBps": bw / 1e9, "peak_GFLOPs": flops / 1e9}


def floor_time(weight_bytes: float, act_bytes: float, flops: float, roof: dict) -> float:
    """Roofline lower bound: the larger of the memory time and the compute time."""
    return max((weight_bytes + act_bytes) / (roof["bandwidth_GBps"] * 1e9), flops / (roof["peak_GFLOPs"] * 1e9))


def geomean(xs) -> float:
    xs = [x for x in xs if x > 0]
    return float(np.exp(np.mean(np.log(xs)))) if xs else float("nan")


def ort_session(model_bytes: bytes):
    """An onnxruntime CPU session with THREADS intra-op threads that do not spin when idle."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle spinning steals cores
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
