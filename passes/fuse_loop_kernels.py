"""FuseLoopKernels: a real loop whose step is a chain of TIR kernels runs as one kernel.

Contract
- Input: Relax after TVM's ``FuseTIR`` (every operator a ``call_tir`` of a PrimFunc) holding the
  real loops the frontend makes of an ONNX ``Scan`` / ``Loop`` of symbolic length
  (:mod:`bscompile.frontend.loops`): a call ``loop_chunks(t0, n, *rest)`` of a function with the
  ``bscompile.loop`` attribute, which runs ``loop(t, stop, n, *rest)`` a chunk of steps at a
  time; ``loop`` is ``if t < stop: (bindings; loop(t + 1, stop, n, *rest'))`` else the
  carried values. Each ``rest'[j]`` is ``rest[j]`` (an invariant: a scanned input, a value of
  the enclosing graph) or a value the step computes (a carried state, or a scan-output buffer
  written in place by ``call_tir_inplace``).
- Output: when every binding of the step -- in ``loop``'s branch and, inlined, in the
  functions it calls (``loop_step``) -- is a ``call_tir`` / ``call_tir_inplace`` of a PrimFunc,
  a tuple, a tuple item, a constant or a variable, the call becomes one ``call_tir_inplace`` of
  a new PrimFunc ``loop_kernel`` that runs ``for t in [t0, n)`` over the PrimFuncs' bodies in
  binding order: intermediates allocated once for all steps, carried states copied back at the
  end of each step, scan-output buffers written in place (the call's in-place outputs), the
  states' finals its new outputs. The step's own PrimFuncs are inlined, not called: the VM no
  longer recurses, allocates or checks arguments per step, and the kernels' parallel loops
  launch as they did. Numerics: the same PrimFuncs in the same order; LLVM may contract or
  vectorise the inlined code differently (measured: an ulp or two apart from the looped form).
- Left alone (the loop runs as before, correctly): any other binding in the step (an ``If``,
  a packed call, a nested real loop not fused itself, a carried tuple), a carried value that
  becomes another carried or invariant parameter, a carried value passed through unchanged,
  a write in place into an input, a constant or a parameter of the calling function (the
  frontend's scan buffers are the caller's fresh ``zeros``), and every module on a target other than LLVM
  CPUs (the pipeline runs it only there). The inlined site kernels' attributes ride on the
  kernel (``bscompile.inlined_sites``), so the manifest still lists their weights.
  Idempotent: a fused loop is no longer called.
"""

from __future__ import annotations

import tvm
import tvm.s_tir
import tvm_ffi
from tvm import relax, tirx

from bscompile.sites import INLINED_SITES, LOOP, SITE

_CALL_TIR = tvm.ir.Op.get("relax.call_tir")
_CALL_TIR_INPLACE = tvm.ir.Op.get("relax.call_tir_inplace")
_I64 = "int64"


class _NotFusible(Exception):
    """The loop has a binding the kernel cannot run; it is left as it was."""


def _i64(v: int) -> tirx.IntImm:
    return tirx.IntImm(_I64, v)


def _as(e, like):
    """``e`` in the dtype of ``like`` (a callee's shape vars and scalars may be int32)."""
    dtype = like.ty.dtype
    return e if e.ty.dtype == dtype else tirx.Cast(dtype, e)


def _is_buffer(v) -> bool:
    """A TIR buffer (a variable of buffer type)."""
    return isinstance(v, tvm.ir.expr.Var) and hasattr(v.ty, "shape")


