"""Recurrent cells that are not ONNX operators, as ONNX ``Scan`` and ``Loop`` graphs.

A minimal gated unit (Zhou et al. 2016), an LSTM with peepholes (Gers & Schmidhuber 2000)
and a layer-normalised tanh RNN (Ba et al. 2016), each written from primitive ops the way a
custom cell reaches ONNX: what the frontend's loop path and ``FuseLoopKernels`` are tested
on (tests/test_loops.py) and timed on (bench/custom_cells.py). onnx and NumPy only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper


def _mm(a: str, b: str, o: str) -> onnx.NodeProto:
    return helper.make_node("MatMul", [a, b], [o])


def _add(a: str, b: str, o: str) -> onnx.NodeProto:
    return helper.make_node("Add", [a, b], [o])


def _mgu(x: str, st: list[str], out: list[str]) -> list:
    """f = s(x Wf + h Uf + bf), n = tanh(x Wn + (f * h) Un + bn), h' = h + f * (n - h)."""
    h = st[0]
    return [_mm(x, "Wf", "xf"), _mm(h, "Uf", "hf"), _add("xf", "hf", "f0"), _add("f0", "bf", "f1"),
            helper.make_node("Sigmoid", ["f1"], ["f"]), helper.make_node("Mul", ["f", h], ["fh"]),
            _mm(x, "Wn", "xn"), _mm("fh", "Un", "hn"), _add("xn", "hn", "n0"), _add("n0", "bn", "n1"),
            helper.make_node("Tanh", ["n1"], ["n"]), helper.make_node("Sub", ["n", h], ["d"]),
            helper.make_node("Mul", ["f", "d"], ["fd"]), _add(h, "fd", out[0])]


def _peephole_lstm(x: str, st: list[str], out: list[str]) -> list:
    """Gates ``x W + h U + b`` split as i, f, g, o; i and f see c_{t-1}, o sees c_t."""
    h, c = st
    nodes = [_mm(x, "W4", "xw"), _mm(h, "U4", "hu"), _add("xw", "hu", "z0"), _add("z0", "b4", "z"),
             helper.make_node("Split", ["z", "split4"], ["zi", "zf", "zg", "zo"], axis=1)]
    for gate, peep in (("i", "pi"), ("f", "pf")):
        nodes += [helper.make_node("Mul", [peep, c], [f"p{gate}c"]), _add(f"z{gate}", f"p{gate}c", f"a{gate}"),
                  helper.make_node("Sigmoid", [f"a{gate}"], [gate])]
    return nodes + [helper.make_node("Tanh", ["zg"], ["g"]), helper.make_node("Mul", ["f", c], ["fc"]),
                    helper.make_node("Mul", ["i", "g"], ["ig"]), _add("fc", "ig", out[1]),
                    helper.make_node("Mul", ["po", out[1]], ["poc"]), _add("zo", "poc", "ao"),
                    helper.make_node("Sigmoid", ["ao"], ["o"]), helper.make_node("Tanh", [out[1]], ["tc"]),
                    helper.make_node("Mul", ["o", "tc"], [out[0]])]


def _layer_norm_rnn(x: str, st: list[str], out: list[str]) -> list:
    """h' = tanh(LayerNorm(x W + h U) * gamma + beta)."""
    return [_mm(x, "Wn", "xw"), _mm(st[0], "Un", "hu"), _add("xw", "hu", "z"),
            helper.make_node("LayerNormalization", ["z", "gamma", "beta"], ["zn"], axis=-1, epsilon=1e-5),
            helper.make_node("Tanh", ["zn"], [out[0]])]


@dataclass(frozen=True)
class Cell:
    """One step as ONNX nodes ``nodes(x, states, new_states)``, its state count and its weights."""

    nodes: Callable[[str, list[str], list[str]], list]
    states: int
    weights: Callable[[int, int], dict[str, tuple[int, ...]]]  # (input, hidden) -> name: shape


CELLS: dict[str, Cell] = {
    "mgu": Cell(_mgu, 1, lambda i, h: {"Wf": (i, h), "Uf": (h, h), "bf": (h,), "Wn": (i, h), "Un": (h, h),
                                      "bn": (h,)}),
    "peephole_lstm": Cell(_peephole_lstm, 2, lambda i, h: {"W4": (i, 4 * h), "U4": (h, 4 * h), "b4": (4 * h,),
                                                           "pi": (h,), "pf": (h,), "po": (h,)}),
    "layer_norm_rnn": Cell(_layer_norm_rnn, 1, lambda i, h: {"Wn": (i, h), "Un": (h, h), "gamma": (h,),
                                                             "beta": (h,)}),
}


def _weights(name: str, rng: np.random.Generator, in_features: int, hidden: int, scale: float) -> list:
    """Normal weights, ``scale / sqrt(fan-in)`` for matrices (``scale`` for vectors): at ``scale``
    about 2 and more, the recurrences are chaotic, and float rounding alone separates two libraries."""
    inits = [onnx.numpy_helper.from_array(
        (scale / np.sqrt(s[0] if len(s) == 2 else 1) * rng.standard_normal(s)).astype(np.float32), n)
        for n, s in CELLS[name].weights(in_features, hidden).items()]
    if name == "peephole_lstm":
        inits.append(onnx.numpy_helper.from_array(np.full(4, hidden, np.int64), "split4"))
    return inits


