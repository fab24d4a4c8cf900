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

A loop of symbolic length (a Scan over a ``dynamic_axes`` time axis; a Loop whose trip
count is a symbolic size and whose condition stays true) is a real loop: a private
tail-recursive Relax function with ``relax.If`` on the step counter (called a chunk of
steps at a time, so that the VM's recursion stays shallow), the body converted once inside it, scan outputs written in place (one row per step, ``call_tir_inplace``: O(T) copies,
where ``scatter_nd`` would copy the whole buffer every step) into buffers preallocated for
all steps, outer-scope values passed as invariant parameters; a carried sequence that is only
appended to becomes a scan output that ``ConcatFromSequence`` reads stacked. The VM runs
the recursion; bscompile's passes visit the loop function like ``main``. The outer function
carries the ``bscompile.loop`` attribute (which scan outputs run backwards), so that
``FuseDynamicRecurrences`` can find loops whose body is a recurrent cell.

A ``Loop`` whose condition depends on the data runs all ``M`` steps (static ``M``) with the
carried values frozen once the condition turns false (exact: later steps do not change
them), which is only possible without scan outputs. Everything else -- a while-loop
without a trip count, a data-dependent exit with a symbolic trip count, ``Scan`` of
opset 8 -- is a one-line error naming the op and the node.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import onnx
import tvm
import tvm_ffi
from tvm import relax, tirx
from tvm.script import tirx as T
from tvm.ir import GenericConst

from bscompile.errors import UnsupportedModelError
from bscompile.sites import LOOP, definable, expr_dims

LOOP_OPS = {"Loop", "Scan"}

#: Above this many steps an unrolled loop would make a Relax module too large to compile.
MAX_UNROLL = 4096

#: Steps per chunk of a real loop: the VM's recursion is ``n / CHUNK + CHUNK`` frames deep.
CHUNK = 256


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
    _check_declared(body.input[2:], [expr_dims(v) for v in state], f"Loop '{node}'")
    body = _hoist_gathered_products(importer, body)
    if _static_int(trip) is None and _is_true(cond) and _cond_stays_true(importer, body):
        return _loop_loop(importer, trip, state, body, node)
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
    slices = [None if d is None else d[:ax % len(d)] + d[ax % len(d) + 1:]  # a scan input without its scan axis
              for d, ax in zip(map(expr_dims, xs), in_axes)]
    _check_declared(body.input, [expr_dims(v) for v in state] + slices, f"Scan '{node}'")
    body = _hoist_input_products(importer, body, n_state, xs, in_axes, in_dirs)
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


def _check_declared(body_inputs, dims: list, what: str) -> None:
    """A body input the body declares with a static size the loop's value does not have (a
    symbolic or another static size) is refused in one line: onnxruntime refuses such a model
    when the sizes differ at run time, and bscompile would run it."""
    for vi, got in zip(body_inputs, dims):
        tt = vi.type.tensor_type if vi.type.HasField("tensor_type") else None
        if got is None or tt is None or not tt.HasField("shape") or len(tt.shape.dim) != len(got):
            continue
        for k, (want, have) in enumerate(zip(tt.shape.dim, got)):
            if want.HasField("dim_value") and not (isinstance(have, tirx.IntImm) and int(have) == want.dim_value):
                shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
                raise UnsupportedModelError(
                    f"{what}: its body declares '{vi.name}' as {shape}, the loop gives dim {k} = {have}; "
                    "make the sizes agree (a symbolic one static with --input-shape)")


