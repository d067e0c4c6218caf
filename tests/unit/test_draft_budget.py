"""Speculation stays inside the step's limits: draft look-ahead never forces the preemption of
another running request, and the draft's catch-up over unseen tokens (a long prompt, a prefix
hit, a preemption) runs in chunks of at most the step's token budget."""

from __future__ import annotations

import random

import pytest

from specdec.core.config import CacheConfig, SchedulerConfig
from specdec.core.request import Request, SamplingParams
from specdec.core.scheduler import Scheduler

BS = 8


def test_lookahead_never_preempts_a_later_request():
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16),
                      CacheConfig(block_size=BS), 3, 256)
    a = Request("a", list(range(100, 107)), SamplingParams(max_tokens=9))  # 7 tokens
    b = Request("b", list(range(200, 208)), SamplingParams(max_tokens=9))  # 8 tokens
    sched.add_request(a)
    sched.add_request(b)
    out = sched.schedule()
    sched.update(out, {"a": [7], "b": [7]}, {"a": 0, "b": 0})
    assert sched.block_pool.num_free_blocks == 1
    # a's drafts would need the last free block; b needs it for its own next token.
    a.num_lookahead_tokens = 4
    out = sched.schedule()
    assert out.preempted == [] and sched.num_preemptions == 0
    assert [(s.request.request_id, s.num_new_tokens, s.num_lookahead_tokens)
            for s in out.scheduled] == [("a", 1, 0), ("b", 1, 0)]
    # With room for both, a gets its drafts.
    sched2 = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16),
                       CacheConfig(block_size=BS), 4, 256)
    a2 = Request("a", list(range(100, 107)), SamplingParams(max_tokens=9))
    b2 = Request("b", list(range(200, 208)), SamplingParams(max_tokens=9))
    sched2.add_request(a2)
    sched2.add_request(b2)
    sched2.update(sched2.schedule(), {"a": [7], "b": [7]}, {"a": 0, "b": 0})
    a2.num_lookahead_tokens = 4
    out = sched2.schedule()
    assert [(s.request.request_id, s.num_lookahead_tokens) for s in out.scheduled] == [
        ("a", 4), ("b", 0)]
    assert out.preempted == []


@pytest.fixture(scope="module")
def draft_pair(tiny_llama_dir, tiny_draft_dir):
    from specdec import LLM
    from specdec.core.config import Config

    def make(spec: bool, budget: int):
        overrides = {"model.path": tiny_llama_dir, "device.device": "cpu",
                     "model.max_model_len": 512, "scheduler.max_num_batched_tokens": budget}
        if spec:
            overrides.update({"spec.method": "draft", "spec.draft_model": tiny_draft_dir,
                              "spec.num_speculative_tokens": 3, "spec.adaptive": False})
        return LLM(Config().replace(**overrides))
    return make


def test_draft_catch_up_is_chunked_within_the_budget(draft_pair):
    budget = 32
    plain, spec = draft_pair(False, budget), draft_pair(True, budget)
    sizes = []
    runner = spec.engine.draft_runner
    real_execute = runner.execute

    def recording(seqs, observe=False, **kwargs):
        sizes.append(sum(len(s.token_ids) for s in seqs))
        return real_execute(seqs, observe, **kwargs)
    runner.execute = recording
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(3, 384) for _ in range(n)]}
               for n in (100, 20, 70)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in plain.generate(prompts, params)]
    got = [o.outputs[0].token_ids for o in spec.generate(prompts, params)]
    assert got == want
    assert max(sizes) <= budget and sum(sizes) >= 100 + 20 + 70
    stats = spec.engine.stats()
    assert stats.spec_num_drafts > 0 and stats.num_blocks_free == stats.num_blocks_total
