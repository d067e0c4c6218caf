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

// ---------------------------------------------------------------------------------------------
// Split-context (flash-decoding) attention for decode and verify windows: two kernels.
//
// 1. paged_attention_split: grid (num_kv_heads * slot_groups, num_seqs, num_splits). One block
//    (4 warps) takes one sequence, one KV head and one contiguous range of its context (the
//    split), and serves every query "slot" that reads that KV head: the `group` query heads
//    of GQA times the window's rows (decode: 1, verify: k + 1). Each KV tile is read from
//    global memory ONCE into shared memory and used by all those slots. Slot s of the window
//    is row s / group, head kv_head * group + s % group; each warp owns kSlotsPerWarp slots
//    (slot_groups blocks along x cover windows with more than kSlotsPerBlock slots).
//    It writes the split's partial softmax state per (row, head): running max, sum and the
//    unnormalized accumulator (fp32), into a workspace; a split with no visible key for a slot
//    writes (-inf, 0, 0).
// 2. paged_attention_combine: grid (num_heads, rows). Merges the num_splits partial states of
//    a row: out = sum_s acc_s * exp(max_s - M) / sum_s sum_s * exp(max_s - M).
//
// Splits: the context [0, seq_len) is cut into num_splits ranges of keys_per_split keys (a
// multiple of kTile); num_splits is fixed by the host per launch (and per captured graph), so a
// short context leaves the trailing splits empty. Lane l holds elements l, l + 32, ... of a
// head (conflict-free shared-memory reads).
//
// Padding rows (no sequence, seq_len <= 0, or a row that sees no key: the masked rows in front
// of a window padded to a graph's uniform length) get zeros; a row whose context needs more blocks
// than max_blocks_per_seq, or whose window has more slots than the grid covers, gets NaN.

constexpr int kSlotsPerWarp = 4;
constexpr int kSlotsPerBlock = kSlotsPerWarp * kAttnWarps;
constexpr int kTile = 16;  // keys per shared-memory tile

