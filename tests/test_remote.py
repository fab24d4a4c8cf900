"""Tuning on the device: the aarch64 tuning server (runtime/deploy/rpc_server.cc) under
qemu-aarch64, reached over stdio, over TCP on an ephemeral 127.0.0.1 port, through TVM's
own RPC tracker with two emulated boards under one key, and over a stand-in for ssh.

Loopback only; every server is started with --idle-timeout / --max-sessions / a session
timeout so that it stops by itself. Timings under emulation mean nothing: these tests
check the plumbing (build, upload, check against NumPy on the device, time_evaluator,
failure handling), not which candidate wins.
"""

from __future__ import annotations

import random
import re
import subprocess
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import tvm
from onnx_models import assert_product_close, mlp, ort_run, recurrent
from test_aarch64 import _run, _unpack, emulator_env  # noqa: F401 - fixture: cross toolchain + qemu-user, or skip
from tvm.script import tirx as T

import bscompile
from bscompile.codegen import cpu
from bscompile.codegen.layout import BlockShape, BSRMatrix
from bscompile.errors import BscompileError
from bscompile.runtime.remote import (Job, LocalMeasurer, MeasureError, RemoteError, RemoteMeasurer, TimingConfig,
                                      server_command)

KEY = "bscompile-test-rpi4"
FAST = TimingConfig(repeat=2, min_repeat_ms=1, flush_cache=False, timeout=30)


def _linear_job(rng, block: str, n: int = 32, k: int = 64, m: int = 4) -> Job:
    """codegen.cpu.linear_kernel on a random block-sparse weight, checked against NumPy."""
    b = BlockShape.parse(block)
    w = rng.standard_normal((n, k)).astype(np.float32)
    keep = rng.random((n // b.r, k // b.c)) < 0.4
    w *= np.repeat(np.repeat(keep, b.r, 0), b.c, 1)
    mat = BSRMatrix.from_dense(w, b)
    x = rng.standard_normal((m, k)).astype(np.float32)
    bias = rng.standard_normal(mat.padded_shape[0]).astype(np.float32)
    args = [x, mat.data, mat.indices, mat.indptr, bias, np.zeros((m, n), np.float32)]

    def check(outs):
        assert_product_close(outs[-1], x, w, bias[:n])

    return Job(cpu.linear_kernel(mat, m, cpu.default_schedule(mat, m, 4)), args, check)


def _relax_job(job: Job) -> Job:
    """The same kernel inside a Relax function ``main(x) -> y`` with the weights as constants,
    like the tuner's one-site modules: timed through the VM, checked on its output."""
    from tvm import relax

    x, *weights, out = job.args
    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType(x.shape, "float32"))
    with bb.function("main", [xv]):
        gv = bb.add_func(job.lib, "kernel")
        y = bb.emit(relax.call_tir(gv, [xv, *map(relax.const, weights)], relax.TensorType(out.shape, "float32")))
        bb.emit_func_output(y)
    return Job(bb.get(), [x], lambda outs: job.check([*job.args[:-1], outs[0]]))


@T.prim_func
def _crash(a: T.Buffer((4,), "float32")):
    T.func_attr({"global_symbol": "crash"})
    T.evaluate(T.call_extern("int32", "abort"))


@T.prim_func
def _hang(a: T.Buffer((4,), "float32")):
    T.func_attr({"global_symbol": "hang"})
    while a[0] >= T.float32(0):
        a[1] = a[1] + T.float32(1)


def _start_server(args: list[str], log: Path) -> tuple[subprocess.Popen, int]:
    """A TCP tuning server under qemu; returns it and the port it printed."""
    proc = subprocess.Popen([*server_command("aarch64"), *args], stdout=subprocess.PIPE, stderr=open(log, "w"),
                            text=True)
    line = proc.stdout.readline()
    m = re.fullmatch(r"bscompile-rpc-server listening on 127\.0\.0\.1:(\d+)\n", line)
    assert m, f"unexpected first line {line!r}; log: {log.read_text()}"
    return proc, int(m.group(1))


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
    proc.wait(timeout=30)


def test_emulator_stdio_measures_checks_and_survives_a_crash(rng, tmp_path, emulator_env):  # noqa: F811
    with RemoteMeasurer.connect("emulator", "rpi4", config=FAST) as m:
        dev = m.device
        assert dev["remote"] == "emulator" and dev["emulated"] is True
        info = dev["info"][0]
        assert info["arch"] == "aarch64" and info["tvm"] == tvm.__version__ and info["threads"] >= 1
        assert info["cache_flush"] is True and info["cpu_model"]

        job = _linear_job(rng, "4x4")
        assert m.time(job.lib, job.args, job.check) > 0
        vm_job = _relax_job(job)
        assert m.time(vm_job.lib, vm_job.args, vm_job.check) > 0
        with pytest.raises(MeasureError, match="wrong result"):
            m.time(vm_job.lib, vm_job.args, lambda outs: np.testing.assert_array_equal(outs[0], 0))
        # A wrong answer on the device fails the candidate (the check runs here on the device's output).
        with pytest.raises(MeasureError, match="wrong result"):
            m.time(job.lib, job.args, lambda outs: np.testing.assert_array_equal(outs[-1], 0))
        # A crash ends the server process; the next candidate gets a fresh one.
        results = m.time_many([Job(_crash, [np.zeros(4, np.float32)]), _linear_job(rng, "8x4")])
        assert isinstance(results[0], MeasureError) and "failed on the device" in str(results[0])
        assert isinstance(results[1], float) and results[1] > 0
        assert len(m.device["info"]) == 1  # a new server process after the crash, the same board

        # A whole compiled model (Relax VM) on the device, its outputs checked against onnxruntime.
        model = mlp([64, 32, 16], 4, ["4x4", "4x4"], rng)[0]
        bsc = bscompile.compile(model, target="rpi4").export(tmp_path / "mlp.bsc")
        feeds = {"x": rng.standard_normal((4, 64)).astype(np.float32)}
        want = list(ort_run(model, feeds).values())

        def same(outs):
            assert len(outs) == len(want)
            for got, ref in zip(outs, want):
                np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)

        assert m.time_artifact(bsc, feeds, same) > 0
        # ... and its deploy bundle can ship the tuning server
        from bscompile.runtime.package import package_artifact

        files = package_artifact(bsc, tmp_path / "mlp.tar.gz", with_tuning_server=True)["files"]
        assert {"run", "tuning-server", "bin/bscompile-rpc-server", "module.so"} <= set(files)
        with pytest.raises(MeasureError, match="wrong result"):
            m.time_artifact(bsc, feeds, lambda outs: np.testing.assert_allclose(outs[0], want[0] + 1))


