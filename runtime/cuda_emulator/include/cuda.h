// Stand-in for the CUDA driver header that TVM's CUDA source preamble includes: the
// emulated kernels need nothing from it (built-ins come from cuda_emu.h).
#pragma once
