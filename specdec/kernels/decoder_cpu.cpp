// The decoder stack of an int4 model for the CPU's decode and verify steps, in one call: per
// layer RMSNorm, the q4 QKV projection (+ bias), rotary embedding, the paged KV-cache write,
// paged attention, o_proj, the residual, RMSNorm, gate/up, SiLU x up, down_proj, the residual.
// It replaces ~50 torch ops and ~15 Python calls a layer (profiled on the 2-core dev VM: about
// half of a 0.5B draft step went to those, not to the weights) with plain loops around the q4
// kernel (q4_cpu.cpp). Activations stay float32 between the ops, whatever the model's dtype;
// the KV cache keeps its own (float32 or bfloat16). The plain reference is the model's own
// layer loop (specdec/model/llama.py); tests compare the two (tests/unit/test_decoder_cpu.py).
//
// Each row's arithmetic does not depend on the other rows of the step (the q4 kernel quantizes
// activations per row; attention runs per row and head), so a verify window gives a row the
// same values as a one-row decode of it; and with the AVX-512 attention (decoder_rows_alone) a
// whole prefill gives a row what a prefix-cached prompt's shorter tail window gives it.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#define SPECDEC_DECODER_AVX512 1
#include <immintrin.h>
#else
#define SPECDEC_DECODER_AVX512 0
#endif

torch::Tensor q4_linear(torch::Tensor x, torch::Tensor packed, torch::Tensor scale_zero,
                        int64_t isa, bool split_dynamic);
void q4_linear_into(torch::Tensor x, const torch::Tensor& packed,
                    const torch::Tensor& scale_zero, int64_t isa, bool split_dynamic, float* y,
                    int64_t ldy);

// Whether a head of this size takes the row-by-row AVX-512 attention for every window (else
// prefill chunks of over kRowWiseRows rows attend as one batch).
bool decoder_rows_alone(int64_t head_dim) {
  return SPECDEC_DECODER_AVX512 &&
         (head_dim == 16 || head_dim == 32 || head_dim == 64 || head_dim == 128);
}

namespace {

// Without the AVX-512 attention (decoder_rows_alone): windows of at most this many rows
// (decodes and verify steps; longer ones are prefill chunks) attend row by row through ATen,
// so a verify row's attention is the decode step's to the bit.
constexpr int64_t kRowWiseRows = 16;

inline float to_f(float v) { return v; }
inline float to_f(at::BFloat16 v) { return static_cast<float>(v); }
inline void from_f(float* p, float v) { *p = v; }
inline void from_f(at::BFloat16* p, float v) { *p = at::BFloat16(v); }  // round to nearest even

struct Projection {
  torch::Tensor packed, scale_zero, bias;  // bias: float32 [out] or undefined

  torch::Tensor operator()(const torch::Tensor& x, bool split_dynamic) const {
    auto y = q4_linear(x, packed, scale_zero, -1, split_dynamic);  // [rows, out] float32
    if (bias.defined()) {
      const int64_t rows = y.size(0), n = y.size(1);
      float* yp = y.data_ptr<float>();
      const float* b = bias.data_ptr<float>();
      for (int64_t r = 0; r < rows; ++r) {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) yp[r * n + i] += b[i];
      }
    }
    return y;
  }
};

struct Layer {
  torch::Tensor input_norm, post_norm;  // float32 [hidden]
  Projection qkv, o, gate_up, down;
  torch::Tensor k_cache, v_cache;  // [num_blocks, block_size, num_kv_heads, head_dim]
};

// out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * weight
void rms_norm_rows(const float* x, const float* weight, int64_t rows, int64_t hidden, float eps,
                   float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * hidden;
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < hidden; ++i) sum += xr[i] * xr[i];
    const float inv = 1.f / std::sqrt(sum / static_cast<float>(hidden) + eps);
    float* o = out + r * hidden;
#pragma omp simd
    for (int64_t i = 0; i < hidden; ++i) o[i] = xr[i] * inv * weight[i];
  }
}

inline float round_bf16(float v) { return static_cast<float>(at::BFloat16(v)); }

// The final RMSNorm of one row, as the model's own ops compute it (specdec.kernels.ops.rms_norm):
// in float32 for a float32 model; for a bfloat16 one the input rounded to bfloat16, the norm in
// float32, rounded, then times the bfloat16 weight, rounded again.
void head_norm_row(const float* x, const float* weight, int64_t hidden, float eps, bool bf16,
                   float* out) {
  if (!bf16) {
    rms_norm_rows(x, weight, 1, hidden, eps, out);
    return;
  }
  float sum = 0.f;
  for (int64_t i = 0; i < hidden; ++i) {
    out[i] = round_bf16(x[i]);
    sum += out[i] * out[i];
  }
  const float inv = 1.f / std::sqrt(sum / static_cast<float>(hidden) + eps);
  for (int64_t i = 0; i < hidden; ++i) out[i] = round_bf16(weight[i] * round_bf16(out[i] * inv));
}

