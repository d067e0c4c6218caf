// Paged attention over ragged query windows (decode, verify and prefill chunks alike).
//
// One thread block (4 warps) computes one (head, query row). The row's sequence is found on
// the device by binary search over query_start_loc, so no host-side list is read and the
// launch can be captured in a CUDA graph. Row i of a window of length q whose sequence has
// context length L (seq_lens, which already counts the window) attends to key positions
// 0 .. L - q + i: causal inside the window, everything before it.
//
// Warp w walks KV blocks w, w + 4, ... of the sequence; inside a block it takes CHUNK keys at a
// time (all loads first, then CHUNK independent warp reductions) and folds them into a running
// max / sum / accumulator (online softmax, fp32). The four warps' partial results are merged
// through shared memory at the end.
//
// Rows that belong to no sequence, or whose context length is <= 0 (padding sequences with
// seq_len 0), are written with zeros. A row whose context would need more blocks than
// max_blocks_per_seq is written with NaN instead of reading past its block table.
#include "common.cuh"

namespace specdec {

constexpr int kAttnWarps = 4;
constexpr int kAttnThreads = kAttnWarps * 32;

template <typename T, int HEAD_DIM>
__device__ __forceinline__ void paged_attention_impl(
    T* __restrict__ out,                      // [num_rows, num_heads, HEAD_DIM] contiguous
    const T* __restrict__ query,              // [num_rows, num_heads, HEAD_DIM] (strided)
    const T* __restrict__ k_cache,            // [num_blocks, block_size, num_kv_heads, HEAD_DIM]
    const T* __restrict__ v_cache,            // [num_blocks, block_size, num_kv_heads, HEAD_DIM]
    const int* __restrict__ block_tables,     // [num_seqs, max_blocks_per_seq]
    const int* __restrict__ seq_lens,         // [num_seqs]
    const int* __restrict__ query_start_loc,  // [num_seqs + 1]
    int num_seqs, int num_heads, int num_kv_heads, long long q_row_stride,
    long long q_head_stride, int block_size, int max_blocks_per_seq, float scale,
    int row_offset) {
  constexpr int EPL = HEAD_DIM / 32;          // elements per lane
  constexpr int CHUNK = HEAD_DIM <= 128 ? 8 : 4;  // keys in flight per warp
  __shared__ float s_max[kAttnWarps];
  __shared__ float s_sum[kAttnWarps];
  __shared__ float s_acc[kAttnWarps][HEAD_DIM];

  const float neg_inf = __int_as_float(0xff800000);
  const int head = blockIdx.x;
  const int row = blockIdx.y + row_offset;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  T* out_row = out + (static_cast<long long>(row) * num_heads + head) * HEAD_DIM;

  // The owning sequence: the last s with query_start_loc[s] <= row (skips empty windows).
  int seq = 0;
  int ctx_len = 0;
  if (row < query_start_loc[num_seqs]) {
    int lo = 0;
    int hi = num_seqs - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) >> 1;
      if (query_start_loc[mid] <= row) lo = mid; else hi = mid - 1;
    }
    seq = lo;
    const int q_start = query_start_loc[seq];
    const int q_len = query_start_loc[seq + 1] - q_start;
    ctx_len = seq_lens[seq] - q_len + (row - q_start) + 1;
  }
  if (ctx_len <= 0 || ctx_len > max_blocks_per_seq * block_size) {  // block-uniform exit
    const float fill = ctx_len <= 0 ? 0.0f : __int_as_float(0x7fc00000);
    for (int d = threadIdx.x; d < HEAD_DIM; d += blockDim.x) out_row[d] = from_float<T>(fill);
    return;
  }

  const int kv_head = head / (num_heads / num_kv_heads);
  float q[EPL];
  load_floats<T, EPL>(query + row * q_row_stride + head * q_head_stride + lane * EPL, q);
#pragma unroll
  for (int e = 0; e < EPL; ++e) q[e] *= scale;

  float running_max = neg_inf;
  float running_sum = 0.0f;
  float acc[EPL];
