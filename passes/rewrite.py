"""The one driver every bscompile mutator pass uses to rewrite a module's Relax functions."""

from __future__ import annotations

from typing import Callable

import tvm
from tvm import relax

from bscompile.sites import SITE


def rewrite_relax_functions(mutator: relax.PyExprMutator, mod: tvm.IRModule,
                            before_each: Callable[[relax.Function], None] | None = None) -> tvm.IRModule:
    """Run ``mutator`` over every Relax function of ``mod`` but site functions; return the builder's module.

    ``before_each(func)`` runs before a function is visited (e.g. to index its bindings).
    """
    for gv, func in list(mod.functions.items()):
        if isinstance(func, relax.Function) and (func.attrs is None or SITE not in func.attrs):
            if before_each is not None:
                before_each(func)
            mutator.builder_.update_func(gv, mutator.visit_expr(func))
    return mutator.builder_.get()


def rebind(mutator: relax.PyExprMutator, binding: relax.VarBinding, value: relax.Expr) -> None:
    """Emit ``value`` in place of ``binding`` (in a mutator run by :func:`rewrite_with_bindings`,
    which counts these in ``mutator.rebound``); an output of a dataflow block stays one."""
    bb = mutator.builder_
    # (outside dataflow blocks, e.g. in a loop function's If branch, every var is a plain Var)
    output = not isinstance(binding.var, relax.DataflowVar) and bb.current_block_is_dataflow()
    emit = bb.emit_output if output else bb.emit
    mutator.set_var_remap(binding.var, emit(value, name_hint=binding.var.name))
    mutator.rebound += 1


def rewrite_with_bindings(mutator: relax.PyExprMutator, mod: tvm.IRModule) -> tvm.IRModule:
    """:func:`rewrite_relax_functions` with ``mutator.var2val`` set to each function's bindings
    (for relax.dpl matching through variables), then dead-code elimination of what it replaced
    (:func:`rebind` counts the replacements); a module with none comes back as it was."""

    def index(func):
        mutator.var2val = relax.analysis.get_var2val(func)

    mutator.rebound = 0
    out = rewrite_relax_functions(mutator, mod, index)
    return relax.transform.DeadCodeElimination()(out) if mutator.rebound else mod
