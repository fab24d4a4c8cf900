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

from bscompile.errors import BscompileError
from bscompile.runtime.artifact import atomic_write

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
    except FileNotFoundError:
        raise BscompileError(f"no such tuning records file: {path}") from None
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
        raise BscompileError(f"{path} is not a bscompile tuning records file ({type(err).__name__})") from None
    return {record_key(r.key, r.m): r for r in recs}


def save_records(path: str | os.PathLike, records: list[TuningRecord]) -> None:
    blob = json.dumps({"format": FORMAT, "records": [dataclasses.asdict(r) for r in records]}, indent=1)
    atomic_write(path, lambda tmp: Path(tmp).write_text(blob))