class _Kernel:
    """Builds the PrimFunc of one loop: interprets the step's bindings into TIR statements."""

    def __init__(self, mod: tvm.IRModule, loop_gv: relax.GlobalVar):
        self.mod = mod
        self.loop_gv = loop_gv
        self.loop = mod[loop_gv]
        self.params: list[tirx.Buffer] = []  # kernel parameters: the call's arguments, then constants
        self.consts: list[tvm.ir.expr.Constant] = []
        self.const_bufs: dict = {}
        self.allocs: list[tirx.Buffer] = []
        self.stmts: list[tirx.Stmt] = []
        self.svars: dict = {}  # symbolic var of a Relax function -> kernel expression
        self.sites: list = []  # the attributes of the site kernels inlined, in order
        self.writable: list[tirx.Buffer] = []  # what a step may write in place: its own buffers

    # --- buffers ---------------------------------------------------------------------
    def _shape(self, ty: relax.TensorType) -> list:
        if ty.shape is None or not hasattr(ty.shape, "values"):
            raise _NotFusible("a tensor of unknown shape")
        return [self._prim(d) for d in ty.shape.values]

    def _new_buffer(self, ty, name: str, param: bool = False) -> tirx.Buffer:
        if not isinstance(ty, relax.TensorType) or ty.dtype is None or ty.dtype == "":
            raise _NotFusible("a value that is not a tensor")
        shape = self._shape(ty)
        buf = tirx.decl_buffer(shape, ty.dtype, name=name, elem_offset=_i64(0), layout=None)
        (self.params if param else self.allocs).append(buf)
        return buf

    def _param_buffer(self, ty, name: str) -> tirx.Buffer:
        """A kernel parameter whose symbolic dims, the first time they appear, define kernel vars."""
        if isinstance(ty, relax.TensorType) and ty.shape is not None and hasattr(ty.shape, "values"):
            for d in ty.shape.values:
                if not isinstance(d, (tirx.Var, tirx.IntImm)):
                    raise _NotFusible("an argument whose size is an expression")  # (nothing would define it)
                if isinstance(d, tirx.Var) and d not in self.svars:
                    self.svars[d] = tirx.Var(d.name, _I64)
        return self._new_buffer(ty, name, param=True)

    def _bind_params(self, params, values) -> dict:
        """Relax parameters -> kernel values; their symbolic dims -> the values' kernel dims."""
        env = {}
        for p, v in zip(params, values):
            if isinstance(p.ty, relax.TensorType) and _is_buffer(v):
                if p.ty.shape is None or not hasattr(p.ty.shape, "values"):
                    raise _NotFusible("a parameter of unknown shape")
                for d, e in zip(p.ty.shape.values, v.ty.shape):
                    if isinstance(d, tirx.Var):
                        self.svars.setdefault(d, e)
            env[p] = v
        return env

    def _prim(self, e):
        """A PrimExpr of a Relax function in kernel variables."""
        return tvm_ffi.structural_map(e, (tirx.Var, lambda v: self.svars.get(v, v)))

    # --- interpretation ----------------------------------------------------------------
    def value(self, env: dict, e: relax.Expr):
        """The kernel's value of ``e``: a buffer, a list (a tuple) or a PrimExpr; emits what computes it."""
        if isinstance(e, relax.Var) and e in env:
            return env[e]
        if isinstance(e, (tvm.ir.expr.Var, tirx.IntImm)) and isinstance(e.ty, tvm.ir.PrimType):
            return self._prim(e)  # a PrimExpr argument (a symbolic size)
        if isinstance(e, relax.Var):
            raise _NotFusible("a variable bound outside the loop")
        if isinstance(e, tvm.ir.expr.Constant):
            key = e
            if key not in self.const_bufs:
                self.const_bufs[key] = self._new_buffer(e.ty, f"c{len(self.consts)}", param=True)
                self.consts.append(e)
            return self.const_bufs[key]
        if isinstance(e, relax.Tuple):
            return [self.value(env, f) for f in e.fields]
        if isinstance(e, relax.TupleGetItem):
            tup = self.value(env, e.tuple_value)
            if not isinstance(tup, list):
                raise _NotFusible("an item of a value that is not a tuple")
            return tup[e.index]
        if isinstance(e, relax.Call):
            return self.call(env, e)
        raise _NotFusible(f"a {type(e).__name__}")

    def call(self, env: dict, call: relax.Call):
        """A ``call_tir`` / ``call_tir_inplace`` inlined, or a Relax function's body interpreted."""
        if call.op in (_CALL_TIR, _CALL_TIR_INPLACE):
            gv, args = call.args[0], self.value(env, call.args[1])
            out_ty = call.ty_args[0]
            out_tys = list(out_ty.fields) if isinstance(out_ty, relax.TupleType) else [out_ty]
            inplace = list(call.attrs.inplace_indices) if call.op == _CALL_TIR_INPLACE else [-1] * len(out_tys)
            if any(int(i) >= 0 and not any(args[int(i)].same_as(w) for w in self.writable) for i in inplace):
                raise _NotFusible("an in-place write to an input")  # (would change it for later steps)
            outs = [args[int(i)] if int(i) >= 0 else self._new_buffer(ty, f"{gv.name_hint}_out")
                    for i, ty in zip(inplace, out_tys)]
            self.writable += [o for i, o in zip(inplace, outs) if int(i) < 0]
            tir_vars = [self._prim(v) for v in call.args[2].values] if len(call.args) > 2 else []
            self.inline(gv, [*args, *(o for i, o in zip(inplace, outs) if int(i) < 0), *tir_vars])
            return outs if isinstance(out_ty, relax.TupleType) else outs[0]
        if isinstance(call.op, relax.GlobalVar) and isinstance(self.mod[call.op], relax.Function):
            func = self.mod[call.op]
            if (func.attrs is not None and LOOP in func.attrs) or call.op.same_as(self.loop_gv):
                raise _NotFusible("a nested loop")
            inner = self._bind_params(func.params, [self.value(env, a) for a in call.args])
            return self.seq(inner, func.body)
        raise _NotFusible(f"a call of {call.op}")

    def seq(self, env: dict, body: relax.Expr, stop_at=None):
        """Interpret a SeqExpr's bindings (up to the binding of ``stop_at``); its value."""
        if not isinstance(body, relax.SeqExpr):
            return self.value(env, body)
        for block in body.blocks:
            for b in block.bindings:
                if not isinstance(b, relax.VarBinding):
                    raise _NotFusible("a match_cast")
                if stop_at is not None and b.var.same_as(stop_at):
                    return None
                env[b.var] = self.value(env, b.value)
        return self.value(env, body.body)

    def inline(self, gv: relax.GlobalVar, values: list) -> None:
        """The body of PrimFunc ``gv`` with its parameters replaced by ``values`` (fresh vars)."""
        func = self.mod[gv]
        if not isinstance(func, tirx.PrimFunc) or len(func.params) != len(values):
            raise _NotFusible(f"a call of {gv.name_hint}")
        if func.attrs is not None and SITE in func.attrs:
            self.sites.append(func.attrs)
        func = tvm.s_tir.renew_defs(func)
        remap = {}
        for p, v in zip(func.params, values):
            if hasattr(p.ty, "shape"):  # a buffer: its symbolic dims are the argument's
                if not _is_buffer(v) or len(v.ty.shape) != len(p.ty.shape):
                    raise _NotFusible(f"an argument of {gv.name_hint}")
                for d, e in zip(p.ty.shape, v.ty.shape):
                    if isinstance(d, tirx.Var):
                        remap[d] = _as(e, d)
                remap[p] = v
            else:
                remap[p] = _as(v, p)
        self.stmts.append(tvm_ffi.structural_map(func.body, (tirx.Var, lambda v: remap.get(v, v))))

    # --- the kernel ----------------------------------------------------------------------
    def build(self, arg_tys: list) -> tuple[tirx.PrimFunc, list[int], list]:
        """The kernel for ``loop_chunks(*args)`` of argument types ``arg_tys``: the PrimFunc, the
        in-place index of each output (-1: a new output), and the outputs' types."""
        t0 = self._param_buffer(arg_tys[0], "t0")
        n = self._param_buffer(arg_tys[1], "n")
        rest = [self._param_buffer(ty, f"r{j}") for j, ty in enumerate(arg_tys[2:])]
        lp = list(self.loop.params)
        if len(lp) != len(rest) + 3:
            raise _NotFusible("a loop of another form")
        body = self.loop.body
        cond = _bound(body, body.body) if isinstance(body, relax.SeqExpr) else None
        if not isinstance(cond, relax.If):
            raise _NotFusible("a loop of another form")
        then, other = cond.true_branch, cond.false_branch
        rec = then.body if isinstance(then, relax.SeqExpr) else None
        while isinstance(_bound(then, rec), relax.Var):  # (``gv9 = gv8``)
            rec = _bound(then, rec)
        rec_call = _bound(then, rec)
        if not (isinstance(rec_call, relax.Call) and rec_call.op.same_as(self.loop_gv)):
            raise _NotFusible("a loop of another form")
        results = other.body if isinstance(other, relax.SeqExpr) else other
        results = _bound(other, results) or results
        if not isinstance(results, relax.Tuple):
            raise _NotFusible("a loop of another form")
        index = {p: i for i, p in enumerate(lp)}
        ret = [index.get(f, -1) for f in results.fields]
        if min(ret) < 3:
            raise _NotFusible("a loop returning a value that is not a carried parameter")
        rec_args = list(rec_call.args)
        carried = [j for j in range(3, len(lp)) if not rec_args[j].same_as(lp[j])]
        if any(isinstance(rec_args[j], relax.Var) and rec_args[j] in index for j in carried):
            raise _NotFusible("a carried value that is another parameter")
        if sorted(set(ret)) != carried:
            raise _NotFusible("a carried value that is not returned")
        # in place: the step writes the parameter's own buffer (call_tir_inplace on it)
        alias = _aliases(then, lp)
        inplace = {j for j in carried if alias.get(rec_args[j]) == lp[j]}
        # the states' finals are the kernel's outputs, after its inputs
        states = {j: self._new_buffer(arg_tys[j - 1], f"state{j}") for j in carried if j not in inplace}
        for buf in states.values():
            self.allocs.remove(buf)
        tbuf = tirx.decl_buffer((), _I64, name="t", elem_offset=_i64(0), layout=None)
        self.allocs.append(tbuf)
        env = self._bind_params(lp, [tbuf, n, n, *rest])
        self.writable = [*self.allocs, *states.values(), *(rest[j - 3] for j in inplace)]
        for j, buf in states.items():
            env[lp[j]] = buf
        it = tirx.Var("it", _I64)
        self.stmts = [tirx.BufferStore(tbuf, it, [])]
        self.seq(env, then, stop_at=rec)
        for j in carried:
            src = env.get(rec_args[j]) if isinstance(rec_args[j], relax.Var) else self.value(env, rec_args[j])
            dst = env[lp[j]]
            if not _is_buffer(src):
                raise _NotFusible("a carried value that is not a tensor")
            if not src.same_as(dst):
                self.stmts.append(_copy(src, dst))
        step = tirx.SeqStmt(self.stmts)
        start = tirx.BufferLoad(t0, [])
        loop = tirx.For(it, start, tirx.Max(tirx.BufferLoad(n, []) - start, _i64(0)), tirx.ForKind.SERIAL, step)
        init = [_copy(rest[j - 3], buf) for j, buf in states.items()]
        root = tvm.s_tir.SBlock([], [], [], "root", tirx.SeqStmt([*init, loop]), alloc_buffers=self.allocs)
        params = [t0, n, *rest, *self.params[2 + len(rest):], *states.values()]
        func = tirx.PrimFunc(params, tvm.s_tir.SBlockRealize([], True, root))
        # a root block over the inlined bodies (FuseTIR's kernels are schedulable TIR)
        func = func.with_attrs({"tir.noalias": True, "s_tir": True})
        if self.sites:
            func = func.with_attr(INLINED_SITES, self.sites)
        out_index = [(j - 1 if j in inplace else -1) for j in ret]
        out_tys = [arg_tys[j - 1] for j in ret]
        return func, out_index, out_tys


