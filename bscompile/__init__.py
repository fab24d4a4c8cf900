"""bscompile: compile pruned networks into generated block-sparse kernels (Apache TVM).

    art = bscompile.compile("model.onnx", target="llvm")
    art.export("model.bsc")
    outs = bscompile.load("model.bsc").run({"x": x})
"""

__version__ = "0.1.0"

from bscompile.driver import Artifact, compile  # noqa: E402
from bscompile.errors import BscompileError  # noqa: E402
from bscompile.runtime.module import CompiledModule, load  # noqa: E402

__all__ = ["Artifact", "BscompileError", "CompiledModule", "compile", "load", "__version__"]
