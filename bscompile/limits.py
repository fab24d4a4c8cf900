"""Compile-time resource limits, checked on the ONNX protobuf before any tensor is built.

A model can declare weights larger than this machine's memory (dims of an external or
truncated initializer cost nothing to write), or a tensor with 2**31 or more elements,
which bscompile's kernels (int32 loop and block indices) cannot address. Both are
refused here with the tensor's name, instead of an out-of-memory kill half-way through
a compile or a kernel indexing with a wrapped-around int32.
"""

from __future__ import annotations

import math
import os

import numpy as np
import onnx
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from bscompile.errors import UnsupportedModelError

INT32_ELEMENTS = 2**31 - 1


def available_memory() -> int:
    """Bytes this process can still allocate: MemAvailable, capped by RLIMIT_AS when set."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    if avail is None:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            avail = min(avail, soft)
    except (ImportError, ValueError, OSError):
        pass
    return avail


def _itemsize(elem_type: int) -> int:
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return 4


def _elements(name: str, what: str, dims) -> int:
    dims = [int(d) for d in dims]
    if any(d < 0 for d in dims):
        raise UnsupportedModelError(f"{what} '{name}' has a negative dimension {dims}")
    n = math.prod(dims)
    if n > INT32_ELEMENTS or any(d > INT32_ELEMENTS for d in dims):
        raise UnsupportedModelError(f"{what} '{name}' has shape {dims}: {n} elements overflow the int32 indexing "
                                    f"of bscompile's kernels (at most {INT32_ELEMENTS})")
    return n


def check_finite_weights(model: onnx.ModelProto) -> None:
    """:func:`check_finite` on every float initializer the model holds."""
    from onnx import numpy_helper

    for init in model.graph.initializer:
        if init.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16) \
                or uses_external_data(init):  # (not read yet: checked again once loaded)
            continue
        try:
            a = numpy_helper.to_array(init)
        except Exception:  # noqa: BLE001 - malformed data: the importer reports it
            continue
        check_finite(init.name, a)


def check_finite(name: str, a: np.ndarray) -> None:
    """Refuse NaN or infinite float weights: the generated code does not propagate them as
    onnxruntime does (pruned zeros are skipped, so inf * 0 never makes a NaN, and TVM's
    max drops NaN). A single value is a fill, not a weight (a static block mask exports
    its ``-inf`` as one), and is left to the graph."""
    if a.dtype.kind == "f" and a.size > 1 and not np.isfinite(a).all():
        at = [int(i) for i in np.argwhere(~np.isfinite(a))[0]]
        raise UnsupportedModelError(f"weight '{name}' holds {a[tuple(at)]} at {at}; bscompile needs finite "
                                    "weights (block-sparse kernels skip pruned zeros, so NaN and inf would not "
                                    "propagate as in dense arithmetic)")


#: ai.onnx opsets bscompile accepts: TVM's importer and onnxruntime both start at 7.
MIN_OPSET = 7


def check_opset(model: onnx.ModelProto) -> None:
    newest = onnx.defs.onnx_opset_version()
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx") and not MIN_OPSET <= o.version <= newest:
            raise UnsupportedModelError(f"unsupported ai.onnx opset {o.version} (bscompile reads opsets "
                                        f"{MIN_OPSET} to {newest})")


def check_resources(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]],
                    input_dtypes: dict[str, str] | None = None, finite: bool = True) -> None:
    """Refuse a model whose weights (plus inputs) exceed the memory available, or any
    tensor the kernels could not index with int32 (:class:`UnsupportedModelError`);
    ``finite``: and non-finite weights (the importer checks them as it converts them)."""
    total = 0
    for init in model.graph.initializer:
        total += _elements(init.name, "weight", init.dims) * _itemsize(init.data_type)
    for name, shape in input_shapes.items():
        itemsize = np.dtype((input_dtypes or {}).get(name, "float32")).itemsize
        total += _elements(name, "input", shape) * itemsize
    avail = available_memory()
    check_opset(model)
    # The importer holds the weights about twice (ONNX arrays and TVM constants) while compiling.
    if 2 * total > avail:
        raise UnsupportedModelError(f"the model's weights and inputs need {total / 2**30:.2f} GiB (about twice that "
                                    f"while compiling); {avail / 2**30:.2f} GiB of memory is available")
    if finite:
        check_finite_weights(model)


def check_external_data(model: onnx.ModelProto, base_dir: str) -> None:
    """Every initializer stored outside the model (``save_as_external_data``) names a file in
    ``base_dir`` long enough for its bytes: a missing or truncated file, or one outside the model's
    folder (``../../etc/passwd``), is one clear error before anything is read (onnx would raise, or
    read a short tensor)."""
    for init in model.graph.initializer:
        if not uses_external_data(init):
            continue
        try:
            info = ExternalDataInfo(init)
        except ValueError as err:
            raise UnsupportedModelError(f"weight '{init.name}': bad external data entry ({err})") from None
        need = (info.offset or 0) + (info.length if info.length is not None
                                     else _elements(init.name, "weight", init.dims) * _itemsize(init.data_type))
        path = os.path.join(base_dir, info.location)
        base = os.path.realpath(base_dir or ".")
        if os.path.isabs(info.location) or os.path.commonpath([base, os.path.realpath(path)]) != base:
            raise UnsupportedModelError(f"weight '{init.name}': external data file '{info.location}' is outside the "
                                        "model's folder (ONNX allows only relative paths within it)")
        if not info.location or not os.path.isfile(path):
            raise UnsupportedModelError(f"weight '{init.name}': external data file '{info.location}' is missing "
                                        f"(looked in {base_dir or '.'})")
        size = os.path.getsize(path)
        if size < need:
            raise UnsupportedModelError(f"weight '{init.name}': external data file '{info.location}' holds {size} "
                                        f"bytes; the model needs {need}")
