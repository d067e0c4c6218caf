"""Drop-in parity with vLLM through the official openai client (and raw HTTP where a route is
outside /v1): aliases, developer role, return_token_ids, echo + prompt logprobs, continuous
usage, spec_decode_stats, X-Request-Id, /tokenize /detokenize /ping /health/live, CORS, both
metric prefixes, priority."""

from __future__ import annotations

import asyncio
import re
import threading
import types

import openai
import pytest

from server import parity
from server.protocol import loads
from tests.e2e.conftest import http, parse_metrics
from tests.e2e.test_fim import FIM_MODEL, fim_dir, fim_server  # noqa: F401  (fixtures)

ORIGIN = "http://editor.example"


def test_models_lists_aliases_and_an_alias_is_served(fim_server):
    client = fim_server.client()
    models = client.models.list()
    assert [m.id for m in models.data] == [FIM_MODEL, "tiny-alias", "other-alias"]
    assert all(m.model_extra["root"] == FIM_MODEL for m in models.data)
    out = client.completions.create(model="other-alias", prompt="Hello", max_tokens=2)
    assert out.usage.completion_tokens >= 1
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="Hello", max_tokens=2)


def test_developer_role_maps_to_system(fim_server):
    client = fim_server.client()
    kw = dict(model=FIM_MODEL, max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    dev = client.chat.completions.create(messages=[
        {"role": "developer", "content": "Be terse."}, {"role": "user", "content": "Hi"}], **kw)
    sys_ = client.chat.completions.create(messages=[
        {"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}], **kw)
    assert dev.usage.prompt_tokens == sys_.usage.prompt_tokens
    assert dev.choices[0].message.content == sys_.choices[0].message.content


def test_return_token_ids_in_choices_and_chunks(fim_server):
    client = fim_server.client()
    tok = fim_server.app.engine.tokenizer
    kw = dict(model=FIM_MODEL, prompt="The quick brown", max_tokens=8, temperature=0,
              extra_body={"ignore_eos": True, "return_token_ids": True})
    full = client.completions.create(**kw)
    choice = full.choices[0].model_extra
    assert len(choice["token_ids"]) == 8
    assert choice["prompt_token_ids"] == tok.encode("The quick brown")
    assert tok.decode(choice["token_ids"], skip_special_tokens=True) == full.choices[0].text
    chunks = list(client.completions.create(stream=True, **kw))
    assert chunks[0].model_extra["prompt_token_ids"] == choice["prompt_token_ids"]
    streamed = [t for c in chunks for t in c.choices[0].model_extra.get("token_ids", [])]
    assert streamed == choice["token_ids"]


def test_echo_with_logprobs_and_max_tokens_zero_scores_the_prompt(fim_server):
    client = fim_server.client()
    tok = fim_server.app.engine.tokenizer
    prompt = "The quick brown fox jumps"
    ids = tok.encode(prompt)
    out = client.completions.create(model=FIM_MODEL, prompt=prompt, max_tokens=0, echo=True,
                                    logprobs=1, temperature=0)
    choice = out.choices[0]
    assert choice.text == prompt
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None
    assert all(x is not None and x <= 0 for x in lp.token_logprobs[1:])
    assert lp.top_logprobs[0] is None and len(lp.top_logprobs[1]) >= 1
    assert out.usage.completion_tokens == 0
    # echo with generation: the prompt's logprobs (the same numbers), then the new tokens'.
    gen = client.completions.create(model=FIM_MODEL, prompt=prompt, max_tokens=3, echo=True,
                                    logprobs=0, temperature=0, extra_body={"ignore_eos": True})
    g = gen.choices[0]
    assert g.text.startswith(prompt) and len(g.logprobs.tokens) == len(ids) + 3
    assert g.logprobs.token_logprobs[0] is None
    assert g.logprobs.token_logprobs[1:len(ids)] == pytest.approx(lp.token_logprobs[1:],
                                                                  abs=1e-5)
    assert g.logprobs.text_offset[len(ids)] == len(prompt)


def test_prompt_logprobs_in_vllm_shape(fim_server):
    status, _, payload = http("POST", fim_server.base_url + "/v1/completions", {
        "model": FIM_MODEL, "prompt": "Hello world", "max_tokens": 1, "prompt_logprobs": 2})
    assert status == 200
    choice = loads(payload)["choices"][0]
    ids = fim_server.app.engine.tokenizer.encode("Hello world")
    pl = choice["prompt_logprobs"]
    assert len(pl) == len(ids) and pl[0] is None
    assert all(str(ids[j]) in pl[j] for j in range(1, len(ids)))


def test_continuous_usage_stats_and_spec_decode_stats(fim_server):
    client = fim_server.client()
    chunks = list(client.completions.create(
        model=FIM_MODEL, prompt="for i in range(10):", max_tokens=12, temperature=0,
        stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True},
        extra_body={"ignore_eos": True}))
    with_choices = [c for c in chunks if c.choices]
    assert all(c.usage is not None for c in with_choices)
    counts = [c.usage.completion_tokens for c in with_choices]
    assert counts == sorted(counts) and counts[-1] == 12
    final = chunks[-1].usage.model_extra
    stats = final["spec_decode_stats"]
    assert set(stats) >= {"num_drafts", "num_draft_tokens", "num_accepted_tokens",
                          "mean_acceptance_length"}
    assert stats["num_accepted_tokens"] <= stats["num_draft_tokens"]
    assert stats["mean_acceptance_length"] == pytest.approx(
        1 + stats["num_accepted_tokens"] / max(stats["num_drafts"], 1))
    timing = final["timings"][0]
    assert timing["ttft_s"] >= 0 and timing["predicted_n"] == 12


def _lower(headers: dict) -> dict:
    return {k.lower(): v for k, v in headers.items()}  # header names are case-insensitive


def test_x_request_id(fim_server):
    url = fim_server.base_url + "/v1/completions"
    body = {"model": FIM_MODEL, "prompt": "Hi", "max_tokens": 1}
    status, headers, payload = http("POST", url, body, headers={"X-Request-Id": "abc-123"})
    assert status == 200 and _lower(headers)["x-request-id"] == "abc-123"
    status, headers, payload = http("POST", url, body)
    assert loads(payload)["id"] == "cmpl-" + _lower(headers)["x-request-id"]
    status, headers, _ = http("POST", url, {**body, "stream": True})
    assert status == 200 and len(_lower(headers)["x-request-id"]) == 32
    status, headers, _ = http("POST", url, {**body, "temperature": "hot"})
    assert status == 400 and "x-request-id" in _lower(headers)


def test_tokenize_detokenize(fim_server):
    tok = fim_server.app.engine.tokenizer
    base = fim_server.base_url
    status, _, payload = http("POST", base + "/tokenize",
                              {"model": FIM_MODEL, "prompt": "Hello world",
                               "return_token_strs": True})
    body = loads(payload)
    assert status == 200 and body["tokens"] == tok.encode("Hello world")
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == 512
    assert body["token_strs"] == tok.convert_ids_to_tokens(body["tokens"])
    status, _, payload = http("POST", base + "/detokenize", {"tokens": body["tokens"]})
    assert status == 200 and loads(payload) == {"prompt": "Hello world"}
    messages = [{"role": "user", "content": "Hi"}]
    status, _, payload = http("POST", base + "/tokenize", {"messages": messages})
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert loads(payload)["tokens"] == tok.encode(text, add_special_tokens=False)
    status, _, payload = http("POST", base + "/detokenize", {"tokens": [1, 10 ** 9]})
    assert status == 400 and loads(payload)["error"]["param"] == "tokens"
    status, _, payload = http("POST", base + "/tokenize", {"prompt": 5})
    assert status == 400 and loads(payload)["error"]["param"] == "prompt"


def test_tokenize_limits_and_pool(fim_server):
    """/tokenize has the prompt limits of the generation routes, and encodes in the pool."""
    base = fim_server.base_url
    status, _, payload = http("POST", base + "/tokenize", {"prompt": "y" * 16385})
    err = loads(payload)["error"]
    assert status == 400 and err["param"] == "prompt"
    assert "16385 characters" in err["message"] and "max_prompt_chars" in err["message"]
    status, _, payload = http("POST", base + "/tokenize", {
        "messages": [{"role": "user", "content": "y" * 9000},
                     {"role": "user", "content": "z" * 8000}]})
    assert status == 400 and loads(payload)["error"]["param"] == "messages"
    tokenizer = fim_server.app.engine.tokenizer
    threads = []

    def encode(text, *args, **kwargs):
        threads.append(threading.current_thread().name)
        return type(tokenizer).encode(tokenizer, text, *args, **kwargs)

    tokenizer.encode = encode
    try:
        status, _, _ = http("POST", base + "/tokenize", {"prompt": "Hello"})
    finally:
        del tokenizer.encode
    assert status == 200 and threads
    assert all(name.startswith("specdec-tokenize") for name in threads), threads


def test_ping_and_health_live(fim_server):
    for method in ("GET", "POST"):
        status, _, payload = http(method, fim_server.base_url + "/ping")
        assert status == 200 and loads(payload) == {"status": "ok"}
    status, _, payload = http("GET", fim_server.base_url + "/health/live")
    assert status == 200 and loads(payload) == {"status": "alive"}


def test_cors(fim_server, spec_server):
    url = fim_server.base_url + "/v1/models"
    status, headers, _ = http("GET", url, headers={"Origin": ORIGIN})
    assert _lower(headers)["access-control-allow-origin"] == ORIGIN
    status, headers, _ = http("GET", url, headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in _lower(headers)
    status, headers, _ = http("OPTIONS", fim_server.base_url + "/v1/chat/completions", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    headers = _lower(headers)
    assert status == 204 and "POST" in headers["access-control-allow-methods"]
    assert headers["access-control-allow-headers"] == "authorization, content-type"
    # Off by default: no CORS headers, no preflight route.
    status, headers, _ = http("GET", spec_server.base_url + "/v1/models",
                              headers={"Origin": ORIGIN})
    assert "access-control-allow-origin" not in _lower(headers)
    status, _, _ = http("OPTIONS", spec_server.base_url + "/v1/models",
                        headers={"Origin": ORIGIN})
    assert status == 405


_ANY_METRIC = re.compile(r'^((?:specdec|vllm):[a-z_]+)(\{[^}]*\})? ([0-9.e+-]+)$')


def _metrics(server) -> dict[str, float]:
    status, _, body = http("GET", server.base_url + "/metrics")
    assert status == 200
    out = {}
    for line in body.decode().splitlines():
        m = _ANY_METRIC.match(line)
        if m:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def test_metrics_under_both_prefixes(fim_server, spec_server):
    client = fim_server.client()
    client.completions.create(model=FIM_MODEL, prompt="Hi", max_tokens=3)
    m = _metrics(fim_server)
    specdec_names = {k.split(":", 1)[1] for k in m if k.startswith("specdec:")}
    vllm_names = {k.split(":", 1)[1] for k in m if k.startswith("vllm:")}
    assert specdec_names == vllm_names
    for name in ("num_requests_waiting", "num_requests_running", "kv_cache_usage_perc",
                 "spec_decode_mean_k"):
        key = f'{name}{{model_name="{FIM_MODEL}"}}'
        assert f"specdec:{key}" in m and m[f"specdec:{key}"] == m[f"vllm:{key}"]
    ok = f'request_success_total{{finished_reason="length",model_name="{FIM_MODEL}"}}'
    assert m["specdec:" + ok] == m["vllm:" + ok] >= 1
    assert "vllm:time_to_first_token_seconds_count" in {k.split("{")[0] for k in m}
    # The default config's prefix is vllm too; specdec: names are kept.
    assert parse_metrics(http("GET", spec_server.base_url + "/metrics")[2].decode())


def test_priority_field(fim_server):
    client = fim_server.client()
    out = client.completions.create(model=FIM_MODEL, prompt="Hi", max_tokens=2,
                                    extra_body={"priority": -5})
    assert out.usage.completion_tokens >= 1
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=FIM_MODEL, prompt="Hi", max_tokens=2,
                                  extra_body={"priority": "high"})
    assert err.value.body["param"] == "priority"
