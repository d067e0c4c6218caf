"""scheduler.policy = "priority": ordering, preemption of worse-priority requests, no leaks.

Bookkeeping only (no torch): exact admission order, exact victims, and every block returned.
"""

from specdec.core.config import CacheConfig, SchedulerConfig
from specdec.core.request import Request, RequestStatus, SamplingParams
from specdec.core.scheduler import Scheduler
from tests.unit.test_scheduler import BS, assert_no_leak, fake_update

import itertools
import pytest

_tokens = itertools.count(5000)


def make(policy="priority", num_blocks=64, max_num_seqs=8, budget=64) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                                     policy=policy),
                     CacheConfig(block_size=BS, enable_prefix_caching=True), num_blocks, 256)


def req(rid, n, priority=0, arrival=0.0, max_tokens=8) -> Request:
    return Request(rid, [next(_tokens) for _ in range(n)], SamplingParams(max_tokens=max_tokens),
                   arrival_time=arrival, priority=priority)


def ids(output):
    return [s.request.request_id for s in output.scheduled]


def test_policy_is_validated():
    with pytest.raises(ValueError, match="scheduler.policy"):
        SchedulerConfig(policy="lifo")


def test_waiting_queue_orders_by_priority_then_arrival():
    s = make(max_num_seqs=8, budget=16)
    s.add_request(req("late-low", 4, priority=5, arrival=1.0))
    s.add_request(req("early-low", 4, priority=5, arrival=0.5))
    s.add_request(req("high", 4, priority=-1, arrival=2.0))
    s.add_request(req("mid", 4, priority=0, arrival=3.0))
    assert [r.request_id for r in s.waiting] == ["high", "mid", "early-low", "late-low"]
    assert ids(s.schedule()) == ["high", "mid", "early-low", "late-low"]


def test_fcfs_ignores_priority():
    s = make(policy="fcfs", budget=16)
    s.add_request(req("a", 4, priority=9, arrival=0.0))
    s.add_request(req("b", 4, priority=-9, arrival=1.0))
    assert ids(s.schedule()) == ["a", "b"]


def test_high_priority_arrival_preempts_low_priority_when_seqs_are_full():
    s = make(max_num_seqs=2, budget=64)
    s.add_request(req("chat-1", 8, priority=10, arrival=0.0))
    s.add_request(req("chat-2", 8, priority=10, arrival=1.0))
    fake_update(s, s.schedule())  # both prefilled, each has one output token
    s.add_request(req("editor", 8, priority=0, arrival=2.0))
    out = s.schedule()
    # The worst running request (latest arrival among priority 10) makes room.
    assert [r.request_id for r in out.preempted] == ["chat-2"]
    assert ids(out) == ["chat-1", "editor"]
    assert s.requests["chat-2"].status is RequestStatus.PREEMPTED
    assert [r.request_id for r in s.waiting] == ["chat-2"]
    assert s.num_preemptions == 1
    fake_update(s, out)
    for rid in list(s.requests):
        s.finish_request(rid, RequestStatus.FINISHED_STOPPED)
    assert_no_leak(s)


def test_equal_priority_never_preempts():
    s = make(max_num_seqs=1, budget=64)
    s.add_request(req("a", 8, priority=3, arrival=0.0))
    fake_update(s, s.schedule())
    s.add_request(req("b", 8, priority=3, arrival=1.0))
    out = s.schedule()
    assert out.preempted == [] and ids(out) == ["a"]


def test_high_priority_preempts_for_blocks():
    # 6 blocks of 8: two 16-token requests hold 4 (+1 each for its next token).
    s = make(num_blocks=6, max_num_seqs=8, budget=64)
    s.add_request(req("low-1", 16, priority=5, arrival=0.0, max_tokens=8))
    s.add_request(req("low-2", 16, priority=7, arrival=1.0, max_tokens=8))
    fake_update(s, s.schedule())
    s.add_request(req("high", 16, priority=0, arrival=2.0, max_tokens=8))
    out = s.schedule()
    assert [r.request_id for r in out.preempted] == ["low-2"]  # worst priority, not newest
    assert "high" in ids(out) and "low-1" in ids(out)
    fake_update(s, out)
    for rid in list(s.requests):
        s.abort_request(rid)
    assert_no_leak(s)


def test_running_preemption_victim_is_worst_priority_not_newest():
    # Three requests decode until the pool runs dry; the victim is the worst priority.
    s = make(num_blocks=7, max_num_seqs=8, budget=64)
    s.add_request(req("p0-old", 15, priority=0, arrival=0.0, max_tokens=40))
    s.add_request(req("p9", 15, priority=9, arrival=1.0, max_tokens=40))
    s.add_request(req("p0-new", 15, priority=0, arrival=2.0, max_tokens=40))
    victims = []
    for _ in range(20):
        out = s.schedule()
        victims += [r.request_id for r in out.preempted]
        if victims:
            break
        fake_update(s, out)
    assert victims and victims[0] == "p9"
    for rid in list(s.requests):
        s.abort_request(rid)
    assert_no_leak(s)


def test_a_preempted_worst_request_does_not_hold_back_better_ones():
    # The low-priority request is first in admission order; when it needs a block and none is
    # free, it preempts itself (it ranks worst) and the better request behind it still runs.
    s = make(num_blocks=3, max_num_seqs=8, budget=64)
    s.add_request(req("low", 7, priority=9, arrival=0.0, max_tokens=8))
    fake_update(s, s.schedule())
    s.add_request(req("high", 16, priority=0, arrival=1.0, max_tokens=8))
    out = s.schedule()
    assert ids(out) == ["low", "high"] and out.preempted == []  # admission order
    fake_update(s, out)  # the pool is full (1 + 2 blocks) and both need one more block
    out = s.schedule()
    assert [r.request_id for r in out.preempted] == ["low"]
    assert ids(out) == ["high"]
    for rid in list(s.requests):
        s.abort_request(rid)
    assert_no_leak(s)
