"""The LoRA CUDA kernels (cuda/lora.cu) without a GPU: the real kernel source, compiled with g++
against the host CUDA emulation of test_cuda_compile.py (one cooperative context per CUDA
thread, warp shuffles and barriers emulated), launched with exactly the grid, block and
arguments that specdec/kernels/cupy.py computes, against the torch references in ops.py.

Covered: BGMV (one slot per row) and SGMV (segments longer and shorter than a row tile, an
empty segment), the base slot -1 and an out-of-range slot (zeros / y untouched), slice-aware
expand (each B writes only its own columns; columns outside every slice untouched), strided x,
float32 and bfloat16; and LoRABatch's kernel path (the reference ops on the CPU) against the
grouped torch path on a real model.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import numpy as np
import pytest
import torch

from specdec.kernels import cupy as kernels
from specdec.kernels import ops
from tests.gpu.cases import relative_error
from tests.unit.test_cuda_compile import _PRELUDE

GXX = shutil.which("g++")

# A 3-D grid variant of test_cuda_compile's scheduler (the LoRA grids use blockIdx.z).
_EPILOGUE = r"""
static void (*emu_body)(void*);
static void* emu_arg;
static std::vector<char> emu_done;
static void emu_entry(int t) { emu_body(emu_arg); emu_done[t] = 1; }
template <typename F>
static void emu_trampoline(void* f) { (*static_cast<F*>(f))(); }
template <typename F>
static void emu_run3(int gx, int gy, int gz, int threads, F kernel) {
  std::vector<ucontext_t> contexts(threads);
  std::vector<std::vector<char>> stacks(threads, std::vector<char>(1 << 16));
  emu_contexts = contexts.data();
  emu_body = &emu_trampoline<F>;
  emu_arg = &kernel;
  blockDim.x = threads;
  for (int z = 0; z < gz; ++z)
    for (int y = 0; y < gy; ++y)
      for (int x = 0; x < gx; ++x) {
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
#define G int gx, int gy, int gz, int threads
#define RUN(...) emu_run3(gx, gy, gz, threads, [=] { __VA_ARGS__; })
#define SL const void *b0, const void *b1, const void *b2, int s0, int s1, int s2, int o0, \
    int o1, int o2
#define EMU_LORA(TAG, T)                                                                   \
  extern "C" void emu_bgmv_shrink_##TAG(G, float* out, const T* x, const T* a,             \
      const int* rs, int rt, int in, long long xs, int ns) {                               \
    RUN(bgmv_shrink_##TAG(out, x, a, rs, rt, in, xs, ns));                                  \
  }                                                                                        \
  extern "C" void emu_sgmv_shrink_##TAG(G, float* out, const T* x, const T* a,             \
      const int* rs, const int* ss, int rt, int in, long long xs, int ns) {                \
    RUN(sgmv_shrink_##TAG(out, x, a, rs, ss, rt, in, xs, ns));                              \
  }                                                                                        \
  extern "C" void emu_bgmv_expand_##TAG(G, T* y, const float* s, SL, const int* rs,        \
      int rm, int rt, long long ys, int ns) {                                              \
    RUN(bgmv_expand_##TAG(y, s, b0, b1, b2, s0, s1, s2, o0, o1, o2, rs, rm, rt, ys, ns));   \
  }                                                                                        \
  extern "C" void emu_sgmv_expand_##TAG(G, T* y, const float* s, SL, const int* rs,        \
      const int* ss, int rm, int rt, long long ys, int ns, int cb) {                       \
    RUN(sgmv_expand_##TAG(y, s, b0, b1, b2, s0, s1, s2, o0, o1, o2, rs, ss, rm, rt, ys, ns, \
                          cb));                                                            \
  }
EMU_LORA(f32, float)
EMU_LORA(bf16, specdec::bf16)
"""


@pytest.fixture(scope="module")
def emulated(tmp_path_factory) -> ctypes.CDLL:
    if GXX is None:
        pytest.skip("g++ not on PATH: no host emulation of the CUDA kernels")
    build = tmp_path_factory.mktemp("emu_lora")
    src = build / "emu_lora.cpp"
    src.write_text(_PRELUDE + kernels.read_source("lora.cu") + _EPILOGUE)
    lib = build / "emu_lora.so"
    proc = subprocess.run([GXX, "-std=c++20", "-O1", "-shared", "-fPIC", "-w", "-o", str(lib),
                           str(src)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return ctypes.CDLL(str(lib))


def _ctype(value):
    if isinstance(value, np.int32):
        return ctypes.c_int(int(value))
    if isinstance(value, np.int64):
        return ctypes.c_longlong(int(value))
    if isinstance(value, (np.uint64, int)):  # pointers: data_ptr() ints and the unused slices
        return ctypes.c_void_p(int(value))
    raise TypeError(type(value))


def _emulate(lib, launch) -> None:
    """Run one (name, grid, block, args) launch from cupy.py's *_launch on the emulation."""
    name, grid, block, args = launch
    assert block[1] == block[2] == 1
    fn = getattr(lib, f"emu_{name}")
    fn.restype = None
    fn(*(ctypes.c_int(g) for g in grid), ctypes.c_int(block[0]), *(_ctype(a) for a in args))