// Rows of an int4 embedding table (specdec.model.quant.Int4Embedding): row = code * scale +
// zero_eff per group, each product and sum rounded to float32 as torch's two ops do (no fused
// multiply-add), then to bfloat16 where the model's dtype is; ids at or past `num_real` embed to
// zero (a padded vocabulary's rows).
__attribute__((optimize("fp-contract=off")))
void embed_rows(const int64_t* ids, int64_t T, const uint8_t* packed, const float* scales,
                const float* zero_eff, int64_t num_real, int64_t dim, int64_t group, bool bf16,
                float* out) {
  const int64_t groups = dim / group;
  for (int64_t t = 0; t < T; ++t) {
    float* o = out + t * dim;
    const int64_t id = ids[t];
    if (id >= num_real) {
      std::fill_n(o, dim, 0.f);
      continue;
    }
    const uint8_t* p = packed + id * (dim / 2);
    for (int64_t g = 0; g < groups; ++g) {
      const float scale = scales[id * groups + g], zero = zero_eff[id * groups + g];
      for (int64_t i = g * group; i < (g + 1) * group; i += 2) {
        const uint8_t byte = p[i / 2];
        const float lo = static_cast<float>(byte & 0x0F) * scale;
        const float hi = static_cast<float>(byte >> 4) * scale;
        o[i] = lo + zero;
        o[i + 1] = hi + zero;
      }
    }
    if (bf16) {
      for (int64_t i = 0; i < dim; ++i) o[i] = round_bf16(o[i]);
    }
  }
}

// Rotary embedding of one head in place, half-split layout: (x1, x2) -> (x1 c - x2 s, x2 c + x1 s)
inline void rotate(float* x, const float* cos, const float* sin, int64_t half) {
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = x[i], x2 = x[i + half];
    x[i] = x1 * cos[i] - x2 * sin[i];
    x[i + half] = x2 * cos[i] + x1 * sin[i];
  }
}

#if SPECDEC_DECODER_AVX512
// exp(x), 16 lanes: x = n ln2 + r with |r| <= ln2 / 2, exp(r) by Cephes' expf polynomial,
// times 2^n (vscalefps). Inputs are clamped to [-87.3, 88.7], where float32 exp is finite and
// normal; within a few ulp of std::exp there.
inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.33654f)), _mm512_set1_ps(88.72283f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // ln2 in two parts
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// Lane i of the result: the sum of the 16 lanes of v[i] (a transposing add tree, 45 ops for
// 16 sums where 16 separate horizontal sums take ~130).
inline __m512 sum16(const __m512* v) {
  __m512 t[8], w[4];
  for (int i = 0; i < 8; ++i) {  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3]
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                         _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  }
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: the lane's sums of 4 inputs
    w[i] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * i], t[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(t[2 * i], t[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  }
  const __m512 x = _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm512_shuffle_f32x4(w[0], w[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 y = _mm512_add_ps(_mm512_shuffle_f32x4(w[2], w[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm512_shuffle_f32x4(w[2], w[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(x, y, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(x, y, _MM_SHUFFLE(3, 1, 3, 1)));
}

// out[b] = sum_j p[b][j] v_j for the GB queries of a block (gb <= GB of them real), the v rows
// read once for the block: GB x NC accumulators stay in registers.
template <int NC, int GB, typename C>
void mix_values(const float* p, int64_t n, int gb, const C* vc, const int32_t* table,
                int64_t block_size, int64_t kv_size, int64_t head, float* out) {
  constexpr int64_t D = 16 * NC;
  __m512 acc[GB][NC];
  for (int b = 0; b < GB; ++b)
    for (int c = 0; c < NC; ++c) acc[b][c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    const int64_t slot = static_cast<int64_t>(table[j / block_size]) * block_size + j % block_size;
    const C* v = vc + slot * kv_size + head * D;
    __m512 row[NC];
    for (int c = 0; c < NC; ++c) row[c] = load16(v + 16 * c);
    for (int b = 0; b < GB; ++b) {
      if (b >= gb) break;
      const __m512 w = _mm512_set1_ps(p[b * n + j]);
      for (int c = 0; c < NC; ++c) acc[b][c] = _mm512_fmadd_ps(w, row[c], acc[b][c]);
    }
  }
  for (int b = 0; b < gb; ++b)
    for (int c = 0; c < NC; ++c) _mm512_storeu_ps(out + b * D + 16 * c, acc[b][c]);
}

// One row's attention for one KV head, straight from the paged cache: q [group, D] (already
// scaled) against the sequence's first n keys, out [group, D]; scores is scratch [group, n],
// keys scratch [16, D]. NC = D / 16 vectors a head. Nothing in it depends on the other rows of
// the step, so a verify row is its decode step to the bit.
template <int NC, typename C>
void attend_head(const float* q, int64_t group, const C* kc, const C* vc, const int32_t* table,
                 int64_t block_size, int64_t kv_size, int64_t head, int64_t n, float* scores,
                 float* keys, float* out) {
  constexpr int64_t D = 16 * NC;
  for (int64_t j0 = 0; j0 < n; j0 += 16) {  // 16 keys at a time, as float32 in `keys`
    const int64_t count = std::min<int64_t>(16, n - j0);
    for (int64_t jj = 0; jj < count; ++jj) {
      const int64_t j = j0 + jj;
      const int64_t slot =
          static_cast<int64_t>(table[j / block_size]) * block_size + j % block_size;
      const C* k = kc + slot * kv_size + head * D;
      for (int c = 0; c < NC; ++c) _mm512_storeu_ps(keys + jj * D + 16 * c, load16(k + 16 * c));
    }
    const __mmask16 valid = static_cast<__mmask16>((1u << count) - 1u);
    for (int64_t g = 0; g < group; ++g) {
      __m512 qg[NC];
      for (int c = 0; c < NC; ++c) qg[c] = _mm512_loadu_ps(q + g * D + 16 * c);
      __m512 dots[16];
      for (int64_t jj = 0; jj < 16; ++jj) {
        if (jj >= count) {
          dots[jj] = _mm512_setzero_ps();
          continue;
        }
        __m512 acc = _mm512_mul_ps(qg[0], _mm512_loadu_ps(keys + jj * D));
        for (int c = 1; c < NC; ++c)
          acc = _mm512_fmadd_ps(qg[c], _mm512_loadu_ps(keys + jj * D + 16 * c), acc);
        dots[jj] = acc;
      }
      _mm512_mask_storeu_ps(scores + g * n + j0, valid, sum16(dots));
    }
  }
  const int64_t full = n / 16 * 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (n - full)) - 1u);
  for (int64_t g = 0; g < group; ++g) {  // softmax: exp(s - max), divided by the sum below
    float* s = scores + g * n;
    __m512 top = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t j = 0; j < full; j += 16) top = _mm512_max_ps(top, _mm512_loadu_ps(s + j));
    if (tail) top = _mm512_mask_max_ps(top, tail, top, _mm512_maskz_loadu_ps(tail, s + full));
    const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(top));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < full; j += 16) {
      const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + j), m));
      _mm512_storeu_ps(s + j, e);
      sum = _mm512_add_ps(sum, e);
    }
    if (tail) {
      const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, s + full), m));
      _mm512_mask_storeu_ps(s + full, tail, e);
      sum = _mm512_mask_add_ps(sum, tail, sum, e);
    }
    const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(sum));
    for (int64_t j = 0; j < full; j += 16) {
      _mm512_storeu_ps(s + j, _mm512_mul_ps(_mm512_loadu_ps(s + j), inv));
    }
    if (tail) {
      _mm512_mask_storeu_ps(s + full, tail,
                            _mm512_mul_ps(_mm512_maskz_loadu_ps(tail, s + full), inv));
    }
  }
  constexpr int GB = NC >= 8 ? 3 : 24 / NC > 8 ? 8 : 24 / NC;  // GB x NC <= 24 accumulators
  for (int64_t g = 0; g < group; g += GB) {
    const int gb = static_cast<int>(std::min<int64_t>(GB, group - g));
    mix_values<NC, GB>(scores + g * n, n, gb, vc, table, block_size, kv_size, head, out + g * D);
  }
}

