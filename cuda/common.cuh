// Shared device helpers for the specdec kernels: storage types and conversions.
//
// NOTE: no system headers at all. The kernels are compiled at run time by NVRTC (through
// cupy.RawModule), where cuda_fp16.h / cuda_bf16.h may or may not be on the include path
// depending on how CuPy and the CUDA wheels were installed. Half and bfloat16 are therefore
// carried as 16-bit storage structs and converted with PTX `cvt` (fp16) and bit arithmetic
// (bf16, round-to-nearest-even), which give the same results as the header intrinsics.
#ifndef SPECDEC_COMMON_CUH
#define SPECDEC_COMMON_CUH

namespace specdec {

struct alignas(2) f16 { unsigned short bits; };
struct alignas(2) bf16 { unsigned short bits; };

__device__ __forceinline__ float to_float(float x) { return x; }

__device__ __forceinline__ float to_float(f16 x) {
  float out;
  asm("cvt.f32.f16 %0, %1;" : "=f"(out) : "h"(x.bits));
  return out;
}

__device__ __forceinline__ float to_float(bf16 x) {
  return __uint_as_float(static_cast<unsigned int>(x.bits) << 16);
}

template <typename T>
__device__ __forceinline__ T from_float(float x);

template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }

template <>
__device__ __forceinline__ f16 from_float<f16>(float x) {
  f16 out;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(out.bits) : "f"(x));
  return out;
}

template <>
__device__ __forceinline__ bf16 from_float<bf16>(float x) {
  bf16 out;
  unsigned int u = __float_as_uint(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) {  // NaN stays a (quiet) NaN
    out.bits = static_cast<unsigned short>((u >> 16) | 0x0040u);
    return out;
  }
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
  out.bits = static_cast<unsigned short>(u >> 16);
  return out;
}

// N consecutive elements loaded or stored with one vector instruction; the caller guarantees
// alignment to sizeof(T) * N bytes.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ void load_floats(const T* ptr, float (&out)[N]) {
  const Pack<T, N> pack = *reinterpret_cast<const Pack<T, N>*>(ptr);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = to_float(pack.v[i]);
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

}  // namespace specdec

#endif  // SPECDEC_COMMON_CUH
