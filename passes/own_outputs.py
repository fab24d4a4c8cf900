"""OwnOutputs: every output of ``main`` is a tensor of its own, computed by this call.

Relax returns what the graph names: an ONNX output that is an Identity, Reshape,
Squeeze, Unsqueeze or Flatten of a graph input comes back as (a view of) the caller's
input buffer; an output that is a constant is the module's own weight, which the
caller can then overwrite for every later call; two outputs of one value (or one a
view of the other) share memory. :class:`~bscompile.runtime.module.CompiledModule`
hands outputs over zero-copy, so each of these would alias something it does not own.

Contract
- Input: Relax after bscompile's pipeline. Every tensor output of ``main`` whose
  storage root (followed through ``reshape``, ``squeeze``, ``expand_dims`` and
  ``flatten``, which TVM lowers to views) is a parameter, a constant, or the root of
  an earlier output is replaced by ``call_tir(copy_output_K, (y,))``, in a binding
  block after the function's last block.
- Symbolic shapes too (the copy kernel takes them as its own variables).
- Left alone: outputs computed by a kernel of their own (the usual case: still
  zero-copy), non-tensor outputs, functions other than ``main``, and every output
  with ``copied`` (a family whose runtime copies results to the host anyway,
  ``KernelFamily.copies_outputs``: CUDA's, where the flat copy kernel is no GPU schedule).
"""

from __future__ import annotations

import tvm
from tvm import relax

from bscompile.passes.check_indices import check_kernel
from bscompile.sites import tensor_dims

_VIEWS = tuple(tvm.ir.Op.get(f"relax.{name}") for name in ("reshape", "squeeze", "expand_dims", "flatten"))


@tvm.transform.module_pass(opt_level=0, name="OwnOutputs")
class OwnOutputs:
    """Copy returned arrays that would alias an input, a constant or another output (contract: module
    docstring)."""

    def __init__(self, copied: bool = False):
        self.copied = copied

    def transform_module(self, mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        if self.copied:
            return mod
        gv = mod.get_global_var("main") if any(g.name_hint == "main" for g in mod.functions) else None
        func = mod[gv] if gv is not None else None
        if not isinstance(func, relax.Function) or not isinstance(func.body, relax.SeqExpr):
            return mod
        body = func.body
        bound = {b.var: b.value for block in body.blocks for b in block.bindings if isinstance(b, relax.VarBinding)}
        ret = body.body
        tup = bound.get(ret) if isinstance(ret, relax.Var) and isinstance(bound.get(ret), relax.Tuple) else ret
        fields = list(tup.fields) if isinstance(tup, relax.Tuple) else [tup]

        def root(e):
            while isinstance(e, relax.Var) and isinstance(bound.get(e), relax.Call) and any(
                    bound[e].op.same_as(v) for v in _VIEWS):
                e = bound[e].args[0]
            return e

        params = set(func.params)
        seen: list = []
        bb = relax.BlockBuilder(mod)
        copies, new_fields = [], []
        # A returned tuple bound inside the dataflow block holds dataflow variables, which the
        # new block after it must not use: it reads the tuple's items instead.
        via_items = isinstance(ret, relax.Var) and isinstance(tup, relax.Tuple) and tup is not ret
        copied = False
        for i, f in enumerate(fields):
            r = root(f)
            if via_items:
                item = relax.Var(f"out{i}", f.ty)
                copies.append(relax.VarBinding(item, bb.normalize(relax.TupleGetItem(ret, i))))
                f = item
            shared = (r in params or isinstance(r, tvm.ir.expr.Constant) or any(r.same_as(s) for s in seen))
            seen.append(r)
            shape = tensor_dims(f.ty.shape) if isinstance(f.ty, relax.TensorType) else None  # (symbolic too)
            if not shared or shape is None or 0 in shape:
                new_fields.append(f)
                continue
            kernel = bb.add_func(check_kernel(shape, str(f.ty.dtype)), "copy_output")  # (no bounds: a copy)
            var = relax.Var("owned", f.ty)
            copies.append(relax.VarBinding(var, bb.normalize(relax.call_tir(kernel, [f], f.ty))))
            new_fields.append(var)
            copied = True
        if not copied:
            return mod
        new_ret = relax.Tuple(new_fields) if isinstance(tup, relax.Tuple) else new_fields[0]
        new_body = relax.SeqExpr([*body.blocks, relax.BindingBlock(copies)], new_ret)
        bb.update_func(gv, bb.normalize(relax.Function(func.params, new_body, func.ret_ty, func.is_pure, func.attrs)))
        return bb.get()