// act[r, i] = silu(gate[r, i]) * up[r, i] = gate / (1 + exp(-gate)) * up; gate_up [T, 2 inter].
void silu_mul(const float* gate_up, int64_t rows, int64_t inter, float* act) {
  const __m512 one = _mm512_set1_ps(1.f);
  for (int64_t r = 0; r < rows; ++r) {
    const float* g = gate_up + r * 2 * inter;
    const float* u = g + inter;
    float* o = act + r * inter;
    for (int64_t i = 0; i < inter; i += 16) {
      const __mmask16 m = inter - i >= 16 ? static_cast<__mmask16>(0xFFFF)
                                          : static_cast<__mmask16>((1u << (inter - i)) - 1u);
      const __m512 x = _mm512_maskz_loadu_ps(m, g + i);
      const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), x));
      const __m512 y = _mm512_mul_ps(_mm512_div_ps(x, _mm512_add_ps(one, e)),
                                     _mm512_maskz_loadu_ps(m, u + i));
      _mm512_mask_storeu_ps(o + i, m, y);
    }
  }
}
#endif

class CpuDecoder {
 public:
  CpuDecoder(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double eps,
             torch::Tensor rope_cos, torch::Tensor rope_sin, bool split_dynamic)
      : num_heads_(num_heads), num_kv_heads_(num_kv_heads), head_dim_(head_dim),
        eps_(static_cast<float>(eps)), split_dynamic_(split_dynamic) {
    TORCH_CHECK(num_heads % num_kv_heads == 0, "CpuDecoder: num_heads=", num_heads,
                " must be a multiple of num_kv_heads=", num_kv_heads);
    TORCH_CHECK(head_dim % 2 == 0, "CpuDecoder: head_dim=", head_dim, " must be even");
    rope_cos_ = rope_cos.to(torch::kFloat32).contiguous();  // [table_len, head_dim / 2]
    rope_sin_ = rope_sin.to(torch::kFloat32).contiguous();
    TORCH_CHECK(rope_cos_.dim() == 2 && rope_cos_.size(1) == head_dim / 2,
                "CpuDecoder: rope tables must be [table_len, head_dim / 2]");
  }

