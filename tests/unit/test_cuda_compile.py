"""The CUDA sources without a GPU: a real nvcc compile, and a host emulation of the kernels.

1. Every cuda/*.cu compiles to PTX for sm_80 and sm_90 with warnings as errors, both as files
   (what a developer builds) and as the self-contained text that kernels.py hands to NVRTC.
2. The same kernel source is compiled with g++ against a tiny CUDA emulation (one std::thread
   per CUDA thread, barriers for __syncthreads and warp shuffles) and run on CPU tensors against
   the torch reference: it checks indexing, masking, online softmax, GQA and padding, i.e.
   everything except the fp16 PTX conversions and real memory behaviour.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from specdec.kernels import cupy as kernels
from tests.gpu.cases import WINDOW_MIXES, make_attention_case, relative_error

NVCC = shutil.which("nvcc")
GXX = shutil.which("g++")
SOURCES = sorted(p.name for p in kernels.CUDA_DIR.glob("*.cu"))
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH: no CUDA compile check")


def test_sources_listed() -> None:
    assert sorted(kernels.SOURCES) == SOURCES
    assert not (kernels.CUDA_DIR / "__init__.py").exists(), "cuda/ must not be a Python package"


def _nvcc_ptx(src: Path, arch: str, out: Path) -> str:
    cmd = [NVCC, "-ptx", f"-arch={arch}", "-std=c++17", "-Werror", "all-warnings",
           "-o", str(out), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
    assert proc.stderr.strip() == "", f"nvcc printed diagnostics:\n{proc.stderr}"
    ptx = out.read_text()
    assert ".entry" in ptx
    return ptx


@pytest.fixture(scope="module")
def file_ptx(tmp_path_factory):
    """PTX of cuda/<source> for an arch, compiled once per module (nvcc takes seconds)."""
    cache: dict[tuple[str, str], str] = {}
    out_dir = tmp_path_factory.mktemp("ptx")

    def compile_file(source: str, arch: str) -> str:
        if (source, arch) not in cache:
            cache[source, arch] = _nvcc_ptx(kernels.CUDA_DIR / source, arch,
                                            out_dir / f"{source}.{arch}.ptx")
        return cache[source, arch]
    return compile_file


@needs_nvcc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("source", SOURCES)
def test_nvcc_ptx(source: str, arch: str, file_ptx) -> None:
    file_ptx(source, arch)


@needs_nvcc
@pytest.mark.parametrize("source", SOURCES)
def test_nvrtc_text_is_self_contained(source: str, tmp_path: Path) -> None:
    text = kernels.read_source(source)
    assert not kernels._INCLUDE.search(text) and "#include <" not in text, "NVRTC gets no include path: inline every header"
    src = tmp_path / source
    src.write_text(text)
    _nvcc_ptx(src, "sm_90", tmp_path / "out.ptx")


@needs_nvcc
def test_every_kernel_name_is_defined(file_ptx) -> None:
    """kernels.py looks these names up; each must be an extern "C" entry in the PTX."""
    entries = "".join(file_ptx(source, "sm_90") for source in SOURCES)
    names = [f"paged_attention{kind}_{tag}_d{d}" for kind in ("", "_split", "_combine")
             for tag in kernels.DTYPE_TAGS.values() for d in kernels.HEAD_DIMS] + [f"write_kv_w{w}" for w in kernels.WRITE_KV_WORDS]
    names += [f"{op}_{tag}" for op in ("rms_norm", "silu_mul", "rope_kv")
              for tag in kernels.DTYPE_TAGS.values()]
    names += [f"{op}_{tag}" for op in kernels.LORA_KERNELS for tag in kernels.DTYPE_TAGS.values()]
    for name in names:
        assert f".entry {name}(" in entries, name


# ---------------------------------------------------------------------------------------------
# Host emulation

_PRELUDE = r"""
#include <cmath>
#include <cstring>
#include <memory>
#include <vector>
#include <ucontext.h>
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(x)
#define asm(...)  // fp16 PTX conversions are not emulated (fp16 is not run here)
// NOTE: CUDA threads are cooperative user-level contexts on one OS thread; a barrier yields to
// the scheduler until every participant has arrived, so no locks and no spinning cores.
struct EmuDim3 { unsigned x = 0, y = 0, z = 0; };
static EmuDim3 threadIdx, blockIdx, blockDim;
struct EmuBarrier { volatile int arrived = 0; volatile long long generation = 0; };
static ucontext_t emu_scheduler;
static ucontext_t* emu_contexts;
static int emu_current;
static EmuBarrier emu_block_bar;
static EmuBarrier emu_warp_bar[32];
static volatile float emu_shfl[2][32][32];
static int emu_shfl_parity[1024];
static void emu_yield() { swapcontext(&emu_contexts[emu_current], &emu_scheduler); }
static void emu_wait(EmuBarrier& bar, int count) {
  const long long gen = bar.generation;
  if (bar.arrived + 1 == count) { bar.arrived = 0; bar.generation = gen + 1; return; }
  bar.arrived = bar.arrived + 1;
  while (bar.generation == gen) emu_yield();
}
inline void __syncthreads() { emu_wait(emu_block_bar, blockDim.x); }
inline float __shfl_xor_sync(unsigned, float x, int offset) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int parity = emu_shfl_parity[threadIdx.x] ^= 1;  // double buffer: one barrier each
  emu_shfl[parity][warp][lane] = x;
  emu_wait(emu_warp_bar[warp], 32);
  return emu_shfl[parity][warp][lane ^ offset];
}
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline float __uint_as_float(unsigned i) { float f; std::memcpy(&f, &i, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned i; std::memcpy(&i, &f, 4); return i; }
"""

_EPILOGUE = r"""
static void (*emu_body)(void*);
static void* emu_arg;
static std::vector<char> emu_done;
static void emu_entry(int t) {
  emu_body(emu_arg);
  emu_done[t] = 1;
}
template <typename F>
static void emu_trampoline(void* f) { (*static_cast<F*>(f))(); }
template <typename F>
static void emu_run(int grid_x, int grid_y, int threads, F kernel, int grid_z = 1) {
  std::vector<ucontext_t> contexts(threads);
  std::vector<std::vector<char>> stacks(threads, std::vector<char>(1 << 16));
  emu_contexts = contexts.data();
  emu_body = &emu_trampoline<F>;
  emu_arg = &kernel;
  blockDim.x = threads;
  for (int z = 0; z < grid_z; ++z)
  for (int y = 0; y < grid_y; ++y) {
    for (int x = 0; x < grid_x; ++x) {
      emu_done.assign(threads, 0);
      std::memset(emu_shfl_parity, 0, sizeof(emu_shfl_parity));
      for (int t = 0; t < threads; ++t) {
        getcontext(&contexts[t]);
        contexts[t].uc_stack.ss_sp = stacks[t].data();
        contexts[t].uc_stack.ss_size = stacks[t].size();
        contexts[t].uc_link = &emu_scheduler;
        makecontext(&contexts[t], (void (*)())emu_entry, 1, t);
      }
      int remaining = threads;
      while (remaining > 0) {
        remaining = 0;
        for (int t = 0; t < threads; ++t) {
          if (emu_done[t]) continue;
          emu_current = t;
          threadIdx.x = t; blockIdx.x = x; blockIdx.y = y; blockIdx.z = z;
          swapcontext(&emu_scheduler, &contexts[t]);
          remaining += !emu_done[t];
        }
      }
    }
  }
}
#define EMU_PA(NAME, T)                                                                   \
  extern "C" void emu_##NAME(int gx, int gy, T* out, const T* q, const T* kc, const T* vc, \
      const int* bt, const int* sl, const int* qsl, int ns, int nh, int nkv, long long qs0, \
      long long qs1, int bs, int mb, float scale, int ro) {                                \
    emu_run(gx, gy, 128, [=] { NAME(out, q, kc, vc, bt, sl, qsl, ns, nh, nkv, qs0, qs1, bs, \
                                    mb, scale, ro); });                                    \
  }
