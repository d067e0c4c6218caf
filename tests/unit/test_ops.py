"""ops.paged_attention / ops.write_kv against a naive per-sequence attention."""

from __future__ import annotations

import math
import random

import pytest
import torch

from specdec.kernels import ops


def _naive_attention(query, keys, values, scale):
    """query [q, H, D], keys/values [S, KVH, D] (contiguous context); causal window at the end."""
    query_len, num_heads, _ = query.shape
    seq_len, num_kv_heads, _ = keys.shape
    group = num_heads // num_kv_heads
    out = torch.empty_like(query)
    for h in range(num_heads):
        k = keys[:, h // group].double()  # [S, D]
        v = values[:, h // group].double()
        for i in range(query_len):
            pos = seq_len - query_len + i
            scores = (k[: pos + 1] @ query[i, h].double()) * scale  # [pos + 1]
            out[i, h] = (scores.softmax(-1) @ v[: pos + 1]).to(query.dtype)
    return out


def _make_case(block_size, num_heads, num_kv_heads, windows, seed, head_dim=16):
    """windows: (query_len, seq_len) per sequence. Returns tensors + per-sequence contexts."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    blocks_needed = [math.ceil(s / block_size) for _, s in windows]
    num_blocks = sum(blocks_needed) + 3
    free = list(range(num_blocks))
    rng.shuffle(free)
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    tables, contexts = [], []
    for n in blocks_needed:
        table = [free.pop() for _ in range(n)]
        tables.append(table)
    # poison every slot outside the sequences' contexts: a reader of padding would see NaN
    used = torch.zeros(num_blocks * block_size, dtype=torch.bool)
    for table, (_, seq_len) in zip(tables, windows):
        for pos in range(seq_len):
            used[table[pos // block_size] * block_size + pos % block_size] = True
    k_cache.view(-1, num_kv_heads, head_dim)[~used] = float("nan")
    v_cache.view(-1, num_kv_heads, head_dim)[~used] = float("nan")
    width = max(blocks_needed)
    for table, (_, seq_len) in zip(tables, windows):
        ks = k_cache[table].flatten(0, 1)[:seq_len]
        vs = v_cache[table].flatten(0, 1)[:seq_len]
        contexts.append((ks, vs))
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    query_lens = [q for q, _ in windows]
    seq_lens = [s for _, s in windows]
    qsl = torch.tensor([0] + list(torch.tensor(query_lens).cumsum(0)), dtype=torch.int32)
    query = torch.randn(sum(query_lens), num_heads, head_dim, generator=gen)
    return query, k_cache, v_cache, block_tables, seq_lens, qsl, query_lens, contexts


WINDOWS = {
    # ragged: a decode, a verify window, a prefill chunk mid-sequence, a full prefill,
    # a window that ends exactly on a block boundary (per-sequence path)
    "ragged": [(1, 37), (5, 21), (19, 70), (33, 33), (3, 64)],
    # the batched paths: all decodes, all verify windows of the same length
    "decodes": [(1, 37), (1, 1), (1, 64), (1, 17)],
    "verify": [(4, 9), (4, 4), (4, 70), (4, 33)],
}


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (8, 2), (14, 2)])
@pytest.mark.parametrize("case", list(WINDOWS))
def test_paged_attention_matches_naive(block_size, num_heads, num_kv_heads, case):
    windows = WINDOWS[case]
    query, k_cache, v_cache, block_tables, seq_lens, qsl, query_lens, contexts = _make_case(
        block_size, num_heads, num_kv_heads, windows, seed=block_size + num_heads)
    scale = 16 ** -0.5
    out = ops.paged_attention(query, k_cache, v_cache, block_tables,
                              torch.tensor(seq_lens, dtype=torch.int32), qsl, scale,
                              query_lens, seq_lens)
    assert out.shape == query.shape
    start = 0
    for (query_len, _), (keys, values) in zip(windows, contexts):
        expected = _naive_attention(query[start:start + query_len], keys, values, scale)
        torch.testing.assert_close(out[start:start + query_len], expected, atol=1e-5, rtol=1e-5)
        start += query_len


def test_paged_attention_single_sequence_decode():
    windows = [(1, 50)]
    query, k_cache, v_cache, block_tables, seq_lens, qsl, query_lens, contexts = _make_case(
        16, 8, 1, windows, seed=3)
    out = ops.paged_attention(query, k_cache, v_cache, block_tables,
                              torch.tensor(seq_lens, dtype=torch.int32), qsl, 0.25,
                              query_lens, seq_lens)
    torch.testing.assert_close(out, _naive_attention(query, *contexts[0], 0.25),
                               atol=1e-5, rtol=1e-5)


def test_paged_attention_rejects_bad_gqa_ratio():
    windows = [(1, 5)]
    query, k_cache, v_cache, block_tables, seq_lens, qsl, query_lens, _ = _make_case(
        16, 6, 4, windows, seed=0)
    with pytest.raises(ValueError, match="num_heads=6 must be a multiple of num_kv_heads=4"):
        ops.paged_attention(query, k_cache, v_cache, block_tables,
                            torch.tensor(seq_lens, dtype=torch.int32), qsl, 1.0,
                            query_lens, seq_lens)


@pytest.mark.parametrize("num_tokens", [1, 7])
def test_write_kv_writes_slots_and_skips_minus_one(num_tokens):
    num_blocks, block_size, kv_heads, head_dim = 4, 16, 2, 8
    poison = -1234.5
    k_cache = torch.full((num_blocks, block_size, kv_heads, head_dim), poison)
    v_cache = torch.full((num_blocks, block_size, kv_heads, head_dim), poison)
    key = torch.randn(num_tokens, kv_heads, head_dim)
    value = torch.randn(num_tokens, kv_heads, head_dim)
    slots = [3 * block_size + 5, -1, 17, 0, -1, 63, 40][:num_tokens]
    ops.write_kv(key, value, k_cache, v_cache, torch.tensor(slots, dtype=torch.int64))
    k_flat = k_cache.view(-1, kv_heads, head_dim)
    v_flat = v_cache.view(-1, kv_heads, head_dim)
    written = {s for s in slots if s >= 0}
    for i, slot in enumerate(slots):
        if slot >= 0:
            assert torch.equal(k_flat[slot], key[i])
            assert torch.equal(v_flat[slot], value[i])
    untouched = [s for s in range(num_blocks * block_size) if s not in written]
    assert bool((k_flat[untouched] == poison).all())
    assert bool((v_flat[untouched] == poison).all())


def test_write_kv_single_padding_slot_writes_nothing():
    k_cache = torch.full((2, 16, 1, 4), 7.0)
    v_cache = torch.full((2, 16, 1, 4), 7.0)
    ops.write_kv(torch.zeros(1, 1, 4), torch.zeros(1, 1, 4), k_cache, v_cache,
                 torch.tensor([-1]))
    assert bool((k_cache == 7.0).all()) and bool((v_cache == 7.0).all())
