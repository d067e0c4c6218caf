"""Scheduler: budgets, chunked prefill, look-ahead slots, prefix hits, preemption, no leaks."""

import itertools
import pathlib
import random
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from specdec.core.config import CacheConfig, SchedulerConfig
from specdec.core.request import Request, RequestStatus, SamplingParams
from specdec.core.scheduler import Scheduler, cdiv, pins_lookahead

BS = 8
ROOT = pathlib.Path(__file__).resolve().parents[2]
_fresh_tokens = itertools.count(1000)


def make_scheduler(num_blocks=64, max_num_seqs=8, max_num_batched_tokens=16,
                   max_model_len=256, caching=True) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_seqs=max_num_seqs,
                                     max_num_batched_tokens=max_num_batched_tokens),
                     CacheConfig(block_size=BS, enable_prefix_caching=caching),
                     num_blocks, max_model_len)


def make_request(request_id, prompt, max_tokens=16, lookahead=0) -> Request:
    if isinstance(prompt, int):  # distinct tokens: no accidental prefix-cache hits
        prompt = [next(_fresh_tokens) for _ in range(prompt)]
    request = Request(request_id, list(prompt), SamplingParams(max_tokens=max_tokens))
    request.num_lookahead_tokens = lookahead
    return request


def summary(output):
    return [(s.request.request_id, s.num_new_tokens, s.num_lookahead_tokens)
            for s in output.scheduled]


def fake_update(sched, output, accepted=None, token=7):
    """Sample one token (+ accepted drafts) for every window that reaches the last token."""
    accepted = accepted or {}
    new_token_ids, num_accepted = {}, {}
    for s in output.scheduled:
        r = s.request
        if r.num_computed_tokens + s.num_new_tokens == r.num_tokens:
            n = accepted.get(r.request_id, 0)
            num_accepted[r.request_id] = n
            new_token_ids[r.request_id] = [token] * (n + 1)
    sched.update(output, new_token_ids, num_accepted)


def assert_no_leak(sched):
    assert not sched.has_unfinished_requests()
    assert sched.block_pool.num_used_blocks == 0
    assert all(b.ref_cnt == 0 for b in sched.block_pool.blocks)


def test_budget_and_max_num_seqs():
    sched = make_scheduler(max_num_seqs=2, max_num_batched_tokens=16)
    for i in range(3):
        sched.add_request(make_request(f"r{i}", 10))
    out = sched.schedule()
    assert summary(out) == [("r0", 10, 0), ("r1", 6, 0)]
    assert out.num_batched_tokens == 16
    assert sched.num_running == 2 and sched.num_waiting == 1
    fake_update(sched, out)
    out = sched.schedule()
    # r0 decodes, r1 finishes its prompt; r2 waits for a sequence slot.
    assert summary(out) == [("r0", 1, 0), ("r1", 4, 0)]
    assert sched.num_waiting == 1
    sched.finish_request("r0", RequestStatus.FINISHED_STOPPED)
    fake_update(sched, out)  # r0 is skipped: it finished in between
    assert sched.get_request("r0") is None
    out = sched.schedule()
    assert summary(out) == [("r1", 1, 0), ("r2", 10, 0)]


def test_chunked_prefill_exact_chunks():
    sched = make_scheduler(max_num_batched_tokens=16)
    r = make_request("r", 40)
    sched.add_request(r)
    chunks = []
    for _ in range(4):
        out = sched.schedule()
        chunks.append(summary(out))
        assert len(r.block_ids) == cdiv(r.num_computed_tokens + out.num_batched_tokens, BS)
        fake_update(sched, out)
    assert chunks == [[("r", 16, 0)], [("r", 16, 0)], [("r", 8, 0)], [("r", 1, 0)]]
    assert r.num_computed_tokens == 41 and r.output_token_ids == [7, 7]


def test_decodes_and_prefill_chunks_share_a_step():
    sched = make_scheduler(max_num_batched_tokens=16)
    sched.add_request(make_request("a", 5, lookahead=3))
    fake_update(sched, sched.schedule())
    sched.add_request(make_request("b", 40))
    out = sched.schedule()
    # Decodes first (1 + 3 draft slots), then the prefill chunk takes what is left.
    assert summary(out) == [("a", 1, 3), ("b", 12, 0)]
    assert out.num_batched_tokens == 16
    assert out.scheduled[0].request.num_computed_tokens == 5  # window start