def _bound(seq: relax.Expr, var: relax.Expr) -> relax.Expr | None:
    """The value ``var`` is bound to in the blocks of ``seq``, if it is."""
    if isinstance(seq, relax.SeqExpr):
        for block in seq.blocks:
            for b in block.bindings:
                if b.var.same_as(var):
                    return b.value
    return None


def _aliases(then: relax.SeqExpr, params: list) -> dict:
    """Variable -> the parameter whose buffer it is (a parameter itself, or the in-place result of
    a ``call_tir_inplace`` on one)."""
    alias = {p: p for p in params}
    for block in then.blocks:
        for b in block.bindings:
            v = b.value
            if isinstance(v, relax.Var) and v in alias:
                alias[b.var] = alias[v]
            elif isinstance(v, relax.Call) and v.op == _CALL_TIR_INPLACE and len(v.attrs.inplace_indices) == 1:
                src = v.args[1].fields[int(v.attrs.inplace_indices[0])]
                if isinstance(src, relax.Var) and src in alias:
                    alias[b.var] = alias[src]
    return alias


def _copy(src: tirx.Buffer, dst: tirx.Buffer) -> tirx.Stmt:
    """``dst[...] = src[...]`` element by element (same shape)."""
    shape = list(dst.ty.shape)
    idx = [tirx.Var(f"i{k}", _I64) for k in range(len(shape))]
    stmt = tirx.BufferStore(dst, tirx.BufferLoad(src, idx), idx)
    for v, d in reversed(list(zip(idx, shape))):
        stmt = tirx.For(v, _i64(0), d, tirx.ForKind.SERIAL, stmt)
    return stmt