def _emu_shrink(lib, x, a_stack, row_slots, seg_starts=None, max_seg_len=1):
    out = torch.full((x.shape[0], a_stack.shape[1]), float("nan"))  # poisoned
    launch = kernels.lora_shrink_launch(out, x, a_stack, row_slots, seg_starts, max_seg_len)
    _emulate(lib, launch)
    return out, launch[0]


def _emu_expand(lib, y, shrink, b_list, offsets, row_slots, r_max, seg_starts=None,
                max_seg_len=1):
    launch = kernels.lora_expand_launch(y, shrink, b_list, offsets, row_slots, r_max,
                                        seg_starts, max_seg_len)
    _emulate(lib, launch)
    return launch[0]


def _case(dtype, seg_lens, seg_slots, sizes, num_slots=3, r_max=8, in_features=72, seed=0,
          extra_cols=5):
    """A fused projection of len(sizes) slices: x (a strided view), A stack, B's, y."""
    gen = torch.Generator().manual_seed(seed)
    num_rows = sum(seg_lens)
    wide = torch.randn(num_rows, in_features + 16, generator=gen).to(dtype)
    x = wide[:, 8:8 + in_features]  # row stride != in_features
    a_stack = (torch.randn(num_slots, len(sizes) * r_max, in_features, generator=gen)
               * 0.2).to(dtype)
    b_list = [(torch.randn(num_slots, n, r_max, generator=gen) * 0.2).to(dtype) for n in sizes]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    y = torch.randn(num_rows, sum(sizes) + extra_cols, generator=gen).to(dtype)
    row_slots = torch.tensor([s for n, s in zip(seg_lens, seg_slots) for _ in range(n)],
                             dtype=torch.int32)
    starts = torch.tensor(np.cumsum([0] + list(seg_lens)), dtype=torch.int32)
    return x, a_stack, b_list, offsets, y, row_slots, starts


TOLS = {torch.float32: 1e-5, torch.bfloat16: 8e-3}
QKV = [64, 32, 32]  # q, k, v columns (the kernel writes each slice into its own columns)


@pytest.mark.parametrize("dtype", list(TOLS))
@pytest.mark.parametrize("sizes", [QKV, [96, 96], [72]], ids=["qkv", "gate_up", "o"])
def test_emulated_bgmv(emulated, dtype, sizes):
    # decode rows: slots per row in any order, the base (-1) and one slot out of range (3)
    slots = [2, -1, 0, 1, 2, 3, 0, -1, 1]
    x, a_stack, b_list, offsets, y, row_slots, _ = _case(dtype, [1] * len(slots), slots, sizes,
                                                         seed=len(sizes))
    r_max = b_list[0].shape[2]
    want_shrink = ops.lora_shrink(x, a_stack, row_slots, use_kernels=False)
    shrink, name = _emu_shrink(emulated, x, a_stack, row_slots)
    assert name == f"bgmv_shrink_{kernels.DTYPE_TAGS[dtype]}"
    assert not shrink.isnan().any()
    base = (row_slots < 0) | (row_slots >= a_stack.shape[0])
    assert (shrink[base] == 0).all()
    assert relative_error(shrink, want_shrink) <= 1e-5  # float32 sums of the same products
    want_y = ops.lora_expand(y.clone(), want_shrink, b_list, offsets, row_slots, r_max,
                             use_kernels=False)
    got_y = y.clone()
    assert _emu_expand(emulated, got_y, shrink, b_list, offsets, row_slots, r_max).startswith(
        "bgmv_expand")
    assert relative_error(got_y, want_y) <= TOLS[dtype]
    assert torch.equal(got_y[base], y[base])  # base rows untouched
    assert torch.equal(got_y[:, sum(sizes):], y[:, sum(sizes):])  # outside every slice
    assert not torch.equal(got_y[~base], y[~base])


@pytest.mark.parametrize("dtype", list(TOLS))
def test_emulated_sgmv_segments(emulated, dtype):
    # prefill chunks longer than a row tile (8), a verify window, an empty segment, the base
    seg_lens = [17, 1, 0, 5, 9, 8]
    seg_slots = [1, 0, 2, -1, 2, 0]
    x, a_stack, b_list, offsets, y, row_slots, starts = _case(dtype, seg_lens, seg_slots, QKV,
                                                              seed=11)
    r_max = b_list[0].shape[2]
    want_shrink = ops.lora_shrink(x, a_stack, row_slots, use_kernels=False)
    shrink, name = _emu_shrink(emulated, x, a_stack, row_slots, starts, max(seg_lens))
    assert name.startswith("sgmv_shrink") and not shrink.isnan().any()
    assert relative_error(shrink, want_shrink) <= 1e-5
    want_y = ops.lora_expand(y.clone(), want_shrink, b_list, offsets, row_slots, r_max,
                             use_kernels=False)
    got_y = y.clone()
    name = _emu_expand(emulated, got_y, shrink, b_list, offsets, row_slots, r_max, starts,
                       max(seg_lens))
    assert name.startswith("sgmv_expand")
    assert relative_error(got_y, want_y) <= TOLS[dtype]
    base = row_slots < 0
    assert base.sum() == 5 and torch.equal(got_y[base], y[base])
    assert torch.equal(got_y[:, sum(QKV):], y[:, sum(QKV):])