def test_lookahead_slots_and_rollback():
    sched = make_scheduler(max_num_batched_tokens=16)
    r = make_request("r", 5, max_tokens=50, lookahead=4)
    sched.add_request(r)
    fake_update(sched, sched.schedule())
    assert (r.num_tokens, r.num_computed_tokens, len(r.block_ids)) == (6, 5, 1)
    out = sched.schedule()
    assert summary(out) == [("r", 1, 4)]
    assert len(r.block_ids) == 2  # positions [0, 10) have slots
    fake_update(sched, out, accepted={"r": 0})
    # All 4 drafts rejected: only the decode position counts; nothing is cached because
    # positions 6 and 7 of block 0 hold no verified KV yet.
    assert (r.num_tokens, r.num_computed_tokens) == (7, 6)
    assert sched.block_pool.cached == {}
    out = sched.schedule()
    assert summary(out) == [("r", 1, 4)]
    assert len(r.block_ids) == 2  # positions [0, 11): the rolled-back slots are reused
    fake_update(sched, out, accepted={"r": 3})
    assert (r.num_tokens, r.num_computed_tokens) == (11, 10)
    assert sched.block_pool.blocks[r.block_ids[0]].block_hash is not None
    assert sched.block_pool.blocks[r.block_ids[1]].block_hash is None
    with pytest.raises(ValueError, match=r"num_accepted\['r'\] must be in \[0, 4\], got 5"):
        sched.update(sched.schedule(), {"r": [1] * 6}, {"r": 5})


def test_lookahead_caps():
    # Budget: 16 - 1 decode token.
    sched = make_scheduler(max_num_batched_tokens=16)
    sched.add_request(make_request("r", 4, max_tokens=100, lookahead=40))
    fake_update(sched, sched.schedule())
    assert summary(sched.schedule()) == [("r", 1, 15)]
    # max_tokens: at most max_tokens - len(outputs) - 1 drafts are useful.
    sched = make_scheduler(max_num_batched_tokens=16)
    sched.add_request(make_request("r", 4, max_tokens=3, lookahead=5))
    fake_update(sched, sched.schedule())
    assert summary(sched.schedule()) == [("r", 1, 1)]
    # max_model_len: positions stay below it.
    sched = make_scheduler(max_num_batched_tokens=16, max_model_len=20)
    r = make_request("r", 17, max_tokens=None, lookahead=5)
    sched.add_request(r)
    fake_update(sched, sched.schedule())
    fake_update(sched, sched.schedule())
    assert r.num_tokens == 18
    # 18 + 1 draft + 1 bonus token = max_model_len: one step never passes it.
    assert summary(sched.schedule()) == [("r", 1, 1)]
    # Free blocks: draft slots shrink instead of preempting anyone.
    for prompt_len, num_lookahead in ((12, 3), (15, 0)):  # slots left in b's last block
        sched = make_scheduler(num_blocks=3, max_num_batched_tokens=32)
        sched.add_request(make_request("a", 7, max_tokens=1))
        sched.add_request(make_request("b", prompt_len, max_tokens=24 - prompt_len,
                                       lookahead=9))
        fake_update(sched, sched.schedule())
        assert sched.block_pool.num_free_blocks == 0
        out = sched.schedule()
        assert summary(out) == [("a", 1, 0), ("b", 1, num_lookahead)]
        assert out.preempted == []


