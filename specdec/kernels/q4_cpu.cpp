// Weight-only 4-bit matmul for the CPU: y[M, N] = x[M, K] @ W[N, K].T, W asymmetric 4-bit per
// group of 32 inputs (W = code * scale + zero_eff, code in 0..15), x quantized on the fly to int8
// per row and group of 32 (llama.cpp's Q8_0), the dot products of each group exact in int32
// (AVX512-VNNI vpdpbusd: unsigned 4-bit codes x signed int8 activations), combined in float32:
//
//   y[m, n] = sum_g  scale[n, g] * dx[m, g] * sum_{k in g} code[n, k] * q[m, k]
//                  + zero_eff[n, g] * xsum[m, g]          (xsum: the float sum of x over the group)
//
// Each weight is read once for all M rows: the loop runs over tiles of 16 output columns (split
// across threads), and for each tile over chunks of at most 8 rows, so a tile's bytes come from
// DRAM once and from L1/L2 after that.
//
// Packed layout (see q4_cpu.py, q4_pack): packed [N/16, G, 4, 64] uint8, G = K/32. In a tile and
// group, chunk c holds dpbusd steps 2c (low nibbles) and 2c+1 (high nibbles); in step s the byte
// j*4 + b is code[n0 + j, g*32 + 4s + b]. scale_zero [N/16, G, 2, 16] bfloat16 (scales, then
// effective zeros, of the tile's 16 columns).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define SPECDEC_Q4_VNNI 1
#include <immintrin.h>
#else
#define SPECDEC_Q4_VNNI 0
#endif

namespace {

constexpr int kGroup = 32;
constexpr int kTile = 16;
constexpr int kTileGroupBytes = kTile * kGroup / 2;  // 256
constexpr int kRowChunk = 8;

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

// x [M, K] float -> q [M, K] int8, dx [M, G] (step), xsum [M, G] (float sum of the group).
void quantize_rows(const float* x, int64_t M, int64_t K, int8_t* q, float* dx, float* xsum) {
  const int64_t G = K / kGroup;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t g = 0; g < G; ++g) {
      const float* xg = x + m * K + g * kGroup;
      float amax = 0.f, sum = 0.f;
      for (int i = 0; i < kGroup; ++i) {
        amax = std::fmax(amax, std::fabs(xg[i]));
        sum += xg[i];
      }
      const float step = amax / 127.f;
      int8_t* qg = q + m * K + g * kGroup;
      for (int i = 0; i < kGroup; ++i) {
        qg[i] = step > 0.f ? static_cast<int8_t>(std::nearbyint(xg[i] / step)) : 0;
      }
      dx[m * G + g] = step;
      xsum[m * G + g] = sum;
    }
  }
}

// One tile of 16 columns, rows [0, MR) of the given row pointers; plain C++ (any CPU).
void tile_scalar(int MR, const uint8_t* w, const uint16_t* sz, const int8_t* q, const float* dx,
                 const float* xsum, int64_t K, int64_t G, float* y, int64_t ldy) {
  for (int m = 0; m < MR; ++m) {
    float acc[kTile] = {0.f};
    for (int64_t g = 0; g < G; ++g) {
      const uint8_t* wg = w + g * kTileGroupBytes;
      const int8_t* qg = q + m * K + g * kGroup;
      int32_t isum[kTile] = {0};
      for (int c = 0; c < 4; ++c) {
        for (int p = 0; p < 64; ++p) {
          const int j = p / 4, b = p % 4;
          const uint8_t byte = wg[c * 64 + p];
          isum[j] += static_cast<int32_t>(byte & 0x0F) * qg[8 * c + b];
          isum[j] += static_cast<int32_t>(byte >> 4) * qg[8 * c + 4 + b];
        }
      }
      const uint16_t* szg = sz + g * 2 * kTile;
      for (int j = 0; j < kTile; ++j) {
        acc[j] += static_cast<float>(isum[j]) * (bf16_to_float(szg[j]) * dx[m * G + g]);
        acc[j] += bf16_to_float(szg[kTile + j]) * xsum[m * G + g];
      }
    }
    for (int j = 0; j < kTile; ++j) y[m * ldy + j] = acc[j];
  }
}

#if SPECDEC_Q4_VNNI
inline __m512 load_bf16x16(const uint16_t* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

template <int MR>
void tile_vnni(const uint8_t* w, const uint16_t* sz, const int8_t* q, const float* dx,
               const float* xsum, int64_t K, int64_t G, float* y, int64_t ldy) {
  // NOTE: vpdpbusd has a latency of several cycles; with few rows one accumulator chain per
  // row would leave the unit idle, so small MR spreads the 8 steps of a group over CH chains.
  constexpr int CH = MR <= 2 ? 4 : (MR <= 4 ? 2 : 1);
  const __m512i low_mask = _mm512_set1_epi8(0x0F);
  __m512 acc[MR];
  for (int m = 0; m < MR; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const uint8_t* wg = w + g * kTileGroupBytes;
    __m512i isum[MR][CH];
    for (int m = 0; m < MR; ++m)
      for (int h = 0; h < CH; ++h) isum[m][h] = _mm512_setzero_si512();
    for (int c = 0; c < 4; ++c) {
      const __m512i raw = _mm512_loadu_si512(wg + c * 64);
      const __m512i lo = _mm512_and_si512(raw, low_mask);
      const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low_mask);
      for (int m = 0; m < MR; ++m) {
        const int8_t* qm = q + m * K + g * kGroup + 8 * c;
        int32_t q_lo, q_hi;
        std::memcpy(&q_lo, qm, 4);
        std::memcpy(&q_hi, qm + 4, 4);
        __m512i& a = isum[m][(2 * c) % CH];
        a = _mm512_dpbusd_epi32(a, lo, _mm512_set1_epi32(q_lo));
        __m512i& b = isum[m][(2 * c + 1) % CH];
        b = _mm512_dpbusd_epi32(b, hi, _mm512_set1_epi32(q_hi));
      }
    }
    const uint16_t* szg = sz + g * 2 * kTile;
    const __m512 scale = load_bf16x16(szg);
    const __m512 zero = load_bf16x16(szg + kTile);
    for (int m = 0; m < MR; ++m) {
      __m512i total = isum[m][0];
      for (int h = 1; h < CH; ++h) total = _mm512_add_epi32(total, isum[m][h]);
      const __m512 step = _mm512_mul_ps(scale, _mm512_set1_ps(dx[m * G + g]));
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(total), step, acc[m]);
      acc[m] = _mm512_fmadd_ps(zero, _mm512_set1_ps(xsum[m * G + g]), acc[m]);
    }
  }
  for (int m = 0; m < MR; ++m) _mm512_storeu_ps(y + m * ldy, acc[m]);
}

