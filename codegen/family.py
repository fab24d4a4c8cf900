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
from typing import Any, Callable

import tvm

from bscompile.codegen.layout import BlockStats, BSRMatrix
from bscompile.codegen.recurrent_cells import CellSpec

#: (site attributes, matrices, schedules) -> kernel
Generator = Callable[[dict, list[BSRMatrix], list[Any]], tvm.tirx.PrimFunc]


def standard_generators(linear: Callable, recurrent: Callable) -> dict[str, Generator]:
    """The ``linear`` and ``recurrent`` generators from a target's two kernel functions,
    ``linear(mat, m, sched)`` and ``recurrent(cell, mats, seq, batch, scheds)``."""
    return {
        "linear": lambda site, mats, scheds: linear(mats[0], site["m"], scheds[0]),
        "recurrent": lambda site, mats, scheds: recurrent(CellSpec.from_json(site["cell"]), mats, site["seq"],
                                                          site["batch"], scheds),
    }


class KernelFamily(ABC):
    """The kernels, schedules and machine model of one target."""

    name: str
    generators: dict[str, Generator]

    def kernel(self, kind: str, site: dict, mats: list[BSRMatrix], schedules: list[Any]) -> tvm.tirx.PrimFunc:
        """The kernel of one site: ``mats`` in the chosen layout, one schedule per matrix."""
        try:
            gen = self.generators[kind]
        except KeyError:
            raise NotImplementedError(f"the {self.name} kernel family has no generator for {kind!r} sites") from None
        return gen(site, mats, schedules)

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