  void add_layer(torch::Tensor input_norm, torch::Tensor post_norm,
                 std::vector<torch::Tensor> qkv, std::vector<torch::Tensor> o,
                 std::vector<torch::Tensor> gate_up, std::vector<torch::Tensor> down,
                 torch::Tensor k_cache, torch::Tensor v_cache) {
    // each projection: (packed, scale_zero, bias or an empty tensor)
    auto projection = [](const std::vector<torch::Tensor>& p, int64_t out) {
      TORCH_CHECK(p.size() == 3, "CpuDecoder: a projection is (packed, scale_zero, bias)");
      TORCH_CHECK(p[0].size(0) * 16 == out, "CpuDecoder: projection has ", p[0].size(0) * 16,
                  " outputs, expected ", out);
      Projection proj{p[0], p[1], torch::Tensor()};
      if (p[2].numel() > 0) proj.bias = p[2].to(torch::kFloat32).contiguous();
      return proj;
    };
    const int64_t hidden = input_norm.numel();
    TORCH_CHECK(hidden_ == 0 || hidden_ == hidden, "CpuDecoder: hidden size changed");
    hidden_ = hidden;
    TORCH_CHECK(k_cache.dim() == 4 && k_cache.size(2) == num_kv_heads_ &&
                    k_cache.size(3) == head_dim_ && k_cache.is_contiguous() &&
                    v_cache.sizes() == k_cache.sizes() && v_cache.is_contiguous() &&
                    v_cache.scalar_type() == k_cache.scalar_type(),
                "CpuDecoder: the caches must be contiguous [num_blocks, block_size, ",
                num_kv_heads_, ", ", head_dim_, "], got ", k_cache.sizes());
    TORCH_CHECK(k_cache.scalar_type() == torch::kFloat32 ||
                    k_cache.scalar_type() == torch::kBFloat16,
                "CpuDecoder: the KV cache must be float32 or bfloat16");
    const int64_t q_size = num_heads_ * head_dim_, kv_size = num_kv_heads_ * head_dim_;
    Layer layer;
    layer.input_norm = input_norm.to(torch::kFloat32).contiguous();
    layer.post_norm = post_norm.to(torch::kFloat32).contiguous();
    layer.qkv = projection(qkv, q_size + 2 * kv_size);
    layer.o = projection(o, hidden);
    layer.gate_up = projection(gate_up, gate_up[0].size(0) * 16);
    layer.down = projection(down, hidden);
    TORCH_CHECK(gate_up[0].size(0) * 16 == 2 * down[0].size(1) * 32,
                "CpuDecoder: gate_up has ", gate_up[0].size(0) * 16, " outputs, down_proj ",
                down[0].size(1) * 32, " inputs");
    layer.k_cache = k_cache;
    layer.v_cache = v_cache;
    layers_.push_back(std::move(layer));
  }

  // The model's input embedding, where it is an int4 table (Int4Embedding): packed [V, dim / 2]
  // uint8 (input 2j in the low nibble), scales and zero_eff float32 [V, dim / group]; ids at or
  // past num_real embed to zero. bf16: the model's dtype is bfloat16 (rows rounded to it).
  void set_embedding(torch::Tensor packed, torch::Tensor scales, torch::Tensor zero_eff,
                     int64_t group, int64_t num_real, bool bf16) {
    TORCH_CHECK(packed.dtype() == torch::kUInt8 && packed.dim() == 2 &&
                    packed.size(1) * 2 == hidden_,
                "CpuDecoder: embedding must be uint8 [V, ", hidden_ / 2, "], got ",
                packed.sizes());
    TORCH_CHECK(group > 0 && hidden_ % group == 0 && group % 2 == 0,
                "CpuDecoder: embedding group ", group, " must divide hidden=", hidden_);
    TORCH_CHECK(scales.sizes() == zero_eff.sizes() && scales.dim() == 2 &&
                    scales.size(0) == packed.size(0) && scales.size(1) == hidden_ / group,
                "CpuDecoder: embedding scales must be [V, ", hidden_ / group, "]");
    TORCH_CHECK(num_real >= 1 && num_real <= packed.size(0),
                "CpuDecoder: embedding num_real=", num_real, " past its ", packed.size(0), " rows");
    embed_packed_ = packed.contiguous();
    embed_scales_ = scales.to(torch::kFloat32).contiguous();
    embed_zero_ = zero_eff.to(torch::kFloat32).contiguous();
    embed_group_ = group;
    embed_real_ = num_real;
    embed_bf16_ = bf16;
  }

