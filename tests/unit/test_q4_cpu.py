"""The CPU 4-bit kernel (specdec/kernels/q4_cpu.cpp) against its plain torch reference, its
packing, and the fallback to torch's kernel where the extension cannot load."""

import pytest
import torch

from specdec.kernels import q4_cpu
from specdec.model.quant import Int4Linear, int4_dequantize, int4_groups


@pytest.fixture(scope="module")
def kernel():
    module = q4_cpu.load_kernel(use_simd=False)  # builds once (cached on disk)
    if module is None:
        pytest.skip("the q4 CPU extension does not build here (no compiler)")
    return module


def _random_layer(n, k, seed):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=gen)
    scales = (torch.rand(n, k // 32, generator=gen) * 0.02).bfloat16().float()
    zero_eff = (torch.randn(n, k // 32, generator=gen) * 0.1).bfloat16().float()
    return codes, scales, zero_eff


def test_pack_layout_puts_each_code_where_the_kernel_reads_it():
    codes, scales, zero_eff = _random_layer(32, 64, 0)
    packed, scale_zero = q4_cpu.q4_pack(codes, scales, zero_eff)
    assert packed.shape == (2, 2, 4, 64) and packed.dtype == torch.uint8
    assert scale_zero.shape == (2, 2, 2, 16) and scale_zero.dtype == torch.bfloat16
    for n in range(32):
        for k in range(64):
            tile, j = divmod(n, 16)
            group, within = divmod(k, 32)
            step, b = divmod(within, 4)
            byte = int(packed[tile, group, step // 2, j * 4 + b])
            code = byte >> 4 if step % 2 else byte & 0x0F
            assert code == int(codes[n, k]), (n, k)
    assert torch.equal(scale_zero[1, 1, 0], scales[16:32, 1].bfloat16())
    assert torch.equal(scale_zero[0, 1, 1], zero_eff[0:16, 1].bfloat16())


@pytest.mark.parametrize("isa", q4_cpu.ISAS)
@pytest.mark.parametrize("num_rows", [1, 2, 3, 4, 5, 6, 7, 8, 9, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_reference(kernel, isa, num_rows, dtype):
    if isa not in kernel.q4_isas():
        pytest.skip(f"{isa} is not compiled in on this CPU")
    n, k = 48, 160
    codes, scales, zero_eff = _random_layer(n, k, num_rows)
    packed, scale_zero = q4_cpu.q4_pack(codes, scales, zero_eff)
    x = torch.randn(num_rows, k, generator=torch.Generator().manual_seed(7)).to(dtype)
    x[0, :32] = 0.0  # an all-zero activation group (dx = 0)
    got = q4_cpu.q4_linear(kernel, x, packed, scale_zero, isa=isa)
    want = q4_cpu.q4_reference(x, codes, scales, zero_eff)
    assert got.shape == (num_rows, n) and got.dtype == torch.float32
    assert torch.isfinite(got).all()
    # NOTE: the integer group sums are exact in both; only the float32 combination of the
    # groups differs in order (5 groups here), so the error is a few float32 ulps of the terms.
    bound = 1e-5 * (want.abs().max() + 1.0)
    assert (got - want).abs().max() <= bound


@pytest.mark.parametrize("isa", q4_cpu.ISAS)
@pytest.mark.parametrize("n, k, num_rows", [(16, 32, 1), (16, 32, 9), (80, 96, 5),
                                            (208, 352, 3), (32, 2048, 8), (512, 64, 12)])
def test_kernel_matches_reference_on_odd_shapes(kernel, isa, n, k, num_rows):
    """One tile, one group, tile counts that do not split evenly over threads, long rows."""
    if isa not in kernel.q4_isas():
        pytest.skip(f"{isa} is not compiled in on this CPU")
    codes, scales, zero_eff = _random_layer(n, k, n + k)
    packed, scale_zero = q4_cpu.q4_pack(codes, scales, zero_eff)
    x = torch.randn(num_rows, k, generator=torch.Generator().manual_seed(k)).bfloat16()
    x[-1] *= 1000.0  # a row 1000x the others (the steps dx are per row and group)
    got = q4_cpu.q4_linear(kernel, x, packed, scale_zero, isa=isa)
    want = q4_cpu.q4_reference(x, codes, scales, zero_eff)
    for m in range(num_rows):  # a per-row bound: rows differ in scale by 1000x
        bound = 1e-5 * (want[m].abs().max() + 1.0) * (k // 32) ** 0.5
        assert (got[m] - want[m]).abs().max() <= bound, m


def test_kernel_codes_at_the_extremes_are_exact(kernel):
    """Codes all 15 against activations all at +-127: the largest group sums (AVX2 adds 8
    int16 products of pairs, 8 * 2 * 15 * 127 = 30480 < 32767, so nothing saturates)."""
    n, k = 32, 64
    codes = torch.full((n, k), 15)
    scales = torch.ones(n, k // 32)
    zero_eff = torch.zeros(n, k // 32)
    packed, scale_zero = q4_cpu.q4_pack(codes, scales, zero_eff)
    x = torch.tensor([[1.0] * k, [-1.0] * k, [1.0, -1.0] * (k // 2)])
    for isa in kernel.q4_isas():
        got = q4_cpu.q4_linear(kernel, x, packed, scale_zero, isa=isa)
        # dx = 1/127, q = +-127: each output is 15 * (+-1) * k
        want = torch.tensor([15.0 * k, -15.0 * k, 0.0])[:, None].expand(3, n)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-4, msg=isa)


def test_kernel_takes_empty_batches_and_rejects_bad_input(kernel):
    codes, scales, zero_eff = _random_layer(32, 64, 0)
    packed, scale_zero = q4_cpu.q4_pack(codes, scales, zero_eff)
    assert q4_cpu.q4_linear(kernel, torch.zeros(0, 64), packed, scale_zero).shape == (0, 32)
    with pytest.raises(RuntimeError, match="in_features=96"):
        q4_cpu.q4_linear(kernel, torch.zeros(2, 96), packed, scale_zero)
    with pytest.raises(RuntimeError, match="scale_zero"):
        q4_cpu.q4_linear(kernel, torch.zeros(2, 64), packed, scale_zero[:1].contiguous())
    with pytest.raises(ValueError, match="isa must be one of"):
        q4_cpu.q4_linear(kernel, torch.zeros(2, 64), packed, scale_zero, isa="sse2")


def test_kernel_reads_a_strided_input(kernel):
    codes, scales, zero_eff = _random_layer(32, 64, 1)
    packed, scale_zero = q4_cpu.q4_pack(codes, scales, zero_eff)
    x = torch.randn(64, 5).T  # [5, 64], not contiguous
    want = q4_cpu.q4_reference(x, codes, scales, zero_eff)
    got = q4_cpu.q4_linear(kernel, x, packed, scale_zero)
    assert (got - want).abs().max() <= 1e-5 * (want.abs().max() + 1.0)


def test_simd_and_plain_paths_agree_on_a_model_sized_layer(kernel):
    if kernel.q4_isas() == ["scalar"]:
        pytest.skip("no SIMD path compiled on this CPU")
    codes, scales, zero_eff = _random_layer(256, 1536, 3)
    packed, scale_zero = q4_cpu.q4_pack(codes, scales, zero_eff)
    x = torch.randn(6, 1536).bfloat16()
    fast = q4_cpu.q4_linear(kernel, x, packed, scale_zero, True)
    plain = q4_cpu.q4_linear(kernel, x, packed, scale_zero, False)
    want = q4_cpu.q4_reference(x, codes, scales, zero_eff)
    assert (fast - plain).abs().max() <= 1e-4 * want.abs().max()
    assert (fast - want).abs().max() <= 1e-4 * want.abs().max()


def test_reference_is_the_matmul_up_to_activation_rounding():
    codes, scales, zero_eff = _random_layer(32, 256, 4)
    weight = codes.float() * scales.repeat_interleave(32, 1) + zero_eff.repeat_interleave(32, 1)
    x = torch.randn(4, 256)
    exact = x @ weight.T
    got = q4_cpu.q4_reference(x, codes, scales, zero_eff)
    # int8 activations per group of 32: about 0.4 % relative error per group, averaging out
    assert ((got - exact).norm() / exact.norm()).item() < 0.01


def test_int4_linear_uses_the_kernel_and_matches_the_reference(kernel):
    if q4_cpu.load_kernel() is None:
        pytest.skip("no SIMD path: Int4Linear uses torch's kernel")
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 48, bias=True)
    qlinear = Int4Linear(linear)
    assert qlinear.use_q4_kernel and "kernel=q4_cpu" in repr(qlinear)
    codes, scales, zeros = int4_groups(linear.weight.detach(), 32)
    zero_eff = zeros.float() - 8 * scales.float()
    x = torch.randn(5, 96)
    want = q4_cpu.q4_reference(x, codes, scales, zero_eff) + linear.bias.detach()
    got = qlinear(x)
    assert got.dtype == torch.float32
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    # and the same weights as torch's kernel's format, to bfloat16 rounding of zero_eff
    dequant = int4_dequantize(codes, scales, zeros, 32)
    torch.testing.assert_close(got, (x @ dequant.T + linear.bias).detach(), atol=0.05,
                               rtol=0.02)


def test_int4_linear_falls_back_to_torch_kernel_when_extension_cannot_load(monkeypatch):
    from torch.utils import cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    q4_cpu.load_kernel.cache_clear()
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    try:
        assert q4_cpu.load_kernel() is None
        linear = torch.nn.Linear(64, 32)
        qlinear = Int4Linear(linear)
        assert not qlinear.use_q4_kernel and hasattr(qlinear, "packed_weight")
        x = torch.randn(3, 64)
        codes, scales, zeros = int4_groups(linear.weight.detach(), 32)
        dequant = int4_dequantize(codes, scales, zeros, 32)
        torch.testing.assert_close(qlinear(x), (x.bfloat16().float() @ dequant.T
                                                + linear.bias).detach(), atol=0.05, rtol=0.02)
    finally:
        q4_cpu.load_kernel.cache_clear()


def test_env_forces_torch_kernel(monkeypatch):
    q4_cpu.load_kernel.cache_clear()
    monkeypatch.setenv("SPECDEC_Q4_KERNEL", "torch")
    try:
        assert q4_cpu.load_kernel() is None
        assert not Int4Linear(torch.nn.Linear(64, 32)).use_q4_kernel
    finally:
        q4_cpu.load_kernel.cache_clear()


def test_q4k_decoding_matches_gguf_dequantize():
    import gguf
    import numpy as np

    from specdec.model.gguf_q4k import decode_q4k

    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=(16, 2 * 144), dtype=np.uint8)  # 16 rows x 512 weights
    raw[:, 0:2] = np.array([0.01], dtype=np.float16).view(np.uint8)  # finite d, dmin
    raw[:, 2:4] = np.array([0.02], dtype=np.float16).view(np.uint8)
    raw[:, 144:146] = np.array([-0.03], dtype=np.float16).view(np.uint8)
    raw[:, 146:148] = np.array([0.005], dtype=np.float16).view(np.uint8)
    codes, scales, zero_eff = decode_q4k(raw)
    assert codes.shape == (16, 512) and scales.shape == zero_eff.shape == (16, 16)
    assert int(codes.max()) <= 15
    ours = codes.float() * scales.repeat_interleave(32, 1) + zero_eff.repeat_interleave(32, 1)
    want = torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q4_K))
    torch.testing.assert_close(ours, want.float(), rtol=1e-6, atol=1e-7)


def test_int4_linear_takes_source_groups_as_they_are():
    from specdec.model.gguf_q4k import hf_linear_name
    from specdec.model.quant import quantize_weights

    assert hf_linear_name("blk.3.ffn_up.weight") == "model.layers.3.mlp.up_proj"
    assert hf_linear_name("output.weight") == "lm_head"
    assert hf_linear_name("blk.3.attn_norm.weight") is None
    codes, scales, zero_eff = _random_layer(32, 64, 5)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 32))
    quantize_weights(model, "int4", groups={"0": (codes, scales, zero_eff)}, int8_names={"1"})
    assert isinstance(model[0], Int4Linear)
    assert not isinstance(model[1], Int4Linear)  # kept at int8 as the checkpoint asked
    x = torch.randn(3, 64)
    weight = codes.float() * scales.repeat_interleave(32, 1) + zero_eff.repeat_interleave(32, 1)
    want = x @ weight.T + model[0].bias.detach()
    torch.testing.assert_close(model[0](x), want, atol=0.02, rtol=0.02)
    with pytest.raises(ValueError, match="source_groups"):
        Int4Linear(torch.nn.Linear(64, 48), source_groups=(codes, scales, zero_eff))


@pytest.mark.parametrize("dtype, shape", [(torch.uint8, (800, 12, 4, 64)),
                                          (torch.bfloat16, (700, 48, 2, 16))])
def test_to_hugepages_returns_an_aligned_equal_copy(dtype, shape):
    t = torch.randint(0, 255, shape).to(dtype)  # 2.5 MB, 2.2 MB: over one huge page
    assert t.numel() * t.element_size() >= q4_cpu.HUGEPAGE_BYTES
    got = q4_cpu.to_hugepages(t)
    if not hasattr(q4_cpu.mmap, "MADV_HUGEPAGE"):
        pytest.skip("no MADV_HUGEPAGE on this host: to_hugepages keeps the tensor")
    assert got.data_ptr() != t.data_ptr() and got.data_ptr() % q4_cpu.HUGEPAGE_BYTES == 0
    assert got.dtype == dtype and got.shape == t.shape and got.is_contiguous()
    assert torch.equal(got, t)
    del t
    import gc

    gc.collect()  # the copy keeps its mapping alive on its own
    assert got.sum().item() == got.clone().sum().item()


def test_to_hugepages_keeps_small_and_unsupported_tensors():
    small = torch.zeros(1024, dtype=torch.uint8)
    assert q4_cpu.to_hugepages(small) is small
    strided = torch.zeros(2048, 1024, dtype=torch.uint8)[:, ::2]
    assert q4_cpu.to_hugepages(strided) is strided


def test_to_hugepages_falls_back_when_madvise_fails_or_is_missing(monkeypatch):
    import mmap
    import types

    class Refusing(mmap.mmap):
        def madvise(self, *args):
            raise OSError(22, "Invalid argument")

    fake = types.SimpleNamespace(MADV_HUGEPAGE=14, MAP_PRIVATE=mmap.MAP_PRIVATE,
                                 MAP_ANONYMOUS=mmap.MAP_ANONYMOUS, PAGESIZE=mmap.PAGESIZE,
                                 mmap=Refusing)
    monkeypatch.setattr(q4_cpu, "mmap", fake)
    t = torch.ones(3 << 20, dtype=torch.uint8)
    assert q4_cpu.to_hugepages(t) is t
    del fake.MADV_HUGEPAGE  # an OS without the advice
    assert q4_cpu.to_hugepages(t) is t


def test_kernel_on_hugepage_weights_and_both_thread_splits_is_bitwise_equal():
    """The same tiles computed by the same code: the copy in huge pages, and blocks of tiles
    taken from a shared counter against the static split, give identical outputs."""
    kernel = q4_cpu.load_kernel()
    if kernel is None:
        pytest.skip("no SIMD q4 kernel here")
    codes, scales, zero_eff = _random_layer(16 * 700, 256, 6)  # 700 tiles: uneven blocks
    packed, scale_zero = q4_cpu.q4_pack(codes, scales, zero_eff)
    huge, huge_sz = q4_cpu.to_hugepages(packed), q4_cpu.to_hugepages(scale_zero)
    x = torch.randn(5, 256).bfloat16()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        static = q4_cpu.q4_linear(kernel, x, packed, scale_zero, split_dynamic=False)
        dynamic = q4_cpu.q4_linear(kernel, x, packed, scale_zero)
        on_huge = q4_cpu.q4_linear(kernel, x, huge, huge_sz)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(static, dynamic) and torch.equal(static, on_huge)
    want = q4_cpu.q4_reference(x, codes, scales, zero_eff)
    assert (dynamic - want).abs().max() <= 1e-5 * (want.abs().max() + 1.0) * 3


def test_int4_linear_keeps_large_packed_weights_in_hugepages():
    if q4_cpu.load_kernel() is None or not hasattr(q4_cpu.mmap, "MADV_HUGEPAGE"):
        pytest.skip("no SIMD q4 kernel or no MADV_HUGEPAGE here")
    linear = torch.nn.Linear(2048, 2048, bias=False)  # packed: 2 MiB
    qlinear = Int4Linear(linear)
    assert qlinear.q4_packed.data_ptr() % q4_cpu.HUGEPAGE_BYTES == 0
    # a buffer registered later (the quantized-model cache does so) goes there too
    qlinear.register_buffer("q4_packed", qlinear.q4_packed.clone())
    assert qlinear.q4_packed.data_ptr() % q4_cpu.HUGEPAGE_BYTES == 0


def test_a_build_killed_midway_does_not_hang_the_next_load(kernel, tmp_path):
    """torch's build lock is a plain file; a build killed while it held it (Ctrl-C, a CI
    timeout) left it behind, and every later load waited on it forever."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or str(Path.home() / ".cache/specdec/ext")
    stale = Path(root) / q4_cpu._extension_name() / "lock"
    stale.write_text("")  # as the dead build left it
    done = subprocess.run(
        [sys.executable, "-c", "from specdec.kernels import q4_cpu; "
         "print(q4_cpu.load_kernel(use_simd=False) is not None)"],
        capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "True"
    assert "left by a build that did not finish" in done.stderr
    assert not stale.exists()
