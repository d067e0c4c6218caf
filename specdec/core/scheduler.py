"""Continuous batching with chunked prefill, preemption by recompute and speculative look-ahead.

Standard library only. Each step `schedule()` fills a token budget and returns a plain
SchedulerOutput; the engine runs the models and reports back through `update()`.

Glossary
- decode: a running request with exactly one token lacking KV (the last sampled one). It gets
  num_new_tokens = 1 plus up to num_lookahead_tokens draft slots.
- prefill chunk: any other scheduled request (a prompt, or a resumed request recomputing its
  tokens); it gets min(tokens lacking KV, budget left) new tokens and no draft slots.
- look-ahead slots: KV slots reserved for draft tokens. Verification writes KV there; update()
  keeps only the accepted ones (num_computed_tokens advances past them), the rest are rolled
  back by not counting them; their slots are overwritten by later steps.
- preemption: when a running request needs a block and none is free, the most recently admitted
  running request loses all its blocks and goes back to the front of the waiting queue; it is
  recomputed from its tokens (prompt + verified outputs) when readmitted.
- policy "priority" (vLLM's semantics): `request.priority`, lower first, ties by arrival. The
  waiting queue is kept in that order, the victim of a preemption is the worst running request
  not yet scheduled this step, and a waiting request that cannot be admitted (max_num_seqs or
  free blocks) preempts running requests of a strictly worse priority.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from specdec.core.block_pool import BlockPool, extend_block_hashes
from specdec.core.request import Request, RequestStatus


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def cache_extra_keys(request: Request) -> tuple | None:
    """What a request's KV depends on besides its tokens: its cache salt (tenant isolation)
    and its LoRA adapter's id."""
    salt = request.sampling_params.cache_salt
    keys = () if salt is None else ("cache_salt", salt)
    if request.lora_int_id:
        keys += ("lora", request.lora_int_id)
    return keys or None


def pins_lookahead(request: Request) -> bool:
    """Seeded sampled requests get exactly the look-ahead the engine asks for (capped only by
    their own length and the configured budget), never less because of other requests' load
    or a preemption: which random stream decides an output position (draft + accept vs plain
    sample) depends on whether that position is a draft, so a k that varied with the load
    would change their text. Such a decode waits for a step with budget, and preempts for
    its draft slots like for its token."""
    params = request.sampling_params
    return params.seed is not None and not params.greedy


@dataclass(slots=True)
class ScheduledRequest:
    """One request's share of a step; its window starts at request.num_computed_tokens."""

    request: Request
    num_new_tokens: int  # target tokens to compute: a prefill chunk, or 1 for a decode
    num_lookahead_tokens: int  # draft slots granted this step (0 for prefill chunks)

    @property
    def num_scheduled_tokens(self) -> int:
        return self.num_new_tokens + self.num_lookahead_tokens


@dataclass(slots=True)
class SchedulerOutput:
    """One step's batch: decodes first (admission order), then prefill chunks."""

    scheduled: list[ScheduledRequest]
    num_batched_tokens: int  # sum of num_new_tokens + num_lookahead_tokens
    preempted: list[Request]


