"""ONNX Scan and Loop through bscompile's generic (unrolling) path vs onnxruntime and ONNX's own cases."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from onnx.backend.test.case.node import collect_testcases

import bscompile
from bscompile.errors import UnsupportedModelError

CASES = {c.name: c for c in collect_testcases() if c.model is not None
         and {n.op_type for n in c.model.graph.node} & {"Scan", "Loop"}}
#: ONNX's cases the unrolling path runs: a static scan length
RUNS = ["test_scan9_sum", "test_scan9_multi_state", "test_scan9_scalar"]
#: ... and those it refuses: a trip count known only at run time, Scan of opset 8
REFUSED = {"test_loop11": "Loop 'Loop_0': the trip count is not known when compiling",
           "test_range_float_type_positive_delta_expanded": "trip count is not known",
           "test_scan_sum": "unsupported op 'Scan' (opset 8 < 9) at node 'Scan_0'"}


@pytest.mark.parametrize("name", RUNS)
def test_backend_case(name):
    case = CASES[name]
    mod = bscompile.compile(case.model).load()
    for inputs, expected in case.data_sets:
        outs = list(mod.run(dict(zip([s.name for s in mod.inputs], inputs))).values())
        assert len(outs) == len(expected)
        for got, want in zip(outs, expected):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_backend_case_refused_with_one_line(name):
    with pytest.raises(UnsupportedModelError, match=REFUSED[name].replace("(", r"\(").replace(")", r"\)")) as err:
        bscompile.compile(CASES[name].model)
    assert "\n" not in str(err.value)


# A minimal gated unit (Zhou et al. 2016), not an ONNX op: f = s(x Wf + h Uf + bf),
# n = tanh(x Wn + (f * h) Un + bn), h' = (1 - f) * h + f * n.
IN, H, T, B = 8, 16, 5, 2


def _mgu_nodes(x: str, h: str, out: str) -> list:
    mm = lambda a, b, o: helper.make_node("MatMul", [a, b], [o])  # noqa: E731
    add = lambda a, b, o: helper.make_node("Add", [a, b], [o])  # noqa: E731
    return [mm(x, "Wf", "xf"), mm(h, "Uf", "hf"), add("xf", "hf", "s0"), add("s0", "bf", "s1"),
            helper.make_node("Sigmoid", ["s1"], ["f"]), helper.make_node("Mul", ["f", h], ["fh"]),
            mm(x, "Wn", "xn"), mm("fh", "Un", "hn"), add("xn", "hn", "n0"), add("n0", "bn", "n1"),
            helper.make_node("Tanh", ["n1"], ["n"]), helper.make_node("Sub", ["n", h], ["d"]),
            helper.make_node("Mul", ["f", "d"], ["fd"]), add(h, "fd", out)]


def _weights(rng) -> list:
    shapes = {"Wf": (IN, H), "Uf": (H, H), "bf": (H,), "Wn": (IN, H), "Un": (H, H), "bn": (H,)}
    return [onnx.numpy_helper.from_array((0.4 * rng.standard_normal(s)).astype(np.float32), n)
            for n, s in shapes.items()]


def _f(name, *shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def _mgu_scan(rng, reverse: int, out_axis: int) -> onnx.ModelProto:
    body = helper.make_graph(_mgu_nodes("xt", "h", "h1") + [helper.make_node("Identity", ["h1"], ["y"])], "cell",
                             [_f("h", B, H), _f("xt", B, IN)], [_f("h1", B, H), _f("y", B, H)])
    scan = helper.make_node("Scan", ["h0", "x"], ["hT", "ys"], name="mgu", body=body, num_scan_inputs=1,
                            scan_input_axes=[1], scan_input_directions=[reverse], scan_output_axes=[out_axis])
    ys = [T, B, H] if out_axis == 0 else [B, T, H]
    g = helper.make_graph([scan], "g", [_f("x", B, T, IN), _f("h0", B, H)], [_f("hT", B, H), _f("ys", *ys)],
                          initializer=_weights(rng))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _mgu_loop(rng, stop_above: float | None) -> onnx.ModelProto:
    """The cell as a Loop body indexing x[t] by the iteration number; with ``stop_above`` the
    condition turns false once mean(h) exceeds it (a data-dependent early exit)."""
    nodes = [helper.make_node("Gather", ["x", "t"], ["xt"], axis=0)] + _mgu_nodes("xt", "h", "h1")
    outs = [helper.make_tensor_value_info("c1", TensorProto.BOOL, []), _f("h1", B, H)]
    if stop_above is None:
        nodes += [helper.make_node("Identity", ["c"], ["c1"]), helper.make_node("Identity", ["h1"], ["y"])]
        outs.append(_f("y", B, H))
    else:
        nodes += [helper.make_node("ReduceMean", ["h1"], ["m"], keepdims=0),
                  helper.make_node("Less", ["m", "lim"], ["c1"])]
    body = helper.make_graph(nodes, "cell", [helper.make_tensor_value_info("t", TensorProto.INT64, []),
                                             helper.make_tensor_value_info("c", TensorProto.BOOL, []),
                                             _f("h", B, H)], outs)
    inits = _weights(rng) + [onnx.numpy_helper.from_array(np.array(T, np.int64), "M"),
                             onnx.numpy_helper.from_array(np.array(True), "cond0"),
                             onnx.numpy_helper.from_array(np.array(stop_above or 0, np.float32), "lim")]
    loop_out = ["hT"] + (["ys"] if stop_above is None else [])
    loop = helper.make_node("Loop", ["M", "cond0", "h0"], loop_out, name="mgu_loop", body=body)
    g_outs = [_f("hT", B, H)] + ([_f("ys", T, B, H)] if stop_above is None else [])
    g = helper.make_graph([loop], "g", [_f("x", T, B, IN), _f("h0", B, H)], g_outs, initializer=inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _check_against_ort(model: onnx.ModelProto, feeds: dict) -> None:
    onnx.checker.check_model(model, full_check=True)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    got = list(bscompile.compile(model).load().run(feeds).values())
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("reverse,out_axis", [(0, 0), (1, 1)], ids=["forward", "reverse-axis1"])
def test_custom_cell_as_scan(rng, reverse, out_axis):
    feeds = {"x": rng.standard_normal((B, T, IN)).astype(np.float32),
             "h0": rng.standard_normal((B, H)).astype(np.float32)}
    _check_against_ort(_mgu_scan(rng, reverse, out_axis), feeds)


def test_custom_cell_as_loop(rng):
    feeds = {"x": rng.standard_normal((T, B, IN)).astype(np.float32),
             "h0": rng.standard_normal((B, H)).astype(np.float32)}
    _check_against_ort(_mgu_loop(rng, None), feeds)


def test_loop_with_data_dependent_exit(rng):
    """The carried state freezes at the step the condition turns false, as onnxruntime stops there."""
    x = rng.standard_normal((T, B, IN)).astype(np.float32)
    h0 = rng.standard_normal((B, H)).astype(np.float32)
    model = _mgu_loop(rng, 0.0)
    means = []  # mean(h) after each step: pick a limit that stops the loop in the middle
    for t in range(1, T + 1):
        means.append(float(ort.InferenceSession(_with_trip(model, t).SerializeToString(),
                                                providers=["CPUExecutionProvider"]).run(None, {"x": x, "h0": h0})[0].mean()))
    # midway between two steps' means: a limit equal to one of them (the median of an odd count)
    # makes that step's Less a float tie, decided by the last bit of each library's mean
    lo, hi = sorted(means)[len(means) // 2 - 1: len(means) // 2 + 1]
    lim = (lo + hi) / 2
    model.graph.initializer[-1].CopyFrom(onnx.numpy_helper.from_array(np.array(lim, np.float32), "lim"))
    assert min(means) < lim < max(means)  # the exit happens before the last step
    _check_against_ort(model, {"x": x, "h0": h0})


def _with_trip(model: onnx.ModelProto, t: int) -> onnx.ModelProto:
    m = onnx.ModelProto.FromString(model.SerializeToString())
    for i, init in enumerate(m.graph.initializer):
        if init.name == "M":
            m.graph.initializer[i].CopyFrom(onnx.numpy_helper.from_array(np.array(t, np.int64), "M"))
        if init.name == "lim":
            m.graph.initializer[i].CopyFrom(onnx.numpy_helper.from_array(np.array(1e9, np.float32), "lim"))
    return m


def test_unsupported_op_in_body_names_op_and_node(rng):
    model = _mgu_scan(rng, 0, 0)
    body = model.graph.node[0].attribute[0].g
    body.node[4].op_type, body.node[4].domain, body.node[4].name = "Frobnicate", "com.example", "bad_sigmoid"
    with pytest.raises(UnsupportedModelError, match=r"'com.example.Frobnicate' at node 'bad_sigmoid' in the body of Scan 'mgu'"):
        bscompile.compile(model)


def test_symbolic_length_is_a_relax_loop(rng):
    """A symbolic scan length compiles once into a Relax loop function (not unrolled) whose body's
    weights are still weight sites; run at 1, 7, 50 and 5000 steps (rtol 1e-4, atol 1e-5: 5000
    steps overflowed the C stack when the VM recursed once per step); the static length given by
    --input-shape still unrolls."""
    model = _mgu_scan(rng, 1, 1)
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "time"
    art = bscompile.compile(model)
    assert sorted(w["name"] for w in art.manifest.weights) == ["Uf", "Un", "Wf", "Wn"]
    compiled = art.load()
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for steps in (1, 7, 50, 5000):
        feeds = {"x": rng.standard_normal((B, steps, IN)).astype(np.float32),
                 "h0": rng.standard_normal((B, H)).astype(np.float32)}
        want = sess.run(None, feeds)
        for g, w in zip(compiled.run(feeds).values(), want):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5, err_msg=f"{steps} steps")
    got = list(bscompile.compile(model, input_shapes={"x": (B, 3, IN)}).load().run(
        {"x": feeds["x"][:, :3], "h0": feeds["h0"]}).values())
    for g, w in zip(got, sess.run(None, {"x": feeds["x"][:, :3], "h0": feeds["h0"]})):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_symbolic_trip_count_loop(rng):
    """A Loop whose trip count is the (symbolic) length of x: one compiled loop for every length."""
    model = _mgu_loop(rng, None)
    g = model.graph
    g.input[0].type.tensor_type.shape.dim[0].dim_param = "time"
    g.output[1].type.tensor_type.shape.dim[0].dim_param = "time"
    g.node.insert(0, helper.make_node("Shape", ["x"], ["xs"], start=0, end=1))
    g.node.insert(1, helper.make_node("Squeeze", ["xs"], ["trip"]))
    g.node[2].input[0] = "trip"
    compiled = bscompile.compile(model).load()
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for steps in (1, 7, 50):
        feeds = {"x": rng.standard_normal((steps, B, IN)).astype(np.float32),
                 "h0": rng.standard_normal((B, H)).astype(np.float32)}
        for g_, w in zip(compiled.run(feeds).values(), sess.run(None, feeds)):
            np.testing.assert_allclose(g_, w, rtol=1e-4, atol=1e-5, err_msg=f"{steps} steps")
