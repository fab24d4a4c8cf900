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
