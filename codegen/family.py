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
from dataclasses import dataclass
from typing import Any

import tvm
from tvm.script import tirx as T

from bscompile.codegen.layout import BlockStats, BSRMatrix
from bscompile.errors import UnsupportedModelError


#: Buckets of a symbolic ``m`` (batch x time rows of a linear site, the batch of a
#: recurrent one): ``(lowest m, highest m or None, the m its schedule is chosen at)``.
#: ``ChooseLayout`` merges neighbours whose schedules agree, so a kernel branches on m
#: only where the schedule changes.
M_BUCKETS: tuple[tuple[int, int | None, int], ...] = ((1, 1, 1), (2, 7, 4), (8, 31, 16), (32, None, 64))


def site_buckets(site: dict) -> list[tuple[int, int | None, int]]:
    """``(lo, hi, m measured at)`` per bucket of a site: its static m alone, or :data:`M_BUCKETS`."""
    m = site["m"]
    return [(m, m, m)] if isinstance(m, int) else list(M_BUCKETS)


@dataclass(frozen=True)
class Bucket:
    """The schedules (one per matrix) a kernel runs for ``lo <= m <= hi`` (``hi`` None: no bound)."""

    lo: int
    hi: int | None
    m: int  # the m the schedules were chosen (or tuned) at
    schedules: tuple

    def to_json(self) -> dict:
        return {"lo": self.lo, "hi": self.hi, "m": self.m, "schedules": [s.to_json() for s in self.schedules]}


#: ``((lo, hi or None, payload), ...)``: what a kernel runs for ``lo <= m <= hi`` (the
#: buckets' ranges, in increasing order, with a generator's own payload: schedules).
Cases = tuple


def pick(m, cases: Cases, values: list):
    """``values[i]`` for the case ``cases[i]`` holding ``m``: for a static m the value itself (the
    last one when no case holds it), for a symbolic m a ``Select`` chain on ``m <= hi``."""
    if isinstance(m, int):
        return next((v for (lo, hi, *_), v in zip(cases, values) if lo <= m and (hi is None or m <= hi)),
                    values[-1])
    out = values[-1]
    for (_, hi, *_), v in reversed(list(zip(cases[:-1], values[:-1]))):
        out = tvm.tirx.Select(m <= hi, *[tvm.tirx.const(x, "int32") if isinstance(x, int) else x for x in (v, out)])
    return out


def dispatch(m, cases: Cases, bodies: list):
    """The run-time bucket dispatch: one macro running the macro ``bodies[i]`` (all taking the
    same arguments) for the m of ``cases[i]``, an if-chain on ``m <= hi`` when m is symbolic;
    for a static m, the body of its case alone (:func:`pick`)."""
    if isinstance(m, int) or len(bodies) == 1:
        return pick(m, cases, bodies)
    first, rest, hi = bodies[0], dispatch(m, cases[1:], bodies[1:]), cases[0][1]

    @T.macro
    def chain(*args):
        if m <= hi:
            first(*args)
        else:
            rest(*args)

    return chain


def static_dim(value: int | str) -> int | None:
    """A site attribute's dim: the int, or None when it names a symbolic variable."""
    return value if isinstance(value, int) else None


class Generator(ABC):
    """One site kind on one family. ``site`` is the site's ``bscompile.site`` attribute,
    ``mats`` its weight matrices packed in the chosen layout (for kinds packed as BSR),
    ``stats`` a layout's block statistics, ``m`` the rows the kernel multiplies."""

    #: Whether the kernels take a symbolic ``m`` (and ``seq``/``batch``) and dispatch on m
    #: over buckets; the others take static shapes and one schedule per matrix.
    symbolic_m: bool = False

    @abstractmethod
    def kernel(self, site: dict, mats: list[BSRMatrix], schedules: list[Any]) -> tvm.tirx.PrimFunc:
        """The kernel, following the kind's calling convention (:class:`bscompile.sites.SiteKind`).
        ``schedules`` has one schedule per matrix, or with :attr:`symbolic_m` the
        :class:`Bucket` list the kernel dispatches on (one bucket for a static m)."""

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
    #: Whether kernels can raise to the host (a packed call): indices are then checked and an
    #: out-of-range one is an error; else (device code) the passes clamp them instead.
    raises: bool = True
    #: Whether the runtime copies every output to the host anyway, so no output can alias a
    #: caller's array or a weight (else ``OwnOutputs`` copies those that would).
    copies_outputs: bool = False

    def supports(self, kind: str) -> bool:
        return kind in self.generators

    def generator(self, kind: str) -> Generator:
        try:
            return self.generators[kind]
        except KeyError:
            raise NotImplementedError(f"the {self.name} kernel family has no generator for {kind!r} sites") from None

    @property
    def symbolic_shapes(self) -> bool:
        """Whether some kernel takes symbolic dims (else the driver asks for --input-shape)."""
        return any(g.symbolic_m for g in self.generators.values())

    def kernel(self, site: dict, mats: list[BSRMatrix], buckets: list[Bucket]) -> tvm.tirx.PrimFunc:
        """The kernel of one site: ``mats`` in the chosen layout, per m bucket one schedule per
        matrix (a static m has one bucket)."""
        gen = self.generator(site["kind"])
        if gen.symbolic_m:
            return gen.kernel(site, mats, buckets)
        symbolic = [key for key in ("m", "seq", "batch") if isinstance(site.get(key), str)]
        if symbolic or len(buckets) != 1:
            raise UnsupportedModelError(f"the {self.name} kernels of {site['kind']!r} sites take static shapes only "
                             f"(site {site.get('name')!r} has symbolic {', '.join(symbolic) or 'm'}): "
                             "give --input-shape")
        return gen.kernel(site, mats, list(buckets[0].schedules))

    def default_schedule(self, site: dict, stats: BlockStats, m: int) -> Any:
        return self.generator(site["kind"]).default_schedule(site, stats, m)

    def schedule_space(self, site: dict, mat: BSRMatrix, m: int) -> list[Any]:
        return self.generator(site["kind"]).schedule_space(site, mat, m)

    def schedule_from_json(self, site: dict, d: dict) -> Any:
        return self.generator(site["kind"]).schedule_from_json(d)

    def estimate_time(self, site: dict, stats: BlockStats, m: int) -> float:
        return self.generator(site["kind"]).estimate_time(site, stats, m)