def test_prefix_cache_hits():
    sched = make_scheduler(max_num_batched_tokens=64)
    shared = [random.Random(0).randrange(50) for _ in range(20)]
    a = make_request("a", shared)
    sched.add_request(a)
    fake_update(sched, sched.schedule())  # 20 computed: blocks 0 and 1 are cached
    a_blocks = list(a.block_ids)
    sched.finish_request("a", RequestStatus.FINISHED_STOPPED)
    assert sched.block_pool.num_used_blocks == 0

    b = make_request("b", shared + [1, 2, 3, 4, 5])  # 25 tokens, 2 cached blocks
    sched.add_request(b)
    out = sched.schedule()
    assert summary(out) == [("b", 9, 0)]
    assert b.num_computed_tokens == 16 and b.num_cached_tokens == 16
    assert b.block_ids[:2] == a_blocks[:2]
    assert sched.block_pool.prefix_cache_queries == 20 + 25
    assert sched.block_pool.prefix_cache_hits == sched.block_pool.num_hit_tokens == 16
    fake_update(sched, out)

    c = make_request("c", shared[:16])  # a full hit: the last block is recomputed
    sched.add_request(c)
    out = sched.schedule()
    assert summary(out) == [("b", 1, 0), ("c", 8, 0)]
    assert c.num_computed_tokens == 8 and c.num_cached_tokens == 8
    assert c.block_ids[0] == a_blocks[0] and c.block_ids[1] != a_blocks[1]
    assert sched.block_pool.blocks[a_blocks[0]].ref_cnt == 2
    fake_update(sched, out)
    for rid in ("b", "c"):
        sched.finish_request(rid, RequestStatus.FINISHED_LENGTH)
    assert_no_leak(sched)


def test_prefix_caching_disabled():
    sched = make_scheduler(max_num_batched_tokens=64, caching=False)
    for rid in ("a", "b"):
        r = make_request(rid, 20)
        sched.add_request(r)
        fake_update(sched, sched.schedule())
        assert r.num_cached_tokens == 0 and r.num_computed_tokens == 20
        sched.finish_request(rid, RequestStatus.FINISHED_STOPPED)
    assert sched.block_pool.cached == {} and sched.block_pool.prefix_cache_queries == 0
    assert_no_leak(sched)


@pytest.mark.parametrize("caching", [False, True])
def test_preemption_by_recompute(caching):
    sched = make_scheduler(num_blocks=4, max_num_batched_tokens=64, caching=caching)
    a = make_request("a", 8, max_tokens=16)
    b = make_request("b", [2000 + i for i in range(8)], max_tokens=16)
    sched.add_request(a)
    sched.add_request(b)
    for i in range(9):  # each grows to 17 tokens, 16 computed: 2 blocks each
        fake_update(sched, sched.schedule(), token=i)
    assert sched.block_pool.num_free_blocks == 0
    c = make_request("c", 4, max_tokens=4)
    sched.add_request(c)  # waits: no free block
    b_tokens = b.all_token_ids
    out = sched.schedule()  # a needs a third block: b, the newest, is preempted
    assert summary(out) == [("a", 1, 0)]
    assert out.preempted == [b]
    assert b.status is RequestStatus.PREEMPTED and b.num_preemptions == 1
    assert (b.num_computed_tokens, b.block_ids, b.all_token_ids) == (0, [], b_tokens)
    assert sched.num_preemptions == 1 and list(sched.waiting) == [b, c]  # b goes first
    sched.abort_request("c")
    fake_update(sched, out, token=9)
    while a.num_tokens < 24:  # b waits: 1 free block can't hold its first chunk
        out = sched.schedule()
        assert summary(out) == [("a", 1, 0)]
        fake_update(sched, out, token=50)
    sched.finish_request("a", RequestStatus.FINISHED_LENGTH)
    out = sched.schedule()
    # Resumed by recomputing prompt + outputs; with caching, b's first block (hashed, and
    # freed after its evicted second block) is served from the cache.
    num_hit = 8 if caching else 0
    assert summary(out) == [("b", 17 - num_hit, 0)]
    assert b.status is RequestStatus.RUNNING and b.all_token_ids == b_tokens
    assert b.num_computed_tokens == num_hit and b.num_cached_tokens == 0
    fake_update(sched, out, token=60)
    assert b.output_token_ids == list(range(9)) + [60]
    sched.abort_request("b")
    assert_no_leak(sched)


def test_no_admission_in_a_preempting_step():
    sched = make_scheduler(num_blocks=4, max_num_batched_tokens=16, caching=False)
    a = make_request("a", 8, max_tokens=17)
    b = make_request("b", 8, max_tokens=16)
    sched.add_request(a)
    sched.add_request(b)
    for _ in range(9):
        fake_update(sched, sched.schedule())
    a.num_lookahead_tokens = 7
    out = sched.schedule()
    # 8 tokens of budget and 1 free block are left, enough for b's first chunk, but a step
    # that preempted admits nothing.
    assert summary(out) == [("a", 1, 7)] and out.preempted == [b]
    assert sched.block_pool.num_free_blocks == 1 and list(sched.waiting) == [b]


