"""Kernel families: what one kind of target brings to the compiler.

A family owns, for its target:
- one :class:`Generator` per weight-site kind (``generators``): the kind's kernel for
  that target, the schedule it uses without tuning, the schedules worth measuring,
  and what one call costs on the family's machine model;
- the machine model itself (``CpuFamily.machine``, ``CudaFamily.gpu``).

``ChooseLayout`` ranks layouts with :meth:`KernelFamily.estimate_time`,
``LowerWeightSites`` asks for kernels, ``bscompile tune`` walks
:meth:`KernelFamily.schedule_space`; all of them talk to this interface only.
``TargetSpec.kernel_family()`` picks the family (:mod:`codegen.cpu`,
:mod:`codegen.cuda`). Adding a site kind means adding one generator to each family.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import tvm

from bscompile.codegen.layout import BlockStats, BSRMatrix


class Generator(ABC):
    """One site kind on one family. ``site`` is the site's ``bscompile.site`` attribute,
    ``mats`` its weight matrices packed in the chosen layout (for kinds packed as BSR),
    ``stats`` a layout's block statistics, ``m`` the rows the kernel multiplies."""

    @abstractmethod
    def kernel(self, site: dict, mats: list[BSRMatrix], schedules: list[Any]) -> tvm.tirx.PrimFunc:
        """The kernel, following the kind's calling convention (:class:`bscompile.sites.SiteKind`)."""

    @abstractmethod
    def default_schedule(self, site: dict, stats: BlockStats, m: int) -> Any:
        """The schedule used without tuning, from the layout's statistics alone."""

    def schedule_space(self, site: dict, mat: BSRMatrix, m: int) -> list[Any]:
        """Schedules worth measuring for one matrix (the default first)."""
        return [self.default_schedule(site, mat.stats, m)]

    @abstractmethod
    def schedule_from_json(self, d: dict) -> Any:
        """A schedule as recorded in IR attributes, manifests and tuning records."""

    @abstractmethod
    def estimate_time(self, site: dict, stats: BlockStats, m: int) -> float:
        """Seconds one call is expected to take on the family's machine model."""


class KernelFamily(ABC):
    """The generators and machine model of one kind of target."""

    name: str
    generators: dict[str, Generator]

    def supports(self, kind: str) -> bool:
        return kind in self.generators

    def generator(self, kind: str) -> Generator:
        try:
            return self.generators[kind]
        except KeyError:
            raise NotImplementedError(f"the {self.name} kernel family has no generator for {kind!r} sites") from None

    def kernel(self, site: dict, mats: list[BSRMatrix], schedules: list[Any]) -> tvm.tirx.PrimFunc:
        return self.generator(site["kind"]).kernel(site, mats, schedules)

    def default_schedule(self, site: dict, stats: BlockStats, m: int) -> Any:
        return self.generator(site["kind"]).default_schedule(site, stats, m)

    def schedule_space(self, site: dict, mat: BSRMatrix, m: int) -> list[Any]:
        return self.generator(site["kind"]).schedule_space(site, mat, m)

    def schedule_from_json(self, site: dict, d: dict) -> Any:
        return self.generator(site["kind"]).schedule_from_json(d)

    def estimate_time(self, site: dict, stats: BlockStats, m: int) -> float:
        return self.generator(site["kind"]).estimate_time(site, stats, m)
