// Weight-only 4-bit matmul for the CPU: y[M, N] = x[M, K] @ W[N, K].T, W asymmetric 4-bit per
// group of 32 inputs (W = code * scale + zero_eff, code in 0..15), x quantized on the fly to int8
// per row and group of 32 (llama.cpp's Q8_0), the dot products of each group exact in int32
// (AVX512-VNNI vpdpbusd: unsigned 4-bit codes x signed int8 activations; AVX2 vpmaddubsw where
// there is no VNNI; plain C++ anywhere), combined in float32:
//
//   y[m, n] = sum_g  scale[n, g] * dx[m, g] * sum_{k in g} code[n, k] * q[m, k]
//                  + zero_eff[n, g] * xsum[m, g]          (xsum: the float sum of x over the group)
//
// Each weight is read once for all M rows: the loop runs over tiles of 16 output columns (split
// across threads), and for each tile over chunks of at most 8 rows, so a tile's bytes come from
// DRAM once and from L1/L2 after that. With several rows the loop is compute-bound (per group
// and row: 8 vpdpbusd + 4 float ops), so a software prefetch keeps DRAM streaming meanwhile.
//
// Packed layout (see q4_cpu.py, q4_pack): packed [N/16, G, 4, 64] uint8, G = K/32. In a tile and
// group, chunk c holds dpbusd steps 2c (low nibbles) and 2c+1 (high nibbles); in step s the byte
// j*4 + b is code[n0 + j, g*32 + 4s + b]. scale_zero [N/16, G, 2, 16] bfloat16 (scales, then
// effective zeros, of the tile's 16 columns).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define SPECDEC_Q4_VNNI 1
#else
#define SPECDEC_Q4_VNNI 0
#endif
#if defined(__AVX2__) && defined(__FMA__)
#define SPECDEC_Q4_AVX2 1
#else
#define SPECDEC_Q4_AVX2 0
#endif
#if SPECDEC_Q4_VNNI || SPECDEC_Q4_AVX2
#include <immintrin.h>
#endif

namespace {

constexpr int kGroup = 32;
constexpr int kTile = 16;
constexpr int kTileGroupBytes = kTile * kGroup / 2;  // 256
constexpr int kRowChunk = 8;       // rows per pass over a tile (VNNI, scalar)
constexpr int kRowChunkAvx2 = 4;   // AVX2 has 16 vector registers, not 32
// NOTE: measured on the Zen 4 dev VM (1 thread, 8960x1536, weights from DRAM): without it the
// multi-row calls were compute + memory (5 rows 1.85x one row), with it 1.3x; 2 KiB (8 groups
// ahead) and 4 KiB did the same. Tiles are contiguous, so the prefetch runs into the next one.
constexpr int kPrefetchBytes = 2048;
// Tiles a thread takes at a time from the shared counter (64 tiles of a K=1536 layer: 960 KiB).
constexpr int64_t kBlockTiles = 64;
// Below this many weight bytes x rows a call runs on the calling thread alone.
constexpr int64_t kMinSplitBytes = 256 << 10;

// Which inner loop runs: the plain C++ one, AVX2, or AVX512-VNNI.
enum Isa : int64_t { kScalar = 0, kAvx2 = 1, kVnni = 2 };

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

inline float to_float(float v) { return v; }
inline float to_float(at::BFloat16 v) { return static_cast<float>(v); }

// x [M, K] -> q [M, K] int8, dx [M, G] (step), xsum [M, G] (float sum of the group).
// q = round-half-even(x / dx), dx = max|x| / 127, as q4_cpu.quantize_activations does.
template <typename T>
void quantize_rows_scalar(const T* x, int64_t M, int64_t K, int8_t* q, float* dx, float* xsum) {
  const int64_t G = K / kGroup;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t g = 0; g < G; ++g) {
      const T* xg = x + m * K + g * kGroup;
      float amax = 0.f, sum = 0.f;
      for (int i = 0; i < kGroup; ++i) {
        const float v = to_float(xg[i]);
        amax = std::fmax(amax, std::fabs(v));
        sum += v;
      }
      const float step = amax / 127.f;
      int8_t* qg = q + m * K + g * kGroup;
      for (int i = 0; i < kGroup; ++i) {
        qg[i] = step > 0.f ? static_cast<int8_t>(std::nearbyint(to_float(xg[i]) / step)) : 0;
      }
      dx[m * G + g] = step;
      xsum[m * G + g] = sum;
    }
  }
}

