"""The bscompile pass pipeline: phases of module passes, with optional IR dumps.

Phases (each a ``tvm.transform.Sequential``):

1. ``simplify``  fold constant weight transforms (transposes, reshapes, packing) so
   weights are plain constants; drop dead code.
2. ``sites``     ``Conv1dToMatmul`` (im2col), then ``OutlineLinearSites``: constant-weight
   matmuls become weight sites (recurrent sites come from the frontend).
3. ``analyze``   ``AnalyzeSparsity`` then ``ChooseLayout``: measure each weight,
   pick dense or BSR r x c by the cost model.
4. ``lower``     ``LowerWeightSites``: generate the kernels, embed BSR constants.
5. ``finalize``  fold what lowering left foldable.

TVM's own build pipeline (legalisation, fusion of the remaining elementwise ops,
VM code generation) runs after this in :func:`bscompile.driver.compile`.
"""

from __future__ import annotations

import os
from pathlib import Path

import tvm
from tvm import relax

from bscompile.passes.analyze_sparsity import AnalyzeSparsity
from bscompile.passes.check_indices import CheckIndices
from bscompile.passes.choose_layout import ChooseLayout
from bscompile.passes.conv1d_to_matmul import Conv1dToMatmul
from bscompile.passes.lower_weight_sites import LowerWeightSites
from bscompile.passes.outline_linear_sites import OutlineLinearSites
from bscompile.passes.own_outputs import OwnOutputs
from bscompile.passes.sites import CompilePlan


def phases(plan: CompilePlan) -> list[tuple[str, list[tvm.transform.Pass]]]:
    simplify = [relax.transform.FoldConstant(), relax.transform.DeadCodeElimination()]
    return [
        ("simplify", [*simplify, CheckIndices(plan.kernels.name)]),
        ("sites", [Conv1dToMatmul(), OutlineLinearSites()]),
        ("analyze", [AnalyzeSparsity(plan), ChooseLayout(plan)]),
        ("lower", [LowerWeightSites(plan)]),
        ("finalize", [*simplify, OwnOutputs(plan.kernels.name)]),
    ]


def run_pipeline(mod: tvm.IRModule, plan: CompilePlan, dump_dir: str | os.PathLike | None = None,
                 progress=None) -> tvm.IRModule:
    """Apply every phase; with ``dump_dir``, write the IR before and after each phase."""
    if dump_dir is not None:
        dump_dir = Path(dump_dir)
        dump_dir.mkdir(parents=True, exist_ok=True)
        (dump_dir / "00_import.py").write_text(mod.script(show_meta=False))
    for i, (name, passes) in enumerate(phases(plan), start=1):
        if progress:
            progress(f"phase {name}")
        mod = tvm.transform.Sequential(passes, name=name)(mod)
        if dump_dir is not None:
            (dump_dir / f"{i:02d}_{name}.py").write_text(mod.script(show_meta=False))
    return mod