def test_tcp_server_on_ephemeral_port(rng, tmp_path, emulator_env):  # noqa: F811
    log, work = tmp_path / "server.log", tmp_path / "work"
    work.mkdir()
    proc, port = _start_server(["--port", "0", "--idle-timeout", "60", "--max-sessions", "10", "--work-dir",
                                str(work)], log)
    try:
        cfg = TimingConfig(repeat=2, min_repeat_ms=1, timeout=3, flush_cache=True)
        with RemoteMeasurer.connect(f"tcp://127.0.0.1:{port}", "rpi4", config=cfg) as m:
            jobs = [_linear_job(rng, "4x4"), Job(_crash, [np.zeros(4, np.float32)]),
                    Job(_hang, [np.ones(4, np.float32)]), _linear_job(rng, "1x4"), _relax_job(_linear_job(rng, "4x8"))]
            t0 = time.monotonic()
            results = m.time_many(jobs)
            assert all(isinstance(results[i], float) for i in (0, 3, 4)), results
            assert all(isinstance(r, MeasureError) for r in results[1:3]), results
            assert time.monotonic() - t0 < 90  # the hang was cut by the device's watchdog, not by us
        text = log.read_text()
        assert "signal 6" in text and "watchdog" in text, text  # abort(), then SIGALRM
        assert proc.poll() is None  # the server outlives its sessions
        with pytest.raises(RemoteError, match="x86_64"):  # an aarch64 board for a host target
            RemoteMeasurer.connect(f"tcp://127.0.0.1:{port}", "llvm")
        # Stopped during a session, the server takes the session and its folder with it.
        with RemoteMeasurer.connect(f"tcp://127.0.0.1:{port}", "rpi4", config=cfg):
            assert len(list(work.iterdir())) == 1
            proc.terminate()
            assert proc.wait(timeout=30) == 0
        assert list(work.iterdir()) == [] and "stopped by a signal" in log.read_text()
    finally:
        _stop(proc)