@tvm.transform.module_pass(opt_level=0, name="FuseLoopKernels")
class FuseLoopKernels:
    """Make a real loop whose step is PrimFuncs one kernel running the time loop (contract: module docstring)."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        loops = {gv: f for gv, f in mod.functions.items()
                 if isinstance(f, relax.Function) and f.attrs is not None and LOOP in f.attrs}
        if not loops:
            return mod
        mutator = _Replace(mod, loops)
        for gv, func in list(mod.functions.items()):
            if isinstance(func, relax.Function) and gv not in loops:
                mutator.builder_.update_func(gv, mutator.visit_expr(func))
        if not mutator.fused:
            return mod
        return relax.transform.DeadCodeElimination()(mutator.builder_.get())


@relax.expr_functor.mutator
class _Replace(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, loops: dict):
        super().__init__(mod)
        self.mod_ = mod
        self.loops = loops
        self.fused = 0

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not isinstance(call.op, relax.GlobalVar) or call.op not in self.loops:
            return call
        loop_gv = _inner_loop(call.op, self.loops[call.op])
        if loop_gv is None:
            return call
        kernel = _Kernel(self.mod_, loop_gv)
        try:
            func, out_index, out_tys = kernel.build([a.ty for a in call.args])
        except _NotFusible:
            return call
        if any(i >= 0 and self.lookup_binding(call.args[i]) is None for i in out_index):
            return call  # it would write in place into a value the function did not compute (a parameter)
        gv = self.builder_.add_func(func, "loop_kernel")
        # the constants the step reads are arguments after the call's own
        new = relax.call_tir_inplace(gv, [*call.args, *kernel.consts], out_index,
                                     out_tys if len(out_tys) > 1 else out_tys[0])
        self.fused += 1
        return new if len(out_tys) > 1 else relax.Tuple([new])


def _inner_loop(chunks_gv: relax.GlobalVar, chunks: relax.Function) -> relax.GlobalVar | None:
    """The ``loop`` function ``loop_chunks`` calls (besides itself)."""
    found = []

    def visit(e):
        if isinstance(e, relax.Call) and isinstance(e.op, relax.GlobalVar) and not e.op.same_as(chunks_gv):
            found.append(e.op)

    relax.analysis.post_order_visit(chunks.body, visit)
    return found[0] if len({g.name_hint for g in found}) == 1 else None
