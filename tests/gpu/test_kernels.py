"""CuPy kernels vs the torch reference on fresh random inputs (needs CUDA and CuPy)."""

from __future__ import annotations

import pytest
import torch

from specdec.kernels import ops
from tests.gpu.cases import WINDOW_MIXES, make_attention_case, relative_error
from tests.gpu.conftest import poison_allocator

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


@pytest.mark.parametrize("mix", sorted(WINDOW_MIXES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (7, 1)])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_paged_attention(kernels, mix, dtype, block_size, heads, head_dim) -> None:
    num_heads, num_kv_heads = heads
    case = make_attention_case(WINDOW_MIXES[mix], num_heads, num_kv_heads, head_dim,
                               block_size, dtype, device="cuda",
                               seed=sum(map(ord, mix)) + block_size + head_dim)
    poison_allocator(case.query.shape, dtype)
    # Through ops, as the model calls it: CUDA tensors dispatch to the kernel.
    out = ops.paged_attention(case.query, case.k_cache, case.v_cache, case.block_tables,
                              case.seq_lens, case.query_start_loc, case.scale,
                              case.query_lens, case.seq_lens_list)
    torch.cuda.synchronize()
    ref = case.reference()
    real = case.real_rows
    assert not out.isnan().any(), "an output element was not written (or a NaN slot was read)"
    assert relative_error(out[real], ref[real]) <= TOLERANCE[dtype]
    assert (out[~real] == 0).all()


def test_paged_attention_head_dims_32_256(kernels) -> None:
    for head_dim in (32, 256):
        case = make_attention_case(WINDOW_MIXES["mixed"], 4, 2, head_dim, 16, torch.bfloat16,
                                   device="cuda", seed=head_dim)
        out = kernels.paged_attention(case.query, case.k_cache, case.v_cache,
                                      case.block_tables, case.seq_lens, case.query_start_loc,
                                      case.scale)
        real = case.real_rows
        assert relative_error(out[real], case.reference()[real]) <= 1e-2, head_dim


def test_paged_attention_row_chunks(kernels, monkeypatch) -> None:
    """More rows than one launch's grid-y: the row_offset chunking covers every row."""
    monkeypatch.setattr(kernels, "MAX_GRID_Y", 7)
    case = make_attention_case(WINDOW_MIXES["verify"], 8, 2, 64, 16, torch.float32,
                               device="cuda", seed=5)
    poison_allocator(case.query.shape, torch.float32)
    out = kernels.paged_attention(case.query, case.k_cache, case.v_cache, case.block_tables,
                                  case.seq_lens, case.query_start_loc, case.scale)
    assert relative_error(out, case.reference()) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_kv_heads,head_dim", [(2, 64), (1, 128), (3, 5)])
def test_write_kv(kernels, dtype, num_kv_heads, head_dim) -> None:
    num_blocks, block_size, num_tokens = 8, 16, 21
    gen = torch.Generator().manual_seed(num_kv_heads * 100 + head_dim)
    row = num_kv_heads * head_dim
    qkv = torch.randn(num_tokens, 4 * row, generator=gen).to(dtype)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[::5] = -1
    cases = []
    for device in ("cpu", "cuda"):
        fused = qkv.to(device)
        key = fused[:, row:2 * row].view(num_tokens, num_kv_heads, head_dim)  # strided view
        value = fused[:, 3 * row:].view(num_tokens, num_kv_heads, head_dim)
        k_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), 3.0,
                             dtype=dtype, device=device)
        v_cache = torch.full_like(k_cache, -3.0)
        ops.write_kv(key, value, k_cache, v_cache, slots.to(device))
        cases.append((k_cache.cpu(), v_cache.cpu()))
    (k_ref, v_ref), (k_out, v_out) = cases
    assert torch.equal(k_out, k_ref) and torch.equal(v_out, v_ref)


def test_kernels_capture_in_cuda_graph(kernels) -> None:
    """Both kernels replay from a CUDA graph and read the device tensors at replay time."""
    case = make_attention_case([(1, 20), (1, 40)], 4, 2, 64, 16, torch.bfloat16,
                               device="cuda", seed=11)
    seq_lens = case.seq_lens.clone()
    out = kernels.paged_attention(case.query, case.k_cache, case.v_cache, case.block_tables,
                                  seq_lens, case.query_start_loc, case.scale)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = kernels.paged_attention(case.query, case.k_cache, case.v_cache,
                                      case.block_tables, seq_lens, case.query_start_loc,
                                      case.scale)
    seq_lens.copy_(torch.tensor([7, 33], dtype=torch.int32))  # changed after capture
    graph.replay()
    torch.cuda.synchronize()
    case.seq_lens.copy_(seq_lens)
    case.seq_lens_list[:] = [7, 33]
    assert relative_error(out, case.reference()) <= 1e-2


@pytest.mark.parametrize("mix", sorted(WINDOW_MIXES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl,lists", [("single", False), ("split", False), ("split", True)])
def test_paged_attention_impls(kernels, mix, dtype, impl, lists) -> None:
    """Both kernels, and the split path with the CPU lists (long windows through SDPA) and
    without (every window in the split kernel, grid sized for the whole batch)."""
    case = make_attention_case(WINDOW_MIXES[mix], 12, 2, 128, 16, dtype, device="cuda",
                               seed=len(mix) + 3)
    poison_allocator(case.query.shape, dtype)
    extra = (case.query_lens, case.seq_lens_list) if lists else ()
    out = kernels.paged_attention(case.query, case.k_cache, case.v_cache, case.block_tables,
                                  case.seq_lens, case.query_start_loc, case.scale, *extra,
                                  impl=impl)
    torch.cuda.synchronize()
    real = case.real_rows
    assert not out.isnan().any()
    assert relative_error(out[real], case.reference()[real]) <= TOLERANCE[dtype]
    assert (out[~real] == 0).all()
