"""How many KV blocks to allocate when `cache.num_blocks` is 0 (auto).

The scheduler can never use more than `max_num_seqs` sequences of `max_model_len` tokens at
once, so that is the most the pool needs; `cache.memory_gb` caps it. A budget that cannot hold
one sequence of `max_model_len` tokens is a start-up error: such a server would accept
requests it could never finish.

NOTE: the KV tensors are allocated with torch.empty and the kernel hands out zero pages on
first write, so blocks the scheduler never reaches cost address space, not resident memory.
"""

from __future__ import annotations

GIB = 1 << 30


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def auto_num_blocks(memory_gb: float, bytes_per_block: int, block_size: int,
                    max_num_seqs: int, max_model_len: int) -> int:
    """KV blocks for the pool: min(max_num_seqs full-length sequences, what memory_gb holds).
    Raises ValueError if memory_gb cannot hold one max_model_len sequence."""
    if bytes_per_block <= 0:
        raise ValueError(f"bytes_per_block must be > 0, got {bytes_per_block}")
    blocks_per_seq = cdiv(max_model_len, block_size)
    fit = int(memory_gb * GIB) // bytes_per_block
    if fit < blocks_per_seq:
        need_gb = blocks_per_seq * bytes_per_block / GIB
        raise ValueError(
            f"cache.memory_gb={memory_gb} holds {fit} KV blocks of {block_size} tokens "
            f"({fit * block_size} tokens), but one sequence of model.max_model_len="
            f"{max_model_len} needs {blocks_per_seq} blocks ({need_gb:.3f} GB for this model"
            f" and its draft); raise cache.memory_gb to at least {need_gb:.3f} or lower "
            f"model.max_model_len")
    return min(fit, max_num_seqs * blocks_per_seq)


def short_pool_message(num_blocks: int, block_size: int, max_model_len: int) -> str | None:
    """For an explicit `cache.num_blocks`: None if the pool holds one max_model_len sequence,
    else what a request past it gets (the scheduler refuses it with a 400, naming the sizes).
    NOTE: a warning, not the auto rule's error: a small explicit pool is a deliberate setting
    (tests and tight deployments use one to exercise preemption)."""
    blocks_per_seq = cdiv(max_model_len, block_size)
    if num_blocks >= blocks_per_seq:
        return None
    return (f"cache.num_blocks={num_blocks} holds {num_blocks * block_size} tokens, less than "
            f"one sequence of model.max_model_len={max_model_len} ({blocks_per_seq} blocks of "
            f"{block_size}): requests that may grow past {num_blocks * block_size} tokens are "
            f"refused")
