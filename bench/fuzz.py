"""Fuzzing campaign: bscompile's CLI on mutated ONNX files, inputs, artifacts and arguments.

    python bench/fuzz.py --seconds 1800 --seed 1 --json bench/results/fuzz.json
    python bench/fuzz.py --cases 40 --seed 7            # a short run (tests/test_fuzz.py)
    python bench/fuzz.py --atheris --seconds 300        # coverage-guided: the ONNX and artifact readers

Every case is one or more real CLI invocations (``bscompile.cli.main``), each in a
forked child of a process that has imported TVM once (so a case costs its own work,
not an interpreter start) with its stdout/stderr going to files and a timeout. A
case passes when every invocation ends in a result or in exactly one line
``bscompile: error: ...`` with exit 2. Failures: a signal (segfault, abort), a hang,
a traceback, ``internal error`` (exit 3), an error of more than one line, a partial
or temporary file left behind by a failed command, and (for valid models and
inputs) an answer different from onnxruntime's (``run --check`` exits 1).

Case families (``FAMILIES``): mutated ONNX files (byte flips, truncation, wrong
dtypes and ranks, missing initializers, cycles, huge and negative dims, NaN / Inf /
denormal, all-zero and fully dense weights, shapes blocks do not divide, unknown ops,
domains and opsets, bad attributes, external-data files missing or short, dynamic
dims), custom Scan cells among the seeds; mutated inputs (wrong dtype / rank / shape, NaN, Inf, out-of-range and
negative token ids, empty and 0-d arrays, pickles, non-.npy files, Fortran order,
big-endian); mutated artifacts (flipped bytes, truncation, another target, format
and version changes, a manifest from another model, with and without a matching
checksum); CLI arguments drawn by ``hypothesis`` from the parser's own flags plus
hostile values.
"""

from __future__ import annotations

import argparse
import collections
import copy
import io
import json
import os
import platform
import re
import signal
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", "1")
os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

OPSET = 17


# --- seed models -------------------------------------------------------------------------


def _model(nodes, inputs, outputs, inits, opset: int = OPSET) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "fuzz", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _block_pruned(rng, n: int, k: int, block: int = 4, density: float = 0.3) -> np.ndarray:
    keep = rng.random((-(-n // block), -(-k // block))) < density
    mask = np.kron(keep, np.ones((block, block)))[:n, :k]
    return (rng.standard_normal((n, k)) * mask / np.sqrt(k)).astype(np.float32)


def mlp(rng, sizes=(16, 24, 8), batch: int = 2) -> onnx.ModelProto:
    nodes, inits, cur = [], [], "x"
    for i, (k, n) in enumerate(zip(sizes[:-1], sizes[1:])):
        inits += [numpy_helper.from_array(_block_pruned(rng, n, k), f"w{i}"),
                  numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), f"b{i}")]
        nodes.append(helper.make_node("Gemm", [cur, f"w{i}", f"b{i}"], [f"h{i}"], transB=1, name=f"fc{i}"))
        cur = f"h{i}"
        if i < len(sizes) - 2:
            nodes.append(helper.make_node("Relu", [cur], [f"r{i}"], name=f"relu{i}"))
            cur = f"r{i}"
    nodes.append(helper.make_node("Identity", [cur], ["y"], name="out"))
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, sizes[0]])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, sizes[-1]])], inits)


def embed_gru(rng, vocab: int = 11, dim: int = 8, hidden: int = 8, seq: int = 5) -> onnx.ModelProto:
    """Token ids -> embedding (Gather) -> GRU -> projection: the bundled model in small."""
    h = hidden
    inits = [numpy_helper.from_array(rng.standard_normal((vocab, dim)).astype(np.float32), "emb"),
             numpy_helper.from_array(_block_pruned(rng, 3 * h, dim)[None], "W"),
             numpy_helper.from_array(_block_pruned(rng, 3 * h, h)[None], "R"),
             numpy_helper.from_array(rng.standard_normal((1, 6 * h)).astype(np.float32) * 0.1, "B"),
             numpy_helper.from_array(_block_pruned(rng, vocab, h).T.copy(), "P")]
    nodes = [helper.make_node("Gather", ["emb", "tokens"], ["e"], name="Gather_0"),
             helper.make_node("Transpose", ["e"], ["et"], perm=[1, 0, 2], name="tr"),
             helper.make_node("GRU", ["et", "W", "R", "B"], ["hs", "hn"], hidden_size=h, linear_before_reset=1,
                              name="gru"),
             helper.make_node("Squeeze", ["hs", "ax"], ["hq"], name="sq"),
             helper.make_node("MatMul", ["hq", "P"], ["logits"], name="proj")]
    inits.append(numpy_helper.from_array(np.array([1], np.int64), "ax"))
    return _model(nodes, [helper.make_tensor_value_info("tokens", TensorProto.INT64, [1, seq])],
                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [seq, 1, vocab])], inits)


