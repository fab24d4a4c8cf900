"""Small ONNX models with controlled sparsity, built with onnx.helper (no torch needed)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def f32(a):
    return np.asarray(a, np.float32)


def assert_product_close(y: np.ndarray, x: np.ndarray, w: np.ndarray, bias: np.ndarray, err_msg: str = "") -> None:
    """``y == x @ w.T + bias`` to float32 accumulation error: within 2e-6 of ``|x| @ |w|.T + |bias|``
    per element, against a float64 reference (summation order differs; an indexing bug is O(1))."""
    x64, w64, b64 = (np.asarray(a, np.float64) for a in (x, w, bias))
    err = np.abs(y - (x64 @ w64.T + b64))
    tol = 2e-6 * (np.abs(x64) @ np.abs(w64).T + np.abs(b64)) + 1e-7
    assert (err <= tol).all(), (f"{err_msg}: {(err > tol).sum()} of {err.size} elements off, "
                                f"worst error {err.max():.3g} ({(err / tol).max():.2f}x the tolerance)")


def sparsify(w: np.ndarray, rng: np.random.Generator, kind: str, density: float = 0.1) -> np.ndarray:
    """``kind``: 'dense', 'zero', 'unstructured', or 'RxC' block sparsity (blocks along the last two axes)."""
    if kind == "dense":
        return w
    if kind == "zero":
        return np.zeros_like(w)
    n, k = w.shape[-2:]
    if kind == "unstructured":
        return (w * (rng.random(w.shape) < density)).astype(w.dtype)
    r, c = (int(v) for v in kind.split("x"))
    keep = rng.random((*w.shape[:-2], -(-n // r), -(-k // c))) < density
    mask = np.repeat(np.repeat(keep, r, axis=-2), c, axis=-1)[..., :n, :k]
    return (w * mask).astype(w.dtype)


def mlp(sizes: list[int], batch: int | str, kinds: list[str], rng: np.random.Generator, gemm: bool = True):
    """Linear stack: Gemm(transB=1)+bias+Relu (or MatMul) per layer; returns (model, weights).
    A string ``batch`` is a symbolic dim of that name."""
    nodes, inits, weights = [], [], []
    cur = "x"
    for i, (k, n) in enumerate(zip(sizes[:-1], sizes[1:])):
        w = sparsify(rng.standard_normal((n, k)).astype(np.float32) / np.sqrt(k), rng, kinds[i]).astype(np.float32)
        weights.append(w)
        out = f"h{i}"
        if gemm:
            b = rng.standard_normal(n).astype(np.float32)
            inits += [numpy_helper.from_array(w, f"fc{i}.weight"), numpy_helper.from_array(b, f"fc{i}.bias")]
            nodes.append(helper.make_node("Gemm", [cur, f"fc{i}.weight", f"fc{i}.bias"], [out], transB=1, name=f"fc{i}"))
        else:
            inits.append(numpy_helper.from_array(np.ascontiguousarray(w.T), f"fc{i}.weight"))
            nodes.append(helper.make_node("MatMul", [cur, f"fc{i}.weight"], [out], name=f"fc{i}"))
        cur = out
        if i < len(sizes) - 2:
            nodes.append(helper.make_node("Relu", [cur], [f"r{i}"], name=f"relu{i}"))
            cur = f"r{i}"
    nodes.append(helper.make_node("Identity", [cur], ["y"], name="out"))
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, sizes[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, sizes[-1]])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), weights


def recurrent(op: str, input_size: int, hidden: int, seq: int | str, batch: int | str, layers: int,
              bidirectional: bool, kind: str, rng: np.random.Generator, layout: int = 0):
    """A stack of ONNX GRU/LSTM/RNN layers as PyTorch exports them (GRU: linear_before_reset=1).

    String ``seq`` / ``batch`` are symbolic dims of those names, as ``dynamic_axes`` exports
    them: the initial state is then zero (no ``initial_h``) and the reshapes copy dims."""
    dynamic = isinstance(seq, str) or isinstance(batch, str)
    gates = {"GRU": 3, "LSTM": 4, "RNN": 1}[op]
    d = 2 if bidirectional else 1
    nodes, inits = [], []
    cur, cur_size = "x", input_size
    x_shape = [seq, batch, input_size] if layout == 0 else [batch, seq, input_size]
    for li in range(layers):
        w = sparsify(rng.standard_normal((d, gates * hidden, cur_size)).astype(np.float32) / np.sqrt(cur_size), rng, kind).astype(np.float32)
        r = sparsify(rng.standard_normal((d, gates * hidden, hidden)).astype(np.float32) / np.sqrt(hidden), rng, kind).astype(np.float32)
        b = rng.standard_normal((d, 2 * gates * hidden)).astype(np.float32) * 0.1
        names = [f"l{li}.W", f"l{li}.R", f"l{li}.B"]
        inits += [numpy_helper.from_array(a, n) for a, n in zip((w, r, b), names)]
        if not dynamic:
            h0 = rng.standard_normal((d, batch, hidden)).astype(np.float32)
            if layout == 1:  # same values as the layout-0 model built from the same seed
                h0 = np.ascontiguousarray(h0.transpose(1, 0, 2))
            inits.append(numpy_helper.from_array(h0, f"l{li}.h0"))
        attrs = dict(hidden_size=hidden, direction="bidirectional" if bidirectional else "forward", layout=layout)
        if op == "GRU":
            attrs["linear_before_reset"] = 1
        ins = [cur, *names] if dynamic else [cur, *names, "", f"l{li}.h0"]
        outs = [f"l{li}.Y", f"l{li}.Yh"] + ([f"l{li}.Yc"] if op == "LSTM" else [])
        nodes.append(helper.make_node(op, ins, outs, name=f"{op.lower()}{li}", **attrs))
        # [T, D, B, H] -> [T, B, D*H] (layout 0); [B, T, D, H] -> [B, T, D*H] (layout 1)
        perm = [0, 2, 1, 3] if layout == 0 else [0, 1, 2, 3]
        nodes.append(helper.make_node("Transpose", [outs[0]], [f"l{li}.Yt"], perm=perm, name=f"t{li}"))
        shape = np.array([0, 0, d * hidden] if dynamic else [seq, batch, d * hidden] if layout == 0
                         else [batch, seq, d * hidden], np.int64)
        inits.append(numpy_helper.from_array(shape, f"l{li}.shape"))
        nodes.append(helper.make_node("Reshape", [f"l{li}.Yt", f"l{li}.shape"], [f"l{li}.out"], name=f"rs{li}"))
        cur, cur_size = f"l{li}.out", d * hidden
    nodes.append(helper.make_node("Identity", [cur], ["y"], name="out_y"))
    nodes.append(helper.make_node("Identity", [f"l{layers - 1}.Yh"], ["h_n"], name="out_h"))
    out_shape = [seq, batch, d * hidden] if layout == 0 else [batch, seq, d * hidden]
    graph = helper.make_graph(
        nodes, op.lower(), [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape),
         helper.make_tensor_value_info("h_n", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def gru_with_lens(rng, hidden=24, inp=12):
    """A GRU (linear_before_reset=0: two recurrent matrices) fed ``sequence_lens`` per batch row."""
    w = f32(sparsify(rng.standard_normal((1, 3 * hidden, inp)) / np.sqrt(inp), rng, "4x4"))
    r = f32(sparsify(rng.standard_normal((1, 3 * hidden, hidden)) / np.sqrt(hidden), rng, "4x4"))
    b = f32(rng.standard_normal((1, 6 * hidden)) * 0.1)
    node = helper.make_node("GRU", ["x", "W", "R", "B", "lens"], ["y", "h"], hidden_size=hidden, name="gru")
    g = helper.make_graph(
        [node], "gru_lens",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["time", "batch", inp]),
         helper.make_tensor_value_info("lens", TensorProto.INT32, ["batch"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("h", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(a, n) for a, n in ((w, "W"), (r, "R"), (b, "B"))])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)])


def deepspeech_like(rng, feats=13, conv=32, hidden=32, classes=10):
    """x[batch, feats, time] -> Conv1d(k=5, stride 2, pad 2) -> ReLU -> [T', B, C] -> GRU -> Linear."""
    inits = {
        "conv.w": sparsify(rng.standard_normal((conv, feats, 5)) / np.sqrt(feats * 5), rng, "4x4"),
        "conv.b": rng.standard_normal(conv) * 0.1,
        "gru.W": sparsify(rng.standard_normal((1, 3 * hidden, conv)) / np.sqrt(conv), rng, "4x4"),
        "gru.R": sparsify(rng.standard_normal((1, 3 * hidden, hidden)) / np.sqrt(hidden), rng, "4x4"),
        "gru.B": rng.standard_normal((1, 6 * hidden)) * 0.1,
        "fc.w": sparsify(rng.standard_normal((hidden, classes)) / np.sqrt(hidden), rng, "4x4"),
        "fc.b": rng.standard_normal(classes),
    }
    nodes = [
        helper.make_node("Conv", ["x", "conv.w", "conv.b"], ["c"], strides=[2], pads=[2, 2], name="conv"),
        helper.make_node("Relu", ["c"], ["cr"], name="relu"),
        helper.make_node("Transpose", ["cr"], ["ct"], perm=[2, 0, 1], name="to_tbc"),
        helper.make_node("GRU", ["ct", "gru.W", "gru.R", "gru.B"], ["gy", "gh"], hidden_size=hidden,
                         linear_before_reset=1, name="gru"),
        helper.make_node("Squeeze", ["gy", "axis1"], ["gs"], name="squeeze"),
        helper.make_node("MatMul", ["gs", "fc.w"], ["fo"], name="fc"),
        helper.make_node("Add", ["fo", "fc.b"], ["y"], name="fc_bias"),
    ]
    tensors = [numpy_helper.from_array(f32(a), n) for n, a in inits.items()]
    tensors.append(numpy_helper.from_array(np.array([1], np.int64), "axis1"))
    g = helper.make_graph(nodes, "deepspeech_like",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", feats, "time"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], tensors)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)])


def ort_run(model: onnx.ModelProto, feeds: dict) -> dict:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, feeds)))


