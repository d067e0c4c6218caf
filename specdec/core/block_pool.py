"""KV cache blocks: reference counts, an O(1) LRU free list and a hash-chained prefix cache.

Standard library only. The pool hands out block ids 0..num_blocks-1; the model's KV tensors are
indexed by them (slot = block_id * block_size + offset).

Glossary
- ref_cnt: how many requests hold the block in their block table. 0 means the block is free.
- free list: every block with ref_cnt == 0, in eviction order (head = evicted/reused first).
- block hash: SHA-256 over (parent block's digest, the block's token ids, extra keys) of a
  *full* block of verified tokens, chained from ROOT_HASH, so a digest names the whole prefix up
  to the end of its block. Extra keys carry what else the KV depends on (the request's
  `cache_salt`: two salts never share a block).
- chain check: a cached block also records the block id it was chained from, and a hit must
  chain from the block hit just before it (the root for the first). With the tokens and extra
  keys compared too, a hit never depends on the hash alone: even a crafted collision cannot
  make a request reuse KV computed after another context (the class of vLLM's
  GHSA-rm76-4mrf-v9r8).
- cached block: a block whose hash is in the index. It stays cached after it is freed (it keeps
  its hash and sits in the free list) until it is reallocated: that is the eviction.

Eviction order
- `allocate` pops blocks from the head of the free list.
- `free` appends a block that holds a hash to the tail (least recently used first out), and puts
  a block that never got a hash at the head: it holds nothing worth keeping, so it is reused
  before any cached block. Callers free a request's blocks tail-first so its last blocks, the
  least likely to be shared, are evicted first.
- `touch` takes a cached block out of the free list wherever it is (O(1), intrusive links).
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

ROOT_HASH = hashlib.sha256(b"specdec prefix cache root").digest()  # parent of a first block


def _encode_extra_keys(extra_keys) -> bytes:
    if extra_keys is None:
        return b"\x00"
    data = repr(extra_keys).encode()
    return b"\x01" + len(data).to_bytes(8, "little") + data


def hash_block_tokens(parent_hash: bytes, token_ids: Sequence[int], extra_keys=None) -> bytes:
    """SHA-256 digest of one full block, chained on its parent's digest.

    The encoding is unambiguous: a 32-byte parent digest, the token count, the ids as
    native int64, then the extra keys (a flag, a length and their repr).
    """
    tokens = array("q", token_ids)  # 8-byte signed ids
    digest = hashlib.sha256(parent_hash)
    digest.update(len(tokens).to_bytes(8, "little"))
    digest.update(tokens.tobytes())
    digest.update(_encode_extra_keys(extra_keys))
    return digest.digest()


def extend_block_hashes(block_hashes: list[bytes], token_ids: Sequence[int], block_size: int,
                        extra_keys=None) -> list[bytes]:
    """Append to `block_hashes` the hashes of the full blocks of `token_ids` it lacks.

    `block_hashes` must already hold the hashes of the first len(block_hashes) blocks of these
    same tokens; it is extended in place and returned.
    """
    num_full_blocks = len(token_ids) // block_size
    for i in range(len(block_hashes), num_full_blocks):
        parent_hash = block_hashes[i - 1] if i > 0 else ROOT_HASH
        block_hashes.append(hash_block_tokens(
            parent_hash, token_ids[i * block_size:(i + 1) * block_size], extra_keys))
    return block_hashes


@dataclass(slots=True, eq=False)
class KVBlock:
    """One KV block; `prev_free`/`next_free` link it into the free list while ref_cnt == 0."""

    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None
    # Collision guard: what the hash was computed from, and the cached block it chains from
    # (None: the root).
    parent_hash: bytes | None = None
    parent_block_id: int | None = None
    token_ids: tuple[int, ...] | None = None
    extra_keys: object = None
    # An unhashed block holding the same verified content as this cached block (computed twice,
    # e.g. the recomputed last block of a full hit): its successors chain from that block.
    duplicate_of: int | None = None
    prev_free: KVBlock | None = None
    next_free: KVBlock | None = None


class FreeBlockQueue:
    """Intrusive doubly-linked list of free blocks between two sentinels; every operation O(1)."""

    __slots__ = ("head", "tail", "num_free")

    def __init__(self, blocks: Iterable[KVBlock]) -> None:
        self.head = KVBlock(-1)  # sentinel: head.next_free is the first block out
        self.tail = KVBlock(-1)  # sentinel: tail.prev_free is the last block out
        self.head.next_free = self.tail
        self.tail.prev_free = self.head
        self.num_free = 0
        for block in blocks:
            self.append(block)

    def _insert_after(self, prev: KVBlock, block: KVBlock) -> None:
        nxt = prev.next_free
        block.prev_free, block.next_free = prev, nxt
        prev.next_free = block
        nxt.prev_free = block
        self.num_free += 1

    def append(self, block: KVBlock) -> None:
        self._insert_after(self.tail.prev_free, block)

    def appendleft(self, block: KVBlock) -> None:
        self._insert_after(self.head, block)

    def remove(self, block: KVBlock) -> None:
        if block.prev_free is None or block.next_free is None:
            raise RuntimeError(f"block {block.block_id} is not in the free list")
        block.prev_free.next_free = block.next_free
        block.next_free.prev_free = block.prev_free
        block.prev_free = block.next_free = None
        self.num_free -= 1

    def popleft(self) -> KVBlock:
        block = self.head.next_free
        if block is self.tail:
            raise RuntimeError("no free KV blocks")
        self.remove(block)
        return block

    def __iter__(self):
        block = self.head.next_free
        while block is not self.tail:
            yield block
            block = block.next_free


class BlockPool:
    """A fixed pool of `num_blocks` KV blocks with automatic prefix caching.

    Only verified tokens are ever hashed: callers pass full blocks whose KV has been written for
    accepted tokens, never draft tokens. With `enable_caching=False` nothing is hashed, lookups
    miss and every freed block goes to the head of the free list.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)
        self.cached: dict[bytes, KVBlock] = {}  # block hash -> the block holding those tokens
        # Counters (monotonic) for metrics.
        self.prefix_cache_queries = 0  # tokens looked up at admission
        self.prefix_cache_hits = 0  # of those, tokens served from the cache
        self.num_evictions = 0  # cached blocks whose hash was dropped on reallocation

    # ---- capacity -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return self.free_queue.num_free

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.free_queue.num_free

    @property
    def usage(self) -> float:
        """Fraction of blocks held by at least one request."""
        return self.num_used_blocks / self.num_blocks

    def free_block_ids(self) -> list[int]:
        """Free blocks in eviction order (first = reused first)."""
        return [block.block_id for block in self.free_queue]

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.free_queue.num_free

    # ---- allocation -----------------------------------------------------------------------
    def allocate(self, num_blocks: int) -> list[int]:
        """Take `num_blocks` blocks from the head of the free list (evicting their hashes)."""
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        if num_blocks > self.free_queue.num_free:
            raise ValueError(f"cannot allocate {num_blocks} KV blocks: only "
                             f"{self.free_queue.num_free} of {self.num_blocks} are free")
        block_ids = []
        for _ in range(num_blocks):
            block = self.free_queue.popleft()
            self._evict(block)
            block.duplicate_of = None
            block.ref_cnt = 1
            block_ids.append(block.block_id)
        return block_ids

    def _evict(self, block: KVBlock) -> None:
        if block.block_hash is None:
            return
        if self.cached.get(block.block_hash) is block:
            del self.cached[block.block_hash]
        block.block_hash = block.parent_hash = block.token_ids = block.extra_keys = None
        block.parent_block_id = None
        self.num_evictions += 1

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference from each block, in the order given (pass a request's blocks
        reversed so its last blocks are evicted first)."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_cnt <= 0:
                raise RuntimeError(f"double free of KV block {block_id}")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                if block.block_hash is None:
                    self.free_queue.appendleft(block)  # nothing cached in it: reuse it first
                else:
                    self.free_queue.append(block)

    def touch(self, block_ids: Iterable[int]) -> None:
        """Add one reference to each block (a prefix-cache hit); free ones leave the free list."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_cnt == 0:
                self.free_queue.remove(block)
            block.ref_cnt += 1

    # ---- prefix cache ---------------------------------------------------------------------
    def find_cached_prefix(self, block_hashes: Sequence[bytes], token_ids: Sequence[int],
                           extra_keys=None) -> list[int]:
        """Block ids caching the longest prefix of `token_ids`' full blocks (not touched).

        `block_hashes[i]` is the chained hash of block i of `token_ids`. A hit also compares
        the stored tokens, extra keys and parent digest, and requires the block to chain from
        the block hit just before it, so the whole chain is verified, not only the hash.
        """
        if not self.enable_caching:
            return []
        bs = self.block_size
        hit_block_ids = []
        parent_hash, parent_block_id = ROOT_HASH, None
        for i, block_hash in enumerate(block_hashes):
            if (i + 1) * bs > len(token_ids):
                break
            block = self.cached.get(block_hash)
            if (block is None or block.parent_hash != parent_hash
                    or block.parent_block_id != parent_block_id
                    or block.extra_keys != extra_keys
                    or block.token_ids != tuple(token_ids[i * bs:(i + 1) * bs])):
                break
            hit_block_ids.append(block.block_id)
            parent_hash, parent_block_id = block_hash, block.block_id
        return hit_block_ids

    def lookup(self, token_ids: Sequence[int], extra_keys=None) -> list[int]:
        """find_cached_prefix over freshly computed hashes of `token_ids`."""
        if not self.enable_caching:
            return []
        hashes = extend_block_hashes([], token_ids, self.block_size, extra_keys)
        return self.find_cached_prefix(hashes, token_ids, extra_keys)

    def _chain_block(self, block_id: int, block_hash: bytes) -> KVBlock | None:
        """The cached block that holds block `block_id`'s verified content under `block_hash`:
        the block itself, or the cached block it duplicates; None if neither is cached."""
        block = self.blocks[block_id]
        if block.block_hash == block_hash and self.cached.get(block_hash) is block:
            return block
        if block.block_hash is None and block.duplicate_of is not None:
            original = self.cached.get(block_hash)
            if original is not None and original.block_id == block.duplicate_of:
                return original
        return None

    def cache_full_blocks(self, block_ids: Sequence[int], block_hashes: Sequence[bytes],
                          token_ids: Sequence[int], num_cached_blocks: int,
                          num_full_blocks: int, extra_keys=None) -> None:
        """Hash blocks [num_cached_blocks, num_full_blocks) of a block table.

        Those blocks must hold the KV of verified tokens `token_ids` (the sequence from position
        0); `block_hashes` must cover them. A block whose content is already cached by another
        block (same content computed twice) stays unhashed, is reused first once freed, and its
        successors chain from that other block. A cached entry with the same hash but other
        tokens or extra keys (a collision) ends the caching of this chain; one with the same
        content but another parent (a stale chain) is replaced.
        """
        if not self.enable_caching:
            return
        bs = self.block_size
        if num_full_blocks * bs > len(token_ids) or num_full_blocks > len(block_hashes):
            raise ValueError(f"num_full_blocks={num_full_blocks} needs {num_full_blocks * bs} "
                             f"tokens and hashes, got {len(token_ids)} tokens and "
                             f"{len(block_hashes)} hashes")
        parent_block_id = None
        if num_cached_blocks > 0:
            parent = self._chain_block(block_ids[num_cached_blocks - 1],
                                       block_hashes[num_cached_blocks - 1])
            if parent is None:
                return  # the chain is broken (collision, or its parent was evicted)
            parent_block_id = parent.block_id
        for i in range(num_cached_blocks, num_full_blocks):
            block = self.blocks[block_ids[i]]
            block_hash = block_hashes[i]
            tokens = tuple(token_ids[i * bs:(i + 1) * bs])
            if block.block_hash is not None:  # already cached (a prefix hit)
                if self._chain_block(block.block_id, block_hash) is not block:
                    return
                parent_block_id = block.block_id
                continue
            other = self.cached.get(block_hash)
            if other is not None:
                if other.token_ids != tokens or other.extra_keys != extra_keys:
                    return  # a hash collision: cache nothing more of this chain
                if other.parent_block_id == parent_block_id:
                    block.duplicate_of = other.block_id  # same content computed twice
                    parent_block_id = other.block_id
                    continue
                self._evict(other)  # same content, stale parent: this chain replaces it
            block.block_hash = block_hash
            block.parent_hash = block_hashes[i - 1] if i > 0 else ROOT_HASH
            block.parent_block_id = parent_block_id
            block.token_ids = tokens
            block.extra_keys = extra_keys
            self.cached[block_hash] = block
            parent_block_id = block.block_id

    # Aliases used by the engine's stats.
    @property
    def num_queried_tokens(self) -> int:
        return self.prefix_cache_queries

    @property
    def num_hit_tokens(self) -> int:
        return self.prefix_cache_hits

    def record_prefix_query(self, num_query_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_cache_queries += num_query_tokens
        self.prefix_cache_hits += num_hit_tokens