def _hoist_input_products(importer: Any, body: onnx.GraphProto, n_state: int, xs: list, in_axes: list,
                          in_dirs: list) -> onnx.GraphProto:
    """A ``MatMul`` of the body whose first operand is a scan input's slice and whose second a
    constant matrix of the enclosing graph is computed for every step at once, before the
    loop (``x[..., T, ..., in] @ W``: the same dot products), and scanned as one more input
    (appended to ``xs``, ``in_axes``, ``in_dirs``); the body reads its slice. One product
    over all steps' rows instead of a mat-vec per step, the weight read once. Returns the
    body (a copy when it changed); a scan along the feature axis is left alone."""
    body_in = {vi.name: i - n_state for i, vi in enumerate(body.input) if i >= n_state}
    out = None
    for k, nd in enumerate(body.node):
        if nd.op_type != "MatMul" or nd.domain not in ("", "ai.onnx") or nd.input[0] not in body_in:
            continue
        i, w = body_in[nd.input[0]], importer._nodes.get(nd.input[1])
        if not (isinstance(w, tvm.ir.expr.Constant) and len(w.ty.shape) == 2) \
                or any(init.name == nd.input[1] for init in body.initializer) \
                or in_axes[i] % len(xs[i].ty.shape) == len(xs[i].ty.shape) - 1:
            continue
        out = out or onnx.GraphProto.FromString(body.SerializeToString())
        name = f"{nd.output[0]}__all_steps"
        xs.append(importer.bb.emit(relax.op.matmul(xs[i], w)))
        in_axes.append(in_axes[i])
        in_dirs.append(in_dirs[i])
        out.input.append(onnx.ValueInfoProto(name=name))
        out.node[k].CopyFrom(onnx.helper.make_node("Identity", [name], list(nd.output), name=nd.name))
    return out or body


def _hoist_gathered_products(importer: Any, body: onnx.GraphProto) -> onnx.GraphProto:
    """The ``Loop`` form of :func:`_hoist_input_products`: a ``MatMul`` of the body whose first
    operand is ``Gather(x, i)`` (``x`` a tensor of the enclosing graph of rank 2 or more, ``i`` the
    iteration number, axis 0) and whose second a constant matrix becomes ``Gather(x @ W, i)``,
    ``x @ W`` computed once before the loop (TorchScript's ``x[i]`` in a scripted time loop)."""
    it = body.input[0].name
    gathered = {nd.output[0]: nd.input[0] for nd in body.node
                if nd.op_type == "Gather" and nd.domain in ("", "ai.onnx") and nd.input[1] == it
                and all(a.name != "axis" or a.i == 0 for a in nd.attribute)}
    local = {o for nd in body.node for o in nd.output} | {i.name for i in body.initializer} | {i.name for i in body.input}
    out = None
    for k, nd in enumerate(body.node):
        if nd.op_type != "MatMul" or nd.domain not in ("", "ai.onnx") or nd.input[0] not in gathered:
            continue
        src = gathered[nd.input[0]]
        x, w = importer._nodes.get(src), importer._nodes.get(nd.input[1])
        if src in local or nd.input[1] in local or not isinstance(w, tvm.ir.expr.Constant) or len(w.ty.shape) != 2 \
                or not isinstance(getattr(x, "ty", None), relax.TensorType) or x.ty.shape is None \
                or len(x.ty.shape) < 2:
            continue
        out = out or onnx.GraphProto.FromString(body.SerializeToString())
        name = f"{nd.output[0]}__all_steps"
        importer._nodes[name] = importer.bb.emit(relax.op.matmul(x, w))
        out.node[k].CopyFrom(onnx.helper.make_node("Gather", [name, it], list(nd.output), name=nd.name, axis=0))
    return out or body


def _scan_loop(importer: Any, body: onnx.GraphProto, state: list, xs: list, in_axes: list, in_dirs: list,
               out_axes: list, out_dirs: list, node: str) -> list[relax.Expr]:
    """A Scan of symbolic length as a real loop (:func:`_relax_loop`); the scan inputs are
    invariants, sliced at step ``t`` (or ``n - 1 - t`` reversed)."""
    n = xs[0].ty.shape[in_axes[0]]

    def slice_types(tys):
        return [relax.TensorType([d for j, d in enumerate(ty.shape.values) if j != ax], ty.dtype)
                for ty, ax in zip(tys, in_axes)]

    def step(bb, t, last, s_p, x_p):
        return [*s_p, *(bb.emit(relax.op.take(x, last if rev else t, axis=ax)) for x, ax, rev in zip(x_p, in_axes, in_dirs))]

    fields = _relax_loop(importer, body, node, n, state, xs, slice_types, step, len(state), out_dirs)
    results = []
    for y, ax in zip(fields[len(state):], out_axes):
        rank = len(y.ty.shape)
        ax %= rank
        results.append(y if ax == 0 else importer.bb.emit(relax.op.permute_dims(
            y, [*range(1, ax + 1), 0, *range(ax + 1, rank)])))
    return fields[: len(state)] + results


