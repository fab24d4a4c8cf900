"""Converters for ONNX ``GRU``, ``LSTM`` and ``RNN``, which TVM's Relax frontend lacks.

Each direction of a layer becomes two things:

1. the input projection over all time steps, ``xp = X[T*B, I] @ W_d.T + bias``: one
   ordinary ``matmul`` on a (usually constant) weight, which the weight-site pass
   later turns into a block-sparse kernel like any other linear layer;
2. one ``call_tir`` of a generated recurrence kernel (:func:`codegen.cpu.recurrent_kernel`)
   with the time loop inside it, the recurrent weight ``R_d`` packed in the dense
   block layout, and the kernel tagged as a weight site so the passes can swap in
   a block-sparse ``R_d``.

Shapes must be static (``T`` and ``B`` are loop bounds of the kernel). Weight
packing is written as Relax ops, so constant weights fold at compile time and
weights fed as graph inputs (as in ONNX's own backend tests) still work.
"""

from __future__ import annotations

import json

import numpy as np
from tvm import relax

from bscompile.codegen.cpu import CpuSchedule, recurrent_kernel
from bscompile.codegen.layout import DENSE_ROWS, BSRMatrix
from bscompile.codegen.recurrent_cells import ACTIVATIONS, Activation, CellSpec
from bscompile.errors import UnsupportedModelError
from bscompile.passes.sites import const_array as _const


SITE_ATTR = "bscompile.site"


def _static_shape(expr: relax.Expr, node: str, what: str) -> tuple[int, ...]:
    shape = expr.ty.shape
    try:
        return tuple(int(v) for v in shape.values)
    except (TypeError, AttributeError) as err:
        raise UnsupportedModelError(
            f"node '{node}': input {what} has a dynamic shape {shape}; "
            "give static input shapes (--input-shape NAME=D0,D1,...)"
        ) from err


def _const_or_zeros(bb, expr, shape, dtype="float32"):
    if expr is None:
        return relax.const(np.zeros(shape, dtype))
    return expr


