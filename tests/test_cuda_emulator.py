"""CUDA proven without a GPU: generated kernels and whole CUDA artifacts on the CUDA emulator.

Each check runs tests/cuda_emu_worker.py in a subprocess (installing the emulator is
process-wide, and a faulty kernel may take its process down) and asserts on its JSON
report: every kernel family and schedule of codegen/cuda.py, the persistent recurrent
kernel and the dynamic-selection kernel (codegen/cuda_dynamic.py) against NumPy, whole
artifacts through ``bscompile.load`` against onnxruntime with their launch sequences,
injected faults reported, and sanitizer passes (ASan+UBSan; TSan for races between the
thread blocks of the recurrent step kernels and the dynamic kernel's hand-overs). Every
unsanitized run is repeated with
threads and blocks forward, reversed and in a seeded random order.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import cuda_emu_worker as W
from bscompile.runtime.cuda_emulator import build, serialized

WORKER = Path(__file__).with_name("cuda_emu_worker.py")

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="the CUDA emulator compiles kernels with g++")


def _require_sanitizer(mode: str) -> None:
    """Skip (saying why) where the sanitizer runtime cannot start under Python, e.g. TSan with a
    kernel's high-entropy address-space layout ("unexpected memory mapping")."""
    p = subprocess.run([sys.executable, "-c", "pass"], env=build.sanitizer_env(mode=mode), capture_output=True,
                       text=True, timeout=120)
    if p.returncode != 0:
        pytest.skip(f"the {mode} sanitizer cannot run Python here: {(p.stderr.strip().splitlines() or ['?'])[-1]}")


def _worker(*args, sanitize: str = "", expect_ok: bool = True, timeout: float = 600):
    env = build.sanitizer_env(mode=sanitize) if sanitize else None
    p = subprocess.run([sys.executable, str(WORKER), *map(str, args)], capture_output=True, text=True, env=env,
                       timeout=timeout, cwd=WORKER.parent)
    if expect_ok:
        assert p.returncode == 0, f"worker {args} failed ({p.returncode}):\n{p.stderr[-4000:]}"
        return json.loads(p.stdout.splitlines()[-1]), p.stderr
    return p


# ---------------------------------------------------------------- format and rewrite (no compiler)

def _s(text: str) -> bytes:
    b = text.encode()
    return struct.pack("<Q", len(b)) + b


def test_parse_serialised_cuda_module():
    info = (_s("k") + _s("k") + struct.pack("<Q", 3) + struct.pack("<BBH", 3, 64, 1) + struct.pack("<BBH", 0, 32, 1)
            + struct.pack("<BBH", 2, 32, 1) + struct.pack("<Q", 3) + _s("blockIdx.x") + _s("threadIdx.x")
            + _s(serialized.DYN_SHARED_TAG) + struct.pack("<Q", 3) + bytes(12))
    blob = _s("cuda") + struct.pack("<Q", 1) + info + _s("SOURCE")
    m = serialized.parse_cuda_module(blob)
    assert m.fmt == "cuda" and m.source == "SOURCE"
    k = m.kernels["k"]
    assert k.arg_types == ((3, 64, 1), (0, 32, 1), (2, 32, 1))
    assert k.launch_args == ["blockIdx.x", "threadIdx.x", serialized.DYN_SHARED_TAG] and not k.cooperative
    with pytest.raises(ValueError, match="truncated"):
        serialized.parse_cuda_module(blob[:-3])


def test_shared_rewrite_and_entry_points():
    src = ('extern "C" __global__ void __launch_bounds__(64) k(float* __restrict__ a, int n, float s) {\n'
           "  __shared__ alignas(64) float xs[48];\n  extern __shared__ uchar dyn[];\n}\n")
    out = build.rewrite_shared(src)
    assert "float* xs = (float*)cuemu_shared(sizeof(float) * (48), 64, __LINE__);" in out
    assert "uchar* dyn = (uchar*)cuemu_dyn_shared();" in out
    assert out.count("\n") == src.count("\n")  # __LINE__ in reports must match the source
    info = serialized.KernelInfo("k", ((3, 64, 1), (0, 32, 1), (2, 32, 1)), ("blockIdx.x", "threadIdx.x"))
    entry = build.entry_points(src, {"k": info})
    assert "__tvm_ffi_k(" in entry and "if (nargs != 5)" in entry
    assert 'cuemu_launch("k", 64,' in entry and "(float)cuemu_arg_float(args, 2)" in entry
    assert entry.rstrip().endswith("dims, dyn, 0);\n}")  # no spin-wait: blocks one at a time
    spin = src.replace("{\n", "{ while (0) __nanosleep(1);\n", 1)
    assert build.entry_points(spin, {"k": info}).rstrip().endswith("dims, dyn, 1);\n}")
    with pytest.raises(build.EmulatorBuildError, match="2 parameters"):
        build.entry_points(src.replace(", float s", ""), {"k": info})


