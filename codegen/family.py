"""Kernel families: what one kind of target brings to the compiler.

A family owns, for its target:
- the kernel generators, one per weight-site kind (``generators``): site attributes,
  the packed matrices and their schedules -> a ``PrimFunc`` following the kind's
  calling convention (:class:`bscompile.sites.SiteKind`);
- its schedule space (:meth:`default_schedule`, :meth:`schedule_space`), and
- its machine model (:meth:`estimate_time`), which ``ChooseLayout`` ranks layouts with.

Passes and the tuner talk to this interface only; ``TargetSpec.kernel_family()``
picks the family (:mod:`codegen.cpu`, :mod:`codegen.cuda`). Adding a site kind means
adding one generator to each family's table.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable

import tvm

from bscompile.codegen.layout import BlockStats, BSRMatrix
from bscompile.codegen.recurrent_cells import CellSpec

#: Buckets of a symbolic ``m`` (batch x time rows of a linear site, the batch of a
#: recurrent one): ``(lowest m, highest m or None, the m its schedule is chosen at)``.
#: ``ChooseLayout`` merges neighbours whose schedules agree, so a kernel branches on m
#: only where the schedule changes.
M_BUCKETS: tuple[tuple[int, int | None, int], ...] = ((1, 1, 1), (2, 7, 4), (8, 31, 16), (32, None, 64))


@dataclass(frozen=True)
class Bucket:
    """The schedules (one per matrix) a kernel runs for ``lo <= m <= hi`` (``hi`` None: no bound)."""

    lo: int
    hi: int | None
    m: int  # the m the schedules were chosen (or tuned) at
    schedules: tuple

    def to_json(self) -> dict:
        return {"lo": self.lo, "hi": self.hi, "m": self.m, "schedules": [s.to_json() for s in self.schedules]}


def static_dim(value: int | str) -> int | None:
    """A site attribute's dim: the int, or None when it names a symbolic variable."""
    return value if isinstance(value, int) else None


#: (site attributes, matrices, buckets) -> kernel
Generator = Callable[[dict, list[BSRMatrix], list[Bucket]], tvm.tirx.PrimFunc]


def standard_generators(linear: Callable, recurrent: Callable, static_only: bool = False) -> dict[str, Generator]:
    """The ``linear`` and ``recurrent`` generators from a target's two kernel functions,
    ``linear(mat, m, buckets)`` and ``recurrent(cell, mats, seq, batch, buckets)``; ``m``,
    ``seq`` and ``batch`` are None when symbolic, ``buckets`` are ``(lo, hi, schedules)``.
    ``static_only`` kernels take static dims and one schedule (per matrix) instead."""

    def cases(buckets: list[Bucket], first_only: bool) -> tuple:
        out = tuple((b.lo, b.hi, b.schedules[0] if first_only else tuple(b.schedules)) for b in buckets)
        if static_only:
            if len(out) != 1 or out[0][0] != out[0][1]:
                raise ValueError("these kernels take static shapes only")
            return out[0][2]
        return out

    return {
        "linear": lambda site, mats, buckets: linear(mats[0], static_dim(site["m"]), cases(buckets, True)),
        "recurrent": lambda site, mats, buckets: recurrent(
            CellSpec.from_json(site["cell"]), mats, static_dim(site["seq"]), static_dim(site["batch"]),
            cases(buckets, False)),
    }


class KernelFamily(ABC):
    """The kernels, schedules and machine model of one target."""

    name: str
    generators: dict[str, Generator]
    #: Whether the kernels take symbolic dims (else the driver asks for --input-shape).
    symbolic_shapes: bool = False

    def kernel(self, kind: str, site: dict, mats: list[BSRMatrix], buckets: list[Bucket]) -> tvm.tirx.PrimFunc:
        """The kernel of one site: ``mats`` in the chosen layout, per m bucket one schedule per
        matrix (a static m has one bucket)."""
        try:
            gen = self.generators[kind]
        except KeyError:
            raise NotImplementedError(f"the {self.name} kernel family has no generator for {kind!r} sites") from None
        return gen(site, mats, buckets)

    @abstractmethod
    def default_schedule(self, kind: str, stats: BlockStats, m: int) -> Any:
        """The schedule the family uses without tuning, from the layout's block statistics alone."""

    @abstractmethod
    def schedule_space(self, kind: str, mat: BSRMatrix, m: int) -> list[Any]:
        """Schedules worth measuring for one matrix (the default first)."""

    @abstractmethod
    def schedule_from_json(self, d: dict) -> Any:
        """A schedule as recorded in IR attributes, manifests and tuning records."""

    @abstractmethod
    def estimate_time(self, kind: str, stats: BlockStats, m: int, n: int, k: int) -> float:
        """Seconds one call of the kernel is expected to take on the family's machine model."""
