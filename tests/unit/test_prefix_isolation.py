"""Prefix-cache isolation by `cache_salt` (vLLM's request field): requests with different salts
(or a salt and none) never share KV blocks; requests with the same salt do. Bookkeeping only."""

import pytest

from specdec.core.config import CacheConfig, SchedulerConfig
from specdec.core.request import MAX_CACHE_SALT, Request, RequestStatus, SamplingParams
from specdec.core.scheduler import Scheduler

BS = 8
PROMPT = list(range(100, 140))  # 5 full blocks


def make_scheduler() -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=256),
                     CacheConfig(block_size=BS), 64, 256)


def run_to_cache(sched: Scheduler, request_id: str, salt: str | None) -> Request:
    """Admit, prefill and finish one request; returns it (its blocks are cached and freed)."""
    request = Request(request_id, list(PROMPT), SamplingParams(max_tokens=4, cache_salt=salt))
    sched.add_request(request)
    out = sched.schedule()
    assert [s.request for s in out.scheduled] == [request]
    sched.update(out, {request_id: [7]}, {request_id: 0})
    sched.finish_request(request_id, RequestStatus.FINISHED_STOPPED)
    return request


@pytest.mark.parametrize("first,second,shared", [
    ("tenant-a", "tenant-a", True), ("tenant-a", "tenant-b", False),
    (None, "tenant-a", False), ("tenant-a", None, False), (None, None, True)])
def test_cache_salt_isolates_prefix_cache(first, second, shared):
    sched = make_scheduler()
    run_to_cache(sched, "first", first)
    second_request = run_to_cache(sched, "second", second)
    expected = (len(PROMPT) // BS - 1) * BS if shared else 0  # the last block is recomputed
    assert second_request.num_cached_tokens == expected
    assert sched.block_pool.num_used_blocks == 0


def test_cache_salt_validated():
    with pytest.raises(ValueError, match="cache_salt must be null or a non-empty string"):
        SamplingParams(cache_salt="")
    with pytest.raises(ValueError, match=f"at most {MAX_CACHE_SALT} characters"):
        SamplingParams(cache_salt="x" * (MAX_CACHE_SALT + 1))


def test_server_passes_cache_salt():
    from server.protocol import _sampling_params

    (params,) = _sampling_params({"cache_salt": "tenant-a"}, 8, None)
    assert params.cache_salt == "tenant-a"
    (params,) = _sampling_params({}, 8, None)
    assert params.cache_salt is None