def test_tracker_two_boards_one_key_in_parallel(rng, tmp_path, emulator_env):  # noqa: F811
    pytest.importorskip("tornado", reason="TVM's RPC tracker needs apache-tvm[rpc] (tornado)")
    from tvm.rpc.tracker import Tracker

    base = random.randint(20000, 60000)  # TVM's tracker scans a port range; avoid other users' trackers
    tracker = Tracker("127.0.0.1", port=base, port_end=base + 200, silent=True)
    servers = []
    try:
        for i in range(2):
            servers.append(_start_server(["--tracker", f"127.0.0.1:{tracker.port}", "--key", KEY, "--idle-timeout",
                                          "90", "--max-sessions", "10"], tmp_path / f"board{i}.log"))
        url = f"tracker://127.0.0.1:{tracker.port}/{KEY}"
        for _ in range(100):  # both boards registered
            try:
                m = RemoteMeasurer.connect(url, "rpi4", config=FAST)
            except RemoteError:
                time.sleep(0.2)
                continue
            if m.parallel == 2:
                break
            m.close()
            time.sleep(0.2)
        with m:
            assert m.parallel == 2
            results = m.time_many([_linear_job(rng, b) for b in ("4x4", "8x4", "4x8", "1x4")])
            assert all(isinstance(r, float) and r > 0 for r in results), results
            assert len({i["server_pid"] for i in m.device["info"]}) == 2  # both boards measured
            assert m.device["key"] == KEY and m.device["emulated"] is True
        for i in range(2):  # both boards served sessions
            assert "session from 127.0.0.1" in (tmp_path / f"board{i}.log").read_text()
        with pytest.raises(RemoteError, match="no device is registered under key 'nobody'"):
            RemoteMeasurer.connect(f"tracker://127.0.0.1:{tracker.port}/nobody", "rpi4")
    finally:
        for proc, _ in servers:
            _stop(proc)
        tracker.terminate()


def test_ssh_path_runs_the_packaged_server(rng, tmp_path, emulator_env, monkeypatch):  # noqa: F811
    """`--remote ssh://...` against the server-only bundle; a stand-in `ssh` runs the remote
    command in a "login folder" on this machine, under the emulator."""
    from bscompile.cli import main
    from bscompile.runtime.package import TUNING_SERVER_NAME

    assert main(["package", "-o", str(tmp_path / "none.tar.gz")]) == 2  # neither an artifact nor --tuning-server
    assert main(["package", "--tuning-server", "-o", str(tmp_path / "server.tar.gz")]) == 0
    home = tmp_path / "board-home"
    home.mkdir()
    with tarfile.open(tmp_path / "server.tar.gz") as tar:
        assert sorted(tar.getnames()) == sorted([TUNING_SERVER_NAME, *(f"{TUNING_SERVER_NAME}/{f}" for f in (
            "bin", "lib", "tuning-server", "bin/bscompile-rpc-server", "lib/libtvm_ffi.so",
            "lib/libtvm_runtime.so"))]), tar.getnames()
        tar.extractall(home, filter="data")
    fake_ssh = tmp_path / "ssh"
    fake_ssh.write_text('#!/bin/sh\n# ssh [-T] [-o OPT] [-p PORT] HOST COMMAND: run COMMAND in the "login folder"\n'
                        'while [ $# -gt 1 ]; do case "$1" in -T) shift ;; -o|-p) shift 2 ;; *) shift; break ;; esac; '
                        f'done\ncd "{home}" && exec sh -c "$1"\n')
    fake_ssh.chmod(0o755)
    monkeypatch.setenv("BSCOMPILE_SSH", str(fake_ssh))
    monkeypatch.setenv("BSCOMPILE_EMULATOR", emulator_env["BSCOMPILE_EMULATOR"])
    with RemoteMeasurer.connect("ssh://pi@board", "rpi4", config=FAST) as m:
        job = _linear_job(rng, "4x4")
        assert m.time(job.lib, job.args, job.check) > 0
        assert m.device["remote"] == "ssh://pi@board" and m.device["info"][0]["arch"] == "aarch64"
    with pytest.raises(RemoteError, match="cannot open a session"):
        RemoteMeasurer.connect(f"ssh://pi@board/~/{TUNING_SERVER_NAME}/missing", "rpi4", config=FAST)


def test_local_measurer_and_bad_remotes(rng, tmp_path):
    job = _linear_job(rng, "4x4")
    m = LocalMeasurer("llvm", config=FAST)
    try:
        assert m.time(job.lib, job.args, job.check) > 0
        with pytest.raises(MeasureError, match="wrong result"):
            m.time(job.lib, job.args, lambda outs: False)
        vm_job = _relax_job(job)
        assert m.time(vm_job.lib, vm_job.args, vm_job.check) > 0
        model = mlp([32, 16], 2, ["4x4"], rng)[0]
        bsc = bscompile.compile(model).export(tmp_path / "host.bsc")
        x = rng.standard_normal((2, 32)).astype(np.float32)
        want = ort_run(model, {"x": x})["y"]
        assert m.time_artifact(bsc, [x], lambda outs: np.testing.assert_allclose(outs[0], want, 1e-4, 1e-5)) > 0
    finally:
        m.close()
    with pytest.raises(Exception, match="does not run on this machine"):
        LocalMeasurer("rpi4")
    for url, msg in [("bogus://x", "is not ssh://"), ("tcp://127.0.0.1", "is not ssh://"),
                     ("tracker://127.0.0.1:1/k", "tracker 127.0.0.1:1"),
                     ("tcp://127.0.0.1:1", "cannot open a session with tcp://127.0.0.1:1"),
                     ("tcp://127.0.0.1:99999", "port 99999 is outside 1-65535")]:  # (was taken modulo 2^16)
        with pytest.raises(RemoteError, match=re.escape(msg)):
            RemoteMeasurer.connect(url, "rpi4")


