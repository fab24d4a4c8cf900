"""CheckIndices: every data-dependent index is range-checked before TVM reads with it.

TVM lowers ``take`` (mode "fast": ONNX Gather, embeddings), ``gather_elements``,
``gather_nd``, ``scatter_elements`` and ``scatter_nd`` to loads and stores at
whatever address the index tensor names: one out-of-range token id is an
out-of-bounds read (or write) driven by input data. onnxruntime answers it with an
error; so must we, on every target.

Contract
- Input: Relax after constant folding. For each binding of one of those ops whose
  index tensor is computed at run time and whose index shape is known (static or
  symbolic: dynamic ONNX dims), the index argument becomes
  ``call_tir(check_index_K, (x, *symbolic_bounds))``: a kernel that copies ``x`` and, at the first
  element outside the allowed range, calls the packed function
  ``bscompile.index_error(prefix, value, lo, hi, suffix)`` (registered by
  :mod:`bscompile.runtime.module` and by the deploy runner), which raises
  ``IndexError("<prefix><value> outside [lo, hi)<suffix>")``; the call returns
  the error, so the indexing op never runs.
- ONNX semantics for negative indices: when the index is the frontend's
  normalisation ``where(less(x, 0), add(x, n), x)`` (or the op wraps negatives
  itself: ``scatter_elements``), ``x`` is checked against ``[-n, n)`` and the
  kernel wraps it, replacing the normalisation (left dead for DCE); otherwise the
  range is ``[0, n)`` and the kernel is an identity copy.
- The message names the graph input the index comes from (through reshapes,
  transposes, squeezes and integer casts) and the ONNX node (the frontend names an
  indexing op's binding after its node).
- Recurrent weight sites (calls of a site function of kind "recurrent", operand
  ``lens_operand``): a ``lens`` (ONNX ``sequence_lens``) computed at run time is checked
  against ``[0, seq]`` (a symbolic ``seq`` too), as onnxruntime does; a reverse direction
  reads ``x[lens - 1]``. The frontend's "whole sequence" fill (``full``) is not checked.
- Constant indices are checked now: out of range is an :class:`UnsupportedModelError`.
- Symbolic dims: the kernel's buffers take fresh variables (bound at run time); a
  symbolic indexed extent is an ``int64`` argument of the kernel. A constant index into
  a symbolic extent is checked at run time.
- ``raises=False`` (a family whose kernels cannot raise, CUDA's: ``KernelFamily.raises``): the
  index is wrapped and clamped with Relax ops instead (memory-safe, no error); ``lens`` is clamped
  by that family's recurrent kernels.
- Idempotent: an index that is already a check kernel's result (attribute ``CHECK_ATTR``)
  or ``minimum(maximum(x, 0), n - 1)`` with constants (the clamp without ``raises``) is in range.
- Left alone: ``take`` in mode "wrap"/"clip" (in range by construction), index tensors
  of unknown shape, unsigned dtypes' wrap (nothing to wrap), without ``raises`` an index into
  a symbolic extent (no constant to clamp to).
"""

from __future__ import annotations

import math
import re

import numpy as np
import tvm
import tvm_ffi
from tvm import relax, tirx
from tvm.script import tirx as T

from bscompile.errors import UnsupportedModelError
from bscompile.passes.rewrite import rewrite_relax_functions
from bscompile.sites import SITE, attr, tensor_dims

ERROR_FUNC = "bscompile.index_error"
tvm_ffi.register_error(UnsupportedModelError)  # keeps its class when raised through the pass infrastructure

_OP = {name: tvm.ir.Op.get(f"relax.{name}") for name in
       ("take", "gather_elements", "gather_nd", "scatter_elements", "scatter_nd", "where", "less", "add",
        "reshape", "permute_dims", "squeeze", "expand_dims", "flatten", "astype", "full", "minimum", "maximum",
        "call_tir")}
#: PrimFunc attribute marking this pass's check kernels (an index they return is not checked again).
CHECK_ATTR = "bscompile.check_index"
#: Ops that keep every index value (so an error can name the input it came from).
_VALUE_KEEPING = ("reshape", "permute_dims", "squeeze", "expand_dims", "flatten", "astype")
_ANONYMOUS = re.compile(r"(lv|gv)\d*$")


Dim = int | tvm.ir.Expr


