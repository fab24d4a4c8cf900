"""ONNX import: TVM's Relax ONNX frontend plus bscompile's recurrent converters.

Besides the Relax module this records the graph's input/output signature. Every
initializer becomes one constant that carries its name (:func:`bscompile.sites.named_const`),
converted once from the ONNX proto, which is then dropped before the graph is
converted; layout ops on a named weight (``Transpose``, ``Reshape``, ``Cast``, a
``Gemm``'s ``transB``) keep its name, so the sites are named from the IR.
"""

from __future__ import annotations

import contextlib
import io
import math
import mmap
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import onnx
import tvm
from onnx import numpy_helper
from onnx.external_data_helper import load_external_data_for_model, uses_external_data
from tvm import relax
from tvm.relax.frontend.onnx import onnx_frontend as tvm_onnx

from bscompile.errors import BscompileError, UnsupportedModelError
from bscompile.frontend.loops import LOOP_OPS, concat_stacked, convert_loop
from bscompile.frontend.recurrent import convert_recurrent
from bscompile.frontend.wire import split_raw_data
from bscompile.limits import check_external_data, check_finite, check_resources
from bscompile.sites import TensorSpec, const_array, const_name, dim_of, named_const, shape_text, with_signature

RECURRENT_OPS = {"GRU": "gru", "LSTM": "lstm", "RNN": "rnn"}
INDEX_OPS = {"Gather", "GatherElements", "GatherND", "Scatter", "ScatterElements", "ScatterND"}
#: Ops that only re-lay out (or cast) one weight: a constant result keeps the weight's name.
LAYOUT_OPS = {"Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast", "Identity"}


@dataclass
class ImportedModel:
    mod: tvm.IRModule
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


@dataclass
class MappedWeights:
    """Initializers' raw data left in a read-only memory map of the model file
    (:func:`bscompile.frontend.wire.split_raw_data`): ``spans[i]`` is ``(offset, length)``
    for ``graph.initializer[i]``, or None where the data stayed in the proto."""

    mapped: mmap.mmap
    spans: list[tuple[int, int] | None]


