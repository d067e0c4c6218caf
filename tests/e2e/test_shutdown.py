"""`python -m server` as a subprocess: start-up log, SIGTERM drains in-flight requests, exit 0."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time

import aiohttp

from server.protocol import loads
from tests.e2e.conftest import http, sse_events

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(proc: subprocess.Popen, url: str, log_path) -> None:
    deadline = time.monotonic() + 180  # a hang guard, not a timing assertion
    while time.monotonic() < deadline:
        assert proc.poll() is None, log_path.read_text()
        try:
            if http("GET", url + "/health")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError("server never became ready")


def test_sigterm_drains_in_flight_and_exits_zero(tmp_path, tiny_llama_dir):
    config = tmp_path / "server.toml"
    config.write_text(f'[model]\npath = "{tiny_llama_dir}"\nmax_model_len = 512\n'
                      f'[spec]\nmethod = "none"\n[device]\ndevice = "cpu"\nnum_threads = 1\n'
                      f'[server]\nserved_model_name = "tiny"\n')
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "server.log"
    log_file = open(log_path, "wb")  # a file, not a pipe: a full pipe would stall the server
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", "--config", str(config), "--port", str(port),
         "--shutdown-timeout", "120", "--scheduler.max_num_seqs", "8"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log_file)
    try:
        _wait_ready(proc, url, log_path)

        async def run():
            async with aiohttp.ClientSession() as session:
                async with session.post(url + "/v1/completions", json={
                        "prompt": "Hello", "n": 2, "max_tokens": 400, "stream": True,
                        "ignore_eos": True, "logprobs": 5,
                        "stream_options": {"include_usage": True}}) as resp:
                    assert resp.status == 200
                    payload = await resp.content.readuntil(b"\n\n")
                    proc.send_signal(signal.SIGTERM)
                    refused = None
                    for _ in range(100):  # until the signal is handled
                        async with session.post(url + "/v1/completions",
                                                json={"prompt": "x"}) as extra:
                            if extra.status == 503:
                                refused = (dict(extra.headers), await extra.read())
                                break
                        await asyncio.sleep(0.01)
                    async with session.get(url + "/health") as health:
                        health_while_draining = (health.status, await health.json())
                    payload += await resp.read()
            return refused, health_while_draining, sse_events(payload)

        refused, health_while_draining, events = asyncio.run(run())
        assert health_while_draining == (503, {"status": "draining"})
        assert refused is not None, "no 503 while draining"
        headers, body = refused
        assert headers["Retry-After"] == "1"
        assert "shutting down" in loads(body)["error"]["message"]
        # The in-flight request finished normally: every choice ran to its length limit.
        assert events[-1] == "[DONE]"
        assert events[-2]["usage"]["completion_tokens"] == 2 * 400
        finishes = sorted((e["choices"][0]["index"], e["choices"][0]["finish_reason"])
                          for e in events[:-2] if e["choices"][0]["finish_reason"])
        assert finishes == [(0, "length"), (1, "length")]
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log_file.close()
    log = [loads(line) for line in log_path.read_text().splitlines()
           if line.startswith("{")]
    events_logged = [entry["event"] for entry in log if "logger" not in entry]  # the server's
    assert events_logged[:2] == ["listening", "ready"]
    ready = next(entry for entry in log if entry["event"] == "ready")
    assert ready["url"] == url and ready["kv_blocks"] > 0
    assert ready["cuda_kernels"] is False and ready["cuda_graphs"] is False
    request_line = next(entry for entry in log
                        if entry["event"] == "request" and entry["n"] == 2)
    assert request_line["completion_tokens"] == 2 * 400
    assert request_line["finish_reason"] == ["length"] * 2
    assert {"request_id", "prompt_tokens", "ttft_s", "tpot_s",
            "acceptance_length"} <= set(request_line)
    assert events_logged[-1] == "stopped"
    assert events_logged.count("draining") == 1


def test_cli_flags_override_config_and_env_api_key(tmp_path, monkeypatch):
    from server.__main__ import build_config

    config = tmp_path / "c.toml"
    config.write_text('[model]\npath = "m"\n[server]\nport = 9000\n')
    monkeypatch.setenv("SPECDEC_API_KEY", "from-env")
    cfg = build_config(["--config", str(config), "--port", "8123", "--max-queued-requests",
                        "7", "--shutdown-timeout", "2.5", "--spec.method", "ngram"])
    assert (cfg.server.port, cfg.server.max_queued_requests, cfg.server.shutdown_timeout,
            cfg.server.api_key, cfg.server.host, cfg.spec.method) == \
        (8123, 7, 2.5, "from-env", "127.0.0.1", "ngram")
    assert build_config(["--config", str(config), "--api-key", "flag"]).server.api_key == "flag"
