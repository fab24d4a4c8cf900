"""ONNX ``Loop`` and ``Scan``, which TVM 0.27's Relax importer lacks: the generic path.

A loop whose length is known when importing (a constant trip count, a static scan axis --
``--input-shape`` makes a symbolic one static) is unrolled: the body graph is converted
once per step by the importer's own node converters, with the body's inputs bound to the
step's values (the iteration number, the carried state, the slices of the scan inputs)
and outer-scope names visible, as ONNX scoping requires. Carried state may be any value
the importer represents, including ONNX sequences (TorchScript exports write
``outputs.append(h)`` as a carried ``SequenceInsert``; unrolled, the sequence is a
Relax tuple that grows by one field per step). Scan outputs and ``Loop`` scan outputs
are stacked along their axis.

A ``Loop`` whose condition depends on the data runs all ``M`` steps with the carried
values frozen once the condition turns false (exact: later steps do not change them),
which is only possible without scan outputs (their count would depend on the data).
Everything else -- a symbolic length, a while-loop without a trip count, ``Scan`` of
opset 8 -- is a one-line error naming the op and the node.
"""

from __future__ import annotations

from typing import Any

import onnx
import tvm_ffi
from tvm import relax, tirx
from tvm.ir import GenericConst

from bscompile.errors import UnsupportedModelError
from bscompile.sites import _definable

LOOP_OPS = {"Loop", "Scan"}

#: Above this many steps an unrolled loop would make a Relax module too large to compile.
MAX_UNROLL = 4096


def convert_loop(importer: Any, op_name: str, inputs: list, attrs: dict, supported: set[str]) -> relax.Expr:
    """``Loop`` / ``Scan`` node -> Relax (a tuple of its outputs), by unrolling.

    ``importer`` is the ``ONNXGraphImporter`` converting the enclosing graph: the body's
    nodes go through its converters (recurrent ops and nested loops included); ``supported``
    is the set of op types it converts."""
    node = attrs["tvm_custom"]["name"] or op_name
    body = attrs["body"]
    _check_body(supported, body, op_name, node)
    if op_name == "Loop":
        outs = _unroll_loop(importer, inputs, attrs, body, node)
    else:
        if importer.opset < 9:
            raise UnsupportedModelError(f"unsupported op 'Scan' (opset {importer.opset} < 9) at node '{node}'")
        outs = _unroll_scan(importer, inputs, attrs, body, node)
    outs = outs[: attrs["tvm_custom"]["num_outputs"]]
    return outs[0] if len(outs) == 1 else relax.Tuple(outs)


def _check_body(ops: set[str], body: onnx.GraphProto, op_name: str, node: str) -> None:
    """Unsupported ops anywhere in the body (nested bodies included) name the op and the node."""
    for i, n in enumerate(body.node):
        if n.domain not in ("", "ai.onnx") or n.op_type not in ops:
            dom = f"{n.domain}." if n.domain not in ("", "ai.onnx") else ""
            raise UnsupportedModelError(f"unsupported op '{dom}{n.op_type}' at node '{n.name or f'#{i}'}' "
                                        f"in the body of {op_name} '{node}'")
        for a in n.attribute:
            for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                _check_body(ops, g, op_name, node)


def _static_int(expr: relax.Expr | None) -> int | None:
    """The value of a scalar integer known when importing, else ``None``."""
    if isinstance(expr, GenericConst) and expr.value.numpy().size == 1:
        return int(expr.value.numpy().reshape(()))
    if isinstance(expr, relax.ShapeExpr) and len(expr.values) == 1:
        expr = expr.values[0]
    if isinstance(expr, tirx.IntImm):  # also what Gather of a static shape gives (a Relax prim value)
        return int(expr.value)
    return None


def _is_true(expr: relax.Expr | None) -> bool:
    """A condition known to be true when importing (absent counts as true)."""
    if expr is None:
        return True
    if isinstance(expr, GenericConst):
        return bool(expr.value.numpy().all())
    return False