def test_emulated_expand_one_slice_leaves_the_others(emulated):
    """The k slice alone (as if q and v had no adapter): only its columns change."""
    x, a_stack, b_list, offsets, y, row_slots, _ = _case(torch.float32, [1] * 4, [0, 1, 2, 0],
                                                         QKV, seed=5)
    shrink = ops.lora_shrink(x, a_stack, row_slots, use_kernels=False)
    r_max = b_list[0].shape[2]
    k_only = shrink[:, r_max:2 * r_max].contiguous()
    got = y.clone()
    _emu_expand(emulated, got, k_only, [b_list[1]], [offsets[1]], row_slots, r_max)
    cols = slice(offsets[1], offsets[1] + QKV[1])
    want = y.clone()
    for row, slot in enumerate(row_slots.tolist()):
        want[row, cols] = y[row, cols] + b_list[1][slot] @ k_only[row]
    assert relative_error(got, want) <= 1e-5
    outside = torch.ones(y.shape[1], dtype=torch.bool)
    outside[cols] = False
    assert torch.equal(got[:, outside], y[:, outside])


def test_python_constants_match_the_source():
    source = (kernels.CUDA_DIR / "lora.cu").read_text()
    for name, value in (("kLoraWarps", kernels.LORA_WARPS),
                        ("kLoraRowTile", kernels.LORA_ROW_TILE),
                        ("kLoraMaxSlices", kernels.LORA_MAX_SLICES)):
        assert f"constexpr int {name} = {value};" in source, name


def test_launch_checks_name_the_parameter():
    x, a_stack, b_list, offsets, y, row_slots, starts = _case(torch.float32, [2, 3], [0, 1],
                                                              QKV)
    out = torch.empty(5, a_stack.shape[1])
    with pytest.raises(ValueError, match="row_slots .* int32"):
        kernels.lora_shrink_launch(out, x, a_stack, row_slots.long(), None, 1)
    with pytest.raises(ValueError, match="a_stack"):
        kernels.lora_shrink_launch(out, x, a_stack.to(torch.bfloat16), row_slots, None, 1)
    with pytest.raises(ValueError, match="at column 110"):
        kernels.lora_expand_launch(y, out, b_list, [0, 64, 110], row_slots, 8, None, 1)
    with pytest.raises(ValueError, match="seg_starts"):
        kernels.lora_shrink_launch(out, x, a_stack, row_slots, starts.long(), 3)
    assert kernels.lora_shrink_launch(out[:0], x[:0], a_stack, row_slots[:0], None, 1) is None


# ---- LoRABatch: the kernel path (reference ops on the CPU) equals the grouped torch path ----

def test_kernel_path_equals_grouped_path(tiny_llama_dir, tmp_path):
    from specdec.model.lora import LoRAManager
    from specdec.model.weights import load_model
    from tests.conftest import PagedSequences
    from tests.unit.test_lora import ADAPTERS, make_adapter

    pytest.importorskip("peft")
    model = load_model(tiny_llama_dir, "float32")
    manager = LoRAManager(model.arch, 2, 8, 0, model.dtype, model.device)
    ids = [manager.add(name, make_adapter(tiny_llama_dir, str(tmp_path / name), seed=i, **kw))
           .lora_int_id for i, (name, kw) in enumerate(ADAPTERS.items())]
    slot_of = manager.activate(set(ids))
    windows = [("a", list(range(5, 18))), ("b", [7]), ("c", list(range(30, 39))), ("d", [9])]
    seq_slots = [slot_of[ids[0]], -1, slot_of[ids[1]], slot_of[ids[0]]]
    token_slots = [s for (_, t), s in zip(windows, seq_slots) for _ in t]
    query_lens = [len(t) for _, t in windows]
    logits = {}
    for use_kernels in (False, True):
        seqs = PagedSequences(num_blocks=16, block_size=4, seed=2)
        batch = seqs.batch(windows)
        batch.lora = manager.make_batch(token_slots, model.device, use_kernels, query_lens)
        assert (batch.lora.row_slots is not None) == use_kernels
        logits[use_kernels] = model(batch, model.make_kv_caches(16, 4))
    assert logits[True].shape[0] == sum(query_lens)
    torch.testing.assert_close(logits[True], logits[False], atol=1e-5, rtol=0)
    decode = manager.make_batch([slot_of[ids[1]], -1, 0], model.device, True, [1, 1, 1])
    assert decode.seg_starts is None and decode.max_seg_len == 1  # BGMV
    assert manager.make_batch([-1, -1], model.device, True, [2]) is None