#if SPECDEC_Q4_VNNI
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// The same as quantize_rows_scalar, 32 inputs at a time (the division is IEEE in both, and
// _mm512_cvtps_epi32 rounds half to even under the default MXCSR, as nearbyint does).
template <typename T>
void quantize_rows(const T* x, int64_t M, int64_t K, int8_t* q, float* dx, float* xsum) {
  const int64_t G = K / kGroup;
  const __m512 sign = _mm512_set1_ps(-0.f);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t g = 0; g < G; ++g) {
      const T* xg = x + m * K + g * kGroup;
      const __m512 a = load16(xg), b = load16(xg + 16);
      const float amax = _mm512_reduce_max_ps(
          _mm512_max_ps(_mm512_andnot_ps(sign, a), _mm512_andnot_ps(sign, b)));
      const float step = amax / 127.f;
      int8_t* qg = q + m * K + g * kGroup;
      if (step > 0.f) {
        const __m512 s = _mm512_set1_ps(step);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(qg),
                         _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_div_ps(a, s))));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(qg + 16),
                         _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_div_ps(b, s))));
      } else {
        std::memset(qg, 0, kGroup);
      }
      dx[m * G + g] = step;
      xsum[m * G + g] = _mm512_reduce_add_ps(_mm512_add_ps(a, b));
    }
  }
}
#else
template <typename T>
void quantize_rows(const T* x, int64_t M, int64_t K, int8_t* q, float* dx, float* xsum) {
  quantize_rows_scalar(x, M, K, q, dx, xsum);
}
#endif

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

#if SPECDEC_Q4_VNNI || SPECDEC_Q4_AVX2
inline void prefetch_group(const uint8_t* wg, const uint16_t* szg) {
  for (int line = 0; line < kTileGroupBytes; line += 64)
    _mm_prefetch(reinterpret_cast<const char*>(wg + kPrefetchBytes + line), _MM_HINT_T0);
  // scale_zero: 64 bytes a group against the weights' 256
  _mm_prefetch(reinterpret_cast<const char*>(szg) + kPrefetchBytes / 4, _MM_HINT_T0);
}

inline int32_t load4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
#endif