def _steps(n: int | None, op_name: str, node: str, what: str) -> int:
    if n is None:
        raise UnsupportedModelError(f"{op_name} '{node}': {what} is not known when compiling (a symbolic sequence "
                                    f"length); give --input-shape to make it static")
    if n > MAX_UNROLL:
        raise UnsupportedModelError(f"{op_name} '{node}': {n} steps, more than the {MAX_UNROLL} bscompile unrolls")
    return max(n, 0)


def _run_body(importer: Any, body: onnx.GraphProto, values: list[relax.Expr]) -> list[relax.Expr]:
    """Convert ``body`` once with its inputs bound to ``values``; its outputs, each bound to a var."""
    saved = dict(importer._nodes)
    try:
        for vi, v in zip(body.input, values):
            importer._nodes[vi.name] = v
        for init in body.initializer:
            importer._nodes[init.name] = relax.const(importer._parse_array(init))
        importer._construct_nodes(body)
        return [_bind(importer.bb, importer._nodes[o.name]) for o in body.output]
    finally:
        importer._nodes = saved


def _bind(bb: relax.BlockBuilder, expr: relax.Expr) -> relax.Expr:
    """Emit a computed value once, so that the next step uses it as a var (not a copy of its tree)."""
    if isinstance(expr, relax.Tuple):
        return relax.Tuple([_bind(bb, f) for f in expr.fields])
    if isinstance(expr, relax.Call):
        return bb.emit(expr)
    return expr


def _stack(bb: relax.BlockBuilder, slices: list[relax.Expr], axis: int, op_name: str, node: str) -> relax.Expr:
    if not slices:
        raise UnsupportedModelError(f"{op_name} '{node}': zero steps with scan outputs (empty outputs)")
    return bb.normalize(relax.op.stack(slices, axis=axis))


def _unroll_loop(importer: Any, inputs: list, attrs: dict, body: onnx.GraphProto, node: str) -> list[relax.Expr]:
    bb = importer.bb
    trip, cond, state = inputs[0], inputs[1], list(inputs[2:])
    n_state = len(body.input) - 2
    if len(state) != n_state or len(body.output) < 1 + n_state:
        raise UnsupportedModelError(f"Loop '{node}': body signature does not match the node's inputs")
    n_scan = len(body.output) - 1 - n_state
    if trip is None:
        raise UnsupportedModelError(f"Loop '{node}': no trip count (a while loop); bscompile needs one")
    steps = _steps(_static_int(trip), "Loop", node, "the trip count")
    running = None if _is_true(cond) else bb.emit(relax.op.astype(cond, "bool"))  # None: known true
    scans: list[list[relax.Expr]] = [[] for _ in range(n_scan)]
    for t in range(steps):
        outs = _run_body(importer, body, [relax.const(t, "int64"), relax.const(True), *state])
        cond_out, new_state, step_scans = outs[0], outs[1 : 1 + n_state], outs[1 + n_state :]
        if running is None and _is_true(cond_out):
            state = new_state
        else:
            if n_scan:
                raise UnsupportedModelError(f"Loop '{node}': a data-dependent condition with scan outputs "
                                            f"(their length would depend on the data)")
            if running is None:
                running = relax.const(True)
            state = [_where(bb, running, new, old, node) for new, old in zip(new_state, state)]
            running = bb.emit(relax.op.logical_and(running, relax.op.astype(cond_out, "bool")))
        for acc, s in zip(scans, step_scans):
            acc.append(s)
    return state + [_stack(bb, acc, 0, "Loop", node) for acc in scans]


def _where(bb: relax.BlockBuilder, running: relax.Expr, new: relax.Expr, old: relax.Expr, node: str) -> relax.Expr:
    if not isinstance(new.ty, relax.TensorType):
        raise UnsupportedModelError(f"Loop '{node}': a data-dependent condition with a carried sequence")
    return bb.emit(relax.op.where(relax.op.reshape(running, []), new, old))


