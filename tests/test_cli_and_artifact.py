"""CLI behaviour (one-line errors, exit codes, no half-written files) and the artifact format."""

import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import onnx
import pytest
import tvm
from onnx import TensorProto, helper
from onnx_models import mlp, ort_run, recurrent

import bscompile
from bscompile.cli import main
from bscompile.errors import ArtifactError, InputError


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(7)
    model, _ = mlp([128, 256, 32], 2, ["4x4", "8x8"], rng)
    onnx.save(model, d / "mlp.onnx")
    np.save(d / "x.npy", rng.standard_normal((2, 128)).astype(np.float32))
    return d


def run_cli(*args, cwd=None):
    """Run the real console entry point in a subprocess: exit code, stdout, stderr."""
    p = subprocess.run([sys.executable, "-m", "bscompile.cli", *map(str, args)], capture_output=True, text=True,
                       cwd=cwd, timeout=300)
    return p.returncode, p.stdout, p.stderr


def test_compile_run_inspect_roundtrip(model_dir):
    bsc = model_dir / "mlp.bsc"
    rc, out, err = run_cli(model_dir / "mlp.onnx", "--target", "llvm", "-o", bsc)
    assert rc == 0, err
    assert "fc0.weight" in out and "bsr 4x4" in out
    rc, out, err = run_cli("run", bsc, "--input", f"x={model_dir / 'x.npy'}", "--output", model_dir / "y.npz",
                           "--check", model_dir / "mlp.onnx")
    assert rc == 0, err
    assert "ok" in out
    y = np.load(model_dir / "y.npz")["y"]
    ref = ort_run(onnx.load(model_dir / "mlp.onnx"), {"x": np.load(model_dir / "x.npy")})["y"]
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)
    rc, out, _ = run_cli("inspect", model_dir / "mlp.onnx", "--json")
    assert rc == 0
    report = json.loads(out)
    assert [w["sparsity"]["detected_block"] for w in report] == ["4x4", "8x8"]


