// CUDA built-ins for running TVM-generated CUDA C on the CPU (bscompile's CUDA emulator).
//
// Each CUDA thread is a fiber of the emulator's runtime (cuda_emu_rt.cc). The built-ins
// below read the running fiber's coordinates and call into the runtime for everything
// that synchronises threads (__syncthreads, warp shuffles), so that a kernel the GPU
// would mis-execute (divergent barrier, shuffle lane missing or outside the mask,
// uninitialised shared memory, misaligned vector access) fails here too.
#ifndef BSCOMPILE_CUDA_EMU_H_
#define BSCOMPILE_CUDA_EMU_H_

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

struct uint3 { unsigned int x, y, z; };
struct dim3 { unsigned int x, y, z; };

// Per-fiber state the kernel reads (the runtime owns the rest).
struct cuemu_thread {
  uint3 tid;   // threadIdx
  uint3 bid;   // blockIdx
  dim3 bdim;   // blockDim
  dim3 gdim;   // gridDim
};

extern "C" {
extern cuemu_thread* cuemu_cur;
void cuemu_syncthreads(int line);
void cuemu_syncwarp(unsigned mask, int line);
uint64_t cuemu_shfl(int kind, unsigned mask, uint64_t value, int arg, int width, int line);
void* cuemu_shared(uint64_t bytes, uint64_t align, int line);
void* cuemu_dyn_shared(void);
void cuemu_yield(void);
void cuemu_threadfence(void);
unsigned cuemu_activemask(void);
}

#define threadIdx (cuemu_cur->tid)
#define blockIdx (cuemu_cur->bid)
#define blockDim (cuemu_cur->bdim)
#define gridDim (cuemu_cur->gdim)
#define warpSize 32

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __restrict__ __restrict
#define __launch_bounds__(...)
// __shared__ declarations are rewritten into per-block storage before compiling
// (cuemu_shared); a leftover one is a rewrite miss and must not compile silently.
#define __shared__ static_assert(false, "cuda emulator: unrewritten __shared__");
#define __align__(n) alignas(n)

#define __syncthreads() cuemu_syncthreads(__LINE__)
#define __syncwarp(...) cuemu_syncwarp(cuemu_mask_or_full(__VA_ARGS__), __LINE__)
#define __threadfence() cuemu_threadfence()
#define __threadfence_block() cuemu_threadfence()
#define __nanosleep(ns) cuemu_yield()
// Lanes of the warp that have not exited (no lockstep here: convergence is what the shuffles check).
#define __activemask() cuemu_activemask()

inline unsigned cuemu_mask_or_full() { return 0xFFFFFFFFu; }
inline unsigned cuemu_mask_or_full(unsigned m) { return m; }

// ---- vector types: the alignment the GPU requires for their loads and stores
#define CUEMU_VEC2(T, N) struct alignas(2 * sizeof(T)) N { T x, y; }; \
  inline N make_##N(T x, T y) { N r; r.x = x; r.y = y; return r; }
#define CUEMU_VEC4(T, N) struct alignas(4 * sizeof(T)) N { T x, y, z, w; }; \
  inline N make_##N(T x, T y, T z, T w) { N r; r.x = x; r.y = y; r.z = z; r.w = w; return r; }
CUEMU_VEC2(float, float2)
CUEMU_VEC4(float, float4)
CUEMU_VEC2(int, int2)
CUEMU_VEC4(int, int4)
CUEMU_VEC2(unsigned int, uint2)
CUEMU_VEC4(unsigned int, uint4)
CUEMU_VEC2(long long, longlong2)  // (dlight's GEMM schedules index shared memory in pairs of int64)
CUEMU_VEC4(long long, longlong4)
struct float3 { float x, y, z; };
inline float3 make_float3(float x, float y, float z) { float3 r; r.x = x; r.y = y; r.z = z; return r; }
inline uint3 make_uint3(unsigned x, unsigned y, unsigned z) { uint3 r; r.x = x; r.y = y; r.z = z; return r; }
#undef CUEMU_VEC2
#undef CUEMU_VEC4

