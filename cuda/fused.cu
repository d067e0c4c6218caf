// Fused per-layer element-wise kernels: each replaces a chain of small torch ops, so that a
// decoder layer on the GPU launches about a third of the kernels it did.
//
//   rms_norm      out = weight * rms_normalize(x), optionally after residual += x (one pass
//                 over the row for the sum of squares, one to scale; the sum stays in float32)
//   silu_mul      out = silu(gate) * up, over the fused [gate | up] projection
//   rope_kv       rotary embedding of the query (in place) and of the key, then the rotated key
//                 and the value written into their paged-cache slots (slot < 0: padding, the
//                 KV write is skipped but the query is still rotated)
//
// Rounding follows the torch reference in ops.py step by step: 16-bit results are rounded
// wherever torch rounds a 16-bit intermediate, so the kernels agree with it to an ulp or so.
#include "common.cuh"

namespace specdec {

// rms_norm and rope_kv run one block per token with any multiple of 32 threads (cupy.py: 256).

template <typename T>
__device__ __forceinline__ float round_to(float x) { return to_float(from_float<T>(x)); }

__device__ __forceinline__ float block_sum(float x, float* warp_sums) {
  x = warp_sum(x);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = x;
  __syncthreads();
  const int num_warps = blockDim.x >> 5;
  float total = 0.0f;
  for (int w = 0; w < num_warps; ++w) total += warp_sums[w];
  return total;
}

template <typename T>
__device__ __forceinline__ void rms_norm_impl(
    T* __restrict__ out,             // [num_tokens, hidden]
    T* residual,                     // [num_tokens, hidden]; in: residual, out: residual + x
    const T* __restrict__ x,         // [num_tokens, hidden] with row stride x_stride
    const T* __restrict__ weight,    // [hidden]
    int hidden, long long x_stride, float eps, int add_residual) {
  __shared__ float warp_sums[32];
  const long long row = blockIdx.x;
  const T* x_row = x + row * x_stride;
  T* res_row = residual + row * hidden;
  T* out_row = out + row * hidden;
  float sum_sq = 0.0f;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
    float value = to_float(x_row[i]);
    if (add_residual) {
      value = round_to<T>(value + to_float(res_row[i]));
      res_row[i] = from_float<T>(value);
    }
    sum_sq += value * value;
  }
  const float inv_rms = 1.0f / sqrtf(block_sum(sum_sq, warp_sums) / hidden + eps);
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
    const float value = add_residual ? to_float(res_row[i]) : to_float(x_row[i]);
    // NOTE: like transformers: normalize in float32, round to the storage type, then scale.
    const float normed = round_to<T>(value * inv_rms);
    out_row[i] = from_float<T>(to_float(weight[i]) * normed);
  }
}

template <typename T>
__device__ __forceinline__ void silu_mul_impl(
    T* __restrict__ out,             // [num_tokens, inter]
    const T* __restrict__ gate_up,   // [num_tokens, 2 * inter]: gate columns, then up columns
    int inter) {
  const long long token = blockIdx.y;
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= inter) return;
  const float gate = to_float(gate_up[token * 2 * inter + i]);
  const float up = to_float(gate_up[token * 2 * inter + inter + i]);
  const float silu = round_to<T>(gate / (1.0f + expf(-gate)));
  out[token * inter + i] = from_float<T>(silu * up);
}

template <typename T>
__device__ __forceinline__ void rotate_pair(T* row, int j, int half, float c, float s) {
  const float x1 = to_float(row[j]), x2 = to_float(row[j + half]);
  // torch: cat(x1 * cos - x2 * sin, x2 * cos + x1 * sin), each product rounded first
  const float out1 = round_to<T>(round_to<T>(x1 * c) - round_to<T>(x2 * s));
  const float out2 = round_to<T>(round_to<T>(x2 * c) + round_to<T>(x1 * s));
  row[j] = from_float<T>(out1);
  row[j + half] = from_float<T>(out2);
}

