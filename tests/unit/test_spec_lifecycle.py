"""Speculation through a request's life: seeded output independent of the batch and of KV
pressure, preemption by recompute, stops landing inside an accepted run, sampled logprobs, and
an abort in the middle of a speculative step. Tiny random models; greedy references come from
the no-spec engine."""

from __future__ import annotations

import dataclasses

import pytest

from specdec import SamplingParams
from tests.conftest import make_tiny_config, save_tiny_model
from tests.unit.test_spec import (GREEDY, assert_same_greedy, make_llm, prompts, save_noisy_copy,
                                  spec_llm)

SEEDED = SamplingParams(temperature=0.9, top_p=0.95, max_tokens=40, ignore_eos=True, seed=123,
                        repetition_penalty=1.1)


@pytest.fixture(scope="module")
def noisy_draft(tiny_llama_dir, tmp_path_factory):
    return save_noisy_copy(tiny_llama_dir, str(tmp_path_factory.mktemp("noisy_draft_life")),
                           0.15, seed=5)


def squeezed(target, draft, k, **overrides):
    """A pool of 14 blocks of 16 and a 24-token budget: requests preempt each other."""
    kw = {"cache.num_blocks": 14, "cache.block_size": 16,
          "scheduler.max_num_batched_tokens": 24}
    kw.update(overrides)
    return spec_llm(target, draft, k, **kw)


# ---- seeded requests ----------------------------------------------------------------------

def test_seeded_output_is_independent_of_batch_and_kv_pressure(tiny_llama_dir, noisy_draft):
    """12 seeded requests, each alone, the first 8 in one batch, and all 12 in a pool so small
    that they preempt each other and the budget cannot give every decode its look-ahead: the
    same tokens every time.
    Mutation planted to confirm: the scheduler shrinking a seeded request's look-ahead to the
    budget and the free blocks, and resuming it with a plain sample (the code before
    `pins_lookahead`): that changes which random stream decides a position."""
    batch = prompts(12, seed=4)
    params = [dataclasses.replace(SEEDED, seed=i, max_tokens=30 + i) for i in range(12)]
    llm = spec_llm(tiny_llama_dir, noisy_draft, 4)
    alone = [llm.generate([p], s)[0].outputs[0] for p, s in zip(batch, params)]
    together = llm.generate(batch[:8], params[:8])
    for got, want in zip(together, alone):
        assert got.outputs[0].token_ids == want.token_ids
    tight = squeezed(tiny_llama_dir, noisy_draft, 4)
    out = tight.generate(batch, params)
    assert sum(o.metrics.num_preemptions > 0 for o in out) >= 2
    for got, want in zip(out, alone):
        assert got.outputs[0].token_ids == want.token_ids
        assert got.outputs[0].text == want.text
    stats = tight.engine.stats()
    assert stats.spec_num_accepted_tokens > 0
    assert stats.num_blocks_free == stats.num_blocks_total


# ---- preemption -----------------------------------------------------------------------------

def test_preemption_with_speculation_greedy_and_seeded(tiny_llama_dir, noisy_draft):
    """Greedy: squeezed spec run == no-spec reference; seeded: squeezed == roomy spec run.
    Mutation planted to confirm: _admit resuming a seeded request with its last token in the
    prefill (a plain sample where the roomy run drafts). (Not resetting num_computed_tokens in
    _preempt is an equivalent mutant: _admit sets it again.)"""
    batch = prompts(8, seed=21)
    greedy = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, logprobs=2)
    reference = make_llm(tiny_llama_dir).generate(batch, greedy)
    tight = squeezed(tiny_llama_dir, noisy_draft, 4)
    out = tight.generate(batch, greedy)
    assert tight.engine.stats().num_preemptions > 0
    assert_same_greedy(out, reference)
    seeded = [SamplingParams(temperature=0.9, max_tokens=40, ignore_eos=True, seed=50 + i)
              for i in range(8)]
    roomy = spec_llm(tiny_llama_dir, noisy_draft, 4).generate(batch, seeded)
    before = tight.engine.stats().num_preemptions
    pressed = tight.generate(batch, seeded)
    assert tight.engine.stats().num_preemptions > before
    for a, b in zip(pressed, roomy):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
    stats = tight.engine.stats()
    assert stats.num_blocks_free == stats.num_blocks_total


