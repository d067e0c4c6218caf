"""The hot ops over the paged KV cache, in pure torch. On the CPU this IS the fast path; CUDA
tensors dispatch to `specdec.kernels.cupy` (CuPy kernels with the same signatures).

Glossary:
    slot        block_id * block_size + offset: one token's row in the flattened cache
    window      the query rows of one sequence in this step (a prefill chunk, one decode token,
                or a verify window [last token, d1..dk]); positions seq_len - query_len ...
                seq_len - 1, causal inside itself, attending to the whole cached context
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _use_kernels(tensor: Tensor, head_dim: int, use_kernels: bool) -> bool:
    """CUDA tensors go to the CuPy kernels unless the caller asks for the torch reference.
    NOTE: no silent fallback: the engine checks at start-up (`cupy.require`) that the kernels
    load and support its shapes, so a failure here is an error, not a slow path."""
    if not (tensor.is_cuda and use_kernels):
        return False
    from specdec.kernels import cupy as kernels
    kernels.require(head_dim, tensor.dtype)
    return True


def _use_fused(tensor: Tensor, use_kernels: bool) -> bool:
    """Like `_use_kernels`, for the element-wise fused kernels (any shape, dtype checked)."""
    if not (tensor.is_cuda and use_kernels):
        return False
    from specdec.kernels import cupy as kernels
    kernels.load()
    return True


def rms_norm(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None,
             use_kernels: bool = True) -> tuple[Tensor, Tensor | None]:
    """RMS normalization scaled by `weight`; with `residual`, of (residual + x) instead, and
    that sum is returned too (the CUDA kernel writes it into `residual` in place)."""
    # x, residual: [num_tokens, hidden]; weight: [hidden]
    if _use_fused(x, use_kernels):
        from specdec.kernels import cupy as kernels
        return kernels.rms_norm(x, weight, eps, residual)
    if residual is not None:
        x = residual = residual + x
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps), residual
    # NOTE: like transformers: normalize in float32, cast back, then scale.
    normed = F.rms_norm(x.float(), (x.shape[-1],), None, eps)
    return weight * normed.to(x.dtype), residual


def silu_mul(gate_up: Tensor, use_kernels: bool = True) -> Tensor:
    """silu(gate) * up over the fused projection's output [num_tokens, 2 * inter]."""
    if _use_fused(gate_up, use_kernels):
        from specdec.kernels import cupy as kernels
        return kernels.silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding, half-split layout (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)."""
    # x: [num_tokens, heads, head_dim]; cos, sin: [num_tokens, 1, head_dim // 2]
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def rope_write_kv(query: Tensor, key: Tensor, value: Tensor, cos: Tensor, sin: Tensor,
                  k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor,
                  use_kernels: bool = True) -> Tensor:
    """Rotate query and key, write the rotated key and the value into the paged cache (slot
    -1 skipped) and return the rotated query (CUDA: rotated in place, one kernel)."""
    # query: [num_tokens, num_heads, head_dim]; key, value: [num_tokens, num_kv_heads, head_dim]
    if _use_fused(query, use_kernels):
        from specdec.kernels import cupy as kernels
        return kernels.rope_write_kv(query, key, value, cos, sin, k_cache, v_cache,
                                     slot_mapping)
    write_kv(rotate(key, cos, sin), value, k_cache, v_cache, slot_mapping, use_kernels=False)
    return rotate(query, cos, sin)


def write_kv(key: Tensor, value: Tensor, k_cache: Tensor, v_cache: Tensor,
             slot_mapping: Tensor, use_kernels: bool = True) -> None:
    """Scatter this step's keys/values into the paged cache; slot -1 is skipped (padding)."""
    # key, value: [num_tokens, num_kv_heads, head_dim]
    # k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
    # slot_mapping: [num_tokens] int64
    if _use_kernels(key, k_cache.shape[3], use_kernels):
        from specdec.kernels import cupy as kernels
        return kernels.write_kv(key, value, k_cache, v_cache, slot_mapping)
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    k_flat = k_cache.view(-1, num_kv_heads, head_dim)  # [num_slots, num_kv_heads, head_dim]
    v_flat = v_cache.view(-1, num_kv_heads, head_dim)
    num_tokens = slot_mapping.shape[0]
    if num_tokens == 1:
        slot = int(slot_mapping[0])
        if slot >= 0:
            k_flat[slot] = key[0]
            v_flat[slot] = value[0]
        return None
    valid = slot_mapping >= 0
    if bool(valid.all()):
        k_flat.index_copy_(0, slot_mapping, key)
        v_flat.index_copy_(0, slot_mapping, value)
    else:
        slots = slot_mapping[valid]
        k_flat.index_copy_(0, slots, key[valid])
        v_flat.index_copy_(0, slots, value[valid])
    return None