  // The final RMSNorm (weight [hidden], eps) and the q4 lm_head (packed, scale_zero: rows
  // head_rows, a pruned draft head's being fewer than the vocabulary). bf16: the model's dtype
  // is bfloat16 (the norm and the logits rounded as its own ops round them).
  void set_head(torch::Tensor norm_weight, double eps, torch::Tensor packed,
                torch::Tensor scale_zero, bool bf16) {
    TORCH_CHECK(norm_weight.numel() == hidden_, "CpuDecoder: head norm has ",
                norm_weight.numel(), " weights, hidden=", hidden_);
    TORCH_CHECK(packed.dim() == 4 && packed.size(1) * 32 == hidden_,
                "CpuDecoder: lm_head must take hidden=", hidden_, " inputs");
    head_norm_ = norm_weight.to(torch::kFloat32).contiguous();
    head_eps_ = static_cast<float>(eps);
    head_ = Projection{packed, scale_zero, torch::Tensor()};
    head_bf16_ = bf16;
  }

  bool has_embedding() const { return embed_packed_.defined(); }
  bool has_head() const { return head_.packed.defined(); }

  // ids int64 [T] -> [T, hidden] float32 (bfloat16 values for a bfloat16 model).
  torch::Tensor embed(torch::Tensor ids) const {
    TORCH_CHECK(has_embedding(), "CpuDecoder: no embedding set");
    ids = ids.to(torch::kInt64).contiguous();
    const int64_t T = ids.numel();
    const int64_t* idp = ids.data_ptr<int64_t>();
    for (int64_t t = 0; t < T; ++t) {
      TORCH_CHECK(idp[t] >= 0, "CpuDecoder: token id ", idp[t], " is negative");
    }
    auto out = torch::empty({T, hidden_}, torch::kFloat32);
    embed_rows(idp, T, embed_packed_.data_ptr<uint8_t>(), embed_scales_.data_ptr<float>(),
               embed_zero_.data_ptr<float>(), embed_real_, hidden_, embed_group_, embed_bf16_,
               out.data_ptr<float>());
    return out;
  }

  // A whole forward in one call: `tokens` (int64 ids [T], with an embedding set, or hidden
  // [T, hidden]) through every layer, then the final norm and the lm_head of the rows
  // logits_indices names -> float32 logits [len(logits_indices), vocab_size], the columns past
  // the head's rows -inf (a pruned draft head's, a padded vocabulary's: never sampled).
  torch::Tensor forward_logits(torch::Tensor tokens, torch::Tensor positions,
                               torch::Tensor slot_mapping, torch::Tensor block_tables,
                               torch::Tensor seq_lens, torch::Tensor query_start_loc,
                               torch::Tensor logits_indices, int64_t vocab_size) {
    TORCH_CHECK(has_head(), "CpuDecoder: no lm_head set");
    const int64_t head_rows = head_.packed.size(0) * 16;
    TORCH_CHECK(vocab_size >= head_rows, "CpuDecoder: vocab_size=", vocab_size, " < the ",
                head_rows, " head rows");
    auto hidden = tokens.is_floating_point() ? tokens : embed(tokens);
    auto x = forward(hidden, positions, slot_mapping, block_tables, seq_lens, query_start_loc);
    logits_indices = logits_indices.to(torch::kInt64).contiguous();
    const int64_t L = logits_indices.numel(), T = x.size(0);
    const int64_t* li = logits_indices.data_ptr<int64_t>();
    auto normed = torch::empty({L, hidden_}, torch::kFloat32);
    const float* xp = x.data_ptr<float>();
    float* np = normed.data_ptr<float>();
    for (int64_t l = 0; l < L; ++l) {
      TORCH_CHECK(li[l] >= 0 && li[l] < T, "CpuDecoder: logits index ", li[l], " outside the ",
                  T, " rows");
      head_norm_row(xp + li[l] * hidden_, head_norm_.data_ptr<float>(), hidden_, head_eps_,
                    head_bf16_, np + l * hidden_);
    }
    auto logits = torch::empty({L, vocab_size}, torch::kFloat32);
    if (L == 0) return logits;
    float* lp = logits.data_ptr<float>();
    q4_linear_into(normed, head_.packed, head_.scale_zero, -1, split_dynamic_, lp, vocab_size);
    const float neg_inf = -std::numeric_limits<float>::infinity();
    for (int64_t l = 0; l < L; ++l) {
      float* row = lp + l * vocab_size;
      if (head_bf16_) {  // Int4Linear returns its input's dtype
        for (int64_t i = 0; i < head_rows; ++i) row[i] = round_bf16(row[i]);
      }
      std::fill(row + head_rows, row + vocab_size, neg_inf);
    }
    return logits;
  }

