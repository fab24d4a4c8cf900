// Stand-in for the CUDA toolkit's math_constants.h: the single-precision constants TVM's
// CUDA code generator uses for infinities and NaNs (e.g. a -inf initial value).
#pragma once
#define CUDART_INF_F (__builtin_inff())
#define CUDART_NAN_F (__builtin_nanf(""))
#define CUDART_MIN_DENORM_F (__builtin_bit_cast(float, 0x00000001u))
#define CUDART_MAX_NORMAL_F (__builtin_bit_cast(float, 0x7f7fffffu))
#define CUDART_INF (__builtin_inf())
#define CUDART_NAN (__builtin_nan(""))