def _unroll_scan(importer: Any, inputs: list, attrs: dict, body: onnx.GraphProto, node: str) -> list[relax.Expr]:
    bb = importer.bb
    n_in = attrs["num_scan_inputs"]
    state, xs = list(inputs[: len(inputs) - n_in]), list(inputs[len(inputs) - n_in :])
    n_state, n_out = len(state), len(body.output) - len(state)
    if len(body.input) != len(inputs) or n_out < 0:
        raise UnsupportedModelError(f"Scan '{node}': body signature does not match the node's inputs")
    in_axes = list(attrs.get("scan_input_axes", [0] * n_in))
    in_dirs = list(attrs.get("scan_input_directions", [0] * n_in))
    out_axes = list(attrs.get("scan_output_axes", [0] * n_out))
    out_dirs = list(attrs.get("scan_output_directions", [0] * n_out))
    lengths, dims = set(), []
    for i, x in enumerate(xs):
        rank = len(x.ty.shape)
        in_axes[i] %= rank
        dims.append(x.ty.shape[in_axes[i]])
        lengths.add(_static_int(dims[-1]))
    if None in lengths and not all(tvm_ffi.structural_equal(d, dims[0]) for d in dims):
        lengths.add("mixed")
    if len(lengths) != 1:
        raise UnsupportedModelError(f"Scan '{node}': scan inputs of different or unknown lengths {sorted(map(str, lengths))}")
    length = lengths.pop()
    if length is None:
        return _scan_loop(importer, body, state, xs, in_axes, in_dirs, out_axes, out_dirs, node)
    steps = _steps(length, "Scan", node, "the scan length")
    scans: list[list[relax.Expr]] = [[] for _ in range(n_out)]
    for t in range(steps):
        slices = [bb.emit(relax.op.squeeze(relax.op.strided_slice(
            x, axes=[ax], begin=[steps - 1 - t if rev else t], end=[(steps - t) if rev else t + 1]), [ax]))
            for x, ax, rev in zip(xs, in_axes, in_dirs)]
        outs = _run_body(importer, body, [*state, *slices])
        state = outs[:n_state]
        for acc, s in zip(scans, outs[n_state:]):
            acc.append(s)
    results = []
    for acc, ax, rev in zip(scans, out_axes, out_dirs):
        rank = len(acc[0].ty.shape) + 1 if acc else 1
        results.append(_stack(bb, acc[::-1] if rev else acc, ax % rank, "Scan", node))
    return state + results


