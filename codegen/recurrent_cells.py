"""Gate arithmetic of ONNX GRU / LSTM / RNN cells as TIR expressions.

The recurrent kernels compute the mat-vec ``g = R h + Rb`` for every gate at once;
this module supplies the per-element update that follows it, fused into one pass,
exactly as the ONNX operator specification writes it (gate orders ``zrh`` for GRU,
``iofc`` for LSTM, peepholes ``iof``; ``clip`` on every activation input).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from tvm.script import tirx as T

_F = T.float32

#: Lanes of the recurrent kernels' vectorised gate update (8 fp32 = one AVX2 register, two
#: NEON registers) unless a register holds more (:func:`update_lanes`).
GATE_LANES = 8


def update_lanes(vector_lanes: int) -> int:
    """The gate update's vector width on a machine of ``vector_lanes`` fp32 lanes: one register
    where that holds at least :data:`GATE_LANES`. AVX-512 (16): LSTM 1024's update 4.0 -> 2.9 us
    a step, 512's 1.7 -> 1.2 us (2 threads, AMD EPYC), bit for bit the same."""
    return max(GATE_LANES, vector_lanes)


def vexp(x):
    """``exp(x)`` for float32 in plain arithmetic, so the gate loop vectorises.

    LLVM turns ``T.exp`` into one libm call per element (it has no vector math
    library here), which made the gate update cost more than the sparse mat-vec;
    TVM's ``topi.fast_exp`` exists only as a tensor op, not as an expression a fused
    kernel can use. Cody-Waite range reduction ``x = n ln2 + r``, ``|r| <= ln2/2``,
    and a degree-6 Taylor polynomial: relative error below 2e-7 (about one ulp).
    """
    x = T.max(T.min(x, _F(88.3762626647949)), _F(-87.3365478515625))
    n = T.floor(x * _F(1.4426950408889634) + _F(0.5))
    r = x - n * _F(0.693359375) + n * _F(2.12194440e-4)
    p = _F(1.0 / 720)
    for coef in (1.0 / 120, 1.0 / 24, 1.0 / 6, 0.5, 1.0, 1.0):
        p = p * r + _F(coef)
    return p * T.reinterpret("float32", T.shift_left(T.Cast("int32", n) + 127, 23))


def _sigmoid(x, a, b):
    return _F(1) / (_F(1) + vexp(-x))


def _tanh(x):
    # 1 - 2 / (e^{2x} + 1): exact limits at +-inf, absolute error ~1e-7 near 0
    return _F(1) - _F(2) / (vexp(x * _F(2)) + _F(1))


#: ONNX activation name -> (x, alpha, beta) -> expression. Defaults per the ONNX spec.
ACTIVATIONS: dict[str, tuple[Callable, float | None, float | None]] = {
    "Sigmoid": (_sigmoid, None, None),
    "Tanh": (lambda x, a, b: _tanh(x), None, None),
    "Relu": (lambda x, a, b: T.max(x, _F(0)), None, None),
    "LeakyRelu": (lambda x, a, b: T.Select(x >= _F(0), x, x * _F(a)), 0.01, None),
    "ThresholdedRelu": (lambda x, a, b: T.Select(x > _F(a), x, _F(0)), 1.0, None),
    "HardSigmoid": (lambda x, a, b: T.max(_F(0), T.min(_F(1), x * _F(a) + _F(b))), 0.2, 0.5),
    "Affine": (lambda x, a, b: x * _F(a) + _F(b), 1.0, 0.0),
    "ScaledTanh": (lambda x, a, b: _F(a) * _tanh(x * _F(b)), 1.0, 1.0),
    "Elu": (lambda x, a, b: T.Select(x >= _F(0), x, _F(a) * (vexp(x) - _F(1))), 1.0, None),
    "Softsign": (lambda x, a, b: x / (_F(1) + T.fabs(x)), None, None),
    "Softplus": (lambda x, a, b: T.log(_F(1) + T.exp(x)), None, None),
}

_DEFAULT_ACTS = {"gru": ("Sigmoid", "Tanh"), "lstm": ("Sigmoid", "Tanh", "Tanh"), "rnn": ("Tanh",)}
_GATES = {"gru": 3, "lstm": 4, "rnn": 1}


@dataclass(frozen=True)
class Activation:
    name: str
    alpha: float | None = None
    beta: float | None = None

    def __call__(self, x):
        fn, a0, b0 = ACTIVATIONS[self.name]
        a = self.alpha if self.alpha is not None else a0
        b = self.beta if self.beta is not None else b0
        return fn(x, a, b)


