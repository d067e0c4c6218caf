"""Tensor parallelism over torch.distributed: the layers' split and the sharded weights.

The target model is split across N ranks (the processes: specdec/model/parallel_workers.py).
Megatron's split, per decoder layer (vLLM's layout):
- qkv_proj and gate_up_proj are column-parallel: rank r holds its query heads, its KV heads
  and its slice of the intermediate rows; no communication.
- o_proj and down_proj are row-parallel (the matching input columns), then one all-reduce
  each; a row-parallel bias is added by rank 0 only.
- embed_tokens and lm_head are vocabulary-parallel: rank r holds rows [r V/N, (r+1) V/N);
  an id outside them embeds to zero there (then all-reduce), and rank 0 gathers the logits.
Each rank reads only its slices of the checkpoint (safetensors `get_slice`).

Glossary:
- KV group: the query heads that share one KV head (num_heads / num_kv_heads of them).
- replicated KV heads: with fewer KV heads than ranks (N % num_kv_heads == 0) every rank holds
  the one KV head its query heads read, so N / num_kv_heads ranks hold a copy of each.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor


# ---------------------------------------------------------------------------------- layout

@dataclass(frozen=True, slots=True)
class ShardLayout:
    """Which global rows of each split tensor rank `rank` of `world_size` holds.

    Ranges are in heads (q_heads, kv_heads), intermediate rows and vocabulary rows; the
    vocabulary shard is padded to `vocab_rows` rows so that every rank's logits have the same
    width (the padding rows are zero and cut off after the gather)."""

    rank: int
    world_size: int
    q_heads: range
    kv_heads: range
    intermediate: range
    vocab: range
    vocab_rows: int


def _split(total: int, rank: int, world_size: int) -> range:
    """Rank's contiguous share of `total` items, as even as possible (the first ones larger)."""
    base, extra = divmod(total, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def shard_layout(arch, rank: int, world_size: int) -> ShardLayout:
    """The rank's slice of a model (`arch`: specdec.model.llama._Arch).

    KV heads split when num_kv_heads % N == 0 and are replicated when N % num_kv_heads == 0
    (vLLM's two cases). Otherwise, with more KV heads than ranks, the KV groups are split as
    evenly as they go (SmolLM2-135M: 9 heads in 3 groups -> 6 + 3 heads at N = 2), a case vLLM
    refuses; query heads always follow their KV group, so a rank's heads keep the model's
    grouping. The intermediate rows split as evenly as they go."""
    heads, kv = arch.num_attention_heads, arch.num_key_value_heads
    group = heads // kv  # query heads per KV head
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if kv >= world_size:
        kv_heads = _split(kv, rank, world_size)
        q_heads = range(kv_heads.start * group, kv_heads.stop * group)
    elif world_size % kv == 0:
        copies = world_size // kv  # ranks per KV head
        if group % copies:
            raise ValueError(f"parallel.tensor_parallel_size={world_size}: the "
                             f"{group} query heads per KV head do not split over the "
                             f"{copies} ranks that share each of the {kv} KV heads")
        kv_heads = range(rank // copies, rank // copies + 1)
        per_rank = group // copies
        q_heads = range(rank * per_rank, (rank + 1) * per_rank)
    else:
        raise ValueError(f"parallel.tensor_parallel_size must divide num_key_value_heads={kv} "
                         f"or be a multiple of it when larger, got {world_size}")
    if arch.intermediate_size < world_size:
        raise ValueError(f"parallel.tensor_parallel_size must be <= intermediate_size="
                         f"{arch.intermediate_size}, got {world_size}")
    vocab_rows = -(-arch.vocab_size // world_size)
    start = rank * vocab_rows
    vocab = range(min(start, arch.vocab_size), min(start + vocab_rows, arch.vocab_size))
    return ShardLayout(rank, world_size, q_heads, kv_heads,
                       _split(arch.intermediate_size, rank, world_size), vocab, vocab_rows)


# ---------------------------------------------------------------------------------- collectives

class TensorParallel:
    """One rank's shard layout and the collectives its forward runs (specdec/model/llama.py
    calls `shard_arch`, `embed`, `all_reduce` and `gather_logits`).

    `comm_s` adds up the seconds spent in collectives (the benchmark reads it)."""

    def __init__(self, rank: int, world_size: int, group=None) -> None:
        self.rank = rank
        self.world_size = world_size
        self.group = group  # the compute group; None: the default group
        self.layout: ShardLayout | None = None
        self.comm_s = 0.0

    def shard_arch(self, arch):
        """The per-rank arch: local head, KV head, intermediate and vocabulary counts."""
        import dataclasses
        self.layout = shard_layout(arch, self.rank, self.world_size)
        lay = self.layout
        return dataclasses.replace(arch, num_attention_heads=len(lay.q_heads),
                                   num_key_value_heads=len(lay.kv_heads),
                                   intermediate_size=len(lay.intermediate),
                                   vocab_size=lay.vocab_rows)

    def all_reduce(self, x: Tensor) -> Tensor:
        # NOTE: contiguous: the CPU Linear's few-row path returns a transposed view, and a
        # collective works on the storage
        x = x.contiguous()
        t0 = time.perf_counter()
        dist.all_reduce(x, group=self.group)
        self.comm_s += time.perf_counter() - t0
        return x

    def embed(self, weight: Tensor, input_ids: Tensor) -> Tensor:
        """Vocabulary-parallel embedding: [num_tokens] -> [num_tokens, hidden] on every rank."""
        vocab = self.layout.vocab
        local = input_ids - vocab.start
        outside = (local < 0) | (local >= len(vocab))  # [num_tokens]
        hidden = F.embedding(local.masked_fill(outside, 0), weight)
        return self.all_reduce(hidden.masked_fill(outside[:, None], 0.0))

    def gather_logits(self, logits: Tensor, vocab_size: int) -> Tensor | None:
        """[num_logits, vocab_rows] per rank -> [num_logits, vocab_size] on rank 0, None on
        the others."""
        t0 = time.perf_counter()
        logits = logits.contiguous()
        parts = ([torch.empty_like(logits) for _ in range(self.world_size)]
                 if self.rank == 0 else None)
        dist.gather(logits, parts, dst=0, group=self.group)
        self.comm_s += time.perf_counter() - t0
        if self.rank != 0:
            return None
        return torch.cat(parts, dim=-1)[:, :vocab_size]


# ---------------------------------------------------------------------------------- weights

_COLUMN = {"q_proj": "q", "k_proj": "kv", "v_proj": "kv", "gate_proj": "mlp", "up_proj": "mlp"}
_ROW = {"o_proj": "q", "down_proj": "mlp"}


def _shard_of(hf_name: str, layout: ShardLayout, head_dim: int):
    """(dim, start, stop, rows) of the checkpoint tensor this rank reads: dim 0 or 1 is split,
    None: read whole; rows pads the vocabulary shard. "zero": a row-parallel bias off rank 0."""
    parts = hf_name.split(".")
    name, kind = parts[-2] if len(parts) >= 2 else "", parts[-1]
    spans = {"q": (layout.q_heads.start * head_dim, layout.q_heads.stop * head_dim),
             "kv": (layout.kv_heads.start * head_dim, layout.kv_heads.stop * head_dim),
             "mlp": (layout.intermediate.start, layout.intermediate.stop)}
    if name in _COLUMN:
        return (0, *spans[_COLUMN[name]], None)
    if name in _ROW:
        if kind == "bias":
            return None if layout.rank == 0 else "zero"
        return (1, *spans[_ROW[name]], None)
    if name in ("embed_tokens", "lm_head"):
        return (0, layout.vocab.start, layout.vocab.stop, layout.vocab_rows)
    return None


def load_sharded(model, path: str) -> None:
    """Read this rank's slices of every checkpoint tensor (safetensors `get_slice`: only those
    bytes are read) into the sharded model; ValueError naming a missing tensor."""
    from safetensors import safe_open

    from specdec.model.weights import safetensors_files

    layout = model.tp.layout

    def tensors():
        for file in safetensors_files(path):
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    shard = _shard_of(name, layout, model.head_dim)
                    if shard is None:
                        yield name, f.get_tensor(name)
                        continue
                    if shard == "zero":
                        yield name, torch.zeros(f.get_slice(name).get_shape())
                        continue
                    dim, start, stop, rows = shard
                    piece = f.get_slice(name)
                    tensor = piece[start:stop] if dim == 0 else piece[:, start:stop]
                    if rows is not None and tensor.shape[0] < rows:
                        tensor = F.pad(tensor, (0, 0, 0, rows - tensor.shape[0]))
                    yield name, tensor
    model.load_weights(tensors())
