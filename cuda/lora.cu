// Multi-LoRA shrink and expand, in the manner of Punica's BGMV / SGMV: one forward carries rows
// of many adapters (and of the base), each row reading its adapter's slot.
//
//   shrink  s[t, j] = sum_k x[t, k] * A[slot(t), j, k]             s: float32 [rows, rank_total]
//   expand  y[t, offset_i + c] += sum_r s[t, i * r_max + r] * B_i[slot(t), c, r]
//
// A stacks the sub-projections' A's (q, k, v or gate, up: rank_total = n_sub * r_max, zero
// padded to r_max); each B_i [num_slots, size_i, r_max] writes only its own columns
// [offset_i, offset_i + size_i) of y: the fused QKV and gate/up projections stay slice-aware.
//
//   bgmv_*  one row per block column, each row reads its own index row_slots[t] (decode, and
//           CUDA graphs, whose per-row index is a static graph input)
//   sgmv_*  rows grouped into segments [seg_starts[s], seg_starts[s + 1]) of one adapter (the
//           sequences of a ragged batch; the slot is row_slots at the segment's first row); a
//           block takes a tile of up to kLoraRowTile rows and reads each weight once per tile
//
// A slot < 0 or >= num_slots is the base model: shrink writes zeros, expand leaves y alone.
// Sums are float32; y is rounded once, y = round(y + delta).
#include "common.cuh"

namespace specdec {

constexpr int kLoraWarps = 4;         // shrink: warps per block, one rank element per warp
constexpr int kLoraRowTile = 8;       // sgmv: rows per block (weights read once per tile)
constexpr int kLoraMaxSlices = 3;     // expand: sub-projections per launch (q, k, v)

__device__ __forceinline__ bool lora_slot_ok(int slot, int num_slots) {
  return slot >= 0 && slot < num_slots;
}

// One warp: s[row0 + i, j] for i < num_rows, all rows on adapter `slot`.
template <typename T, int ROWS>
__device__ __forceinline__ void shrink_rows(
    float* __restrict__ out, const T* __restrict__ x, const T* __restrict__ a, long long row0,
    int num_rows, int slot, int num_slots, int j, int rank_total, int in_features,
    long long x_stride) {
  const int lane = threadIdx.x & 31;
  if (!lora_slot_ok(slot, num_slots)) {
    if (lane == 0)
      for (int i = 0; i < num_rows; ++i) out[(row0 + i) * rank_total + j] = 0.0f;
    return;
  }
  const T* a_row = a + (static_cast<long long>(slot) * rank_total + j) * in_features;
  float acc[ROWS];
#pragma unroll
  for (int i = 0; i < ROWS; ++i) acc[i] = 0.0f;
  for (int k = lane; k < in_features; k += 32) {
    const float w = to_float(a_row[k]);
#pragma unroll
    for (int i = 0; i < ROWS; ++i)
      if (i < num_rows) acc[i] += to_float(x[(row0 + i) * x_stride + k]) * w;
  }
#pragma unroll
  for (int i = 0; i < ROWS; ++i) {
    const float total = warp_sum(acc[i]);
    if (lane == 0 && i < num_rows) out[(row0 + i) * rank_total + j] = total;
  }
}

// grid (num_rows, ceil(rank_total / kLoraWarps)), block kLoraWarps * 32
template <typename T>
__device__ __forceinline__ void bgmv_shrink_impl(
    float* __restrict__ out,         // [num_rows, rank_total] float32
    const T* __restrict__ x,         // [num_rows, in_features], row stride x_stride
    const T* __restrict__ a,         // [num_slots, rank_total, in_features]
    const int* __restrict__ row_slots,  // [num_rows]
    int rank_total, int in_features, long long x_stride, int num_slots) {
  const int j = blockIdx.y * kLoraWarps + (threadIdx.x >> 5);
  if (j >= rank_total) return;  // the whole warp leaves together
  const long long row = blockIdx.x;
  shrink_rows<T, 1>(out, x, a, row, 1, row_slots[row], num_slots, j, rank_total, in_features,
                    x_stride);
}

// grid (ceil(max_segment_len / kLoraRowTile), num_segments, ceil(rank_total / kLoraWarps))
template <typename T>
__device__ __forceinline__ void sgmv_shrink_impl(
    float* __restrict__ out, const T* __restrict__ x, const T* __restrict__ a,
    const int* __restrict__ row_slots,   // [num_rows]
    const int* __restrict__ seg_starts,  // [num_segments + 1]
    int rank_total, int in_features, long long x_stride, int num_slots) {
  const int j = blockIdx.z * kLoraWarps + (threadIdx.x >> 5);
  const long long start = seg_starts[blockIdx.y], end = seg_starts[blockIdx.y + 1];
  const long long row0 = start + static_cast<long long>(blockIdx.x) * kLoraRowTile;
  if (j >= rank_total || row0 >= end) return;
  const int num_rows = static_cast<int>(end - row0 < kLoraRowTile ? end - row0 : kLoraRowTile);
  shrink_rows<T, kLoraRowTile>(out, x, a, row0, num_rows, row_slots[start], num_slots, j,
                               rank_total, in_features, x_stride);
}

struct LoraSlices {
  const void* b[kLoraMaxSlices];  // B_i [num_slots, size_i, r_max] of the storage type
  int size[kLoraMaxSlices];       // output columns of sub-projection i
  int offset[kLoraMaxSlices];     // its first column in y
};

// One thread: y[row0 + i, offset + c] for i < num_rows, sub-projection `slice`.
template <typename T, int ROWS>
__device__ __forceinline__ void expand_rows(
    T* y, const float* __restrict__ shrink, const LoraSlices& slices, int slice, int c,
    long long row0, int num_rows, int slot, int num_slots, int r_max, int rank_total,
    long long y_stride) {
  if (!lora_slot_ok(slot, num_slots) || c >= slices.size[slice]) return;
  const T* b_row = static_cast<const T*>(slices.b[slice])
                   + (static_cast<long long>(slot) * slices.size[slice] + c) * r_max;
  const float* s = shrink + row0 * rank_total + slice * r_max;
  float acc[ROWS];
#pragma unroll
  for (int i = 0; i < ROWS; ++i) acc[i] = 0.0f;
  for (int r = 0; r < r_max; ++r) {
    const float w = to_float(b_row[r]);
#pragma unroll
    for (int i = 0; i < ROWS; ++i)
      if (i < num_rows) acc[i] += s[i * rank_total + r] * w;
  }
  const int col = slices.offset[slice] + c;
#pragma unroll
  for (int i = 0; i < ROWS; ++i) {
    if (i < num_rows) {
      T* dst = y + (row0 + i) * y_stride + col;
      *dst = from_float<T>(to_float(*dst) + acc[i]);
    }
  }
}

// grid (num_rows, ceil(max_size / blockDim.x), num_slices)
template <typename T>
__device__ __forceinline__ void bgmv_expand_impl(
    T* y,                            // [num_rows, out_features], row stride y_stride; in place
    const float* __restrict__ shrink,  // [num_rows, rank_total] float32
    const LoraSlices& slices, const int* __restrict__ row_slots, int r_max, int rank_total,
    long long y_stride, int num_slots) {
  const long long row = blockIdx.x;
  const int c = blockIdx.y * blockDim.x + threadIdx.x;
  expand_rows<T, 1>(y, shrink, slices, blockIdx.z, c, row, 1, row_slots[row], num_slots, r_max,
                    rank_total, y_stride);
}

// grid (ceil(max_segment_len / kLoraRowTile) * column_blocks, num_segments, num_slices):
// blockIdx.x = row tile * column_blocks + column block
template <typename T>
__device__ __forceinline__ void sgmv_expand_impl(
    T* y, const float* __restrict__ shrink, const LoraSlices& slices,
    const int* __restrict__ row_slots, const int* __restrict__ seg_starts, int r_max,
    int rank_total, long long y_stride, int num_slots, int column_blocks) {
  const int tile = blockIdx.x / column_blocks;
  const int c = (blockIdx.x % column_blocks) * blockDim.x + threadIdx.x;
  const long long start = seg_starts[blockIdx.y], end = seg_starts[blockIdx.y + 1];
  const long long row0 = start + static_cast<long long>(tile) * kLoraRowTile;
  if (row0 >= end) return;
  const int num_rows = static_cast<int>(end - row0 < kLoraRowTile ? end - row0 : kLoraRowTile);
  expand_rows<T, kLoraRowTile>(y, shrink, slices, blockIdx.z, c, row0, num_rows,
                               row_slots[start], num_slots, r_max, rank_total, y_stride);
}

}  // namespace specdec