def index_ops(rng) -> onnx.ModelProto:
    """GatherElements and ScatterElements on a data input, indices from the caller."""
    nodes = [helper.make_node("GatherElements", ["data", "idx"], ["g"], axis=1, name="GE"),
             helper.make_node("ScatterElements", ["data", "idx", "g"], ["y"], axis=1, name="SE")]
    return _model(nodes, [helper.make_tensor_value_info("data", TensorProto.FLOAT, [3, 6]),
                          helper.make_tensor_value_info("idx", TensorProto.INT64, [3, 1])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 6])], [])


def gru_lens(rng, seq: int = 5, batch: int = 2, inp: int = 3, h: int = 8) -> onnx.ModelProto:
    """A reverse GRU with per-batch sequence lengths from the caller (it reads x[lens - 1])."""
    inits = [numpy_helper.from_array(_block_pruned(rng, 3 * h, inp)[None], "W"),
             numpy_helper.from_array(_block_pruned(rng, 3 * h, h)[None], "R")]
    node = helper.make_node("GRU", ["x", "W", "R", "", "lens"], ["y", "hn"], hidden_size=h, direction="reverse",
                            name="gru")
    return _model([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [seq, batch, inp]),
                           helper.make_tensor_value_info("lens", TensorProto.INT32, [batch])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [seq, 1, batch, h])], inits)


