"""DynamicBlockLinear: PyTorch vs the NumPy reference vs onnxruntime (both exporters), gradients.

Selection is a discontinuous function of the gate scores: where the k-th and (k+1)-th
scores of a row differ by less than float rounding, PyTorch, onnxruntime and NumPy may
legitimately keep different tiles. Numerics are therefore compared on inputs whose rows
have a clear margin there (rows without one are redrawn); near-ties get their own test
that only checks outputs stay finite and bounded.
"""

import io
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch", reason="torch is in the 'test' extra")

from bscompile.codegen import dynamic_layout as dl  # noqa: E402
from bscompile.models import DynamicBlockLinear  # noqa: E402

IN, OUT, BS = 256, 384, 64  # nbi 4, nbo 6, N 24
MARGIN = 1e-3  # gate units; float32 gate products here differ by ~1e-6 between libraries


def _model(rng, keep: float, static: bool) -> DynamicBlockLinear:
    torch.manual_seed(int(rng.integers(2**31)))
    m = DynamicBlockLinear(IN, OUT, block=BS, keep=keep).eval()
    if static:
        alive = rng.random((IN // BS, OUT // BS)) >= 0.3
        alive[0, 0] = True
        m.set_block_mask(torch.from_numpy(alive))
    return m


def _gate_scores(m: DynamicBlockLinear, x: np.ndarray) -> np.ndarray:
    g = x.astype(np.float64) @ m.gate.weight.detach().double().numpy().T + m.gate.bias.detach().double().numpy()
    if m.block_mask is not None:
        g = np.where(m.block_mask.reshape(-1).numpy(), g, -np.inf)
    return g


def clear_margin_inputs(m: DynamicBlockLinear, rng, batch: int) -> np.ndarray:
    """``x[batch, IN]`` whose rows all separate the k-th and (k+1)-th gate score by MARGIN."""
    rows = []
    while len(rows) < batch:
        x = rng.standard_normal((4 * batch, IN)).astype(np.float32)
        srt = -np.sort(-_gate_scores(m, x), axis=1)
        k = m.k
        gap = srt[:, k - 1] - (srt[:, k] if k < srt.shape[1] else -np.inf)
        # the normalising sum must also be well away from zero
        ok = (gap > MARGIN) & (np.where(np.isfinite(srt[:, :k]), srt[:, :k], 0).sum(1) > 0.5)
        rows.extend(x[ok])
    return np.stack(rows[:batch])


def _reference(m: DynamicBlockLinear, x: np.ndarray):
    alive = None if m.block_mask is None else m.block_mask.reshape(-1).numpy()
    return dl.dynamic_linear(x, m.weight.detach().numpy(), m.gate.weight.detach().numpy(),
                             m.gate.bias.detach().numpy(), m.bias.detach().numpy(), BS, m.k, alive)


def _export(m: DynamicBlockLinear, dynamo: bool) -> bytes:
    x = torch.randn(2, IN)
    if dynamo:
        pytest.importorskip("onnxscript", reason="the dynamo exporter needs onnxscript (in the 'test' extra)")
        prog = torch.onnx.export(m, (x,), dynamo=True, input_names=["x"], output_names=["y"],
                                 dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
        return prog.model_proto.SerializeToString()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, (x,), buf, dynamo=False, input_names=["x"], output_names=["y"], opset_version=17,
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    return buf.getvalue()


def _ort(model_bytes: bytes, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("keep,static", [(0.5, False), (0.25, True)], ids=["keep0.5", "keep0.25-static"])
def test_pytorch_numpy_onnxruntime_agree(rng, dynamo, keep, static):
    m = _model(rng, keep, static)
    model_bytes = _export(m, dynamo)
    ops = {n.op_type for n in onnx.load_from_string(model_bytes).graph.node}
    assert {"TopK", "GreaterOrEqual"} <= ops, ops  # the threshold form, in standard ops
    for batch in (1, 5):  # the batch dimension is symbolic in the file
        x = clear_margin_inputs(m, rng, batch)
        y_ref, r_ref = _reference(m, x)
        with torch.no_grad():
            y_pt = m(torch.from_numpy(x)).numpy()
            r_pt = m.gates(torch.from_numpy(x)).numpy()
        assert ((r_pt != 0).sum(1) == m.k).all()  # clear margins: exactly k tiles per row
        if static:
            assert not (r_pt[:, ~m.block_mask.reshape(-1).numpy()]).any()
        np.testing.assert_allclose(r_pt, r_ref, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(y_pt, y_ref, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(_ort(model_bytes, x), y_pt, rtol=1e-4, atol=1e-5)


def test_near_ties_stay_finite_and_bounded(rng):
    """Gate scores tied or one ulp apart at the k-th value: libraries may keep different
    tiles (ties keep all tied tiles in every one of them); outputs must stay finite and
    within the bound sum_i |x_i W_oi| * max r + |bias|."""
    m = _model(rng, 0.5, False)
    with torch.no_grad():
        m.gate.weight.zero_()
        base = np.float32(0.75)
        vals = np.full(m.num_tiles, base, np.float32)
        vals[::3] = np.nextafter(base, np.float32(1))  # one ulp above
        vals[1::3] = np.nextafter(base, np.float32(0))  # one ulp below
        m.gate.bias.copy_(torch.from_numpy(rng.permutation(vals)))
    x = rng.standard_normal((3, IN)).astype(np.float32)
    model_bytes = _export(m, dynamo=False)
    w = m.weight.detach().numpy()
    bound = np.abs(x) @ np.abs(w).T * (m.num_tiles / m.k) * 1.01 + np.abs(m.bias.detach().numpy())
    with torch.no_grad():
        outs = {"torch": m(torch.from_numpy(x)).numpy(), "ort": _ort(model_bytes, x), "numpy": _reference(m, x)[0]}
    for name, y in outs.items():
        assert np.isfinite(y).all(), name
        assert (np.abs(y) <= bound).all(), name
    # all-equal scores: every tile ties with the k-th value, all are kept with r = 1
    with torch.no_grad():
        m.gate.bias.fill_(0.5)
        r = m.gates(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(r, np.ones_like(r))
    np.testing.assert_array_equal(dl.select(np.full((1, 8), 0.5, np.float32), 3), np.ones((1, 8), bool))


def test_gradients_flow_through_kept_gates_only(rng):
    m = _model(rng, 0.25, False)
    x = torch.from_numpy(clear_margin_inputs(m, rng, 1)).double()
    m = m.double()
    kept = (m.gates(x) != 0).numpy()[0]

    # d y / d (gate weight, gate bias) through selection and normalisation, vs finite differences
    def f(gw, gb):
        return torch.func.functional_call(m, {"gate.weight": gw, "gate.bias": gb}, (x,))

    gw = m.gate.weight.detach().clone().requires_grad_()
    gb = m.gate.bias.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(f, (gw, gb), eps=1e-7, atol=1e-5)

    # dropped gates (and their tiles) get no gradient, kept ones do
    c = torch.randn(1, OUT, dtype=torch.float64)
    (m(x) * c).sum().backward()
    gb_grad = m.gate.bias.grad.numpy()
    assert (gb_grad[~kept] == 0).all() and (gb_grad[kept] != 0).all()
    wgrad = m.weight.grad.numpy().reshape(m.nbo, BS, m.nbi, BS)
    tile_grad = np.abs(wgrad).sum(axis=(1, 3)).T.reshape(-1)  # index ib * nbo + ob
    assert (tile_grad[~kept] == 0).all() and (tile_grad[kept] > 0).all()


def test_block_mask_rejects_wrong_shape():
    m = DynamicBlockLinear(128, 256, block=64)
    with pytest.raises(ValueError, match="block mask"):
        m.set_block_mask(torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="divide"):
        DynamicBlockLinear(100, 256, block=64)


def test_packing_round_trips(rng):
    w = rng.standard_normal((OUT, IN)).astype(np.float32)
    t = dl.pack_tiles(w, BS)
    assert t.shape == (OUT // BS, IN // BS, BS, BS)
    ob, ib, p, q = 2, 3, 5, 7
    assert t[ob, ib, p, q] == w[ob * BS + q, ib * BS + p]
    np.testing.assert_array_equal(dl.unpack_tiles(t), w)
    t = dl.pack_tiles(w, BS, panel=16)
    assert t.shape == (OUT // BS, IN // BS, BS // 16, BS, 16)
    assert t[ob, ib, 2, p, q] == w[ob * BS + 2 * 16 + q, ib * BS + p]
    np.testing.assert_array_equal(dl.unpack_tiles(t), w)
    gw = rng.standard_normal((24, IN)).astype(np.float32)
    gp = dl.pack_gate(gw)
    assert gp.shape == (2, IN, dl.GATE_ROWS)
    np.testing.assert_array_equal(gp[1, :, :8].T, gw[16:])
    assert (gp[1, :, 8:] == 0).all()


def test_quality_study_compute_accounting():
    """The LM comparison matches compute: a dynamic layer costs keep + in/bs^2 of dense,
    BP and the narrower dense model are sized to that."""
    from bscompile.models.dynamic_lm import Run, compute_fraction, dense_width

    d_in, h, bs = 512, 512, 64
    dyn = compute_fraction(Run("dynamic", h, 0.5), d_in, h, bs)
    assert dyn == pytest.approx(0.5 + d_in / bs**2)
    assert compute_fraction(Run("bp", h, dyn), d_in, h, bs) == pytest.approx(dyn)
    w = dense_width(dyn, d_in, h, multiple=1)
    assert compute_fraction(Run("dense", w, 1.0), d_in, h, bs) == pytest.approx(dyn, rel=0.01)
    # d_in != h (the recurrent study: embedding 64 -> hidden 512): each product's gate costs in/bs^2 of it
    d_in = 64
    gated = d_in * h * d_in / bs**2 + h * h * h / bs**2
    assert compute_fraction(Run("dynamic", h, 0.5), d_in, h, bs) == pytest.approx(0.5 + gated / (d_in * h + h * h))


@pytest.mark.parametrize("static", [False, True], ids=["no-mask", "static-mask"])
def test_cpu_kernel_matches_onnxruntime_on_the_exported_file(rng, static):
    """End to end: the layer's file on onnxruntime vs the dynamic-site kernel fed with the
    layer's weights packed by dynamic_layout (rtol 1e-4, atol 1e-5, clear-margin inputs)."""
    import tvm

    from bscompile.codegen import cpu_dynamic
    from bscompile.target import resolve_target

    m = _model(rng, 0.25, static)
    batch = 3
    x = clear_margin_inputs(m, rng, batch)
    want = _ort(_export(m, dynamo=False), x)
    alive = None if m.block_mask is None else m.block_mask.reshape(-1).numpy()
    sched = cpu_dynamic.default_schedule(dl.DynamicShape(IN, OUT, BS, m.k), batch)
    func = cpu_dynamic.dynamic_linear_kernel(IN, OUT, BS, m.k, batch, sched, m.n_alive)
    fn = tvm.compile(tvm.IRModule({"k": func.with_attr("global_symbol", "k")}),
                     target=resolve_target("llvm").tvm_target())["k"]
    args = (x, dl.pack_tiles(m.weight.detach().numpy(), BS, sched.rows_tile), dl.pack_gate(m.gate.weight.detach().numpy()),
            dl.pad_gate_bias(m.gate.bias.detach().numpy(), alive), m.bias.detach().numpy())
    y = tvm.runtime.empty((batch, OUT), "float32")
    fn(*[tvm.runtime.tensor(a) for a in args], y)
    np.testing.assert_allclose(y.numpy(), want, rtol=1e-4, atol=1e-5)
