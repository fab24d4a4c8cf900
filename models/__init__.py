"""Train and prune models before compiling them (``pip install bscompile[train]``).

WP/BP (:class:`BlockPruner` on ``torch.ao.pruning.BaseSparsifier``) with the
threshold schedule of Narang et al. (:class:`NarangSL`, a ``torch.ao`` scheduler), group lasso
(:func:`group_lasso_penalty`), block-wise dynamic sparseness
(:class:`DynamicBlockLinear`, :mod:`.dynamic`; recurrent :class:`DynamicBlockLSTM` /
:class:`DynamicBlockGRU`, :mod:`.dynamic_rnn`), a char-level LM on CPython's own docs
(:mod:`.charlm`), a DeepSpeech-like benchmark shape (:mod:`.deepspeech`), custom recurrent
cells as ONNX Scan/Loop graphs (:mod:`.onnx_cells`, onnx only), ONNX
export checked against onnxruntime (:mod:`.export`) and the papers' tables
(``python -m bscompile.models.reproduce``). Needs torch; the compiler does not.
"""

from .group_lasso import block_norms, group_lasso_penalty, prunable_weights
from .schedule import NarangSL, PruneSchedule
from .sparsifier import REDUCTIONS, BlockPruner, block_scores, make_config, prune_once

__all__ = [
    "REDUCTIONS",
    "BlockPruner",
    "NarangSL",
    "PruneSchedule",
    "block_norms",
    "block_scores",
    "group_lasso_penalty",
    "make_config",
    "prunable_weights",
    "prune_once",
    "DynamicBlockLinear",
    "DynamicBlockLSTM",
    "DynamicBlockGRU",
]


def __getattr__(name: str):
    """Model classes load on first use (``bscompile.models.DynamicBlockLinear``)."""
    if name == "DynamicBlockLinear":
        from .dynamic import DynamicBlockLinear

        return DynamicBlockLinear
    if name in ("DynamicBlockLSTM", "DynamicBlockGRU"):
        from . import dynamic_rnn

        return getattr(dynamic_rnn, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
