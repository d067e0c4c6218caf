"""Every error case returns its status and an OpenAI error body; the next request succeeds."""

from __future__ import annotations

import asyncio

import openai
import pytest

from server.protocol import loads
from tests.e2e.conftest import (NGRAM_MODEL, SPEC_MODEL, LiveServer, http, make_config,
                                scrape)

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MSG = [{"role": "user", "content": "Hi"}]

# (route, body, expected status, expected param, words the message must contain)
BAD_REQUESTS = [
    (COMPLETIONS, {"prompt": "x", "temperature": "hot"}, 400, "temperature", "a number"),
    (COMPLETIONS, {"prompt": "x", "top_p": 1.5}, 400, "top_p", "(0, 1]"),
    (COMPLETIONS, {"prompt": "x", "temperature": 101}, 400, "temperature", "[0, 100]"),
    (COMPLETIONS, {"prompt": "x", "n": 17}, 400, "n", "[1, 16]"),
    (COMPLETIONS, {"prompt": "x", "max_tokens": 0}, 400, "max_tokens", ">= 1"),
    (COMPLETIONS, {"prompt": "x", "max_tokens": 2.5}, 400, "max_tokens", "an integer"),
    (COMPLETIONS, {"prompt": "x", "stream": "yes"}, 400, "stream", "a boolean"),
    (COMPLETIONS, {"prompt": "x", "top_k": -2}, 400, "top_k", "-1, 0"),
    (COMPLETIONS, {"prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty",
     "(0, 2]"),
    (COMPLETIONS, {"prompt": "x", "min_tokens": 5, "max_tokens": 2}, 400, "min_tokens",
     "<= max_tokens (2)"),
    (COMPLETIONS, {"prompt": "x", "logit_bias": {"3": 500}}, 400, "logit_bias[3]",
     "[-100, 100]"),
    (COMPLETIONS, {"prompt": "x", "logit_bias": {"100000": 1}}, 400, "logit_bias",
     "vocabulary"),
    (COMPLETIONS, {"prompt": ""}, 400, "prompt", "empty"),
    (COMPLETIONS, {"prompt": []}, 400, "prompt", "non-empty"),
    (COMPLETIONS, {"prompt": [1, 2, 100000]}, 400, "prompt", "vocabulary"),
    (COMPLETIONS, {"prompt": [1, -2]}, 400, "prompt", ">= 0"),
    (COMPLETIONS, {"prompt": "x", "max_tokens": 600}, 400, "input_tokens", "max_model_len 512"),
    (COMPLETIONS, {"prompt": "x", "stream_options": {"include_usage": True}}, 400,
     "stream_options", "stream"),
    (COMPLETIONS, {"prompt": "x", "logprobs": 21}, 400, "logprobs", "[0, 20]"),
    (COMPLETIONS, {"prompt": "x", "num_speculative_tokens": -1}, 400,
     "num_speculative_tokens", ">= 0"),
    (COMPLETIONS, {"prompt": "x", "stop": 5}, 400, "stop", "string"),
    (CHAT, {"messages": MSG, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs",
     "[0, 20]"),
    (CHAT, {"messages": MSG, "top_logprobs": 2}, 400, "top_logprobs", "requires logprobs"),
    (CHAT, {"messages": []}, 400, "messages", "non-empty"),
    (CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role",
     "one of"),
    (CHAT, {"messages": MSG, "max_completion_tokens": 0}, 400, "max_completion_tokens", ">= 1"),
    (CHAT, {"messages": MSG, "tools": [{"type": "function"}]}, 400, "tools[0].function",
     "must be an object"),
    (COMPLETIONS, {"prompt": "x", "tools": [{"type": "function"}]}, 400, "tools",
     "only supported on /v1/chat/completions"),
    (CHAT, {"messages": MSG, "model": "gpt-4o"}, 404, "model", "does not exist"),
]


def _check_error(status, body: bytes, want_status: int, param, words: str | None):
    assert status == want_status, body
    err = loads(body)
    assert set(err) == {"error"}
    assert set(err["error"]) == {"message", "type", "param", "code"}
    assert err["error"]["param"] == param
    if words:
        assert words in err["error"]["message"]
    assert "Traceback" not in err["error"]["message"]
    return err["error"]


def _ok(server: LiveServer, model: str) -> None:
    out = server.client().completions.create(model=model, prompt="Hello", max_tokens=4,
                                             extra_body={"ignore_eos": True})
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 4


@pytest.mark.parametrize("route,body,status,param,words", BAD_REQUESTS)
def test_bad_request_then_next_succeeds(spec_server, route, body, status, param, words):
    got, _, payload = http("POST", spec_server.base_url + route, body)
    _check_error(got, payload, status, param, words)
    _ok(spec_server, SPEC_MODEL)


def test_invalid_json_and_non_object(spec_server):
    status, _, body = http("POST", spec_server.base_url + COMPLETIONS, raw=b"{bad json")
    err = _check_error(status, body, 400, None, "not valid JSON")
    assert err["type"] == "invalid_request_error"
    status, _, body = http("POST", spec_server.base_url + COMPLETIONS, raw=b"[1, 2]")
    _check_error(status, body, 400, None, "JSON object")
    _ok(spec_server, SPEC_MODEL)


def test_unknown_route_wrong_method_and_body_too_large(ngram_server):
    status, _, body = http("GET", ngram_server.base_url + "/v1/nothing")
    _check_error(status, body, 404, None, "/v1/nothing")
    status, _, body = http("GET", ngram_server.base_url + CHAT)
    _check_error(status, body, 405, None, "GET")
    big = {"prompt": "x" * 70000, "max_tokens": 1}
    status, _, body = http("POST", ngram_server.base_url + COMPLETIONS, big)
    _check_error(status, body, 413, None, "65536")
    _ok(ngram_server, NGRAM_MODEL)


def test_openai_client_sees_typed_errors(spec_server):
    client = spec_server.client()
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=SPEC_MODEL, prompt="x", max_tokens=600)
    assert info.value.status_code == 400 and info.value.body["param"] == "input_tokens"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=MSG)


