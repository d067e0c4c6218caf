"""Many streams with half the clients gone mid-stream: nothing leaks; overload gives 503."""

from __future__ import annotations

import asyncio
import os
import sys

import aiohttp

from server.protocol import loads
from tests.e2e.conftest import NGRAM_MODEL, SPEC_MODEL, LiveServer, http, scrape, sse_events

NUM_STREAMS = 200


async def _one_stream(session, url: str, i: int) -> tuple[str, list]:
    cancel = i % 2 == 0
    body = {"model": SPEC_MODEL, "prompt": f"Request {i}: the quick brown fox",
            "max_tokens": 200 if cancel else 8, "stream": True, "ignore_eos": True,
            "temperature": 0 if i % 4 < 2 else 0.8}
    async with session.post(url, json=body) as resp:
        assert resp.status == 200
        if cancel:
            first = await resp.content.readuntil(b"\n\n")
            resp.close()  # drop the connection mid-stream
            return "cancelled", sse_events(first)
        return "done", sse_events(await resp.read())


async def _wait_idle(server: LiveServer) -> dict:
    """Poll /metrics until the engine has no running or waiting request (hang guard 120 s)."""
    for _ in range(1200):
        metrics = await asyncio.to_thread(scrape, server)
        if (metrics["specdec:num_requests_running"] == 0
                and metrics["specdec:num_requests_waiting"] == 0):
            return metrics
        await asyncio.sleep(0.1)
    raise AssertionError(f"engine never went idle: {metrics}")


ABORTED = 'specdec:request_success_total{finished_reason="abort",model_name="tiny-spec"}'
LENGTH = 'specdec:request_success_total{finished_reason="length",model_name="tiny-spec"}'


def test_200_streams_half_cancelled_free_every_block(spec_server):
    """100 streams run 8 tokens; 100 ask for 200 and disconnect after their first chunk.
    The engine must abort those: every request finishes exactly once (length or abort), and
    the cancelled ones generate a handful of tokens each, not 200.
    Mutation planted to confirm: the server's disconnect path not calling the engine's abort
    (the request then runs its 200 tokens and finishes with "length")."""
    before = scrape(spec_server)

    async def run():
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            url = spec_server.base_url + "/v1/completions"
            results = await asyncio.gather(*(_one_stream(session, url, i)
                                             for i in range(NUM_STREAMS)))
        return results, await _wait_idle(spec_server)

    results, metrics = asyncio.run(run())
    done = [events for kind, events in results if kind == "done"]
    assert len(done) == NUM_STREAMS // 2
    for events in done:
        assert events[-1] == "[DONE]"
        finishes = [e["choices"][0]["finish_reason"] for e in events[:-1]
                    if e["choices"][0]["finish_reason"]]
        assert finishes == ["length"]
    assert metrics["specdec:kv_cache_usage_perc"] == 0
    assert metrics["specdec:num_blocks_free"] == metrics["specdec:num_blocks_total"]
    delta = {name: metrics[name] - before.get(name, 0.0) for name in metrics}
    aborted, length = delta[ABORTED], delta[LENGTH]
    assert delta["specdec:request_success_total"] == NUM_STREAMS  # each finished once
    assert aborted + length == NUM_STREAMS
    # A cancelled stream that still ran to 200 tokens would count as "length".
    assert aborted >= 0.9 * NUM_STREAMS // 2, (aborted, length)
    # Not aborted: 100 x 200 + 100 x 8 tokens. Aborted after the first chunk: a few steps each.
    assert delta["specdec:generation_tokens_total"] < NUM_STREAMS // 2 * (8 + 50), delta
    assert delta["specdec:spec_decode_num_drafts_total"] > 0
    # The server still serves.
    out = spec_server.client().completions.create(model=SPEC_MODEL, prompt="Hi", max_tokens=3,
                                                  extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 3


def test_overload_returns_503_with_retry_after(ngram_server):
    """Mutation planted to confirm the abort check: the bridge's "abort" op not calling
    engine.abort_request (the held stream then runs its 3 x 480 tokens)."""
    url = ngram_server.base_url + "/v1/completions"
    before = scrape(ngram_server)
    # max_num_seqs 2 + max_queued_requests 1 = 3 choices in flight; 4 never fit at once,
    # which is a 400 (never admissible), not a 503 (retry later).
    status, headers, body = http("POST", url, {"prompt": "x", "n": 4, "max_tokens": 2})
    assert status == 400 and "Retry-After" not in headers
    err = loads(body)["error"]
    assert err["param"] == "n" and "max_queued_requests" in err["message"]

    async def run():
        async with aiohttp.ClientSession() as session:
            held = await session.post(url, json={
                "model": NGRAM_MODEL, "prompt": "Hello", "n": 3, "max_tokens": 480,
                "stream": True, "ignore_eos": True, "num_speculative_tokens": 0})
            assert held.status == 200
            await held.content.readuntil(b"\n\n")
            async with session.post(url, json={"prompt": "x", "max_tokens": 2}) as extra:
                status, headers = extra.status, dict(extra.headers)
            held.close()
        return status, headers, await _wait_idle(ngram_server)

    status, headers, metrics = asyncio.run(run())
    assert status == 503 and headers["Retry-After"] == "1"
    assert metrics["specdec:kv_cache_usage_perc"] == 0
    # The held stream's 3 x 480 tokens were aborted at its disconnect, not run to the end.
    generated = (metrics["specdec:generation_tokens_total"]
                 - before["specdec:generation_tokens_total"])
    assert generated < 3 * 480 // 2, generated
    out = ngram_server.client().completions.create(model=NGRAM_MODEL, prompt="Hi", max_tokens=3,
                                                   extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 3


def test_metrics_names(spec_server):
    status, headers, body = http("GET", spec_server.base_url + "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    names = {line.split("{")[0].split(" ")[0] for line in body.decode().splitlines()
             if line.startswith("specdec:")}
    expected = {
        "num_requests_running", "num_requests_waiting", "kv_cache_usage_perc",
        "prefix_cache_queries_total", "prefix_cache_hits_total", "num_preemptions_total",
        "prompt_tokens_total", "generation_tokens_total", "request_success_total",
        "time_to_first_token_seconds_bucket", "inter_token_latency_seconds_bucket",
        "e2e_request_latency_seconds_bucket", "request_queue_time_seconds_bucket",
        "spec_decode_num_drafts_total", "spec_decode_num_draft_tokens_total",
        "spec_decode_num_accepted_tokens_total", "spec_decode_num_accepted_tokens_per_pos_total"}
    assert {f"specdec:{n}" for n in expected} <= names
    per_pos = [line for line in body.decode().splitlines()
               if line.startswith("specdec:spec_decode_num_accepted_tokens_per_pos_total")]
    assert [line.split('position="')[1].split('"')[0] for line in per_pos] == ["0", "1", "2"]
    # Start to ready, the process's own view (issue 21); bench/serve.py reports it.
    (startup,) = [float(line.rsplit(" ", 1)[1]) for line in body.decode().splitlines()
                  if line.startswith("specdec:startup_seconds{")]
    assert startup == spec_server.app.startup_s and startup > 0
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))
    from serve import scrape_startup_seconds
    assert scrape_startup_seconds(spec_server.base_url + "/metrics") == startup
