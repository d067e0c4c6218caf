"""Faults, walk-aways and oversized requests: no client, hostile or unlucky, hurts another.

- An engine fault fails every in-flight request (500 with a request id, or an error frame then
  [DONE]), is logged with the request ids and traceback, and the server exits 1.
- A non-streaming client that disconnects is aborted (its KV freed), not run to max_tokens.
- Per-request limits give a 400 naming the parameter, the value and the limit.
- Tokenization runs in a thread pool: a stream keeps flowing while another prompt tokenizes.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time

import aiohttp
import pytest

from server.protocol import dumps, loads
from tests.e2e.conftest import LiveServer, http, make_config, scrape, sse_events

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
GUARD_S = 120  # hang guards, never timing assertions


def _wait_for(predicate, what: str, guard: float = GUARD_S) -> None:
    deadline = time.monotonic() + guard
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.01)


def _generic_500(err: dict, request_id: str) -> None:
    assert err["type"] == "server_error"
    assert request_id in err["message"] and "internal server error" in err["message"]
    assert "simulated" not in err["message"] and "Traceback" not in err["message"]


def _slow_steps(engine, delay: float):
    """Make every engine step take at least `delay` s; returns the undo function."""
    real_step = engine.step

    def slow_step():
        time.sleep(delay)
        return real_step()
    engine.step = slow_step
    return lambda: setattr(engine, "step", real_step)


# ---------------------------------------------------------------------------------- §2 faults

def test_engine_fault_fails_every_request_then_serve_exits_1(tiny_llama_dir):
    server = LiveServer(make_config(tiny_llama_dir, spec={"method": "none"})).start()
    try:
        engine = server.app.engine
        url = server.base_url + COMPLETIONS
        long = {"prompt": "Hello", "max_tokens": 400, "ignore_eos": True}

        def broken_step():
            raise RuntimeError("simulated device fault")

        async def run():
            async with aiohttp.ClientSession() as session:
                stream = await session.post(url, json={**long, "stream": True})
                assert stream.status == 200
                payload = await stream.content.readuntil(b"\n\n")
                plain = asyncio.ensure_future(session.post(url, json=long))
                while server.app.bridge.num_in_flight < 2:
                    await asyncio.sleep(0.01)
                engine.step = broken_step
                payload += await stream.read()
                resp = await plain
                return sse_events(payload), resp.status, dict(resp.headers), await resp.read()

        events, status, headers, body = asyncio.run(run())
        assert events[-1] == "[DONE]"
        stream_id = events[0]["id"].removeprefix("cmpl-")
        _generic_500(events[-2]["error"], stream_id)
        assert status == 500, (headers, body)
        _generic_500(loads(body)["error"], headers["X-Request-ID"])
        server._thread.join(GUARD_S)  # serve() returns on its own: no zombie
        assert not server._thread.is_alive()
        assert server.exit_code == 1
    finally:
        if server._thread.is_alive():
            server.stop()


def test_a_fault_racing_a_wakeup_still_reaches_the_waiter():
    """The engine thread fails a collector after the handler woke for a delta but before it
    took it: the failure was signalled by that same wake-up, so take() must raise it (CI hung
    on this interleaving once: the stream waited until the shutdown timeout cut it)."""
    from types import SimpleNamespace

    from server.bridge import EngineDeadError, OutputCollector

    async def run():
        collector = OutputCollector(asyncio.get_running_loop(), ["r-0"])
        completion = SimpleNamespace(token_ids_delta=[5], text_delta="x", logprobs_delta=None,
                                     finish_reason=None, stop_reason=None)
        collector.put(SimpleNamespace(request_id="r-0", outputs=[completion],
                                      prompt_token_ids=[1, 2], finished=False))
        assert await collector.wait(GUARD_S)
        collector.fail(EngineDeadError("engine failed: simulated"))  # the racing engine thread
        with pytest.raises(EngineDeadError):
            collector.take()

    asyncio.run(run())


def test_engine_fault_while_draining_still_exits_1(tiny_llama_dir):
    server = LiveServer(make_config(tiny_llama_dir, spec={"method": "none"})).start()
    try:
        engine = server.app.engine

        def broken_step():
            raise RuntimeError("simulated device fault")

        async def run():
            async with aiohttp.ClientSession() as session:
                stream = await session.post(server.base_url + COMPLETIONS, json={
                    "prompt": "Hello", "max_tokens": 400, "ignore_eos": True, "stream": True})
                payload = await stream.content.readuntil(b"\n\n")
                server.loop.call_soon_threadsafe(server._stop.set)  # SIGTERM: drain
                while not server.app.draining:
                    await asyncio.sleep(0.01)
                engine.step = broken_step
                return sse_events(payload + await stream.read())

        events = asyncio.run(run())
        assert events[-1] == "[DONE]" and "error" in events[-2]
        server._thread.join(GUARD_S)
        assert not server._thread.is_alive() and server.exit_code == 1
    finally:
        if server._thread.is_alive():
            server.stop()


_FAULTY_SERVER = textwrap.dedent("""
    import sys
    from specdec.engine import Engine

    def step(self):
        raise RuntimeError("simulated device fault")
    Engine.step = step
    from server.__main__ import main
    sys.exit(main(sys.argv[1:]))