EMU_PA(paged_attention_f32_d32, float)
EMU_PA(paged_attention_f32_d64, float)
EMU_PA(paged_attention_f32_d128, float)
EMU_PA(paged_attention_bf16_d64, specdec::bf16)
EMU_PA(paged_attention_bf16_d128, specdec::bf16)
#define EMU_SPLIT(TAG, T, D)                                                              \
  extern "C" void emu_split_##TAG##_d##D(int gx, int gy, int gz, float* pa, float* pm,     \
      float* ps, const T* q, const T* kc, const T* vc, const int* bt, const int* sl,        \
      const int* qsl, int nh, int nkv, long long qs0, long long qs1, int bs, int mb,       \
      float scale, int nsp) {                                                              \
    emu_run(gx, gy, 128, [=] { paged_attention_split_##TAG##_d##D(pa, pm, ps, q, kc, vc,   \
        bt, sl, qsl, nh, nkv, qs0, qs1, bs, mb, scale, nsp); }, gz);                        \
  }                                                                                       \
  extern "C" void emu_combine_##TAG##_d##D(int gx, int gy, T* out, const float* pa,        \
      const float* pm, const float* ps, const int* sl, const int* qsl, int ns, int nh,     \
      int nkv, int bs, int mb, int nsp, int sg, int ro) {                                  \
    emu_run(gx, gy, 128, [=] { paged_attention_combine_##TAG##_d##D(out, pa, pm, ps, sl,   \
        qsl, ns, nh, nkv, bs, mb, nsp, sg, ro); });                                        \
  }