def load_model(model: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    return read_model(model, split=False)[0]


def read_model(model: str | os.PathLike | onnx.ModelProto,
               split: bool = True) -> tuple[onnx.ModelProto, MappedWeights | None]:
    """The model, and with ``split`` (for a file) its initializers' raw data apart, in a memory map."""
    if isinstance(model, onnx.ModelProto):
        _check_text(model, "the model")
        if not model.graph.node or not model.graph.output:
            raise BscompileError("the model has no graph nodes or no outputs")
        return model, None
    if not isinstance(model, (str, os.PathLike)):
        raise BscompileError(f"model: a path or an onnx.ModelProto, not {type(model).__name__}")
    path = os.fspath(model)
    if not os.path.exists(path):
        raise BscompileError(f"no such file: {path}")
    try:
        proto, raw = _parse(path, split)
    except Exception as err:  # protobuf raises several types for garbage input
        raise BscompileError(f"{path} is not an ONNX model ({type(err).__name__})") from None
    _check_text(proto, path)
    if not proto.graph.node:
        raise BscompileError(f"{path} is not an ONNX model (no graph nodes)")
    if any(uses_external_data(t) for t in proto.graph.initializer):
        # files present and long enough, weights within memory (by their dims) before reading them
        base = os.path.dirname(path)
        check_external_data(proto, base)
        check_resources(proto, {})
        try:
            load_external_data_for_model(proto, base)
        except Exception as err:  # (a location outside the model's folder, unreadable files)
            raise BscompileError(f"{path}: cannot read its external data ({_first_line(err)})") from None
    return proto, raw


def _check_text(proto: onnx.ModelProto, what: str) -> None:
    """Refuse a model with a string that is not UTF-8: ONNX's proto2 strings are not checked
    when parsed, and protobuf hands such a string out as ``bytes`` (or raises), anywhere later."""

    def texts_ok(msg) -> bool:
        if isinstance(msg, onnx.TensorProto):  # (its raw data is not copied out)
            return isinstance(msg.name, str) and all(texts_ok(e) for e in msg.external_data)
        for fd, value in msg.ListFields():
            values = value if fd.is_repeated else (value,)
            if fd.type == fd.TYPE_STRING and not all(isinstance(v, str) for v in values):
                return False
            if fd.message_type is not None and not all(texts_ok(v) for v in values):
                return False
        return True

    try:
        ok = texts_ok(proto)
    except UnicodeDecodeError:
        ok = False
    if not ok:
        raise BscompileError(f"{what} is not a valid ONNX model (a name or string is not UTF-8 text)")


def _parse(path: str, split: bool) -> tuple[onnx.ModelProto, MappedWeights | None]:
    """``onnx.load(path, load_external_data=False)``. A binary model is parsed from a memory map
    of the file, not from a copy of it in a bytes object; with ``split`` without the raw data of
    its initializers, which stays in the map (see :mod:`bscompile.frontend.wire`)."""
    fmt = onnx.serialization.registry.get_format_from_file_extension(os.path.splitext(path)[1]) or "protobuf"
    if fmt != "protobuf" or not os.path.isfile(path) or os.path.getsize(path) == 0:
        return onnx.load(path, load_external_data=False), None
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    proto = onnx.ModelProto()
    if split:
        try:
            with memoryview(mapped) as data:
                light, spans = split_raw_data(data)
        except (ValueError, IndexError):  # not a well-formed model: the parser below says so
            spans = []
        if any(spans):
            proto.ParseFromString(light)
            if len(spans) == len(proto.graph.initializer):
                return proto, MappedWeights(mapped, spans)
    with memoryview(mapped) as data:
        proto.ParseFromString(data)  # (raises DecodeError on garbage, as onnx.load does)
    mapped.close()
    return proto, None


#: Integer attributes the ONNX specification defines as flags (0 or 1). Other values are refused:
#: TVM's converters read them as ``bool`` (nonzero), onnxruntime some as ``== 1`` (TopK's
#: ``largest = -7`` picks the smallest there, the largest in TVM).
FLAG_ATTRS: dict[str, tuple[str, ...]] = {
    "TopK": ("largest", "sorted"), "Gemm": ("transA", "transB"), "ArgMax": ("keepdims", "select_last_index"),
    "ArgMin": ("keepdims", "select_last_index"), "CumSum": ("exclusive", "reverse"), "LSTM": ("input_forget",),
    "GRU": ("linear_before_reset",), "Unique": ("sorted",),
    **{op: ("keepdims", "noop_with_empty_axes") for op in ("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin",
                                                         "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum",
                                                         "ReduceLogSumExp", "ReduceSumSquare")},
}


def supported_ops() -> set[str]:
    return set(tvm_onnx._get_convert_map()) | set(RECURRENT_OPS) | LOOP_OPS | {"If", "Constant"}


def check_supported(model: onnx.ModelProto) -> None:
    ops = supported_ops()
    for i, node in enumerate(model.graph.node):
        if node.domain not in ("", "ai.onnx") or node.op_type not in ops:
            name = node.name or f"#{i}"
            dom = f"{node.domain}." if node.domain not in ("", "ai.onnx") else ""
            raise UnsupportedModelError(f"unsupported op '{dom}{node.op_type}' at node '{name}'")
    _check_dataflow(model.graph)


def _check_dataflow(graph: onnx.GraphProto) -> None:
    """Every node reads names defined before it (graph inputs, initializers, earlier nodes' outputs)
    and every graph output is produced: TVM's importer answers either with a bare KeyError."""
    if len(graph.sparse_initializer):
        raise UnsupportedModelError(f"sparse initializer '{graph.sparse_initializer[0].values.name}' is not "
                                    "supported; store the weight dense")
    defined = {vi.name for vi in graph.input} | {t.name for t in graph.initializer}
    for i, node in enumerate(graph.node):
        for name in node.input:
            if name and name not in defined:
                raise UnsupportedModelError(
                    f"node '{node.name or f'#{i}'}' ({node.op_type}) reads '{name}', which no graph input, "
                    "initializer or earlier node defines (nodes must be in topological order)")
        defined.update(o for o in node.output if o)
    for out in graph.output:
        if out.name not in defined:
            raise UnsupportedModelError(f"graph output '{out.name}' is produced by no node")


def _elem_dtype(elem_type: int) -> str:
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).name
    except (KeyError, TypeError, ValueError):  # undefined (0) or unknown element types (found by fuzzing)
        raise UnsupportedModelError(f"unsupported tensor element type {elem_type}") from None