// ---- math: CUDA's overloads and fast intrinsics (glibc declares some __expf-like names: macros)
inline float max(float a, float b) { return fmaxf(a, b); }
inline float min(float a, float b) { return fminf(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline int max(int a, int b) { return a > b ? a : b; }
inline int min(int a, int b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline int64_t max(int64_t a, int64_t b) { return a > b ? a : b; }
inline int64_t min(int64_t a, int64_t b) { return a < b ? a : b; }
#define __expf(x) expf(x)
#define __logf(x) logf(x)
#define __powf(x, y) powf(x, y)
#define __sinf(x) sinf(x)
#define __cosf(x) cosf(x)
#define __tanf(x) tanf(x)
#define __fdividef(x, y) ((x) / (y))
#define __frcp_rn(x) (1.0f / (x))
#define __fsqrt_rn(x) sqrtf(x)
#define __saturatef(x) fminf(fmaxf((x), 0.0f), 1.0f)
#define __fmaf_rn(a, b, c) fmaf(a, b, c)
#define __float_as_int(x) cuemu_bitcast<int>(x)
#define __int_as_float(x) cuemu_bitcast<float>(x)
#define __float_as_uint(x) cuemu_bitcast<unsigned>(x)
#define __uint_as_float(x) cuemu_bitcast<float>(x)
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float exp10f(float x) { return powf(10.0f, x); }
template <class To, class From> inline To cuemu_bitcast(From v) {
  static_assert(sizeof(To) == sizeof(From), "bit cast of different sizes");
  To r; std::memcpy(&r, &v, sizeof(To)); return r;
}

// ---- warp shuffles: every lane of the mask must arrive (checked by the runtime)
enum { CUEMU_SHFL_IDX = 0, CUEMU_SHFL_UP = 1, CUEMU_SHFL_DOWN = 2, CUEMU_SHFL_XOR = 3 };
template <class T> inline T cuemu_shfl_t(int kind, unsigned mask, T v, int arg, int width, int line) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a type wider than 64 bit");
  uint64_t raw = 0;
  std::memcpy(&raw, &v, sizeof(T));
  raw = cuemu_shfl(kind, mask, raw, arg, width, line);
  T r;
  std::memcpy(&r, &raw, sizeof(T));
  return r;
}
#define CUEMU_SHFL_W(kind, mask, v, a, w, ...) cuemu_shfl_t(kind, mask, v, a, w, __LINE__)
#define __shfl_sync(...) CUEMU_SHFL_W(CUEMU_SHFL_IDX, __VA_ARGS__, 32, 0)
#define __shfl_up_sync(...) CUEMU_SHFL_W(CUEMU_SHFL_UP, __VA_ARGS__, 32, 0)
#define __shfl_down_sync(...) CUEMU_SHFL_W(CUEMU_SHFL_DOWN, __VA_ARGS__, 32, 0)
#define __shfl_xor_sync(...) CUEMU_SHFL_W(CUEMU_SHFL_XOR, __VA_ARGS__, 32, 0)

// ---- cache-hinted loads and stores: volatile, so a spin-wait re-reads memory
template <class T> inline T __ldcv(const T* p) { return *(const volatile T*)p; }
template <class T> inline T __ldcg(const T* p) { return *(const volatile T*)p; }
template <class T> inline T __ldca(const T* p) { return *p; }
template <class T> inline void __stcg(T* p, T v) { *(volatile T*)p = v; }

// ---- atomics: fibers of one OS thread switch only at synchronisation points
template <class T> inline T atomicAdd(T* p, T v) { T o = *p; *p = o + v; return o; }
template <class T> inline T atomicMax(T* p, T v) { T o = *p; *p = o > v ? o : v; return o; }
template <class T> inline T atomicMin(T* p, T v) { T o = *p; *p = o < v ? o : v; return o; }
template <class T> inline T atomicExch(T* p, T v) { T o = *p; *p = v; return o; }
template <class T> inline T atomicCAS(T* p, T cmp, T v) { T o = *p; if (o == cmp) *p = v; return o; }

#endif  // BSCOMPILE_CUDA_EMU_H_
