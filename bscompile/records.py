"""Tuning records: measured layout and schedule choices, per weight and batch, per target.

A leaf module (no compiler imports) so that the driver can apply records and the
tuner can write them without importing each other.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bscompile.errors import BscompileError
from bscompile.runtime.artifact import atomic_write

if TYPE_CHECKING:
    from bscompile.codegen.family import KernelFamily

#: 3: records of a symbolic m, one per bucket (``bucket``); format 2 files read as well.
FORMAT = 3
READ_FORMATS = (2, 3)


@dataclass
class TuningRecord:
    """The measured best layout of one weight at one batch size on one target."""

    key: str  # weight fingerprint (bscompile.sites.fingerprint)
    name: str
    kind: str  # site kind: "linear" | "recurrent" | ...
    m: int
    target: str
    layout: str  # "dense" | "bsr"
    block: str
    schedule: dict
    time_us: float
    dense_time_us: float
    candidates: list[dict] = dataclasses.field(default_factory=list)  # everything measured
    device: dict = dataclasses.field(default_factory=dict)  # where it was measured
    #: for a symbolic m: the bucket ``[lo, hi]`` (hi None: unbounded) measured at ``m``
    bucket: list | None = None


def record_key(key: str, m: int) -> str:
    return f"{key}:{m}"


def load_records(path: str | os.PathLike) -> dict[str, TuningRecord]:
    """Records by :func:`record_key` (the driver refuses records measured for another target)."""
    try:
        data = json.loads(Path(path).read_text())
        if data.get("format") not in READ_FORMATS:
            raise BscompileError(f"{path}: tuning records format {data.get('format')} is not supported "
                                 f"(this bscompile reads format {FORMAT}); tune again")
        recs = [TuningRecord(**r) for r in data["records"]]
        for r in recs:
            _check_fields(r)
    except FileNotFoundError:
        raise BscompileError(f"no such tuning records file: {path}") from None
    except (ValueError, KeyError, TypeError, AttributeError) as err:  # (JSON and UTF-8 errors are ValueErrors)
        raise BscompileError(f"{path} is not a bscompile tuning records file ({type(err).__name__}: "
                             f"{str(err).splitlines()[0][:120] if str(err) else ''})") from None
    return {record_key(r.key, r.m): r for r in recs}


#: The largest integer a schedule field may hold: row tiles reach a whole block (up to a few
#: hundred rows), batch tiles a few dozen; a hand-edited m_tile of 10^9 made the code generator
#: unroll for ever.
SCHEDULE_INT_MAX = 4096
#: Layouts a record may name: the searched ones, and "tiles", the dynamic sites' own.
LAYOUTS = ("dense", "bsr", "tiles")


def _check_fields(r: TuningRecord) -> None:
    """Types and ranges of a record's fields (what a schedule means is its target family's to check)."""
    if r.layout not in LAYOUTS:
        raise ValueError(f"record '{r.name}': layout {r.layout!r} is not one of {', '.join(LAYOUTS)}")
    if r.layout == "bsr":
        from bscompile.codegen.layout import BlockShape  # (records are read by tools without the code generators)

        BlockShape.parse(r.block)
    if not isinstance(r.m, int) or r.m < 1 or not isinstance(r.schedule, dict) or not isinstance(r.device, dict):
        raise TypeError(f"record '{r.name}': m must be an int >= 1, schedule and device objects")
    for key, v in r.schedule.items():
        if not isinstance(v, (bool, int, float, str)) or (isinstance(v, int) and not 0 <= v <= SCHEDULE_INT_MAX):
            raise ValueError(f"record '{r.name}': schedule {key}={v!r} is out of range")


def check_schedules(records: dict[str, TuningRecord], family: KernelFamily) -> None:
    """Every record's schedule is one ``family`` can build (``schedule_from_json``), else a BscompileError."""
    for r in records.values():
        try:
            family.schedule_from_json({"kind": r.kind}, r.schedule)
        except (TypeError, ValueError, KeyError, NotImplementedError) as err:  # (an unknown site kind: the last)
            raise BscompileError(f"tuning record '{r.name}' (m={r.m}) holds a schedule the {family.name} kernels "
                                 f"do not take ({type(err).__name__}: {str(err).splitlines()[0][:120]})") from None


def save_records(path: str | os.PathLike, records: list[TuningRecord]) -> None:
    blob = json.dumps({"format": FORMAT, "records": [dataclasses.asdict(r) for r in records]}, indent=1)
    atomic_write(path, lambda tmp: Path(tmp).write_text(blob))
