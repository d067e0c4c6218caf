"""The OpenAI API through the official client: shapes, streaming, usage, n, logprobs, stops."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import NGRAM_MODEL, SPEC_MODEL, http, sse_events

MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Tell me about the quick brown fox."}]


@pytest.fixture(params=["spec", "ngram", "spec-tp2"])
def live(request):
    name, model = {"spec": ("spec_server", SPEC_MODEL), "ngram": ("ngram_server", NGRAM_MODEL),
                   "spec-tp2": ("tp_spec_server", SPEC_MODEL)}[request.param]
    return request.getfixturevalue(name), model


@pytest.fixture(params=["tp1", "tp2"])
def spec_any(request):
    """The speculative server at tensor_parallel_size 1 and 2 (the tests that take it)."""
    return request.getfixturevalue("spec_server" if request.param == "tp1"
                                   else "tp_spec_server")


def _prompt_len(server, messages) -> int:
    tok = server.app.engine.tokenizer
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return len(tok.encode(text, add_special_tokens=False))


def test_chat_stream_equals_non_stream_at_temperature_zero(live, drafted):
    server, model = live
    client = server.client()
    full = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=24,
                                          temperature=0, extra_body={"ignore_eos": True})
    assert full.id.startswith("chatcmpl-")
    assert full.object == "chat.completion"
    assert full.model == model
    assert len(full.choices) == 1
    choice = full.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant"
    assert choice.finish_reason == "length"
    prompt_tokens = _prompt_len(server, MESSAGES)
    assert full.usage.prompt_tokens == prompt_tokens
    assert full.usage.completion_tokens == 24
    assert full.usage.total_tokens == prompt_tokens + 24

    stream = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=24, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices
                and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == []
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens,
            chunks[-1].usage.total_tokens) == (prompt_tokens, 24, prompt_tokens + 24)
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_stream_and_non_stream(spec_any, drafted):
    client = spec_any.client()
    tok = spec_any.app.engine.tokenizer
    prompt = "Once upon a time there was"
    full = client.completions.create(model=SPEC_MODEL, prompt=prompt, max_tokens=20,
                                     temperature=0, extra_body={"ignore_eos": True})
    assert full.id.startswith("cmpl-") and full.object == "text_completion"
    assert full.choices[0].finish_reason == "length"
    assert full.usage.prompt_tokens == len(tok(prompt).input_ids)
    assert full.usage.completion_tokens == 20
    chunks = list(client.completions.create(model=SPEC_MODEL, prompt=prompt, max_tokens=20,
                                            temperature=0, stream=True,
                                            extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] \
        == ["length"]


def test_completions_token_id_prompts_and_prompt_lists(spec_server, drafted):
    client = spec_server.client()
    ids = spec_server.app.engine.tokenizer("Hello world").input_ids
    by_text = client.completions.create(model=SPEC_MODEL, prompt="Hello world", max_tokens=6,
                                        temperature=0, extra_body={"ignore_eos": True})
    by_ids = client.completions.create(model=SPEC_MODEL, prompt=ids, max_tokens=6,
                                       temperature=0, extra_body={"ignore_eos": True})
    assert by_ids.choices[0].text == by_text.choices[0].text
    multi = client.completions.create(model=SPEC_MODEL, prompt=[ids, [5, 6, 7]], max_tokens=6,
                                      temperature=0, n=2, extra_body={"ignore_eos": True})
    assert [c.index for c in multi.choices] == [0, 1, 2, 3]
    assert multi.choices[0].text == multi.choices[1].text == by_text.choices[0].text
    assert multi.usage.prompt_tokens == len(ids) + 3
    assert multi.usage.completion_tokens == 4 * 6


def test_n3_with_seed_gives_three_seeded_choices(spec_any, drafted):
    client = spec_any.client()
    kwargs = dict(model=SPEC_MODEL, messages=MESSAGES, max_tokens=12, temperature=1.0, n=3,
                  seed=1234, extra_body={"ignore_eos": True, "num_speculative_tokens": 3})
    first = client.chat.completions.create(**kwargs)
    again = client.chat.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.message.content for c in first.choices] == \
        [c.message.content for c in again.choices]
    assert first.usage.completion_tokens == 36
    # Streamed, the three choices interleave by index and each ends exactly once.
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    roles = [c.choices[0].index for c in chunks if c.choices[0].delta.role == "assistant"]
    assert roles == [0, 1, 2]
    texts = {i: "" for i in range(3)}
    finishes = {i: [] for i in range(3)}
    for c in chunks:
        ch = c.choices[0]
        texts[ch.index] += ch.delta.content or ""
        if ch.finish_reason:
            finishes[ch.index].append(ch.finish_reason)
    assert [texts[i] for i in range(3)] == [c.message.content for c in first.choices]
    assert finishes == {0: ["length"], 1: ["length"], 2: ["length"]}


def test_chat_logprobs_shape(spec_any, drafted):
    client = spec_any.client()
    out = client.chat.completions.create(model=SPEC_MODEL, messages=MESSAGES, max_tokens=5,
                                         temperature=0, logprobs=True, top_logprobs=3,
                                         extra_body={"ignore_eos": True})
    content = out.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.logprob <= 0.0
        # Greedy: the chosen token is the most likely one.
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-5)
        assert entry.bytes == list(entry.token.encode("utf-8"))
    streamed = list(client.chat.completions.create(
        model=SPEC_MODEL, messages=MESSAGES, max_tokens=5, temperature=0, logprobs=True,
        top_logprobs=3, stream=True, extra_body={"ignore_eos": True}))
    tokens = [e.token for c in streamed if c.choices[0].logprobs
              for e in c.choices[0].logprobs.content]
    assert tokens == [e.token for e in content]


def test_completion_logprobs_shape(spec_server, drafted):
    client = spec_server.client()
    out = client.completions.create(model=SPEC_MODEL, prompt="Hello world", max_tokens=4,
                                    temperature=0, logprobs=2, extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert len(lp.text_offset) == 4 and lp.text_offset[0] == 0
    assert all(1 <= len(top) <= 3 and tok in top for tok, top in zip(lp.tokens, lp.top_logprobs))


def test_stop_sequence(spec_any, drafted):
    client = spec_any.client()
    base = client.completions.create(model=SPEC_MODEL, prompt="The quick brown", max_tokens=24,
                                     temperature=0, extra_body={"ignore_eos": True})
    text = base.choices[0].text
    # Choose a stop string from the middle of the greedy continuation.
    stop = text[len(text) // 2: len(text) // 2 + 2]
    if not stop.strip("\ufffd"):
        stop = text[1:3]
    cut = client.completions.create(model=SPEC_MODEL, prompt="The quick brown", max_tokens=24,
                                    temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True})
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[:text.index(stop)]
    assert stop not in cut.choices[0].text


def test_max_tokens_gives_length(ngram_server, drafted):
    client = ngram_server.client()
    out = client.chat.completions.create(model=NGRAM_MODEL, messages=MESSAGES,
                                         max_completion_tokens=16, temperature=0,
                                         extra_body={"ignore_eos": True})
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 16


def test_num_speculative_tokens_zero_matches_greedy(spec_server, drafted):
    client = spec_server.client()
    kwargs = dict(model=SPEC_MODEL, prompt="def add(a, b):", max_tokens=16, temperature=0,
                  extra_body={"ignore_eos": True})
    plain = client.completions.create(**{**kwargs, "extra_body": {"ignore_eos": True,
                                                                  "num_speculative_tokens": 0}})
    spec = client.completions.create(**{**kwargs, "extra_body": {"ignore_eos": True,
                                                                 "num_speculative_tokens": 3}})
    assert spec.choices[0].text == plain.choices[0].text


def test_models_health_version(spec_any):
    models = spec_any.client().models.list()
    assert [m.id for m in models.data] == [SPEC_MODEL]
    status, _, body = http("GET", spec_any.base_url + "/health")
    assert status == 200
    status, _, body = http("GET", spec_any.base_url + "/version")
    assert status == 200 and b'"version"' in body


def test_raw_sse_framing(spec_any, drafted):
    status, headers, body = http("POST", spec_any.base_url + "/v1/completions",
                                 {"prompt": "Hello", "max_tokens": 5, "stream": True,
                                  "temperature": 0, "ignore_eos": True})
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    assert body.endswith(b"data: [DONE]\n\n")
    events = sse_events(body)
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    assert [e["choices"][0]["finish_reason"] for e in events[:-1]][-1] == "length"