class Scheduler:
    """First come, first served continuous batching over a BlockPool.

    Per step: running requests in admission order (decodes with look-ahead, prefill chunks),
    then waiting requests while the token budget, max_num_seqs and free blocks allow. A waiting
    request that cannot be admitted blocks the ones behind it. Admission never preempts (except
    under the priority policy, see the glossary), and no admission happens in a step that
    preempted a running request for blocks. Draft slots never cause a preemption: they shrink
    to what the free blocks hold first (except for seeded sampled requests, whose look-ahead
    is pinned: see `pins_lookahead`).
    """

    def __init__(self, scheduler_config, cache_config, num_blocks: int,
                 max_model_len: int) -> None:
        self.max_num_seqs = scheduler_config.max_num_seqs
        self.max_num_batched_tokens = scheduler_config.max_num_batched_tokens
        self.block_size = cache_config.block_size
        self.enable_caching = cache_config.enable_prefix_caching
        self.max_model_len = max_model_len
        self.priority_policy = getattr(scheduler_config, "policy", "fcfs") == "priority"
        self.block_pool = BlockPool(num_blocks, self.block_size, self.enable_caching)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admission order
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self.max_loras = 0  # > 0: at most this many distinct adapters running (LoRA slots)
        # LoRA: lora_ready(lora_int_id) is False while an adapter is still being read from disk
        # (off the engine thread); its requests are skipped, keeping their place, until it is.
        self.lora_ready: Callable[[int], bool] | None = None
        # Per request: chained hashes of its full blocks, and how many of its blocks are cached.
        self._block_hashes: dict[str, list[bytes]] = {}
        self._num_cached_blocks: dict[str, int] = {}

    # ---- requests -------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        """Queue a request; ValueError if it is malformed or could never fit in the KV pool."""
        num_prompt = len(request.prompt_token_ids)
        if request.request_id in self.requests:
            raise ValueError(f"request_id {request.request_id!r} is already scheduled")
        if num_prompt == 0:
            raise ValueError("prompt must contain at least 1 token, got 0")
        if num_prompt >= self.max_model_len:
            raise ValueError(f"prompt has {num_prompt} tokens, which must be less than "
                             f"max_model_len={self.max_model_len}")
        max_tokens = request.max_tokens or self.max_model_len
        max_len = min(num_prompt + max_tokens, self.max_model_len)
        blocks_needed = cdiv(max_len, self.block_size)
        if blocks_needed > self.block_pool.num_blocks:
            raise ValueError(
                f"request needs up to {max_len} tokens ({num_prompt} prompt + max_tokens="
                f"{request.max_tokens}, capped at max_model_len={self.max_model_len}) = "
                f"{blocks_needed} KV blocks of {self.block_size}, but the pool has only "
                f"{self.block_pool.num_blocks} blocks")
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        self._block_hashes[request.request_id] = []
        self._num_cached_blocks[request.request_id] = 0
        self._enqueue(request)

    def get_request(self, request_id: str) -> Request | None:
        return self.requests.get(request_id)

    def finish_request(self, request_id: str, status: RequestStatus) -> Request | None:
        """Remove a request (waiting, running or preempted) and free its blocks.

        Unknown or already finished ids are ignored (returns None)."""
        if not status.finished:
            raise ValueError(f"status must be a FINISHED_* status, got {status}")
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        if request in self.running:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self._free_blocks(request)
        del self._block_hashes[request_id]
        del self._num_cached_blocks[request_id]
        request.status = status
        if request.finished_time is None:
            request.finished_time = time.monotonic()
        return request

    def abort_request(self, request_id: str) -> Request | None:
        return self.finish_request(request_id, RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return bool(self.running or self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # ---- priority ---------------------------------------------------------------------------
    @staticmethod
    def _rank(request: Request) -> tuple[int, float]:
        return (request.priority, request.arrival_time)

    def _enqueue(self, request: Request, front: bool = False) -> None:
        """FCFS: append (a preempted request goes to the front). Priority: sorted by rank."""
        if not self.priority_policy:
            (self.waiting.appendleft if front else self.waiting.append)(request)
            return
        rank = self._rank(request)
        for i, other in enumerate(self.waiting):
            if rank < self._rank(other):
                self.waiting.insert(i, request)
                return
        self.waiting.append(request)

    def _victim(self, start: int) -> Request:
        """The request to preempt among running[start:] (the ones not scheduled yet)."""
        if not self.priority_policy:
            return self.running[-1]
        return max(self.running[start:], key=self._rank)

    def _priority_victim(self, head: Request) -> Request | None:
        """The worst running request if its priority is strictly worse than the head's."""
        if not self.running:
            return None
        worst = max(self.running, key=self._rank)
        return worst if head.priority < worst.priority else None

    @staticmethod
    def _unschedule(request: Request, *lists: list[ScheduledRequest]) -> int:
        """Drop a request's share of this step; returns the tokens it had taken."""
        for scheduled_list in lists:
            for j, scheduled in enumerate(scheduled_list):
                if scheduled.request is request:
                    del scheduled_list[j]
                    return scheduled.num_scheduled_tokens
        return 0

    # ---- schedule -------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        decodes: list[ScheduledRequest] = []
        chunks: list[ScheduledRequest] = []
        preempted: list[Request] = []

        # NOTE: blocks the running requests need for their own tokens this step (not their
        # drafts); look-ahead may only use free blocks beyond what the later ones need, so
        # speculation never forces a preemption.
        needs = [self._num_blocks_to_extend(r, min(max(r.num_tokens - r.num_computed_tokens, 0),
                                                   budget)) for r in self.running]
        reserved_after = [0] * (len(needs) + 1)
        for j in range(len(needs) - 1, -1, -1):
            reserved_after[j] = reserved_after[j + 1] + needs[j]
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_missing = request.num_tokens - request.num_computed_tokens
            if num_missing <= 0:
                i += 1  # nothing to compute until the engine appends a token (or finishes it)
                continue
            num_new = min(num_missing, budget)
            is_decode = num_missing == 1
            pinned = pins_lookahead(request)
            num_lookahead = 0
            if pinned and is_decode:
                # A pinned decode gets its whole look-ahead or waits for a step with room.
                num_lookahead = self._grant_lookahead(request, budget, pinned=True)
                if num_lookahead + 1 > budget:
                    i += 1
                    continue
            elif pinned and request.output_token_ids:
                num_new = min(num_missing - 1, budget)  # see _admit: resumed pinned requests
            # Make room for the tokens that must be computed, preempting the newest requests.
            while not self._can_extend(request, num_new + num_lookahead):
                victim = self._victim(i)
                self._preempt(victim)
                preempted.append(victim)
                if victim is request:
                    break
            if request.status is RequestStatus.PREEMPTED:
                if self.priority_policy:
                    continue  # it ranked worst; running[i] is now the next request
                break  # it was the newest: nothing after it is left to schedule
            if is_decode and not pinned:
                reserved = reserved_after[i + 1] if i + 1 < len(reserved_after) else 0
                num_lookahead = self._grant_lookahead(request, budget, reserved)
            self._allocate_slots(request, num_new + num_lookahead)
            scheduled = ScheduledRequest(request, num_new, num_lookahead)
            (decodes if is_decode else chunks).append(scheduled)
            budget -= num_new + num_lookahead
            i += 1

        if not preempted:
            loading: list[Request] = []  # heads whose adapter is still being read
            while self.waiting:
                head = self.waiting[0]
                if (head.lora_int_id and self.lora_ready is not None
                        and not self.lora_ready(head.lora_int_id)):
                    # NOTE: as vLLM does, skip it (keeping its place) rather than hold the queue
                    loading.append(self.waiting.popleft())
                    continue
                scheduled = None
                if (budget > 0 and len(self.running) < self.max_num_seqs
                        and self._lora_fits(self.waiting[0])):
                    scheduled = self._admit(self.waiting[0], budget)
                if scheduled is None:
                    # Priority policy: a head that can't be admitted preempts the worst
                    # running request of a strictly worse priority, then tries again.
                    victim = (self._priority_victim(self.waiting[0])
                              if self.priority_policy else None)
                    if victim is None:
                        break
                    budget += self._unschedule(victim, decodes, chunks)
                    self._preempt(victim)
                    preempted.append(victim)
                    continue
                self.waiting.popleft()
                chunks.append(scheduled)
                budget -= scheduled.num_new_tokens
            self.waiting.extendleft(reversed(loading))

        scheduled_all = decodes + chunks
        return SchedulerOutput(
            scheduled=scheduled_all,
            num_batched_tokens=sum(s.num_scheduled_tokens for s in scheduled_all),
            preempted=preempted)

    def _lora_fits(self, request: Request) -> bool:
        """Whether admitting `request` keeps the running adapters within max_loras."""
        if not self.max_loras or not request.lora_int_id:
            return True
        running = {r.lora_int_id for r in self.running if r.lora_int_id}
        return request.lora_int_id in running or len(running) < self.max_loras

    def _grant_lookahead(self, request: Request, budget: int, reserved_blocks: int = 0,
                         pinned: bool = False) -> int:
        """Draft slots for a decode: the engine's wish capped by budget, length and the free
        blocks left after `reserved_blocks` (what later running requests need); pinned: by
        length and the configured budget only, see `pins_lookahead`."""
        # NOTE: one step yields up to lookahead + 1 tokens (accepted drafts and a bonus token):
        # keep that within max_model_len and max_tokens, drafts past them are waste.
        remaining_outputs = self.max_model_len
        if request.max_tokens is not None:
            remaining_outputs = request.max_tokens - len(request.output_token_ids) - 1
        num_blocks_free = max(self.block_pool.num_free_blocks - reserved_blocks, 0)
        num_slots_free = ((len(request.block_ids) + num_blocks_free)
                          * self.block_size - request.num_computed_tokens - 1)
        if pinned:
            budget, num_slots_free = self.max_num_batched_tokens, self.max_model_len
        return max(0, min(request.num_lookahead_tokens, budget - 1,
                          self.max_model_len - request.num_tokens - 1, remaining_outputs,
                          num_slots_free))

    def _num_blocks_to_extend(self, request: Request, num_slots: int) -> int:
        total = request.num_computed_tokens + num_slots
        return max(0, cdiv(total, self.block_size) - len(request.block_ids))

    def _can_extend(self, request: Request, num_slots: int) -> bool:
        return self.block_pool.can_allocate(self._num_blocks_to_extend(request, num_slots))

    def _allocate_slots(self, request: Request, num_slots: int) -> None:
        """Blocks so positions [0, num_computed_tokens + num_slots) all have a KV slot."""
        request.block_ids.extend(
            self.block_pool.allocate(self._num_blocks_to_extend(request, num_slots)))

    def _admit(self, request: Request, budget: int) -> ScheduledRequest | None:
        """Prefix-cache lookup and first chunk for the head of the queue; None if it can't fit."""
        pool = self.block_pool
        hit_block_ids: list[int] = []
        # NOTE: prompt logprobs need every prompt position computed: no prefix-cache hits.
        if self.enable_caching and request.sampling_params.prompt_logprobs is None:
            token_ids = request.all_token_ids
            extra_keys = cache_extra_keys(request)
            hashes = extend_block_hashes(self._block_hashes[request.request_id], token_ids,
                                         self.block_size, extra_keys)
            hit_block_ids = pool.find_cached_prefix(hashes, token_ids, extra_keys)
            if len(hit_block_ids) * self.block_size >= request.num_tokens:
                # NOTE: at least one token must be computed to get logits; recompute the whole
                # last block into a fresh one rather than write into a shared cached block.
                hit_block_ids = hit_block_ids[:-1]
        resumed_pinned = pins_lookahead(request) and bool(request.output_token_ids)
        if resumed_pinned and hit_block_ids and (
                request.num_tokens - len(hit_block_ids) * self.block_size < 2):
            hit_block_ids = hit_block_ids[:-1]
        num_computed = len(hit_block_ids) * self.block_size
        # NOTE: a resumed pinned request recomputes all but its last token; that one then gets
        # the decode step with drafts it would have had without the preemption.
        num_new = min(request.num_tokens - num_computed - int(resumed_pinned), budget)
        num_blocks = cdiv(num_computed + num_new, self.block_size) - len(hit_block_ids)
        # Touching a free cached block takes it out of the free list too.
        num_revived = sum(1 for b in hit_block_ids if pool.blocks[b].ref_cnt == 0)
        if not pool.can_allocate(num_blocks + num_revived):
            return None

        pool.touch(hit_block_ids)
        request.block_ids = hit_block_ids + pool.allocate(num_blocks)
        request.num_computed_tokens = num_computed
        self._num_cached_blocks[request.request_id] = len(hit_block_ids)
        if self.enable_caching:
            pool.record_prefix_query(request.num_tokens, num_computed)
        if request.first_scheduled_time is None:
            request.first_scheduled_time = time.monotonic()
            request.num_cached_tokens = num_computed
        request.status = RequestStatus.RUNNING
        self.running.append(request)
        return ScheduledRequest(request, num_new, 0)

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self._free_blocks(request)
        request.num_computed_tokens = 0
        request.draft_num_computed_tokens = 0
        request.spec_token_ids = []
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions += 1
        self._enqueue(request, front=True)

    def _free_blocks(self, request: Request) -> None:
        # Tail-first: the request's last blocks are the first to be evicted.
        self.block_pool.free(reversed(request.block_ids))
        request.block_ids = []
        self._num_cached_blocks[request.request_id] = 0

    # ---- update ---------------------------------------------------------------------------
    def update(self, output: SchedulerOutput, new_token_ids: dict[str, list[int]],
               num_accepted: dict[str, int]) -> None:
        """Advance each scheduled request by its computed tokens plus accepted drafts.

        Rejected draft slots are rolled back by not counting them. Every block that became full
        of computed (hence verified) tokens enters the prefix cache. Requests finished or
        aborted since schedule() are skipped.
        """
        for scheduled in output.scheduled:
            request = scheduled.request
            if self.requests.get(request.request_id) is not request or request.is_finished:
                continue
            accepted = num_accepted.get(request.request_id, 0)
            if not 0 <= accepted <= scheduled.num_lookahead_tokens:
                raise ValueError(f"num_accepted[{request.request_id!r}] must be in "
                                 f"[0, {scheduled.num_lookahead_tokens}], got {accepted}")
            request.output_token_ids.extend(new_token_ids.get(request.request_id, ()))
            # NOTE: capped at num_tokens in case the engine truncated the accepted tokens
            # (stop token, max_tokens); KV past the last token is never reused.
            request.num_computed_tokens = min(
                request.num_computed_tokens + scheduled.num_new_tokens + accepted,
                request.num_tokens)
            if self.enable_caching:
                self._cache_verified_blocks(request)

    def _cache_verified_blocks(self, request: Request) -> None:
        num_full = request.num_computed_tokens // self.block_size
        num_cached = self._num_cached_blocks[request.request_id]
        if num_full <= num_cached:
            return
        token_ids = request.all_token_ids
        extra_keys = cache_extra_keys(request)
        hashes = extend_block_hashes(self._block_hashes[request.request_id], token_ids,
                                     self.block_size, extra_keys)
        self.block_pool.cache_full_blocks(request.block_ids, hashes, token_ids, num_cached,
                                          num_full, extra_keys)
        self._num_cached_blocks[request.request_id] = num_full
