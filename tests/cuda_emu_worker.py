"""Runs CUDA kernels and artifacts on the CUDA emulator, in a process of its own.

``python cuda_emu_worker.py JOB SEED [--sanitize address]`` prints one JSON report on
stdout; tests/test_cuda_emulator.py starts it and asserts on the report. A process per
job because installing the emulator is process-wide and because a memory fault in a
faulty kernel must not take the test runner down.

Jobs: ``kernels`` (every linear / recurrent kernel family and schedule of
codegen/cuda.py, the persistent recurrent kernel and the dynamic-selection kernel of
codegen/cuda_dynamic.py against NumPy, forward / reverse / random thread and block order),
``artifacts`` (whole compiled models through ``bscompile.load`` against onnxruntime,
with their launch sequences), ``mutations`` (faults injected into generated source).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from dataclasses import dataclass, field, replace

sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402

ORDERS = (("forward", 0), ("reverse", 0), ("random", 1))


# ---------------------------------------------------------------- kernel cases

@dataclass(frozen=True)
class LinearCase:
    n: int
    k: int
    block: tuple[int, int] | None  # None: the dense layout (16-row blocks)
    m: int
    sched: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def name(self) -> str:
        b = "dense" if self.block is None else f"{self.block[0]}x{self.block[1]}"
        extra = "".join(f"_{k}{int(v) if isinstance(v, bool) else v}" for k, v in sorted(self.sched.items()))
        return f"lin_{self.n}x{self.k}_{b}_m{self.m}{extra}"


#: Block shapes 1x1..32x32 (every height, widths spread), ragged sizes, batch 1..64,
#: staged and unstaged x, 1..8 warps per block, scalar / float2 / float4 lanes.
LINEAR_CASES = [
    LinearCase(37, 29, (1, 1), 1),
    LinearCase(40, 50, (1, 8), 3),
    LinearCase(33, 70, (2, 2), 2),
    LinearCase(50, 33, (2, 4), 5, {"stage_x": False}),
    LinearCase(50, 33, (4, 1), 1),
    LinearCase(100, 70, (4, 4), 1),
    LinearCase(100, 70, (4, 4), 8, {"warps": 2}),
    LinearCase(130, 70, (4, 4), 17, {"stage_x": False}),
    LinearCase(64, 96, (4, 8), 64),
    LinearCase(60, 64, (4, 16), 4, {"vec": 2}),
    LinearCase(72, 40, (8, 8), 3, {"warps": 4}),
    LinearCase(72, 40, (8, 8), 3, {"vec": 1}),
    LinearCase(90, 47, (8, 2), 12),
    LinearCase(64, 130, (8, 32), 2, {"warps": 8}),
    LinearCase(40, 90, (16, 16), 2),
    LinearCase(48, 33, (16, 4), 9, {"stage_x": False, "warps": 2}),
    LinearCase(96, 64, (32, 1), 1),
    LinearCase(64, 64, (32, 32), 6, {"vec": 1}),
    LinearCase(70, 100, (32, 8), 33),
    LinearCase(50, 70, None, 1),
    LinearCase(50, 70, None, 24, {"stage_x": False}),
    LinearCase(300, 256, (8, 8), 64, {"warps": 4}),
    LinearCase(20, 9000, (4, 4), 2),  # x[m_tile, K] over 48 KiB: unstaged
]


@dataclass(frozen=True)
class RecurrentCase:
    kind: str  # gru | lstm | rnn
    hidden: int
    block: tuple[int, int] | None
    seq: int
    batch: int
    lbr: bool = True  # GRU linear_before_reset (False: the split two-kernel step)
    reverse: bool = False
    ragged: bool = False  # sequence_lens < seq
    clip: float | None = None

    @property
    def name(self) -> str:
        b = "dense" if self.block is None else f"{self.block[0]}x{self.block[1]}"
        flags = ("" if self.lbr else "_split") + ("_rev" if self.reverse else "") + ("_lens" if self.ragged else "") \
            + (f"_clip{self.clip}" if self.clip else "")
        return f"{self.kind}_h{self.hidden}_{b}_t{self.seq}_b{self.batch}{flags}"

    @property
    def fused(self) -> bool:
        r = 16 if self.block is None else self.block[0]
        return self.hidden % r == 0


#: fused (hidden a multiple of the block height) and unfused steps, split GRU, LSTM,
#: RNN, reverse direction, sequence_lens, clip, batch 1..17.
RECURRENT_CASES = [
    RecurrentCase("gru", 32, (4, 4), 4, 2),
    RecurrentCase("gru", 30, (4, 4), 3, 3),  # unfused
    RecurrentCase("gru", 32, (8, 8), 4, 2, lbr=False),  # split, fused
    RecurrentCase("gru", 20, (8, 4), 3, 1, lbr=False, reverse=True),  # split, unfused
    RecurrentCase("gru", 48, None, 3, 5, reverse=True, ragged=True),
    RecurrentCase("lstm", 32, (4, 4), 4, 3, ragged=True),
    RecurrentCase("lstm", 24, (16, 16), 3, 2, reverse=True),  # unfused
    RecurrentCase("lstm", 64, (8, 8), 2, 17, clip=1.5),
    RecurrentCase("rnn", 40, (2, 8), 5, 4),
    RecurrentCase("rnn", 33, (1, 1), 3, 2, reverse=True, ragged=True),
    RecurrentCase("gru", 64, (32, 32), 2, 8),
]


#: The opt-in persistent kernel (codegen/cuda_persistent.py): fused single-matrix cells only.
PERSISTENT_CASES = [
    RecurrentCase("gru", 32, (4, 4), 4, 3, ragged=True),
    RecurrentCase("lstm", 24, (8, 4), 3, 2, reverse=True),
    RecurrentCase("rnn", 64, (8, 8), 3, 10),  # two batch tiles per step
    RecurrentCase("gru", 48, None, 3, 2, clip=2.0),  # dense layout
]


@dataclass(frozen=True)
class DynamicCase:
    """Input-dependent block selection (codegen/cuda_dynamic.py): gate, selection, tile product."""

    in_f: int
    out_f: int
    block: int
    keep: float  # k = keep_count(keep, tiles alive)
    m: int
    pruned: float = 0.0  # fraction of tiles statically pruned (gate bias -inf: never selected)

    @property
    def name(self) -> str:
        return f"dyn_{self.out_f}x{self.in_f}_b{self.block}_keep{self.keep}_m{self.m}" + (
            f"_pruned{self.pruned}" if self.pruned else "")


#: Gate rows padded (tiles not a multiple of 16), selection blocks of 32..256 threads,
#: k = 1 .. every tile, a static block mask, batch 1..17.
DYNAMIC_CASES = [
    DynamicCase(32, 48, 8, 0.25, 1),  # 24 tiles
    DynamicCase(64, 64, 4, 0.15, 3, pruned=0.3),  # 256 tiles, static mask
    DynamicCase(96, 32, 16, 0.1, 5),  # k = 1
    DynamicCase(64, 32, 32, 1.0, 2),  # every tile kept
    DynamicCase(40, 120, 8, 0.5, 17, pruned=0.5),  # 75 tiles
]


def dynamic_func_and_args(case: DynamicCase, rng):
    """The kernel, its packed arguments (as the site kind packs them) and the NumPy reference
    (codegen.dynamic_layout.dynamic_linear), on rows whose k-th and (k+1)-th gate scores are
    1e-2 apart, so float rounding cannot change which tiles are selected."""
    from bscompile.codegen import cuda_dynamic
    from bscompile.codegen import dynamic_layout as dl

    n = (case.in_f // case.block) * (case.out_f // case.block)
    alive = None
    if case.pruned:
        alive = rng.random(n) >= case.pruned
        alive[0] = True
    n_alive = n if alive is None else int(alive.sum())
    k = dl.keep_count(case.keep, n_alive)
    w = (rng.standard_normal((case.out_f, case.in_f)) / np.sqrt(case.in_f)).astype(np.float32)
    gate_w = (rng.standard_normal((n, case.in_f)) / np.sqrt(case.in_f)).astype(np.float32)
    gate_b = (rng.standard_normal(n) + 1).astype(np.float32)  # a normalising sum well away from 0
    bias = rng.standard_normal(case.out_f).astype(np.float32)
    rows: list = []
    while len(rows) < case.m:
        x = rng.standard_normal((4 * case.m, case.in_f)).astype(np.float32)
        g = x.astype(np.float64) @ gate_w.T + gate_b
        srt = -np.sort(-(g if alive is None else np.where(alive, g, -np.inf)), axis=1)
        gap = srt[:, k - 1] - (srt[:, k] if k < n else -np.inf)
        rows.extend(x[(gap > 1e-2) & (srt[:, :k].sum(1) > 0.5)])
    x = np.stack(rows[:case.m])
    ref, _ = dl.dynamic_linear(x, w, gate_w, gate_b, bias, case.block, k, alive)
    func = cuda_dynamic.dynamic_linear_kernel(case.in_f, case.out_f, case.block, k, case.m, n_alive)
    args = [x, dl.pack_tiles(w, case.block), dl.pack_gate(gate_w), dl.pad_gate_bias(gate_b, alive), bias]
    return func, args, ref


def _block_sparse(rng, n, k, block, density=0.4):
    w = rng.standard_normal((n, k)).astype(np.float32) / np.sqrt(k)
    if block is None:
        return w
    r, c = block
    keep = rng.random((-(-n // r), -(-k // c))) < density
    return (w * np.kron(keep, np.ones((r, c), np.float32))[:n, :k]).astype(np.float32)


def _bsr(w, block):
    from bscompile.codegen.layout import DENSE_ROWS, BlockShape, BSRMatrix

    return BSRMatrix.dense(w, DENSE_ROWS) if block is None else BSRMatrix.from_dense(w, BlockShape(*block))


def linear_func(case: LinearCase, mat):
    from bscompile.codegen import cuda

    sched = replace(cuda.default_schedule(mat, case.m), **case.sched)
    return cuda.linear_kernel(mat, case.m, sched)


def _sig(x):
    return 1 / (1 + np.exp(-x))


def recurrent_reference(case: RecurrentCase, xp, rs, rbs, h0, c0, lens, peep):
    """One direction of the ONNX GRU/LSTM/RNN recurrence in NumPy (float64)."""
    h, c = h0.astype(np.float64), c0.astype(np.float64)
    H = case.hidden
    R = np.concatenate(rs) if case.lbr or case.kind != "gru" else None
    rb = np.concatenate(rbs)
    T, B = xp.shape[:2]
    y = np.zeros((T, B, H))
    clip = (lambda v: np.clip(v, -case.clip, case.clip)) if case.clip else (lambda v: v)
    for t in range(T):
        live = t < lens
        tt = np.where(live, lens - 1 - t if case.reverse else t, 0)
        x = xp[tt, np.arange(B)]
        if case.kind == "gru":
            if case.lbr:
                g = h @ R.T + rb
                z, r = _sig(clip(x[:, :H] + g[:, :H])), _sig(clip(x[:, H:2 * H] + g[:, H:2 * H]))
                cand = np.tanh(clip(x[:, 2 * H:] + r * g[:, 2 * H:]))
            else:
                g = h @ rs[0].T + rbs[0]
                z, r = _sig(clip(x[:, :H] + g[:, :H])), _sig(clip(x[:, H:2 * H] + g[:, H:2 * H]))
                cand = np.tanh(clip(x[:, 2 * H:] + (r * h) @ rs[1].T + rbs[1]))
            hn, cn = (1 - z) * cand + z * h, c
        elif case.kind == "lstm":
            g = h @ R.T + rb
            i = _sig(clip(x[:, :H] + g[:, :H] + peep[:H] * c))
            f = _sig(clip(x[:, 2 * H:3 * H] + g[:, 2 * H:3 * H] + peep[2 * H:] * c))
            cn = f * c + i * np.tanh(clip(x[:, 3 * H:] + g[:, 3 * H:]))
            o = _sig(clip(x[:, H:2 * H] + g[:, H:2 * H] + peep[H:2 * H] * cn))
            hn = o * np.tanh(cn)
        else:
            hn, cn = np.tanh(clip(x + h @ R.T + rb)), c
        h = np.where(live[:, None], hn, h)
        c = np.where(live[:, None], cn, c)
        y[tt[live], np.arange(B)[live]] = hn[live]
    return y, h, c


def recurrent_func_and_args(case: RecurrentCase, rng, persistent: bool = False):
    from bscompile.codegen import cuda, cuda_persistent
    from bscompile.codegen.layout import BSRMatrix
    from bscompile.codegen.recurrent_cells import CellSpec

    H, G = case.hidden, {"gru": 3, "lstm": 4, "rnn": 1}[case.kind]
    cell = CellSpec(case.kind, H, reverse=case.reverse, linear_before_reset=case.lbr, clip=case.clip)
    split = case.kind == "gru" and not case.lbr
    shapes = [(2 * H, H), (H, H)] if split else [(G * H, H)]
    rs = [_block_sparse(rng, n, k, case.block) * 2 for n, k in shapes]
    rbs = [rng.standard_normal(n).astype(np.float32) * 0.3 for n, _ in shapes]
    mats = [_bsr(r, case.block) for r in rs]
    make = cuda_persistent.recurrent_kernel if persistent else cuda.recurrent_kernel
    func = make(cell, mats, case.seq, case.batch, [cuda.default_schedule(m, case.batch) for m in mats])
    xp = rng.standard_normal((case.seq, case.batch, G * H)).astype(np.float32)
    h0 = rng.standard_normal((case.batch, H)).astype(np.float32)
    c0 = rng.standard_normal((case.batch, H)).astype(np.float32)
    lens = (rng.integers(1, case.seq + 1, case.batch) if case.ragged else np.full(case.batch, case.seq)).astype(
        np.int32)
    peep = (rng.standard_normal(3 * H) * 0.5).astype(np.float32)
    args = [xp]
    for mat, rb in zip(mats, rbs):
        bias = np.zeros(mat.padded_shape[0], np.float32)
        bias[:len(rb)] = rb
        args += [mat.data, mat.indices, mat.indptr, bias]
    if not split:
        one = BSRMatrix.dense(np.zeros((1, 1), np.float32), 1)
        args += [one.data, one.indices, one.indptr, np.zeros(1, np.float32)]
    args += [h0, c0, lens, peep]
    ref = recurrent_reference(case, xp, rs, rbs, h0, c0, lens, peep)
    return func, args, ref


def expected_launches(case: RecurrentCase) -> int:
    """One init kernel, then per step: one fused kernel (split GRU: two); unfused: mat-vec(s) + element-wise."""
    split = case.kind == "gru" and not case.lbr
    per_step = (2 if split else 1) if case.fused else (4 if split else 2)
    return 1 + case.seq * per_step


def _tensor(a):
    import tvm

    return tvm.runtime.tensor(np.ascontiguousarray(a), tvm.cuda(0))


#: The sanitizer pass's share of the sweep (ASan+UBSan builds and runs ~3x slower).
SANITIZED_LINEAR = (0, 3, 7, 9, 13, 17, 20)
SANITIZED_RECURRENT = (1, 3, 5, 7)
#: TSan: fused, unfused, split fused, split unfused step kernels (blocks share h through global memory).
TSAN_RECURRENT = (0, 1, 2, 3)
#: The dynamic kernel: all of it under ASan+UBSan; under TSan the selection's shared scores
#: and the gate / selection / product hand-over through global memory.
SANITIZED_DYNAMIC = tuple(range(len(DYNAMIC_CASES)))
TSAN_DYNAMIC = (1, 4)


def run_kernels(seed: int, sanitize: str = "") -> dict:
    """Build every case into one module (one g++ build), run each in three orders."""
    import tvm

    from bscompile.runtime import cuda_emulator as emu
    from bscompile.target import resolve_target

    rng = np.random.default_rng(seed)
    emu.install(sanitize=sanitize)
    funcs, checks = {}, []
    # sanitized runs: part of the sweep (TSan: the recurrent step kernels, whose blocks share h)
    lin_ids = {"": range(len(LINEAR_CASES)), "address": SANITIZED_LINEAR, "thread": ()}[sanitize]
    rec_ids = {"": range(len(RECURRENT_CASES)), "address": SANITIZED_RECURRENT, "thread": TSAN_RECURRENT}[sanitize]
    dyn_ids = {"": range(len(DYNAMIC_CASES)), "address": SANITIZED_DYNAMIC, "thread": TSAN_DYNAMIC}[sanitize]
    for i, case in enumerate(LINEAR_CASES):
        if i not in lin_ids:
            continue
        w = _block_sparse(rng, case.n, case.k, case.block)
        mat = _bsr(w, case.block)
        x = rng.standard_normal((case.m, case.k)).astype(np.float32)
        bias = np.zeros(mat.padded_shape[0], np.float32)
        bias[:case.n] = rng.standard_normal(case.n)
        sym = f"k{i}"
        funcs[sym] = linear_func(case, mat).with_attr("global_symbol", sym)
        ref = x.astype(np.float64) @ w.T.astype(np.float64) + bias[:case.n]
        checks.append((case.name, sym, [x, mat.data, mat.indices, mat.indptr, bias], [(case.m, case.n)], [ref],
                       None))
    for i, case in enumerate(RECURRENT_CASES):
        if i not in rec_ids:
            continue
        func, args, ref = recurrent_func_and_args(case, rng)
        sym = f"r{i}"
        funcs[sym] = func.with_attr("global_symbol", sym)
        H, B = case.hidden, case.batch
        checks.append((case.name, sym, args, [(case.seq, B, H), (B, H), (B, H)], list(ref),
                       expected_launches(case)))
    for i, case in enumerate(DYNAMIC_CASES):
        if i not in dyn_ids:
            continue
        func, args, ref = dynamic_func_and_args(case, rng)
        sym = f"d{i}"
        funcs[sym] = func.with_attr("global_symbol", sym)
        checks.append((case.name, sym, args, [(case.m, case.out_f)], [ref], 3))  # gate, selection, product
    for i, case in enumerate(PERSISTENT_CASES):
        if sanitize:
            break
        func, args, ref = recurrent_func_and_args(case, rng, persistent=True)
        sym = f"p{i}"
        funcs[sym] = func.with_attr("global_symbol", sym)
        H, B = case.hidden, case.batch
        checks.append(("persistent_" + case.name, sym, args, [(case.seq, B, H), (B, H), (B, H)], list(ref), 2))
    t0 = time.perf_counter()
    with resolve_target("cuda").tvm_target() as tgt:
        ex = tvm.compile(tvm.IRModule(funcs), target=tgt)
    t1 = time.perf_counter()
    emu.emulate_host_module(ex)
    t2 = time.perf_counter()
    results = []
    for name, sym, args, out_shapes, refs, n_launch in checks:
        persistent = name.startswith("persistent_")
        # (a sanitizer finds its errors in any order: one is enough)
        runs = [(o, s, persistent) for o, s in (ORDERS[:1] if sanitize else ORDERS)]
        if persistent:  # blocks one at a time: the spin-wait on other blocks must be reported as a deadlock
            runs.append(("forward", 0, False))
        for order, oseed, coresident in runs:
            emu.configure(order, oseed + seed, coresident=coresident, spin_limit=2000 if persistent else 0)
            emu.clear_launches()
            outs = [_tensor(np.full(s, np.nan, np.float32)) for s in out_shapes]
            err = None
            try:
                with emu.raised_as_emulator_error():
                    ex.mod[sym](*[_tensor(a) for a in args], *outs)
            except emu.EmulatorError as e:
                err = str(e)
            launches = emu.launches()
            errs = [float(np.max(np.abs(o.numpy() - r) / (1 + np.abs(r)))) if err is None else None
                    for o, r in zip(outs, refs)]
            results.append({"case": name, "order": order, "coresident": coresident, "error": err, "max_rel_err": errs,
                            "launches": len(launches), "expected_launches": n_launch,
                            "kernels": sorted({ln.kernel for ln in launches})})
    return {"build_seconds": t1 - t0, "emulator_build_seconds": t2 - t1,
            "run_seconds": time.perf_counter() - t2, "results": results}


# ---------------------------------------------------------------- whole artifacts

def _deepspeech(path: str) -> str:
    from bscompile.models.deepspeech import DeepSpeechConfig, export_pruned

    cfg = DeepSpeechConfig(hidden=32, cell="gru", layers=2, features=20, conv_channels=16)
    export_pruned(path, cfg, 0.8, (4, 4), frames=16, atol=1e-4)
    return path


def artifact_models(rng, tmp: str) -> dict[str, tuple[str, dict]]:
    """name -> (ONNX path, recurrent structure {steps per direction: number of directions})."""
    import onnx

    import bscompile
    from onnx_models import mlp, recurrent, weights_as_inputs

    out = {}

    def save(name, model, rec):
        path = os.path.join(tmp, f"{name}.onnx")
        onnx.save(model, path)
        out[name] = (path, rec)

    bundled = os.path.join(os.path.dirname(bscompile.__file__), "data", "char_gru_bp4x4.onnx")
    out["bundled_char_gru_h256"] = (bundled, {"layers_x_dirs": 2, "seq": 50})
    save("bilstm_4x4", recurrent("LSTM", 16, 24, 5, 3, 1, True, "4x4", rng), {"layers_x_dirs": 2, "seq": 5})
    save("gru_2layer_8x8", recurrent("GRU", 12, 32, 4, 2, 2, False, "8x8", rng), {"layers_x_dirs": 2, "seq": 4})
    save("rnn_bidir_dense", recurrent("RNN", 10, 20, 3, 4, 1, True, "dense", rng), {"layers_x_dirs": 2, "seq": 3})
    save("gru_runtime_weights", weights_as_inputs(recurrent("GRU", 8, 16, 3, 2, 1, False, "dense", rng),
                                                  {"l0.W", "l0.R"}), {"layers_x_dirs": 1, "seq": 3})
    save("mlp_bsr", mlp([64, 128, 48, 10], 5, ["8x8", "4x4", "unstructured"], rng)[0], {})
    out["deepspeech_gru_h32"] = (_deepspeech(os.path.join(tmp, "deepspeech.onnx")),
                                 {"layers_x_dirs": 4, "seq": 8})
    return out


def run_artifacts(seed: int) -> dict:
    """Compile for CUDA, export, load through bscompile.load on the emulated device, compare with onnxruntime."""
    import tempfile

    import onnxruntime as ort

    import bscompile
    from bscompile.runtime import cuda_emulator as emu

    rng = np.random.default_rng(seed)
    emu.install()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (path, rec) in artifact_models(rng, tmp).items():
            t0 = time.perf_counter()
            art = bscompile.compile(path, target="cuda")
            bsc = art.export(os.path.join(tmp, f"{name}.bsc"))
            t1 = time.perf_counter()
            mod = bscompile.load(bsc)
            t2 = time.perf_counter()
            feeds = {}
            for s in mod.inputs:
                if np.dtype(s.dtype).kind in "iu":
                    feeds[s.name] = rng.integers(0, 8, size=s.shape).astype(s.dtype)
                else:
                    feeds[s.name] = rng.standard_normal(s.shape).astype(s.dtype)
            sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
            ref = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
            for order, oseed in ORDERS:
                emu.configure(order, oseed + seed)
                emu.clear_launches()
                err = None
                try:
                    with emu.raised_as_emulator_error():
                        outs = mod.run(feeds)
                except emu.EmulatorError as e:
                    err, outs = str(e), {}
                launches = emu.launches()
                results.append({
                    "model": name, "order": order, "error": err, "device": mod.device.dlpack_device_type(),
                    "max_abs_err": {k: float(np.max(np.abs(v - ref[k]))) for k, v in outs.items()},
                    "ref_scale": {k: float(np.max(np.abs(ref[k]))) for k in ref},
                    "launches": [ln.kernel for ln in launches], "structure": rec,
                    "linear_sites": sum(w["kind"] == "linear" for w in mod.manifest.weights),
                    "compile_seconds": t1 - t0, "load_seconds": t2 - t1})
    return {"results": results}


def run_symbolic(seed: int) -> dict:
    """One CUDA artifact per symbolic-shape model, run at several (batch, length) on the
    emulated device against onnxruntime: the kernels' per-bucket launches and the
    symbolic sequence loop (tests/test_symbolic.py's models and shapes)."""
    import tempfile

    import onnx
    import onnxruntime as ort

    import bscompile
    from bscompile.runtime import cuda_emulator as emu
    from onnx_models import symbolic_model

    rng = np.random.default_rng(seed)
    emu.install()
    emu.configure("random", seed)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in SYMBOLIC_CUDA_MODELS:
            model, feeds_of = symbolic_model(name, rng)
            path = os.path.join(tmp, f"{name}.onnx")
            onnx.save(model, path)
            mod = bscompile.load(bscompile.compile(path, target="cuda").export(os.path.join(tmp, f"{name}.bsc")))
            sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
            for b, t in SYMBOLIC_SHAPES:
                feeds = feeds_of(b, t, rng)
                ref = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
                emu.clear_launches()
                with emu.raised_as_emulator_error():
                    outs = mod.run(feeds)
                results.append({"model": name, "batch": b, "length": t, "symbolic": [list(s.shape) for s in mod.inputs],
                                "max_abs_err": {k: float(np.max(np.abs(v - ref[k]))) for k, v in outs.items()},
                                "ref_scale": {k: float(np.max(np.abs(ref[k]))) for k in ref},
                                "launches": [ln.kernel for ln in emu.launches()]})
    return {"results": results}


#: (batch, length) of the symbolic CUDA run: every m bucket of codegen.family.M_BUCKETS and
#: lengths 1 to 40 (length 200 is covered on the CPU; here it costs minutes of emulation)
SYMBOLIC_SHAPES = ((1, 1), (3, 7), (17, 40), (64, 5))
SYMBOLIC_CUDA_MODELS = ("gru_lens", "lstm_bidir", "linear", "deepspeech")


# ---------------------------------------------------------------- mutations

MUT_LINEAR = LinearCase(50, 70, (4, 4), 3, {"warps": 2})  # staged x, 2 warps, ragged rows
MUT_RECURRENT = RecurrentCase("gru", 32, (4, 4), 4, 2)  # fused step kernel over 8 thread blocks
_SHFL = re.compile(r"^(\s*)(acc_ptr\[\d+\] = .*__shfl_down_sync\(\(uint\)4294967295, .*, )(\d+)(, 32\)\);)$", re.M)


def _once(pattern: str, repl, src: str, flags=re.M, which: int = 0) -> str:
    """Replace the ``which``-th match of ``pattern`` (it must exist: a mutation that misses is a test bug)."""
    ms = list(re.finditer(pattern, src, flags))
    if not ms:
        raise AssertionError(f"mutation pattern not found: {pattern}")
    m = ms[which]
    new = repl(m) if callable(repl) else m.expand(repl)
    return src[:m.start()] + new + src[m.end():]


def _kernel_span(src: str, kernel: str) -> tuple[int, int]:
    start = src.index(f" {kernel}(", src.index(f" {kernel}(") + 1)  # the definition, after the declaration
    end = src.find('extern "C"', start)
    return src.rfind('extern "C"', 0, start), len(src) if end < 0 else end


def _in_kernel(kernel: str, mutate):
    def apply(src: str) -> str:
        a, b = _kernel_span(src, kernel)
        return src[:a] + mutate(src[a:b]) + src[b:]
    return apply


#: fault -> (kernel, source mutation, sanitizer mode). The mutations follow TVM 0.27's CUDA printer.
MUTATIONS = {
    "dropped __syncthreads (x staging)": ("lin", lambda s: _once(r"^\s*__syncthreads\(\);\n", "", s), ""),
    "wrong shuffle offset (16 -> 8)": ("lin", lambda s: _once(_SHFL.pattern, r"\g<1>\g<2>8\g<4>", s), ""),
    "shuffle under divergence (lanes < 16)": (
        "lin", lambda s: _once(_SHFL.pattern, r"\g<1>if (((int)threadIdx.x) < 16) \g<2>\g<3>\g<4>", s), ""),
    "shuffle reading lanes outside its mask": (
        "lin", lambda s: _once(_SHFL.pattern, lambda m: m[1] + "if (((int)threadIdx.x) < 16) " + m[2].replace(
            "(uint)4294967295", "(uint)65535") + "16" + m[4], s), ""),
    "narrowed shuffle mask (0xffff)": (
        "lin", lambda s: _once(r"__shfl_down_sync\(\(uint\)4294967295,", "__shfl_down_sync((uint)65535,", s), ""),
    "misaligned float4 weight load": (
        "lin", lambda s: _once(r"\*\(float4\*\)\(data_ptr \+ ", "*(float4*)(data_ptr + 1 + ", s), ""),
    "single-buffered recurrent state": (
        "rec", lambda s: _once(r"hv_ptr\[\(\((.*)\) \+ (\d+)\) - \((\w+) \* (\d+)\)\)\] = h_out_ptr",
                               r"hv_ptr[(\1) + (\3 * \4))] = h_out_ptr", s), ""),
    "uninitialised shared memory (staging store dropped)": (
        "lin", lambda s: _once(r"^\s*xs_ptr\[[^\n]*\] = condval;\n", "", s), ""),
    "early exit before __syncthreads": (
        "lin", lambda s: _once(r"(__shared__[^\n]*\n)", r"\1  if (((int)threadIdx.y) == 1) return;\n", s), ""),
    "launch bounds below the block size": (
        "lin", lambda s: _once(r"__launch_bounds__\((\d+)\)", lambda m: f"__launch_bounds__({int(m[1]) // 2})", s), ""),
    "static shared memory over 48 KiB": ("lin", lambda s: _once(r"xs_ptr\[(\d+)\];", "xs_ptr[12800];", s), ""),
    "dropped bounds guard (last row store)": (
        "lin", lambda s: _once(r"if \(([^\n]*)\) \{\n(\s*y_ptr\[)", r"if (true) {\n\2", s, which=-1), "address"),
}


def _mutation_module(rng, tmp: str):
    """The two kernels the faults go into, exported once; returns (host .so path, checks)."""
    import tvm

    from bscompile.target import resolve_target

    w = _block_sparse(rng, MUT_LINEAR.n, MUT_LINEAR.k, MUT_LINEAR.block)
    mat = _bsr(w, MUT_LINEAR.block)
    x = rng.standard_normal((MUT_LINEAR.m, MUT_LINEAR.k)).astype(np.float32)
    bias = np.zeros(mat.padded_shape[0], np.float32)
    bias[:MUT_LINEAR.n] = rng.standard_normal(MUT_LINEAR.n)
    rfunc, rargs, rref = recurrent_func_and_args(MUT_RECURRENT, rng)
    funcs = {"lin": linear_func(MUT_LINEAR, mat).with_attr("global_symbol", "lin"),
             "rec": rfunc.with_attr("global_symbol", "rec")}
    with resolve_target("cuda").tvm_target() as tgt:
        ex = tvm.compile(tvm.IRModule(funcs), target=tgt)
    path = os.path.join(tmp, "base.so")
    ex.export_library(path)
    H, B = MUT_RECURRENT.hidden, MUT_RECURRENT.batch
    checks = {
        "lin": ([x, mat.data, mat.indices, mat.indptr, bias], [(MUT_LINEAR.m, MUT_LINEAR.n)],
                [x.astype(np.float64) @ w.T + bias[:MUT_LINEAR.n]]),
        "rec": (rargs, [(MUT_RECURRENT.seq, B, H), (B, H), (B, H)], list(rref)),
    }
    return path, checks


def _run_mutant(host_path: str, tag: str, checks, kernel: str, mutate, seed: int) -> dict:
    """Load the kernels with ``mutate`` applied to the CUDA source and run ``kernel`` in every order."""
    import shutil

    import tvm

    from bscompile.runtime import cuda_emulator as emu

    seen = {}
    target = {"lin": "lin_kernel", "rec": "rec_kernel_1"}[kernel]  # rec_kernel_1: the step kernel

    def filt(src: str) -> str:
        out = _in_kernel(target, mutate)(src) if mutate else src
        seen["changed"] = out != src
        return out

    emu.install(source_filter=filt, sanitize=emu._state.sanitize)
    fresh = host_path.replace("base.so", f"mut_{tag}.so")  # a fresh path: TVM caches kernel handles per library
    shutil.copy(host_path, fresh)
    lib = tvm.runtime.load_module(fresh)
    args, shapes, refs = checks[kernel]
    orders = []
    for order, oseed in ORDERS:
        emu.configure(order, oseed + seed)
        outs = [_tensor(np.zeros(s, np.float32)) for s in shapes]
        try:
            with emu.raised_as_emulator_error():
                lib[kernel](*[_tensor(a) for a in args], *outs)
            err = max(float(np.nan_to_num(np.max(np.abs(o.numpy() - r)), nan=np.inf)) for o, r in zip(outs, refs))
            nan = any(bool(np.isnan(o.numpy()).any()) for o in outs)
            orders.append({"order": order, "error": None, "max_abs_err": err, "nan": nan})
        except emu.EmulatorError as e:
            orders.append({"order": order, "error": str(e)})
    return {"changed": seen.get("changed", mutate is None), "orders": orders}


def run_mutations(seed: int) -> dict:
    """Every plain-mode fault of :data:`MUTATIONS` (and the unmutated control) in one process."""
    import tempfile

    from bscompile.runtime import cuda_emulator as emu

    rng = np.random.default_rng(seed)
    emu.install()
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        host, checks = _mutation_module(rng, tmp)
        for kernel in ("lin", "rec"):
            out[f"control {kernel}"] = _run_mutant(host, f"control_{kernel}", checks, kernel, None, seed)
        for i, (name, (kernel, mutate, mode)) in enumerate(MUTATIONS.items()):
            if mode == "":
                out[name] = _run_mutant(host, str(i), checks, kernel, mutate, seed)
    return {"results": out}


def run_mutation_sanitized(seed: int, name: str, mode: str = "address") -> dict:
    """One fault under ASan+UBSan or TSan (the process dies at the first report: the caller reads stderr)."""
    import tempfile

    from bscompile.runtime import cuda_emulator as emu

    rng = np.random.default_rng(seed)
    emu.install(sanitize=mode)
    kernel, mutate, _ = MUTATIONS[name] if name != "control" else ("lin", None, mode)
    with tempfile.TemporaryDirectory() as tmp:
        host, checks = _mutation_module(rng, tmp)
        return {"results": {name: _run_mutant(host, "asan", checks, kernel, mutate, seed)}}


SANITIZERS = {"asan": "address", "tsan": "thread"}
JOBS = {"kernels": run_kernels, "artifacts": run_artifacts, "mutations": run_mutations,
        "symbolic": run_symbolic}

if __name__ == "__main__":
    job, seed = sys.argv[1], int(sys.argv[2])
    if job.startswith("mutation-"):  # mutation-asan / mutation-tsan NAME
        print(json.dumps(run_mutation_sanitized(seed, sys.argv[3], SANITIZERS[job.split("-")[1]])))
    elif job.startswith("kernels-"):  # kernels-asan / kernels-tsan
        print(json.dumps(run_kernels(seed, sanitize=SANITIZERS[job.split("-")[1]])))
    else:
        print(json.dumps(JOBS[job](seed)))