# ---------------------------------------------------------------- emulated runs

def test_kernel_sweep_matches_numpy(rng):
    """Every linear (BSR / dense), recurrent and dynamic-selection kernel variant, three orders:
    rel. error < 1e-4 against float64 NumPy (K up to 9000 float32 products; an indexing or sync
    bug is O(1) or NaN). The persistent kernels run with co-resident blocks, and deadlock
    (reported) without; the dynamic kernel is three launches (gate, selection, tile product)."""
    seed = int(rng.integers(1 << 30))
    rep, _ = _worker("kernels", seed)
    res = rep["results"]
    names = {r["case"] for r in res}
    assert len(names) == (len(W.LINEAR_CASES) + len(W.RECURRENT_CASES) + len(W.PERSISTENT_CASES)
                          + len(W.DYNAMIC_CASES))
    assert {r["order"] for r in res} == {"forward", "reverse", "random"}
    dyn = [r for r in res if r["case"].startswith("dyn_")]
    assert len(dyn) == 3 * len(W.DYNAMIC_CASES) and {r["order"] for r in dyn} == {"forward", "reverse", "random"}
    for r in res:
        ctx = f"{r['case']} ({r['order']} order, worker seed {seed})"
        if r["case"].startswith("persistent_") and not r["coresident"]:
            # blocks one at a time: block 0 spins on stamps of blocks that have not started
            assert r["error"] and "deadlock" in r["error"] and "co-resident" in r["error"], f"{ctx}: {r['error']}"
            continue
        assert r["error"] is None, f"{ctx}: {r['error']}"
        assert max(r["max_rel_err"]) < 1e-4, f"{ctx}: max rel err {r['max_rel_err']}"
        if r["expected_launches"] is not None:  # init + per step one fused kernel (split GRU: two); dynamic: 3
            assert r["launches"] == r["expected_launches"], f"{ctx}: {r['launches']} launches"
        else:
            assert r["launches"] == 1, ctx


def test_whole_artifacts_match_onnxruntime(rng):
    """CUDA artifacts through ``bscompile.load`` on the emulated device: outputs within
    1e-5 + 1e-4 x the output's scale of onnxruntime; one init and one step launch
    per step and direction, each projection (linear site) launched once (sites with the same
    code share a kernel: counted by launches, not by names)."""
    seed = int(rng.integers(1 << 30))
    rep, _ = _worker("artifacts", seed)
    res = rep["results"]
    assert len({r["model"] for r in res}) == 7
    step = re.compile(r"^recurren(t|ce)_\w+_kernel_1$")
    init = re.compile(r"^recurren(t|ce)_\w+_kernel$")
    by_model = {}
    for r in res:
        ctx = f"{r['model']} ({r['order']} order, worker seed {seed})"
        assert r["error"] is None, f"{ctx}: {r['error']}"
        assert r["device"] == 2, f"{ctx}: ran on DLPack device {r['device']}, not CUDA"
        for name, err in r["max_abs_err"].items():
            assert err <= 1e-5 + 1e-4 * r["ref_scale"][name], f"{ctx}: {name} max abs err {err}"
        rec, launches = r["structure"], r["launches"]
        if rec:
            assert sum(bool(step.match(k)) for k in launches) == rec["layers_x_dirs"] * rec["seq"], ctx
            assert sum(bool(init.match(k)) for k in launches) == rec["layers_x_dirs"], ctx
        linear = [k for k in launches if k.startswith("linear_")]
        assert len(linear) == r["linear_sites"], f"{ctx}: {r['linear_sites']} projections, launches {linear}"
        by_model.setdefault(r["model"], []).append(launches)
    for model, seqs in by_model.items():
        assert all(s == seqs[0] for s in seqs), f"{model}: launch sequence depends on the thread order"