def test_only_computed_blocks_are_cached():
    sched = make_scheduler(max_num_batched_tokens=64)
    a = make_request("a", 15)
    sched.add_request(a)
    fake_update(sched, sched.schedule())
    # 16 tokens, but the sampled one has no KV yet: only block 0 is cached.
    assert (a.num_tokens, a.num_computed_tokens) == (16, 15)
    assert [sched.block_pool.blocks[b].block_hash is not None for b in a.block_ids] == [
        True, False]
    sched.finish_request("a", RequestStatus.FINISHED_STOPPED)
    b = make_request("b", a.all_token_ids + [5])
    sched.add_request(b)
    assert summary(sched.schedule()) == [("b", 9, 0)]
    assert b.num_cached_tokens == 8


def test_newest_request_preempts_itself():
    sched = make_scheduler(num_blocks=3, max_num_batched_tokens=64)
    a = make_request("a", 12, max_tokens=4)
    b = make_request("b", 8, max_tokens=8)
    sched.add_request(a)
    sched.add_request(b)
    fake_update(sched, sched.schedule())
    out = sched.schedule()  # a fits in its block; b needs one and is the newest itself
    assert summary(out) == [("a", 1, 0)] and out.preempted == [b]
    assert sched.num_running == 1 and list(sched.waiting) == [b]


@pytest.mark.parametrize("where", ["waiting", "prefill", "decode", "preempted"])
def test_abort_frees_everything(where):
    sched = make_scheduler(num_blocks=6, max_num_batched_tokens=16)
    a = make_request("a", 8, max_tokens=16)
    b = make_request("b", 24, max_tokens=8)
    sched.add_request(a)
    sched.add_request(b)
    num_steps = {"waiting": 0, "prefill": 1, "decode": 4, "preempted": 10}[where]
    for _ in range(num_steps):
        fake_update(sched, sched.schedule())
    if where == "prefill":  # a: 8 tokens, b: 8 of 24
        assert b.status is RequestStatus.RUNNING and b.num_computed_tokens == 8
    if where == "decode":  # a: 2 blocks, b: 4 blocks (25 of 26 tokens computed)
        assert b.status is RequestStatus.RUNNING and not b.is_prefill
        assert b.num_computed_tokens == 25 and sched.block_pool.num_free_blocks == 0
    if where == "preempted":  # a needed a third block at position 16
        assert a.num_computed_tokens == 17 and len(a.block_ids) == 3
        assert b.status is RequestStatus.PREEMPTED and b.block_ids == []
        assert b.num_tokens == 31 and sched.num_preemptions == 1
    held = len(b.block_ids)
    assert sched.abort_request("b") is b
    assert b.status is RequestStatus.FINISHED_ABORTED and b.block_ids == []
    assert sched.block_pool.num_used_blocks == len(a.block_ids)
    assert sched.block_pool.num_free_blocks == 6 - len(a.block_ids)
    assert held == {"waiting": 0, "prefill": 1, "decode": 4, "preempted": 0}[where]
    assert sched.abort_request("b") is None
    assert sched.abort_request("a") is a
    assert_no_leak(sched)


def test_add_request_rejections():
    sched = make_scheduler(num_blocks=4, max_model_len=64)
    with pytest.raises(ValueError, match=r"40 tokens .* 5 KV blocks of 8, but the pool has "
                                         r"only 4 blocks"):
        sched.add_request(make_request("r", 20, max_tokens=20))
    with pytest.raises(ValueError, match=r"up to 64 tokens .*max_tokens=None"):
        sched.add_request(make_request("r", 20, max_tokens=None))
    with pytest.raises(ValueError, match="prompt must contain at least 1 token, got 0"):
        sched.add_request(make_request("r", []))
    with pytest.raises(ValueError, match="prompt has 64 tokens, which must be less than "
                                         "max_model_len=64"):
        sched.add_request(make_request("r", 64))
    sched.add_request(make_request("r", 20, max_tokens=12))  # exactly 4 blocks
    with pytest.raises(ValueError, match="request_id 'r' is already scheduled"):
        sched.add_request(make_request("r", 4))
    assert sched.num_waiting == 1


