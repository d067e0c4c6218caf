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
// same values as a one-row decode of it.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

torch::Tensor q4_linear(torch::Tensor x, torch::Tensor packed, torch::Tensor scale_zero,
                        int64_t isa, bool split_dynamic);

namespace {

// Windows of at most this many rows (decodes and verify steps; longer ones are prefill chunks)
// attend row by row, so a verify row's attention is the decode step's to the bit.
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

// Rotary embedding of one head in place, half-split layout: (x1, x2) -> (x1 c - x2 s, x2 c + x1 s)
inline void rotate(float* x, const float* cos, const float* sin, int64_t half) {
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = x[i], x2 = x[i + half];
    x[i] = x1 * cos[i] - x2 * sin[i];
    x[i + half] = x2 * cos[i] + x1 * sin[i];
  }
}

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
      // NOTE: ATen's silu (vectorized exp), as the layer loop's F.silu; a scalar std::exp
      // loop cost ~0.1 ms a layer
      auto act = at::silu(gate_up.narrow(1, 0, inter)).mul_(gate_up.narrow(1, inter, inter));
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
};

}  // namespace

void register_decoder(pybind11::module_& m) {
  pybind11::class_<CpuDecoder>(m, "CpuDecoder")
      .def(pybind11::init<int64_t, int64_t, int64_t, double, torch::Tensor, torch::Tensor, bool>(),
           pybind11::arg("num_heads"), pybind11::arg("num_kv_heads"), pybind11::arg("head_dim"),
           pybind11::arg("eps"), pybind11::arg("rope_cos"), pybind11::arg("rope_sin"),
           pybind11::arg("split_dynamic"))
      .def("add_layer", &CpuDecoder::add_layer)
      .def("forward", &CpuDecoder::forward);
}