#if SPECDEC_Q4_VNNI
inline __m512 load_bf16x16(const uint16_t* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// Per group and row: 8 vpdpbusd (16 columns x 4 inputs each), then one convert, one multiply
// (scale x dx) and two FMAs. The 4 weight vectors are unpacked once for all MR rows.
template <int MR>
void tile_vnni(const uint8_t* __restrict w, const uint16_t* __restrict sz,
               const int8_t* __restrict q, const float* __restrict dx,
               const float* __restrict xsum, int64_t K, int64_t G, float* __restrict y,
               int64_t ldy) {
  // NOTE: vpdpbusd has a latency of several cycles; with few rows one accumulator chain per
  // row would leave the unit idle, so small MR spreads the 8 steps of a group over CH chains.
  constexpr int CH = MR <= 2 ? 4 : (MR <= 6 ? 2 : 1);
  const __m512i low_mask = _mm512_set1_epi8(0x0F);
  __m512 acc[MR];
  for (int m = 0; m < MR; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const uint8_t* wg = w + g * kTileGroupBytes;
    const uint16_t* szg = sz + g * 2 * kTile;
    prefetch_group(wg, szg);
    __m512i isum[MR][CH];
    for (int m = 0; m < MR; ++m)
      for (int h = 0; h < CH; ++h) isum[m][h] = _mm512_setzero_si512();
    for (int c = 0; c < 4; ++c) {
      const __m512i raw = _mm512_loadu_si512(wg + c * 64);
      const __m512i lo = _mm512_and_si512(raw, low_mask);
      const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low_mask);
      for (int m = 0; m < MR; ++m) {
        const int8_t* qm = q + m * K + g * kGroup + 8 * c;
        __m512i& a = isum[m][(2 * c) % CH];
        a = _mm512_dpbusd_epi32(a, lo, _mm512_set1_epi32(load4(qm)));
        __m512i& b = isum[m][(2 * c + 1) % CH];
        b = _mm512_dpbusd_epi32(b, hi, _mm512_set1_epi32(load4(qm + 4)));
      }
    }
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

void tile_dispatch_vnni(int MR, const uint8_t* w, const uint16_t* sz, const int8_t* q,
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

#if SPECDEC_Q4_AVX2
inline __m256 load_bf16x8(const uint16_t* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

// AVX2 (no VNNI): per half tile of 8 columns, vpmaddubsw gives int16 sums of 2 products
// (|15 * 127 * 2| = 3810), 8 of them add up in int16 without overflow (30480 < 32767), and one
// vpmaddwd with ones widens the group's sums to int32: exact, as in the VNNI path.
template <int MR>
void tile_avx2(const uint8_t* __restrict w, const uint16_t* __restrict sz,
               const int8_t* __restrict q, const float* __restrict dx,
               const float* __restrict xsum, int64_t K, int64_t G, float* __restrict y,
               int64_t ldy) {
  const __m256i low_mask = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  for (int half = 0; half < 2; ++half) {
    __m256 acc[MR];
    for (int m = 0; m < MR; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
      const uint8_t* wg = w + g * kTileGroupBytes + 32 * half;
      const uint16_t* szg = sz + g * 2 * kTile;
      if (half == 0) prefetch_group(wg, szg);
      __m256i isum[MR];
      for (int m = 0; m < MR; ++m) isum[m] = _mm256_setzero_si256();
      for (int c = 0; c < 4; ++c) {
        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + c * 64));
        const __m256i lo = _mm256_and_si256(raw, low_mask);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low_mask);
        for (int m = 0; m < MR; ++m) {
          const int8_t* qm = q + m * K + g * kGroup + 8 * c;
          isum[m] = _mm256_add_epi16(
              isum[m], _mm256_maddubs_epi16(lo, _mm256_set1_epi32(load4(qm))));
          isum[m] = _mm256_add_epi16(
              isum[m], _mm256_maddubs_epi16(hi, _mm256_set1_epi32(load4(qm + 4))));
        }
      }
      const __m256 scale = load_bf16x8(szg + 8 * half);
      const __m256 zero = load_bf16x8(szg + kTile + 8 * half);
      for (int m = 0; m < MR; ++m) {
        const __m256 total = _mm256_cvtepi32_ps(_mm256_madd_epi16(isum[m], ones));
        const __m256 step = _mm256_mul_ps(scale, _mm256_set1_ps(dx[m * G + g]));
        acc[m] = _mm256_fmadd_ps(total, step, acc[m]);
        acc[m] = _mm256_fmadd_ps(zero, _mm256_set1_ps(xsum[m * G + g]), acc[m]);
      }
    }
    for (int m = 0; m < MR; ++m) _mm256_storeu_ps(y + m * ldy + 8 * half, acc[m]);
  }
}

void tile_dispatch_avx2(int MR, const uint8_t* w, const uint16_t* sz, const int8_t* q,
                        const float* dx, const float* xsum, int64_t K, int64_t G, float* y,
                        int64_t ldy) {
  switch (MR) {
    case 1: tile_avx2<1>(w, sz, q, dx, xsum, K, G, y, ldy); break;
    case 2: tile_avx2<2>(w, sz, q, dx, xsum, K, G, y, ldy); break;
    case 3: tile_avx2<3>(w, sz, q, dx, xsum, K, G, y, ldy); break;
    default: tile_avx2<4>(w, sz, q, dx, xsum, K, G, y, ldy); break;
  }
}
#endif

// Helper threads that take blocks of tiles from a shared counter, with no barrier: the calling
// thread works too and then waits only for blocks a helper has claimed. On a loaded machine (the
// dev VM runs ~10 jobs on 2 cores) an OpenMP region waits at its barrier for every thread to be
// scheduled, ~20 ms a call; here a helper that wakes late finds the work done and goes back.
// `state` packs the call's generation (high 24 bits) with the next unclaimed tile (low 40), so a
// late helper's claim of an older call fails.
class TilePool {
 public:
  using Fn = std::function<void(int64_t, int64_t)>;

  void run(int64_t tiles, int64_t block, int helpers, const Fn& fn) {
    std::lock_guard<std::mutex> serial(call_mutex_);  // one call at a time uses the pool
    ensure(helpers);
    const uint64_t gen = (state_.load() >> kIndexBits) + 1;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      fn_.store(&fn);
      tiles_.store(tiles);
      block_.store(block);
      helpers_wanted_ = helpers;
      done_.store(0);
      state_.store(gen << kIndexBits);
    }
    wake_.notify_all();
    work(gen);
    while (done_.load(std::memory_order_acquire) < tiles) std::this_thread::yield();
  }

 private:
  static constexpr int kIndexBits = 40;
  static constexpr uint64_t kIndexMask = (uint64_t{1} << kIndexBits) - 1;

  // Claims and runs blocks of call `gen` until none is left. A claim succeeds only while the
  // call is current, so fn_, tiles_ and block_ read after it are that call's.
  void work(uint64_t gen) {
    uint64_t s = state_.load();
    while ((s >> kIndexBits) == gen && static_cast<int64_t>(s & kIndexMask) < tiles_.load()) {
      const int64_t begin = static_cast<int64_t>(s & kIndexMask);
      const int64_t block = block_.load();
      if (!state_.compare_exchange_weak(s, s + block)) continue;
      const int64_t end = std::min(tiles_.load(), begin + block);
      (*fn_.load())(begin, end);
      done_.fetch_add(end - begin, std::memory_order_release);
      s = state_.load();
    }
  }

  void ensure(int helpers) {
    while (static_cast<int>(threads_.size()) < helpers) {
      const int id = static_cast<int>(threads_.size());
      threads_.emplace_back([this, id] { loop(id); });
      threads_.back().detach();
    }
  }

  void loop(int id) {
    uint64_t seen = 0;
    for (;;) {
      uint64_t gen;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return (state_.load() >> kIndexBits) != seen; });
        gen = state_.load() >> kIndexBits;
        seen = gen;
        if (id >= helpers_wanted_) continue;
      }
      work(gen);
    }
  }

  std::mutex call_mutex_, mutex_;
  std::condition_variable wake_;
  std::atomic<uint64_t> state_{0};
  std::atomic<int64_t> done_{0};
  std::atomic<const Fn*> fn_{nullptr};
  std::atomic<int64_t> tiles_{0}, block_{1};
  int helpers_wanted_ = 0;
  std::vector<std::thread> threads_;
};