def embed_dynamic(rng, vocab: int = 11, dim: int = 8, out: int = 12) -> onnx.ModelProto:
    """An embedding exported with dynamic axes (symbolic batch and seq) and a pruned projection:
    the index check must hold with symbolic shapes."""
    inits = [numpy_helper.from_array(rng.standard_normal((vocab, dim)).astype(np.float32), "emb"),
             numpy_helper.from_array(_block_pruned(rng, out, dim).T.copy(), "P")]
    nodes = [helper.make_node("Gather", ["emb", "tokens"], ["e"], name="embed/Gather_0"),
             helper.make_node("MatMul", ["e", "P"], ["y"], name="proj")]
    return _model(nodes, [helper.make_tensor_value_info("tokens", TensorProto.INT64, ["batch", "seq"])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", out])], inits)


def dynamic_select(rng, inp: int = 32, out: int = 48, block: int = 16) -> onnx.ModelProto | None:
    """models/dynamic.py's DynamicBlockLinear (input-dependent top-k tile selection), exported by
    torch.onnx with a dynamic batch: the dynamic weight site. None without torch."""
    try:
        import torch

        from bscompile.models.dynamic import DynamicBlockLinear
    except ImportError:
        return None
    import warnings

    torch.manual_seed(int(rng.integers(2**31)))
    m = DynamicBlockLinear(inp, out, block=block, keep=0.5).eval()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, (torch.randn(2, inp),), buf, dynamo=False, input_names=["x"], output_names=["y"],
                          opset_version=OPSET, dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    return onnx.load_from_string(buf.getvalue())


def custom_scan(rng) -> onnx.ModelProto | None:
    """A custom recurrent cell (:mod:`bscompile.models.onnx_cells`, drawn at random: a minimal
    gated unit, an LSTM with peepholes, a layer-normalised RNN) as one Scan over a symbolic time
    axis, forward or reversed: the frontend's loop path and FuseLoopKernels. None without torch
    (``bscompile.models`` imports it)."""
    try:
        from bscompile.models.onnx_cells import CELLS, scan_model
    except ImportError:
        return None
    name = str(rng.choice(sorted(CELLS)))
    return scan_model(name, rng, 6, 8, 2, "time", reverse=int(rng.integers(2)), out_axis=int(rng.integers(2)))


SEEDS = {"mlp": mlp, "embed_gru": embed_gru, "index_ops": index_ops, "gru_lens": gru_lens,
         "embed_dynamic": embed_dynamic, "dynamic_select": dynamic_select, "custom_scan": custom_scan}
#: Sizes a valid input gives each symbolic dim of the seeds (per case, drawn from this range).
SYMBOLIC_SIZES = (1, 5)
#: Valid [lo, hi) of each integer input of the seed models.
INT_RANGES = {"tokens": (-11, 11), "idx": (-6, 6), "lens": (0, 6)}


# --- running one CLI invocation in a forked child ---------------------------------------


@dataclass
class Outcome:
    argv: list[str]
    rc: int | None
    signal: str | None
    timed_out: bool
    stdout: str
    stderr: str
    seconds: float


def run_cli(argv: list[str], cwd: Path, timeout: float) -> Outcome:
    out, err = cwd / ".stdout", cwd / ".stderr"
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # child: the CLI, its output in files, its exit status ours
        rc = 70
        try:
            os.chdir(cwd)
            for fd, path in ((1, out), (2, err)):
                f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(f, fd)
                os.close(f)
            sys.stdout = io.TextIOWrapper(os.fdopen(1, "wb", closefd=False), line_buffering=True)
            sys.stderr = io.TextIOWrapper(os.fdopen(2, "wb", closefd=False), line_buffering=True)
            from bscompile.cli import main

            try:
                rc = main(list(argv))
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:  # noqa: BLE001 - an escaped exception is a finding: show its traceback
            import traceback

            traceback.print_exc()
            rc = 71
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(rc if isinstance(rc, int) and 0 <= rc < 256 else 72)
    deadline = t0 + timeout
    status, timed_out = None, False
    while status is None:
        done, st = os.waitpid(pid, os.WNOHANG)
        if done:
            status = st
        elif time.perf_counter() > deadline:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            timed_out = True
        else:
            time.sleep(0.02)
    sig = signal.Signals(os.WTERMSIG(status)).name if os.WIFSIGNALED(status) and not timed_out else None
    rc = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
    read = lambda p: p.read_text(errors="replace") if p.exists() else ""  # noqa: E731
    return Outcome(list(argv), rc, sig, timed_out, read(out), read(err), time.perf_counter() - t0)


#: A log line of TVM's (``[23:02:13] /project/include/tvm/topi/transform.h:1261: Warning: ...``).
_TVM_LOG = re.compile(r"\[\d\d:\d\d:\d\d\] \S+:\d+: ")


def _message_lines(o: Outcome) -> list[str]:
    """The lines of stderr that are bscompile's messages: without its progress lines, and with
    ``--verbose`` (which asks for them) without TVM's own log lines."""
    verbose = "--verbose" in o.argv
    return [ln for ln in o.stderr.splitlines() if ln.strip() and not ln.startswith("[bscompile] ")
            and not (verbose and _TVM_LOG.match(ln))]


def classify(o: Outcome, expect: str) -> str | None:
    """None when the outcome is acceptable, else a failure category.

    ``expect``: "ok" (valid model and input: must succeed and match onnxruntime),
    "error" (must be refused), "any" (a result or a clean error)."""
    lines = _message_lines(o)
    if o.timed_out:
        return "hang"
    if o.signal:
        return f"signal {o.signal}"
    if "Traceback" in o.stderr:
        # what --debug asks for, around a clean error; anything else escaped
        # a traceback breaks lines at "\n" only: an escaped name may hold U+2028 and the like
        tail = [ln for ln in o.stderr.split("\n") if ln.strip()]
        if "--debug" in o.argv and tail and re.match(r"bscompile\.errors\.\w+: ", tail[-1]):
            return "refused valid input" if expect == "ok" else None
        return "traceback"
    if o.rc == 3 or "internal error" in o.stderr:
        return "internal error"
    if o.rc == 1 and "MISMATCH" in o.stdout:
        return "wrong answer vs onnxruntime"
    if o.rc == 0:
        if lines:
            return "output on stderr"
        return "accepted invalid input" if expect == "error" else None
    if o.rc == 2:
        if len(lines) != 1 or not lines[0].startswith("bscompile: error: "):
            return "error not one line"
        if "--check: onnxruntime cannot run" in lines[0] and "Non-zero status code returned while running" in lines[0]:
            # onnxruntime loaded the model and its kernel refused the inputs bscompile had just run on
            return "ran inputs onnxruntime refuses"
        return "refused valid input" if expect == "ok" else None
    return f"exit {o.rc}"


def signature(category: str, o: Outcome) -> str:
    """What makes two failures the same bug: the category and the message's shape."""
    lines = _message_lines(o)
    msg = lines[-1] if lines else ""
    if category == "traceback":
        msg = next((ln for ln in reversed(lines) if re.match(r"^\w+(Error|Exception)\b", ln)), msg)
    msg = re.sub(r"/[^\s:'\"]+", "PATH", msg)
    msg = re.sub(r"'[^']*'", "'S'", msg)  # names and argument values
    msg = re.sub(r"[^\x20-\x7e]+", "", msg)
    msg = re.sub(r"\d+", "N", msg)
    return f"{category}: {msg[:100]}"


# --- cases --------------------------------------------------------------------------------


@dataclass
class Case:
    family: str
    name: str
    steps: list[tuple[list[str], str]]  # (argv, expect)
    must_not_exist: list[str] = field(default_factory=list)  # outputs of commands expected to fail


class Env:
    """A case's folder, the seed models and artifacts compiled once per campaign."""

    def __init__(self, root: Path, rng: np.random.Generator, timeout: float):
        self.root, self.rng, self.timeout = root, rng, timeout
        built = {k: f(np.random.default_rng(i)) for i, (k, f) in enumerate(SEEDS.items())}
        self.models: dict[str, onnx.ModelProto] = {k: m for k, m in built.items() if m is not None}
        self.base = root / "base"
        self.base.mkdir(parents=True, exist_ok=True)
        self.artifacts: dict[str, Path | None] = {}
        self.problems: list[str] = []

    def prepare(self) -> list[str]:
        """Save every seed model and compile ``mlp`` (the CLI cases' model); the other artifacts
        are compiled when a case first needs one (:meth:`artifact`), so that a short run spends
        its time on cases. Returns problems (there should be none)."""
        for name, model in self.models.items():
            onnx.save(model, self.base / f"{name}.onnx")
        self.artifact("mlp")
        return self.problems

    def artifact(self, name: str) -> Path | None:
        """The seed ``name`` compiled once (``mlp_aarch64``: mlp for aarch64); None if it does not compile
        (a setup problem, except for aarch64, which needs a cross toolchain)."""
        if name not in self.artifacts:
            aarch64 = name == "mlp_aarch64"
            src = "mlp" if aarch64 else name
            o = run_cli(["compile", f"{src}.onnx", "-o", f"{name}.bsc", "-q",
                         *(["--target", "aarch64"] if aarch64 else [])], self.base, self.timeout * 2)
            self.artifacts[name] = self.base / f"{name}.bsc" if o.rc == 0 else None
            if o.rc != 0 and not aarch64:
                self.problems.append(f"seed {name} does not compile: {o.stderr.strip()[-300:]}")
        return self.artifacts[name]

    def compiled_seed(self, exclude: str = "") -> str:
        """A random seed model (not ``exclude``) that compiles."""
        names = [k for k in self.models if k in SEEDS and k != exclude]
        while True:
            name = str(self.rng.choice(names))
            if self.artifact(name) is not None or len(names) == 1:
                return name
            names.remove(name)

    def valid_inputs(self, name: str, d: Path) -> list[str]:
        args = []
        sizes: dict[str, int] = {}  # one size per symbolic dim name, across inputs
        for vi in self.models[name].graph.input:
            shape = [x.dim_value if x.HasField("dim_value") else
                     sizes.setdefault(x.dim_param, int(self.rng.integers(*SYMBOLIC_SIZES)))
                     for x in vi.type.tensor_type.shape.dim]
            np_dtype = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
            if np.dtype(np_dtype).kind in "iu":
                a = self.rng.integers(*INT_RANGES.get(vi.name, (0, 4)), shape).astype(np_dtype)
            else:
                a = self.rng.standard_normal(shape).astype(np_dtype)
            np.save(d / f"{vi.name}.npy", a)
            args += ["--input", f"{vi.name}={vi.name}.npy"]
        return args


def _rand_init(model: onnx.ModelProto, rng, float_only: bool = True):
    inits = [t for t in model.graph.initializer if not float_only or t.data_type == TensorProto.FLOAT]
    return inits[rng.integers(len(inits))] if inits else None


def _set_array(init: TensorProto, arr: np.ndarray) -> None:
    init.CopyFrom(numpy_helper.from_array(arr, init.name))


def onnx_mutation(env: Env, d: Path) -> Case:
    rng = env.rng
    name = str(rng.choice([k for k in ("mlp", "embed_gru", "gru_lens", "embed_dynamic", "dynamic_select",
                                       "custom_scan") if k in env.models]))  # the seeds with weights
    model = copy.deepcopy(env.models[name])
    kinds = ["byte_flip", "truncate", "wrong_dtype", "wrong_rank", "missing_init", "cycle", "huge_dim",
             "special_values", "zero_or_dense", "non_dividing", "unknown_op", "opset", "bad_attr",
             "external_data", "dynamic_dim", "empty_graph", "dup_output"]
    kind = str(rng.choice(kinds))
    expect = "any"
    blob = None
    extra: list[str] = []
    if kind == "byte_flip":
        b = bytearray(model.SerializeToString())
        for _ in range(int(rng.integers(1, 9))):
            b[int(rng.integers(len(b)))] ^= 1 << int(rng.integers(8))
        blob = bytes(b)
    elif kind == "truncate":
        b = model.SerializeToString()
        blob = b[:int(rng.integers(len(b)))]
    elif kind == "wrong_dtype":
        init = _rand_init(model, rng, False)
        init.data_type = int(rng.choice([TensorProto.DOUBLE, TensorProto.INT64, TensorProto.INT8, TensorProto.FLOAT16,
                                         TensorProto.STRING, TensorProto.BOOL, 0, 99]))
    elif kind == "wrong_rank":
        init = _rand_init(model, rng, False)
        dims = list(init.dims)
        choice = int(rng.integers(3))
        dims = dims + [1] if choice == 0 else dims[:-1] if choice == 1 and dims else dims[::-1]
        del init.dims[:]
        init.dims.extend(dims)
    elif kind == "missing_init":
        init = _rand_init(model, rng, False)
        model.graph.initializer.remove(init)
    elif kind == "cycle":
        nodes = model.graph.node
        i = int(rng.integers(len(nodes)))
        j = int(rng.integers(i, len(nodes)))
        if nodes[i].input:
            nodes[i].input[int(rng.integers(len(nodes[i].input)))] = nodes[j].output[0]
    elif kind == "huge_dim":
        v = int(rng.choice([2**31, 2**40, 0, 10**6, 3 * 2**30]))
        if rng.random() < 0.5 and model.graph.initializer:
            init = _rand_init(model, rng, False)
            t = TensorProto(name=init.name, data_type=init.data_type, dims=[v] + list(init.dims[1:]))
            init.CopyFrom(t)
        else:
            vi = model.graph.input[int(rng.integers(len(model.graph.input)))]  # (0: a symbolic dim)
            dim = vi.type.tensor_type.shape.dim
            if dim:
                dim[int(rng.integers(len(dim)))].dim_value = v
    elif kind == "special_values":
        init = _rand_init(model, rng)
        a = numpy_helper.to_array(init).copy()
        vals = np.array([np.nan, np.inf, -np.inf, 1e-42, -1e-42, 3e38, 0.0], np.float32)
        idx = rng.integers(a.size, size=max(1, a.size // 10))
        a.flat[idx] = rng.choice(vals, size=idx.size)
        _set_array(init, a)
        expect = "ok" if np.isfinite(a).all() else "error"  # NaN/inf weights are refused
    elif kind == "zero_or_dense":
        init = _rand_init(model, rng)
        a = numpy_helper.to_array(init)
        _set_array(init, np.zeros_like(a) if rng.random() < 0.5 else
                   rng.standard_normal(a.shape).astype(np.float32))
        expect = "ok"
    elif kind == "non_dividing":
        sizes = tuple(int(s) for s in rng.integers(1, 41, size=int(rng.integers(2, 4))))
        name = "mlp"
        model = mlp(rng, sizes, int(rng.integers(1, 4)))
        expect = "ok"
    elif kind == "unknown_op":
        node = model.graph.node[int(rng.integers(len(model.graph.node)))]
        if rng.random() < 0.5:
            node.op_type = str(rng.choice(["FooBar", "Loop", "Scan", "", "gemm"]))
        else:
            node.domain = str(rng.choice(["com.example", "ai.onnx.ml", "com.microsoft"]))
    elif kind == "opset":
        model.opset_import[0].version = int(rng.choice([1, 6, 9, 11, 13, 21, 99, -1]))
    elif kind == "bad_attr":
        node = model.graph.node[int(rng.integers(len(model.graph.node)))]
        if node.attribute:
            a = node.attribute[int(rng.integers(len(node.attribute)))]
            if a.type == onnx.AttributeProto.INT:
                a.i = int(rng.choice([-7, 5, 99, 2**40]))
            elif a.type == onnx.AttributeProto.INTS:
                a.ints[:] = [int(v) for v in rng.integers(-3, 6, size=len(a.ints) + int(rng.integers(-1, 2)))]
        else:
            node.attribute.append(helper.make_attribute("axis", int(rng.choice([-9, 7]))))
    elif kind == "external_data":
        path = d / "model.onnx"
        onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location="w.bin",
                  size_threshold=0)
        data = (d / "w.bin").read_bytes()
        if rng.random() < 0.5:
            (d / "w.bin").unlink()
        else:
            (d / "w.bin").write_bytes(data[:int(rng.integers(len(data)))])
        blob = path.read_bytes()
    elif kind == "dynamic_dim":
        vi = model.graph.input[0]
        dim = vi.type.tensor_type.shape.dim[0]
        dim.dim_param = "N"
        if rng.random() < 0.5:
            shape = [x.dim_value or 2 for x in vi.type.tensor_type.shape.dim]
            shape[0] = int(rng.choice([1, 2, 3]))
            extra = ["--input-shape", f"{vi.name}=" + ",".join(map(str, shape))]
    elif kind == "empty_graph":
        del model.graph.node[:]
    elif kind == "dup_output":
        model.graph.output.append(copy.deepcopy(model.graph.output[0]))
    if blob is None:
        blob = model.SerializeToString()
    (d / "model.onnx").write_bytes(blob)
    steps = [(["compile", "model.onnx", "-o", "model.bsc", "-q", *extra], expect)]
    inputs = []
    if expect == "ok":
        env.models["_case"] = model
        inputs = env.valid_inputs("_case", d)
    # Input-dependent selection on a million random rows (a batch mutated in): some rows' kept
    # gate scores sum to nearly 0, and the gates are divided by their mean, so fp32 rounding
    # there differs from onnxruntime's beyond any tolerance (measured: 169 of 10^6 rows, 167 of
    # them with |sum| < 1e-3): no check there, only that the run ends cleanly
    check = [] if name == "dynamic_select" and kind == "huge_dim" else ["--check", "model.onnx"]
    steps.append((["run", "model.bsc", *(inputs or ["--random"]), *check], expect))
    return Case("onnx", f"{name}:{kind}", steps, ["model.bsc"])


def input_mutation(env: Env, d: Path) -> Case:
    rng = env.rng
    name = env.compiled_seed()
    model = env.models[name]
    onnx.save(model, d / "model.onnx")
    good = env.valid_inputs(name, d)
    vi = model.graph.input[int(rng.integers(len(model.graph.input)))]
    dims = vi.type.tensor_type.shape.dim
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type))
    a = np.load(d / f"{vi.name}.npy")
    shape = list(a.shape)
    static = [i for i, x in enumerate(dims) if x.HasField("dim_value")]  # (a symbolic dim takes any size)
    kinds = ["dtype", "rank", "shape", "empty", "scalar", "pickle", "not_npy", "fortran", "big_endian", "missing",
             "unknown_name", "nan_inf", "out_of_range", "negative_ids"]
    kind = str(rng.choice(kinds))
    expect = "error"
    target = d / f"{vi.name}.npy"
    if kind == "dtype":
        np.save(target, a.astype(rng.choice([t for t in (np.float64, np.float32, np.int64, np.int32, np.float16,
                                                         np.uint8, np.bool_) if np.dtype(t) != dtype])))
    elif kind == "rank":
        np.save(target, a[None] if rng.random() < 0.5 or a.ndim == 1 else a.reshape(-1))  # (1-D: always a rank)
    elif kind == "shape":
        if static:
            np.save(target, np.resize(a, [s + int(rng.integers(1, 3)) * (i in static)
                                          for i, s in enumerate(shape)]).astype(dtype))
        else:  # every dim symbolic: another size is a valid input
            np.save(target, np.resize(a, [s + int(rng.integers(1, 3)) for s in shape]).astype(dtype))
            expect = "ok"
    elif kind == "empty":
        np.save(target, np.zeros([0] + shape[1:], dtype))
    elif kind == "scalar":
        np.save(target, np.array(1, dtype))
    elif kind == "pickle":
        np.save(target, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    elif kind == "not_npy":
        target.write_bytes(rng.bytes(int(rng.integers(0, 200))))
    elif kind == "fortran":
        np.save(target, np.asfortranarray(a))
        expect = "ok"
    elif kind == "big_endian":
        np.save(target, a.astype(dtype.newbyteorder(">")))
        expect = "any"
    elif kind == "missing":
        good = [g for g in good if not g.startswith(f"{vi.name}=")]
        good = [g for i, g in enumerate(good) if not (g == "--input" and (i + 1 >= len(good)
                                                                         or good[i + 1] == "--input"))]
    elif kind == "unknown_name":
        good += ["--input", f"nope={vi.name}.npy"]
    elif kind == "nan_inf":
        if dtype.kind == "f":
            a = a.copy()
            a.flat[rng.integers(a.size, size=max(1, a.size // 4))] = rng.choice([np.nan, np.inf, -np.inf])
            np.save(target, a)  # refused: the generated code does not propagate NaN/inf as onnxruntime does
        else:
            np.save(target, a.astype(np.float32) * np.nan)
    elif kind in ("out_of_range", "negative_ids"):
        if dtype.kind in "iu":
            lo, hi = INT_RANGES.get(vi.name, (0, 4))
            a = a.copy()
            info = np.iinfo(dtype)
            a.flat[int(rng.integers(a.size))] = int(rng.choice([hi, lo - 1, info.max, info.min, 10**9 % info.max])) \
                if kind == "out_of_range" else int(rng.integers(lo, 0)) if lo < 0 else lo
            np.save(target, a)
            expect = "error" if kind == "out_of_range" else "ok"
        else:
            expect = "ok"
    art = env.artifact(name)
    return Case("input", f"{name}:{kind}", [(["run", str(art), *good, "--check", "model.onnx"], expect)])


def artifact_mutation(env: Env, d: Path) -> Case:
    rng = env.rng
    name = env.compiled_seed()
    data = env.artifact(name).read_bytes()
    kinds = ["byte_flip", "truncate", "other_target", "format_version", "versions", "other_manifest",
             "other_manifest_resigned", "manifest_shapes", "empty", "directory"]
    kind = str(rng.choice(kinds))
    bsc = d / "m.bsc"
    expect = "error"
    if kind == "byte_flip":
        b = bytearray(data)
        for _ in range(int(rng.integers(1, 17))):
            b[int(rng.integers(len(b)))] ^= 1 << int(rng.integers(8))
        bsc.write_bytes(bytes(b))
        expect = "any"
    elif kind == "truncate":
        bsc.write_bytes(data[:int(rng.integers(len(data)))])
        expect = "any"  # a cut in the tar's trailing zero blocks leaves a whole artifact (--check still guards)
    elif kind == "other_target":
        if env.artifact("mlp_aarch64") is not None:
            bsc.write_bytes(env.artifact("mlp_aarch64").read_bytes())
            name = "mlp"
        else:
            bsc.write_bytes(data)
            expect = "ok"
    elif kind == "empty":
        bsc.write_bytes(b"")
    elif kind == "directory":
        bsc.mkdir()
    else:
        members = _untar(data)
        manifest = json.loads(members["manifest.json"])
        if kind == "format_version":
            manifest["format_version"] = int(rng.choice([0, 3, 99, -1]))  # reads formats 1 and 2
        elif kind == "versions":
            manifest["bscompile_version"], manifest["tvm_version"] = "9.9.9", "0.1.0"
            expect = "ok"
        elif kind.startswith("other_manifest"):
            other = env.compiled_seed(exclude=name)
            manifest = json.loads(_untar(env.artifact(other).read_bytes())["manifest.json"])
            if kind.endswith("resigned"):
                import hashlib

                manifest["module_sha256"] = hashlib.sha256(members[manifest.get("module_file", "module.so")]
                                                           if manifest.get("module_file", "module.so") in members
                                                           else b"").hexdigest()
        elif kind == "manifest_shapes":
            spec = manifest["inputs"][0]
            grow = rng.random() < 0.5 and any(isinstance(s, int) for s in spec["shape"])  # (a symbolic dim: any size)
            spec["shape"] = [s + 1 if isinstance(s, int) else s for s in spec["shape"]] if grow \
                else spec["shape"][:-1]
            name = "_none"
        members["manifest.json"] = json.dumps(manifest).encode()
        bsc.write_bytes(_tar(members))
    if name in SEEDS:
        onnx.save(env.models[name], d / "model.onnx")
        args = [*env.valid_inputs(name, d), "--check", "model.onnx"]
    else:
        args = ["--random"]
    # inspect shows a readable manifest whatever it says (another version or target, a lie about
    # the module: run catches those); an unreadable one is an error
    inspect = "error" if kind in ("format_version", "empty", "directory") else "any"
    steps = [(["run", "m.bsc", *args], expect), (["inspect", "m.bsc"], inspect)]
    if kind in ("byte_flip", "truncate", "format_version", "empty"):
        steps.append((["package", "m.bsc", "-o", "b.tar.gz"], "error"))
    return Case("artifact", f"{name}:{kind}", steps, ["b.tar.gz"])


def _untar(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def _tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def _cli_strategy():
    """hypothesis: argv lists built from the CLI's commands and flags and hostile values."""
    from hypothesis import strategies as st

    from bscompile.cli import COMMANDS

    flags = ["--input-shape", "--target", "--cpu", "--arch", "--dense", "--block", "-o", "--output", "--dump-ir",
             "--records", "-q", "--input", "--random", "--check", "--bench", "--json", "--name", "--model", "--runs",
             "--debug", "--verbose", "-h"]
    values = st.one_of(
        st.sampled_from(["mlp.onnx", "mlp.bsc", "x.npy", "x=x.npy", "x=nope.npy", "x=2,16", "x=0,16", "x=-1",
                         "x=99999999999,16", "4x4", "3y", "0x4", "1x1", "257x1", "llvm", "aarch64", "cuda", "rpi4",
                         '{"kind": "llvm"}', '{"kind": "c"}', "{", "sm_80", "sm_1", "cortex-a76", "no-such-cpu",
                         "-1", "0", "3", "1e9", "", " ", "out/", "/proc/version", "/dev/null", "/nonexistent/x.bsc",
                         ".", "..", "mlp.onnx.bsc", "records.json", "\x00", "é", "a\u2028b", "\x85", "x" * 300]),
        st.text(max_size=12))
    token = st.one_of(st.sampled_from(list(COMMANDS) + ["compil", "--", "-"]), st.sampled_from(flags), values)
    return st.lists(token, max_size=8)


def cli_cases(env: Env, root: Path, n: int, seed: int) -> list[Case]:
    """``n`` argument lists from hypothesis (seeded), run in a folder holding a valid model,
    artifact and input, so that some lists do real work."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as hseed

    drawn: list[list[str]] = []

    @hseed(seed)
    @settings(max_examples=n, database=None, deadline=None, suppress_health_check=list(HealthCheck),
              derandomize=False)
    @given(_cli_strategy())
    def collect(argv):
        drawn.append(argv)

    collect()
    rng = np.random.default_rng(seed)
    rng.shuffle(drawn)
    return [Case("cli", " ".join(a)[:80], [(a, "any")]) for a in drawn[:n]]


FAMILIES = {"onnx": onnx_mutation, "input": input_mutation, "artifact": artifact_mutation}


# --- the campaign -------------------------------------------------------------------------


@dataclass
class Finding:
    family: str
    case: str
    category: str
    signature: str
    argv: list[str]
    stderr_tail: str


def _leftovers(d: Path) -> list[str]:
    return [p.name for p in d.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".bscompile")]


def run_case(case: Case, d: Path, timeout: float) -> list[Finding]:
    findings = []
    for argv, expect in case.steps:
        (d / ".argv").write_text(json.dumps(argv))
        before = {p for p in case.must_not_exist if (d / p).exists()}
        o = run_cli(argv, d, timeout)
        cat = classify(o, expect)
        if cat is None and o.rc != 0:
            partial = [p for p in case.must_not_exist if (d / p).exists() and p not in before and p in argv]
            left = _leftovers(d)
            if partial or left:
                cat = f"file left behind by a failed command ({', '.join(partial + left)})"
        if cat is not None:
            findings.append(Finding(case.family, case.name, cat, signature(cat, o), argv,
                                    o.stderr.strip()[-600:]))
        if o.rc != 0:
            break  # later steps need this one's output
    return findings


def campaign(seconds: float, max_cases: int | None, seed: int, timeout: float, mix: dict[str, float],
             keep: Path | None = None, progress=print) -> dict:
    rng = np.random.default_rng(seed)
    root = Path(tempfile.mkdtemp(prefix="bscompile-fuzz-")) if keep is None else keep
    env = Env(root, rng, timeout)
    t0 = time.perf_counter()
    problems = env.prepare()
    for p in problems:
        progress(f"setup problem: {p}")
    counts: collections.Counter = collections.Counter()
    findings: list[Finding] = []
    total = max_cases if max_cases is not None else 10**9
    cli_pool: list[Case] = []
    families = list(mix)
    weights = np.array([mix[f] for f in families], float)
    weights /= weights.sum()
    i = 0
    while i < total and time.perf_counter() - t0 < seconds:
        fam = str(rng.choice(families, p=weights))
        d = root / f"case{i:05d}"
        d.mkdir()
        if fam == "cli":
            if not cli_pool:
                cli_pool = cli_cases(env, root, 50, int(rng.integers(2**31)))
            case = cli_pool.pop()
            for name in ("mlp.onnx", "mlp.bsc"):
                (d / name).write_bytes((env.base / name).read_bytes())
            np.save(d / "x.npy", rng.standard_normal((2, 16)).astype(np.float32))
        else:
            case = FAMILIES[fam](env, d)
        found = run_case(case, d, timeout)
        counts[fam] += 1
        for f in found:
            progress(f"FAIL [{f.family}] {f.case}: {f.signature}")
        findings += found
        i += 1
        if i % 10 == 0:
            progress(f"{i} cases, {time.perf_counter() - t0:.0f} s, {len(findings)} failures, "
                     f"{len({f.signature for f in findings})} distinct")
        if keep is None:
            import shutil

            shutil.rmtree(d, ignore_errors=True)
    distinct = collections.OrderedDict()
    for f in findings:
        distinct.setdefault(f.signature, f)
    return {"seed": seed, "cases": i, "per_family": dict(counts), "seconds": round(time.perf_counter() - t0, 1),
            "failures": len(findings), "distinct_failures": len(distinct), "setup_problems": env.problems,
            "findings": [vars(f) for f in distinct.values()],
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


# --- atheris: coverage-guided fuzzing of the readers (in-process) ---------------------


def atheris_main(seconds: int, seed: int) -> None:
    """Byte-level, coverage-guided: the ONNX loader/validator and the artifact reader must
    raise a BscompileError or succeed on any bytes (anything else is reported as a crash)."""
    import atheris

    import onnx  # noqa: F401  (not instrumented: C++ protobuf parsing, no Python coverage to gain)
    import tvm  # noqa: F401

    with atheris.instrument_imports(include=["bscompile"]):
        from bscompile.errors import BscompileError
        from bscompile.frontend import onnx as front
        from bscompile.limits import check_resources
        from bscompile.runtime.artifact import read_artifact

    tmp = Path(tempfile.mkdtemp(prefix="bscompile-atheris-"))
    corpus = tmp / "corpus"
    corpus.mkdir()
    env = Env(tmp, np.random.default_rng(seed), 60)
    for name, m in env.models.items():
        (corpus / f"{name}.onnx").write_bytes(m.SerializeToString())

    def one(data: bytes) -> None:
        path = tmp / ("x.bsc" if data[:1] == b"B" else "x.onnx")
        path.write_bytes(data[1:] if data[:1] == b"B" else data)
        try:
            if path.suffix == ".bsc":
                read_artifact(path)
            else:
                proto = front.load_model(path)
                front.check_supported(proto)
                inputs = front.graph_inputs(proto, None)
                check_resources(proto, {s.name: s.shape for s in inputs}, {s.name: s.dtype for s in inputs})
        except BscompileError:
            pass

    atheris.Setup([sys.argv[0], f"-max_total_time={seconds}", f"-seed={seed}", str(corpus)], one)
    atheris.Fuzz()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=600, help="time budget (default 600)")
    p.add_argument("--cases", type=int, help="stop after this many cases")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=120, help="seconds per CLI invocation before it is a hang")
    p.add_argument("--mix", default="onnx=4,input=3,artifact=2,cli=2", help="family weights")
    p.add_argument("--json", help="write the summary (figures and one example per distinct failure) here")
    p.add_argument("--keep", help="keep every case's folder under this directory")
    p.add_argument("--atheris", action="store_true", help="coverage-guided byte fuzzing of the readers instead")
    args = p.parse_args(argv)
    if args.atheris:
        atheris_main(int(args.seconds), args.seed)
        return 0
    mix = {k: float(v) for k, v in (kv.split("=") for kv in args.mix.split(","))}
    keep = Path(args.keep) if args.keep else None
    if keep:
        keep.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    summary = campaign(args.seconds, args.cases, args.seed, args.timeout, mix, keep,
                       progress=lambda m: print(f"[{time.perf_counter() - t0:7.1f}s] {m}", flush=True))
    summary["command"] = "python bench/fuzz.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(json.dumps({k: v for k, v in summary.items() if k != "findings"}, indent=1))
    for f in summary["findings"]:
        print(f"- [{f['family']}] {f['case']}: {f['signature']}\n    argv: {f['argv']}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return 1 if summary["failures"] or summary["setup_problems"] else 0


if __name__ == "__main__":
    if "--atheris" not in sys.argv:  # (atheris instruments the modules it imports itself)
        # Import once before forking: every case's child starts with TVM loaded.
        import bscompile.cli  # noqa: F401
        import bscompile.driver  # noqa: F401
        import onnxruntime  # noqa: F401

    sys.exit(main())