def test_compile_warns_of_a_product_left_to_tvm(model_dir, tmp_path):
    """A MatMul by a batch of two constant matrices is no weight site: ``compile`` exits 0 with one
    warning line naming the operands' shapes, the manifest (and ``inspect``) lists the product, the result equals
    onnxruntime's (rtol 1e-4, atol 1e-5); an MLP, whose products are all sites, compiles without one."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((2, 16, 8)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, 8])],
                              [onnx.numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "bmm.onnx")
    rc, _, err = run_cli(tmp_path / "bmm.onnx", "-o", tmp_path / "bmm.bsc")
    warned = [line for line in err.splitlines() if "warning" in line]
    assert rc == 0 and warned == ["bscompile: warning: matmul of [2, 5, 16] and [2, 16, 8] in main, by a constant, is "
                                  "no weight site: TVM's generic kernel computes it (on CPUs often 10-100x slower "
                                  "than a site's)"], err
    mod = bscompile.load(tmp_path / "bmm.bsc")
    assert mod.manifest.extra["generic_products"] == [{"op": "matmul", "function": "main",
                                                        "shapes": [[2, 5, 16], [2, 16, 8]], "count": 1}]
    with tvm.transform.PassContext(disabled_pass=["ReportGenericProducts"]):  # (no record, no warning)
        assert bscompile.compile(tmp_path / "bmm.onnx").manifest.extra == {}
    for path in (tmp_path / "bmm.bsc", tmp_path / "bmm.onnx"):  # the artifact's manifest, the model's analysis
        rc, out, _ = run_cli("inspect", path)
        assert rc == 0 and "not a weight site: matmul of [2, 5, 16] and [2, 16, 8] in main" in out, out
    x = rng.standard_normal((2, 5, 16)).astype(np.float32)
    np.testing.assert_allclose(mod.run({"x": x})["y"], ort_run(onnx.load(tmp_path / "bmm.onnx"), {"x": x})["y"],
                               rtol=1e-4, atol=1e-5)
    rc, _, err = run_cli(model_dir / "mlp.onnx", "-o", tmp_path / "mlp.bsc")
    assert rc == 0 and "warning" not in err, err


def test_generic_products_behind_a_kernel_or_a_variable(tmp_path):
    """What the frontend leaves less plainly: an ``Einsum`` by a constant (imported as the ``call_tir``
    of a TE kernel) and a ``Gemm`` in an ``If`` branch (outside a dataflow block, its weight is a
    variable bound to the transposed constant) are reported too; results equal onnxruntime's
    (rtol 1e-4, atol 1e-5)."""
    rng = np.random.default_rng(4)
    w, c = rng.standard_normal((8, 16)).astype(np.float32), rng.standard_normal((16, 8)).astype(np.float32)
    then = helper.make_graph([helper.make_node("Gemm", ["x", "w"], ["yt"], transB=1)], "then", [],
                             [helper.make_tensor_value_info("yt", TensorProto.FLOAT, [4, 8])],
                             [onnx.numpy_helper.from_array(w, "w")])
    other = helper.make_graph([helper.make_node("Einsum", ["x", "c"], ["ye"], equation="ij,jk->ik")], "else", [],
                              [helper.make_tensor_value_info("ye", TensorProto.FLOAT, [4, 8])],
                              [onnx.numpy_helper.from_array(c, "c")])
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0), helper.make_node("Greater", ["s", "z"], ["cond"]),
         helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])], [onnx.numpy_helper.from_array(np.float32(0), "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    art = bscompile.compile(model)
    assert sorted(g["op"] for g in art.manifest.extra["generic_products"]) == ["einsum", "matmul"]
    mod = art.load()
    for sign in (1, -1):  # both branches
        x = np.abs(rng.standard_normal((4, 16))).astype(np.float32) * sign
        np.testing.assert_allclose(mod.run({"x": x})["y"], ort_run(model, {"x": x})["y"], rtol=1e-4, atol=1e-5)


def test_run_writes_npy_directory(model_dir, tmp_path):
    art = bscompile.compile(model_dir / "mlp.onnx")
    art.export(tmp_path / "m.bsc")
    assert main(["run", str(tmp_path / "m.bsc"), "--input", f"x={model_dir / 'x.npy'}",
                 "--output", str(tmp_path / "outs")]) == 0
    assert np.load(tmp_path / "outs" / "y.npy").shape == (2, 32)


def _one_line_error(rc, err, *needles):
    assert rc == 2
    lines = [ln for ln in err.splitlines() if not ln.startswith("[bscompile]") and "Warning" not in ln]
    assert len(lines) == 1, err
    assert lines[0].startswith("bscompile: error:")
    for n in needles:
        assert n in lines[0]
    assert "Traceback" not in err


def test_error_missing_file(tmp_path):
    _one_line_error(*run_cli(tmp_path / "nope.onnx", "-o", tmp_path / "a.bsc")[::2], "no such file")
    assert not (tmp_path / "a.bsc").exists()


def test_error_not_onnx(tmp_path):
    (tmp_path / "junk.onnx").write_bytes(b"\x00\xffnot a model at all")
    _one_line_error(*run_cli(tmp_path / "junk.onnx", "-o", tmp_path / "a.bsc")[::2], "not an ONNX model")
    assert not list(tmp_path.glob("*.bsc*"))


def test_error_unsupported_op_names_op_and_node(tmp_path):
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["h"], name="r"),
                           helper.make_node("FancyOp", ["h"], ["y"], name="my_fancy_node", domain="com.acme")],
                          "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.acme", 1)])
    onnx.save(m, tmp_path / "u.onnx")
    _one_line_error(*run_cli(tmp_path / "u.onnx", "-o", tmp_path / "u.bsc")[::2], "FancyOp", "my_fancy_node")
    assert not list(tmp_path.glob("*.bsc*"))  # nothing half-written


def test_error_unsupported_rnn_attribute(tmp_path):
    m = recurrent("GRU", 4, 8, 3, 1, 1, False, "dense", np.random.default_rng(0))
    gru = next(n for n in m.graph.node if n.op_type == "GRU")
    gru.attribute.append(helper.make_attribute("activations", ["Sigmoid", "Gelu"]))
    onnx.save(m, tmp_path / "g.onnx")
    _one_line_error(*run_cli(tmp_path / "g.onnx")[::2], "gru0", "Gelu")


def test_error_flag_attribute_out_of_range(tmp_path):
    """A flag the specification defines as 0 or 1 (Gemm's transB, TopK's largest) with another value:
    TVM would read -7 as true, onnxruntime TopK's as false (found by bench/fuzz.py). One line."""
    m, _ = mlp([8, 4], 1, ["dense"], np.random.default_rng(0))
    gemm = next(n for n in m.graph.node if n.op_type == "Gemm")
    next(a for a in gemm.attribute if a.name == "transB").i = -7
    onnx.save(m, tmp_path / "f.onnx")
    _one_line_error(*run_cli(tmp_path / "f.onnx", "-o", tmp_path / "f.bsc")[::2], gemm.name, "'transB' must be 0 or 1, got -7")
    assert not list(tmp_path.glob("*.bsc*"))


