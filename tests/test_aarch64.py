"""Ship to the edge: compile for aarch64 (NEON), package a Python-free bundle, run the
bundle's own `run` under qemu-aarch64 and compare with onnxruntime on x86.

Needs Debian's g++-aarch64-linux-gnu and qemu-user (CI: .ci/install-cross.sh); the
first run downloads the aarch64 TVM wheels and builds the runner into the cache
(runtime/deploy_libs.py), later runs reuse it. Timings under emulation mean nothing
and are not measured here.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
from onnx_models import gru_with_lens, mlp, ort_run, recurrent

import bscompile
from bscompile.errors import ArtifactError
from bscompile.runtime.deploy_libs import ARCHES

REPO = Path(__file__).resolve().parents[1]
TOOLS = ARCHES["aarch64"]
RTOL, ATOL = 1e-4, 1e-5


def _missing_tools() -> list[str]:
    return [t for t in (TOOLS.cxx, TOOLS.objdump, "qemu-aarch64") if not shutil.which(t)]


@pytest.fixture(scope="session")
def emulator_env():
    """The environment that makes a bundle's `run` start its runner under qemu-aarch64."""
    if _missing_tools():
        proc = subprocess.run(["bash", str(REPO / ".ci" / "install-cross.sh")], capture_output=True, text=True)
        if _missing_tools():
            why = (proc.stderr or proc.stdout).strip().splitlines()
            pytest.skip(f"aarch64 cross toolchain / qemu-user not installable ({why[-1] if why else 'unknown'}): "
                        f"missing {', '.join(_missing_tools())}; CI installs them with .ci/install-cross.sh")
    if not Path("/usr/aarch64-linux-gnu/lib").is_dir():
        pytest.skip("no aarch64 sysroot at /usr/aarch64-linux-gnu (Debian's libc6-arm64-cross)")
    return dict(os.environ, BSCOMPILE_EMULATOR=TOOLS.emulator)


def _unpack(bundle: Path, dest: Path) -> None:
    with tarfile.open(bundle) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, filter="data")
        else:  # pragma: no cover - Python < 3.11.4
            tar.extractall(dest)


