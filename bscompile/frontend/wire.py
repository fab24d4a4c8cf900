"""An ONNX file's weights left where they are: the model proto parsed without its initializers' ``raw_data``.

Protobuf has no lazy fields, so parsing a model copies every weight into the message
(and ``onnx.load`` first copies the file into a bytes object): two resident copies of
the weights before bscompile makes the one it keeps, and most of a GiB model's load
time in page faults. :func:`split_raw_data` walks the protobuf wire format of the
top-level ``ModelProto.graph.initializer`` tensors (nothing deeper: subgraph weights
and everything else are copied as they are) and returns the model without those
``raw_data`` fields plus where each one lies in the file, so the frontend reads each
weight from a memory map of the file, once, straight into its constant.
"""

from __future__ import annotations

import onnx

#: Element types whose ``raw_data`` is the little-endian array NumPy reads as it is
#: (others, such as 4-bit and bfloat16 types, stay in the proto for ``numpy_helper``).
PLAIN_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BOOL,
               onnx.TensorProto.INT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64,
               onnx.TensorProto.UINT8, onnx.TensorProto.UINT16, onnx.TensorProto.UINT32, onnx.TensorProto.UINT64}

_GRAPH, _INITIALIZER, _DATA_TYPE, _RAW_DATA = 7, 5, 2, 9  # ModelProto.graph, GraphProto.initializer, TensorProto.*
_LEN, _VARINT = 2, 0  # wire types


def _varint(buf, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def _encode(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _fields(buf, start: int, end: int):
    """``(number, wire type, start, payload start, end)`` of each field of the message in ``buf[start:end]``."""
    i = start
    while i < end:
        key, j = _varint(buf, i)
        num, wt = key >> 3, key & 7
        if wt == _VARINT:
            _, k = _varint(buf, j)
        elif wt == 1:
            k = j + 8
        elif wt == 5:
            k = j + 4
        elif wt == _LEN:
            n, j = _varint(buf, j)
            k = j + n
        else:
            raise ValueError(f"unsupported protobuf wire type {wt}")
        if k > end:
            raise ValueError("truncated protobuf message")
        yield num, wt, i, j, k
        i = k


def _field(num: int, payload: bytes) -> bytes:
    return _encode(num << 3 | _LEN) + _encode(len(payload)) + payload


def _tensor(buf, start: int, end: int) -> tuple[bytes, tuple[int, int] | None]:
    """A TensorProto without its ``raw_data`` (if it is of a plain type) and where that was."""
    raw, dtype, kept = None, None, []
    for num, wt, i, j, k in _fields(buf, start, end):
        if num == _RAW_DATA and wt == _LEN:
            raw = (j, k - j)  # (the last occurrence wins, as in protobuf)
            continue
        if num == _DATA_TYPE and wt == _VARINT:
            dtype = _varint(buf, j)[0]
        kept.append((i, k))
    if raw is None or dtype not in PLAIN_TYPES:
        return bytes(buf[start:end]), None
    return b"".join(bytes(buf[i:k]) for i, k in kept), raw


def split_raw_data(buf) -> tuple[bytes, list[tuple[int, int] | None]]:
    """``buf`` (a serialized ModelProto) without the ``raw_data`` of its graph's plain-typed
    initializers, and per initializer (in order) the ``(offset, length)`` of its raw data in
    ``buf``, or None where it stays in the proto. Raises ValueError on malformed input."""
    out, spans = bytearray(), []
    for num, wt, i, j, k in _fields(buf, 0, len(buf)):
        if num != _GRAPH or wt != _LEN:
            out += buf[i:k]
            continue
        graph = bytearray()
        for gnum, gwt, gi, gj, gk in _fields(buf, j, k):
            if gnum == _INITIALIZER and gwt == _LEN:
                tensor, span = _tensor(buf, gj, gk)
                graph += _field(_INITIALIZER, tensor)
                spans.append(span)
            else:
                graph += buf[gi:gk]
        out += _field(_GRAPH, bytes(graph))
    return bytes(out), spans
