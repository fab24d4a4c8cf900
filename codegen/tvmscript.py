"""TVMScript's macro expansion without its per-call stack formatting.

Every ``T.macro`` call in TVM 0.27 finds the active parser with
``inspect.getouterframes(inspect.currentframe())``, which formats every outer frame
(file lookup, source line) only to read each frame's globals: the kernels here expand a few
hundred macros each, and that formatting took LowerWeightSites from 1.20 to 1.48 s in the
compile of the hidden-2560 DeepSpeech-like model. :func:`install` replaces
``ScriptMacro._find_parser_def`` with a walk over ``frame.f_back`` from its caller (the same
frames, innermost first, except this function's own; the same result). TVM is pinned exactly
(pyproject), so the replaced method is known.
"""

from __future__ import annotations

import sys

from tvm.script.parser.core.parser import ScriptMacro


def _find_parser_def(self):
    frame = sys._getframe(1)
    while frame is not None:
        parser = frame.f_globals.get(ScriptMacro.parser_object_name)
        if parser is not None:
            return parser
        frame = frame.f_back
    raise RuntimeError(f"{ScriptMacro.parser_object_name} not available")


def install() -> None:
    ScriptMacro._find_parser_def = _find_parser_def