def check_kv(sched, kv, output, drafts):
    """Simulated KV: every context position holds its token; writes touch unshared blocks."""
    for s in output.scheduled:
        r = s.request
        tokens = r.all_token_ids
        start = r.num_computed_tokens
        slots = [r.block_ids[p // BS] * BS + p % BS for p in range(start + s.num_scheduled_tokens)]
        assert [kv[slot] for slot in slots[:start]] == tokens[:start]
        window = tokens[start:start + s.num_new_tokens] + drafts[r.request_id]
        for slot, token in zip(slots[start:], window, strict=True):
            assert sched.block_pool.blocks[slot // BS].ref_cnt == 1
            kv[slot] = token


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), num_blocks=st.integers(6, 16),
       max_num_seqs=st.integers(1, 6), budget=st.integers(16, 48),
       caching=st.booleans(), num_requests=st.integers(1, 10))
def test_random_workloads_finish_without_leaks(seed, num_blocks, max_num_seqs, budget,
                                               caching, num_requests):
    rng = random.Random(seed)
    max_model_len = 48
    sched = make_scheduler(num_blocks=num_blocks, max_num_seqs=max_num_seqs,
                           max_num_batched_tokens=budget, max_model_len=max_model_len,
                           caching=caching)
    kv = [None] * (num_blocks * BS)
    pending = []
    for i in range(num_requests):
        prompt = [rng.randrange(3) for _ in range(rng.randint(1, 30))]
        r = make_request(f"r{i}", prompt, max_tokens=rng.choice([None, 1, 5, 20, 40]))
        if rng.random() < 0.4:  # seeded sampled: pinned look-ahead (waits, preempts for it)
            r.sampling_params = SamplingParams(max_tokens=r.max_tokens, seed=i)
        try:
            sched.add_request(r)
        except ValueError:
            assert cdiv(min(len(prompt) + (r.max_tokens or max_model_len), max_model_len),
                        BS) > num_blocks
            continue
        pending.append(r)
    for _ in range(2000):
        if not sched.has_unfinished_requests():
            break
        for r in sched.running:
            r.num_lookahead_tokens = rng.randint(0, 5)
        out = sched.schedule()
        assert out.num_batched_tokens <= budget and len(out.scheduled) <= max_num_seqs
        assert out.scheduled or out.preempted
        drafts = {s.request.request_id: [rng.randrange(3) for _ in range(s.num_lookahead_tokens)]
                  for s in out.scheduled}
        check_kv(sched, kv, out, drafts)
        for s in out.scheduled:
            r = s.request
            if pins_lookahead(r) and r.num_tokens - r.num_computed_tokens == 1:  # a decode
                left = (max_model_len - r.num_tokens - 1 if r.max_tokens is None
                        else min(max_model_len - r.num_tokens - 1,
                                 r.max_tokens - len(r.output_token_ids) - 1))
                assert s.num_lookahead_tokens == max(0, min(r.num_lookahead_tokens, budget - 1,
                                                            left))
        new_token_ids, num_accepted = {}, {}
        for s in out.scheduled:
            r = s.request
            if r.num_computed_tokens + s.num_new_tokens == r.num_tokens:
                n = rng.randint(0, s.num_lookahead_tokens)
                new_token_ids[r.request_id] = drafts[r.request_id][:n] + [rng.randrange(3)]
                num_accepted[r.request_id] = n
        if sched.running and rng.random() < 0.05:
            sched.abort_request(rng.choice(sched.running).request_id)
        sched.update(out, new_token_ids, num_accepted)
        for r in list(sched.running):
            if r.max_tokens is not None:
                assert len(r.output_token_ids) <= r.max_tokens
            assert r.num_tokens <= max_model_len
            if r.num_tokens == max_model_len or len(r.output_token_ids) == r.max_tokens:
                sched.finish_request(r.request_id, RequestStatus.FINISHED_LENGTH)
        held = {}
        for r in sched.running:
            for block_id in r.block_ids:
                held[block_id] = held.get(block_id, 0) + 1
        assert all(b.ref_cnt == held.get(b.block_id, 0) for b in sched.block_pool.blocks)
        assert all(not r.block_ids for r in sched.waiting)
    assert_no_leak(sched)
    assert all(r.is_finished for r in pending)


def test_bookkeeping_imports_no_torch():
    code = ("import sys, specdec.core.scheduler, specdec.core.block_pool; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