def _scan_loop(importer: Any, body: onnx.GraphProto, state: list, xs: list, in_axes: list, in_dirs: list,
               out_axes: list, out_dirs: list, node: str) -> list[relax.Expr]:
    """A Scan of symbolic length as a real loop: a private tail-recursive Relax function
    ``loop(t, n, state..., xs..., outs...)`` that, while ``t < n``, runs the body (converted once,
    inline) on step ``t``'s slices and writes each scan output's slice into ``outs[t]``
    (preallocated for all ``n`` steps by the caller)."""
    bb = importer.bb
    i64 = relax.TensorType((), "int64")
    n = bb.emit(relax.op.reshape(relax.op.shape_to_tensor(relax.ShapeExpr([xs[0].ty.shape[in_axes[0]]])), []))
    # the body's output slices' types: convert it once into a probe function with symbolic params
    outs_ty = _probe_body(importer, body, state, xs, in_axes, node)
    n_state = len(state)
    bufs = [bb.emit(relax.op.zeros(relax.ShapeExpr([xs[0].ty.shape[in_axes[0]], *ty.shape.values]), ty.dtype))
            for ty in outs_ty[n_state:]]
    t_p, n_p = relax.Var("t", i64), relax.Var("n", i64)
    tys = _own_vars([v.ty for v in state + xs + bufs])
    s_p = [relax.Var(f"s{i}", ty) for i, ty in enumerate(tys[:n_state])]
    x_p = [relax.Var(f"x{i}", ty) for i, ty in enumerate(tys[n_state : n_state + len(xs)])]
    o_p = [relax.Var(f"o{i}", ty) for i, ty in enumerate(tys[n_state + len(xs) :])]
    params = [t_p, n_p, *s_p, *x_p, *o_p]
    ret_ty = relax.TupleType([p.ty for p in s_p + o_p])
    gv = bb.add_func(relax.Function(params, relax.Tuple(s_p + o_p), ret_ty, is_pure=True), "scan_loop")  # a placeholder the body can call, replaced below
    bb.begin_scope(params)
    bb._begin_binding_block()
    cond = bb.emit(relax.op.less(t_p, n_p))
    bb._begin_binding_block()
    last = bb.emit(relax.op.subtract(relax.op.subtract(n_p, t_p), relax.const(1, "int64")))
    slices = [bb.emit(relax.op.take(x, last if rev else t_p, axis=ax)) for x, ax, rev in zip(x_p, in_axes, in_dirs)]
    outs = _run_body(importer, body, [*s_p, *slices])
    new_bufs = []
    for buf, y, rev in zip(o_p, outs[n_state:], out_dirs):
        idx = bb.emit(relax.op.reshape(last if rev else t_p, [1, 1]))
        new_bufs.append(bb.emit(relax.op.scatter_nd(buf, idx, relax.op.expand_dims(y, 0))))
    t1 = bb.emit(relax.op.add(t_p, relax.const(1, "int64")))
    rec = bb.emit(relax.Call(gv, [t1, n_p, *outs[:n_state], *x_p, *new_bufs], ty_args=[ret_ty]))
    then = relax.SeqExpr([bb._end_block()], rec)
    res = bb.emit(relax.If(cond, then, relax.SeqExpr([], relax.Tuple(s_p + o_p))))
    seq = bb.normalize(relax.SeqExpr([bb._end_block()], res))
    bb.end_scope()
    bb.update_func(gv, relax.Function(params, seq, ret_ty, is_pure=True))  # private: no global symbol
    free = relax.analysis.free_vars(bb.get()[gv])
    if free:
        raise UnsupportedModelError(f"Scan '{node}': its body reads values computed outside it "
                                    f"({', '.join(v.name_hint for v in free)}), which bscompile's loop path does not pass yet")
    res = bb.emit(relax.Call(gv, [relax.const(0, "int64"), n, *state, *xs, *bufs]))
    fields = [bb.emit(relax.TupleGetItem(res, i)) for i in range(n_state + len(bufs))]
    results = []
    for y, ax in zip(fields[n_state:], out_axes):
        rank = len(y.ty.shape)
        ax %= rank
        results.append(y if ax == 0 else bb.emit(relax.op.permute_dims(
            y, [*range(1, ax + 1), 0, *range(ax + 1, rank)])))
    return fields[:n_state] + results


def _probe_body(importer: Any, body: onnx.GraphProto, state: list, xs: list, in_axes: list, node: str) -> list:
    """Types of the body's outputs, from converting it in a throwaway function."""
    bb = importer.bb
    x_tys = [relax.TensorType([d for j, d in enumerate(v.ty.shape.values) if j != ax], v.ty.dtype)
             for v, ax in zip(xs, in_axes)]
    tys = _own_vars([v.ty for v in state] + x_tys)
    s_p = [relax.Var(f"s{i}", ty) for i, ty in enumerate(tys[: len(state)])]
    x_p = [relax.Var(f"x{i}", ty) for i, ty in enumerate(tys[len(state) :])]
    with bb.function("probe", [*s_p, *x_p], private=True):
        outs = _run_body(importer, body, [*s_p, *x_p])
        tys = [o.ty for o in outs]
        gv = bb.emit_func_output(relax.Tuple(outs))
    importer.bb.get().remove(gv) if hasattr(importer.bb.get(), "remove") else None
    for ty in tys:
        if not isinstance(ty, relax.TensorType) or ty.shape is None:
            raise UnsupportedModelError(f"Scan '{node}': a body output of unknown shape")
    return tys


def _own_vars(tys: list) -> list:
    """``tys`` with symbolic dims replaced by vars of a new function's own (namesakes of the
    caller's; Relax functions share none), as site functions get them."""
    return _definable(tys, len(tys))[0]