void tile_dispatch(int MR, const uint8_t* w, const uint16_t* sz, const int8_t* q,
                   const float* dx, const float* xsum, int64_t K, int64_t G, float* y,
                   int64_t ldy) {
  switch (MR) {
    case 1: tile_vnni<1>(w, sz, q, dx, xsum, K, G, y, ldy); break;
    case 2: tile_vnni<2>(w, sz, q, dx, xsum, K, G, y, ldy); break;
    case 3: tile_vnni<3>(w, sz, q, dx, xsum, K, G, y, ldy); break;
    case 4: tile_vnni<4>(w, sz, q, dx, xsum, K, G, y, ldy); break;
    case 5: tile_vnni<5>(w, sz, q, dx, xsum, K, G, y, ldy); break;
    case 6: tile_vnni<6>(w, sz, q, dx, xsum, K, G, y, ldy); break;
    case 7: tile_vnni<7>(w, sz, q, dx, xsum, K, G, y, ldy); break;
    default: tile_vnni<8>(w, sz, q, dx, xsum, K, G, y, ldy); break;
  }
}
#endif

}  // namespace

bool q4_has_vnni() { return SPECDEC_Q4_VNNI != 0; }

// x [M, K] (any float dtype), packed [N/16, G, 4, 64] uint8, scale_zero [N/16, G, 2, 16] bf16
// -> y [M, N] float32. use_simd=false forces the plain C++ path (for tests).
torch::Tensor q4_linear(torch::Tensor x, torch::Tensor packed, torch::Tensor scale_zero,
                        bool use_simd) {
  TORCH_CHECK(x.dim() == 2, "q4_linear: x must be 2-D, got ", x.dim(), "-D");
  TORCH_CHECK(packed.dtype() == torch::kUInt8 && packed.dim() == 4 && packed.size(2) == 4 &&
                  packed.size(3) == 64 && packed.is_contiguous(),
              "q4_linear: packed must be contiguous uint8 [N/16, K/32, 4, 64]");
  TORCH_CHECK(scale_zero.dtype() == torch::kBFloat16 && scale_zero.is_contiguous(),
              "q4_linear: scale_zero must be contiguous bfloat16 [N/16, K/32, 2, 16]");
  const int64_t M = x.size(0), K = x.size(1);
  const int64_t tiles = packed.size(0), G = packed.size(1);
  TORCH_CHECK(G * kGroup == K, "q4_linear: x has in_features=", K, ", the weight ", G * kGroup);
  const int64_t N = tiles * kTile;
  auto xf = x.to(torch::kFloat32).contiguous();
  auto q = torch::empty({M, K}, torch::kInt8);
  auto dx = torch::empty({M, G}, torch::kFloat32);
  auto xsum = torch::empty({M, G}, torch::kFloat32);
  quantize_rows(xf.data_ptr<float>(), M, K, q.data_ptr<int8_t>(), dx.data_ptr<float>(),
                xsum.data_ptr<float>());
  auto y = torch::empty({M, N}, torch::kFloat32);
  const uint8_t* w = packed.data_ptr<uint8_t>();
  const uint16_t* sz = reinterpret_cast<const uint16_t*>(scale_zero.data_ptr<at::BFloat16>());
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* dxp = dx.data_ptr<float>();
  const float* xsp = xsum.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const bool simd = use_simd && SPECDEC_Q4_VNNI;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const uint8_t* wt = w + t * G * kTileGroupBytes;
      const uint16_t* szt = sz + t * G * 2 * kTile;
      for (int64_t m0 = 0; m0 < M; m0 += kRowChunk) {
        const int MR = static_cast<int>(std::min<int64_t>(kRowChunk, M - m0));
        float* yt = yp + m0 * N + t * kTile;
#if SPECDEC_Q4_VNNI
        if (simd) {
          tile_dispatch(MR, wt, szt, qp + m0 * K, dxp + m0 * G, xsp + m0 * G, K, G, yt, N);
          continue;
        }
#endif
        tile_scalar(MR, wt, szt, qp + m0 * K, dxp + m0 * G, xsp + m0 * G, K, G, yt, N);
      }
    }
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("q4_linear", &q4_linear, "4-bit weight x int8 activation matmul (CPU)");
  m.def("q4_has_vnni", &q4_has_vnni, "whether the AVX512-VNNI path was compiled");
}