@pytest.mark.parametrize("caching", [True, False], ids=["prefix-cache", "no-cache"])
def test_self_draft_accepts_everything_across_preemptions(tiny_llama_dir, caching):
    """A copy of the target as draft stays at 100 % acceptance after preemptions: the draft's
    KV is rebuilt (draft_num_computed_tokens reset), never reused stale.
    Mutation planted to confirm: greedy_verify's final token read from row num_accepted - 1.
    (Not resetting draft_num_computed_tokens in _preempt survives here, with and without the
    prefix cache: the engine lowers it to num_computed_tokens after the first recompute
    chunk, and a resumed request mostly gets its own freed blocks back, draft KV included.)"""
    batch = prompts(8, seed=22)
    tight = squeezed(tiny_llama_dir, tiny_llama_dir, 4,
                     **{"cache.enable_prefix_caching": caching})
    out = tight.generate(batch, GREEDY)
    stats = tight.engine.stats()
    assert stats.num_preemptions > 0
    assert stats.spec_num_accepted_tokens == stats.spec_num_draft_tokens > 0
    reference = make_llm(tiny_llama_dir).generate(batch, GREEDY)
    assert_same_greedy(out, reference)


# ---- stops inside an accepted run -----------------------------------------------------------

@pytest.fixture(scope="module")
def self_draft(tiny_llama_dir):
    """k = 6 with the target as its own draft: every window is accepted whole, so the window
    after t1 yields output positions 1..7 in one step."""
    return spec_llm(tiny_llama_dir, tiny_llama_dir, 6)


@pytest.fixture(scope="module")
def free_run(tiny_llama_dir):
    """(prompt, no-spec greedy output, stop string): output position 4 holds a token that does
    not occur before it, and the text of positions 3..4 does not occur in the text before."""
    llm = make_llm(tiny_llama_dir)
    tok = llm.tokenizer
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, logprobs=3)
    for p in prompts(40, seed=31):
        out = llm.generate([p], params)[0].outputs[0]
        ids = out.token_ids
        prefix = tok.decode(ids[:3])
        stop = tok.decode(ids[:5])[len(prefix):]
        if ids[4] not in ids[:4] and ids[4] != 2 and stop.strip() and stop not in prefix:
            return p, out, stop
    raise AssertionError("no prompt with a fresh token and text at position 4")


def check_stopped_mid_run(got, want_tokens, want_logprobs, metrics, reason):
    """Output, usage, logprobs and counters of a request that stopped at output position 4,
    in the middle of the accepted run 1..7 of its only verify window."""
    assert got.token_ids == want_tokens, (got.token_ids, want_tokens)
    assert got.finish_reason == "stop" and got.stop_reason == reason
    assert metrics.num_generation_tokens == len(want_tokens)
    assert len(got.logprobs) == len(want_tokens)
    for (c1, top1), (c2, top2) in zip(got.logprobs, want_logprobs):
        assert abs(c1 - c2) < 1e-5 and [t for t, _ in top1] == [t for t, _ in top2]
    # One window of 6 drafts, all accepted by the verifier; the 3 tokens past the stop are
    # not counted as accepted.
    assert (metrics.num_drafts, metrics.num_draft_tokens) == (1, 6)
    assert metrics.num_accepted_tokens == len(want_tokens) - 1


def test_stop_token_id_inside_an_accepted_run(self_draft, free_run):
    """Mutation planted to confirm: _check_stop testing only the last token of a run."""
    prompt, ref, _ = free_run
    stop = ref.token_ids[4]
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, logprobs=3,
                            stop_token_ids=[stop])
    before = self_draft.engine.stats()
    out = self_draft.generate([prompt], params)[0]
    check_stopped_mid_run(out.outputs[0], ref.token_ids[:5], ref.logprobs[:5], out.metrics,
                          stop)
    after = self_draft.engine.stats()
    assert after.spec_num_accepted_tokens - before.spec_num_accepted_tokens == 4
    assert after.generation_tokens_total - before.generation_tokens_total == 5