// NOTE: the slices travel as flat arguments (CuPy passes scalars and pointers, not structs).
#define SPECDEC_LORA_SLICES                                                                 \
  const void *b0, const void *b1, const void *b2, int size0, int size1, int size2,          \
      int offset0, int offset1, int offset2
#define SPECDEC_LORA_MAKE_SLICES                                                            \
  const specdec::LoraSlices slices = {{b0, b1, b2}, {size0, size1, size2},                  \
                                      {offset0, offset1, offset2}}

#define SPECDEC_LORA(TAG, T)                                                                \
  extern "C" __global__ void bgmv_shrink_##TAG(float* out, const T* x, const T* a,          \
                                               const int* row_slots, int rank_total,        \
                                               int in_features, long long x_stride,         \
                                               int num_slots) {                             \
    specdec::bgmv_shrink_impl<T>(out, x, a, row_slots, rank_total, in_features, x_stride,   \
                                 num_slots);                                                \
  }                                                                                         \
  extern "C" __global__ void sgmv_shrink_##TAG(float* out, const T* x, const T* a,          \
                                               const int* row_slots, const int* seg_starts, \
                                               int rank_total, int in_features,             \
                                               long long x_stride, int num_slots) {         \
    specdec::sgmv_shrink_impl<T>(out, x, a, row_slots, seg_starts, rank_total, in_features, \
                                 x_stride, num_slots);                                      \
  }                                                                                         \
  extern "C" __global__ void bgmv_expand_##TAG(T* y, const float* shrink,                   \
                                               SPECDEC_LORA_SLICES, const int* row_slots,   \
                                               int r_max, int rank_total,                   \
                                               long long y_stride, int num_slots) {         \
    SPECDEC_LORA_MAKE_SLICES;                                                               \
    specdec::bgmv_expand_impl<T>(y, shrink, slices, row_slots, r_max, rank_total, y_stride, \
                                 num_slots);                                                \
  }                                                                                         \
  extern "C" __global__ void sgmv_expand_##TAG(T* y, const float* shrink,                   \
                                               SPECDEC_LORA_SLICES, const int* row_slots,   \
                                               const int* seg_starts, int r_max,            \
                                               int rank_total, long long y_stride,          \
                                               int num_slots, int column_blocks) {          \
    SPECDEC_LORA_MAKE_SLICES;                                                               \
    specdec::sgmv_expand_impl<T>(y, shrink, slices, row_slots, seg_starts, r_max,           \
                                 rank_total, y_stride, num_slots, column_blocks);           \
  }

SPECDEC_LORA(f32, float)
SPECDEC_LORA(f16, specdec::f16)
SPECDEC_LORA(bf16, specdec::bf16)