def _symbolic_length(bb: relax.BlockBuilder, trip: relax.Expr) -> tirx.PrimExpr:
    """A trip count (a shape, a prim value or a tensor) as a PrimExpr of the caller; a tensor's
    value is bound to a fresh var by ``tensor_to_shape``."""
    if isinstance(trip, relax.ShapeExpr):
        return trip.values[0]
    if not isinstance(trip.ty, relax.TensorType):  # a prim value: what Gather of a symbolic shape gives
        return trip
    shape = bb.emit(relax.op.tensor_to_shape(relax.op.reshape(relax.op.astype(trip, "int64"), [1])))
    var = tirx.Var("trip", "int64")
    bb.match_cast(shape, relax.ShapeType([var]))
    return var


def _outer_names(body: onnx.GraphProto) -> list[str]:
    """Names the body (nested bodies included) reads from enclosing graphs, in order."""
    defined = {i.name for i in body.input} | {t.name for t in body.initializer}
    found: list[str] = []
    for n in body.node:
        for i in list(n.input) + [x for a in n.attribute for g in ([a.g] if a.HasField("g") else []) + list(a.graphs)
                                  for x in _outer_names(g)]:
            if i and i not in defined and i not in found:
                found.append(i)
        defined.update(n.output)
    return found


def _relax_loop(importer: Any, body: onnx.GraphProto, node: str, length: tirx.PrimExpr, state: list, xs: list,
                body_x_types: Any, step: Any, n_state: int, out_dirs: list, prefix: list | None = None,
                ) -> list[relax.Expr]:
    """A loop of symbolic length ``n`` as two private tail-recursive Relax functions:
    ``loop_chunks(t, n, state..., xs..., invariants..., outs...)`` calls
    ``loop(t, min(t + CHUNK, n), n, ...)`` and itself from there; ``loop(t, stop, n, ...)``,
    while ``t < stop`` (``relax.If``), runs the body -- converted once, by the importer's converters -- on
    ``step(bb, t, n - 1 - t, state, xs)`` (the body's inputs), writes each scan output's slice
    into ``outs[t]`` (``outs[n - 1 - t]`` reversed), preallocated for all ``n`` steps by the
    caller, and calls itself with ``t + 1``. Values the body reads from the enclosing graph that
    are not constants are passed as invariant parameters. The body's outputs are ``prefix``
    (ignored outputs, e.g. a Loop's condition) then ``n_state`` new states then scan outputs.
    Returns the final states and the scan outputs."""
    bb = importer.bb
    prefix = prefix or []
    inv_names = [nm for nm in _outer_names(body)
                 if isinstance(importer._nodes.get(nm), relax.Expr) and not isinstance(importer._nodes[nm], GenericConst)
                 and isinstance(importer._nodes[nm].ty, relax.TensorType)]
    inv = [importer._nodes[nm] for nm in inv_names]
    # the body's output types (in the caller's symbolic vars): convert it once in a throwaway
    # function, which nothing calls (dead-code elimination removes it)
    probe = [relax.Var(f"p{i}", ty) for i, ty in enumerate(
        [ty for ty, _ in prefix] + [v.ty for v in state] + body_x_types([v.ty for v in xs]) + [v.ty for v in inv])]
    with bb.function("loop_probe", probe, private=True):
        saved = {nm: importer._nodes[nm] for nm in inv_names}
        importer._nodes.update(zip(inv_names, probe[len(probe) - len(inv):]))
        try:
            outs = _run_body(importer, body, probe[: len(probe) - len(inv)])
        finally:
            importer._nodes.update(saved)
        out_tys = [o.ty for o in outs]
        bb.emit_func_output(relax.Tuple(outs))
    skip = len(outs) - n_state - len(out_dirs)
    for ty in out_tys[skip + n_state:]:
        if not isinstance(ty, relax.TensorType) or ty.shape is None:
            raise UnsupportedModelError(f"{node}: a scan output of unknown shape")
    n = bb.emit(relax.op.reshape(relax.op.shape_to_tensor(relax.ShapeExpr([length])), []))
    bufs = [bb.emit(relax.op.zeros(relax.ShapeExpr([length, *ty.shape.values]), ty.dtype))
            for ty in out_tys[skip + n_state:]]
    i64 = relax.TensorType((), "int64")
    n_tys = [v.ty for v in state + xs + inv + bufs]
    k = [0, n_state, n_state + len(xs), n_state + len(xs) + len(inv), len(n_tys)]

    def loop_params(*head: str) -> tuple[list, list, list, list, list]:
        tys = _own_vars(n_tys)
        s_p, x_p, i_p, o_p = ([relax.Var(f"{c}{i}", ty) for i, ty in enumerate(tys[k[j]:k[j + 1]])]
                              for j, c in enumerate("sxio"))
        return [relax.Var(h, i64) for h in head], s_p, x_p, i_p, o_p

    def recurse(gv: relax.GlobalVar, params: list, cond: relax.Expr, then: list, rec: relax.Expr,
                result: list) -> None:
        """``gv``'s body: ``if cond: (then; rec) else result``."""
        ret_ty = relax.TupleType([p.ty for p in result])
        seq = relax.SeqExpr([then], rec)
        res = bb.emit(relax.If(cond, seq, relax.SeqExpr([], relax.Tuple(result))))
        body = bb.normalize(relax.SeqExpr([bb._end_block()], res))
        bb.end_scope()
        bb.update_func(gv, relax.Function(params, body, ret_ty, is_pure=True))  # private: no global symbol

    # one step, its own function: FoldConstant (the body's weight transposes) and FuseOps (the
    # cell's elementwise ops into one kernel) work on a function's top-level dataflow block,
    # not on an If branch
    (t_p, last_p), s_p, x_p, i_p, _ = loop_params("t", "last")
    step_params = [t_p, last_p, *s_p, *x_p, *i_p]
    with bb.function("loop_step", step_params, private=True):
        with bb.dataflow():
            saved = {nm: importer._nodes[nm] for nm in inv_names}
            importer._nodes.update(zip(inv_names, i_p))
            try:
                outs = _run_body(importer, body, [*(f(t_p) for _, f in prefix), *step(bb, t_p, last_p, s_p, x_p)])
            finally:
                importer._nodes.update(saved)
            res = bb.emit_output(relax.Tuple(outs[skip:]))
        step_gv = bb.emit_func_output(res)
    _check_closed(bb, step_gv, node)
    # the steps [t, stop) of n: one call per step (the VM recurses: a frame per step)
    (t_p, stop_p, n_p), s_p, x_p, i_p, o_p = loop_params("t", "stop", "n")
    params = [t_p, stop_p, n_p, *s_p, *x_p, *i_p, *o_p]
    ret_ty = relax.TupleType([p.ty for p in s_p + o_p])
    gv = bb.add_func(relax.Function(params, relax.Tuple(s_p + o_p), ret_ty, is_pure=True), "loop")
    bb.begin_scope(params)
    bb._begin_binding_block()
    cond = bb.emit(relax.op.less(t_p, stop_p))
    bb._begin_dataflow_block()
    last = bb.emit(relax.op.subtract(relax.op.subtract(n_p, t_p), relax.const(1, "int64")))
    res = bb.emit(relax.Call(step_gv, [t_p, last, *s_p, *x_p, *i_p]))
    outs = [None] * skip + [bb.emit(relax.TupleGetItem(res, j)) for j in range(len(out_tys) - skip)]
    new_bufs = []
    for buf, y, rev in zip(o_p, outs[skip + n_state:], out_dirs):
        # in place: the buffer is the caller's fresh allocation and dead after this call
        write = bb.add_func(_write_step(len(buf.ty.shape) - 1, buf.ty.dtype), "loop_write_step")
        new_bufs.append(bb.emit(relax.call_tir_inplace(write, [buf, last if rev else t_p, y], 0, buf.ty)))
    t1 = bb.emit(relax.op.add(t_p, relax.const(1, "int64")))
    rec = bb.emit_output(relax.Call(gv, [t1, stop_p, n_p, *outs[skip: skip + n_state], *x_p, *i_p, *new_bufs]))
    recurse(gv, params, cond, bb._end_block(), rec, s_p + o_p)
    # all n steps, CHUNK at a time: the recursion is n / CHUNK + CHUNK deep, not n (a VM frame
    # per step overflows the C stack after a few thousand steps), and each chunk's per-step
    # values are released when it returns
    step_gv = gv
    (t_p, n_p), s_p, x_p, i_p, o_p = loop_params("t", "n")
    params = [t_p, n_p, *s_p, *x_p, *i_p, *o_p]
    gv = bb.add_func(relax.Function(params, relax.Tuple(s_p + o_p), relax.TupleType([p.ty for p in s_p + o_p]),
                                    is_pure=True), "loop_chunks")
    bb.begin_scope(params)
    bb._begin_binding_block()
    cond = bb.emit(relax.op.less(t_p, n_p))
    bb._begin_binding_block()
    stop = bb.emit(relax.op.minimum(relax.op.add(t_p, relax.const(CHUNK, "int64")), n_p))
    res = bb.emit(relax.Call(step_gv, [t_p, stop, n_p, *s_p, *x_p, *i_p, *o_p]))
    fields = [bb.emit(relax.TupleGetItem(res, j)) for j in range(n_state + len(o_p))]
    rec = bb.emit(relax.Call(gv, [stop, n_p, *fields[:n_state], *x_p, *i_p, *fields[n_state:]]))
    recurse(gv, params, cond, bb._end_block(), rec, s_p + o_p)
    # what passes need to know that the structure does not say: which scan outputs run backwards
    bb.update_func(gv, bb.get()[gv].with_attr(LOOP, {"reversed_outputs": [int(bool(r)) for r in out_dirs]}))
    res = bb.emit(relax.Call(gv, [relax.const(0, "int64"), n, *state, *xs, *inv, *bufs]))
    return [bb.emit(relax.TupleGetItem(res, i)) for i in range(n_state + len(bufs))]