def pack_dense_rows(bb: relax.BlockBuilder, w: relax.Expr, rows: int, cols: int) -> relax.Expr:
    """``BSRMatrix.dense(w, DENSE_ROWS).data`` of ``w[rows, cols]``: NumPy for constants, else Relax ops."""
    arr = _const(w)
    if arr is not None:
        return relax.const(BSRMatrix.dense(arr, DENSE_ROWS).data)
    n_pad = -(-rows // DENSE_ROWS) * DENSE_ROWS
    if n_pad != rows:
        w = bb.emit(relax.op.nn.pad(w, [0, n_pad - rows, 0, 0]))
    w = bb.emit(relax.op.reshape(w, [n_pad // DENSE_ROWS, DENSE_ROWS, cols]))
    return bb.emit(relax.op.permute_dims(w, [0, 2, 1]))


def _dense_index_consts(rows: int) -> tuple[relax.Constant, relax.Constant]:
    nbr = -(-rows // DENSE_ROWS)
    return relax.const(np.zeros(nbr, np.int32)), relax.const(np.arange(nbr + 1, dtype=np.int32))


def _pad_vec(bb, v: relax.Expr, n: int, n_pad: int) -> relax.Expr:
    arr = _const(v)
    if arr is not None:
        return relax.const(np.pad(arr.astype(np.float32), (0, n_pad - n)))
    return v if n_pad == n else bb.emit(relax.op.nn.pad(v, [0, n_pad - n]))


def _slice(bb, t: relax.Expr, axis: int, lo: int, hi: int, shape) -> relax.Expr:
    """``t[lo:hi]`` along ``axis``, reshaped: NumPy for constants, else Relax ops."""
    arr = _const(t)
    if arr is not None:
        return relax.const(np.ascontiguousarray(np.take(arr, range(lo, hi), axis=axis).reshape(shape)))
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
    hidden = int(attr.get("hidden_size") or _static_shape(r, node, "R")[-1])
    layout = int(attr.get("layout", 0))
    cells = _parse_cells(kind, attr, hidden, node)
    num_dir = len(cells)
    gates = cells[0].num_gates
    gh = gates * hidden

    x_shape = _static_shape(x, node, "X")
    if layout == 1:
        x = bb.emit(relax.op.permute_dims(x, [1, 0, 2]))
        x_shape = (x_shape[1], x_shape[0], x_shape[2])
    seq, batch, in_size = x_shape
    w_shape = _static_shape(w, node, "W")
    if w_shape != (num_dir, gh, in_size):
        raise UnsupportedModelError(f"node '{node}': W has shape {w_shape}, expected {(num_dir, gh, in_size)}")
    if layout == 1:
        h0 = None if h0 is None else bb.emit(relax.op.permute_dims(h0, [1, 0, 2]))
        c0 = None if c0 is None else bb.emit(relax.op.permute_dims(c0, [1, 0, 2]))
    b = _const_or_zeros(bb, b, (num_dir, 2 * gh))
    h0 = _const_or_zeros(bb, h0, (num_dir, batch, hidden))
    c0 = _const_or_zeros(bb, c0, (num_dir, batch, hidden))
    peep = _const_or_zeros(bb, peep, (num_dir, 3 * hidden))
    if lens is None:
        lens = relax.const(np.full(batch, seq, np.int32))
    elif lens.ty.dtype != "int32":
        lens = bb.emit(relax.op.astype(lens, "int32"))
    x2d = bb.emit(relax.op.reshape(x, [seq * batch, in_size]))

    ys, hs, cs = [], [], []
    for d, cell in enumerate(cells):
        w_d, r_d = _slice(bb, w, 0, d, d + 1, (gh, in_size)), _slice(bb, r, 0, d, d + 1, (gh, hidden))
        b_d = _slice(bb, b, 0, d, d + 1, (2 * gh,))
        wb, rb = _slice(bb, b_d, 0, 0, gh, (gh,)), _slice(bb, b_d, 0, gh, 2 * gh, (gh,))
        w_t = relax.const(np.ascontiguousarray(_const(w_d).T)) if _const(w_d) is not None \
            else relax.op.permute_dims(w_d, [1, 0])
        xp = bb.emit(relax.op.add(relax.op.matmul(x2d, w_t), wb))
        xp = bb.emit(relax.op.reshape(xp, [seq, batch, gh]))
        # GRU without linear-before-reset multiplies R_h by (r * h): a second matrix.
        split = cell.kind == "gru" and not cell.linear_before_reset
        parts = [(0, 2 * hidden), (2 * hidden, gh)] if split else [(0, gh)]
        mats_args = []
        for lo, hi in parts:
            rows = hi - lo
            r_part = _slice(bb, r_d, 0, lo, hi, (rows, hidden))
            rb_part = _slice(bb, rb, 0, lo, hi, (rows,))
            indices, indptr = _dense_index_consts(rows)
            n_pad = -(-rows // DENSE_ROWS) * DENSE_ROWS
            mats_args += [pack_dense_rows(bb, r_part, rows, hidden), indices, indptr,
                          _pad_vec(bb, rb_part, rows, n_pad)]
        if not split:
            one = BSRMatrix.dense(np.zeros((1, 1), np.float32), 1)
            mats_args += [relax.const(one.data), relax.const(one.indices), relax.const(one.indptr),
                          relax.const(np.zeros(1, np.float32))]
        h0_d, c0_d = _slice(bb, h0, 0, d, d + 1, (batch, hidden)), _slice(bb, c0, 0, d, d + 1, (batch, hidden))
        p_d = _slice(bb, peep, 0, d, d + 1, (3 * hidden,))
        func = dense_recurrence_func(cell, seq, batch, split, weight_name=f"{onnx_node.input[2]}[{d}]")
        gv = bb.add_func(func, f"recurrence_{kind}")
        out = bb.emit(relax.call_tir(gv, [xp, *mats_args, h0_d, c0_d, lens, p_d], [
            relax.TensorType((seq, batch, hidden), "float32"),
            relax.TensorType((batch, hidden), "float32"),
            relax.TensorType((batch, hidden), "float32"),
        ]))
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


def dense_recurrence_func(cell: CellSpec, seq: int, batch: int, split: bool, weight_name: str):
    """The import-time kernel: dense R (:data:`DENSE_ROWS`-row blocks), tagged as a site."""
    gh = cell.num_gates * cell.hidden
    shapes = [(2 * cell.hidden, cell.hidden), (cell.hidden, cell.hidden)] if split else [(gh, cell.hidden)]
    mats = [BSRMatrix.dense(np.zeros(s, np.float32), DENSE_ROWS) for s in shapes]
    scheds = [CpuSchedule(m_tile=1, parallel=False, unroll_c=False) for _ in mats]
    func = recurrent_kernel(cell, mats, seq, batch, scheds)
    site = {"kind": "recurrent", "cell": cell.to_json(), "seq": seq, "batch": batch,
            "weight": weight_name, "shape": [gh, cell.hidden], "split": split}
    return func.with_attr(SITE_ATTR, json.dumps(site))