@dataclass(frozen=True)
class CellSpec:
    """One direction of an ONNX recurrent layer."""

    kind: str  # "gru" | "lstm" | "rnn"
    hidden: int
    reverse: bool = False
    linear_before_reset: bool = False
    input_forget: bool = False
    clip: float | None = None
    activations: tuple[Activation, ...] = field(default=())
    #: where each gate of the ONNX order (``zrh``, ``iofc``) sits among the columns of the
    #: products, in gates of ``hidden``: None is the ONNX order itself; PyTorch's cells
    #: (``rzn``, ``ifgo``) are ``(1, 0, 2)`` and ``(0, 3, 1, 2)``
    gate_order: tuple[int, ...] | None = None

    def __post_init__(self):
        if not self.activations:
            object.__setattr__(self, "activations", tuple(Activation(a) for a in _DEFAULT_ACTS[self.kind]))

    @property
    def num_gates(self) -> int:
        return _GATES[self.kind]

    @staticmethod
    def num_activations(kind: str) -> int:
        return len(_DEFAULT_ACTS[kind])

    def offset(self, gate: int) -> int:
        """First column of ONNX gate ``gate`` in the products."""
        return (self.gate_order[gate] if self.gate_order else gate) * self.hidden

    def clip_expr(self, x):
        if self.clip is None:
            return x
        return T.max(T.min(x, _F(self.clip)), _F(-self.clip))

    def f_act(self, x):
        return self.activations[0](x)

    def g_act(self, x):
        return self.activations[1](x)

    def h_act(self, x):
        return self.activations[2](x)

    @classmethod
    def from_json(cls, d: dict) -> "CellSpec":
        acts = tuple(Activation(**a) for a in d["activations"])
        order = d.get("gate_order")
        return cls(d["kind"], d["hidden"], d["reverse"], d["linear_before_reset"], d["input_forget"],
                   d["clip"], acts, tuple(order) if order else None)

    def to_json(self) -> dict:
        return {
            "kind": self.kind, "hidden": self.hidden, "reverse": self.reverse,
            "linear_before_reset": self.linear_before_reset, "input_forget": self.input_forget,
            "clip": self.clip,
            "activations": [{"name": a.name, "alpha": a.alpha, "beta": a.beta} for a in self.activations],
        } | ({"gate_order": list(self.gate_order)} if self.gate_order else {})


def gate_update(cell: CellSpec):
    """Macro ``step(xp, g, h, c, peep, y, b, j, tt, g1)`` updating ``h[b, j]`` (and ``c``).

    ``g`` holds ``R h + Rb`` for all gates; for a GRU without linear-before-reset the
    candidate row ``R_h (r * h) + Rb_h`` sits at column ``g1 + j``.
    """
    H = cell.hidden
    o0, o1, o2, o3 = [cell.offset(q) for q in range(cell.num_gates)] + [0] * (4 - cell.num_gates)
    clip, f, gg = cell.clip_expr, cell.f_act, cell.g_act

    if cell.kind == "rnn":

        @T.macro
        def step(xp, g, h, c, peep, y, b, j, tt, g1):
            hn = T.Bind(f(clip(xp[tt, b, j] + g[b, j])))
            h[b, j] = hn
            y[tt, b, j] = hn

        return step

    if cell.kind == "gru":
        if cell.linear_before_reset:  # candidate = g(x_h + r * (R_h h + Rb_h))
            def candidate(xp, g, rg, b, j, tt, g1):
                return gg(clip(xp[tt, b, o2 + j] + rg * g[b, o2 + j]))
        else:  # candidate = g(x_h + R_h (r * h) + Rb_h), computed by the second mat-vec
            def candidate(xp, g, rg, b, j, tt, g1):
                return gg(clip(xp[tt, b, o2 + j] + g[b, g1 + j]))

        @T.macro
        def step(xp, g, h, c, peep, y, b, j, tt, g1):
            z = T.Bind(f(clip(xp[tt, b, o0 + j] + g[b, o0 + j])))
            rg = T.Bind(f(clip(xp[tt, b, o1 + j] + g[b, o1 + j])))
            cand = T.Bind(candidate(xp, g, rg, b, j, tt, g1))
            hn = T.Bind((_F(1) - z) * cand + z * h[b, j])
            h[b, j] = hn
            y[tt, b, j] = hn

        return step

    hh = cell.h_act
    if cell.input_forget:  # coupled input and forget gates
        def forget(xp, g, peep, ig, cp, b, j, tt):
            return _F(1) - ig
    else:
        def forget(xp, g, peep, ig, cp, b, j, tt):
            return f(clip(xp[tt, b, o2 + j] + g[b, o2 + j] + peep[2 * H + j] * cp))

    @T.macro
    def step(xp, g, h, c, peep, y, b, j, tt, g1):
        cp = T.Bind(c[b, j])
        ig = T.Bind(f(clip(xp[tt, b, o0 + j] + g[b, o0 + j] + peep[j] * cp)))
        fg = T.Bind(forget(xp, g, peep, ig, cp, b, j, tt))
        ct = T.Bind(gg(clip(xp[tt, b, o3 + j] + g[b, o3 + j])))
        cn = T.Bind(fg * cp + ig * ct)
        og = T.Bind(f(clip(xp[tt, b, o1 + j] + g[b, o1 + j] + peep[H + j] * cn)))
        hn = T.Bind(og * hh(cn))
        c[b, j] = cn
        h[b, j] = hn
        y[tt, b, j] = hn

    return step
