// KV cache write: copy each token's key and value rows into its slot of the paged cache.
//
// The cache [num_blocks, block_size, num_kv_heads, head_dim] is one row per slot
// (slot = block_id * block_size + offset), so the copy is dtype-agnostic: kernels.py picks the
// widest word (16, 4 or 2 bytes) that divides the row and every stride. One thread block per
// token; tokens whose slot is negative (padding) or >= num_slots are skipped.
#include "common.cuh"

namespace specdec {

struct alignas(16) Word16 { unsigned int x, y, z, w; };
struct alignas(4) Word4 { unsigned int x; };
struct alignas(2) Word2 { unsigned short x; };

template <typename W>
__device__ __forceinline__ void write_kv_impl(
    const W* __restrict__ key,             // [num_tokens, row_words] with row stride key_stride
    const W* __restrict__ value,           // [num_tokens, row_words] with row stride value_stride
    W* __restrict__ k_cache,               // [num_slots, row_words]
    W* __restrict__ v_cache,               // [num_slots, row_words]
    const long long* __restrict__ slot_mapping,  // [num_tokens]
    long long key_stride, long long value_stride, int row_words, long long num_slots) {
  const long long token = blockIdx.x;
  const long long slot = slot_mapping[token];
  if (slot < 0 || slot >= num_slots) return;
  const W* k_src = key + token * key_stride;
  const W* v_src = value + token * value_stride;
  W* k_dst = k_cache + slot * row_words;
  W* v_dst = v_cache + slot * row_words;
  for (int i = threadIdx.x; i < row_words; i += blockDim.x) {
    k_dst[i] = k_src[i];
    v_dst[i] = v_src[i];
  }
}

}  // namespace specdec

#define SPECDEC_WRITE_KV(NAME, W)                                                          \
  extern "C" __global__ void NAME(const W* key, const W* value, W* k_cache, W* v_cache,    \
                                  const long long* slot_mapping, long long key_stride,      \
                                  long long value_stride, int row_words,                    \
                                  long long num_slots) {                                    \
    specdec::write_kv_impl<W>(key, value, k_cache, v_cache, slot_mapping, key_stride,      \
                              value_stride, row_words, num_slots);                          \
  }

SPECDEC_WRITE_KV(write_kv_w16, specdec::Word16)
SPECDEC_WRITE_KV(write_kv_w4, specdec::Word4)
SPECDEC_WRITE_KV(write_kv_w2, specdec::Word2)
