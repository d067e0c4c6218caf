"""Engine (no speculation): continuous batching equals running alone, preemption, prefix
caching, seeded sampling, stop strings, streamed deltas, validation, the offline API."""

from __future__ import annotations

import random

import pytest

from specdec import LLM, SamplingParams
from specdec.core.config import Config

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def make_llm(path: str, **overrides) -> LLM:
    base = {"model.path": path, "device.device": "cpu", "model.max_model_len": 512}
    base.update(overrides)
    return LLM(Config().replace(**base))


def random_prompts(n: int, vocab: int, seed: int, lo: int = 3, hi: int = 90) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))]}
            for _ in range(n)]


def token_ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def tiny_llm(tiny_llama_dir):
    return make_llm(tiny_llama_dir)


def test_batched_equals_alone(tiny_llm):
    prompts = random_prompts(16, 384, seed=0)
    together = token_ids(tiny_llm.generate(prompts, GREEDY))
    alone = [token_ids(tiny_llm.generate([p], GREEDY))[0] for p in prompts]
    assert together == alone
    assert all(len(t) == 24 for t in together)
    assert tiny_llm.engine.stats().kv_cache_usage == 0.0


def test_preemption_keeps_outputs(tiny_llama_dir, tiny_llm):
    prompts = random_prompts(16, 384, seed=1, lo=20, hi=60)
    expected = token_ids(tiny_llm.generate(prompts, GREEDY))
    small = make_llm(tiny_llama_dir, **{"cache.num_blocks": 12, "cache.block_size": 16,
                                        "scheduler.max_num_batched_tokens": 64})
    got = small.generate(prompts, GREEDY)
    assert token_ids(got) == expected
    assert small.engine.scheduler.num_preemptions > 0
    assert sum(o.metrics.num_preemptions for o in got) > 0
    stats = small.engine.stats()
    assert stats.num_blocks_free == stats.num_blocks_total
    assert stats.num_running == stats.num_waiting == 0


def test_chunked_prefill_equals_whole(tiny_llama_dir, tiny_llm):
    prompts = random_prompts(4, 384, seed=2, lo=100, hi=200)
    expected = token_ids(tiny_llm.generate(prompts, GREEDY))
    chunked = make_llm(tiny_llama_dir, **{"scheduler.max_num_batched_tokens": 16})
    assert token_ids(chunked.generate(prompts, GREEDY)) == expected


def test_prefix_cache_hit_reported_and_output_unchanged(tiny_llama_dir):
    rng = random.Random(3)
    system = [rng.randrange(3, 384) for _ in range(100)]
    questions = [[rng.randrange(3, 384) for _ in range(7)] for _ in range(2)]
    llm = make_llm(tiny_llama_dir)
    first = llm.generate([{"prompt_token_ids": system + questions[0]}], GREEDY)[0]
    second = llm.generate([{"prompt_token_ids": system + questions[1]}], GREEDY)[0]
    assert first.metrics.num_cached_tokens == 0
    assert second.metrics.num_cached_tokens >= (len(system) // 16) * 16
    fresh = make_llm(tiny_llama_dir, **{"cache.enable_prefix_caching": False})
    again = fresh.generate([{"prompt_token_ids": system + questions[1]}], GREEDY)[0]
    assert again.outputs[0].token_ids == second.outputs[0].token_ids
    stats = llm.engine.stats()
    assert stats.prefix_cache_hits >= (len(system) // 16) * 16
    assert stats.prefix_cache_queries >= 2 * len(system)


def test_seeded_sampling_independent_of_batch(tiny_llm):
    prompts = random_prompts(6, 384, seed=4)
    params = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=1234, max_tokens=16,
                            ignore_eos=True)
    alone = token_ids(tiny_llm.generate([prompts[0]], params))[0]
    mixed = [params] + [SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True)] * 5
    together = token_ids(tiny_llm.generate(prompts, mixed))[0]
    reversed_batch = token_ids(tiny_llm.generate(prompts[::-1], mixed[::-1]))[-1]
    assert alone == together == reversed_batch
    other_seed = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=99, max_tokens=16,
                                ignore_eos=True)
    assert token_ids(tiny_llm.generate([prompts[0]], other_seed))[0] != alone


def test_n_choices_with_seed(tiny_llm):
    out = tiny_llm.generate(["Hello world"], SamplingParams(n=3, temperature=1.0, seed=7,
                                                            max_tokens=12, ignore_eos=True))
    assert len(out) == 1 and [c.index for c in out[0].outputs] == [0, 1, 2]
    again = tiny_llm.generate(["Hello world"], SamplingParams(n=3, temperature=1.0, seed=7,
                                                              max_tokens=12, ignore_eos=True))
    assert [c.token_ids for c in out[0].outputs] == [c.token_ids for c in again[0].outputs]
    assert len({tuple(c.token_ids) for c in out[0].outputs}) > 1


def _stream(llm, prompt, params):
    """Drive the engine by hand and collect every delta of one request."""
    engine = llm.engine
    engine.add_request("s", prompt, params)
    deltas, final = [], None
    while engine.has_unfinished_requests():
        for out in engine.step():
            deltas.append(out.outputs[0].text_delta)
            final = out
    return deltas, final