def test_symbolic_artifacts_match_onnxruntime(rng):
    """One CUDA artifact per model with a symbolic batch (and length) runs at batch 1, 3, 17
    and 64 and lengths 1 to 40 on the emulated device, within rtol 1e-4 / atol 1e-5 of
    onnxruntime (GRU with per-row sequence_lens, bidirectional LSTM, Linear stack,
    DeepSpeech-like conv + GRU); the batch picks a kernel variant per m bucket."""
    seed = int(rng.integers(2**31))
    results = _worker("symbolic", seed)[0]["results"]
    assert {r["model"] for r in results} == {"gru_lens", "lstm_bidir", "linear", "deepspeech"}
    for r in results:
        for out, err in r["max_abs_err"].items():
            assert err <= 1e-5 + 1e-4 * r["ref_scale"][out], (r["model"], r["batch"], r["length"], out, err, seed)
    # the symbolic time loop: one state init, then the same launches for every step
    gru = {(r["batch"], r["length"]): r["launches"] for r in results if r["model"] == "gru_lens"}
    n1, n40 = (sum(k.startswith("recurrent") for k in gru[bt]) for bt in ((1, 1), (17, 40)))
    assert n1 >= 2 and n40 - 1 == 40 * (n1 - 1), (n1, n40, seed)
    # different batches run different kernel variants (the buckets' launch configurations)
    lin = {r["batch"]: sorted(set(r["launches"])) for r in results if r["model"] == "linear"}
    assert lin[1] != lin[64], (lin, seed)


def _reported(result: dict) -> list[str]:
    """How a mutant was caught in each order: the emulator's error, or a wrong result (> 1e-3 / NaN)."""
    out = []
    for o in result["orders"]:
        if o["error"]:
            out.append(o["error"])
        elif o["nan"] or o["max_abs_err"] > 1e-3:
            out.append(f"wrong result (max abs err {o['max_abs_err']:.3g}{', NaN' if o['nan'] else ''})")
    return out


def test_injected_faults_are_reported(rng):
    """Each fault injected into generated CUDA source is reported in every thread/block order;
    the unmutated kernels pass in all of them."""
    seed = int(rng.integers(1 << 30))
    rep, _ = _worker("mutations", seed)
    res = rep["results"]
    for kernel in ("lin", "rec"):
        assert not _reported(res[f"control {kernel}"]), f"unmutated {kernel}: {res[f'control {kernel}']}"
    plain = [name for name, (_, _, mode) in W.MUTATIONS.items() if mode == ""]
    assert len(plain) >= 10
    for name in plain:
        assert res[name]["changed"], f"{name}: the mutation did not change the source"
        how = _reported(res[name])
        assert len(how) == len(res[name]["orders"]), f"{name} (worker seed {seed}) went unnoticed: {res[name]}"


def test_address_sanitizer_pass(rng):
    """ASan+UBSan builds of part of the sweep (all dynamic-selection cases) run clean; a dropped
    bounds guard is an ASan report."""
    _require_sanitizer("address")
    seed = int(rng.integers(1 << 30))
    rep, err = _worker("kernels-asan", seed, sanitize="address")
    assert len(rep["results"]) == len(W.SANITIZED_LINEAR) + len(W.SANITIZED_RECURRENT) + len(W.SANITIZED_DYNAMIC)
    for r in rep["results"]:
        assert r["error"] is None and max(r["max_rel_err"]) < 1e-4, f"{r} (worker seed {seed})"
    assert "runtime error" not in err and "AddressSanitizer" not in err
    p = _worker("mutation-asan", seed, "dropped bounds guard (last row store)", sanitize="address", expect_ok=False)
    assert p.returncode != 0 and "AddressSanitizer: heap-buffer-overflow" in p.stderr, p.stderr[-3000:]
    assert "in lin_kernel" in p.stderr