def test_eos_inside_an_accepted_run(self_draft, tiny_llama_dir):
    """EOS made the argmax by logit_bias and held back by min_tokens = 4: it lands at output
    position 4, inside the accepted run 1..7 (draft and target both see the bias).
    Mutation planted to confirm: _check_stop testing only the last token of a run."""
    prompt = prompts(1, seed=32)[0]
    params = SamplingParams(temperature=0.0, max_tokens=20, logprobs=3, min_tokens=4,
                            logit_bias={2: 30.0})
    ref = make_llm(tiny_llama_dir).generate([prompt], params)[0].outputs[0]
    assert len(ref.token_ids) == 5 and ref.token_ids[-1] == 2
    out = self_draft.generate([prompt], params)[0]
    check_stopped_mid_run(out.outputs[0], ref.token_ids, ref.logprobs, out.metrics, None)
    assert out.outputs[0].text == ref.text


def test_stop_string_inside_an_accepted_run(self_draft, free_run, tiny_llama_dir):
    """The text of output positions 3..4 as a stop string: completed inside the run 1..7.
    Mutation planted to confirm: the stop-string cut not trimming the accepted tokens after
    it (engine._update keeping `tokens` whole)."""
    prompt, _, stop = free_run
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, logprobs=3,
                            stop=[stop])
    want = make_llm(tiny_llama_dir).generate([prompt], params)[0].outputs[0]
    out = self_draft.generate([prompt], params)[0]
    got = out.outputs[0]
    assert got.text == want.text and stop not in got.text
    assert got.token_ids == want.token_ids and 2 <= len(got.token_ids) <= 5
    check_stopped_mid_run(got, want.token_ids, want.logprobs, out.metrics, stop)


def test_max_tokens_caps_the_last_window(self_draft, free_run):
    """max_tokens = 5: the window after t1 is capped at 3 drafts (3 + bonus = positions 1..4);
    nothing is drafted past max_tokens."""
    prompt, ref, _ = free_run
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, logprobs=3)
    out = self_draft.generate([prompt], params)[0]
    got = out.outputs[0]
    assert got.token_ids == ref.token_ids[:5] and got.finish_reason == "length"
    assert len(got.logprobs) == 5
    assert (out.metrics.num_drafts, out.metrics.num_draft_tokens,
            out.metrics.num_accepted_tokens) == (1, 3, 3)


def test_n3_with_a_stop_string_some_choices_hit(tiny_llama_dir, noisy_draft):
    """n = 3 seeded sampled choices with a stop string: each choice equals its own no-stop run
    (same seed) cut at the first occurrence of the stop string; choices finish separately.
    Mutation planted to confirm: the stop-string cut not trimming the accepted tokens after
    it (engine._update keeping `tokens` whole)."""
    llm = spec_llm(tiny_llama_dir, noisy_draft, 4)
    prompt = prompts(1, seed=33)[0]
    base = dict(n=3, temperature=1.0, max_tokens=40, ignore_eos=True, seed=7, logprobs=1)
    free = llm.generate([prompt], SamplingParams(**base))[0].outputs
    texts = [c.text for c in free]
    # A two-character string in some choices' text but not all.
    candidates = sorted({t[i:i + 2] for t in texts for i in range(len(t) - 1)
                         if t[i:i + 2].strip() and len(t[i:i + 2]) == 2})
    stop = next((s for s in candidates if 0 < sum(s in t for t in texts) < 3), None)
    assert stop is not None, texts
    stopped = llm.generate([prompt], SamplingParams(stop=[stop], **base))[0].outputs
    assert len(stopped) == 3
    for want, got in zip(free, stopped):
        if stop in want.text:
            assert got.finish_reason == "stop" and got.stop_reason == stop
            assert got.text == want.text[:want.text.index(stop)]
            n = len(got.token_ids)
            assert got.token_ids == want.token_ids[:n]
            assert llm.tokenizer.decode(got.token_ids[:n - 1]).find(stop) < 0
            assert stop in llm.tokenizer.decode(got.token_ids)
            assert [round(c, 4) for c, _ in got.logprobs] == [
                round(c, 4) for c, _ in want.logprobs[:n]]
        else:
            assert got.finish_reason == "length"
            assert got.token_ids == want.token_ids and got.text == want.text
    stats = llm.engine.stats()
    assert stats.num_running == stats.num_waiting == 0
    assert stats.num_blocks_free == stats.num_blocks_total


