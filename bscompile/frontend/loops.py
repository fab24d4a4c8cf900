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
from tvm import relax, tirx
from tvm.ir import GenericConst

from bscompile.errors import UnsupportedModelError

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
    lengths = set()
    for i, x in enumerate(xs):
        rank = len(x.ty.shape)
        in_axes[i] %= rank
        lengths.add(_static_int(x.ty.shape[in_axes[i]]))
    if len(lengths) != 1:
        raise UnsupportedModelError(f"Scan '{node}': scan inputs of different or unknown lengths {sorted(map(str, lengths))}")
    steps = _steps(lengths.pop(), "Scan", node, "the scan length")
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
