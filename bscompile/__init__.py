"""bscompile: compile pruned networks into generated block-sparse kernels (Apache TVM).

    art = bscompile.compile("model.onnx", target="llvm")
    art.export("model.bsc")
    outs = bscompile.load("model.bsc").run({"x": x})
"""

__version__ = "0.1.0"

__all__ = ["Artifact", "BscompileError", "CompiledModule", "compile", "load", "__version__"]

_LAZY = {
    "Artifact": "bscompile.driver", "compile": "bscompile.driver",
    "BscompileError": "bscompile.errors",
    "CompiledModule": "bscompile.runtime.module", "load": "bscompile.runtime.module",
}


def __getattr__(name):
    # Lazy, so that `import bscompile.models` (training, pruning) does not load TVM.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'bscompile' has no attribute {name!r}")
