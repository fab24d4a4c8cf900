"""The size and placement of TVM's thread pool.

TVM sizes its pool, on x86, to half the logical CPUs (it assumes every core runs two
hardware threads). On machines without SMT -- small cloud VMs, this project's 2-core CI --
that leaves half the cores idle: a 2-core VM ran every kernel on one thread. Unless the user
chose (``TVM_NUM_THREADS`` or ``OMP_NUM_THREADS``), bscompile sizes the pool to the physical
cores this process may run on, before TVM creates it (on the first parallel kernel).

TVM also pins its workers to cores 1.. (worker 0 is the calling thread, left unpinned). The
OS may run the caller on a worker's core: a parallel kernel then runs its halves one after
the other. Measured on this 2-core VM (a 4096x1024 90% 4x4 layer at batch 16, 200 calls a
round): the caller sat on the worker's core for the first round, where the parallel kernel
took 148 us against 155 serial, and 117-149 us once the OS had moved it. Unless the user
chose (``TVM_BIND_THREADS``), bscompile leaves the pool unpinned; the deploy runner and the RPC
server do the same.
"""

from __future__ import annotations

import os
from pathlib import Path


def physical_cores() -> int:
    """Distinct (package, core) pairs among the CPUs this process may run on (Linux sysfs);
    each CPU counts as a core where the topology is not readable."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topo / "physical_package_id").read_text().strip(), (topo / "core_id").read_text().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))
    return max(1, len(cores))


def configure_thread_pool() -> None:
    """``TVM_NUM_THREADS`` = :func:`physical_cores` when neither it nor ``OMP_NUM_THREADS`` is set;
    ``TVM_BIND_THREADS`` = 0 (unpinned) when not set."""
    if "TVM_NUM_THREADS" not in os.environ and "OMP_NUM_THREADS" not in os.environ:
        os.environ["TVM_NUM_THREADS"] = str(physical_cores())
    os.environ.setdefault("TVM_BIND_THREADS", "0")
