"""BlockPool: exact eviction order, prefix-cache hits and invariants under random operations."""

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from specdec.core.block_pool import (ROOT_HASH, BlockPool, extend_block_hashes,
                                hash_block_tokens)

BS = 4


def cache_seq(pool: BlockPool, block_ids: list[int], token_ids: list[int]) -> list[int]:
    hashes = extend_block_hashes([], token_ids, pool.block_size)
    pool.cache_full_blocks(block_ids, hashes, token_ids, 0, len(token_ids) // pool.block_size)
    return hashes


def check_invariants(pool: BlockPool) -> None:
    free = list(pool.free_queue)
    free_ids = [b.block_id for b in free]
    assert len(free_ids) == len(set(free_ids)) == pool.num_free_blocks
    # Links are consistent both ways.
    backwards = []
    node = pool.free_queue.tail.prev_free
    while node is not pool.free_queue.head:
        backwards.append(node.block_id)
        node = node.prev_free
    assert backwards[::-1] == free_ids
    for block in pool.blocks:
        assert block.ref_cnt >= 0
        assert (block.ref_cnt == 0) == (block.block_id in free_ids)
        if block.ref_cnt > 0:
            assert block.prev_free is None and block.next_free is None
    for block_hash, block in pool.cached.items():
        assert block.block_hash == block_hash
        assert block_hash == hash_block_tokens(block.parent_hash, block.token_ids,
                                               block.extra_keys)
        assert len(block.token_ids) == pool.block_size


def test_hash_chain_depends_on_parent():
    hashes = extend_block_hashes([], [1, 2, 3, 4, 5, 6, 7, 8, 9], BS)
    assert len(hashes) == 2  # the partial last block is not hashed
    assert hashes[0] == hash_block_tokens(ROOT_HASH, [1, 2, 3, 4])
    assert hashes[1] == hash_block_tokens(hashes[0], [5, 6, 7, 8])
    other = extend_block_hashes([], [0, 2, 3, 4, 5, 6, 7, 8], BS)
    assert other[1] != hashes[1]  # same tokens, different prefix
    # Extending keeps the existing prefix and appends only what is missing.
    assert extend_block_hashes(hashes[:1], list(range(1, 13)), BS)[:2] == hashes


def test_scripted_eviction_order():
    pool = BlockPool(6, BS)
    assert pool.free_block_ids() == [0, 1, 2, 3, 4, 5]
    seq_a = list(range(12))
    blocks_a = pool.allocate(3)
    assert blocks_a == [0, 1, 2]
    cache_seq(pool, blocks_a, seq_a)
    # Tail-first free: the sequence's last block is evicted first.
    pool.free(reversed(blocks_a))
    assert pool.free_block_ids() == [3, 4, 5, 2, 1, 0]
    assert pool.num_used_blocks == 0 and pool.usage == 0.0

    blocks_b = pool.allocate(2)
    assert blocks_b == [3, 4] and pool.num_evictions == 0
    pool.free([4])  # never hashed: goes to the head, reused before cached blocks
    assert pool.free_block_ids() == [4, 5, 2, 1, 0]
    assert pool.usage == pytest.approx(1 / 6)

    # A hit revives cached blocks: touched blocks leave the free list, wherever they are.
    assert pool.lookup(seq_a) == [0, 1, 2]
    assert pool.lookup(seq_a[:9]) == [0, 1]
    assert pool.lookup([99] + seq_a[1:]) == []
    pool.touch([0, 1])
    assert pool.free_block_ids() == [4, 5, 2]
    assert pool.blocks[0].ref_cnt == 1

    # Allocation pops the head: 4 and 5 are plain, 2 is cached and gets evicted.
    assert pool.allocate(3) == [4, 5, 2]
    assert pool.num_evictions == 1
    assert pool.lookup(seq_a) == [0, 1]  # block 2's hash is gone
    assert pool.blocks[2].block_hash is None
    assert pool.num_free_blocks == 0
    with pytest.raises(ValueError, match="cannot allocate 1 KV blocks: only 0 of 6"):
        pool.allocate(1)

    # Shared block: freed once per reference, and LRU order follows the free order.
    pool.touch([0])
    assert pool.blocks[0].ref_cnt == 2
    pool.free([0])
    assert pool.free_block_ids() == []
    pool.free([1, 0])
    assert pool.free_block_ids() == [1, 0]
    pool.free([3, 4, 5, 2])  # all unhashed: each goes to the head
    assert pool.free_block_ids() == [2, 5, 4, 3, 1, 0]
    assert pool.num_used_blocks == 0
    check_invariants(pool)


def test_double_free_raises():
    pool = BlockPool(2, BS)
    (block_id,) = pool.allocate(1)
    pool.free([block_id])
    with pytest.raises(RuntimeError, match="double free of KV block 0"):
        pool.free([block_id])


def test_collision_guard_compares_tokens():
    pool = BlockPool(4, BS)
    blocks = pool.allocate(1)
    real = [1, 2, 3, 4]
    fake = [5, 6, 7, 8]
    # Store `fake` under the hash of `real` (what a hash collision would look like).
    pool.cache_full_blocks(blocks, extend_block_hashes([], real, BS), fake, 0, 1)
    assert pool.lookup(real) == []
    assert pool.find_cached_prefix(extend_block_hashes([], real, BS), real) == []


def test_same_content_cached_once():
    pool = BlockPool(4, BS)
    tokens = [1, 2, 3, 4]
    first, second = pool.allocate(1), pool.allocate(1)
    cache_seq(pool, first, tokens)
    cache_seq(pool, second, tokens)
    assert pool.blocks[first[0]].block_hash is not None
    assert pool.blocks[second[0]].block_hash is None
    assert pool.lookup(tokens) == first
    pool.free(second)
    pool.free(first)
    assert pool.free_block_ids() == [second[0], 2, 3, first[0]]


def test_extra_keys_separate_entries():
    pool = BlockPool(4, BS)
    tokens = [1, 2, 3, 4]
    blocks = pool.allocate(1)
    hashes = extend_block_hashes([], tokens, BS, extra_keys=("salt",))
    pool.cache_full_blocks(blocks, hashes, tokens, 0, 1, extra_keys=("salt",))
    assert pool.lookup(tokens) == []
    assert pool.lookup(tokens, extra_keys=("salt",)) == blocks


def test_caching_disabled():
    pool = BlockPool(3, BS, enable_caching=False)
    blocks = pool.allocate(2)
    cache_seq(pool, blocks, list(range(8)))
    assert pool.cached == {}
    assert pool.lookup(list(range(8))) == []
    pool.free(reversed(blocks))
    assert pool.free_block_ids() == [0, 1, 2]  # each freed block goes to the head
    assert pool.num_evictions == 0


class PoolMachine(RuleBasedStateMachine):
    """Random allocate / free / lookup+touch / cache sequences over a small vocabulary."""

    def __init__(self):
        super().__init__()
        self.pool = BlockPool(8, 2)
        self.owners: list[tuple[list[int], list[int]]] = []  # (block_ids, token_ids)

    @rule(token_ids=st.lists(st.integers(0, 2), min_size=1, max_size=10),
          cache=st.booleans())
    def new_sequence(self, token_ids, cache):
        pool = self.pool
        hits = pool.lookup(token_ids)
        for i, block_id in enumerate(hits):
            assert pool.blocks[block_id].token_ids == tuple(token_ids[2 * i:2 * i + 2])
        num_needed = -(-len(token_ids) // 2) - len(hits)
        num_revived = sum(1 for b in hits if pool.blocks[b].ref_cnt == 0)
        if not pool.can_allocate(num_needed + num_revived):
            return
        pool.touch(hits)
        block_ids = hits + pool.allocate(num_needed)
        if cache:
            hashes = extend_block_hashes([], token_ids, 2)
            pool.cache_full_blocks(block_ids, hashes, token_ids, len(hits), len(hashes))
        self.owners.append((block_ids, token_ids))

    @rule(n=st.integers(0, 3))
    def allocate_plain(self, n):
        if self.pool.can_allocate(n):
            self.owners.append((self.pool.allocate(n), []))

    @precondition(lambda self: self.owners)
    @rule(index=st.integers(0, 100), tail_first=st.booleans())
    def free_owner(self, index, tail_first):
        block_ids, _ = self.owners.pop(index % len(self.owners))
        self.pool.free(reversed(block_ids) if tail_first else block_ids)

    @invariant()
    def consistent(self):
        check_invariants(self.pool)
        held = {}
        for block_ids, token_ids in self.owners:
            for i, block_id in enumerate(block_ids):
                held[block_id] = held.get(block_id, 0) + 1
                block = self.pool.blocks[block_id]
                if block.token_ids is not None:  # a hashed block holds this owner's tokens
                    assert block.token_ids == tuple(token_ids[2 * i:2 * i + 2])
        for block in self.pool.blocks:
            assert block.ref_cnt == held.get(block.block_id, 0)

    def teardown(self):
        for block_ids, _ in self.owners:
            self.pool.free(reversed(block_ids))
        assert self.pool.num_used_blocks == 0
        check_invariants(self.pool)


PoolMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40,
                                         deadline=None)
TestPoolMachine = PoolMachine.TestCase
