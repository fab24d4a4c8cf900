"""Autotuning: measure candidate layouts and schedules of every weight on this machine.

The cost model ranks layouts analytically; tuning replaces the ranking by
measurement, on this machine or on the device itself (``remote``: see
:mod:`bscompile.runtime.remote`; every candidate is checked against NumPy there). For each weight site it times the dense kernel and the cost model's
best few BSR shapes, each under the schedule variants that apply, and records the
fastest in a :class:`TuningRecord`. ``bscompile compile --records FILE`` (or
``bscompile tune``) then compiles with the measured choices. The dense kernel is
always a candidate, so a tuned model never runs a weight slower than dense.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tvm

from bscompile.codegen import cpu
from bscompile.codegen.cost_model import MachineModel, estimate_time
from bscompile.codegen.layout import DENSE_ROWS, BlockShape, BSRMatrix
from bscompile.errors import BscompileError
from bscompile.frontend.onnx import fingerprint
from bscompile.passes.choose_layout import kernel_shape
from bscompile.passes.sites import CompilePlan, WeightSite
from bscompile.runtime.artifact import atomic_write
from bscompile.target import TargetSpec


@dataclass
class TuningRecord:
    """The measured best layout of one weight at one batch size on one target."""

    key: str  # weight fingerprint
    name: str
    m: int
    target: str
    layout: str  # "dense" | "bsr"
    block: str
    schedule: dict
    time_us: float
    dense_time_us: float
    candidates: list[dict] = dataclasses.field(default_factory=list)  # everything measured
    device: dict = dataclasses.field(default_factory=dict)  # where it was measured (Measurer.device)


def record_key(key: str, m: int) -> str:
    return f"{key}:{m}"


def load_records(path: str | os.PathLike) -> dict[str, TuningRecord]:
    try:
        data = json.loads(Path(path).read_text())
        recs = [TuningRecord(**r) for r in data["records"]]
    except FileNotFoundError:
        raise BscompileError(f"no such tuning records file: {path}") from None
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise BscompileError(f"{path} is not a bscompile tuning records file ({err})") from None
    return {record_key(r.key, r.m): r for r in recs}


def save_records(path: str | os.PathLike, records: list[TuningRecord]) -> None:
    blob = json.dumps({"format": 1, "records": [dataclasses.asdict(r) for r in records]}, indent=1)
    atomic_write(path, lambda tmp: Path(tmp).write_text(blob))


def _kernel_job(func: tvm.tirx.PrimFunc, mat: BSRMatrix, weight: np.ndarray, m: int):
    """A candidate kernel, random inputs and its check against NumPy (``y = x @ W.T``)."""
    from bscompile.runtime.remote import Job

    n, k = mat.shape
    x = np.random.default_rng(0).standard_normal((m, k)).astype(np.float32)
    args = [x, mat.data, mat.indices, mat.indptr, np.zeros(mat.padded_shape[0], np.float32),
            np.zeros((m, n), np.float32)]
    want = x @ weight.T

    def check(outs):
        np.testing.assert_allclose(outs[-1], want, rtol=1e-3, atol=1e-3 * np.sqrt(k))

    return Job(func, args, check)


def schedule_space(mat: BSRMatrix, m: int, lanes: int) -> list[cpu.CpuSchedule]:
    """The default schedule plus the variants worth trying for this shape."""
    base = cpu.default_schedule(mat, m, lanes)
    out = [base]
    out.append(dataclasses.replace(base, parallel=not base.parallel))
    if base.variant == "rows" and m >= lanes and mat.block.c <= 64:
        out.append(cpu.CpuSchedule(1, base.parallel, base.unroll_c, "batch", lanes))
    if base.variant != "block" and cpu.block_vector_ok(mat.block, lanes):
        out.append(cpu.CpuSchedule(1, base.parallel, True, "block"))
    if base.variant in ("batch", "block"):  # short blocks: the plain rows variant as the fallback
        out.append(cpu.CpuSchedule(max(d for d in range(1, 9) if m % d == 0), base.parallel, base.unroll_c))
    return out


def tune_site(site: WeightSite, plan: CompilePlan, spec: TargetSpec, measurer, top_k: int = 3,
              progress=None) -> TuningRecord:
    n, k = site.shape
    machine = MachineModel(lanes=plan.vector_lanes)
    ranked = sorted(site.report.blocks, key=lambda s: estimate_time(kernel_shape(s, site.m, plan.vector_lanes, n, k),
                                                                     machine))
    layouts = [("dense", BlockShape(DENSE_ROWS, k))] + [("bsr", s.block) for s in ranked[:top_k]]
    cands, jobs = [], []
    for layout, block in layouts:
        mat = BSRMatrix.dense(site.weight, DENSE_ROWS) if layout == "dense" else BSRMatrix.from_dense(site.weight, block)
        for sched in schedule_space(mat, site.m, plan.vector_lanes):
            cands.append({"layout": layout, "block": str(block), "schedule": sched.to_json()})
            jobs.append(_kernel_job(cpu.linear_kernel(mat, site.m, sched), mat, site.weight, site.m))
    results = measurer.time_many(jobs, progress)
    tried = [dict(c, time_us=r * 1e6) if isinstance(r, float) else dict(c, time_us=None, error=str(r))
             for c, r in zip(cands, results)]
    ok = [c for c in tried if c["time_us"] is not None]
    if not any(c["layout"] == "dense" for c in ok):
        errors = [c["error"] for c in tried if c["layout"] == "dense"]
        raise BscompileError(f"tuning {site.name}: the dense kernel failed ({errors[0] if errors else '?'})")
    best = min(ok, key=lambda c: c["time_us"])
    dense = min(c["time_us"] for c in ok if c["layout"] == "dense")
    if progress:
        progress(f"tuned {site.name} {n}x{k} m={site.m}: {best['layout']} {best['block']} "
                 f"{best['time_us']:.1f} us (dense {dense:.1f} us, {len(tried)} candidates, "
                 f"{len(tried) - len(ok)} failed)")
    return TuningRecord(fingerprint(site.weight), site.name, site.m, spec.name, best["layout"], best["block"],
                        best["schedule"], best["time_us"], dense, tried, measurer.device)


def tune_model(model, compile_kwargs: dict, progress=None, remote: str | None = None) -> list[TuningRecord]:
    """Tune every weight site; ``remote`` (``ssh://``, ``tcp://``, ``tracker://``, ``emulator``)
    measures on the device instead of this machine."""
    from bscompile.driver import analyze_model
    from bscompile.runtime.remote import LocalMeasurer, RemoteMeasurer, TimingConfig
    from bscompile.target import resolve_target

    spec = resolve_target(compile_kwargs["target"], compile_kwargs.get("cpu"))
    if spec.device != "cpu":
        raise BscompileError(f"tuning measures CPU kernels; target '{spec.name}' is {spec.device}")
    _, plan, _, _ = analyze_model(model, compile_kwargs.get("input_shapes"), spec, sparse=compile_kwargs["sparse"])
    if remote:
        if progress:
            progress(f"connecting to {remote}")
        measurer = RemoteMeasurer.connect(remote, spec)
    else:  # warm caches, as before remote tuning existed
        measurer = LocalMeasurer(spec, TimingConfig(flush_cache=False))
    t0 = time.perf_counter()
    try:
        records = []
        for i, s in enumerate(plan.sites, 1):
            if progress:
                progress(f"tuning weight {i}/{len(plan.sites)}: {s.name}")
            records.append(tune_site(s, plan, spec, measurer, progress=progress))
    finally:
        measurer.close()
    if progress:
        emulated = any(r.device.get("emulated") for r in records)
        where = f" on {remote}{' (emulated: timings mean nothing)' if emulated else ''}" if remote else ""
        progress(f"tuned {len(records)} weights in {time.perf_counter() - t0:.1f} s{where}")
    return records


def tune_command(args, compile_kwargs: dict, progress) -> int:
    import bscompile
    from bscompile.report import weight_table

    records_path = args.records or str(Path(args.model).with_suffix(".tune.json"))
    records = tune_model(args.model, compile_kwargs, progress, remote=getattr(args, "remote", None))
    save_records(records_path, records)
    out = args.output or str(Path(args.model).with_suffix(".bsc"))
    art = bscompile.compile(args.model, records={record_key(r.key, r.m): r for r in records}, progress=progress,
                            **compile_kwargs)
    art.export(out)
    print(weight_table(art.manifest.weights))
    print(f"\nwrote {records_path} and {out}")
    remote = getattr(args, "remote", None)
    if remote:
        print(check_on_device(out, args.model, compile_kwargs, remote, progress))
    return 0


def check_on_device(tuned_bsc: str, model, compile_kwargs: dict, remote: str, progress=None) -> str:
    """The whole tuned model against the untuned one on the device: same outputs (on random
    inputs), and both timed there (Relax VM ``main``). Returns a line for the user."""
    import tempfile

    import bscompile
    from bscompile.runtime.artifact import read_artifact
    from bscompile.runtime.remote import RemoteMeasurer

    manifest, _ = read_artifact(tuned_bsc)
    rng = np.random.default_rng(0)
    feeds = [rng.integers(0, 8, s.shape).astype(s.dtype) if np.dtype(s.dtype).kind in "iu"
             else rng.standard_normal(s.shape).astype(s.dtype) for s in manifest.inputs]
    with tempfile.TemporaryDirectory(prefix="bscompile-untuned-") as tmp:
        if progress:
            progress("compiling the untuned model for the whole-model check")
        untuned = bscompile.compile(model, **compile_kwargs).export(Path(tmp) / "untuned.bsc")
        ref: list[np.ndarray] = []
        with RemoteMeasurer.connect(remote, compile_kwargs["target"]) as m:
            t_untuned = m.time_artifact(untuned, feeds, ref.extend)

            def same(outs):
                for got, want in zip(outs, ref, strict=True):
                    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)

            t_tuned = m.time_artifact(tuned_bsc, feeds, same)
            emulated = m.device["emulated"]
    return (f"on {remote}: tuned {t_tuned * 1e3:.3f} ms, untuned {t_untuned * 1e3:.3f} ms per call "
            f"({t_untuned / t_tuned:.2f}x), same outputs" + (" (emulated: timings mean nothing)" if emulated else ""))
