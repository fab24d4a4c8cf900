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


def _mgu_cell(x: str, st: list[str], out: list[str]) -> list:
    return _mgu_nodes(x, st[0], out[0])


def _peephole_lstm_cell(x: str, st: list[str], out: list[str]) -> list:
    """An LSTM with peepholes (Gers & Schmidhuber 2000) from primitive ops: i and f see c_{t-1},
    o sees c_t; gates ``x W + h U + b`` split in the order i, f, g, o."""
    h, c = st
    nodes = [helper.make_node("MatMul", [x, "W4"], ["xw"]), helper.make_node("MatMul", [h, "U4"], ["hu"]),
             helper.make_node("Add", ["xw", "hu"], ["z0"]), helper.make_node("Add", ["z0", "b4"], ["z"]),
             helper.make_node("Split", ["z", "split4"], ["zi", "zf", "zg", "zo"], axis=1)]
    for gate, peep, cell_state in (("i", "pi", c), ("f", "pf", c)):
        nodes += [helper.make_node("Mul", [peep, cell_state], [f"p{gate}c"]),
                  helper.make_node("Add", [f"z{gate}", f"p{gate}c"], [f"a{gate}"]),
                  helper.make_node("Sigmoid", [f"a{gate}"], [gate])]
    nodes += [helper.make_node("Tanh", ["zg"], ["g"]), helper.make_node("Mul", ["f", c], ["fc"]),
              helper.make_node("Mul", ["i", "g"], ["ig"]), helper.make_node("Add", ["fc", "ig"], [out[1]]),
              helper.make_node("Mul", ["po", out[1]], ["poc"]), helper.make_node("Add", ["zo", "poc"], ["ao"]),
              helper.make_node("Sigmoid", ["ao"], ["o"]), helper.make_node("Tanh", [out[1]], ["tc"]),
              helper.make_node("Mul", ["o", "tc"], [out[0]])]
    return nodes


def _layer_norm_cell(x: str, st: list[str], out: list[str]) -> list:
    """A layer-normalised tanh RNN (Ba et al. 2016): ``h' = tanh(LN(x W + h U) * gamma + beta)``."""
    return [helper.make_node("MatMul", [x, "Wn"], ["xw"]), helper.make_node("MatMul", [st[0], "Un"], ["hu"]),
            helper.make_node("Add", ["xw", "hu"], ["z"]),
            helper.make_node("LayerNormalization", ["z", "gamma", "beta"], ["zn"], axis=-1, epsilon=1e-5),
            helper.make_node("Tanh", ["zn"], [out[0]])]


#: cell name -> (nodes of one step, number of states, weight shapes)
CELLS = {
    "mgu": (_mgu_cell, 1, {"Wf": (IN, H), "Uf": (H, H), "bf": (H,), "Wn": (IN, H), "Un": (H, H), "bn": (H,)}),
    "peephole_lstm": (_peephole_lstm_cell, 2, {"W4": (IN, 4 * H), "U4": (H, 4 * H), "b4": (4 * H,), "pi": (H,),
                                              "pf": (H,), "po": (H,)}),
    "layer_norm_rnn": (_layer_norm_cell, 1, {"Wn": (IN, H), "Un": (H, H), "gamma": (H,), "beta": (H,)}),
}


def _weights(rng, cell: str = "mgu") -> list:
    inits = [onnx.numpy_helper.from_array((0.4 * rng.standard_normal(s)).astype(np.float32), n)
             for n, s in CELLS[cell][2].items()]
    if cell == "peephole_lstm":
        inits.append(onnx.numpy_helper.from_array(np.full(4, H, np.int64), "split4"))
    return inits