def _f(name: str, *shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def scan_model(name: str, rng: np.random.Generator, in_features: int, hidden: int, batch: int, steps: int | str,
               reverse: int = 0, out_axis: int = 0, scale: float = 1.0) -> onnx.ModelProto:
    """Cell ``name`` over ``x[batch, steps, in]`` (``steps`` a size or a symbolic name) as one
    ``Scan``: inputs ``x, h0, h1..``, outputs the final states ``hT0..`` then ``ys`` (the first
    state of every step, stacked along ``out_axis``)."""
    cell = CELLS[name]
    st, st1 = [f"state{i}" for i in range(cell.states)], [f"state{i}_next" for i in range(cell.states)]
    body = helper.make_graph(cell.nodes("xt", st, st1) + [helper.make_node("Identity", [st1[0]], ["y"])], "cell",
                             [_f(s, batch, hidden) for s in st] + [_f("xt", batch, in_features)],
                             [_f(s, batch, hidden) for s in st1] + [_f("y", batch, hidden)])
    scan = helper.make_node("Scan", [f"h{i}" for i in range(cell.states)] + ["x"],
                            [f"hT{i}" for i in range(cell.states)] + ["ys"], name=name, body=body,
                            num_scan_inputs=1, scan_input_axes=[1], scan_input_directions=[reverse],
                            scan_output_axes=[out_axis])
    ys = [steps, batch, hidden] if out_axis == 0 else [batch, steps, hidden]
    return _model(helper.make_graph(
        [scan], "g", [_f("x", batch, steps, in_features)] + [_f(f"h{i}", batch, hidden) for i in range(cell.states)],
        [_f(f"hT{i}", batch, hidden) for i in range(cell.states)] + [_f("ys", *ys)],
        initializer=_weights(name, rng, in_features, hidden, scale)))


def loop_model(name: str, rng: np.random.Generator, in_features: int, hidden: int, batch: int, steps: int,
               stop_above: float | None = None, scale: float = 1.0) -> onnx.ModelProto:
    """Cell ``name`` as a ``Loop`` body reading ``x[t]`` (``x[steps, batch, in]``) by the iteration
    number, with scan output ``ys``; with ``stop_above`` (one state), no scan output and the
    condition turning false once mean(h) exceeds it (a data-dependent exit, initializer ``lim``)."""
    cell = CELLS[name]
    st, st1 = [f"state{i}" for i in range(cell.states)], [f"state{i}_next" for i in range(cell.states)]
    nodes = [helper.make_node("Gather", ["x", "t"], ["xt"], axis=0)] + cell.nodes("xt", st, st1)
    outs = [helper.make_tensor_value_info("c1", TensorProto.BOOL, [])] + [_f(s, batch, hidden) for s in st1]
    if stop_above is None:
        nodes += [helper.make_node("Identity", ["c"], ["c1"]), helper.make_node("Identity", [st1[0]], ["y"])]
        outs.append(_f("y", batch, hidden))
    else:
        nodes += [helper.make_node("ReduceMean", [st1[0]], ["m"], keepdims=0),
                  helper.make_node("Less", ["m", "lim"], ["c1"])]
    body = helper.make_graph(nodes, "cell", [helper.make_tensor_value_info("t", TensorProto.INT64, []),
                                             helper.make_tensor_value_info("c", TensorProto.BOOL, [])]
                             + [_f(s, batch, hidden) for s in st], outs)
    inits = _weights(name, rng, in_features, hidden, scale) + [
        onnx.numpy_helper.from_array(np.array(steps, np.int64), "M"),
        onnx.numpy_helper.from_array(np.array(True), "cond0"),
        onnx.numpy_helper.from_array(np.array(stop_above or 0, np.float32), "lim")]
    loop_out = [f"hT{i}" for i in range(cell.states)] + (["ys"] if stop_above is None else [])
    loop = helper.make_node("Loop", ["M", "cond0"] + [f"h{i}" for i in range(cell.states)], loop_out,
                            name=f"{name}_loop", body=body)
    g_outs = [_f(f"hT{i}", batch, hidden) for i in range(cell.states)]
    g_outs += [_f("ys", steps, batch, hidden)] if stop_above is None else []
    return _model(helper.make_graph(
        [loop], "g", [_f("x", steps, batch, in_features)] + [_f(f"h{i}", batch, hidden) for i in range(cell.states)],
        g_outs, initializer=inits))


def initial_states(name: str, rng: np.random.Generator, batch: int, hidden: int) -> dict[str, np.ndarray]:
    """Random initial states ``h0..`` for a model of cell ``name``."""
    return {f"h{i}": rng.standard_normal((batch, hidden)).astype(np.float32) for i in range(CELLS[name].states)}