def test_error_unknown_target(model_dir):
    _one_line_error(*run_cli(model_dir / "mlp.onnx", "--target", "tpu9000")[::2], "unknown target 'tpu9000'")


@pytest.mark.parametrize("args,needle", [
    (["--target", "x86_64", "--cpu", "bogus"], "LLVM does not know CPU 'bogus' for x86_64"),
    (["--target", '{"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "bogus"}'],
     "LLVM does not know CPU 'bogus' for x86_64"),
    (["--target", '{"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "znver4"}'],
     "LLVM does not know CPU 'znver4' for aarch64")])
def test_error_unknown_cpu(model_dir, tmp_path, args, needle):
    """Also in a target JSON: TVM would log an error line and compile for a generic CPU."""
    rc, _, err = run_cli(model_dir / "mlp.onnx", *args, "-o", tmp_path / "m.bsc")
    _one_line_error(rc, err, needle)
    assert not (tmp_path / "m.bsc").exists()


def test_dynamic_dims_stay_symbolic_unless_given(tmp_path):
    """Symbolic by default; --input-shape specialises; a static-only target (CUDA) asks for it."""
    m, _ = mlp([8, 4], 1, ["dense"], np.random.default_rng(0))
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    onnx.save(m, tmp_path / "d.onnx")
    rc, _, err = run_cli(tmp_path / "d.onnx", "-o", tmp_path / "s.bsc", "-q")
    assert rc == 0, err
    assert bscompile.load(tmp_path / "s.bsc").inputs[0].shape == ("batch", 8)
    rc, _, err = run_cli(tmp_path / "d.onnx", "--input-shape", "x=3,8", "-o", tmp_path / "d.bsc", "-q")
    assert rc == 0, err
    assert bscompile.load(tmp_path / "d.bsc").inputs[0].shape == (3, 8)
    # CUDA keeps the batch symbolic too (its kernels run under the emulator: test_cuda_emulator.py)
    rc, _, err = run_cli(tmp_path / "d.onnx", "--target", "cuda", "-o", tmp_path / "c.bsc", "-q")
    assert rc == 0, err
    from bscompile.runtime.artifact import read_artifact

    assert read_artifact(tmp_path / "c.bsc")[0].inputs[0].shape == ("batch", 8)