def _run(bundle_dir: Path, args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([str(bundle_dir / "run"), *args], env=env, capture_output=True, text=True, timeout=300)


def _fmla_per_kernel(so: Path) -> dict[str, int]:
    """NEON fp32 vector FMAs (`fmla vN.4s, ...`) in each block-sparse kernel of the module."""
    asm = subprocess.run([TOOLS.objdump, "-d", "--no-show-raw-insn", str(so)], capture_output=True, text=True,
                         check=True).stdout
    counts: dict[str, int] = {}
    kernel = None
    for line in asm.splitlines():
        m = re.match(r"^[0-9a-f]+ <([^>]+)>:$", line)
        if m:
            name = m.group(1).removeprefix("__tvm_ffi_").removesuffix("_compute_")
            kernel = name if "bsr" in name else None
            if kernel:
                counts.setdefault(kernel, 0)
        elif kernel and re.search(r"\bfmla\s+v\d+\.4s", line):
            counts[kernel] += 1
    return counts


CASES = {
    # a small block-pruned 2-layer GRU, and a block-sparse MLP with two block shapes
    "gru": lambda rng: recurrent("GRU", 16, 32, 5, 2, 2, False, "4x4", rng),
    # batch 1, ~75k multiply-adds a step: a persistent recurrence (one pool launch, barriers),
    # its gate update with a tail past the last full vector
    "gru_persistent": lambda rng: recurrent("GRU", 16, 500, 5, 1, 1, False, "4x4", rng),
    "mlp": lambda rng: mlp([64, 128, 32], 4, ["4x4", "8x8"], rng)[0],
    # batch 1, 2x8 blocks (shorter than a NEON vector): the mat-vec as straight-line code for
    # the weight's pattern ("unrolled"), its 16-lane vectors split into NEON registers
    "lstm_unrolled": lambda rng: recurrent("LSTM", 16, 48, 7, 1, 1, True, "2x8", rng),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_aarch64_bundle_matches_onnxruntime(case, rng, tmp_path, emulator_env):
    from bscompile.runtime.package import format_report, package_artifact

    model = CASES[case](rng)
    art = bscompile.compile(model, target="aarch64")
    assert art.manifest.arch == "aarch64" and art.spec.cross_compiler == TOOLS.cxx
    bsc = art.export(tmp_path / f"{case}.bsc")  # cross-links with aarch64-linux-gnu-g++

    report = package_artifact(bsc, tmp_path / f"{case}-aarch64.tar.gz")
    print(f"\n{format_report(report)}")  # the bundle's size, reported
    # Nothing but the model, the runner and the TVM runtime libraries.
    assert set(report["files"]) == {"run", "bin/bscompile-runner", "lib/libtvm_ffi.so", "lib/libtvm_runtime.so",
                                    "module.so", "manifest.json"}
    assert report["unpacked_bytes"] == (report["model_bytes"] + report["runtime_libraries_bytes"]
                                        + report["runner_bytes"])
    assert report["runner_bytes"] < 1 << 20 and report["bundle_bytes"] < 8 << 20
    assert "cuda" not in report["requires"]

    _unpack(Path(report["bundle"]), tmp_path / "device")
    bundle = tmp_path / "device" / case
    assert sorted(p.name for p in bundle.iterdir()) == ["bin", "lib", "manifest.json", "module.so", "run"]

    # The shipped module's sparse kernels are NEON vector FMA code, not scalar code.
    fmla = _fmla_per_kernel(bundle / "module.so")
    assert fmla, "no block-sparse kernels found in the module's disassembly"
    assert all(n > 0 for n in fmla.values()), f"kernels without NEON `fmla v*.4s` (scalar code?): {fmla}"

    # Run the very bundle a user ships, under qemu-aarch64, on fresh random inputs.
    feeds = {s.name: rng.standard_normal(s.shape).astype(s.dtype) for s in art.manifest.inputs}
    args = []
    for name, value in feeds.items():
        np.save(tmp_path / f"in_{name}.npy", value)
        args += ["--input", f"{name}={tmp_path / f'in_{name}.npy'}"]
    # Two pool threads, whatever the host: the persistent case's barriers need a second thread.
    proc = _run(bundle, [*args, "--output", str(tmp_path / "out")], {**emulator_env, "TVM_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stderr
    expected = ort_run(model, feeds)
    assert [s.name for s in art.manifest.outputs] == list(expected)
    for name, want in expected.items():
        got = np.load(tmp_path / "out" / f"{name}.npy")
        assert got.shape == want.shape and got.dtype == want.dtype, name
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL, err_msg=f"{case} output {name}")


def test_bundle_runner_checks_inputs(rng, tmp_path, emulator_env):
    """A tuned CPU model (--cpu cortex-a76), board presets, and the runner's one-line errors."""
    from bscompile.runtime.package import package_artifact
    from bscompile.target import resolve_target

    for preset, cpu in (("rpi4", "cortex-a72"), ("cortex-a76", "cortex-a76"), ("graviton2", "neoverse-n1")):
        spec = resolve_target(preset)
        assert spec.arch == "aarch64" and spec.target["mcpu"] == cpu and spec.cross_compiler == TOOLS.cxx
    model = mlp([64, 32], 4, ["4x4"], rng)[0]
    bsc = bscompile.compile(model, target="aarch64", cpu="cortex-a76").export(tmp_path / "m.bsc")
    report = package_artifact(bsc, tmp_path / "m.tar.gz", name="edge")
    _unpack(Path(report["bundle"]), tmp_path)
    bundle = tmp_path / "edge"
    assert '"mcpu": "cortex-a76"' in (bundle / "manifest.json").read_text()

    info = _run(bundle, ["--help"], emulator_env)
    assert info.returncode == 0 and "usage: run" in info.stdout and "x[4, 64]:float32" in info.stdout

    x = rng.standard_normal((4, 64)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "short.npy", x[:, :63])
    np.save(tmp_path / "f64.npy", x.astype(np.float64))
    np.save(tmp_path / "nan.npy", np.where(x > 1, np.nan, x).astype(np.float32))
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    out = str(tmp_path / "out")
    for args, rc, message in [
        (["--input", f"x={tmp_path / 'short.npy'}", "--output", out], 1, "has shape [4, 63], expected [4, 64]"),
        (["--input", f"x={tmp_path / 'f64.npy'}", "--output", out], 1, "has dtype float64, expected float32"),
        (["--input", f"x={tmp_path / 'nan.npy'}", "--output", out], 1, "inputs must be finite"),
        (["--input", f"z={tmp_path / 'x.npy'}", "--output", out], 1, "unknown 'z'; missing 'x'"),
        (["--input", f"x={tmp_path / 'junk.npy'}", "--output", out], 1, "not a .npy file"),
        (["--input", f"x={tmp_path / 'nope.npy'}", "--output", out], 1, "cannot open"),
        (["--input", f"x={tmp_path / 'x.npy'}"], 2, "missing --output"),
        (["--frobnicate"], 2, "unknown argument"),
    ]:
        proc = _run(bundle, args, emulator_env)
        assert proc.returncode == rc, (args, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (args, proc.stderr)

    # A one-input model also takes a bare file; the output matches the artifact's own numerics.
    proc = _run(bundle, ["--input", str(tmp_path / "x.npy"), "--output", out], emulator_env)
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_allclose(np.load(Path(out) / "y.npy"), ort_run(model, {"x": x})["y"], rtol=RTOL, atol=ATOL)


def test_bundle_runner_rejects_out_of_range_token_ids(rng, tmp_path, emulator_env):
    """An embedding lookup (ONNX Gather) with an id >= the vocabulary: one line, exit 2, no output written."""
    from onnx import TensorProto, helper, numpy_helper

    from bscompile.runtime.package import package_artifact

    table = rng.standard_normal((103, 8)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "tokens"], ["y"], name="Gather_3")], "embed",
        [helper.make_tensor_value_info("tokens", TensorProto.INT64, [1, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 8])], [numpy_helper.from_array(table, "table")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    bsc = bscompile.compile(model, target="aarch64").export(tmp_path / "embed.bsc")
    _unpack(Path(package_artifact(bsc, tmp_path / "embed.tar.gz")["bundle"]), tmp_path)
    bundle = tmp_path / "embed"
    ids = np.array([[0, 5, -103, 102, -1, 7]], np.int64)
    np.save(tmp_path / "ok.npy", ids)
    proc = _run(bundle, ["--input", f"tokens={tmp_path / 'ok.npy'}", "--output", str(tmp_path / "ok")], emulator_env)
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "ok" / "y.npy"), ort_run(model, {"tokens": ids})["y"])
    for bad in (10**9, -104):
        ids[0, 3] = bad
        np.save(tmp_path / "bad.npy", ids)
        out = tmp_path / f"bad{bad}"
        proc = _run(bundle, ["--input", f"tokens={tmp_path / 'bad.npy'}", "--output", str(out)], emulator_env)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().splitlines() == [
            f"error: input 'tokens' holds index {bad} outside [-103, 103) at node Gather_3"], proc.stderr
        assert not out.exists() or not any(out.iterdir())


def _fake_artifact(path: Path, arch: str, device: str) -> Path:
    import tvm

    from bscompile.sites import TensorSpec
    from bscompile.runtime.artifact import Manifest, write_artifact

    lib = path.with_suffix(".so")
    lib.write_bytes(b"\x7fELF not really")
    manifest = Manifest(bscompile_version="0", tvm_version=tvm.__version__, target_name=arch, target={},
                        device=device, arch=arch, inputs=[TensorSpec("x", (1,), "float32")],
                        outputs=[TensorSpec("y", (1,), "float32")], weights=[])
    write_artifact(path, manifest, lib)
    return path


def test_package_errors_are_one_line(tmp_path):
    from bscompile.runtime.package import PackageError, package_artifact

    with pytest.raises(PackageError, match=r"compiled for x86_64 .*--target aarch64") as err:
        package_artifact(_fake_artifact(tmp_path / "host.bsc", "x86_64", "cpu"), tmp_path / "b.tar.gz")
    assert "\n" not in str(err.value)
    with pytest.raises(ArtifactError, match="no such artifact"):
        package_artifact(tmp_path / "missing.bsc", tmp_path / "b.tar.gz")
    with pytest.raises(PackageError, match="bundle name"):
        package_artifact(_fake_artifact(tmp_path / "a.bsc", "aarch64", "cpu"), tmp_path / "b.tar.gz", name="../x")
    assert not (tmp_path / "b.tar.gz").exists()


def test_cuda_bundle_ships_the_cuda_runtime(tmp_path, emulator_env):
    """Design for jetson-orin style targets: a manifest with device "cuda" gets the CUDA
    runtime library, and the runner creates the VM on kDLCUDA (not run: no GPU here)."""
    from bscompile.runtime.package import package_artifact

    report = package_artifact(_fake_artifact(tmp_path / "orin.bsc", "aarch64", "cuda"), tmp_path / "orin.tar.gz")
    assert report["device"] == "cuda" and "lib/libtvm_runtime_cuda.so" in report["files"]
    assert any(lib.startswith("libcudart.so") for lib in report["requires"]["cuda"])  # what the board needs
    with tarfile.open(report["bundle"]) as tar:
        manifest = tar.extractfile("orin/manifest.json").read().decode()
    assert '"device": "cuda"' in manifest


@pytest.mark.parametrize("parallel", [False, True])
def test_aarch64_bundle_runs_a_dynamic_site(rng, tmp_path, emulator_env, monkeypatch, parallel):
    """Input-dependent block selection on the board: the packaged dynamic site under qemu
    equals onnxruntime on inputs with a clear selection margin. ``parallel``: the layer is
    small enough for one thread; with the threshold at 0 it takes the two-thread schedule
    (threads claiming gate groups and output blocks, a barrier between) on a weakly ordered core."""
    import onnx
    from test_dynamic import IN, _export, _model, _ort, clear_margin_inputs

    from bscompile.codegen import cpu_dynamic
    from bscompile.runtime.package import package_artifact

    if parallel:
        monkeypatch.setattr(cpu_dynamic, "PARALLEL_MIN_WORK", 0)

    m = _model(rng, 0.25, True)
    model_bytes = _export(m, dynamo=False)
    art = bscompile.compile(onnx.load_from_string(model_bytes), target="aarch64", input_shapes={"x": (3, IN)})
    assert [w["kind"] for w in art.manifest.weights] == ["dynamic_linear"]
    assert art.manifest.weights[0]["decision"]["schedule"]["claim"] == parallel
    report = package_artifact(art.export(tmp_path / "dyn.bsc"), tmp_path / "dyn-aarch64.tar.gz")
    _unpack(Path(report["bundle"]), tmp_path / "device")
    x = clear_margin_inputs(m, rng, 3)
    np.save(tmp_path / "x.npy", x)
    proc = _run(tmp_path / "device" / "dyn", ["--input", f"x={tmp_path / 'x.npy'}", "--output", str(tmp_path / "out")],
                emulator_env)
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_allclose(np.load(tmp_path / "out" / "y.npy"), _ort(model_bytes, x), rtol=RTOL, atol=ATOL)


def test_aarch64_bundle_runs_symbolic_shapes(rng, tmp_path, emulator_env):
    """One bundle of a GRU with symbolic time and batch (and sequence_lens per row) runs at two
    shapes under qemu-aarch64 against onnxruntime; inconsistent batches are one clear error."""
    from bscompile.runtime.package import package_artifact

    model = gru_with_lens(rng, hidden=16, inp=8)
    bsc = bscompile.compile(model, target="aarch64").export(tmp_path / "gru.bsc")
    report = package_artifact(bsc, tmp_path / "gru-aarch64.tar.gz")
    _unpack(Path(report["bundle"]), tmp_path / "device")
    bundle = tmp_path / "device" / "gru"
    for t, b in ((1, 1), (7, 3)):
        feeds = {"x": rng.standard_normal((t, b, 8)).astype(np.float32),
                 "lens": rng.integers(1, t + 1, b).astype(np.int32)}
        args = []
        for name, value in feeds.items():
            np.save(tmp_path / f"{name}.npy", value)
            args += ["--input", f"{name}={tmp_path / f'{name}.npy'}"]
        proc = _run(bundle, [*args, "--output", str(tmp_path / f"out{t}")], emulator_env)
        assert proc.returncode == 0, proc.stderr
        for name, want in ort_run(model, feeds).items():
            np.testing.assert_allclose(np.load(tmp_path / f"out{t}" / f"{name}.npy"), want, rtol=RTOL, atol=ATOL,
                                       err_msg=f"{name} at time {t} batch {b}")
    np.save(tmp_path / "lens.npy", np.ones(2, np.int32))  # batch 2 against x's batch 3
    proc = _run(bundle, [*args, "--output", str(tmp_path / "bad")], emulator_env)
    assert proc.returncode != 0 and "input 'lens'" in proc.stderr and "expected [batch]" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_aarch64_bundle_runs_a_symbolic_scan_loop(rng, tmp_path, emulator_env):
    """A custom cell (MGU) as an ONNX Scan over a symbolic time axis: the loop, one kernel
    (FuseLoopKernels), runs in the Python-free runner under qemu-aarch64 at 1, 7 and 600 steps
    against onnxruntime."""
    from test_loops import B, H, IN, _mgu_scan

    from bscompile.runtime.package import package_artifact

    model = _mgu_scan(rng, 0, 0)
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "time"
    model.graph.output[1].type.tensor_type.shape.dim[0].dim_param = "time"
    report = package_artifact(bscompile.compile(model, target="aarch64").export(tmp_path / "mgu.bsc"),
                              tmp_path / "mgu-aarch64.tar.gz")
    _unpack(Path(report["bundle"]), tmp_path / "device")
    for t in (1, 7, 600):
        feeds = {"x": rng.standard_normal((B, t, IN)).astype(np.float32),
                 "h0": rng.standard_normal((B, H)).astype(np.float32)}
        args = []
        for name, value in feeds.items():
            np.save(tmp_path / f"{name}.npy", value)
            args += ["--input", f"{name}={tmp_path / f'{name}.npy'}"]
        proc = _run(tmp_path / "device" / "mgu", [*args, "--output", str(tmp_path / f"out{t}")], emulator_env)
        assert proc.returncode == 0, proc.stderr
        for name, want in ort_run(model, feeds).items():
            np.testing.assert_allclose(np.load(tmp_path / f"out{t}" / f"{name}.npy"), want, rtol=RTOL, atol=ATOL,
                                       err_msg=f"{name} at {t} steps")


@pytest.mark.parametrize("parallel", [False, True])
def test_aarch64_bundle_runs_a_fused_gated_recurrence(rng, tmp_path, emulator_env, monkeypatch, parallel):
    """A gated LSTM layer exported with its time loop as an ONNX Scan compiles to one
    dynamic_recurrent kernel; the bundle runs it under qemu-aarch64 at 1 and 7 steps against
    onnxruntime. ``parallel``: with the two-chunk threshold at 0, the whole loop is one launch
    of two pool threads meeting at barriers, on a weakly ordered core."""
    import onnx
    import onnxruntime as ort
    import test_dynamic_rnn as t

    from bscompile.codegen import cpu_dynamic_recurrent
    from bscompile.runtime.package import package_artifact

    if parallel:
        monkeypatch.setattr(cpu_dynamic_recurrent, "PERSISTENT_MIN_WORK", 0)
    m = t._model(rng, "lstm", keep=0.5, time_loop="scan")
    all_feeds = t.clear_margin_feed_set(m, rng, (1, 7))
    model_bytes = t._export(m, "dynamo", 2)
    art = bscompile.compile(onnx.load_from_string(model_bytes), target="aarch64")
    (rec,) = [w for w in art.manifest.weights if w["kind"] == "dynamic_recurrent"]
    assert rec["decision"]["schedule"]["chunks"] == (2 if parallel else 1)
    report = package_artifact(art.export(tmp_path / "lstm.bsc"), tmp_path / "lstm-aarch64.tar.gz")
    _unpack(Path(report["bundle"]), tmp_path / "device")
    sess = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    for feeds in all_feeds:
        args = []
        for name, value in feeds.items():
            np.save(tmp_path / f"{name}.npy", value)
            args += ["--input", f"{name}={tmp_path / f'{name}.npy'}"]
        out = tmp_path / f"out{len(feeds['x'])}"
        proc = _run(tmp_path / "device" / "lstm", [*args, "--output", str(out)],
                    {**emulator_env, "TVM_NUM_THREADS": "2"})
        assert proc.returncode == 0, proc.stderr
        for o, want in zip(sess.get_outputs(), sess.run(None, feeds)):
            np.testing.assert_allclose(np.load(out / f"{o.name}.npy"), want, rtol=RTOL, atol=ATOL,
                                       err_msg=f"{o.name} at {len(feeds['x'])} steps")


def test_a_missing_cross_compiler_is_one_line_and_writes_nothing(rng, tmp_path, monkeypatch):
    """Exporting for aarch64 without its cross compiler on PATH says which compiler and how to
    install it, before anything is written (it used to surface as the linker's file-not-found)."""
    from bscompile.errors import BscompileError

    art = bscompile.compile(mlp([64, 32], 1, ["4x4"], rng)[0], target="aarch64")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BscompileError, match=r"^the aarch64 target links with aarch64-linux-gnu-g\+\+, which is not on PATH"):
        art.export(tmp_path / "m.bsc")
    assert not (tmp_path / "m.bsc").exists()
