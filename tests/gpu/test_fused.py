"""The fused CUDA kernels (cuda/fused.cu) against their torch references in ops.py, on the GPU:
fresh random inputs, poisoned outputs, strided views as the model passes them."""

from __future__ import annotations

import pytest
import torch

from specdec.kernels import ops
from tests.gpu.cases import relative_error

TOLS = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 2e-3}


@pytest.mark.parametrize("dtype", list(TOLS))
@pytest.mark.parametrize("num_tokens", [1, 7, 300])
def test_rms_norm_and_residual(kernels, dtype, num_tokens):
    gen = torch.Generator(device="cuda").manual_seed(num_tokens)
    hidden = 1536
    x = (torch.randn(num_tokens, hidden + 64, device="cuda", generator=gen) * 3).to(dtype)
    x = x[:, 32:32 + hidden]
    weight = torch.randn(hidden, device="cuda", generator=gen).to(dtype)
    residual = torch.randn(num_tokens, hidden, device="cuda", generator=gen).to(dtype)
    want, want_res = ops.rms_norm(x, weight, 1e-6, residual.clone(), use_kernels=False)
    res = residual.clone()
    got, got_res = ops.rms_norm(x, weight, 1e-6, res, use_kernels=True)
    assert got_res is res and torch.equal(res, want_res)
    assert relative_error(got, want) <= TOLS[dtype]
    plain, _ = ops.rms_norm(x, weight, 1e-6, use_kernels=True)
    assert relative_error(plain, ops.rms_norm(x, weight, 1e-6, use_kernels=False)[0]) <= TOLS[dtype]


@pytest.mark.parametrize("dtype", list(TOLS))
def test_silu_mul(kernels, dtype):
    gate_up = (torch.randn(33, 2 * 8960, device="cuda") * 4).to(dtype)
    got = ops.silu_mul(gate_up, use_kernels=True)
    assert relative_error(got, ops.silu_mul(gate_up, use_kernels=False)) <= TOLS[dtype]


@pytest.mark.parametrize("dtype", list(TOLS))
@pytest.mark.parametrize("heads", [(12, 2), (14, 2), (32, 8)])
def test_rope_write_kv(kernels, dtype, heads):
    num_heads, num_kv_heads = heads
    head_dim, num_tokens, num_blocks, block_size = 128 if num_heads != 14 else 64, 37, 8, 16
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    qkv = torch.randn(num_tokens, q_size + 2 * kv_size, device="cuda").to(dtype)
    query, key, value = (t.view(num_tokens, -1, head_dim)
                         for t in qkv.split([q_size, kv_size, kv_size], dim=-1))
    angles = torch.rand(num_tokens, 1, head_dim // 2, device="cuda") * 100
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    slots = torch.randperm(num_blocks * block_size, device="cuda")[:num_tokens]
    slots[::5] = -1
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_ref, v_ref = torch.zeros(shape, dtype=dtype, device="cuda"), torch.zeros(
        shape, dtype=dtype, device="cuda")
    want = ops.rope_write_kv(query.clone(), key, value, cos, sin, k_ref, v_ref, slots,
                             use_kernels=False)
    k_cache = torch.full(shape, float("nan"), dtype=dtype, device="cuda")
    v_cache = torch.full(shape, float("nan"), dtype=dtype, device="cuda")
    got = ops.rope_write_kv(query, key, value, cos, sin, k_cache, v_cache, slots,
                            use_kernels=True)
    written = torch.zeros(num_blocks * block_size, dtype=torch.bool, device="cuda")
    written[slots[slots >= 0]] = True
    assert relative_error(got, want) <= TOLS[dtype]
    k_flat, v_flat = k_cache.view(-1, kv_size), v_cache.view(-1, kv_size)
    assert relative_error(k_flat[written], k_ref.view(-1, kv_size)[written]) <= TOLS[dtype]
    assert torch.equal(v_flat[written], v_ref.view(-1, kv_size)[written])
    assert v_flat[~written].isnan().all()  # untouched