def graph_inputs(model: onnx.ModelProto, overrides: dict[str, tuple[int, ...]] | None) -> list[TensorSpec]:
    """The input signature. Dynamic dims stay symbolic: a ``dim_param`` is its name (one name,
    one dimension, across inputs), a dim with neither value nor name is ``<input>_d<i>``;
    ``overrides`` (``--input-shape``) specialise an input to a static shape."""
    overrides = dict(overrides or {})
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dims: list[int | str | None] = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0
                                        else d.dim_param or None for d in tt.shape.dim]
        if vi.name in overrides:
            given = overrides.pop(vi.name)
            values = () if isinstance(given, (str, bytes)) else np.atleast_1d(np.asarray(given, object))
            if not len(values) or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
                raise BscompileError(f"input '{vi.name}': shape {given!r} is not a sequence of ints")
            shape = tuple(int(v) for v in values)
            if len(shape) != len(dims) or any(isinstance(d, int) and d != s for d, s in zip(dims, shape)) \
                    or any(s < 1 for s in shape):
                raise BscompileError(f"input '{vi.name}': shape {shape} does not fit the model's "
                                     f"{['?' if d is None else d for d in dims]}")
        else:
            shape = tuple(f"{vi.name}_d{i}" if d is None else d for i, d in enumerate(dims))
        specs.append(TensorSpec(vi.name, shape, _elem_dtype(tt.elem_type)))
    if overrides:
        raise BscompileError(f"--input-shape names unknown input(s): {', '.join(overrides)}; "
                             f"inputs are {', '.join(s.name for s in specs)}")
    return specs


def relax_shapes(specs: list[TensorSpec]) -> dict[str, list]:
    """Input shapes for TVM's importer: one ``int64`` variable per symbolic dim name."""
    dim_vars: dict[str, tvm.tirx.Var] = {}
    return {s.name: [dim_vars.setdefault(d, tvm.tirx.Var(d, "int64")) if isinstance(d, str) else d
                     for d in s.shape] for s in specs}


def convert_initializers(model: onnx.ModelProto, raw: MappedWeights | None = None) -> dict[str, relax.Expr]:
    """Every initializer of the graph as a named constant, each read once: from the memory map
    of the file where ``raw`` has its data (the map's pages are dropped once copied), else out of the proto.

    Two at a time, largest first (the copies are page faults and memory traffic, which NumPy
    does without the GIL): a weight read out of the proto goes through a transient copy
    (``raw_data``) while the constants made so far are resident; in this order the last
    copies are the smallest."""
    inits = list(model.graph.initializer)
    spans = raw.spans if raw is not None else [None] * len(inits)
    for init in inits:
        if not init.name.strip():
            raise UnsupportedModelError("ONNX import failed: an initializer has no name")

    def convert(i: int) -> relax.Expr:
        init = inits[i]
        try:
            arr = (numpy_helper.to_array(init) if spans[i] is None else _mapped_array(raw.mapped, spans[i], init)
                   ).reshape(tuple(init.dims))
        except Exception as err:  # noqa: BLE001 - malformed data (found by fuzzing)
            raise UnsupportedModelError(f"ONNX import failed: initializer '{init.name}': {_first_line(err)}") from None
        if arr.dtype.kind in "OUS":  # (TVM has no tensor of strings)
            raise UnsupportedModelError(f"initializer '{init.name}' holds strings; bscompile compiles numeric "
                                        "tensors only")
        value = _checked_copy(init.name, arr)
        if spans[i] is not None:
            del arr
            _drop_pages(raw.mapped, *spans[i])
        return named_const(value, init.name)

    order = sorted(range(len(inits)), key=lambda i: -math.prod(inits[i].dims))
    with ThreadPoolExecutor(2) as pool:
        return {inits[i].name: const for i, const in zip(order, pool.map(convert, order))}


def _checked_copy(name: str, arr: np.ndarray, chunk: int = 1 << 20) -> tvm.runtime.Tensor:
    """``arr`` copied into a new TVM tensor and checked by :func:`check_finite`, a chunk at a
    time, so each chunk is checked while it is in cache (one pass over the source). Types
    NumPy cannot view in a TVM tensor (``bfloat16``, ``float8``) are copied by TVM."""
    if arr.dtype.kind not in "fiub":
        check_finite(name, arr)
        return tvm.runtime.tensor(arr)
    value = tvm.runtime.empty(arr.shape, str(arr.dtype))
    dst, src = np.from_dlpack(value).reshape(-1), arr.reshape(-1)
    for lo in range(0, src.size, chunk):
        np.copyto(dst[lo : lo + chunk], src[lo : lo + chunk])
        if not np.isfinite(dst[lo : lo + chunk]).all():
            check_finite(name, arr)  # decides (a single value is a fill) and words the error
    return value