def test_error_wrong_inputs_at_run_time(model_dir, tmp_path):
    bsc = tmp_path / "m.bsc"
    bscompile.compile(model_dir / "mlp.onnx").export(bsc)
    np.save(tmp_path / "bad.npy", np.zeros((3, 128), np.float32))
    _one_line_error(*run_cli("run", bsc, "--input", f"wrong={model_dir / 'x.npy'}")[::2], "unknown ['wrong']",
                    "expected x[2, 128]:float32")
    _one_line_error(*run_cli("run", bsc, "--input", f"x={tmp_path / 'bad.npy'}")[::2], "shape [3, 128]",
                    "expected [2, 128]")
    mod = bscompile.load(bsc)
    with pytest.raises(InputError, match="dtype float64"):
        mod.run({"x": np.zeros((2, 128))})


def test_artifact_manifest(model_dir, tmp_path):
    art = bscompile.compile(model_dir / "mlp.onnx")
    art.export(tmp_path / "m.bsc")
    with tarfile.open(tmp_path / "m.bsc") as tar:
        man = json.loads(tar.extractfile("manifest.json").read())
    assert man["bscompile_version"] == bscompile.__version__
    import tvm

    assert man["tvm_version"] == tvm.__version__
    assert man["target"]["kind"] == "llvm"
    assert man["inputs"] == [{"name": "x", "shape": [2, 128], "dtype": "float32"}]
    assert man["outputs"] == [{"name": "y", "shape": [2, 32], "dtype": "float32"}]
    for w in man["weights"]:
        assert w["decision"]["layout"] == "bsr"
        assert w["bytes_saved"] > 0.8 * w["dense_bytes"]
        assert 0.05 < w["sparsity"]["density"] < 0.2
    assert not list(tmp_path.glob(".*tmp"))  # no temp files left behind


def test_artifact_refuses_corruption(model_dir, tmp_path):
    bsc = tmp_path / "m.bsc"
    bscompile.compile(model_dir / "mlp.onnx").export(bsc)
    raw = bsc.read_bytes()
    (tmp_path / "trunc.bsc").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ArtifactError, match="truncated|corrupted"):
        bscompile.load(tmp_path / "trunc.bsc")
    # flip one byte inside module.so: the checksum catches it
    with tarfile.open(bsc) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for m, data in members:
            if m.name == "module.so":
                data = data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]
            tar.addfile(m, io.BytesIO(data))
    (tmp_path / "flip.bsc").write_bytes(buf.getvalue())
    with pytest.raises(ArtifactError, match="checksum"):
        bscompile.load(tmp_path / "flip.bsc")
    _one_line_error(*run_cli("run", tmp_path / "flip.bsc", "--random")[::2], "checksum")


def test_failed_export_leaves_previous_artifact(model_dir, tmp_path, monkeypatch):
    bsc = tmp_path / "m.bsc"
    art = bscompile.compile(model_dir / "mlp.onnx")
    art.export(bsc)
    before = bsc.read_bytes()

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr("bscompile.runtime.artifact.tarfile.TarFile.addfile", boom)
    with pytest.raises(RuntimeError):
        art.export(bsc)
    assert bsc.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.bsc"]


def test_dump_ir_writes_every_pass(model_dir, tmp_path):
    bscompile.compile(model_dir / "mlp.onnx", dump_ir=tmp_path / "ir")
    files = sorted(p.name for p in (tmp_path / "ir").iterdir())
    passes = [f[4:-3] for f in files]
    assert passes[0] == "import"
    ours = ["Conv1dToMatmul", "OutlineLinearSites", "AnalyzeSparsity", "ChooseLayout", "LowerWeightSites"]
    assert [p for p in passes if p in ours] == ours  # each once, in pipeline order
    assert passes.index("LowerWeightSites") < passes.index("LegalizeOps")  # TVM's lowering is dumped too
    outlined = (tmp_path / "ir" / files[passes.index("OutlineLinearSites")]).read_text()
    assert '"kind": "linear"' in outlined and "bscompile.layout" not in outlined
    chosen = (tmp_path / "ir" / files[passes.index("ChooseLayout")]).read_text()
    assert "bscompile.sparsity" in chosen and "bscompile.layout" in chosen


