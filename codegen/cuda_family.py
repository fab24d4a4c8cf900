"""The CUDA kernel family: its generators per site kind and its GPU machine model."""

from __future__ import annotations

from bscompile.codegen.cuda import CudaBlockRowGenerator
from bscompile.codegen.cuda_cost import GPUS, GpuModel
from bscompile.codegen.cuda_dynamic import CudaDynamicGenerator, CudaDynamicRecurrentGenerator
from bscompile.codegen.cuda_persistent import PersistentGenerator
from bscompile.codegen.family import KernelFamily


class CudaFamily(KernelFamily):
    """NVIDIA GPUs of one architecture (``--arch``), with its GPU model. ``persistent_rnn``:
    recurrent sites run the opt-in persistent kernel of Zhu et al. (:mod:`codegen.cuda_persistent`)."""

    name = "cuda"
    raises = False  # (device code: indices clamped, lengths clamped by the recurrent kernels)
    copies_outputs = True  # (results come back to the host)

    def __init__(self, gpu: GpuModel, persistent_rnn: bool = False):
        self.gpu = gpu
        recurrent = PersistentGenerator(gpu) if persistent_rnn else CudaBlockRowGenerator(gpu, True)
        self.generators = {"linear": CudaBlockRowGenerator(gpu, False), "recurrent": recurrent,
                           "dynamic_linear": CudaDynamicGenerator(gpu),
                           "dynamic_recurrent": CudaDynamicRecurrentGenerator(gpu)}

    @classmethod
    def for_arch(cls, arch: str, persistent_rnn: bool = False) -> "CudaFamily":
        return cls(GPUS[arch], persistent_rnn)