def weights_as_inputs(model: onnx.ModelProto, names: set[str]) -> onnx.ModelProto:
    """Move initializers ``names`` to graph inputs (weights computed at run time)."""
    g = model.graph
    moved = [i for i in g.initializer if i.name in names]
    keep = [i for i in g.initializer if i.name not in names]
    del g.initializer[:]
    g.initializer.extend(keep)
    for init in moved:
        g.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    return model


SYMBOLIC_MODELS = ("gru_lens", "lstm_bidir", "rnn", "linear", "deepspeech")


def symbolic_model(name: str, rng: np.random.Generator):
    """A model with a symbolic batch (and length) and ``feeds(batch, length, rng)`` for it."""
    if name == "gru_lens":
        def feeds(b, t, rng):
            return {"x": f32(rng.standard_normal((t, b, 12))), "lens": rng.integers(1, t + 1, b).astype(np.int32)}
        return gru_with_lens(rng), feeds
    if name == "lstm_bidir":
        return recurrent("LSTM", 12, 24, "time", "batch", 1, True, "4x4", rng), \
            lambda b, t, rng: {"x": f32(rng.standard_normal((t, b, 12)))}
    if name == "rnn":
        return recurrent("RNN", 12, 24, "time", "batch", 2, False, "4x4", rng), \
            lambda b, t, rng: {"x": f32(rng.standard_normal((t, b, 12)))}
    if name == "linear":  # MatMul on [batch, time, features]: batch x length rows
        model, _ = mlp([48, 40, 24], "batch", ["4x4", "unstructured"], rng, gemm=False)
        for vi in (model.graph.input[0], model.graph.output[0]):
            vi.type.tensor_type.shape.dim.insert(1, onnx.TensorShapeProto.Dimension(dim_param="time"))
        return model, lambda b, t, rng: {"x": f32(rng.standard_normal((b, t, 48)))}
    if name == "deepspeech":
        return deepspeech_like(rng), lambda b, t, rng: {"x": f32(rng.standard_normal((b, 13, t)))}
    raise ValueError(name)


def emulate_and_check(bsc, onnx_path, feeds: dict, tmp_path) -> str:
    """``bscompile run BSC --emulate random --check ONNX`` on ``feeds`` (saved as .npy): a CUDA
    artifact executed by the CUDA emulator in a random thread/block order and compared with
    onnxruntime; asserts it succeeded and returns its stdout."""
    import subprocess
    import sys

    args = []
    for name, value in feeds.items():
        np.save(tmp_path / f"{name}.npy", value)
        args += ["--input", f"{name}={tmp_path / f'{name}.npy'}"]
    proc = subprocess.run([sys.executable, "-m", "bscompile.cli", "run", str(bsc), "--emulate", "random", *args,
                           "--check", str(onnx_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout
