"""DynamicBlockLSTM / DynamicBlockGRU: nn.LSTM/GRU semantics, a NumPy reference of the gated cell,
gradients, and the three export forms (traced, scripted -> Loop, dynamo -> Scan) on onnxruntime
and through bscompile's Loop/Scan frontend.

Selection is discontinuous in the gate scores, so gated numerics are compared on inputs whose
every selection (every step, row and product) separates the k-th and (k+1)-th score by MARGIN
(inputs without one are redrawn), as in test_dynamic.py.
"""

import io
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch", reason="torch is in the 'test' extra")
from torch import nn  # noqa: E402

import bscompile  # noqa: E402
from bscompile.codegen import dynamic_layout as dl  # noqa: E402
from bscompile.models import DynamicBlockGRU, DynamicBlockLSTM  # noqa: E402
from onnx_models import emulate_and_check  # noqa: E402

IN, H, BS, B = 16, 32, 8, 2
MARGIN = 1e-3
CLASSES = {"lstm": (DynamicBlockLSTM, nn.LSTM), "gru": (DynamicBlockGRU, nn.GRU)}


def _model(rng, kind: str, **kw):
    """Gate scores spread 10x wider than nn.Linear's initialisation gives: the normalised gates
    r = g / mean(kept g) do not change, the selection margins grow."""
    torch.manual_seed(int(rng.integers(2**31)))
    m = CLASSES[kind][0](IN, H, block=BS, **kw).eval()
    with torch.no_grad():
        for lin in _products(m):
            lin.gate.weight.mul_(10)
            lin.gate.bias.mul_(10)
    return m


def _products(m):
    return [lin for layer in m.layers for lin in (layer.ih, layer.hh)]


def _sigmoid(v):
    return 1 / (1 + np.exp(-v))


def _reference(m, feeds: dict) -> tuple[np.ndarray, float]:
    """NumPy forward of a one-layer model from ``feeds`` (``x``, ``h0``, an LSTM's ``c0``) with
    dynamic_layout's gated product; also the smallest selection margin met on the way."""
    x = feeds["x"]
    layer = m.layers[0]
    gap = np.inf

    def product(lin, v):
        nonlocal gap
        p = {k: t.detach().double().numpy() for k, t in lin.named_parameters()}
        g = v.astype(np.float64) @ p["gate.weight"].T + p["gate.bias"]
        srt = -np.sort(-g, axis=1)
        kept = srt[:, : lin.k]
        # the normalising sum must stay away from zero too: r = g / (sum / n_alive) magnifies float32
        # rounding by sum(|kept|) / |sum| (a sum of 0.0025 over scores of a few units put onnxruntime
        # 6e-5 and bscompile 1e-4 away from float64 after 20 steps); it must be positive and over 2%
        # of the kept scores' magnitudes (> MARGIN after the division by 20)
        cond = float((kept.sum(1) / np.abs(kept).sum(1)).min()) / 20
        gap = min(gap, float((srt[:, lin.k - 1] - srt[:, lin.k]).min()) if lin.k < srt.shape[1] else gap, cond)
        return dl.dynamic_linear(v.astype(np.float32), *(lin.weight.detach().numpy(), lin.gate.weight.detach().numpy(),
                                 lin.gate.bias.detach().numpy(), lin.bias.detach().numpy()), BS, lin.k)[0]

    h = feeds["h0"][0].astype(np.float64)
    c = feeds["c0"][0].astype(np.float64) if "c0" in feeds else None
    outs = []
    for t in range(x.shape[0]):
        gi, gh = product(layer.ih, x[t]), product(layer.hh, h)
        if isinstance(m, DynamicBlockLSTM):
            i, f, g, o = np.split(gi + gh, 4, axis=1)
            c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
            h = _sigmoid(o) * np.tanh(c)
        else:
            (xr, xz, xn), (hr, hz, hn) = np.split(gi, 3, axis=1), np.split(gh, 3, axis=1)
            r, z = _sigmoid(xr + hr), _sigmoid(xz + hz)
            h = (1 - z) * np.tanh(xn + r * hn) + z * h
        outs.append(h)
    return np.stack(outs), gap


def clear_margin_feeds(m, rng, steps: int) -> dict[str, np.ndarray]:
    """Inputs ``x[steps, B, IN]`` and a random initial state (``h0``, an LSTM's ``c0``, each
    ``[1, B, H]``) whose every selection has a clear margin; when none turns up in 20 draws, the
    gate biases are redrawn."""
    for attempt in range(100):
        if attempt % 20 == 19:
            with torch.no_grad():
                for lin in _products(m):
                    lin.gate.bias.copy_(torch.from_numpy(rng.uniform(-2, 2, lin.gate.bias.shape).astype(np.float32)))
        feeds = {name: rng.standard_normal(shape).astype(np.float32) * scale
                 for name, shape, scale in (("x", (steps, B, IN), 1.0), ("h0", (1, B, H), 0.5), ("c0", (1, B, H), 0.5))
                 if name != "c0" or isinstance(m, DynamicBlockLSTM)}
        if _reference(m, feeds)[1] > MARGIN:
            return feeds
    raise AssertionError("no input with a clear selection margin in 100 draws")


def clear_margin_feed_set(m, rng, lengths) -> list[dict[str, np.ndarray]]:
    """:func:`clear_margin_feeds` for each of ``lengths``, every one with a clear margin under the
    final gate biases (a redraw of the biases for a later length voids the earlier ones' margins)."""
    for _ in range(5):
        feeds = [clear_margin_feeds(m, rng, n) for n in lengths]
        if all(_reference(m, f)[1] > MARGIN for f in feeds):
            return feeds
    raise AssertionError(f"no inputs of lengths {list(lengths)} with a clear selection margin")


def _state(m, feeds: dict):
    """The initial state of ``feeds`` as the module takes it."""
    h0 = torch.from_numpy(feeds["h0"])
    return (h0, torch.from_numpy(feeds["c0"])) if isinstance(m, DynamicBlockLSTM) else h0


@pytest.mark.parametrize("kind", sorted(CLASSES))
def test_all_gates_equal_is_the_torch_rnn(rng, kind):
    """keep=1 with constant gate scores keeps every tile with r = 1: exactly nn.LSTM / nn.GRU
    (2 layers, batch_first, given initial state), eager, scripted and with the scan loop."""
    cls, ref_cls = CLASSES[kind]
    torch.manual_seed(int(rng.integers(2**31)))
    ref = ref_cls(IN, H, num_layers=2, batch_first=True)
    outs = []
    for loop in ("python", "scan"):
        m = cls(IN, H, num_layers=2, batch_first=True, block=BS, keep=float(rng.choice([1.0, 0.5])), time_loop=loop)
        m.load_dense(ref)
        with torch.no_grad():
            for lin in _products(m):
                lin.gate.weight.zero_()
                lin.gate.bias.fill_(0.3)
        outs.append(m)
    x = torch.from_numpy(rng.standard_normal((B, 4, IN)).astype(np.float32))
    h0 = torch.from_numpy(rng.standard_normal((2, B, H)).astype(np.float32))
    hx = (h0, torch.randn(2, B, H)) if kind == "lstm" else h0
    with torch.no_grad():
        want = ref(x, hx)
        for got in (outs[0](x, hx), torch.jit.script(outs[0])(x, hx), outs[1](x, hx)):
            for g, w in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)):
                np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=1e-5, atol=1e-6)
        # no hx: zero initial state, like nn.LSTM / nn.GRU
        for g, w in zip(torch.utils._pytree.tree_leaves(outs[0](x)), torch.utils._pytree.tree_leaves(ref(x))):
            np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", sorted(CLASSES))
def test_gated_cell_matches_numpy_reference(rng, kind):
    m = _model(rng, kind, keep=0.5)
    feeds = clear_margin_feeds(m, rng, 4)
    want, _ = _reference(m, feeds)
    with torch.no_grad():
        out, state = m(torch.from_numpy(feeds["x"]), _state(m, feeds))
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-4, atol=1e-5)
    h_n = state[0] if kind == "lstm" else state
    np.testing.assert_allclose(h_n[0].numpy(), want[-1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", sorted(CLASSES))
def test_trainable(rng, kind):
    """Gradients reach the weights and the gates of both products, through the time loop."""
    m = _model(rng, kind, keep=0.5).train()
    feeds = clear_margin_feeds(m, rng, 3)
    out, _ = m(torch.from_numpy(feeds["x"]), _state(m, feeds))
    (out * torch.randn_like(out)).sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


class _LSTMWithState(nn.Module):
    """Initial state as plain inputs: the TorchScript exporter cannot take ``Optional[Tuple]``,
    and TVM's importer cannot shape the zero state traced from ``x.size(1)``."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor):
        return self.m(x, (h0, c0))


class _GRUWithState(_LSTMWithState):
    def forward(self, x: torch.Tensor, h0: torch.Tensor):
        return self.m(x, h0)


def _export(m, form: str, steps: int) -> bytes:
    # (distinct state tensors: the dynamo exporter folds aliased inputs into one graph input)
    x, h, c = torch.zeros(steps, B, IN), torch.zeros(1, B, H), torch.ones(1, B, H)
    wrapped, args = (_LSTMWithState(m), (x, h, c)) if isinstance(m, DynamicBlockLSTM) else (_GRUWithState(m), (x, h))
    names = ["x", "h0", "c0"][: len(args)]
    if form == "dynamo":  # the batch stays static: torch 2.13's scan lowering fails on a symbolic one
        pytest.importorskip("onnxscript", reason="the dynamo exporter needs onnxscript (in the 'test' extra)")
        prog = torch.onnx.export(wrapped, args, dynamo=True, input_names=names, verbose=False,
                                 dynamic_shapes=({0: torch.export.Dim("T")},) + (None,) * (len(args) - 1))
        return prog.model_proto.SerializeToString()
    buf = io.BytesIO()
    mod = torch.jit.script(wrapped) if form == "script" else wrapped
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(mod, args, buf, dynamo=False, opset_version=17, input_names=names,
                          dynamic_axes={"x": {0: "T"}} if form == "script" else None)
    return buf.getvalue()


LOOP_OP = {"trace": None, "script": "Loop", "dynamo": "Scan"}


@pytest.mark.parametrize("form", sorted(LOOP_OP))
@pytest.mark.parametrize("kind", sorted(CLASSES))
def test_export_forms_on_onnxruntime_and_bscompile(rng, kind, form):
    """Traced: unrolled, fixed length. Scripted: Loop; dynamo (time_loop="scan"): Scan; both
    with a symbolic length, run at two lengths by onnxruntime; bscompile unrolls them at one."""
    m = _model(rng, kind, keep=0.5, time_loop="scan" if form == "dynamo" else "python")
    steps = 2
    lengths = (steps, steps + 2) if LOOP_OP[form] else (steps,)
    all_feeds = clear_margin_feed_set(m, rng, lengths)  # before exporting: it may redraw gate biases
    model_bytes = _export(m, form, steps)
    ops = {n.op_type for n in onnx.load_from_string(model_bytes).graph.node}
    assert ({"Loop", "Scan"} & ops) == ({LOOP_OP[form]} - {None}), ops
    sess = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    for feeds in all_feeds[::-1]:  # the last one run is the one compiled below
        want, _ = _reference(m, feeds)
        got = sess.run(None, feeds)
        np.testing.assert_allclose(got[0], want, rtol=1e-4, atol=1e-5)
    compiled = bscompile.compile(onnx.load_from_string(model_bytes), input_shapes={"x": feeds["x"].shape}).load()
    for g, w in zip(compiled.run(feeds).values(), got, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("form", ["dynamo", "script"])
@pytest.mark.parametrize("kind", sorted(CLASSES))
def test_symbolic_length_compiled_once(rng, kind, form):
    """The Scan / Loop with the time axis symbolic: compiled once (a Relax loop function, not
    unrolled), run at 1, 7 and 50 steps against onnxruntime (rtol 1e-4, atol 1e-5)."""
    m = _model(rng, kind, keep=0.5, time_loop="scan" if form == "dynamo" else "python")
    all_feeds = clear_margin_feed_set(m, rng, (1, 7, 50))
    model_bytes = _export(m, form, 2)
    sess = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    art = bscompile.compile(onnx.load_from_string(model_bytes))
    # the input product, hoisted over all steps, is a dynamic site with the symbolic length as m;
    # the loop, its cell recognised, is one dynamic_recurrent site (the time loop in its kernel)
    sites = {w["kind"]: w for w in art.manifest.weights}
    assert sorted(sites) == ["dynamic_linear", "dynamic_recurrent"], sites
    assert not str(sites["dynamic_linear"]["m"]).isdigit(), sites
    rec = sites["dynamic_recurrent"]["attributes"]
    assert rec["cell"]["kind"] == kind and not str(rec["seq"]).isdigit(), rec
    compiled = art.load()
    for feeds in all_feeds:
        want = sess.run(None, feeds)
        got = list(compiled.run(feeds).values())
        assert len(got) == len(want)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5, err_msg=f"{len(feeds['x'])} steps")


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_fused_recurrence_with_any_pool_size(threads):
    """A gated layer large enough for the two-chunk schedule (one pool launch per sequence,
    barriers after the gate, the product and the cell update) matches onnxruntime with 1, 2
    or 3 pool threads (a fresh process with ``TVM_NUM_THREADS``): LSTM 180 in 36x36 tiles
    (the cell update's vectors leave a tail) and GRU 256 in 32x32, scan form, 1, 7 and 20 steps."""
    seed = int(np.random.SeedSequence().entropy % 2**32)
    script = f"""
import sys, numpy as np, onnx, onnxruntime as ort
sys.path.insert(0, {str(Path(__file__).parent)!r})
import test_dynamic_rnn as t
import bscompile
rng = np.random.default_rng({seed})
t.B = 1
for kind, hidden, block in (("lstm", 180, 36), ("gru", 256, 32)):
    t.IN, t.H, t.BS = 2 * block, hidden, block
    m = t._model(rng, kind, keep=0.5, time_loop="scan")
    all_feeds = t.clear_margin_feed_set(m, rng, (1, 7, 20))
    blob = t._export(m, "dynamo", 2)
    art = bscompile.compile(onnx.load_from_string(blob))
    (rec,) = [w for w in art.manifest.weights if w["kind"] == "dynamic_recurrent"]
    assert rec["decision"]["schedule"]["chunks"] == 2, rec["decision"]
    mod, sess = art.load(), ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    for feeds in all_feeds:
        for g, w in zip(mod.run(feeds).values(), sess.run(None, feeds), strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5, err_msg=f"{{kind}} {{len(feeds['x'])}} steps")
"""
    env = {**os.environ, "TVM_NUM_THREADS": str(threads)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"seed {seed}: {proc.stderr[-3000:]}"


@pytest.mark.parametrize("variant,batch", [(0, 1), (1, 1), (2, 1), (3, 1), (0, 3), (2, 3)])
def test_fused_recurrence_schedule_space(rng, monkeypatch, variant, batch):
    """Every schedule ``bscompile tune`` may pick for the fused recurrence -- two threads claiming
    output blocks (each tile read as two streams at batch 1 with AVX-512), serial, two threads on
    ranges split by predicted work, one stream a tile -- matches onnxruntime (rtol 1e-4, atol
    1e-5): LSTM 64 in 32x32 tiles, batch 1 and 3 (row groups), at 1, 7 and 20 steps."""
    from bscompile.codegen import cpu_dynamic_recurrent
    from bscompile.codegen.cpu_dynamic_recurrent import DynamicRecurrentGenerator
    from bscompile.target import resolve_target

    here = sys.modules[__name__]
    for name, value in (("IN", 64), ("H", 64), ("BS", 32), ("B", batch)):
        monkeypatch.setattr(here, name, value)
    monkeypatch.setattr(cpu_dynamic_recurrent, "PERSISTENT_MIN_WORK", 0)
    default, inside, picked = DynamicRecurrentGenerator.default_schedule, [], []

    def pick(self, site, stats, m):
        if inside:  # (schedule_space starts from the default)
            return default(self, site, stats, m)
        inside.append(1)
        space = self.schedule_space(site, None, m)
        inside.pop()
        assert len(space) == 3 + (space[0].streams > 1), space  # (two streams: batch 1 with AVX-512)
        picked.append(space[variant])
        return space[variant]

    monkeypatch.setattr(DynamicRecurrentGenerator, "default_schedule", pick)
    lanes = resolve_target("llvm").kernel_family().generators["dynamic_recurrent"].machine.lanes
    if variant == 3 and lanes < 16:
        pytest.skip("the fourth schedule (one stream a tile) exists where two are the default: AVX-512 hosts")
    m = _model(rng, "lstm", keep=0.5, time_loop="scan")
    all_feeds = clear_margin_feed_set(m, rng, (1, 7, 20))
    blob = _export(m, "dynamo", 2)
    art = bscompile.compile(onnx.load_from_string(blob))
    (rec,) = [w for w in art.manifest.weights if w["kind"] == "dynamic_recurrent"]
    assert rec["decision"]["schedule"] == picked[-1].to_json()
    mod, sess = art.load(), ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    for feeds in all_feeds:
        for g, w in zip(mod.run(feeds).values(), sess.run(None, feeds), strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5, err_msg=f"{picked[-1]}, {len(feeds['x'])} steps")


@pytest.mark.parametrize("kind", sorted(CLASSES))
def test_cuda_fused_recurrence_under_the_emulator(rng, tmp_path, kind):
    """The CUDA family's fused gated recurrence (a host loop over the symbolic steps around
    gate, selection, tile product and cell update launches) run by the CUDA emulator in a
    subprocess at 5 steps, in a random thread/block order, against onnxruntime."""
    m = _model(rng, kind, keep=0.5, time_loop="scan")
    feeds = clear_margin_feeds(m, rng, 5)
    model_bytes = _export(m, "dynamo", 2)
    (tmp_path / "m.onnx").write_bytes(model_bytes)
    art = bscompile.compile(onnx.load_from_string(model_bytes), target="cuda")
    assert "dynamic_recurrent" in [w["kind"] for w in art.manifest.weights]
    art.export(tmp_path / "m.bsc")
    out = emulate_and_check(tmp_path / "m.bsc", tmp_path / "m.onnx", feeds, tmp_path)
    assert "(ok, rtol 0.0001 atol 1e-05)" in out, out


@pytest.mark.parametrize("keep", [0.5, 0.03])
@pytest.mark.parametrize("kind", sorted(CLASSES))
def test_gated_char_lm_gathers_its_input_product(rng, tmp_path, kind, keep):
    """A character LM (embedding -> gated layer in its scan form -> linear): the gated product of
    the embedding rows is a gather from a folded table (FoldEmbeddingProducts), the recurrence one
    fused kernel, and no product is left to TVM's generic matmul (at keep 0.03 the input product
    keeps k = 1 tile a row); logits equal onnxruntime's (rtol 1e-4, atol 1e-5) at 1, 9 and 40
    characters whose every recurrent selection has a clear margin. The weights are fixed (whether
    the table folds depends on them only), the characters random."""
    from bscompile.models.charlm import CharLM
    from bscompile.models.reproduce import _LogitsOnly, export_run

    vocab = 30
    torch.manual_seed(1)  # (with seed 0 the keep-0.03 GRU's first step has no clear margin)
    lm = CharLM(vocab, emb=IN, hidden=H, layers=1, cell=f"dyn{kind}", block=BS, keep=keep).eval()
    with torch.no_grad():
        for lin in _products(lm.rnn):
            lin.gate.weight.mul_(10)
            lin.gate.bias.mul_(10)
    path = export_run(_LogitsOnly(lm), torch.zeros(1, 4, dtype=torch.int64), tmp_path / "lm.onnx")
    art = bscompile.compile(str(path))
    assert sorted(w["kind"] for w in art.manifest.weights) == ["dynamic_recurrent", "linear"], art.manifest.weights
    assert "matmul" not in art.executable.as_text()  # (a generic kernel's name)
    compiled, sess = art.load(), ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    table = lm.embed.weight.detach().numpy()
    zeros = np.zeros((1, 1, H), np.float32)
    for steps in (1, 9, 40):
        for _ in range(100):  # characters whose recurrent selections all have a clear margin
            tokens = rng.integers(0, vocab, (1, steps))
            if _reference(lm.rnn, {"x": table[tokens[0]][:, None], "h0": zeros, "c0": zeros})[1] > MARGIN:
                break
        else:
            raise AssertionError(f"no {steps} characters with a clear selection margin in 100 draws")
        np.testing.assert_allclose(compiled.run({"tokens": tokens})["logits"], sess.run(None, {"tokens": tokens})[0],
                                   rtol=1e-4, atol=1e-5, err_msg=f"{steps} characters")