# ---- sampled logprobs -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def v16_pair(tmp_path_factory):
    target = save_tiny_model(str(tmp_path_factory.mktemp("life_v16_t")),
                             make_tiny_config("llama", vocab_size=16), seed=41)
    draft = save_tiny_model(str(tmp_path_factory.mktemp("life_v16_d")),
                            make_tiny_config("draft", vocab_size=16), seed=42)
    return target, draft


@pytest.mark.parametrize("method", ["draft", "ngram"])
def test_sampled_logprobs_equal_the_no_spec_targets(v16_pair, method):
    """Sampled requests under speculation: every returned logprob (chosen token and the full
    top-16 = the whole vocabulary) equals the no-spec target's at that position within 1e-5.
    Mutation planted to confirm: logprobs computed from the processed (temperature-scaled)
    rows instead of the raw logits."""
    target, draft = v16_pair
    llm = spec_llm(target, draft if method == "draft" else None, 4, method=method,
                   **{"spec.ngram_min": 1})
    batch = [{"prompt_token_ids": [(7 * i + j) % 13 + 3 for j in range(6)]} for i in range(6)]
    params = [SamplingParams(temperature=0.9, max_tokens=24, ignore_eos=True, logprobs=16,
                             seed=i if i % 2 else None) for i in range(6)]
    outs = llm.generate(batch, params)
    assert llm.engine.stats().spec_num_accepted_tokens > 0
    # Teacher forcing through the no-spec engine: one max_tokens=1 request per position.
    ref_llm = make_llm(target)
    forced, index = [], []
    for b, o in zip(batch, outs):
        toks = o.outputs[0].token_ids
        for i in range(len(toks)):
            forced.append({"prompt_token_ids": b["prompt_token_ids"] + toks[:i]})
            index.append(toks[i])
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, logprobs=16)
    refs = ref_llm.generate(forced, one)
    got = [lp for o in outs for lp in o.outputs[0].logprobs]
    assert len(got) == len(refs)
    worst = 0.0
    for (chosen, top), ref, token in zip(got, refs, index):
        _, ref_top = ref.outputs[0].logprobs[0]
        ref_map = dict(ref_top)
        assert len(ref_map) == 16 and dict(top).keys() == ref_map.keys()
        worst = max(worst, abs(chosen - ref_map[token]),
                    *(abs(lp - ref_map[t]) for t, lp in top))
    assert worst < 1e-5, worst


# ---- abort in the middle of a speculative step ------------------------------------------------

def test_abort_between_speculative_steps_frees_everything(tiny_llama_dir, noisy_draft):
    llm = spec_llm(tiny_llama_dir, noisy_draft, 6)
    engine = llm.engine
    for i, p in enumerate(prompts(3, seed=41)):
        engine.add_request(f"r{i}", p["prompt_token_ids"], GREEDY)
    for _ in range(3):
        engine.step()
    assert engine.scheduler.num_running == 3
    before = engine.stats().generation_tokens_total
    for i in range(3):
        engine.abort_request(f"r{i}")
    assert not engine.has_unfinished_requests()
    stats = engine.stats()
    assert stats.num_running == stats.num_waiting == 0
    assert stats.num_blocks_free == stats.num_blocks_total
    assert engine.step() == [] and engine.stats().generation_tokens_total == before