EMU_SPLIT(f32, float, 32)
EMU_SPLIT(f32, float, 64)
EMU_SPLIT(bf16, specdec::bf16, 64)
#define EMU_KV(NAME, W)                                                                   \
  extern "C" void emu_##NAME(int gx, int threads, const W* k, const W* v, W* kc, W* vc,  \
      const long long* sm, long long ks, long long vs, int rw, long long ns) {            \
    emu_run(gx, 1, threads, [=] { NAME(k, v, kc, vc, sm, ks, vs, rw, ns); });             \
  }
EMU_KV(write_kv_w16, specdec::Word16)
EMU_KV(write_kv_w4, specdec::Word4)
EMU_KV(write_kv_w2, specdec::Word2)
#define EMU_FUSED(TAG, T)                                                                 \
  extern "C" void emu_rms_norm_##TAG(int gx, int threads, T* out, T* res, const T* x,      \
      const T* w, int hidden, long long xs, float eps, int add) {                          \
    emu_run(gx, 1, threads, [=] { rms_norm_##TAG(out, res, x, w, hidden, xs, eps, add); }); \
  }                                                                                       \
  extern "C" void emu_silu_mul_##TAG(int gx, int gy, T* out, const T* gu, int inter) {    \
    emu_run(gx, gy, 64, [=] { silu_mul_##TAG(out, gu, inter); });                         \
  }                                                                                       \
  extern "C" void emu_rope_kv_##TAG(int gx, int threads, T* q, const T* k, const T* v,    \
      T* kc, T* vc, const T* cos, const T* sin, const long long* sm, int nh, int nkv,      \
      int hd, long long qs, long long ks, long long vs, long long ns) {                    \
    emu_run(gx, 1, threads, [=] { rope_kv_##TAG(q, k, v, kc, vc, cos, sin, sm, nh, nkv, hd, \
                                               qs, ks, vs, ns); });                        \
  }
EMU_FUSED(f32, float)
EMU_FUSED(bf16, specdec::bf16)
"""


@pytest.fixture(scope="module")
def emulated(tmp_path_factory) -> ctypes.CDLL:
    if GXX is None:
        pytest.skip("g++ not on PATH: no host emulation of the CUDA kernels")
    build = tmp_path_factory.mktemp("emu")
    src = build / "emu.cpp"
    src.write_text(_PRELUDE + "".join(kernels.read_source(s) for s in SOURCES) + _EPILOGUE)
    lib = build / "emu.so"
    cmd = [GXX, "-std=c++20", "-O1", "-shared", "-fPIC", "-w", "-o", str(lib),
           str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return ctypes.CDLL(str(lib))


def _emulate_attention(lib, case, dtype) -> torch.Tensor:
    num_rows, num_heads, head_dim = case.query.shape
    tag = kernels.DTYPE_TAGS[dtype]
    out = torch.full(case.query.shape, float("nan"), dtype=dtype)  # poisoned
    fn = getattr(lib, f"emu_paged_attention_{tag}_d{head_dim}")
    c = ctypes
    fn.argtypes = [c.c_int, c.c_int] + [c.c_void_p] * 7 + [c.c_int] * 3 + [c.c_longlong] * 2 \
        + [c.c_int, c.c_int, c.c_float, c.c_int]
    # Two launches split at row 3 exercise row_offset (the kernel's grid-y chunking).
    split = min(3, num_rows)
    for offset, rows in ((0, split), (split, num_rows - split)):
        if rows:
            fn(num_heads, rows, out.data_ptr(), case.query.data_ptr(),
               case.k_cache.data_ptr(), case.v_cache.data_ptr(), case.block_tables.data_ptr(),
               case.seq_lens.data_ptr(), case.query_start_loc.data_ptr(), len(case.query_lens),
               num_heads, case.k_cache.shape[2], case.query.stride(0), case.query.stride(1),
               case.k_cache.shape[1], case.block_tables.shape[1], case.scale, offset)
    return out


# Smaller windows than the GPU tests (the emulation runs ~1M CUDA threads a second).
EMU_MIXES = {
    "decode": [(1, 1), (1, 17), (1, 64), (1, 100)],
    "verify": [(5, 5), (5, 33), (9, 40), (2, 16)],
    "prefill": [(40, 40), (24, 50), (1, 40)],
    "mixed": [(1, 37), (0, 12), (5, 21), (30, 45), (3, 3), (1, 2)],
    "padded": [(4, 30), (4, 9), (4, 0), (4, 0)],
}
EMU_CASES = [(mix, torch.float32, 16, (8, 2)) for mix in sorted(EMU_MIXES)] + [
    ("mixed", dtype, block_size, heads) for dtype in (torch.float32, torch.bfloat16)
    for block_size in (16, 32) for heads in ((4, 4), (8, 2), (7, 1))]


def test_emu_mixes_cover_gpu_mixes() -> None:
    assert sorted(EMU_MIXES) == sorted(WINDOW_MIXES)


@pytest.mark.parametrize("mix,dtype,block_size,heads", EMU_CASES)
def test_emulated_paged_attention(emulated, mix, dtype, block_size, heads) -> None:
    num_heads, num_kv_heads = heads
    head_dim = 128 if num_heads == 8 else 64
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    case = make_attention_case(EMU_MIXES[mix], num_heads, num_kv_heads, head_dim,
                               block_size, dtype, seed=sum(map(ord, mix)) + block_size)
    out = _emulate_attention(emulated, case, dtype)
    ref = case.reference()
    real = case.real_rows
    assert not out.isnan().any()
    assert relative_error(out[real], ref[real]) <= tol
    assert (out[~real] == 0).all()


def test_emulated_head_dim_32_and_table_overflow(emulated) -> None:
    case = make_attention_case([(2, 40), (1, 5)], 2, 1, 32, 16, torch.float32, seed=3,
                               extra_table_cols=0)
    ref = case.reference()
    case.seq_lens[1] = 49  # needs 4 blocks; the table has 3 columns -> NaN, no read past it
    out = _emulate_attention(emulated, case, torch.float32)
    assert relative_error(out[:2], ref[:2]) <= 1e-5
    assert out[2].isnan().all()


def _emulate_split_attention(lib, case, dtype, num_splits: int, slot_groups: int | None = None):
    """Split kernel then combine kernel; returns (out, acc, max, sum) of the workspace."""
    num_rows, num_heads, head_dim = case.query.shape
    num_kv_heads = case.k_cache.shape[2]
    group = num_heads // num_kv_heads
    if slot_groups is None:
        slot_groups = -(-max(case.query_lens) * group // kernels.SPLIT_SLOTS_PER_BLOCK)
    tag = f"{kernels.DTYPE_TAGS[dtype]}_d{head_dim}"
    nan = float("nan")  # poisoned: every element the combine reads must have been written
    part_acc = torch.full((num_rows, num_heads, num_splits, head_dim), nan)
    part_max = torch.full((num_rows, num_heads, num_splits), nan)
    part_sum = torch.full((num_rows, num_heads, num_splits), nan)
    out = torch.full(case.query.shape, nan, dtype=dtype)
    c = ctypes
    split = getattr(lib, f"emu_split_{tag}")
    split.argtypes = [c.c_int] * 3 + [c.c_void_p] * 9 + [c.c_int] * 2 + [c.c_longlong] * 2 \
        + [c.c_int, c.c_int, c.c_float, c.c_int]
    split(num_kv_heads * slot_groups, len(case.query_lens), num_splits, part_acc.data_ptr(),
          part_max.data_ptr(), part_sum.data_ptr(), case.query.data_ptr(),
          case.k_cache.data_ptr(), case.v_cache.data_ptr(), case.block_tables.data_ptr(),
          case.seq_lens.data_ptr(), case.query_start_loc.data_ptr(), num_heads, num_kv_heads,
          case.query.stride(0), case.query.stride(1), case.k_cache.shape[1],
          case.block_tables.shape[1], case.scale, num_splits)
    combine = getattr(lib, f"emu_combine_{tag}")
    combine.argtypes = [c.c_int, c.c_int] + [c.c_void_p] * 6 + [c.c_int] * 8
    combine(num_heads, num_rows, out.data_ptr(), part_acc.data_ptr(), part_max.data_ptr(),
            part_sum.data_ptr(), case.seq_lens.data_ptr(), case.query_start_loc.data_ptr(),
            len(case.query_lens), num_heads, num_kv_heads, case.k_cache.shape[1],
            case.block_tables.shape[1], num_splits, slot_groups, 0)
    return out, part_acc, part_max, part_sum


# (mix, dtype, head_dim, heads, splits): GQA groups of 4 and 1, windows of 1, 5 and 9 rows
# (more than one slot group), empty trailing splits (3 splits over 17 keys), padding.
SPLIT_CASES = [
    ([(1, 17), (1, 64), (1, 100)], torch.float32, 32, (8, 2), 3),
    ([(5, 33), (9, 40), (2, 16)], torch.float32, 64, (8, 2), 4),
    ([(1, 37), (5, 21), (3, 3), (4, 0)], torch.float32, 32, (3, 3), 2),
    ([(1, 50), (5, 29)], torch.bfloat16, 64, (4, 1), 3),
]


@pytest.mark.parametrize("windows,dtype,head_dim,heads,num_splits", SPLIT_CASES)
def test_emulated_split_attention(emulated, windows, dtype, head_dim, heads, num_splits):
    from specdec.kernels import ops

    num_heads, num_kv_heads = heads
    case = make_attention_case(windows, num_heads, num_kv_heads, head_dim, 16, dtype,
                               seed=num_splits + head_dim)
    out, acc, maxes, sums = _emulate_split_attention(emulated, case, dtype, num_splits)
    real = case.real_rows
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert not out.isnan().any()
    assert relative_error(out[real], case.reference()[real]) <= tol
    assert (out[~real] == 0).all()
    # The partial states themselves, against the torch reference of the split math.
    want_acc, want_max, want_sum = ops.split_attention_partials(
        case.query.float(), case.k_cache.float(), case.v_cache.float(), case.block_tables,
        case.query_lens, case.seq_lens_list, case.scale, num_splits)
    assert torch.equal(maxes[real].isneginf(), want_max[real].isneginf())
    finite = ~want_max[real].isneginf()
    assert relative_error(maxes[real][finite], want_max[real][finite]) <= tol
    assert relative_error(sums[real], want_sum[real]) <= tol
    assert relative_error(acc[real], want_acc[real]) <= tol


def test_emulated_split_attention_overflow_and_slot_capacity(emulated):
    """A context past the block table, and a window wider than the grid's slots: NaN rows."""
    case = make_attention_case([(2, 40), (1, 5)], 2, 1, 32, 16, torch.float32, seed=5,
                               extra_table_cols=0)
    ref = case.reference()
    case.seq_lens[1] = 49  # needs 4 blocks; the table has 3 columns
    out, *_ = _emulate_split_attention(emulated, case, torch.float32, 2)
    assert relative_error(out[:2], ref[:2]) <= 1e-5
    assert out[2].isnan().all()
    # 9 rows x 2 heads = 18 slots, one slot group of 16: the whole window is NaN, never stale.
    case = make_attention_case([(9, 30), (1, 5)], 2, 1, 32, 16, torch.float32, seed=6)
    out, *_ = _emulate_split_attention(emulated, case, torch.float32, 2, slot_groups=1)
    assert out[:9].isnan().all()
    assert relative_error(out[9:], case.reference()[9:]) <= 1e-5


@pytest.mark.parametrize("dtype,num_kv_heads,head_dim,word",
                         [(torch.bfloat16, 2, 64, 16), (torch.float32, 1, 3, 4),
                          (torch.bfloat16, 1, 3, 2)])
def test_emulated_write_kv(emulated, dtype, num_kv_heads, head_dim, word) -> None:
    num_blocks, block_size, num_tokens = 6, 16, 9
    gen = torch.Generator().manual_seed(7)
    qkv = torch.randn(num_tokens, 5 * num_kv_heads * head_dim, generator=gen).to(dtype)
    row = num_kv_heads * head_dim
    key = qkv[:, row:2 * row].view(num_tokens, num_kv_heads, head_dim)  # strided views
    value = qkv[:, 3 * row:4 * row].view(num_tokens, num_kv_heads, head_dim)
    slots = torch.tensor([5, 17, -1, 95, 0, 40, -1, 200, 63], dtype=torch.int64)  # 200 >= 96
    k_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), 7.0, dtype=dtype)
    v_cache = torch.full_like(k_cache, 7.0)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    keep = (slots >= 0) & (slots < num_blocks * block_size)
    k_ref.view(-1, num_kv_heads, head_dim)[slots[keep]] = key[keep]
    v_ref.view(-1, num_kv_heads, head_dim)[slots[keep]] = value[keep]
    elem = key.element_size()
    fn = getattr(emulated, f"emu_write_kv_w{word}")
    c = ctypes
    fn.argtypes = [c.c_int, c.c_int] + [c.c_void_p] * 5 + [c.c_longlong] * 2 + [c.c_int,
                                                                              c.c_longlong]
    row_words = row * elem // word
    fn(num_tokens, 32, key.data_ptr(), value.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
       slots.data_ptr(), key.stride(0) * elem // word, value.stride(0) * elem // word,
       row_words, num_blocks * block_size)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