TilePool& tile_pool() {
  static TilePool* pool = new TilePool();  // never destroyed: helpers outlive static teardown
  return *pool;
}

int64_t best_isa() {
  if (SPECDEC_Q4_VNNI) return kVnni;
  if (SPECDEC_Q4_AVX2) return kAvx2;
  return kScalar;
}

}  // namespace

bool q4_has_vnni() { return SPECDEC_Q4_VNNI != 0; }

// The inner loops compiled in, best first: "avx512vnni", "avx2", "scalar" (always).
std::vector<std::string> q4_isas() {
  std::vector<std::string> out;
  if (SPECDEC_Q4_VNNI) out.push_back("avx512vnni");
  if (SPECDEC_Q4_AVX2) out.push_back("avx2");
  out.push_back("scalar");
  return out;
}

// q4_linear's work, its y [M, N] float32 written at y with a row stride of ldy (>= N): the
// decoder stack's lm_head writes straight into a wider logits row.
void q4_linear_into(torch::Tensor x, const torch::Tensor& packed,
                    const torch::Tensor& scale_zero, int64_t isa, bool split_dynamic, float* yp,
                    int64_t ldy) {
  TORCH_CHECK(x.dim() == 2, "q4_linear: x must be 2-D, got ", x.dim(), "-D");
  TORCH_CHECK(packed.dtype() == torch::kUInt8 && packed.dim() == 4 && packed.size(2) == 4 &&
                  packed.size(3) == 64 && packed.is_contiguous(),
              "q4_linear: packed must be contiguous uint8 [N/16, K/32, 4, 64]");
  const int64_t M = x.size(0), K = x.size(1);
  const int64_t tiles = packed.size(0), G = packed.size(1);
  TORCH_CHECK(scale_zero.dtype() == torch::kBFloat16 && scale_zero.is_contiguous() &&
                  scale_zero.dim() == 4 && scale_zero.size(0) == tiles &&
                  scale_zero.size(1) == G && scale_zero.size(2) == 2 &&
                  scale_zero.size(3) == kTile,
              "q4_linear: scale_zero must be contiguous bfloat16 [N/16, K/32, 2, 16] = [",
              tiles, ", ", G, ", 2, 16], got ", scale_zero.sizes());
  TORCH_CHECK(G * kGroup == K, "q4_linear: x has in_features=", K, ", the weight ", G * kGroup);
  if (isa < 0) isa = best_isa();
  TORCH_CHECK(isa == kScalar || (isa == kAvx2 && SPECDEC_Q4_AVX2) ||
                  (isa == kVnni && SPECDEC_Q4_VNNI),
              "q4_linear: isa=", isa, " is not compiled in (best: ", best_isa(), ")");
  const int64_t N = tiles * kTile;
  TORCH_CHECK(ldy >= N, "q4_linear: output row stride ", ldy, " < N=", N);
  if (M == 0 || N == 0) return;
  if (x.scalar_type() != torch::kFloat32 && x.scalar_type() != torch::kBFloat16) {
    x = x.to(torch::kFloat32);
  }
  x = x.contiguous();
  // NOTE: plain vectors, not tensors: for a one-row call the allocations showed in profiles.
  std::vector<int8_t> q(M * K);
  std::vector<float> dx(M * G), xsum(M * G);
  if (x.scalar_type() == torch::kBFloat16) {
    if (isa == kScalar) {
      quantize_rows_scalar(x.data_ptr<at::BFloat16>(), M, K, q.data(), dx.data(), xsum.data());
    } else {
      quantize_rows(x.data_ptr<at::BFloat16>(), M, K, q.data(), dx.data(), xsum.data());
    }
  } else if (isa == kScalar) {
    quantize_rows_scalar(x.data_ptr<float>(), M, K, q.data(), dx.data(), xsum.data());
  } else {
    quantize_rows(x.data_ptr<float>(), M, K, q.data(), dx.data(), xsum.data());
  }
  const uint8_t* w = packed.data_ptr<uint8_t>();
  const uint16_t* sz = reinterpret_cast<const uint16_t*>(scale_zero.data_ptr<at::BFloat16>());
  const int8_t* qp = q.data();
  const float* dxp = dx.data();
  const float* xsp = xsum.data();
  const int64_t chunk = isa == kAvx2 ? kRowChunkAvx2 : kRowChunk;
  auto run_tiles = [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const uint8_t* wt = w + t * G * kTileGroupBytes;
      const uint16_t* szt = sz + t * G * 2 * kTile;
      for (int64_t m0 = 0; m0 < M; m0 += chunk) {
        const int MR = static_cast<int>(std::min<int64_t>(chunk, M - m0));
        float* yt = yp + m0 * ldy + t * kTile;
        const int8_t* qt = qp + m0 * K;
#if SPECDEC_Q4_VNNI
        if (isa == kVnni) {
          tile_dispatch_vnni(MR, wt, szt, qt, dxp + m0 * G, xsp + m0 * G, K, G, yt, ldy);
          continue;
        }
#endif
#if SPECDEC_Q4_AVX2
        if (isa == kAvx2) {
          tile_dispatch_avx2(MR, wt, szt, qt, dxp + m0 * G, xsp + m0 * G, K, G, yt, ldy);
          continue;
        }
#endif
        tile_scalar(MR, wt, szt, qt, dxp + m0 * G, xsp + m0 * G, K, G, yt, ldy);
      }
    }
  };
  // NOTE: small layers (k_proj: 16 tiles, 200 KB) are not worth waking a helper for.
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), tiles);
  const bool small = tiles * G * kTileGroupBytes * std::max<int64_t>(1, M) < kMinSplitBytes;
  if (threads <= 1 || small) {
    run_tiles(0, tiles);
  } else if (!split_dynamic) {
    at::parallel_for(0, tiles, 1, run_tiles);
  } else {
    const int64_t block =
        std::max<int64_t>(1, std::min<int64_t>(kBlockTiles, tiles / (4 * threads)));
    tile_pool().run(tiles, block, static_cast<int>(threads - 1), run_tiles);
  }
}