#pragma unroll
  for (int e = 0; e < EPL; ++e) acc[e] = 0.0f;

  const int* table = block_tables + static_cast<long long>(seq) * max_blocks_per_seq;
  const int num_ctx_blocks = (ctx_len + block_size - 1) / block_size;
  const long long slot_stride = static_cast<long long>(num_kv_heads) * HEAD_DIM;
  const long long head_offset = static_cast<long long>(kv_head) * HEAD_DIM + lane * EPL;

  for (int b = warp; b < num_ctx_blocks; b += kAttnWarps) {
    const long long first_slot = static_cast<long long>(table[b]) * block_size;
    const int remaining = ctx_len - b * block_size;
    const int num_keys = remaining < block_size ? remaining : block_size;
    for (int j0 = 0; j0 < num_keys; j0 += CHUNK) {
      float k[CHUNK][EPL];
      float v[CHUNK][EPL];
#pragma unroll
      for (int u = 0; u < CHUNK; ++u) {
        if (j0 + u < num_keys) {
          const long long offset = (first_slot + j0 + u) * slot_stride + head_offset;
          load_floats<T, EPL>(k_cache + offset, k[u]);
          load_floats<T, EPL>(v_cache + offset, v[u]);
        } else {
#pragma unroll
          for (int e = 0; e < EPL; ++e) {
            k[u][e] = 0.0f;
            v[u][e] = 0.0f;
          }
        }
      }
      float score[CHUNK];
#pragma unroll
      for (int u = 0; u < CHUNK; ++u) {
        float dot = 0.0f;
#pragma unroll
        for (int e = 0; e < EPL; ++e) dot += q[e] * k[u][e];
        score[u] = dot;
      }
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1) {
#pragma unroll
        for (int u = 0; u < CHUNK; ++u) score[u] += __shfl_xor_sync(0xffffffffu, score[u], offset);
      }
      float chunk_max = neg_inf;
#pragma unroll
      for (int u = 0; u < CHUNK; ++u) {
        if (j0 + u < num_keys) chunk_max = fmaxf(chunk_max, score[u]);
      }
      const float new_max = fmaxf(running_max, chunk_max);
      const float correction = expf(running_max - new_max);  // 0 on the first chunk
      running_sum *= correction;
#pragma unroll
      for (int e = 0; e < EPL; ++e) acc[e] *= correction;
#pragma unroll
      for (int u = 0; u < CHUNK; ++u) {
        const float p = j0 + u < num_keys ? expf(score[u] - new_max) : 0.0f;
        running_sum += p;
#pragma unroll
        for (int e = 0; e < EPL; ++e) acc[e] += p * v[u][e];
      }
      running_max = new_max;
    }
  }

  if (lane == 0) {
    s_max[warp] = running_max;
    s_sum[warp] = running_sum;
  }
#pragma unroll
  for (int e = 0; e < EPL; ++e) s_acc[warp][lane * EPL + e] = acc[e];
  __syncthreads();

  // Warp 0 always saw block 0, so global_max is finite; warps that saw nothing weigh 0.
  float global_max = neg_inf;
#pragma unroll
  for (int w = 0; w < kAttnWarps; ++w) global_max = fmaxf(global_max, s_max[w]);
  float weight[kAttnWarps];
  float denom = 0.0f;
#pragma unroll
  for (int w = 0; w < kAttnWarps; ++w) {
    weight[w] = expf(s_max[w] - global_max);
    denom += s_sum[w] * weight[w];
  }
  const float inv_denom = 1.0f / denom;
  for (int d = threadIdx.x; d < HEAD_DIM; d += blockDim.x) {
    float val = 0.0f;
#pragma unroll
    for (int w = 0; w < kAttnWarps; ++w) val += s_acc[w][d] * weight[w];
    out_row[d] = from_float<T>(val * inv_denom);
  }
}

}  // namespace specdec

// One extern "C" entry point per (dtype, head_dim): kernels.py looks them up by name.
#define SPECDEC_PAGED_ATTENTION(NAME, T, HEAD_DIM)                                        \
  extern "C" __global__ void __launch_bounds__(specdec::kAttnThreads) NAME(                 \
      T* out, const T* query, const T* k_cache, const T* v_cache, const int* block_tables,  \
      const int* seq_lens, const int* query_start_loc, int num_seqs, int num_heads,         \
      int num_kv_heads, long long q_row_stride, long long q_head_stride, int block_size,    \
      int max_blocks_per_seq, float scale, int row_offset) {                                \
    specdec::paged_attention_impl<T, HEAD_DIM>(                                             \
        out, query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, num_seqs,    \
        num_heads, num_kv_heads, q_row_stride, q_head_stride, block_size,                   \
        max_blocks_per_seq, scale, row_offset);                                             \
  }

SPECDEC_PAGED_ATTENTION(paged_attention_f32_d32, float, 32)
SPECDEC_PAGED_ATTENTION(paged_attention_f32_d64, float, 64)
SPECDEC_PAGED_ATTENTION(paged_attention_f32_d128, float, 128)
SPECDEC_PAGED_ATTENTION(paged_attention_f32_d256, float, 256)
SPECDEC_PAGED_ATTENTION(paged_attention_f16_d32, specdec::f16, 32)
SPECDEC_PAGED_ATTENTION(paged_attention_f16_d64, specdec::f16, 64)
SPECDEC_PAGED_ATTENTION(paged_attention_f16_d128, specdec::f16, 128)
SPECDEC_PAGED_ATTENTION(paged_attention_f16_d256, specdec::f16, 256)
SPECDEC_PAGED_ATTENTION(paged_attention_bf16_d32, specdec::bf16, 32)
SPECDEC_PAGED_ATTENTION(paged_attention_bf16_d64, specdec::bf16, 64)
SPECDEC_PAGED_ATTENTION(paged_attention_bf16_d128, specdec::bf16, 128)
SPECDEC_PAGED_ATTENTION(paged_attention_bf16_d256, specdec::bf16, 256)