# ---------------------------------------------------------------------------------------------
# Fused element-wise kernels against their torch references in ops.py (CPU tensors, so the
# reference path runs). Tolerance: float32 1e-6 relative; bfloat16 at most one ulp apart
# (rsqrt and exp differ in the last bit between libm and torch).

FUSED_DTYPES = [(torch.float32, 1e-6), (torch.bfloat16, 8e-3)]


@pytest.mark.parametrize("dtype,tol", FUSED_DTYPES)
@pytest.mark.parametrize("add_residual", [False, True])
def test_emulated_rms_norm(emulated, dtype, tol, add_residual) -> None:
    from specdec.kernels import ops

    gen = torch.Generator().manual_seed(11)
    num_tokens, hidden = 5, 200  # hidden not a multiple of the block: the tail is covered
    wide = (torch.randn(num_tokens, hidden + 24, generator=gen) * 3).to(dtype)
    x = wide[:, 8:8 + hidden]  # a strided row view, as the fused QKV output is
    weight = torch.randn(hidden, generator=gen).to(dtype)
    residual = torch.randn(num_tokens, hidden, generator=gen).to(dtype)
    want, want_res = ops.rms_norm(x, weight, 1e-6, residual.clone() if add_residual else None,
                                  use_kernels=False)
    out = torch.full((num_tokens, hidden), float("nan"), dtype=dtype)
    res = residual.clone()
    fn = getattr(emulated, f"emu_rms_norm_{kernels.DTYPE_TAGS[dtype]}")
    c = ctypes
    fn.argtypes = [c.c_int, c.c_int] + [c.c_void_p] * 4 + [c.c_int, c.c_longlong, c.c_float,
                                                          c.c_int]
    fn(num_tokens, 64, out.data_ptr(), res.data_ptr(), x.data_ptr(), weight.data_ptr(), hidden,
       x.stride(0), 1e-6, int(add_residual))
    assert not out.isnan().any()
    assert relative_error(out, want) <= tol
    if add_residual:
        assert torch.equal(res, want_res)  # the sum is one rounded add, bit for bit
    else:
        assert torch.equal(res, residual)  # untouched