def _gather_context(cache: Tensor, block_table: Tensor, seq_len: int) -> Tensor:
    """The first seq_len cached rows of one sequence, heads first for SDPA."""
    # cache: [num_blocks, block_size, num_kv_heads, head_dim]; block_table: [max_blocks] int32
    block_size = cache.shape[1]
    num_blocks = (seq_len + block_size - 1) // block_size
    blocks = cache.index_select(0, block_table[:num_blocks])
    ctx = blocks.flatten(0, 1)[:seq_len]  # [seq_len, num_kv_heads, head_dim]
    return ctx.transpose(0, 1)  # [num_kv_heads, seq_len, head_dim]


def window_mask(query_len: int, seq_len: int, device: torch.device) -> Tensor:
    """Bool mask [query_len, seq_len]: query row i (position seq_len - query_len + i) sees keys
    at positions <= its own."""
    key_pos = torch.arange(seq_len, device=device)
    query_pos = torch.arange(seq_len - query_len, seq_len, device=device)
    return key_pos[None, :] <= query_pos[:, None]


def paged_attention(query: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                    seq_lens: Tensor, query_start_loc: Tensor, scale: float,
                    query_lens: list[int], seq_lens_list: list[int],
                    use_kernels: bool = True) -> Tensor:
    """Attention of each sequence's window over its cached context (which already holds this
    step's keys/values). GQA: num_heads % num_kv_heads == 0."""
    # query: [num_tokens, num_heads, head_dim] -> out: [num_tokens, num_heads, head_dim]
    # block_tables: [num_seqs, max_blocks_per_seq] int32; seq_lens: [num_seqs] int32
    # query_start_loc: [num_seqs + 1] int32
    if _use_kernels(query, query.shape[2], use_kernels):
        from specdec.kernels import cupy as kernels
        return kernels.paged_attention(query, k_cache, v_cache, block_tables, seq_lens,
                                       query_start_loc, scale, query_lens, seq_lens_list)
    num_heads, num_kv_heads = query.shape[1], k_cache.shape[2]
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads={num_heads} must be a multiple of "
                         f"num_kv_heads={num_kv_heads}")
    if len(query_lens) == 1:  # NOTE: batch-1 decode/prefill: no split, no copy of the output
        return _attend_one(query, k_cache, v_cache, block_tables[0], query_lens[0],
                           seq_lens_list[0], scale)
    if min(query_lens) == max(query_lens) and query_lens[0] > 0:
        # NOTE: a batch of decodes, or of verify windows with the same k: one padded SDPA
        # instead of a Python loop over sequences.
        return _attend_uniform(query, k_cache, v_cache, block_tables, seq_lens, query_lens[0],
                               max(seq_lens_list), scale)
    out = torch.empty_like(query)
    start = 0
    for seq, (query_len, seq_len) in enumerate(zip(query_lens, seq_lens_list)):
        end = start + query_len
        if query_len > 0:
            out[start:end] = _attend_one(query[start:end], k_cache, v_cache, block_tables[seq],
                                         query_len, seq_len, scale)
        start = end
    return out


def prefill_attention(query: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor,
                      query_len: int, seq_len: int, scale: float) -> Tensor:
    """One long window (a prefill chunk) through SDPA with a bottom-right causal mask: query
    row i sits at position seq_len - query_len + i. On CUDA SDPA picks a flash or
    memory-efficient kernel, which is compute-bound where the decode kernels are not."""
    from torch.nn.attention.bias import causal_lower_right

    # query: [query_len, num_heads, head_dim] -> [query_len, num_heads, head_dim]
    keys = _gather_context(k_cache, block_table, seq_len)  # [num_kv_heads, seq_len, head_dim]
    values = _gather_context(v_cache, block_table, seq_len)
    group = query.shape[1] // keys.shape[0]
    if group > 1:
        keys = keys.repeat_interleave(group, dim=0)  # [num_heads, seq_len, head_dim]
        values = values.repeat_interleave(group, dim=0)
    rows = query.transpose(0, 1)[None]  # [1, num_heads, query_len, head_dim]
    out = F.scaled_dot_product_attention(rows, keys[None], values[None],
                                         attn_mask=causal_lower_right(query_len, seq_len),
                                         scale=scale)
    return out[0].transpose(0, 1)


SPLIT_TILE = 16  # keys per tile of the split-context kernel (kTile in paged_attention.cu)