def _mapped_array(mapped: mmap.mmap, span: tuple[int, int], init: onnx.TensorProto) -> np.ndarray:
    """A read-only view of an initializer's raw data (little-endian) in the memory-mapped file."""
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(init.data_type)).newbyteorder("<")
    count, (offset, length) = math.prod(init.dims), span
    if length != count * dtype.itemsize:
        raise ValueError(f"{length} bytes of data for shape {list(init.dims)} of {dtype.name}")
    return np.frombuffer(mapped, dtype, count, offset).astype(dtype.newbyteorder("="), copy=False)


def _drop_pages(mapped: mmap.mmap, offset: int, length: int) -> None:
    """Unmap the whole pages of ``mapped[offset:offset + length]`` from this process (they stay
    in the page cache): a weight already copied into its constant stops counting as resident."""
    lo = -(-offset // mmap.PAGESIZE) * mmap.PAGESIZE
    hi = (offset + length) // mmap.PAGESIZE * mmap.PAGESIZE
    if hi > lo and hasattr(mapped, "madvise"):
        mapped.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def _without_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` without its graph's initializers (small: the weights stay in the
    original, which the caller can then drop)."""
    light = onnx.ModelProto()
    for dst, src in ((light, model), (light.graph, model.graph)):
        for fd, value in src.ListFields():
            if fd.name in ("graph", "initializer"):
                continue
            field = getattr(dst, fd.name)
            if hasattr(field, "extend"):  # a repeated field
                field.extend(value)
            elif hasattr(field, "CopyFrom"):  # a message
                field.CopyFrom(value)
            else:
                setattr(dst, fd.name, value)
    return light


class _Importer(tvm_onnx.ONNXGraphImporter):
    """TVM's importer with GRU/LSTM/RNN converters."""

    def __init__(self, *args, nodes_by_name: dict, weights: dict[str, relax.Expr], **kwargs):
        super().__init__(*args, **kwargs)
        self._onnx_nodes = nodes_by_name
        self._weights = weights
        #: Loop outputs that are appended-to ONNX sequences, as stacked tensors (:func:`concat_stacked`)
        self.stacked: set[relax.Expr] = set()

    def _parse_graph_initializers(self, graph):  # converted once, by convert_initializers
        self._nodes.update(self._weights)
        self._weights = {}

    def _check_for_unsupported_ops(self, graph):  # done by check_supported, with node names
        pass

    def _convert_operator(self, op_name, inputs, attrs, opset):
        for flag in FLAG_ATTRS.get(op_name, ()):
            if flag in attrs and attrs[flag] not in (0, 1):
                raise UnsupportedModelError(f"node '{attrs['tvm_custom']['name']}' ({op_name}): attribute '{flag}' "
                                            f"must be 0 or 1, got {attrs[flag]}")
        name = const_name(inputs[0]) if inputs and op_name in LAYOUT_OPS else None
        if op_name == "Gemm" and attrs.get("transB") and const_name(inputs[1]):  # the weight's name survives
            w = inputs[1]
            inputs[1] = named_const(const_array(w).T, const_name(w))
            attrs = {**attrs, "transB": 0}
        try:
            sym = self._convert_operator_(op_name, inputs, attrs, opset)
        except BscompileError:
            raise
        except Exception as err:  # noqa: BLE001 - TVM's converters raise anything on shapes they do not handle
            raise UnsupportedModelError(f"node '{attrs['tvm_custom']['name']}' ({op_name}) cannot be imported: "
                                        f"{_first_line(err)}") from err
        if name and isinstance(sym, tvm.ir.expr.Constant) and const_name(sym) is None:
            sym = named_const(sym.value, name)
        return sym

    def _convert_operator_(self, op_name, inputs, attrs, opset):
        if op_name in RECURRENT_OPS:
            node = self._onnx_nodes[attrs["tvm_custom"]["name"]]
            return convert_recurrent(RECURRENT_OPS[op_name], self.bb, inputs, attrs, node)
        if op_name in LOOP_OPS:
            return convert_loop(self, op_name, inputs, attrs, supported_ops())
        if op_name == "ConcatFromSequence" and inputs[0] in self.stacked:
            return concat_stacked(self.bb, inputs[0], attrs.get("axis", 0), attrs.get("new_axis", 0),
                                  attrs["tvm_custom"]["name"])
        sym = super()._convert_operator(op_name, inputs, attrs, opset)
        dims = getattr(getattr(getattr(sym, "ty", None), "shape", None), "values", None) or ()
        if any(isinstance(d, tvm.tirx.IntImm) and d.value < 0 for d in dims):  # (e.g. a Slice whose start > end)
            shape = [dim_of(d) for d in dims]
            raise UnsupportedModelError(f"node '{attrs['tvm_custom']['name']}' ({op_name}) cannot be imported: its "
                                        f"result would have shape {shape} (an empty or reversed range)")
        _check_symbolic_shapes(self.bb, inputs, sym, op_name, attrs["tvm_custom"]["name"])
        if op_name in INDEX_OPS and isinstance(sym, relax.Call):  # passes.check_indices names the node
            # as an identifier: binding names become kernel parameter names in generated (CUDA) source
            name = re.sub(r"\W+", "_", attrs["tvm_custom"]["name"]).strip("_") or op_name
            sym = self.bb.emit(sym, name_hint=name)
        return sym


def _contracted_dims(call: relax.Call, shapes: list) -> list[tuple[tvm.ir.PrimExpr, tvm.ir.PrimExpr]]:
    """The dims of ``call``'s operands that its kernel takes to be equal: a matmul's reduction
    dims, a convolution's input channels (NC... layouts)."""
    name = call.op.name
    if name == "relax.matmul" and len(shapes[0]) >= 1 and len(shapes[1]) >= 1:
        return [(shapes[0][-1], shapes[1][0 if len(shapes[1]) == 1 else -2])]
    if name.startswith("relax.nn.conv") and "transpose" not in name and call.attrs.data_layout.startswith("NC") \
            and call.attrs.kernel_layout.startswith("OI"):
        return [(shapes[0][1], shapes[1][1] * call.attrs.groups)]
    return []


def _check_symbolic_shapes(bb: relax.BlockBuilder, inputs: list, out: relax.Expr, op: str, node: str) -> None:
    """Refuse a node whose shapes agree only for some sizes of the symbolic dims. Relax shape
    inference rejects only dims that are provably unequal: ``[n, 8] + [2, 8]`` gets an unknown
    shape (an internal error when lowered), a matmul or convolution contracting ``k`` with ``8``
    (``[3, k] @ [8, 4]``) compiles to a kernel that reads out of bounds for every ``k != 8``, and
    a reshape ``[batch, d] -> [batch * d // 32, 32]`` gives the kernels a zero or wrong extent (a
    division by zero, a read out of bounds) for a ``d`` that breaks its element count.

    Walks the Relax expressions the node became, back to its inputs (``bb.lookup_binding``)."""
    stop = [e for e in inputs if isinstance(e, relax.Expr)]
    analyzer = tvm.sym.Analyzer()
    todo, seen = [out], set()
    while todo:
        e = todo.pop()
        if not isinstance(e, relax.Expr) or e in seen or any(e.same_as(s) for s in stop):
            continue
        seen.add(e)
        if isinstance(e, relax.Var):
            todo.append(bb.lookup_binding(e))
        elif isinstance(e, relax.Tuple):
            todo.extend(e.fields)
        elif isinstance(e, relax.TupleGetItem):
            todo.append(e.tuple_value)
        elif isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op):
            todo.extend(e.args)
            tys = [bb.normalize(a).ty for a in e.args]
            shapes = [getattr(getattr(t, "shape", None), "values", None)  # (a concat's operands are a tuple)
                      for ty in tys for t in (ty.fields if isinstance(ty, relax.TupleType) else [ty])]
            ty = bb.normalize(e).ty
            known = [shape_text(sh) for sh in shapes if sh is not None]
            if isinstance(ty, relax.TensorType) and ty.shape is None and known:
                raise UnsupportedModelError(
                    f"node '{node}' ({op}): the shapes of its operands {', '.join(known)} match only for some sizes "
                    "of the symbolic dims: give them with --input-shape")
            if e.op.name == "relax.reshape" and shapes[0] is not None and ty.shape is not None:
                count_in, count_out = (math.prod(sh, start=tvm.tirx.IntImm("int64", 1))
                                       for sh in (shapes[0], ty.shape.values))
                if not analyzer.can_prove_equal(count_in, count_out):
                    raise UnsupportedModelError(
                        f"node '{node}' ({op}) turns {shape_text(shapes[0])} into {shape_text(ty.shape.values)}, "
                        "which holds only for some sizes of its symbolic dims: give them with --input-shape")
            if len(shapes) < 2 or shapes[0] is None or shapes[1] is None:
                continue
            for a, b in _contracted_dims(e, shapes):
                if not analyzer.can_prove_equal(a, b):
                    raise UnsupportedModelError(
                        f"node '{node}' ({op}) contracts {shape_text(shapes[0])} with {shape_text(shapes[1])} over dims "
                        f"{dim_of(a)} and {dim_of(b)}, which match only for some sizes of the symbolic dims: give "
                        "them with --input-shape")


def import_onnx(model: str | os.PathLike | onnx.ModelProto,
                input_shapes: dict[str, tuple[int, ...]] | None = None) -> ImportedModel:
    proto, raw = read_model(model)
    check_supported(proto)
    inputs = graph_inputs(proto, input_shapes)
    # A symbolic dim is checked at its smallest size, 1 (inputs are not held while compiling).
    check_resources(proto, {s.name: tuple(d if isinstance(d, int) else 1 for d in s.shape) for s in inputs},
                    {s.name: s.dtype for s in inputs}, finite=False)  # (checked as they are converted)
    weights = convert_initializers(proto, raw)
    del raw  # (the memory map closes with it)
    proto = _with_node_names(_without_initializers(proto))  # the weights' proto is freed (if not the caller's)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 1)
    importer = _Importer(
        relax_shapes(inputs), {s.name: s.dtype for s in inputs},
        nodes_by_name={n.name: n for n in proto.graph.node}, weights=weights,
    )
    del weights
    try:  # (TVM's importer prints every failing node's inputs to stdout before re-raising)
        with contextlib.redirect_stdout(io.StringIO()):
            mod = importer.from_onnx(proto.graph, opset)
    except BscompileError:
        raise
    except Exception as err:
        raise UnsupportedModelError(f"ONNX import failed: {_first_line(err)}") from err
    ret = mod["main"].ret_ty
    fields = ret.fields if isinstance(ret, relax.TupleType) else [ret]
    for o, f in zip(proto.graph.output, fields):
        if getattr(f, "shape", None) is None:  # e.g. a MatMul whose operands' ranks do not match the model
            node = next((n for n in proto.graph.node if o.name in n.output), None)
            of = f" (of node '{node.name}', {node.op_type})" if node is not None else ""
            raise UnsupportedModelError(f"output '{o.name}'{of} has no known shape after import: a shape that "
                                        "depends on the data, or inconsistent shapes in the model")
    outputs = [
        TensorSpec(o.name, tuple(dim_of(v) for v in f.shape.values),
                   str(f.dtype.dtype) if hasattr(f.dtype, "dtype") else str(f.dtype))
        for o, f in zip(proto.graph.output, fields)
    ]
    return ImportedModel(with_signature(mod, inputs, outputs), inputs, outputs)


def _with_node_names(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give every node a unique name so errors and weight names can point at it."""
    if all(n.name for n in model.graph.node) and len({n.name for n in model.graph.node}) == len(model.graph.node):
        return model
    model = onnx.ModelProto.FromString(model.SerializeToString())
    seen: set[str] = set()
    for i, n in enumerate(model.graph.node):
        if not n.name or n.name in seen:
            n.name = f"{n.op_type}_{i}"
        seen.add(n.name)
    return model


def _first_line(err: Exception) -> str:
    """The line of ``err`` that says what is wrong (TVM's messages end with it), without the IR
    printer's boilerplate or the dump of the op's definition."""
    text = re.sub(r"\s*# Metadata omitted\. Use show_meta=True in script\(\) method to show it\.\s*", " ", str(err))
    text = re.sub(r'In ir\.Op\(.*?name="([\w.]+)".*?support_level=\d+\), ', r"\1: ", text, flags=re.S)
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(err).__name__