def test_thread_sanitizer_cross_block_races(rng):
    """TSan with every CUDA thread a fiber, ordered only by launches, barriers and shuffles: the
    recurrent step kernels (fused, unfused, split) have no race; a single-buffered h (blocks read
    h_t while others overwrite it) is reported as a data race. Two dynamic-selection cases: its
    selection block shares scores through shared memory and hands the scales to the tile
    product through global memory."""
    _require_sanitizer("thread")
    seed = int(rng.integers(1 << 30))
    rep, err = _worker("kernels-tsan", seed, sanitize="thread")
    assert len(rep["results"]) == len(W.TSAN_RECURRENT) + len(W.TSAN_DYNAMIC)
    for r in rep["results"]:
        assert r["error"] is None and max(r["max_rel_err"]) < 1e-4, f"{r} (worker seed {seed})"
    assert "ThreadSanitizer" not in err, err[-3000:]
    p = _worker("mutation-tsan", seed, "single-buffered recurrent state", sanitize="thread", expect_ok=False)
    assert p.returncode != 0 and "ThreadSanitizer: data race" in p.stderr, p.stderr[-3000:]
    assert "in rec_kernel_1" in p.stderr


def test_cli_run_emulate(tmp_path, rng):
    """``bscompile run ART --emulate --check MODEL``: ok on a CUDA artifact, one-line error on a CPU one."""
    import onnx

    from onnx_models import recurrent

    onnx.save(recurrent("GRU", 6, 8, 3, 2, 1, True, "4x4", rng), tmp_path / "g.onnx")

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "bscompile.cli", *map(str, args)], capture_output=True,
                              text=True, cwd=tmp_path)

    assert cli(tmp_path / "g.onnx", "--target", "cuda", "-o", tmp_path / "g.bsc", "-q").returncode == 0
    p = cli("run", tmp_path / "g.bsc", "--emulate", "random", "--random", "--check", tmp_path / "g.onnx")
    assert p.returncode == 0, p.stderr
    assert "ran without a fault" in p.stdout and p.stdout.count("(ok,") == 2, p.stdout
    assert cli(tmp_path / "g.onnx", "-o", tmp_path / "c.bsc", "-q").returncode == 0
    p = cli("run", tmp_path / "c.bsc", "--emulate", "--random")
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "runs CUDA artifacts" in p.stderr


def test_reference_is_not_vacuous(rng):
    """The NumPy recurrence reference disagrees with a perturbed state (so the sweep can fail)."""
    case = W.RecurrentCase("lstm", 8, (4, 4), 3, 2)
    _, args, ref = W.recurrent_func_and_args(case, rng)
    xp, h0, c0, lens, peep = args[0], args[-4], args[-3], args[-2], args[-1]
    rs = [np.ones((32, 8), np.float32)]
    a = W.recurrent_reference(case, xp, rs, [np.zeros(32, np.float32)], h0, c0, lens, peep)
    b = W.recurrent_reference(case, xp, rs, [np.zeros(32, np.float32)], h0 + 0.1, c0, lens, peep)
    assert np.abs(a[0] - b[0]).max() > 1e-3


def test_persistent_rnn_artifact_under_the_emulator(rng, tmp_path):
    """`--persistent-rnn`: the recurrence is one persistent launch for all steps (not one per
    step); the artifact, run by the emulator, equals onnxruntime."""
    import onnx
    from onnx_models import recurrent

    import bscompile
    from bscompile.target import with_persistent_rnn

    model = recurrent("GRU", 16, 64, 7, 2, 1, False, "8x8", rng)
    onnx.save(model, tmp_path / "gru.onnx")
    art = bscompile.compile(model, target=with_persistent_rnn("cuda"))
    assert [w["decision"]["schedule"]["persistent"] for w in art.manifest.weights] == [False, True]
    art.export(tmp_path / "gru.bsc")
    np.save(tmp_path / "x.npy", rng.standard_normal((7, 2, 16)).astype(np.float32))
    proc = subprocess.run([sys.executable, "-m", "bscompile.cli", "run", str(tmp_path / "gru.bsc"), "--emulate",
                           "--input", f"x={tmp_path / 'x.npy'}", "--check", str(tmp_path / "gru.onnx")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    launches = int(proc.stdout.split("cuda emulator: ")[1].split()[0])
    assert launches < 7, proc.stdout  # fewer launches than steps: the steps run inside one kernel
    assert proc.stdout.count("(ok, rtol 0.0001 atol 1e-05)") == 2, proc.stdout
