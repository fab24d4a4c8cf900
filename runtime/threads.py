"""The size of TVM's thread pool.

TVM sizes its pool, on x86, to half the logical CPUs (it assumes every core runs two
hardware threads). On machines without SMT -- small cloud VMs, this project's 2-core CI --
that leaves half the cores idle: a 2-core VM ran every kernel on one thread. Unless the user
chose (``TVM_NUM_THREADS`` or ``OMP_NUM_THREADS``), bscompile sizes the pool to the physical
cores this process may run on, before TVM creates it (on the first parallel kernel).
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


def size_thread_pool() -> None:
    """``TVM_NUM_THREADS`` = :func:`physical_cores` when neither it nor ``OMP_NUM_THREADS`` is set."""
    if "TVM_NUM_THREADS" not in os.environ and "OMP_NUM_THREADS" not in os.environ:
        os.environ["TVM_NUM_THREADS"] = str(physical_cores())
