"""Random paged-attention cases shared by the GPU tests and the CPU kernel emulation test.

A case scatters each sequence's context over a random permutation of KV blocks; block 0, the
unused blocks and every slot past a sequence's seq_len are NaN, so a kernel that reads a padded
block-table entry or a position beyond the context shows NaN in its output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from specdec.kernels import ops


@dataclass(slots=True)
class AttentionCase:
    query: Tensor          # [num_rows, num_heads, head_dim] (a strided view of a qkv tensor)
    k_cache: Tensor        # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: Tensor
    block_tables: Tensor   # [num_seqs, max_blocks_per_seq] int32, padded with block 0 (NaN)
    seq_lens: Tensor       # [num_seqs] int32 (0 for padding sequences)
    query_start_loc: Tensor  # [num_seqs + 1] int32
    query_lens: list[int]
    seq_lens_list: list[int]
    scale: float
    real_rows: Tensor      # [num_rows] bool: rows of sequences with seq_len > 0

    def reference(self) -> Tensor:
        """fp32 torch reference over the real sequences; padding rows are zero."""
        # -> [num_rows, num_heads, head_dim] float32
        real = [s for s, n in enumerate(self.seq_lens_list) if n > 0]
        out = torch.zeros(self.query.shape, dtype=torch.float32, device=self.query.device)
        starts = self.query_start_loc.tolist()
        rows = torch.cat([torch.arange(starts[s], starts[s + 1]) for s in real])
        qsl = torch.tensor([0] + [self.query_lens[s] for s in real]).cumsum(0).to(torch.int32)
        ref = ops.paged_attention(
            self.query.float().cpu()[rows], self.k_cache.float().cpu(),
            self.v_cache.float().cpu(), self.block_tables.cpu()[real],
            self.seq_lens.cpu()[real], qsl, self.scale, [self.query_lens[s] for s in real],
            [self.seq_lens_list[s] for s in real])
        out[rows.to(out.device)] = ref.to(out.device)
        return out


def make_attention_case(windows: list[tuple[int, int]], num_heads: int, num_kv_heads: int,
                        head_dim: int, block_size: int, dtype: torch.dtype,
                        device: str | torch.device = "cpu", seed: int = 0,
                        extra_table_cols: int = 2) -> AttentionCase:
    """`windows`: (query_len, seq_len) per sequence; seq_len 0 makes a padding sequence."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-n // block_size) for _, n in windows]
    num_blocks = 1 + sum(blocks_per_seq) + 3
    perm = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    k_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan"))
    v_cache = torch.full_like(k_cache, float("nan"))
    max_blocks = max(blocks_per_seq) + extra_table_cols
    block_tables = torch.zeros(len(windows), max_blocks, dtype=torch.int32)
    used = 0
    for s, (_, seq_len) in enumerate(windows):
        ids = perm[used:used + blocks_per_seq[s]]
        used += blocks_per_seq[s]
        block_tables[s, :len(ids)] = torch.tensor(ids, dtype=torch.int32)
        for pos in range(seq_len):
            blk, off = ids[pos // block_size], pos % block_size
            k_cache[blk, off] = torch.randn(num_kv_heads, head_dim, generator=gen)
            v_cache[blk, off] = torch.randn(num_kv_heads, head_dim, generator=gen)
    query_lens = [q for q, _ in windows]
    num_rows = sum(query_lens)
    # NOTE: query as a strided view of a fused qkv row, as the model produces it.
    qkv_width = (num_heads + 2 * num_kv_heads) * head_dim
    qkv = torch.randn(num_rows, qkv_width, generator=gen)
    query = qkv.to(dtype).to(device)[:, :num_heads * head_dim].view(num_rows, num_heads, head_dim)
    starts = [0]
    for q in query_lens:
        starts.append(starts[-1] + q)
    real_rows = torch.zeros(num_rows, dtype=torch.bool)
    for s, (q, n) in enumerate(windows):
        real_rows[starts[s]:starts[s + 1]] = n > 0
    return AttentionCase(
        query=query, k_cache=k_cache.to(dtype).to(device), v_cache=v_cache.to(dtype).to(device),
        block_tables=block_tables.to(device),
        seq_lens=torch.tensor([n for _, n in windows], dtype=torch.int32, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        query_lens=query_lens, seq_lens_list=[n for _, n in windows],
        scale=head_dim ** -0.5, real_rows=real_rows.to(device))


# (query_len, seq_len) mixes: decode, verify (k + 1), long prefill chunks, padding, empty windows.
WINDOW_MIXES = {
    "decode": [(1, 1), (1, 17), (1, 64), (1, 300)],
    "verify": [(5, 5), (5, 33), (9, 120), (2, 16)],
    "prefill": [(200, 200), (64, 130), (1, 40)],
    "mixed": [(1, 77), (0, 12), (5, 21), (150, 170), (3, 3), (1, 2)],
    "padded": [(4, 30), (4, 9), (4, 0), (4, 0)],
}


def relative_error(out: Tensor, ref: Tensor) -> float:
    """max |out - ref| / max |ref| over all elements (NaN anywhere gives NaN)."""
    out, ref = out.float(), ref.float()
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-6))