def test_stop_string_across_token_boundaries(tiny_llm):
    base = tiny_llm.generate(["The quick brown"], GREEDY)[0].outputs[0]
    text = base.text
    assert len(text) > 12, text
    # A stop string that starts inside one token and ends inside a later one.
    stop = text[5:11]
    first_at = text.find(stop)
    out = tiny_llm.generate(["The quick brown"], SamplingParams(
        temperature=0.0, max_tokens=24, ignore_eos=True, stop=[stop]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[:first_at]
    kept = tiny_llm.generate(["The quick brown"], SamplingParams(
        temperature=0.0, max_tokens=24, ignore_eos=True, stop=[stop],
        include_stop_str_in_output=True))[0].outputs[0]
    assert kept.text == text[:first_at + len(stop)]
    deltas, final = _stream(tiny_llm, "The quick brown", SamplingParams(
        temperature=0.0, max_tokens=24, ignore_eos=True, stop=[stop]))
    assert "".join(deltas) == final.outputs[0].text == out.text


def test_deltas_concatenate_with_emoji_and_cjk(tiny_llm):
    # A random model over byte-level BPE emits multi-byte characters split across tokens (and
    # some invalid bytes, which legitimately decode to U+FFFD). A delta that emitted half a
    # character would leave a U+FFFD in the joined stream that the one-shot decode lacks.
    params = SamplingParams(temperature=1.0, seed=5, max_tokens=60, ignore_eos=True)
    for prompt in ["Hello 🙂 你好 world", "数据 🚀🚀 block"]:
        deltas, final = _stream(tiny_llm, prompt, params)
        whole = tiny_llm.tokenizer.decode(final.outputs[0].token_ids, skip_special_tokens=True)
        assert "".join(deltas) == final.outputs[0].text == whole


def test_max_tokens_and_eos(tiny_llm):
    out = tiny_llm.generate(["Hello"], SamplingParams(temperature=0.0, max_tokens=5,
                                                      ignore_eos=True))[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 5
    eos = tiny_llm.engine.eos_token_ids[0]
    forced = tiny_llm.generate(["Hello"], SamplingParams(
        temperature=0.0, max_tokens=5, logit_bias={eos: 100.0}))[0].outputs[0]
    assert forced.finish_reason == "stop" and forced.token_ids == [eos]
    late = tiny_llm.generate(["Hello"], SamplingParams(
        temperature=0.0, max_tokens=8, min_tokens=3, logit_bias={eos: 100.0}))[0].outputs[0]
    assert len(late.token_ids) == 4 and late.token_ids[-1] == eos


def test_logprobs_shapes(tiny_llm):
    out = tiny_llm.generate(["Hello"], SamplingParams(temperature=0.0, max_tokens=6,
                                                      ignore_eos=True, logprobs=3))[0].outputs[0]
    assert len(out.logprobs) == 6
    for token, (chosen, top) in zip(out.token_ids, out.logprobs):
        assert len(top) == 3 and top[0][0] == token  # greedy: the chosen token is the top one
        assert chosen == pytest.approx(top[0][1])
        assert top[0][1] >= top[1][1] >= top[2][1]


@pytest.mark.parametrize("kwargs, param", [
    ({"max_tokens": 600}, "input_tokens"),
])
def test_validation_names_the_parameter(tiny_llm, kwargs, param):
    with pytest.raises(ValueError, match=param):
        tiny_llm.generate(["Hello"], SamplingParams(**kwargs))
    assert not tiny_llm.engine.has_unfinished_requests()


def test_bad_prompts_rejected(tiny_llm):
    with pytest.raises(ValueError, match="prompt"):
        tiny_llm.generate([{"prompt_token_ids": [1, 2, 10_000]}], GREEDY)
    with pytest.raises(ValueError, match="prompt"):
        tiny_llm.generate([{"prompt_token_ids": []}], GREEDY)
    assert tiny_llm.engine.stats().num_blocks_free == tiny_llm.engine.num_blocks


def test_sampling_params_errors():
    for kwargs, name in [({"top_p": 0.0}, "top_p"), ({"temperature": -1}, "temperature"),
                         ({"max_tokens": 0}, "max_tokens"), ({"logprobs": 21}, "logprobs"),
                         ({"n": 0}, "n"), ({"num_speculative_tokens": -1},
                                           "num_speculative_tokens")]:
        with pytest.raises(ValueError, match=name):
            SamplingParams(**kwargs)


def test_chat_template(tiny_llm):
    out = tiny_llm.chat([{"role": "user", "content": "Hello"}],
                        SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    ids = tiny_llm.tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}],
                                                 add_generation_prompt=True, tokenize=False)
    assert out[0].prompt_token_ids == tiny_llm.tokenizer(ids).input_ids


def test_token_ids_slice_equals_all_token_ids_slice():
    from specdec.core.request import Request
    req = Request("x", [1, 2, 3, 4], SamplingParams())
    req.output_token_ids = [5, 6, 7]
    for start in range(8):
        for end in range(start, 8):
            assert req.token_ids_slice(start, end) == req.all_token_ids[start:end]
