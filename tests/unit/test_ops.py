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


# ---------------------------------------------------------------------------------------------
# Split-context (flash-decoding) math and the SDPA prefill path, against the naive attention.

@pytest.mark.parametrize("num_splits", [1, 2, 3, 7, 16])
@pytest.mark.parametrize("case", list(WINDOWS))
def test_split_partials_combine_to_attention(case, num_splits):
    windows = WINDOWS[case]
    query, k_cache, v_cache, block_tables, seq_lens, qsl, query_lens, contexts = _make_case(
        16, 8, 2, windows, seed=num_splits)
    scale = 16 ** -0.5
    parts = ops.split_attention_partials(query, k_cache, v_cache, block_tables, query_lens,
                                         seq_lens, scale, num_splits)
    out = ops.combine_partials(*parts)
    start = 0
    for (query_len, _), (keys, values) in zip(windows, contexts):
        expected = _naive_attention(query[start:start + query_len], keys, values, scale)
        torch.testing.assert_close(out[start:start + query_len], expected, atol=1e-5, rtol=1e-5)
        start += query_len
    # Causality is per split: the first row of a 19-token window sees no key of a late split.
    part_max = parts[1]
    if case == "ragged" and num_splits == 16:
        assert part_max.isneginf().any()


def test_split_ranges_cover_the_context_in_tiles():
    for seq_len in (1, 15, 16, 17, 100, 1000):
        for num_splits in (1, 2, 5, 64):
            ranges = ops.split_ranges(seq_len, num_splits)
            assert len(ranges) == num_splits
            assert ranges[0][0] == 0 and ranges[-1][1] == seq_len
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            assert all(b % ops.SPLIT_TILE == 0 for b, e in ranges if b < e)


def test_combine_of_padding_rows_is_zero():
    acc = torch.zeros(2, 3, 4, 8)
    maxes = torch.full((2, 3, 4), float("-inf"))
    assert torch.equal(ops.combine_partials(acc, maxes, torch.zeros(2, 3, 4)),
                       torch.zeros(2, 3, 8))


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (8, 2)])
@pytest.mark.parametrize("window", [(40, 40), (33, 70), (64, 100)])
def test_prefill_attention_sdpa_bottom_right(window, num_heads, num_kv_heads):
    query, k_cache, v_cache, block_tables, seq_lens, qsl, query_lens, contexts = _make_case(
        16, num_heads, num_kv_heads, [window], seed=window[1])
    out = ops.prefill_attention(query, k_cache, v_cache, block_tables[0], window[0], window[1],
                                0.25)
    torch.testing.assert_close(out, _naive_attention(query, *contexts[0], 0.25),
                               atol=1e-5, rtol=1e-5)


def test_split_plan():
    from specdec.kernels.cupy import MAX_SPLITS, SPLIT_SLOTS_PER_BLOCK, split_plan

    # Qwen2.5-1.5B at batch 1: 2 KV heads of 6 query heads; decode, then a k=4 verify window.
    assert split_plan(1, 2, 6, 1, 4096, 132) == (1, MAX_SPLITS)
    slot_groups, splits = split_plan(1, 2, 6, 5, 4096, 132)
    assert slot_groups == 2 and splits == MAX_SPLITS  # 30 slots -> 2 groups of 16
    # Many sequences already fill the GPU: no split.
    assert split_plan(64, 8, 4, 1, 4096, 132) == (1, 1)
    # A short table caps the splits at one per two tiles.
    assert split_plan(1, 1, 1, 1, 64, 132) == (1, 2)
    assert split_plan(2, 2, 8, 1, 8192, 132)[0] * SPLIT_SLOTS_PER_BLOCK >= 8
    with pytest.raises(ValueError, match="max_query_len must be >= 1, got 0"):
        split_plan(1, 1, 1, 0, 64, 132)