def test_api_key(spec_server):
    spec_server.app.api_key = "sekrit"
    try:
        status, _, body = http("POST", spec_server.base_url + COMPLETIONS, {"prompt": "x"})
        err = _check_error(status, body, 401, None, "API key")
        assert err["type"] == "authentication_error"
        status, _, body = http("POST", spec_server.base_url + COMPLETIONS, {"prompt": "x"},
                               headers={"Authorization": "Bearer wrong"})
        _check_error(status, body, 401, None, "API key")
        with pytest.raises(openai.AuthenticationError):
            spec_server.client(api_key="wrong").models.list()
        out = spec_server.client(api_key="sekrit").completions.create(
            model=SPEC_MODEL, prompt="Hello", max_tokens=2)
        assert len(out.choices) == 1
        assert http("GET", spec_server.base_url + "/health")[0] == 200  # not behind the key
    finally:
        spec_server.app.api_key = None
    _ok(spec_server, SPEC_MODEL)


def test_no_blocks_leak_after_errors(spec_server):
    _ok(spec_server, SPEC_MODEL)
    metrics = scrape(spec_server)
    assert metrics["specdec:num_requests_running"] == 0
    assert metrics["specdec:num_requests_waiting"] == 0
    assert metrics["specdec:kv_cache_usage_perc"] == 0
    assert metrics["specdec:num_blocks_free"] == metrics["specdec:num_blocks_total"]


def test_health_and_routes_503_while_loading():
    from aiohttp.test_utils import TestClient, TestServer

    from server.app import OpenAIServer

    async def run():
        app = OpenAIServer(make_config("/nonexistent/model"))  # never attached: loading
        async with TestClient(TestServer(app.app)) as client:
            health = await client.get("/health")
            chat = await client.post(CHAT, json={"messages": MSG})
            return (health.status, await health.json(), chat.status,
                    chat.headers.get("Retry-After"), await chat.json())

    health_status, health_body, status, retry_after, body = asyncio.run(run())
    assert (health_status, health_body) == (503, {"status": "loading"})
    assert status == 503 and retry_after == "5"
    assert body["error"]["message"] == "the model is still loading"
