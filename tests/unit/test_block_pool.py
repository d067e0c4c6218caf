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


def test_block_hash_is_sha256_of_an_unambiguous_encoding():
    import hashlib

    digest = hash_block_tokens(ROOT_HASH, [1, 2, 3, 4])
    assert isinstance(digest, bytes) and len(digest) == 32
    assert ROOT_HASH == hashlib.sha256(b"specdec prefix cache root").digest()
    # Different splits of the same ids, extra keys or parents all give different digests.
    others = {hash_block_tokens(ROOT_HASH, [1, 2, 3]),
              hash_block_tokens(ROOT_HASH, [1, 2, 3, 4, 0]),
              hash_block_tokens(ROOT_HASH, [1, 2, 3, 4], ("cache_salt", "a")),
              hash_block_tokens(digest, [1, 2, 3, 4]), hash_block_tokens(ROOT_HASH, [4, 3, 2, 1])}
    assert digest not in others and len(others) == 5


def _weak_hash(real_hash, colliding: tuple[list[int], list[int]]):
    """A hash in which block `colliding[0]` collides with `colliding[1]` (an attacker's
    preimage), to test that hits never rely on the hash alone."""
    fake, real = colliding

    def weak(parent_hash, token_ids, extra_keys=None):
        tokens = list(token_ids)
        return real_hash(parent_hash, real if tokens == fake else tokens, extra_keys)
    return weak


def test_crafted_collision_cannot_chain_into_another_context(monkeypatch):
    """The attack of vLLM's GHSA-rm76-4mrf-v9r8: X0 collides with the victim's first block B0;
    once B1 is evicted, [X0, B1] caches B1's KV (computed after X0) under the chain of
    [B0, B1]. A victim [B0, B1] must not hit it."""
    import specdec.core.block_pool as block_pool

    b0, b1, x0 = [1, 2, 3, 4], [5, 6, 7, 8], [9, 9, 9, 9]
    monkeypatch.setattr(block_pool, "hash_block_tokens",
                        _weak_hash(block_pool.hash_block_tokens, (x0, b0)))
    assert extend_block_hashes([], x0, BS) == extend_block_hashes([], b0, BS)
    pool = BlockPool(3, BS)
    victim = pool.allocate(2)
    cache_seq(pool, victim, b0 + b1)
    pool.free(reversed(victim))  # B1's block is evicted first
    (spare,) = pool.allocate(1)
    assert spare == 2
    (b1_block,) = pool.allocate(1)
    assert b1_block == victim[1] and pool.lookup(b0 + b1) == [victim[0]]
    pool.free([spare, b1_block])
    # The attacker: X0 misses on its tokens, then computes [X0, B1] into fresh blocks.
    assert pool.lookup(x0 + b1) == []
    attacker = pool.allocate(2)
    cache_seq(pool, attacker, x0 + b1)
    check_invariants(pool)
    assert pool.lookup(b0 + b1) == [victim[0]]  # never the attacker's B1
    assert pool.lookup(x0 + b1) == []


def test_collision_on_a_later_block_with_equal_tokens(monkeypatch):
    """Same tokens in block 1 after different first blocks, with a colliding digest: the
    chain check (parent block id) keeps the two apart in both orders."""
    import specdec.core.block_pool as block_pool

    a0, b0, b1 = [1, 1, 1, 1], [2, 2, 2, 2], [3, 3, 3, 3]
    real = block_pool.hash_block_tokens
    h_a0, h_b0 = real(ROOT_HASH, a0), real(ROOT_HASH, b0)

    def weak(parent_hash, token_ids, extra_keys=None):
        if list(token_ids) == b1 and parent_hash == h_a0:
            parent_hash = h_b0  # digest(a0 + b1) == digest(b0 + b1)
        return real(parent_hash, token_ids, extra_keys)
    monkeypatch.setattr(block_pool, "hash_block_tokens", weak)
    pool = BlockPool(6, BS)
    victim = pool.allocate(2)
    cache_seq(pool, victim, b0 + b1)
    attacker = pool.allocate(2)
    cache_seq(pool, attacker, a0 + b1)
    # The later chain replaced the entry (same tokens, other parent): each side only ever
    # hits its own blocks.
    assert pool.lookup(a0 + b1) == attacker and pool.lookup(b0 + b1) == [victim[0]]
    cache_seq(pool, victim, b0 + b1)
    assert pool.lookup(b0 + b1) == victim and pool.lookup(a0 + b1) == [attacker[0]]
    for hits, owner in ((pool.lookup(a0 + b1), attacker), (pool.lookup(b0 + b1), victim)):
        assert hits == owner[:len(hits)]


def test_duplicate_block_chains_its_successors_from_the_original():
    """A full hit recomputes its last block into a fresh, unhashed duplicate; the blocks after
    it (the outputs) are still cached, chained from the original."""
    pool = BlockPool(8, BS)
    first = pool.allocate(2)
    tokens = list(range(1, 9))
    cache_seq(pool, first, tokens)
    hits = pool.lookup(tokens)[:-1]  # the scheduler drops the last hit block
    pool.touch(hits)
    table = hits + pool.allocate(2)
    longer = tokens + [20, 21, 22, 23]
    hashes = extend_block_hashes([], longer, BS)
    pool.cache_full_blocks(table, hashes, longer, len(hits), 3)
    assert pool.blocks[table[1]].block_hash is None  # the duplicate of first[1]
    assert pool.blocks[table[2]].parent_block_id == first[1]
    assert pool.lookup(longer) == [first[0], first[1], table[2]]
    check_invariants(pool)


def test_salts_never_share_blocks():
    pool = BlockPool(8, BS)
    tokens = list(range(1, 9))
    salted = pool.allocate(2)
    hashes = extend_block_hashes([], tokens, BS, ("cache_salt", "tenant-a"))
    pool.cache_full_blocks(salted, hashes, tokens, 0, 2, ("cache_salt", "tenant-a"))
    assert pool.lookup(tokens, ("cache_salt", "tenant-a")) == salted
    assert pool.lookup(tokens, ("cache_salt", "tenant-b")) == []
    assert pool.lookup(tokens) == []