def test_console_script_starts_without_torch():
    """tvm_ffi imports torch eagerly (~1 s); the console script must not pay for it, yet torch stays importable."""
    code = ("import sys; sys.argv = ['bscompile', 'targets']; from bscompile.cli import main; rc = main(); "
            "loaded = 'torch' in sys.modules; import torch; print(rc, loaded, torch.ones(1).item())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split()[-3:] == ["0", "False", "1.0"], out


def test_thread_pool_uses_every_physical_core_unless_told():
    """TVM's x86 default is half the logical CPUs (it assumes two hardware threads per core):
    one thread on a 2-core VM without SMT. Loading bscompile's runtime sizes the pool to the
    physical cores the process may use, unless TVM_NUM_THREADS or OMP_NUM_THREADS is set."""
    from bscompile.runtime.threads import physical_cores

    probe = "import bscompile.runtime.module, tvm; print(tvm.get_global_func('runtime.NumThreads')())"
    env = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
    for extra, want in (({}, physical_cores()), ({"TVM_NUM_THREADS": "1"}, 1), ({"OMP_NUM_THREADS": "1"}, 1)):
        out = subprocess.run([sys.executable, "-c", probe], env={**env, **extra}, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0 and int(out.stdout.strip()) == want, (extra, out.stdout, out.stderr[-500:])


_POOL_PROBE = """
import glob, json, os
import numpy as np, tvm, bscompile.runtime.module
from tvm.script import tirx as T

@T.prim_func
def par(a: T.Buffer((64,), "float32")):
    for i in T.parallel(64):
        a[i] = a[i] + T.float32(1)

lib = tvm.compile(tvm.IRModule({"par": par}), target="llvm")
lib["par"](tvm.runtime.tensor(np.zeros(64, "float32")))  # creates TVM's pool
tasks = glob.glob(f"/proc/{os.getpid()}/task/*/status")
print(json.dumps([len(tasks), sorted({ln.split(":")[1].strip() for t in tasks for ln in open(t)
                                      if ln.startswith("Cpus_allowed_list")})]))
"""


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to see a thread pinned to one")
def test_thread_pool_is_left_unpinned_unless_told(tmp_path):
    """TVM pins its pool's workers to single cores but not the calling thread, which the OS may
    then run on a worker's core (a parallel kernel's halves one after the other): loading
    bscompile's runtime leaves every thread free to run on any allowed CPU, unless
    TVM_BIND_THREADS says otherwise."""
    env = {k: v for k, v in os.environ.items() if k != "TVM_BIND_THREADS"}
    env["TVM_NUM_THREADS"] = "2"
    probe = tmp_path / "probe.py"  # (TVMScript reads its source)
    probe.write_text(_POOL_PROBE)
    for extra, pinned in (({}, False), ({"TVM_BIND_THREADS": "1"}, True)):
        out = subprocess.run([sys.executable, str(probe)], env={**env, **extra}, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr[-1000:]
        n_threads, allowed = json.loads(out.stdout)  # allowed: the threads' distinct Cpus_allowed_list values
        assert n_threads >= 2 and (len(allowed) > 1) == pinned, (extra, out.stdout)


def test_the_command_never_imports_torch(rng, tmp_path):
    """``bscompile`` (the console script, ``cli.entry``) keeps torch out of the process: tvm_ffi
    imports it eagerly when installed, which cost ~2 s of every compile's start-up. A compile
    and a run work without it."""
    probe = ("import sys; from bscompile import cli; rc = cli.entry(); "
             "assert sys.modules.get('torch') is None, 'torch was imported'; sys.exit(rc)")
    model, _ = mlp([16, 8], 1, ["4x4"], rng)
    onnx.save(model, tmp_path / "m.onnx")
    bsc = tmp_path / "m.bsc"
    for argv in (["compile", str(tmp_path / "m.onnx"), "-o", str(bsc), "-q"], ["run", str(bsc), "--random"]):
        out = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