def _f(name, *shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def _cell_scan(rng, reverse: int, out_axis: int, cell: str = "mgu") -> onnx.ModelProto:
    """``cell`` over x[B, T, IN] as one Scan: states ``s0..`` (their finals ``sT..``), outputs ``ys``
    (the first state of every step)."""
    nodes_fn, n_states, _ = CELLS[cell]
    st, st1 = [f"state{i}" for i in range(n_states)], [f"state{i}_next" for i in range(n_states)]
    body = helper.make_graph(nodes_fn("xt", st, st1) + [helper.make_node("Identity", [st1[0]], ["y"])], "cell",
                             [_f(s, B, H) for s in st] + [_f("xt", B, IN)], [_f(s, B, H) for s in st1] + [_f("y", B, H)])
    scan = helper.make_node("Scan", [f"h{i}" for i in range(n_states)] + ["x"],
                            [f"hT{i}" for i in range(n_states)] + ["ys"], name=cell, body=body, num_scan_inputs=1,
                            scan_input_axes=[1], scan_input_directions=[reverse], scan_output_axes=[out_axis])
    ys = [T, B, H] if out_axis == 0 else [B, T, H]
    g = helper.make_graph([scan], "g", [_f("x", B, T, IN)] + [_f(f"h{i}", B, H) for i in range(n_states)],
                          [_f(f"hT{i}", B, H) for i in range(n_states)] + [_f("ys", *ys)],
                          initializer=_weights(rng, cell))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _mgu_scan(rng, reverse: int, out_axis: int) -> onnx.ModelProto:
    return _cell_scan(rng, reverse, out_axis)


def _cell_loop(rng, stop_above: float | None, cell: str = "mgu") -> onnx.ModelProto:
    """``cell`` as a Loop body indexing x[t] by the iteration number; with ``stop_above`` (one
    state) the condition turns false once mean(h) exceeds it (a data-dependent early exit)."""
    nodes_fn, n_states, _ = CELLS[cell]
    st, st1 = [f"state{i}" for i in range(n_states)], [f"state{i}_next" for i in range(n_states)]
    nodes = [helper.make_node("Gather", ["x", "t"], ["xt"], axis=0)] + nodes_fn("xt", st, st1)
    outs = [helper.make_tensor_value_info("c1", TensorProto.BOOL, [])] + [_f(s, B, H) for s in st1]
    if stop_above is None:
        nodes += [helper.make_node("Identity", ["c"], ["c1"]), helper.make_node("Identity", [st1[0]], ["y"])]
        outs.append(_f("y", B, H))
    else:
        nodes += [helper.make_node("ReduceMean", [st1[0]], ["m"], keepdims=0),
                  helper.make_node("Less", ["m", "lim"], ["c1"])]
    body = helper.make_graph(nodes, "cell", [helper.make_tensor_value_info("t", TensorProto.INT64, []),
                                             helper.make_tensor_value_info("c", TensorProto.BOOL, [])]
                             + [_f(s, B, H) for s in st], outs)
    inits = _weights(rng, cell) + [onnx.numpy_helper.from_array(np.array(T, np.int64), "M"),
                                   onnx.numpy_helper.from_array(np.array(True), "cond0"),
                                   onnx.numpy_helper.from_array(np.array(stop_above or 0, np.float32), "lim")]
    loop_out = [f"hT{i}" for i in range(n_states)] + (["ys"] if stop_above is None else [])
    loop = helper.make_node("Loop", ["M", "cond0"] + [f"h{i}" for i in range(n_states)], loop_out,
                            name=f"{cell}_loop", body=body)
    g_outs = [_f(f"hT{i}", B, H) for i in range(n_states)] + ([_f("ys", T, B, H)] if stop_above is None else [])
    g = helper.make_graph([loop], "g", [_f("x", T, B, IN)] + [_f(f"h{i}", B, H) for i in range(n_states)], g_outs,
                          initializer=inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _states(rng, cell: str) -> dict:
    return {f"h{i}": rng.standard_normal((B, H)).astype(np.float32) for i in range(CELLS[cell][1])}


def _check_against_ort(model: onnx.ModelProto, feeds: dict) -> None:
    onnx.checker.check_model(model, full_check=True)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    got = list(bscompile.compile(model).load().run(feeds).values())
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cell", sorted(CELLS))
@pytest.mark.parametrize("reverse,out_axis", [(0, 0), (1, 1)], ids=["forward", "reverse-axis1"])
def test_custom_cell_as_scan(rng, reverse, out_axis, cell):
    """A minimal gated unit, an LSTM with peepholes and a layer-normalised RNN, none an ONNX op."""
    feeds = {"x": rng.standard_normal((B, T, IN)).astype(np.float32), **_states(rng, cell)}
    _check_against_ort(_cell_scan(rng, reverse, out_axis, cell), feeds)


@pytest.mark.parametrize("cell", sorted(CELLS))
def test_custom_cell_as_loop(rng, cell):
    feeds = {"x": rng.standard_normal((T, B, IN)).astype(np.float32), **_states(rng, cell)}
    _check_against_ort(_cell_loop(rng, None, cell), feeds)


def test_loop_with_data_dependent_exit(rng):
    """The carried state freezes at the step the condition turns false, as onnxruntime stops there."""
    x = rng.standard_normal((T, B, IN)).astype(np.float32)
    h0 = rng.standard_normal((B, H)).astype(np.float32)
    model = _cell_loop(rng, 0.0)
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


@pytest.mark.parametrize("cell", sorted(CELLS))
def test_symbolic_length_is_a_relax_loop(rng, cell):
    """A symbolic scan length compiles once into a Relax loop function (not unrolled) whose body's
    weight matrices are still weight sites; run at 1, 7, 50 and 5000 steps (rtol 1e-4, atol 1e-5:
    5000 steps overflowed the C stack when the VM recursed once per step); the static length given
    by --input-shape still unrolls."""
    model = _cell_scan(rng, 1, 1, cell)
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "time"
    art = bscompile.compile(model)
    assert sorted(w["name"] for w in art.manifest.weights) == sorted(n for n, s in CELLS[cell][2].items() if len(s) == 2)
    compiled = art.load()
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for steps in (1, 7, 50, 5000):
        feeds = {"x": rng.standard_normal((B, steps, IN)).astype(np.float32), **_states(rng, cell)}
        want = sess.run(None, feeds)
        for g, w in zip(compiled.run(feeds).values(), want):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5, err_msg=f"{steps} steps")
    feeds["x"] = feeds["x"][:, :3]
    got = list(bscompile.compile(model, input_shapes={"x": (B, 3, IN)}).load().run(feeds).values())
    for g, w in zip(got, sess.run(None, feeds)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_symbolic_trip_count_loop(rng):
    """A Loop whose trip count is the (symbolic) length of x: one compiled loop for every length."""
    model = _cell_loop(rng, None)
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