""")


def test_engine_fault_exits_the_process_nonzero_with_logged_ids(tmp_path, tiny_llama_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-c", _FAULTY_SERVER, "--model.path", tiny_llama_dir,
             "--model.max_model_len", "512", "--device.device", "cpu",
             "--device.num_threads", "1", "--port", str(port)],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log_file)
        try:
            def ready():
                assert proc.poll() is None, log_path.read_text()
                try:
                    return http("GET", url + "/health")[0] == 200
                except OSError:
                    return False
            _wait_for(ready, "server ready")
            status, headers, body = http("POST", url + COMPLETIONS, {"prompt": "Hi"})
            assert proc.wait(timeout=GUARD_S) == 1
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert status == 500
    request_id = headers["X-Request-ID"]
    _generic_500(loads(body)["error"], request_id)
    lines = log_path.read_text().splitlines()
    log = [loads(line) for line in lines if line.startswith("{")]
    # the engine's stdlib records are JSON lines too, and not also printed as plain text
    assert not [line for line in lines if "max_model_len =" in line and line[0] != "{"]
    engine_lines = [entry for entry in log if entry.get("logger") == "specdec.engine"]
    assert any(entry["event"].startswith("max_model_len = 512") for entry in engine_lines)
    dead = next(entry for entry in log if entry["event"] == "engine_dead")
    assert dead["request_ids"] == [f"{request_id}-0"]
    assert "simulated device fault" in dead["traceback"]
    assert "Traceback" in dead["traceback"]
    assert log[-1]["event"] == "exiting" and log[-1]["exit_code"] == 1


def test_stdlib_records_become_json_lines_while_serve_runs():
    import io
    import logging

    import structlog

    from server.app import attach_stdlib_logs

    before = list(logging.getLogger("specdec").handlers)  # a module's live server's, if any
    out = io.StringIO()
    log = structlog.wrap_logger(structlog.PrintLogger(out), processors=[
        structlog.processors.add_log_level, structlog.processors.JSONRenderer()])
    detach = attach_stdlib_logs(log)
    try:
        logging.getLogger("specdec.engine").info("calibration: %s", "cached")
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("specdec.server").exception("stream error %s", "r-1")
    finally:
        detach()
    logging.getLogger("specdec.engine").warning("after detach")  # not ours any more
    info, error = [loads(line) for line in out.getvalue().splitlines()]
    assert info == {"event": "calibration: cached", "logger": "specdec.engine",
                    "level": "info"}
    assert error["event"] == "stream error r-1" and error["level"] == "error"
    assert "ValueError: boom" in error["traceback"]
    assert logging.getLogger("specdec").handlers == before


def test_health_live_is_200_unless_the_engine_died():
    from aiohttp.test_utils import TestClient, TestServer

    from server.app import OpenAIServer

    async def run():
        app = OpenAIServer(make_config("/nonexistent/model"))  # never attached: loading
        async with TestClient(TestServer(app.app)) as client:
            seen = []
            for state in ("loading", "draining", "dead"):
                if state == "draining":
                    app.draining = True
                if state == "dead":
                    app.dead.set()
                resp = await client.get("/health/live")
                seen.append((state, resp.status, (await resp.json())["status"]))
            return seen

    assert asyncio.run(run()) == [("loading", 200, "alive"), ("draining", 200, "alive"),
                                  ("dead", 503, "engine_dead")]


def test_health_live_200_while_serving(spec_server):
    status, _, body = http("GET", spec_server.base_url + "/health/live")
    assert (status, loads(body)) == (200, {"status": "alive"})


def test_unhandled_error_is_a_generic_500_with_request_id(spec_server):
    app = spec_server.app

    async def broken_read(request):
        raise RuntimeError("secret detail /home/user/weights")
    app._read_json = broken_read
    try:
        status, headers, body = http("POST", spec_server.base_url + COMPLETIONS,
                                     {"prompt": "x"})
    finally:
        del app._read_json
    assert status == 500
    err = loads(body)["error"]
    assert headers["X-Request-ID"] in err["message"] and "secret" not in err["message"]


class _MetricsFailingOnce:
    """Delegates to the real ServerMetrics; the first observe_itl raises."""

    def __init__(self, real):
        self.real, self.failed = real, False

    def observe_itl(self, latencies):
        if not self.failed:
            self.failed = True
            raise RuntimeError("simulated bug while streaming")
        return self.real.observe_itl(latencies)

    def __getattr__(self, name):
        return getattr(self.real, name)


def test_error_after_stream_started_is_an_error_frame_then_done(spec_server):
    app = spec_server.app
    real = app.metrics
    app.metrics = _MetricsFailingOnce(real)
    try:
        status, _, payload = http("POST", spec_server.base_url + CHAT, {
            "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 30,
            "ignore_eos": True, "stream": True})
    finally:
        app.metrics = real
    assert status == 200 and app.metrics is real
    events = sse_events(payload)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[-1] == "[DONE]"
    _generic_500(events[-2]["error"], events[0]["id"].removeprefix("chatcmpl-"))
    metrics = scrape(spec_server)
    assert metrics["specdec:num_requests_running"] == 0
    assert metrics["specdec:num_blocks_free"] == metrics["specdec:num_blocks_total"]


def test_api_key_uses_constant_time_compare(spec_server, monkeypatch):
    import hmac

    import server.app as app_module
    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(app_module.hmac, "compare_digest",
                        lambda a, b: calls.append((a, b)) or real(a, b))
    spec_server.app.api_key = "sekrit"
    try:
        assert http("GET", spec_server.base_url + "/v1/models",
                    headers={"Authorization": "Bearer sekrit"})[0] == 200
        assert http("GET", spec_server.base_url + "/v1/models",
                    headers={"Authorization": "Bearer nope"})[0] == 401
    finally:
        spec_server.app.api_key = None
    assert calls == [(b"Bearer sekrit", b"Bearer sekrit"), (b"Bearer nope", b"Bearer sekrit")]


# ---------------------------------------------------------------------------------- §3 walk-away

def _abort_count(server) -> float:
    name = server.app.model_name
    return scrape(server)[f'specdec:request_success_total{{finished_reason="abort",'
                          f'model_name="{name}"}}']


def test_nonstream_client_that_disconnects_is_aborted(spec_server):
    engine = spec_server.app.engine
    name = spec_server.app.model_name
    before = scrape(spec_server)
    undo = _slow_steps(engine, 0.03)  # 400 tokens take >= 3 s: the walk-away comes first
    try:
        body = dumps({"prompt": "Hello", "max_tokens": 400, "ignore_eos": True})
        sock = socket.create_connection(("127.0.0.1", spec_server.port))
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                     % len(body) + body)
        _wait_for(engine.has_unfinished_requests, "the request is running")
        sock.close()
        _wait_for(lambda: _abort_count(spec_server) > before[
            f'specdec:request_success_total{{finished_reason="abort",model_name="{name}"}}'],
            "the request is aborted")
    finally:
        undo()
    after = scrape(spec_server)
    label = f'{{finished_reason="length",model_name="{name}"}}'
    assert after["specdec:request_success_total" + label] == \
        before["specdec:request_success_total" + label]
    assert after["specdec:generation_tokens_total"] - \
        before["specdec:generation_tokens_total"] < 400
    assert after["specdec:num_requests_running"] == 0
    assert after["specdec:num_requests_waiting"] == 0
    assert after["specdec:num_blocks_free"] == after["specdec:num_blocks_total"]


# ---------------------------------------------------------------------------------- §4 limits

LIMITS = [  # (route, body, param, words the message must contain)
    (COMPLETIONS, {"prompt": "x", "stop": [f"s{i}" for i in range(17)]}, "stop",
     ["17 strings", "16", "max_stop_strings"]),
    (COMPLETIONS, {"prompt": "x", "stop": ["a", "b" * 1025]}, "stop",
     ["stop[1]", "1025 characters", "1024", "max_stop_string_chars"]),
    (COMPLETIONS, {"prompt": "x", "logit_bias": {str(i): 1 for i in range(1025)}},
     "logit_bias", ["1025 entries", "1024", "max_logit_bias_entries"]),
    (COMPLETIONS, {"prompt": "x", "stop_token_ids": [1] * 1025}, "stop_token_ids",
     ["1025 entries", "1024", "max_stop_token_ids"]),
    (COMPLETIONS, {"prompt": "y" * 16385}, "prompt",
     ["16385 characters", "16384", "max_prompt_chars"]),
    (COMPLETIONS, {"prompt": ["ok", "y" * 16385]}, "prompt",
     ["prompt[1]", "16385 characters", "16384"]),
    (CHAT, {"messages": [{"role": "user", "content": "y" * 9000},
                         {"role": "user", "content": [{"type": "text", "text": "z" * 8000}]}]},
     "messages", ["17000 characters", "16384", "max_prompt_chars"]),
    (COMPLETIONS, {"prompt": ["p"] * 9, "n": 16}, "n",
     ["16 x 9 = 144", "128", "max_choices_per_request"]),
]


@pytest.mark.parametrize("route,body,param,words", LIMITS)
def test_request_past_a_limit_is_a_400(spec_server, route, body, param, words):
    status, _, payload = http("POST", spec_server.base_url + route,
                              {**body, "max_tokens": 2})
    assert status == 400, payload
    err = loads(payload)["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error"
    for word in words:
        assert word in err["message"], err["message"]


def test_request_that_can_never_be_admitted_is_a_400(ngram_server):
    # max_num_seqs 2 + max_queued_requests 1: four choices can never be in flight together.
    status, headers, payload = http("POST", ngram_server.base_url + COMPLETIONS,
                                    {"prompt": "x", "n": 4, "max_tokens": 2})
    assert status == 400 and "Retry-After" not in headers
    err = loads(payload)["error"]
    assert err["param"] == "n"
    assert "can never be admitted" in err["message"] and "at most 3" in err["message"]


@pytest.mark.parametrize("route", [CHAT, COMPLETIONS])
def test_tokenization_runs_off_the_loop_and_engine_thread(spec_server, route):
    """While one prompt tokenizes, another stream keeps receiving frames.

    The wrapped encode blocks until the running stream has received three more frames. On the
    event loop or the engine thread that can never happen, and the guard fails the test.
    """
    tokenizer = spec_server.app.engine.tokenizer
    marker = "MARKER-tokenize-me"
    frames = [0]
    progressed = []
    threads = []

    def encode(text, *args, **kwargs):
        if marker in text:
            threads.append(threading.current_thread().name)
            start = frames[0]
            deadline = time.monotonic() + 60
            while frames[0] < start + 3 and time.monotonic() < deadline:
                time.sleep(0.005)
            progressed.append(frames[0] - start)
        return type(tokenizer).encode(tokenizer, text, *args, **kwargs)

    big = ({"messages": [{"role": "user", "content": marker}]} if route == CHAT
           else {"prompt": marker})
    undo = _slow_steps(spec_server.app.engine, 0.01)
    tokenizer.encode = encode
    try:
        async def run():
            async with aiohttp.ClientSession() as session:
                stream = await session.post(spec_server.base_url + COMPLETIONS, json={
                    "prompt": "Hello", "max_tokens": 400, "ignore_eos": True, "stream": True})
                await stream.content.readuntil(b"\n\n")

                async def count():
                    async for _ in stream.content:
                        frames[0] += 1
                counter = asyncio.ensure_future(count())
                resp = await session.post(spec_server.base_url + route,
                                          json={**big, "max_tokens": 2})
                status = resp.status
                stream.close()
                counter.cancel()
                return status
        status = asyncio.run(run())
    finally:
        del tokenizer.encode
        undo()
    assert status == 200
    assert threads and all(name.startswith("specdec-tokenize") for name in threads)
    assert progressed and progressed[0] >= 3
    _wait_for(lambda: not spec_server.app.engine.has_unfinished_requests(), "all aborted")


def test_deeply_nested_json_is_a_400(spec_server):
    status, _, payload = http("POST", spec_server.base_url + COMPLETIONS,
                              raw=b'{"prompt": ' + b"[" * 100000 + b"]" * 100000 + b"}")
    assert status == 400, payload
    assert "not valid JSON" in loads(payload)["error"]["message"]