template <typename T>
__device__ __forceinline__ void rope_kv_impl(
    T* query,                        // [num_tokens, num_heads, head_dim], row stride q_stride
    const T* __restrict__ key,       // [num_tokens, num_kv_heads, head_dim], row stride k_stride
    const T* __restrict__ value,     // [num_tokens, num_kv_heads, head_dim], row stride v_stride
    T* __restrict__ k_cache,         // [num_slots, num_kv_heads, head_dim]
    T* __restrict__ v_cache,         // [num_slots, num_kv_heads, head_dim]
    const T* __restrict__ cos,       // [num_tokens, head_dim / 2]
    const T* __restrict__ sin,       // [num_tokens, head_dim / 2]
    const long long* __restrict__ slot_mapping,  // [num_tokens]
    int num_heads, int num_kv_heads, int head_dim, long long q_stride, long long k_stride,
    long long v_stride, long long num_slots) {
  const long long token = blockIdx.x;
  const int half = head_dim / 2;
  const T* cos_row = cos + token * half;
  const T* sin_row = sin + token * half;
  T* q_row = query + token * q_stride;
  for (int p = threadIdx.x; p < num_heads * half; p += blockDim.x) {
    const int head = p / half, j = p % half;
    rotate_pair(q_row + head * head_dim, j, half, to_float(cos_row[j]), to_float(sin_row[j]));
  }
  const long long slot = slot_mapping[token];
  if (slot < 0 || slot >= num_slots) return;
  const long long kv_row = static_cast<long long>(num_kv_heads) * head_dim;
  T* k_dst = k_cache + slot * kv_row;
  T* v_dst = v_cache + slot * kv_row;
  const T* k_src = key + token * k_stride;
  const T* v_src = value + token * v_stride;
  for (int p = threadIdx.x; p < num_kv_heads * half; p += blockDim.x) {
    const int head = p / half, j = p % half;
    const int base = head * head_dim;
    const float c = to_float(cos_row[j]), s = to_float(sin_row[j]);
    const float x1 = to_float(k_src[base + j]), x2 = to_float(k_src[base + j + half]);
    k_dst[base + j] = from_float<T>(round_to<T>(round_to<T>(x1 * c) - round_to<T>(x2 * s)));
    k_dst[base + j + half] =
        from_float<T>(round_to<T>(round_to<T>(x2 * c) + round_to<T>(x1 * s)));
  }
  for (long long i = threadIdx.x; i < kv_row; i += blockDim.x) v_dst[i] = v_src[i];
}

}  // namespace specdec

#define SPECDEC_FUSED(TAG, T)                                                               \
  extern "C" __global__ void rms_norm_##TAG(T* out, T* residual, const T* x, const T* weight, \
                                            int hidden, long long x_stride, float eps,       \
                                            int add_residual) {                              \
    specdec::rms_norm_impl<T>(out, residual, x, weight, hidden, x_stride, eps, add_residual); \
  }                                                                                         \
  extern "C" __global__ void silu_mul_##TAG(T* out, const T* gate_up, int inter) {          \
    specdec::silu_mul_impl<T>(out, gate_up, inter);                                         \
  }                                                                                         \
  extern "C" __global__ void rope_kv_##TAG(                                                 \
      T* query, const T* key, const T* value, T* k_cache, T* v_cache, const T* cos,          \
      const T* sin, const long long* slot_mapping, int num_heads, int num_kv_heads,          \
      int head_dim, long long q_stride, long long k_stride, long long v_stride,              \
      long long num_slots) {                                                                 \
    specdec::rope_kv_impl<T>(query, key, value, k_cache, v_cache, cos, sin, slot_mapping,    \
                             num_heads, num_kv_heads, head_dim, q_stride, k_stride,          \
                             v_stride, num_slots);                                           \
  }

SPECDEC_FUSED(f32, float)
SPECDEC_FUSED(f16, specdec::f16)
SPECDEC_FUSED(bf16, specdec::bf16)