def split_ranges(seq_len: int, num_splits: int, tile: int = SPLIT_TILE) -> list[tuple[int, int]]:
    """The split kernel's key ranges [begin, end) of a context, one per split (empty ones
    too): ceil(ceil(seq_len / tile) / num_splits) tiles each."""
    tiles = -(-seq_len // tile)
    per_split = -(-tiles // num_splits) * tile
    return [(min(s * per_split, seq_len), min((s + 1) * per_split, seq_len))
            for s in range(num_splits)]


def split_attention_partials(query: Tensor, k_cache: Tensor, v_cache: Tensor,
                             block_tables: Tensor, query_lens: list[int],
                             seq_lens_list: list[int], scale: float, num_splits: int
                             ) -> tuple[Tensor, Tensor, Tensor]:
    """Torch reference of the split kernel: per (row, head, split) the partial softmax state
    over the split's keys (causal inside the window). Returns (acc [rows, heads, splits,
    head_dim], max [rows, heads, splits], sum [rows, heads, splits]), float32; a split that
    sees no key has (0, -inf, 0)."""
    num_rows, num_heads, head_dim = query.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    part_acc = torch.zeros(num_rows, num_heads, num_splits, head_dim)
    part_max = torch.full((num_rows, num_heads, num_splits), float("-inf"))
    part_sum = torch.zeros(num_rows, num_heads, num_splits)
    start = 0
    for seq, (query_len, seq_len) in enumerate(zip(query_lens, seq_lens_list)):
        rows = slice(start, start + query_len)
        start += query_len
        if query_len == 0 or seq_len <= 0:
            continue
        keys = _gather_context(k_cache, block_tables[seq], seq_len).float()  # [kvh, L, d]
        values = _gather_context(v_cache, block_tables[seq], seq_len).float()
        keys = keys.repeat_interleave(group, dim=0)  # [heads, L, d]
        values = values.repeat_interleave(group, dim=0)
        q = query[rows].float() * scale  # [q, heads, d]
        scores = torch.einsum("qhd,hld->qhl", q, keys)  # [q, heads, L]
        mask = window_mask(query_len, seq_len, query.device)  # [q, L]
        scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
        for s, (begin, end) in enumerate(split_ranges(seq_len, num_splits)):
            if begin >= end:
                continue
            chunk = scores[:, :, begin:end]  # [q, heads, n]
            m = chunk.amax(dim=-1)  # [q, heads]
            p = torch.exp(chunk - torch.where(m.isinf(), 0.0, m)[..., None])  # masked: 0
            part_max[rows, :, s] = m
            part_sum[rows, :, s] = p.sum(dim=-1)
            part_acc[rows, :, s] = torch.einsum("qhl,hld->qhd", p, values[:, begin:end])
    return part_acc, part_max, part_sum


def combine_partials(part_acc: Tensor, part_max: Tensor, part_sum: Tensor) -> Tensor:
    """The combine kernel's math: [rows, heads, splits, d] partials -> [rows, heads, d];
    rows with no key in any split (padding) are 0."""
    global_max = part_max.amax(dim=-1, keepdim=True)  # [rows, heads, 1]
    weight = torch.exp(part_max - torch.where(global_max.isinf(), 0.0, global_max))
    denom = (part_sum * weight).sum(dim=-1)  # [rows, heads]
    out = (part_acc * weight[..., None]).sum(dim=-2) / denom[..., None]
    return torch.where(denom[..., None] > 0, out, 0.0)


def _attend_one(query: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor,
                query_len: int, seq_len: int, scale: float) -> Tensor:
    # query: [query_len, num_heads, head_dim] -> [query_len, num_heads, head_dim]
    keys = _gather_context(k_cache, block_table, seq_len)  # [num_kv_heads, seq_len, head_dim]
    values = _gather_context(v_cache, block_table, seq_len)
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = keys.shape[0]
    group = num_heads // num_kv_heads
    # NOTE: GQA without expanding K/V: the `group` query heads that share a KV head become
    # rows of one attention problem per KV head. (SDPA's enable_gqa path is ~6x slower on
    # the CPU for decode shapes.)
    rows = query.view(query_len, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)
    rows = rows.reshape(num_kv_heads, group * query_len, head_dim)
    mask = None
    if query_len > 1:
        mask = window_mask(query_len, seq_len, query.device).repeat(group, 1)
    out = F.scaled_dot_product_attention(rows, keys, values, attn_mask=mask, scale=scale)
    out = out.view(num_kv_heads, group, query_len, head_dim).permute(2, 0, 1, 3)
    return out.reshape(query_len, num_heads, head_dim)


def _attend_uniform(query: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                    seq_lens: Tensor, query_len: int, max_seq_len: int, scale: float) -> Tensor:
    """All sequences have the same window length: pad contexts to max_seq_len and mask."""
    # query: [num_seqs * query_len, num_heads, head_dim]
    num_seqs = block_tables.shape[0]
    num_heads, head_dim = query.shape[1], query.shape[2]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    num_blocks = (max_seq_len + block_size - 1) // block_size
    table = block_tables[:, :num_blocks]  # [num_seqs, num_blocks]

    key_pos = torch.arange(max_seq_len, device=query.device)  # [max_seq_len]
    # NOTE: the padded tail may hold stale or poisoned rows (NaN * 0 is NaN): zero them.
    valid = key_pos[None, :] < seq_lens.to(torch.int64)[:, None]  # [num_seqs, max_seq_len]

    def gather(cache: Tensor) -> Tensor:  # -> [num_seqs, num_kv_heads, max_seq_len, head_dim]
        ctx = cache[table].flatten(1, 2)[:, :max_seq_len]
        ctx = ctx.masked_fill(~valid[:, :, None, None], 0.0)
        return ctx.transpose(1, 2)

    rows = query.view(num_seqs, query_len, num_kv_heads, group, head_dim)
    rows = rows.permute(0, 2, 3, 1, 4).reshape(num_seqs, num_kv_heads, group * query_len,
                                               head_dim)
    offsets = torch.arange(query_len, device=query.device) - query_len + 1  # [query_len]
    last_pos = seq_lens.to(torch.int64)[:, None] - 1 + offsets[None, :]  # [num_seqs, q]
    mask = key_pos[None, None, :] <= last_pos[:, :, None]  # [num_seqs, q, max_seq_len]
    mask = mask.repeat(1, group, 1).unsqueeze(1)  # [num_seqs, 1, group * q, max_seq_len]
    out = F.scaled_dot_product_attention(rows, gather(k_cache), gather(v_cache),
                                         attn_mask=mask, scale=scale)
    out = out.view(num_seqs, num_kv_heads, group, query_len, head_dim).permute(0, 3, 1, 2, 4)
    return out.reshape(num_seqs * query_len, num_heads, head_dim)


def lora_shrink(x: Tensor, a_stack: Tensor, row_slots: Tensor, seg_starts: Tensor | None = None,
                max_seg_len: int = 1, use_kernels: bool = True) -> Tensor:
    """LoRA shrink, Punica's BGMV/SGMV: row t gets x[t] @ A[row_slots[t]]^T in float32; rows
    whose slot is < 0 (the base) or >= num_slots get zeros. `seg_starts` [num_segments + 1]
    groups rows into segments of one slot each (the CUDA SGMV kernel reads the slot at a
    segment's first row; `max_seg_len` sizes its grid); the reference needs neither."""
    # x: [num_rows, in]; a_stack: [num_slots, rank_total, in]; row_slots: [num_rows] int
    # -> [num_rows, rank_total] float32
    if _use_fused(x, use_kernels):
        from specdec.kernels import cupy as kernels
        return kernels.lora_shrink(x, a_stack, row_slots, seg_starts, max_seg_len)
    num_slots, rank_total, _ = a_stack.shape
    out = torch.zeros(x.shape[0], rank_total, dtype=torch.float32, device=x.device)
    slots = row_slots.long()
    for slot in range(num_slots):
        rows = (slots == slot).nonzero().flatten()
        if rows.numel():
            out[rows] = x[rows].float() @ a_stack[slot].float().t()
    return out


def lora_expand(y: Tensor, shrink: Tensor, b_list: list[Tensor], offsets: list[int],
                row_slots: Tensor, r_max: int, seg_starts: Tensor | None = None,
                max_seg_len: int = 1, use_kernels: bool = True) -> Tensor:
    """LoRA expand, slice by slice, in place: y[t, offsets[i]:offsets[i] + size_i] +=
    shrink[t, i * r_max:(i + 1) * r_max] @ B_i[row_slots[t]]^T (summed in float32, rounded
    once into y's dtype); base rows (slot < 0 or >= num_slots) and other columns untouched."""
    # y: [num_rows, out]; shrink: [num_rows, len(b_list) * r_max] float32
    # b_list[i]: [num_slots, size_i, r_max]
    if _use_fused(y, use_kernels):
        from specdec.kernels import cupy as kernels
        return kernels.lora_expand(y, shrink, b_list, offsets, row_slots, r_max, seg_starts,
                                   max_seg_len)
    slots = row_slots.long()
    for slot in range(b_list[0].shape[0]):
        rows = (slots == slot).nonzero().flatten()
        if not rows.numel():
            continue
        for i, (b, offset) in enumerate(zip(b_list, offsets)):
            cols = slice(offset, offset + b.shape[1])
            delta = shrink[rows, i * r_max:(i + 1) * r_max] @ b[slot].float().t()
            y[rows, cols] = (y[rows, cols].float() + delta).to(y.dtype)
    return y
