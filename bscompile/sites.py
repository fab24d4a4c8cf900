"""The site vocabulary every stage shares: attribute names, site kinds, tensor specs, fingerprints.

A *weight site* is one use of a weight matrix that bscompile compiles into a kernel of
its own. Before lowering it is a call of a private Relax function, the *site
function*: its parameters are the site's operands with every weight matrix in the
canonical ``W[N, K]`` orientation (``y = x @ W.T``), its body an opaque placeholder,
and its attributes say what the site is and what the passes decided about it::

    bscompile.site      what it is (set by the frontend or pass that creates it):
                        {"kind", "name", "fingerprint", "m", "shape", ...kind-specific}
    bscompile.sparsity  what AnalyzeSparsity measured (density, structure, per-block counts)
    bscompile.layout    what ChooseLayout picked (layout, block, schedules, estimates, reason)

``LowerWeightSites`` replaces each call by a ``call_tir`` of the kernel the target's
family generates for that layout; the kernel ``PrimFunc`` keeps the three attributes
(plus ``stored_bytes``), so the final IR describes every site and the artifact's
manifest is read from it (:func:`weight_entries`).

This module is a leaf: it imports NumPy and TVM only, so that the runtime can use
:class:`TensorSpec` without loading the frontend or the code generators.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import tvm
import tvm_ffi
from tvm import relax

SITE = "bscompile.site"
SPARSITY = "bscompile.sparsity"
LAYOUT = "bscompile.layout"
#: Attribute of a real loop's outer function (``loop_chunks``; :mod:`bscompile.frontend.loops`).
LOOP = "bscompile.loop"

_CALL_TIR = tvm.ir.Op.get("relax.call_tir")


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output: name, shape, dtype. A symbolic dimension is its name
    (a string, e.g. ``"batch"``); any size >= 1 fits it, and dims of one name agree."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str

    @property
    def symbolic(self) -> bool:
        return any(isinstance(d, str) for d in self.shape)

    def random(self, rng: np.random.Generator | None = None) -> np.ndarray:
        """A random array that fits: normal floats, small non-negative integers (token ids);
        symbolic dims get size 1."""
        rng = rng or np.random.default_rng()
        shape = tuple(d if isinstance(d, int) else 1 for d in self.shape)
        if np.dtype(self.dtype).kind in "iu":
            return rng.integers(0, 8, size=shape).astype(self.dtype)
        return rng.standard_normal(shape).astype(self.dtype)

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, d: dict) -> "TensorSpec":
        return cls(d["name"], tuple(d["shape"]), d["dtype"])


def dim_of(value: tvm.ir.Expr | int) -> int | str:
    """A Relax shape dimension as a :class:`TensorSpec` dim: an int, or the text of a symbolic one."""
    if isinstance(value, int):
        return value
    if isinstance(value, tvm.tirx.IntImm):
        return int(value.value)
    return re.sub(r"T\.int(?:32|64)\((-?\d+)\)", r"\1", str(value))  # "(time - 1) // 2 + 1"


def shape_text(values) -> str:
    """A Relax shape as an error message shows it: ``[batch, x_d1 * 4, 32]``."""
    return "[" + ", ".join(str(dim_of(v)) for v in values) + "]"


def fingerprint(w: np.ndarray) -> str:
    """Content key of a weight matrix: names sites and keys tuning records.

    SHA-1 of the shape and the C-order float32 bytes (-0.0 as 0.0), fed in slices of
    about a MiB: no whole-matrix copies, and a transposed view (the importer keys both
    orientations of every initializer) is copied in column stripes that stay in cache.
    """
    w = np.asarray(w)
    w = w.reshape(1) if w.ndim == 0 else w  # as np.ascontiguousarray does
    h = hashlib.sha1(repr(w.shape).encode())
    for part in _row_slices(w):
        h.update(np.add(part, np.float32(0), dtype=np.float32, order="C"))  # a C-order copy; -0.0 + 0 = 0.0
    return h.hexdigest()


def _row_slices(w: np.ndarray, size: int = 1 << 18):
    """``w`` as consecutive slices along axis 0 of about ``size`` elements each."""
    if w.ndim == 2 and w.T.flags.c_contiguous and not w.flags.c_contiguous:
        step = max(128, size // max(w.shape[1], 1))  # rows of w per stripe; w.shape[1] is small for a reshaped tensor
        for j in range(0, w.shape[0], step):  # a transposed matrix: a contiguous stripe of it, then transpose that
            yield np.ascontiguousarray(w.T[:, j:j + step]).T
        return
    rows = max(1, size * len(w) // max(w.size, 1))
    for i in range(0, len(w), rows):
        yield w[i:i + rows]


def const_array(expr: relax.Expr) -> np.ndarray | None:
    """The value of a Relax constant (a read-only view of it, no copy), or None for anything
    computed at run time."""
    if not isinstance(expr, tvm.ir.expr.Constant):
        return None
    try:
        arr = np.from_dlpack(expr.value)
    except (BufferError, TypeError, ValueError, RuntimeError):  # a dtype NumPy has no DLPack code for
        return expr.value.numpy()
    arr.flags.writeable = False
    return arr


#: The span source name of a named weight constant: this prefix, then the weight's name.
_WEIGHT_SPAN = "bscompile.weight:"


def named_const(value: np.ndarray | tvm.runtime.Tensor, name: str | None) -> relax.Expr:
    """A Relax constant that carries the name of the weight it is (an ONNX initializer, or
    ``"W[d]"`` for one direction of a recurrent weight) as its span's source name: the IR,
    not a side table, says which weight a constant is. A derived constant (a transpose, a
    slice) is given its source's name by whoever makes it; TVM's ``FoldConstant`` drops it."""
    if not isinstance(value, tvm.runtime.Tensor):
        arr = np.asarray(value)
        if arr.flags.c_contiguous or arr.dtype.kind not in "fiub":
            value = tvm.runtime.tensor(arr)
        else:  # a transposed or strided view: one copy, straight into the constant
            value = tvm.runtime.empty(arr.shape, str(arr.dtype))
            np.from_dlpack(value)[...] = arr
    span = tvm.ir.Span(tvm.ir.SourceName(_WEIGHT_SPAN + name), 0, 0, 0, 0) if name else None
    return tvm.ir.GenericConst(value, relax.TensorType(value.shape, value.dtype), span)


def const_name(expr: relax.Expr) -> str | None:
    """The weight name :func:`named_const` gave a constant, or None (a parsed constant's span
    names its source file, which is no weight name)."""
    span = getattr(expr, "span", None) if isinstance(expr, tvm.ir.expr.Constant) else None
    source = span.source_name.name if span is not None and span.source_name is not None else ""
    return source[len(_WEIGHT_SPAN):] if source.startswith(_WEIGHT_SPAN) else None


def to_py(value: Any) -> Any:
    """A TVM attribute value (Map, Array, String, IntImm...) as plain Python."""
    if isinstance(value, (str, bool, int, float)) or value is None:
        return value
    if isinstance(value, (tvm_ffi.Map, dict)):
        return {str(k): to_py(v) for k, v in value.items()}
    if isinstance(value, (tvm_ffi.Array, list, tuple)):
        return [to_py(v) for v in value]
    if isinstance(value, tvm.tirx.IntImm):
        return int(value.value)
    if isinstance(value, tvm.tirx.FloatImm):
        return float(value.value)
    return str(value)


def attr(func: tvm.ir.BaseFunc, key: str) -> dict | None:
    """Attribute ``key`` of ``func`` as a plain dict, or None."""
    if func.attrs is None or key not in func.attrs:
        return None
    return to_py(func.attrs[key])


# --- site kinds ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Matrix:
    """One weight matrix of a site: positions of ``W[N, K]`` and its bias ``[N]`` among the operands."""

    weight: int
    bias: int


@dataclass(frozen=True)
class SiteKind:
    """What the generic passes need to know about a kind of site, registered by its creator.

    ``matrices(site)`` lists the weight operands (analysed together, as one weight,
    concatenated along N; their sparsity is reported whatever the layout);
    ``kernel_args(operands, packed)`` orders the kernel's
    arguments given the operands and, per matrix, its packed ``(data, indices, indptr,
    bias)``: the calling convention of the kind's kernel generators, one per target
    family (:meth:`codegen.family.KernelFamily.kernel`).
    """

    name: str
    matrices: Callable[[dict], list[Matrix]]
    kernel_args: Callable[[Sequence[relax.Expr], list[tuple[relax.Expr, ...]]], list[relax.Expr]] | None = None
    #: For kinds whose kernels read a weight layout of their own rather than BSR: the one
    #: layout ``ChooseLayout`` records, and ``pack(site, operands, layout, schedules) ->
    #: (kernel arguments, stored bytes)``, which replaces the BSR packing and
    #: ``kernel_args`` (the schedules, one per m bucket, may shape the packing).
    fixed_layout: str | None = None
    pack: Callable[[dict, Sequence[relax.Expr], dict, Any], tuple[list[relax.Expr], int]] | None = None


SITE_KINDS: dict[str, SiteKind] = {}


def register_site_kind(kind: SiteKind) -> SiteKind:
    SITE_KINDS[kind.name] = kind
    return kind


def site_kind(name: str) -> SiteKind:
    try:
        return SITE_KINDS[name]
    except KeyError:
        raise KeyError(f"unknown weight-site kind {name!r}: the module that creates it registers it "
                       f"(known: {', '.join(SITE_KINDS)})") from None


def emit_site(bb: relax.BlockBuilder, site: dict, operands: Sequence[relax.Expr], out_ty: relax.Type,
              name_hint: str) -> relax.Expr:
    """Emit a call of a new site function with attributes ``site`` on ``operands``.

    The function's body is a placeholder extern call, ``bscompile.site.<kind>``:
    sites run only once ``LowerWeightSites`` has replaced them by kernels. Symbolic
    values in ``site`` (``m``, ``seq``, ...: PrimExprs of the caller's shapes) are
    recorded as the name of the site function's variable for them.
    """
    tys, sub = definable([op.ty for op in operands] + [out_ty], len(operands))
    *param_tys, out_ty = tys
    site = {key: dim_of(sub(v)) if isinstance(v, tvm.ir.Expr) else v for key, v in site.items()}
    params = [relax.Var(f"a{i}", ty) for i, ty in enumerate(param_tys)]
    fb = relax.BlockBuilder()
    with fb.function(name_hint, params, {SITE: site}, private=True):
        fb.emit_func_output(fb.emit(relax.call_pure_packed(f"bscompile.site.{site['kind']}", *params,
                                                           ty_args=out_ty)))
    gv = bb.add_func(fb.get()[name_hint], name_hint)
    return relax.Call(gv, list(operands))


# --- the linear site kind (made by OutlineLinearSites and the recurrent frontend) -----------


def _linear_kernel_args(operands, packed):
    (data, indices, indptr, bias), = packed
    return [operands[0], data, indices, indptr, bias]


#: Operands ``[x2d, W, bias]``; kernel ``(x2d, data, indices, indptr, bias) -> y[M, N]``.
LINEAR = register_site_kind(SiteKind("linear", lambda site: [Matrix(1, 2)], _linear_kernel_args))


def expr_dims(v: relax.Expr) -> list | None:
    """The dims of a tensor value (PrimExprs), or None (not a tensor, or of unknown shape)."""
    ty = getattr(v, "ty", None)
    shape = getattr(ty, "shape", None) if isinstance(ty, relax.TensorType) else None
    return list(shape.values) if shape is not None and hasattr(shape, "values") else None


def tensor_dims(shape) -> tuple[int | tvm.ir.PrimExpr, ...] | None:
    """A tensor's dims, each an ``int`` when static (else its PrimExpr); None if its shape is unknown."""
    values = getattr(shape, "values", None)
    if values is None:
        return None
    return tuple(int(d) if isinstance(d, tvm.tirx.IntImm) else d for d in values)


def static_k_dims(expr: relax.Expr) -> tuple | None:
    """Dims of ``expr`` (ints, or PrimExprs for symbolic ones) with a static last dim, else None."""
    dims = tensor_dims(getattr(expr.ty, "shape", None))
    return dims if dims and isinstance(dims[-1], int) else None


def emit_linear_site(bb: relax.BlockBuilder, x: relax.Expr, w: relax.Expr, bias: np.ndarray | None) -> relax.Expr:
    """The linear site ``x @ w.T + bias`` (``w`` a constant ``W[N, K]``; ``x[..., K]`` float32
    with a static ``K``), as ``OutlineLinearSites`` makes it; also the recurrent converters'
    input products, whose weights come in this orientation."""
    shape = static_k_dims(x)
    n, k = (int(d) for d in w.ty.shape.values)
    m = math.prod(shape[:-1])  # (PrimExprs for symbolic dims)
    key = fingerprint(const_array(w))
    site = {"kind": "linear", "name": const_name(w) or f"weight_{key[:8]}", "fingerprint": key,
            "m": m, "shape": [n, k]}
    b = np.zeros(n, np.float32) if bias is None else bias
    if len(shape) == 2:
        return emit_site(bb, site, [x, w, relax.const(b)], relax.TensorType((m, n), "float32"), "linear_site")
    x2d = bb.emit(relax.op.reshape(x, [m, k]))
    y = bb.emit(emit_site(bb, site, [x2d, w, relax.const(b)], relax.TensorType((m, n), "float32"), "linear_site"))
    return relax.op.reshape(y, [*shape[:-1], n])


def definable(tys: list[relax.Type], n_params: int) -> tuple[list[relax.Type], Callable]:
    """``tys`` with every symbolic dim of the first ``n_params`` replaced by a variable of the
    site function's own (Relax functions share no symbolic vars; the call binds them from
    its arguments): a caller's var by a namesake, a compound dim (``batch * time``) by
    ``m``; also returns that substitution."""
    fresh: list[tuple[tvm.ir.Expr, tvm.tirx.Var]] = []

    def sub(dim):
        if isinstance(dim, tvm.tirx.IntImm):
            return dim
        for old, new in fresh:
            if tvm_ffi.structural_equal(old, dim):
                return new
        return dim

    for ty in tys[:n_params]:
        if isinstance(ty, relax.TensorType) and ty.shape is not None and hasattr(ty.shape, "values"):
            for d in ty.shape.values:
                if not isinstance(d, tvm.tirx.IntImm) and sub(d) is d:
                    compound = sum(not isinstance(o, tvm.tirx.Var) for o, _ in fresh)
                    name = d.name if isinstance(d, tvm.tirx.Var) else "m" if not compound else f"m{compound}"
                    fresh.append((d, tvm.tirx.Var(name, "int64")))

    def rewrite(ty):
        if isinstance(ty, relax.TupleType):
            return relax.TupleType([rewrite(f) for f in ty.fields])
        if not fresh or not isinstance(ty, relax.TensorType) or ty.shape is None or not hasattr(ty.shape, "values"):
            return ty
        return relax.TensorType([sub(d) for d in ty.shape.values], ty.dtype)

    return [rewrite(ty) for ty in tys], sub


# --- reading sites from a module ----------------------------------------------------------


@dataclass
class SiteCall:
    """One call of a site (function) in a Relax function, as found in program order."""

    gv: tvm.ir.GlobalVar
    func: tvm.ir.BaseFunc  # the site function (before lowering) or the kernel (after)
    operands: list[relax.Expr]  # the call's arguments (for call_tir: the argument tuple)

    @property
    def site(self) -> dict:
        return attr(self.func, SITE)


#: Attribute of a kernel that runs site kernels inlined in it (``FuseLoopKernels``): their
#: attributes, in the order it runs them, so the manifest still lists their weights.
INLINED_SITES = "bscompile.inlined_sites"


@dataclass(frozen=True)
class InlinedSite:
    """A site kernel inlined into another kernel: its attributes, all :func:`attr` reads."""

    attrs: Any


def _callee(mod: tvm.IRModule, call: relax.Call) -> tuple[tvm.ir.GlobalVar, list[relax.Expr]] | None:
    if isinstance(call.op, tvm.ir.GlobalVar):
        return call.op, list(call.args)
    if call.op.same_as(_CALL_TIR) and isinstance(call.args[0], tvm.ir.GlobalVar):
        return call.args[0], list(call.args[1].fields)
    return None


def site_calls(mod: tvm.IRModule) -> Iterator[SiteCall]:
    """Every call of a site function or site kernel in the module's Relax functions, in program order."""
    found: list[SiteCall] = []

    def visit(expr):
        if isinstance(expr, relax.Call):
            hit = _callee(mod, expr)
            if hit is not None and hit[0] in mod.functions:
                func = mod[hit[0]]
                if func.attrs is not None and SITE in func.attrs:
                    found.append(SiteCall(hit[0], func, hit[1]))
                elif func.attrs is not None and INLINED_SITES in func.attrs:
                    found.extend(SiteCall(hit[0], InlinedSite(a), hit[1]) for a in func.attrs[INLINED_SITES])

    for gv, func in mod.functions.items():
        if isinstance(func, relax.Function) and (func.attrs is None or SITE not in func.attrs):
            relax.analysis.post_order_visit(func.body, visit)
    return iter(found)


#: Module attribute: the manifest's weight entries (JSON text of :func:`weight_entries`), recorded by
#: ``RecordWeights`` before kernels are merged.
WEIGHTS = "bscompile.weights"


#: Module attribute: the ONNX graph's inputs and outputs (JSON of :class:`TensorSpec` lists), set by
#: the frontend; the manifest's signature is read from the final IR.
SIGNATURE = "bscompile.signature"


def with_signature(mod: tvm.IRModule, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> tvm.IRModule:
    return mod.with_attr(SIGNATURE, json.dumps({"inputs": [s.to_json() for s in inputs],
                                                "outputs": [s.to_json() for s in outputs]}))


def recorded_signature(mod: tvm.IRModule) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The inputs and outputs :func:`with_signature` recorded in ``mod``."""
    d = json.loads(str(mod.attrs[SIGNATURE]))
    return [TensorSpec.from_json(t) for t in d["inputs"]], [TensorSpec.from_json(t) for t in d["outputs"]]


def recorded_weights(mod: tvm.IRModule) -> list[dict]:
    """The weight entries ``RecordWeights`` recorded in ``mod``."""
    return json.loads(str(mod.attrs[WEIGHTS]))


def weight_entries(mod: tvm.IRModule) -> list[dict]:
    """One manifest entry per site call, in program order: what it is, what was found and chosen.

    (Uses of one weight with one batch share a site function, and so a kernel.)"""
    return [weight_entry(call.func) for call in site_calls(mod)]


def weight_entry(func: tvm.ir.BaseFunc) -> dict:
    site = attr(func, SITE)
    n, k = site["shape"]
    entry = {"name": site["name"], "kind": site["kind"], "shape": [n, k], "m": site["m"], "dense_bytes": n * k * 4}
    extra = {key: v for key, v in site.items() if key not in ("name", "kind", "shape", "m", "fingerprint")}
    if extra:
        entry["attributes"] = extra  # what the kind adds: a recurrent cell, a dynamic site's block and keep
    sparsity = attr(func, SPARSITY)
    if sparsity is not None:
        entry["sparsity"] = sparsity_summary(sparsity, (n, k))
    layout = attr(func, LAYOUT)
    if layout is not None:
        decision = {key: layout[key] for key in ("layout", "block", "est_time_us", "dense_est_time_us", "reason")}
        scheds = layout.get("schedules") or []
        decision["schedule"] = scheds[0] if scheds else {}
        if "buckets" in layout:  # a symbolic m: the kernel picks a schedule per range of m at run time
            decision["buckets"] = layout["buckets"]
        entry["decision"] = decision
        if "stored_bytes" in layout:
            entry["stored_bytes"] = layout["stored_bytes"]
            entry["bytes_saved"] = entry["dense_bytes"] - layout["stored_bytes"]
    return entry


def sparsity_summary(sparsity: dict, shape: tuple[int, int]) -> dict:
    """The manifest's view of a ``bscompile.sparsity`` attribute."""
    blocks = sparsity["blocks"]  # "RxC" -> [nnz_blocks, total_blocks, padded_n, padded_k]
    return {
        "density": sparsity["density"],
        "structure": sparsity["structure"],
        "detected_block": sparsity["detected"] or None,
        "zero_blocks": {b: round(1 - v[0] / max(v[1], 1), 6) for b, v in blocks.items()},
        "padding": {b: [v[2] - shape[0], v[3] - shape[1]] for b, v in blocks.items()
                    if (v[2], v[3]) != tuple(shape)},
    }