// x [M, K] (float32 or bfloat16 read as they are; other float dtypes converted), packed
// [N/16, G, 4, 64] uint8, scale_zero [N/16, G, 2, 16] bf16 -> y [M, N] float32.
// isa: 0 plain C++, 1 AVX2, 2 AVX512-VNNI, -1 the best compiled in. split_dynamic: helper
// threads take blocks of tiles from a shared counter, no barrier (TilePool); else
// at::parallel_for's static split. Either way at::get_num_threads() threads at most.
torch::Tensor q4_linear(torch::Tensor x, torch::Tensor packed, torch::Tensor scale_zero,
                        int64_t isa, bool split_dynamic) {
  const int64_t M = x.dim() == 2 ? x.size(0) : 0;
  auto y = torch::empty({M, packed.dim() == 4 ? packed.size(0) * kTile : 0}, torch::kFloat32);
  q4_linear_into(x, packed, scale_zero, isa, split_dynamic, y.data_ptr<float>(), y.size(1));
  return y;
}

void register_decoder(pybind11::module_& m);  // decoder_cpu.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("q4_linear", &q4_linear, "4-bit weight x int8 activation matmul (CPU)",
        py::arg("x"), py::arg("packed"), py::arg("scale_zero"), py::arg("isa"),
        py::arg("split_dynamic") = true);
  m.def("q4_has_vnni", &q4_has_vnni, "whether the AVX512-VNNI path was compiled");
  m.def("q4_isas", &q4_isas, "the inner loops compiled in, best first");
  register_decoder(m);
}