  // hidden [T, hidden] (any float dtype) -> [T, hidden] float32 after every layer. The batch
  // as ForwardBatch holds it: positions, slot_mapping int64 [T]; block_tables int32 [S, B];
  // seq_lens, query_start_loc int32 [S], [S + 1]; sequence s owns rows qsl[s]..qsl[s + 1] - 1,
  // and its row i sees the keys at positions < seq_len - query_len + i + 1.
  torch::Tensor forward(torch::Tensor hidden, torch::Tensor positions, torch::Tensor slot_mapping,
                        torch::Tensor block_tables, torch::Tensor seq_lens,
                        torch::Tensor query_start_loc) {
    TORCH_CHECK(hidden.dim() == 2 && hidden.size(1) == hidden_, "CpuDecoder: hidden must be [T, ",
                hidden_, "]");
    const int64_t T = hidden.size(0);
    // the residual stream: always a copy (updated in place)
    auto x = hidden.to(torch::kFloat32, /*non_blocking=*/false, /*copy=*/true).contiguous();
    if (T == 0) return x;
    positions = positions.to(torch::kInt64).contiguous();
    slot_mapping = slot_mapping.to(torch::kInt64).contiguous();
    block_tables = block_tables.to(torch::kInt32).contiguous();
    seq_lens = seq_lens.to(torch::kInt32).contiguous();
    query_start_loc = query_start_loc.to(torch::kInt32).contiguous();
    const int64_t S = seq_lens.size(0);
    TORCH_CHECK(positions.numel() == T && slot_mapping.numel() == T &&
                    query_start_loc.numel() == S + 1 && block_tables.size(0) == S,
                "CpuDecoder: the batch's shapes disagree");
    const int32_t* qsl = query_start_loc.data_ptr<int32_t>();
    const int32_t* lens = seq_lens.data_ptr<int32_t>();
    const int64_t* pos = positions.data_ptr<int64_t>();
    const int64_t table_len = rope_cos_.size(0);
    const int64_t max_blocks = block_tables.size(1);
    const int64_t block_size = layers_.empty() ? 1 : layers_[0].k_cache.size(1);
    TORCH_CHECK(qsl[0] == 0 && qsl[S] == T, "CpuDecoder: query_start_loc must span the ", T,
                " rows");
    std::vector<int64_t> row_keys(T);
    for (int64_t s = 0; s < S; ++s) {
      const int64_t begin = qsl[s], end = qsl[s + 1];
      TORCH_CHECK(begin <= end, "CpuDecoder: query_start_loc must not decrease");
      for (int64_t r = begin; r < end; ++r) {
        row_keys[r] = lens[s] - (end - begin) + (r - begin) + 1;
        TORCH_CHECK(row_keys[r] >= 1 && row_keys[r] <= max_blocks * block_size,
                    "CpuDecoder: row ", r, " would see ", row_keys[r], " keys");
      }
    }
    for (int64_t r = 0; r < T; ++r) {
      TORCH_CHECK(pos[r] >= 0 && pos[r] < table_len, "CpuDecoder: position ", pos[r],
                  " is past the rotary table (", table_len, ")");
    }
    auto normed = torch::empty({T, hidden_}, torch::kFloat32);
    auto attn = torch::empty({T, num_heads_ * head_dim_}, torch::kFloat32);
    float* xp = x.data_ptr<float>();
    float* np = normed.data_ptr<float>();
    for (const Layer& layer : layers_) {
      rms_norm_rows(xp, layer.input_norm.data_ptr<float>(), T, hidden_, eps_, np);
      auto qkv = layer.qkv(normed, split_dynamic_);  // [T, q + 2 kv]
      if (layer.k_cache.scalar_type() == torch::kBFloat16) {
        attention<at::BFloat16>(layer, qkv, slot_mapping, block_tables, qsl, row_keys, pos,
                                attn);
      } else {
        attention<float>(layer, qkv, slot_mapping, block_tables, qsl, row_keys, pos,
                         attn);
      }
      add_into(xp, layer.o(attn, split_dynamic_));
      rms_norm_rows(xp, layer.post_norm.data_ptr<float>(), T, hidden_, eps_, np);
      auto gate_up = layer.gate_up(normed, split_dynamic_);  // [T, 2 inter]
      const int64_t inter = gate_up.size(1) / 2;
#if SPECDEC_DECODER_AVX512
      // NOTE: ATen's silu and mul_ cost ~8 us a layer at one row (two dispatches, a buffer);
      // a scalar std::exp loop ~0.1 ms
      auto act = torch::empty({T, inter}, torch::kFloat32);
      silu_mul(gate_up.data_ptr<float>(), T, inter, act.data_ptr<float>());
#else
      auto act = at::silu(gate_up.narrow(1, 0, inter)).mul_(gate_up.narrow(1, inter, inter));
#endif
      add_into(xp, layer.down(act, split_dynamic_));
    }
    return x;
  }

