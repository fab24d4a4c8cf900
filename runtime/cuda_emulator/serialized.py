"""TVM 0.27's serialised CUDA module, as ``CUDAModuleNode::SaveToBytes`` writes it.

Layout (little endian, strings and arrays prefixed by a ``u64`` count)::

    fmt: str                      "cuda" (source) / "ptx" / "cubin" / "fatbin"
    fmap: u64 n, n x (key: str, FunctionInfo)
        FunctionInfo = name: str, arg_types: u64 n + n x DLDataType (u8 code, u8 bits, u16 lanes),
                       launch_param_tags: u64 n + n x str, arg_extra_tags: u64 n + n x i32
    data: str                     the CUDA C source when fmt == "cuda"

The launch parameter tags name, in order, the extra integer arguments a kernel call
carries after its own arguments (``blockIdx.x`` = grid x, ``threadIdx.y`` = block y, ...;
``tirx.use_dyn_shared_memory`` = dynamic shared bytes, last) or flags that take no
argument (``tirx.use_cooperative_launch``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

#: DLPack type codes
DL_INT, DL_UINT, DL_FLOAT, DL_HANDLE = 0, 1, 2, 3
DYN_SHARED_TAG = "tirx.use_dyn_shared_memory"
COOPERATIVE_TAG = "tirx.use_cooperative_launch"
FLAG_TAGS = (COOPERATIVE_TAG, "tirx.use_programtic_dependent_launch", "tirx.use_programmatic_dependent_launch",
             "tirx.use_required_block_dimension")


@dataclass(frozen=True)
class KernelInfo:
    name: str
    arg_types: tuple[tuple[int, int, int], ...]  # (code, bits, lanes)
    launch_param_tags: tuple[str, ...]

    @property
    def cooperative(self) -> bool:
        return COOPERATIVE_TAG in self.launch_param_tags

    @property
    def launch_args(self) -> list[str]:
        """Tags that consume a call argument, in argument order."""
        return [t for t in self.launch_param_tags if t not in FLAG_TAGS]


@dataclass(frozen=True)
class CudaModuleBlob:
    fmt: str
    kernels: dict[str, KernelInfo]
    source: str


class _Reader:
    def __init__(self, data: bytes, pos: int = 0):
        self.data, self.pos = data, pos

    def u64(self) -> int:
        (v,) = struct.unpack_from("<Q", self.data, self.pos)
        self.pos += 8
        return v

    def raw(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError("truncated CUDA module")
        v = self.data[self.pos:self.pos + n]
        self.pos += n
        return v

    def str(self) -> str:
        return self.raw(self.u64()).decode()


def parse_cuda_module(data: bytes) -> CudaModuleBlob:
    r = _Reader(bytes(data))
    fmt = r.str()
    kernels = {}
    for _ in range(r.u64()):
        key = r.str()
        name = r.str()
        n = r.u64()
        raw = r.raw(4 * n)
        types = tuple(struct.unpack_from("<BBH", raw, 4 * i) for i in range(n))
        tags = tuple(r.str() for _ in range(r.u64()))
        r.raw(4 * r.u64())  # arg_extra_tags (tensor-map flags): unused by our kernels
        kernels[key] = KernelInfo(name, types, tags)
    source = r.str()
    return CudaModuleBlob(fmt, kernels, source)


def cuda_blobs_of_packed_imports(packed: bytes) -> list[bytes]:
    """The serialised ``cuda`` modules in ``runtime.ModulePackImportsToTensor`` output.

    Layout: u64 total, import tree (row pointers, child indices: u64-counted u64 arrays),
    then per module its kind (str) and, except for the host library ``_lib``, its bytes (str).
    """
    r = _Reader(bytes(packed))
    r.u64()
    r.raw(8 * r.u64())
    r.raw(8 * r.u64())
    out = []
    while r.pos < len(r.data):
        kind = r.str()
        if kind == "_lib":
            continue
        blob = r.raw(r.u64())
        if kind == "cuda":
            out.append(blob)
    return out
