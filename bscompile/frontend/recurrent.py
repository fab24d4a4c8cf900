"""Converters for ONNX ``GRU``, ``LSTM`` and ``RNN``, which TVM's Relax frontend lacks.

Each direction of a layer becomes two things:

1. the input projection over all time steps, ``xp = X[T*B, I] @ W_d.T + bias``: for a
   constant weight a ``linear`` site made here as ``OutlineLinearSites`` makes one
   (``W_d`` is already in the site's ``[N, K]`` orientation: a ``matmul`` would need its
   transpose made and then undone, two copies of the largest weights), else a ``matmul``;
2. a ``recurrent`` weight site (:func:`bscompile.sites.emit_site`) for the recurrence
   with the recurrent weight ``R_d``: lowered to one generated kernel per direction
   with the time loop inside it (the target family's ``recurrent`` generator).

The recurrent site's operands are ``[xp, R, Rb, h0, c0, seq_lens, peep]``; a GRU
without linear-before-reset multiplies ``R_h`` by ``r * h`` and has two matrices,
``[xp, R_zr, Rb_zr, R_h, Rb_h, h0, c0, seq_lens, peep]``. Its attribute adds ``cell``
(:class:`CellSpec` JSON), ``seq``, ``batch``, ``split`` and ``lens_operand`` (where
``seq_lens`` is, for CheckIndices) to the common ones.
``T`` and ``B`` may be symbolic (the kernels take them as symbolic dims); the input
size and the weights' shapes must be static. Weights fed as graph inputs (as in ONNX's
own backend tests) work: their sites stay dense.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import tvm
from tvm import relax

from bscompile.codegen.layout import BSRMatrix
from bscompile.codegen.recurrent_cells import ACTIVATIONS, Activation, CellSpec
from bscompile.errors import UnsupportedModelError
from bscompile.sites import (Matrix, SiteKind, const_array as _const, const_name, emit_linear_site, emit_site,
                             fingerprint, named_const, register_site_kind, shape_text)


def _recurrent_matrices(site: dict) -> list[Matrix]:
    return [Matrix(1, 2), Matrix(3, 4)] if site["split"] else [Matrix(1, 2)]


def _recurrent_kernel_args(operands, packed):
    """``[xp, data0, indices0, indptr0, rbias0, data1, indices1, indptr1, rbias1, h0, c0, lens, peep]``:
    without a second matrix, a 1x1 zero stand-in fills its four arguments."""
    if len(packed) == 1:
        one = BSRMatrix.dense(np.zeros((1, 1), np.float32), 1)
        packed = [*packed, (relax.const(one.data), relax.const(one.indices), relax.const(one.indptr),
                            relax.const(np.zeros(1, np.float32)))]
    return [operands[0], *packed[0], *packed[1], *operands[-4:]]


RECURRENT = register_site_kind(SiteKind("recurrent", _recurrent_matrices, _recurrent_kernel_args))


#: Default ``sequence_lens`` of a symbolic-length layer: every row runs the whole
#: sequence (the kernels clamp the lengths to ``T``).
_WHOLE_SEQUENCE = 2**31 - 1


def _dims(expr: relax.Expr, node: str, what: str, static_from: int) -> tuple:
    """The shape of ``expr``: dims from ``static_from`` on must be static ints, the rest may be symbolic."""
    shape = expr.ty.shape
    values = getattr(shape, "values", None)
    if values is None:
        raise UnsupportedModelError(f"node '{node}': input {what} has an unknown shape")
    out = tuple(int(v) if isinstance(v, tvm.tirx.IntImm) else v for v in values)
    if any(not isinstance(v, int) for v in out[static_from:]):
        raise UnsupportedModelError(f"node '{node}': input {what} has a dynamic size {shape}; only its time "
                                    "and batch dims may be symbolic")
    return out


def _const_or_zeros(bb, expr, shape, dtype="float32", node: str = "", what: str = ""):
    """``expr``, checked against ``shape``; zeros when absent.

    The sizes must be equal for every size of the symbolic dims (a symbolic batch against a static
    one would be a shape error inside the kernel at run time), else the model is refused."""
    if expr is not None:
        got = _dims(expr, node, what, static_from=len(shape))
        if len(got) != len(shape) or not all(tvm.sym.Analyzer().can_prove_equal(a, b) for a, b in zip(got, shape)):
            hint = "" if all(isinstance(d, int) for d in (*got, *shape)) else \
                ": they match only for some sizes of the symbolic dims; give them with --input-shape"
            raise UnsupportedModelError(f"node '{node}': input {what} has shape {shape_text(got)}, expected "
                                        f"{shape_text(shape)}{hint}")
        return expr
    if all(isinstance(d, int) for d in shape):
        return relax.const(np.zeros(shape, dtype))
    return bb.emit(relax.op.zeros(relax.ShapeExpr(list(shape)), dtype))


def _slice(bb, t: relax.Expr, axis: int, lo: int, hi: int, shape, view: bool = False) -> relax.Expr:
    """``t[lo:hi]`` along ``axis``, reshaped: for a constant a copy (a named weight's slice ``d``
    along axis 0 is named ``W[d]``), or with ``view`` a view of its rows (no copy); else Relax ops.

    A view is a ``byte_offset`` into the weight's tensor, which NumPy honours and TVM kernels do
    not: only a site's weight matrix may be one, as ``LowerWeightSites`` always replaces those
    with packed copies, so a view never reaches a kernel (nor ``FoldConstant``).
    """
    arr = _const(t)
    if arr is not None and all(isinstance(d, int) for d in shape):
        name = const_name(t)
        if axis == 0 and view:
            value = t.value._create_view(tuple(shape), str(arr.dtype), lo * arr.strides[0])
        else:
            value = arr[(slice(None),) * axis + (slice(lo, hi),)].reshape(shape)
        return named_const(value, f"{name}[{lo}]" if name and axis == 0 and hi == lo + 1 else None)
    return bb.emit(relax.op.reshape(relax.op.strided_slice(t, [axis], [lo], [hi]), shape))


def _parse_cells(kind: str, attr: dict, hidden: int, node: str) -> list[CellSpec]:
    direction = attr.get("direction", b"forward")
    direction = direction.decode() if isinstance(direction, bytes) else direction
    if direction not in ("forward", "reverse", "bidirectional"):
        raise UnsupportedModelError(f"node '{node}' ({kind.upper()}): unknown direction '{direction}'")
    num_dir = 2 if direction == "bidirectional" else 1
    per_dir = CellSpec.num_activations(kind)
    names = [a.decode() if isinstance(a, bytes) else a for a in attr.get("activations", ())]
    alphas = list(attr.get("activation_alpha", ()))
    betas = list(attr.get("activation_beta", ()))
    acts: list[Activation] = []
    if names:
        if len(names) != per_dir * num_dir:
            raise UnsupportedModelError(
                f"node '{node}' ({kind.upper()}): expected {per_dir * num_dir} activations, got {len(names)}"
            )
        for i, name in enumerate(names):
            if name not in ACTIVATIONS:
                raise UnsupportedModelError(
                    f"node '{node}' ({kind.upper()}): activation '{name}' is not supported "
                    f"(supported: {', '.join(ACTIVATIONS)})"
                )
            acts.append(Activation(name, alphas[i] if i < len(alphas) else None,
                                   betas[i] if i < len(betas) else None))
    clip = attr.get("clip")
    lbr = bool(attr.get("linear_before_reset", 0))
    if lbr and kind != "gru":
        raise UnsupportedModelError(f"node '{node}': linear_before_reset only applies to GRU")
    cells = []
    for d in range(num_dir):
        reverse = direction == "reverse" or d == 1
        cells.append(CellSpec(
            kind, hidden, reverse=reverse, linear_before_reset=lbr,
            input_forget=bool(attr.get("input_forget", 0)), clip=float(clip) if clip is not None else None,
            activations=tuple(acts[d * per_dir:(d + 1) * per_dir]) if acts else (),
        ))
    return cells


def convert_recurrent(kind: str, bb: relax.BlockBuilder, inputs, attr: dict, onnx_node) -> relax.Expr:
    """Convert one ONNX GRU/LSTM/RNN node; returns a tuple ``(Y, Y_h[, Y_c])``."""
    node = onnx_node.name
    x, w, r = inputs[0], inputs[1], inputs[2]
    get = lambda i: inputs[i] if len(inputs) > i else None  # noqa: E731
    b, lens, h0 = get(3), get(4), get(5)
    c0, peep = (get(6), get(7)) if kind == "lstm" else (None, None)
    if x is None or w is None or r is None:
        raise UnsupportedModelError(f"node '{node}' ({kind.upper()}): inputs X, W and R are required")
    r_shape = _dims(r, node, "R", 0)
    hidden = int(attr.get("hidden_size") or r_shape[-1])
    if hidden < 1 or len(r_shape) != 3:
        raise UnsupportedModelError(f"node '{node}' ({kind.upper()}): hidden_size {hidden} with R of shape "
                                    f"{list(r_shape)}")
    layout = int(attr.get("layout", 0))
    cells = _parse_cells(kind, attr, hidden, node)
    num_dir = len(cells)
    gates = cells[0].num_gates
    gh = gates * hidden

    x_shape = _dims(x, node, "X", static_from=2)
    if layout == 1:
        x = bb.emit(relax.op.permute_dims(x, [1, 0, 2]))
        x_shape = (x_shape[1], x_shape[0], x_shape[2])
    seq, batch, in_size = x_shape
    w_shape = _dims(w, node, "W", 0)
    if w_shape != (num_dir, gh, in_size):
        raise UnsupportedModelError(f"node '{node}': W has shape {w_shape}, expected {(num_dir, gh, in_size)}")
    if r_shape != (num_dir, gh, hidden):
        raise UnsupportedModelError(f"node '{node}': R has shape {r_shape}, expected {(num_dir, gh, hidden)}")
    if layout == 1:
        h0 = None if h0 is None else bb.emit(relax.op.permute_dims(h0, [1, 0, 2]))
        c0 = None if c0 is None else bb.emit(relax.op.permute_dims(c0, [1, 0, 2]))
    b = _const_or_zeros(bb, b, (num_dir, 2 * gh), node=node, what="B")
    h0 = _const_or_zeros(bb, h0, (num_dir, batch, hidden), node=node, what="initial_h")
    c0 = _const_or_zeros(bb, c0, (num_dir, batch, hidden), node=node, what="initial_c")
    peep = _const_or_zeros(bb, peep, (num_dir, 3 * hidden), node=node, what="P")
    if lens is not None:
        _const_or_zeros(bb, lens, (batch,), node=node, what="sequence_lens")
    if lens is None and isinstance(batch, int) and isinstance(seq, int):
        lens = relax.const(np.full(batch, seq, np.int32))
    elif lens is None:
        lens = bb.emit(relax.op.full(relax.ShapeExpr([batch]), relax.const(_WHOLE_SEQUENCE, "int32"), "int32"))
    elif lens.ty.dtype != "int32":
        lens = bb.emit(relax.op.astype(lens, "int32"))
    x2d = bb.emit(relax.op.reshape(x, [seq * batch, in_size]))

    r_all, keys = _const(r), [""] * num_dir
    if r_all is not None:  # the directions' fingerprints, two at a time (hashlib releases the GIL)
        with ThreadPoolExecutor(2) as pool:
            keys = list(pool.map(fingerprint, r_all))
    ys, hs, cs = [], [], []
    for d, cell in enumerate(cells):
        b_d = _slice(bb, b, 0, d, d + 1, (2 * gh,))
        wb, rb = _slice(bb, b_d, 0, 0, gh, (gh,)), _slice(bb, b_d, 0, gh, 2 * gh, (gh,))
        site_w = _const(w) is not None and _const(w).dtype == np.float32 and _const(wb) is not None
        w_d, r_d = _slice(bb, w, 0, d, d + 1, (gh, in_size), site_w), _slice(bb, r, 0, d, d + 1, (gh, hidden), True)
        if site_w:
            xp = bb.emit(emit_linear_site(bb, x2d, w_d, _const(wb)))
        else:
            xp = bb.emit(relax.op.add(relax.op.matmul(x2d, relax.op.permute_dims(w_d, [1, 0])), wb))
        xp = bb.emit(relax.op.reshape(xp, [seq, batch, gh]))
        # GRU without linear-before-reset multiplies R_h by (r * h): a second matrix.
        split = cell.kind == "gru" and not cell.linear_before_reset
        parts = [(0, 2 * hidden), (2 * hidden, gh)] if split else [(0, gh)]
        operands = [xp]
        for lo, hi in parts:
            operands += [_slice(bb, r_d, 0, lo, hi, (hi - lo, hidden), True), _slice(bb, rb, 0, lo, hi, (hi - lo,))]
        h0_d, c0_d = _slice(bb, h0, 0, d, d + 1, (batch, hidden)), _slice(bb, c0, 0, d, d + 1, (batch, hidden))
        operands += [h0_d, c0_d, lens, _slice(bb, peep, 0, d, d + 1, (3 * hidden,))]
        site = {"kind": "recurrent", "name": f"{onnx_node.input[2]}[{d}]", "fingerprint": keys[d], "m": batch,
                "shape": [gh, hidden], "cell": cell.to_json(), "seq": seq, "batch": batch, "split": split,
                "lens_operand": len(operands) - 2}
        state = relax.TensorType((batch, hidden), "float32")
        out = bb.emit(emit_site(bb, site, operands, relax.TupleType(
            [relax.TensorType((seq, batch, hidden), "float32"), state, state]), f"recurrence_{kind}"))
        ys.append(bb.emit(relax.TupleGetItem(out, 0)))
        hs.append(bb.emit(relax.TupleGetItem(out, 1)))
        cs.append(bb.emit(relax.TupleGetItem(out, 2)))

    y = bb.emit(relax.op.stack(ys, axis=1))  # [T, D, B, H]
    y_h = bb.emit(relax.op.stack(hs, axis=0))  # [D, B, H]
    y_c = bb.emit(relax.op.stack(cs, axis=0))
    if layout == 1:
        y = bb.emit(relax.op.permute_dims(y, [2, 0, 1, 3]))  # [B, T, D, H]
        y_h = bb.emit(relax.op.permute_dims(y_h, [1, 0, 2]))
        y_c = bb.emit(relax.op.permute_dims(y_c, [1, 0, 2]))
    outs = [y, y_h] + ([y_c] if kind == "lstm" else [])
    return relax.Tuple(outs)