@pytest.mark.parametrize("dtype,tol", FUSED_DTYPES)
def test_emulated_silu_mul(emulated, dtype, tol) -> None:
    from specdec.kernels import ops

    gen = torch.Generator().manual_seed(12)
    num_tokens, inter = 3, 150
    gate_up = (torch.randn(num_tokens, 2 * inter, generator=gen) * 4).to(dtype)
    want = ops.silu_mul(gate_up, use_kernels=False)
    out = torch.full((num_tokens, inter), float("nan"), dtype=dtype)
    fn = getattr(emulated, f"emu_silu_mul_{kernels.DTYPE_TAGS[dtype]}")
    c = ctypes
    fn.argtypes = [c.c_int, c.c_int, c.c_void_p, c.c_void_p, c.c_int]
    fn(-(-inter // 64), num_tokens, out.data_ptr(), gate_up.data_ptr(), inter)
    assert not out.isnan().any()
    assert relative_error(out, want) <= tol


@pytest.mark.parametrize("dtype,tol", FUSED_DTYPES)
@pytest.mark.parametrize("heads", [(4, 2), (3, 3)])
def test_emulated_rope_write_kv(emulated, dtype, tol, heads) -> None:
    from specdec.kernels import ops

    num_heads, num_kv_heads = heads
    head_dim, num_tokens, num_blocks, block_size = 16, 6, 4, 4
    gen = torch.Generator().manual_seed(13)
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    qkv = torch.randn(num_tokens, q_size + 2 * kv_size, generator=gen).to(dtype)
    query, key, value = (t.view(num_tokens, -1, head_dim)
                         for t in qkv.split([q_size, kv_size, kv_size], dim=-1))
    angles = torch.rand(num_tokens, 1, head_dim // 2, generator=gen) * 6.3
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    slots = torch.tensor([2, -1, 7, 15, 0, -1], dtype=torch.int64)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_ref, v_ref = torch.full(shape, 5.0, dtype=dtype), torch.full(shape, 5.0, dtype=dtype)
    want_q = ops.rope_write_kv(query.clone(), key, value, cos, sin, k_ref, v_ref, slots,
                               use_kernels=False)
    k_cache, v_cache = torch.full(shape, 5.0, dtype=dtype), torch.full(shape, 5.0, dtype=dtype)
    fn = getattr(emulated, f"emu_rope_kv_{kernels.DTYPE_TAGS[dtype]}")
    c = ctypes
    fn.argtypes = [c.c_int, c.c_int] + [c.c_void_p] * 8 + [c.c_int] * 3 + [c.c_longlong] * 4
    fn(num_tokens, 32, query.data_ptr(), key.data_ptr(), value.data_ptr(), k_cache.data_ptr(),
       v_cache.data_ptr(), cos.data_ptr(), sin.data_ptr(), slots.data_ptr(), num_heads,
       num_kv_heads, head_dim, qkv.stride(0), qkv.stride(0), qkv.stride(0),
       num_blocks * block_size)
    assert relative_error(query, want_q) <= tol  # rotated in place inside the qkv buffer
    assert relative_error(k_cache, k_ref) <= tol
    assert torch.equal(v_cache, v_ref)
    written = torch.zeros(num_blocks * block_size, dtype=torch.bool)
    written[slots[(slots >= 0) & (slots < 16)]] = True
    assert (k_cache.view(16, -1)[~written] == 5.0).all()  # nothing else touched