def check_kernel(shape: tuple[Dim, ...], dtype: str, bounds: tuple[Dim, ...] = (), wrap: bool = False,
                 prefix: str = "", suffix: str = "") -> tirx.PrimFunc:
    """``y = x`` (wrapped if ``wrap``); element ``i`` must lie in ``[-b, b)`` (``[0, b)``),
    ``b = bounds[i % len(bounds)]`` (one bound per coordinate of ``gather_nd`` indices).
    Without ``bounds``: a plain copy, written as a flat loop so that TVM does not turn it
    back into a reshape (a view), as ``OwnOutputs`` needs.

    Symbolic dims of ``shape`` become the kernel's own variables (bound by the buffers);
    each symbolic bound becomes an ``int64`` parameter after ``x`` (the caller passes the
    PrimExpr as an argument of ``call_tir``), so dynamic-shape models are checked too."""
    shape = tuple(d if isinstance(d, int) else tirx.Var(f"n{i}", "int64") for i, d in enumerate(shape))
    scalars = [tirx.Var(f"b{j}", "int64") for j, b in enumerate(bounds) if not isinstance(b, int)]
    it = iter(scalars)
    bounds = tuple(b if isinstance(b, int) else next(it) for b in bounds)
    n = math.prod(shape)  # (an int, or a PrimExpr of the kernel's variables)
    k = len(bounds)
    checked = k > 0

    def const(b):
        return tirx.const(b, dtype) if isinstance(b, int) else b if dtype == "int64" else tirx.Cast(dtype, b)

    def bound(i):  # a constant (or parameter), or a select over the coordinate i % k
        e = const(bounds[-1] if checked else 0)
        for j in range(k - 2, -1, -1):
            e = tirx.Select(i % k == j, const(bounds[j]), e)
        return e

    def low(i):
        return -bound(i) if wrap else tirx.const(0, dtype)

    def wrapped(v, i):
        return tirx.Select(v < tirx.const(0, dtype), v + bound(i), v) if wrap else v

    func_attrs = {"tir.noalias": True, "op_pattern": 8} | ({CHECK_ATTR: True} if checked else {})

    @T.prim_func(s_tir=True, private=True, check_well_formed=False)  # (free bound vars: params below)
    def check_index(x: T.Buffer(shape, dtype), y: T.Buffer(shape, dtype)):
        T.func_attr(func_attrs)
        with T.sblock("root"):
            xf = T.decl_buffer((n,), dtype, data=x.data)
            yf = T.decl_buffer((n,), dtype, data=y.data)
            for i in range(n):
                if checked:
                    if xf[i] < low(i) or xf[i] >= bound(i):
                        T.evaluate(T.call_packed(ERROR_FUNC, prefix, T.Cast("int64", xf[i]),
                                                 T.Cast("int64", low(i)), T.Cast("int64", bound(i)), suffix))
                yf[i] = wrapped(xf[i], i)

    if scalars:  # (x, b0, ..., y): call_tir passes tensor and PrimExpr arguments, then outputs
        params = list(check_index.params)
        check_index = tirx.PrimFunc([params[0], *scalars, params[1]], check_index.body, check_index.ret_type,
                                    check_index.attrs)
    return check_index


@relax.expr_functor.mutator
class _Guard(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, raises: bool):
        super().__init__(mod)
        self.mod = mod
        self.raises = raises
        self.params: set = set()

    def visit_function_(self, func: relax.Function) -> relax.Expr:
        self.params = set(func.params)
        return super().visit_function_(func)

    def _bound(self, var):
        return self.lookup_binding(var) if isinstance(var, relax.Var) else None

    def _is(self, expr, name: str) -> bool:
        return isinstance(expr, relax.Call) and expr.op.same_as(_OP[name])

    def _source(self, var) -> str:
        """Who the index values come from, for the message."""
        while isinstance(var, relax.Var) and var not in self.params:
            value = self._bound(var)
            if not any(self._is(value, name) for name in _VALUE_KEEPING):
                return "the index tensor"
            if self._is(value, "astype") and not str(value.attrs.dtype).startswith(("int", "uint")):
                return "the index tensor"
            var = value.args[0]
        return f"input '{var.name}'" if isinstance(var, relax.Var) else "the index tensor"

    def _guarded(self, idx, bounds: tuple[Dim, ...]) -> bool:
        """Whether ``idx`` is in range by construction: a check kernel's result, or
        ``minimum(maximum(x, 0), bounds - 1)`` (what this pass emits without ``raises``). Makes the pass idempotent."""
        value = self._bound(idx)
        if self._is(value, "call_tir"):
            func = self.mod.functions.get(value.args[0]) if isinstance(value.args[0], tvm.ir.GlobalVar) else None
            return func is not None and func.attrs is not None and CHECK_ATTR in func.attrs
        if not (self._is(value, "minimum") and all(isinstance(b, int) for b in bounds)):
            return False
        low = self._bound(value.args[0])
        hi, zero = value.args[1], low.args[1] if self._is(low, "maximum") else None
        if not (isinstance(hi, tvm.ir.expr.Constant) and isinstance(zero, tvm.ir.expr.Constant)
                and not zero.value.numpy().any()):
            return False
        h = hi.value.numpy()  # one bound, or one per coordinate (gather_nd): exactly the extents - 1
        return h.size in (1, len(bounds)) and h.ndim <= 1 and np.array_equal(
            np.broadcast_to(h.reshape(-1), (len(bounds),)), np.array(bounds) - 1)

    def _unwrapped(self, idx, bounds: tuple[int, ...]):
        """``x`` if ``idx = where(less(x, 0), add(x, n), x)`` with ``n`` = bounds, else None."""
        value = self._bound(idx)
        if not self._is(value, "where"):
            return None
        cond, added, x = self._bound(value.args[0]), self._bound(value.args[1]), value.args[2]
        if not (self._is(cond, "less") and self._is(added, "add")):
            return None
        zero, n = cond.args[1], added.args[1]
        if not (cond.args[0].same_as(x) and added.args[0].same_as(x) and isinstance(zero, tvm.ir.expr.Constant)
                and isinstance(n, tvm.ir.expr.Constant) and not zero.value.numpy().any()):
            return None
        n = tuple(int(v) for v in np.ravel(n.value.numpy()))
        return x if n == bounds or (len(n) == 1 and n * len(bounds) == bounds) else None

    def _rule(self, call: relax.Call):
        """(index argument position, bounds, whether the op wraps negatives itself) or None."""
        data = call.args[0]
        shape = tensor_dims(getattr(data.ty, "shape", None))
        if shape is None:
            return None
        a = call.attrs
        if self._is(call, "take"):
            if a.mode != "fast":
                return None
            bound = math.prod(shape) if a.axis is None else shape[int(a.axis) % len(shape)]
            return 1, (bound,), False
        if self._is(call, "gather_elements") or self._is(call, "scatter_elements"):
            return 1, (shape[int(a.axis) % len(shape)],), self._is(call, "scatter_elements")
        if self._is(call, "gather_nd") or self._is(call, "scatter_nd"):
            idx_shape = tensor_dims(call.args[1].ty.shape)
            if not idx_shape or not isinstance(idx_shape[-1], int):
                return None
            start = int(a.batch_dims) if self._is(call, "gather_nd") else 0
            return 1, tuple(shape[start:start + idx_shape[-1]]), False
        return None

    def _recurrent_site(self, call: relax.Call) -> dict | None:
        """The attributes of a recurrent weight site called here (its ``lens`` must lie in [0, seq])."""
        if not (isinstance(call, relax.Call) and isinstance(call.op, tvm.ir.GlobalVar)
                and call.op in self.mod.functions):
            return None
        site = attr(self.mod[call.op], SITE)
        return site if site is not None and site["kind"] == "recurrent" else None

    def _caller_dim(self, call: relax.Call, name: str):
        """The caller's value of the site function's symbolic dim ``name`` (None if no operand has it)."""
        for param, arg in zip(self.mod[call.op].params, call.args):
            dims, values = tensor_dims(getattr(param.ty, "shape", None)), tensor_dims(getattr(arg.ty, "shape", None))
            for d, v in zip(dims or (), values or ()):
                if isinstance(d, tirx.Var) and d.name == name:
                    return v
        return None

    def _guard_lengths(self, binding: relax.VarBinding, site: dict) -> bool:
        call, seq, pos = binding.value, site["seq"], site["lens_operand"]
        fields = list(call.args)
        lens = fields[pos]
        shape = tensor_dims(getattr(lens.ty, "shape", None))
        if isinstance(seq, str):  # a symbolic length: the caller's value of it
            seq = self._caller_dim(call, seq)
        filled = self._is(self._bound(lens), "full")  # the frontend's "whole sequence" lengths
        if (isinstance(lens, tvm.ir.expr.Constant) or filled or shape is None or 0 in shape or seq is None
                or not self.raises  # (such a family's kernels clamp lens to [0, T])
                or self._guarded(lens, (seq + 1,))):
            return False
        checked = self._checked(lens, shape, str(lens.ty.dtype), (seq + 1,), False,
                                f"{self._source(lens)} holds sequence length ", "")
        fields[pos] = checked
        new = relax.Call(call.op, fields, call.attrs, call.ty_args)
        self.builder_.emit_normalized(relax.VarBinding(binding.var, self.builder_.normalize(new)))
        return True

    def _checked(self, x, shape, dtype: str, bounds, wrap: bool, prefix: str, suffix: str) -> relax.Var:
        """``call_tir(check_index, (x, symbolic bounds...))``."""
        kernel = check_kernel(shape, dtype, bounds, wrap, prefix, suffix)
        gvar = self.builder_.add_func(kernel, "check_index")
        scalars = [b for b in bounds if not isinstance(b, int)]  # (PrimExprs are Relax arguments)
        return self.builder_.emit(relax.call_tir(gvar, [x, *scalars], x.ty))

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        call = binding.value
        site = self._recurrent_site(call)
        if site is not None and self._guard_lengths(binding, site):
            return None
        rule = self._rule(call) if isinstance(call, relax.Call) and site is None else None
        if rule is None:
            return super().visit_var_binding_(binding)
        pos, bounds, native_wrap = rule
        idx = call.args[pos]
        if self._guarded(idx, bounds):
            return super().visit_var_binding_(binding)
        node = binding.var.name
        suffix = "" if _ANONYMOUS.match(node) else f" at node {node}"
        dtype = str(idx.ty.dtype)
        signed = not dtype.startswith("uint")
        static = all(isinstance(b, int) for b in bounds)
        x = self._unwrapped(idx, bounds) if signed and static else None
        wrap = signed and (x is not None or native_wrap)
        x = idx if x is None else x
        dtype = str(x.ty.dtype)  # the unwrapped index may be wider than the op's (int64 token ids)
        if isinstance(x, tvm.ir.expr.Constant) and static:
            self._check_constant(x.value.numpy(), bounds, wrap, suffix)
            return super().visit_var_binding_(binding)
        shape = tensor_dims(x.ty.shape)
        if shape is None or not bounds or 0 in shape:  # (no element: nothing to check)
            return super().visit_var_binding_(binding)
        if not self.raises:
            if not static:  # (a symbolic bound has no Relax constant to clamp to)
                return super().visit_var_binding_(binding)
            checked = self._clamped(x, bounds, wrap, dtype)
        else:
            checked = self._checked(x, shape, dtype, bounds, wrap, f"{self._source(x)} holds index ", suffix)
        args = list(call.args)
        args[pos] = checked
        new = relax.Call(call.op, args, call.attrs, call.ty_args)
        self.builder_.emit_normalized(relax.VarBinding(binding.var, self.builder_.normalize(new)))

    def _clamped(self, x, bounds, wrap, dtype):
        bb = self.builder_
        n = relax.const(np.array(bounds if len(bounds) > 1 else bounds[0], dtype), dtype)
        if wrap:
            x = bb.emit(relax.op.where(relax.op.less(x, relax.const(0, dtype)), relax.op.add(x, n), x))
        hi = relax.const(np.array(bounds, dtype) - 1 if len(bounds) > 1 else bounds[0] - 1, dtype)
        return bb.emit(relax.op.minimum(relax.op.maximum(x, relax.const(0, dtype)), hi))

    @staticmethod
    def _check_constant(values: np.ndarray, bounds, wrap: bool, suffix: str) -> None:
        b = np.resize(np.array(bounds, np.int64), values.shape) if values.size else np.zeros(0, np.int64)
        v = values.astype(np.int64)
        bad = (v < (-b if wrap else 0)) | (v >= b)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            lo = -int(b.flat[i]) if wrap else 0
            raise UnsupportedModelError(f"constant index {int(v.flat[i])} outside [{lo}, {int(b.flat[i])}){suffix}")


@tvm.transform.module_pass(opt_level=0, name="CheckIndices")
class CheckIndices:
    """Guard data-dependent indices (see the module docstring); ``raises``: the target family's
    kernels can raise (``KernelFamily.raises``), else indices are clamped."""

    def __init__(self, raises: bool = True):
        self.raises = raises

    def transform_module(self, mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return rewrite_relax_functions(_Guard(mod, self.raises), mod)