def _check_closed(bb: relax.BlockBuilder, gv: relax.GlobalVar, node: str) -> None:
    free = relax.analysis.free_vars(bb.get()[gv])
    if free:
        raise UnsupportedModelError(f"{node}: its body reads values the loop path cannot pass "
                                    f"({', '.join(v.name for v in free)})")


@functools.cache
def _write_step(rank: int, dtype: str) -> tirx.PrimFunc:
    """``buf[t] = y`` in place, for ``buf: [n, *dims]`` and ``y: [*dims]``; a ``t`` outside
    ``[0, n)`` writes nothing (the loop never passes one; the guard keeps memory safe)."""
    n = tirx.Var("n", "int64")
    dims = [tirx.Var(f"d{i}", "int64") for i in range(rank)]
    size = math.prod(dims) if dims else tirx.const(1, "int64")

    # schedulable TIR (a root block, a spatial block per element): CUDA's dlight binds it to threads
    @T.prim_func(private=True, s_tir=True)
    def write_step(buf_h: T.handle, t_h: T.handle, y_h: T.handle):
        T.func_attr({"tir.noalias": True})
        buf = T.match_buffer(buf_h, [n, *dims], dtype)
        t = T.match_buffer(t_h, (), "int64")
        y = T.match_buffer(y_h, dims, dtype)
        with T.sblock("root"):
            flat = T.decl_buffer((n * size,), dtype, data=buf.data)
            row = T.decl_buffer((size,), dtype, data=y.data)
            for i in range(size):
                with T.sblock("write"):
                    vi = T.axis.spatial(size, i)
                    if 0 <= t[()] and t[()] < n:
                        flat[t[()] * size + vi] = row[vi]

    return write_step