 private:
  void add_into(float* x, const torch::Tensor& y) const {
    const int64_t n = y.numel();
    const float* yp = y.data_ptr<float>();
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) x[i] += yp[i];
  }

  // Rotates q and k in qkv, writes k and v into the layer's cache, then attends each row over
  // its sequence's cached keys. attn [T, num_heads * head_dim].
  template <typename C>
  void attention(const Layer& layer, torch::Tensor& qkv, const torch::Tensor& slot_mapping,
                 const torch::Tensor& block_tables, const int32_t* qsl,
                 const std::vector<int64_t>& row_keys, const int64_t* pos,
                 torch::Tensor& attn) const {
    const int64_t T = qkv.size(0), D = head_dim_, half = D / 2;
    const int64_t q_size = num_heads_ * D, kv_size = num_kv_heads_ * D;
    const int64_t width = q_size + 2 * kv_size;
    float* qkvp = qkv.data_ptr<float>();
    C* kc = layer.k_cache.data_ptr<C>();
    C* vc = layer.v_cache.data_ptr<C>();
    const int64_t block_size = layer.k_cache.size(1);
    const int64_t num_slots = layer.k_cache.size(0) * block_size;
    const int64_t* slots = slot_mapping.data_ptr<int64_t>();
    const float* cos_table = rope_cos_.data_ptr<float>();
    const float* sin_table = rope_sin_.data_ptr<float>();
    for (int64_t r = 0; r < T; ++r) {
      float* row = qkvp + r * width;
      const float* c = cos_table + pos[r] * half;
      const float* s = sin_table + pos[r] * half;
      for (int64_t h = 0; h < num_heads_ + num_kv_heads_; ++h) rotate(row + h * D, c, s, half);
      const int64_t slot = slots[r];
      if (slot < 0) continue;  // padding: not written
      TORCH_CHECK(slot < num_slots, "CpuDecoder: slot ", slot, " is past the cache (",
                  num_slots, " slots)");
      C* kdst = kc + slot * kv_size;
      C* vdst = vc + slot * kv_size;
      for (int64_t i = 0; i < kv_size; ++i) {
        from_f(kdst + i, row[q_size + i]);
        from_f(vdst + i, row[q_size + kv_size + i]);
      }
    }
    const int64_t group = num_heads_ / num_kv_heads_;
    const int32_t* tables = block_tables.data_ptr<int32_t>();
    const int64_t max_blocks = block_tables.size(1);
    const float scale = 1.f / std::sqrt(static_cast<float>(D));
    float* out = attn.data_ptr<float>();
    const int64_t S = block_tables.size(0);
    // One sequence: its cached keys and values gathered to float32 [kv_heads, n, D], its rows'
    // queries (scaled) to [kv_heads, rows * group, D] (row-major over (row, head in group)),
    // then two batched matmuls around a masked softmax. A row sees the first row_keys[r] keys.
    // NOTE: measured against a loop of per-key dot products (a horizontal sum per key, head
    // and row): the same at one row, a 5-row verify step of the 1.5B 38 against 46 ms.
    auto attend = [&](int64_t s) {
      const int64_t first = qsl[s], rows = qsl[s + 1] - first;
      if (rows == 0) return;
      const int64_t n = row_keys[first + rows - 1];
      const int32_t* table = tables + s * max_blocks;
#if SPECDEC_DECODER_AVX512
      if (decoder_rows_alone(D)) {
        // Every window (decode, verify, prefill chunk) row by row and head by head from the
        // cache, no gather, no ATen op (at one row of the 0.5B those were ~2 ms of an 8 ms
        // step): a row's attention is then a function of its query and the cache alone, the
        // same whether a decode, a verify window, a whole prefill or a prefix-cached prompt's
        // tail computes it.
        // NOTE: the (row, head) pairs split over the threads; at one row the second core would
        // otherwise wait through the whole attention (~25 us a layer of the 0.5B)
        auto pairs = [&](int64_t begin, int64_t end) {
          std::vector<float> query(group * D), scores(group * n), keys(16 * D);
          for (int64_t pair = begin; pair < end; ++pair) {
            const int64_t i = pair / num_kv_heads_, h = pair % num_kv_heads_;
            const float* q = qkvp + (first + i) * width + h * group * D;
            for (int64_t e = 0; e < group * D; ++e) query[e] = q[e] * scale;
            float* o = out + (first + i) * q_size + h * group * D;
            const int64_t seen = row_keys[first + i];
            auto head = [&](auto chunks) {
              attend_head<decltype(chunks)::value>(query.data(), group, kc, vc, table,
                                                   block_size, kv_size, h, seen, scores.data(),
                                                   keys.data(), o);
            };
            switch (D) {
              case 16: head(std::integral_constant<int, 1>()); break;
              case 32: head(std::integral_constant<int, 2>()); break;
              case 64: head(std::integral_constant<int, 4>()); break;
              default: head(std::integral_constant<int, 8>()); break;
            }
          }
        };
        const int64_t total = rows * num_kv_heads_;
        if (S == 1 && total > 1 && at::get_num_threads() > 1) {
          at::parallel_for(0, total, 1, pairs);
        } else {
          pairs(0, total);
        }
        return;
      }
#endif
      auto keys = torch::empty({num_kv_heads_, n, D}, torch::kFloat32);
      auto values = torch::empty({num_kv_heads_, n, D}, torch::kFloat32);
      float* kf = keys.data_ptr<float>();
      float* vf = values.data_ptr<float>();
      for (int64_t j = 0; j < n; ++j) {
        const int64_t slot = static_cast<int64_t>(table[j / block_size]) * block_size +
                             j % block_size;
        const C* kp = kc + slot * kv_size;
        const C* vp = vc + slot * kv_size;
        for (int64_t h = 0; h < num_kv_heads_; ++h) {
          float* kd = kf + (h * n + j) * D;
          float* vd = vf + (h * n + j) * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) {
            kd[d] = to_f(kp[h * D + d]);
            vd[d] = to_f(vp[h * D + d]);
          }
        }
      }
      auto queries = torch::empty({num_kv_heads_, rows * group, D}, torch::kFloat32);
      float* qf = queries.data_ptr<float>();
      for (int64_t i = 0; i < rows; ++i) {
        const float* q = qkvp + (first + i) * width;
        for (int64_t h = 0; h < num_kv_heads_; ++h) {
          for (int64_t g = 0; g < group; ++g) {
            const float* src = q + (h * group + g) * D;
            float* dst = qf + ((h * rows + i) * group + g) * D;
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) dst[d] = src[d] * scale;
          }
        }
      }
      if (rows <= kRowWiseRows) {
        // A decode or a verify window: each row as the decode step of its position runs it (one
        // code path), the same shapes ([kv_heads, group, D] x [kv_heads, D, its keys]) and so
        // the same float sums.
        // NOTE: one batched matmul over the window's rows, with the later keys masked, sums in
        // another order; in bfloat16 activations that last bit can round a value the other way
        // and flip a greedy near-tie, so spec and no-spec text differed (2 of 16 code prompts
        // at k = 2, one at k = 4, on the int4 Qwen pair).
        for (int64_t i = 0; i < rows; ++i) {
          const int64_t seen = row_keys[first + i];
          auto q = queries.view({num_kv_heads_, rows, group, D}).select(1, i).contiguous();
          auto k = keys.narrow(1, 0, seen), v = values.narrow(1, 0, seen);
          auto mixed = at::bmm(at::softmax(at::bmm(q, k.transpose(1, 2)), -1), v);
          const float* mp = mixed.data_ptr<float>();  // [kv_heads, group, D]
          float* o = out + (first + i) * q_size;
          for (int64_t h = 0; h < num_kv_heads_; ++h) {
            std::copy_n(mp + h * group * D, group * D, o + h * group * D);
          }
        }
        return;
      }
      auto scores = at::bmm(queries, keys.transpose(1, 2));  // [kv_heads, rows * group, n]
      float* sp = scores.data_ptr<float>();
      const float masked = -std::numeric_limits<float>::infinity();
      for (int64_t h = 0; h < num_kv_heads_; ++h) {
        for (int64_t i = 0; i < rows; ++i) {
          const int64_t seen = row_keys[first + i];
          for (int64_t g = 0; g < group; ++g) {
            float* row = sp + ((h * rows + i) * group + g) * n;
            for (int64_t j = seen; j < n; ++j) row[j] = masked;
          }
        }
      }
      auto mixed = at::bmm(at::softmax(scores, -1), values);  // [kv_heads, rows * group, D]
      const float* mp = mixed.data_ptr<float>();
      for (int64_t i = 0; i < rows; ++i) {
        float* o = out + (first + i) * q_size;
        for (int64_t h = 0; h < num_kv_heads_; ++h) {
          for (int64_t g = 0; g < group; ++g) {
            std::copy_n(mp + ((h * rows + i) * group + g) * D, D, o + (h * group + g) * D);
          }
        }
      }
    };
    if (S == 1 || at::get_num_threads() <= 1) {
      for (int64_t s = 0; s < S; ++s) attend(s);
    } else {  // NOTE: each sequence's ops then run on one thread
      at::parallel_for(0, S, 1, [&](int64_t begin, int64_t end) {
        for (int64_t s = begin; s < end; ++s) attend(s);
      });
    }
  }

  int64_t num_heads_, num_kv_heads_, head_dim_;
  int64_t hidden_ = 0;
  float eps_;
  bool split_dynamic_;
  torch::Tensor rope_cos_, rope_sin_;
  std::vector<Layer> layers_;
  torch::Tensor embed_packed_, embed_scales_, embed_zero_;  // undefined: no embedding set
  int64_t embed_group_ = 0, embed_real_ = 0;
  bool embed_bf16_ = false;
  torch::Tensor head_norm_;
  Projection head_;  // undefined packed: no head set
  float head_eps_ = 0.f;
  bool head_bf16_ = false;
};

}  // namespace

void register_decoder(pybind11::module_& m) {
  m.def("decoder_rows_alone", &decoder_rows_alone,
        "whether every window's rows attend alone for this head_dim");
  pybind11::class_<CpuDecoder>(m, "CpuDecoder")
      .def(pybind11::init<int64_t, int64_t, int64_t, double, torch::Tensor, torch::Tensor, bool>(),
           pybind11::arg("num_heads"), pybind11::arg("num_kv_heads"), pybind11::arg("head_dim"),
           pybind11::arg("eps"), pybind11::arg("rope_cos"), pybind11::arg("rope_sin"),
           pybind11::arg("split_dynamic"))
      .def("add_layer", &CpuDecoder::add_layer)
      .def("forward", &CpuDecoder::forward)
      .def("set_embedding", &CpuDecoder::set_embedding)
      .def("set_head", &CpuDecoder::set_head)
      .def("has_embedding", &CpuDecoder::has_embedding)
      .def("has_head", &CpuDecoder::has_head)
      .def("embed", &CpuDecoder::embed)
      .def("forward_logits", &CpuDecoder::forward_logits);
}