def test_tune_on_the_emulated_board(rng, tmp_path, emulator_env, caplog):  # noqa: F811
    """`bscompile tune --remote emulator`'s path on a block-pruned GRU: records name the
    emulated device (the recurrent site timed through its recurrent kernel there), compiling
    with them warns that they were emulated, and the tuned rpi4 artifact, run on that device
    and as the packaged bundle a user copies to the board (under qemu), equals onnxruntime."""
    from bscompile.records import load_records
    from bscompile.runtime.package import package_artifact
    from bscompile.tune import check_on_device, save_records, tune_model

    model = recurrent("GRU", 8, 16, 3, 2, 1, False, "4x4", rng)
    lines: list[str] = []
    records = tune_model(model, {"target": "rpi4", "sparse": True}, lines.append, top_k=1, remote="emulator")
    assert sorted(r.kind for r in records) == ["linear", "recurrent"]
    for rec in records:
        assert rec.target == "rpi4" and rec.device["remote"] == "emulator" and rec.device["emulated"] is True
        assert rec.device["info"][0]["arch"] == "aarch64"
        assert all(c["time_us"] > 0 for c in rec.candidates), rec.candidates  # every candidate checked and timed
        n = len(rec.candidates)
        assert any(f"measured {n}/{n} candidates" in ln for ln in lines), lines
    save_records(tmp_path / "t.json", records)
    with pytest.raises(BscompileError, match="measured for target rpi4; this compile targets llvm"):
        bscompile.compile(model, target="llvm", records=str(tmp_path / "t.json"))
    saved = load_records(tmp_path / "t.json")  # what `bscompile compile --records` reads
    assert saved and all(r.device["emulated"] is True and r.device["remote"] == "emulator" for r in saved.values())
    caplog.clear()
    art = bscompile.compile(model, target="rpi4", records=str(tmp_path / "t.json"))
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "measured on an emulated device" in warned[0] and "\n" not in warned[0], warned
    assert all(w["decision"]["reason"].startswith("tuned") for w in art.manifest.weights), art.manifest.weights
    bsc = art.export(tmp_path / "tuned.bsc")
    x = rng.standard_normal((3, 2, 8)).astype(np.float32)
    want = ort_run(model, {"x": x})["y"]
    with RemoteMeasurer.connect("emulator", "rpi4", config=FAST) as m:
        assert m.time_artifact(bsc, {"x": x}, lambda outs: np.testing.assert_allclose(outs[0], want, 1e-4, 1e-5)) > 0
    # the whole-model check `bscompile tune --remote` ends with: tuned vs untuned, on the device
    line = check_on_device(str(bsc), model, {"target": "rpi4", "sparse": True}, "emulator")
    assert "same outputs" in line and "emulated" in line, line
    # the last step on a board: package the tuned artifact, copy, unpack, run (here: under qemu)
    report = package_artifact(bsc, tmp_path / "tuned-aarch64.tar.gz")
    _unpack(Path(report["bundle"]), tmp_path / "board")
    np.save(tmp_path / "x.npy", x)
    proc = _run(tmp_path / "board" / "tuned", ["--input", f"x={tmp_path / 'x.npy'}", "--output", str(tmp_path / "out")],
                emulator_env)
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_allclose(np.load(tmp_path / "out" / "y.npy"), want, rtol=1e-4, atol=1e-5)


def test_whole_model_check_on_the_device_with_symbolic_dims(rng, tmp_path, emulator_env):  # noqa: F811
    """`bscompile tune --remote`'s last step on a model exported with dynamic axes: the random
    inputs take size 1 for the symbolic batch and length (it raised a TypeError on the
    dims' names after tuning had finished)."""
    from bscompile.tune import check_on_device

    model = recurrent("GRU", 8, 16, "seq", "batch", 1, False, "4x4", rng)
    bsc = bscompile.compile(model, target="rpi4").export(tmp_path / "g.bsc")
    line = check_on_device(str(bsc), model, {"target": "rpi4", "sparse": True}, "emulator")
    assert "same outputs" in line, line