def _own_vars(tys: list) -> list:
    """``tys`` with symbolic dims replaced by vars of a new function's own (namesakes of the
    caller's; Relax functions share none), as site functions get them."""
    return definable(tys, len(tys))[0]


def _cond_stays_true(importer: Any, body: onnx.GraphProto) -> bool:
    """The body's condition output is its condition input or a constant true (a for loop)."""
    out, cond = body.output[0].name, body.input[1].name
    src = next((n.input[0] for n in body.node if n.op_type == "Identity" and n.output[0] == out), out)
    return src == cond or _is_true(importer._nodes.get(src, relax.const(False)))


def _loop_loop(importer: Any, trip: relax.Expr, state: list, body: onnx.GraphProto, node: str) -> list:
    """A ``Loop`` with a symbolic trip count and a condition that stays true, as a real loop
    (:func:`_relax_loop`). A carried sequence that starts empty and is only appended to
    (``SequenceInsert(seq, x)``: TorchScript's ``outputs.append(h)``) becomes a scan output,
    returned stacked on axis 0 and marked for ``ConcatFromSequence``."""
    body = onnx.GraphProto.FromString(body.SerializeToString())
    n_state = len(state)
    appended = []
    for j in range(n_state):
        seq_in, seq_out = body.input[2 + j].name, body.output[1 + j].name
        ins = [n for n in body.node if n.op_type == "SequenceInsert" and n.output[0] == seq_out]
        if not (isinstance(state[j], relax.Tuple) and len(state[j].fields) == 0 and len(ins) == 1
                and list(ins[0].input[:1]) == [seq_in] and len(ins[0].input) == 2
                and sum(seq_in in n.input for n in body.node) == 1):
            if not isinstance(state[j].ty, relax.TensorType):
                raise UnsupportedModelError(f"Loop '{node}': a carried sequence other than one only appended to")
            continue
        appended.append((j, ins[0].input[1]))
    for j, elem in reversed(appended):
        body.node.remove(next(n for n in body.node if n.op_type == "SequenceInsert" and n.output[0] == body.output[1 + j].name))
        body.output.append(onnx.helper.make_tensor_value_info(elem, onnx.TensorProto.UNDEFINED, None))
        body.output.pop(1 + j)
        body.input.pop(2 + j)
    # appended elements are now scan outputs after the original ones; reorder them to the front
    n_scan_old = len(body.output) - 1 - (n_state - len(appended)) - len(appended)
    outs = list(body.output)
    k = 1 + n_state - len(appended)
    old_scans, new_scans = outs[k: k + n_scan_old], outs[k + n_scan_old:]
    del body.output[:]
    body.output.extend(outs[:k] + new_scans + old_scans)
    kept = [v for j, v in enumerate(state) if j not in dict(appended)]
    length = _symbolic_length(importer.bb, trip)
    prefix = [(relax.TensorType((), "int64"), lambda t: t), (relax.TensorType((), "bool"), lambda t: relax.const(True))]
    n_scans = len(body.output) - k
    fields = _relax_loop(importer, body, f"Loop '{node}'", length, kept, [], lambda tys: [], lambda bb, t, last, s_p, x_p: list(s_p),
                         len(kept), [0] * n_scans, prefix)
    states, scans = fields[: len(kept)], fields[len(kept):]
    stacked = scans[: len(appended)]
    importer.stacked.update(stacked)  # (appended-to sequences, stacked on axis 0: ConcatFromSequence reads them)
    it = iter(states)
    merged = [stacked[[j for j, _ in appended].index(j)] if j in dict(appended) else next(it) for j in range(n_state)]
    return merged + scans[len(appended):]


def concat_stacked(bb: relax.BlockBuilder, seq: relax.Expr, axis: int, new_axis: int, node: str) -> relax.Expr:
    """``ConcatFromSequence`` of a sequence held stacked on axis 0 (``[n, *elem]``)."""
    rank = len(seq.ty.shape) - 1
    if new_axis:
        axis %= rank + 1
        return seq if axis == 0 else bb.normalize(relax.op.permute_dims(seq, [*range(1, axis + 1), 0, *range(axis + 1, rank + 1)]))
    axis %= rank
    moved = seq if axis == 0 else bb.emit(relax.op.permute_dims(seq, [*range(1, axis + 1), 0, *range(axis + 1, rank + 1)]))
    dims = list(moved.ty.shape.values)
    return bb.normalize(relax.op.reshape(moved, [*dims[:axis], dims[axis] * dims[axis + 1], *dims[axis + 2:]]))