template <typename T, int HEAD_DIM>
__device__ __forceinline__ void paged_attention_split_impl(
    float* __restrict__ part_acc,             // [num_rows, num_heads, num_splits, HEAD_DIM]
    float* __restrict__ part_max,             // [num_rows, num_heads, num_splits]
    float* __restrict__ part_sum,             // [num_rows, num_heads, num_splits]
    const T* __restrict__ query,              // [num_rows, num_heads, HEAD_DIM] (strided)
    const T* __restrict__ k_cache,            // [num_blocks, block_size, num_kv_heads, HEAD_DIM]
    const T* __restrict__ v_cache,
    const int* __restrict__ block_tables,     // [num_seqs, max_blocks_per_seq]
    const int* __restrict__ seq_lens,         // [num_seqs]
    const int* __restrict__ query_start_loc,  // [num_seqs + 1]
    int num_heads, int num_kv_heads, long long q_row_stride, long long q_head_stride,
    int block_size, int max_blocks_per_seq, float scale, int num_splits) {
  constexpr int EPL = HEAD_DIM / 32;
  __shared__ float s_k[kTile][HEAD_DIM];
  __shared__ float s_v[kTile][HEAD_DIM];

  const float neg_inf = __int_as_float(0xff800000);
  const int kv_head = blockIdx.x % num_kv_heads;
  const int slot_group = blockIdx.x / num_kv_heads;
  const int seq = blockIdx.y;
  const int split = blockIdx.z;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int group = num_heads / num_kv_heads;

  const int q_start = query_start_loc[seq];
  const int q_len = query_start_loc[seq + 1] - q_start;
  const int seq_len = seq_lens[seq];
  const int num_slots = q_len * group;
  // Block-uniform exits: the combine kernel writes these rows (zeros or NaN) by itself.
  if (slot_group * kSlotsPerBlock >= num_slots || seq_len <= 0 ||
      seq_len > max_blocks_per_seq * block_size) {
    return;
  }
  const int tiles = (seq_len + kTile - 1) / kTile;
  const int keys_per_split = ((tiles + num_splits - 1) / num_splits) * kTile;
  const int begin = split * keys_per_split;
  const int end = begin + keys_per_split < seq_len ? begin + keys_per_split : seq_len;

  // This warp's slots: query (pre-scaled), the last key position each may see, and state.
  float q[kSlotsPerWarp][EPL];
  float acc[kSlotsPerWarp][EPL];
  float running_max[kSlotsPerWarp];
  float running_sum[kSlotsPerWarp];
  int last_key[kSlotsPerWarp];  // -1: no such slot
#pragma unroll
  for (int i = 0; i < kSlotsPerWarp; ++i) {
    const int slot = slot_group * kSlotsPerBlock + warp * kSlotsPerWarp + i;
    running_max[i] = neg_inf;
    running_sum[i] = 0.0f;
    last_key[i] = -1;
#pragma unroll
    for (int e = 0; e < EPL; ++e) {
      acc[i][e] = 0.0f;
      q[i][e] = 0.0f;
    }
    if (slot < num_slots) {
      const int r = slot / group;  // row inside the window
      const int head = kv_head * group + slot % group;
      last_key[i] = seq_len - q_len + r;
      const T* q_ptr = query + (q_start + r) * q_row_stride + head * q_head_stride;
#pragma unroll
      for (int e = 0; e < EPL; ++e) q[i][e] = to_float(q_ptr[e * 32 + lane]) * scale;
    }
  }

  const int* table = block_tables + static_cast<long long>(seq) * max_blocks_per_seq;
  const long long slot_stride = static_cast<long long>(num_kv_heads) * HEAD_DIM;
  for (int tile_start = begin; tile_start < end; tile_start += kTile) {
    __syncthreads();  // the previous tile is no longer read
    for (int idx = threadIdx.x; idx < kTile * HEAD_DIM; idx += blockDim.x) {
      const int j = idx / HEAD_DIM;
      const int d = idx - j * HEAD_DIM;
      const int pos = tile_start + j;
      float kv = 0.0f;
      float vv = 0.0f;
      if (pos < end) {
        const long long cache_slot =
            static_cast<long long>(table[pos / block_size]) * block_size + pos % block_size;
        const long long offset = cache_slot * slot_stride + kv_head * HEAD_DIM + d;
        kv = to_float(k_cache[offset]);
        vv = to_float(v_cache[offset]);
      }
      s_k[j][d] = kv;
      s_v[j][d] = vv;
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kSlotsPerWarp; ++i) {
      if (last_key[i] < tile_start) continue;  // warp-uniform: no visible key in this tile
      float score[kTile];
#pragma unroll
      for (int j = 0; j < kTile; ++j) {
        float dot = 0.0f;
#pragma unroll
        for (int e = 0; e < EPL; ++e) dot += q[i][e] * s_k[j][e * 32 + lane];
        score[j] = dot;
      }
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1) {
#pragma unroll
        for (int j = 0; j < kTile; ++j) score[j] += __shfl_xor_sync(0xffffffffu, score[j], offset);
      }
      float tile_max = neg_inf;
#pragma unroll
      for (int j = 0; j < kTile; ++j) {
        const int pos = tile_start + j;
        if (pos >= end || pos > last_key[i]) score[j] = neg_inf;
        tile_max = fmaxf(tile_max, score[j]);
      }
      const float new_max = fmaxf(running_max[i], tile_max);  // finite: one key is visible
      const float correction = expf(running_max[i] - new_max);  // 0 on the first tile
      running_sum[i] *= correction;
#pragma unroll
      for (int e = 0; e < EPL; ++e) acc[i][e] *= correction;
#pragma unroll
      for (int j = 0; j < kTile; ++j) {
        const float p = expf(score[j] - new_max);  // exp(-inf) = 0 for masked keys
        running_sum[i] += p;
#pragma unroll
        for (int e = 0; e < EPL; ++e) acc[i][e] += p * s_v[j][e * 32 + lane];
      }
      running_max[i] = new_max;
    }
  }

#pragma unroll
  for (int i = 0; i < kSlotsPerWarp; ++i) {
    if (last_key[i] < 0) continue;
    const int slot = slot_group * kSlotsPerBlock + warp * kSlotsPerWarp + i;
    const int row = q_start + slot / group;
    const int head = kv_head * group + slot % group;
    const long long part = (static_cast<long long>(row) * num_heads + head) * num_splits + split;
    if (lane == 0) {
      part_max[part] = running_max[i];
      part_sum[part] = running_sum[i];
    }
#pragma unroll
    for (int e = 0; e < EPL; ++e) part_acc[part * HEAD_DIM + e * 32 + lane] = acc[i][e];
  }
}

template <typename T, int HEAD_DIM>
__device__ __forceinline__ void paged_attention_combine_impl(
    T* __restrict__ out,                      // [num_rows, num_heads, HEAD_DIM] contiguous
    const float* __restrict__ part_acc, const float* __restrict__ part_max,
    const float* __restrict__ part_sum, const int* __restrict__ seq_lens,
    const int* __restrict__ query_start_loc, int num_seqs, int num_heads, int num_kv_heads,
    int block_size, int max_blocks_per_seq, int num_splits, int slot_groups, int row_offset) {
  const int head = blockIdx.x;
  const int row = blockIdx.y + row_offset;
  T* out_row = out + (static_cast<long long>(row) * num_heads + head) * HEAD_DIM;
  int seq_len = 0;
  int q_len = 0;
  int ctx_len = 0;  // keys this row sees; <= 0 for a padding row (in front of a short window)
  if (row < query_start_loc[num_seqs]) {
    int lo = 0;
    int hi = num_seqs - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) >> 1;
      if (query_start_loc[mid] <= row) lo = mid; else hi = mid - 1;
    }
    seq_len = seq_lens[lo];
    q_len = query_start_loc[lo + 1] - query_start_loc[lo];
    ctx_len = seq_len - q_len + (row - query_start_loc[lo]) + 1;
  }
  const int group = num_heads / num_kv_heads;
  if (ctx_len <= 0 || seq_len > max_blocks_per_seq * block_size ||
      q_len * group > slot_groups * kSlotsPerBlock) {
    const float fill = ctx_len <= 0 ? 0.0f : __int_as_float(0x7fc00000);
    for (int d = threadIdx.x; d < HEAD_DIM; d += blockDim.x) out_row[d] = from_float<T>(fill);
    return;
  }
  const long long first = (static_cast<long long>(row) * num_heads + head) * num_splits;
  float global_max = __int_as_float(0xff800000);
  for (int s = 0; s < num_splits; ++s) global_max = fmaxf(global_max, part_max[first + s]);
  float denom = 0.0f;
  for (int s = 0; s < num_splits; ++s) {
    denom += part_sum[first + s] * expf(part_max[first + s] - global_max);  // empty split: 0
  }
  const float inv_denom = 1.0f / denom;
  for (int d = threadIdx.x; d < HEAD_DIM; d += blockDim.x) {
    float val = 0.0f;
    for (int s = 0; s < num_splits; ++s) {
      val += part_acc[(first + s) * HEAD_DIM + d] * expf(part_max[first + s] - global_max);
    }
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

#define SPECDEC_PAGED_ATTENTION_SPLIT(TAG, T, HEAD_DIM)                                   \
  extern "C" __global__ void __launch_bounds__(specdec::kAttnThreads)                      \
      paged_attention_split_##TAG##_d##HEAD_DIM(                                           \
          float* part_acc, float* part_max, float* part_sum, const T* query,               \
          const T* k_cache, const T* v_cache, const int* block_tables, const int* seq_lens, \
          const int* query_start_loc, int num_heads, int num_kv_heads,                     \
          long long q_row_stride, long long q_head_stride, int block_size,                 \
          int max_blocks_per_seq, float scale, int num_splits) {                           \
    specdec::paged_attention_split_impl<T, HEAD_DIM>(                                      \
        part_acc, part_max, part_sum, query, k_cache, v_cache, block_tables, seq_lens,     \
        query_start_loc, num_heads, num_kv_heads, q_row_stride, q_head_stride, block_size, \
        max_blocks_per_seq, scale, num_splits);                                            \
  }                                                                                        \
  extern "C" __global__ void __launch_bounds__(specdec::kAttnThreads)                      \
      paged_attention_combine_##TAG##_d##HEAD_DIM(                                         \
          T* out, const float* part_acc, const float* part_max, const float* part_sum,     \
          const int* seq_lens, const int* query_start_loc, int num_seqs, int num_heads,    \
          int num_kv_heads, int block_size, int max_blocks_per_seq, int num_splits,        \
          int slot_groups, int row_offset) {                                               \
    specdec::paged_attention_combine_impl<T, HEAD_DIM>(                                    \
        out, part_acc, part_max, part_sum, seq_lens, query_start_loc, num_seqs, num_heads, \
        num_kv_heads, block_size, max_blocks_per_seq, num_splits, slot_groups, row_offset); \
  }

#define SPECDEC_SPLIT_ALL_DIMS(TAG, T)   \
  SPECDEC_PAGED_ATTENTION_SPLIT(TAG, T, 32)  \
  SPECDEC_PAGED_ATTENTION_SPLIT(TAG, T, 64)  \
  SPECDEC_PAGED_ATTENTION_SPLIT(TAG, T, 128) \
  SPECDEC_PAGED_ATTENTION_SPLIT(TAG, T, 256)

SPECDEC_SPLIT_ALL_DIMS(f32, float)
SPECDEC_SPLIT_ALL_DIMS(f16, specdec::f16)
SPECDEC_SPLIT_ALL_DIMS(bf16, specdec::bf16)
