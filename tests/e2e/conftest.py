"""Live servers for the end-to-end tests: started in-process on a free localhost port.

Each server runs `server.__main__.serve` on its own event loop in a background thread (the
engine has a thread of its own inside); tests talk to it over real HTTP with the official
`openai` client or raw aiohttp.

- `spec_server`: the tiny Llama target with the tiny draft model (spec.method = "draft").
- `ngram_server`: the same target with the n-gram drafter, small admission limits
  (max_num_seqs 2 + max_queued_requests 1 = 3 choices in flight) and a 64 KiB body limit.
- `tp_spec_server` (module scope): `spec_server` at parallel.tensor_parallel_size = 2 (one
  spawned worker process; closed after the module, since a process holds one TP group).
All pin k = 3 (spec.adaptive = false): an adaptive server times the two tiny models on this
machine and may never speculate. The `drafted` fixture asserts that a test's server verified
drafts while it ran.
"""

from __future__ import annotations

import asyncio
import re
import threading

import aiohttp
import pytest

from server.protocol import dumps, loads
from specdec.core.config import from_dict

SPEC_MODEL = "tiny-spec"
NGRAM_MODEL = "tiny-ngram"


class LiveServer:
    """A server running `serve()` on its own loop thread; `stop()` drains and joins."""

    def __init__(self, config, engine=None):
        self.config = config
        self.engine = engine  # None: serve() loads one from the config
        self.port: int | None = None
        self.app = None  # server.app.OpenAIServer once ready
        self.loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.exit_code: int | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from server.__main__ import serve

        async def main():
            self.loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()

            def started(app, port):
                self.app, self.port = app, port
                self._ready.set()
            return await serve(self.config, install_signals=False, stop_event=self._stop,
                               started=started, engine=self.engine)
        try:
            self.exit_code = asyncio.run(main())
        except BaseException as exc:  # surfaced by start()
            self._error = exc
        finally:
            self._ready.set()

    def start(self) -> "LiveServer":
        self._thread.start()
        self._ready.wait(300)
        if self._error is not None or self.port is None:
            raise RuntimeError(f"server failed to start: {self._error!r}")
        return self

    def stop(self) -> None:
        if self.loop is not None and self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(60)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, **kwargs):
        import openai
        return openai.OpenAI(base_url=self.base_url + "/v1", api_key=kwargs.pop("api_key", "x"),
                             max_retries=0, timeout=120, **kwargs)


def make_config(target_dir: str, **sections):
    data = {"model": {"path": target_dir, "max_model_len": 512},
            "device": {"device": "cpu", "num_threads": 1},
            "server": {"host": "127.0.0.1", "port": 0, "log_requests": False}}
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return from_dict(data)


@pytest.fixture(scope="session")
def spec_server(tiny_llama_dir, tiny_draft_dir):
    config = make_config(tiny_llama_dir,
                         spec={"method": "draft", "draft_model": tiny_draft_dir,
                               "num_speculative_tokens": 3, "adaptive": False},
                         server={"served_model_name": SPEC_MODEL})
    server = LiveServer(config).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tp_spec_server(tiny_llama_dir, tiny_draft_dir):
    config = make_config(tiny_llama_dir,
                         spec={"method": "draft", "draft_model": tiny_draft_dir,
                               "num_speculative_tokens": 3, "adaptive": False},
                         server={"served_model_name": SPEC_MODEL},
                         parallel={"tensor_parallel_size": 2})
    server = LiveServer(config).start()
    yield server
    server.stop()
    server.app.engine.close()  # the worker process and the process group


@pytest.fixture(scope="session")
def ngram_server(tiny_llama_dir):
    config = make_config(tiny_llama_dir,
                         spec={"method": "ngram", "num_speculative_tokens": 3,
                               "adaptive": False},
                         scheduler={"max_num_seqs": 2},
                         server={"served_model_name": NGRAM_MODEL, "max_queued_requests": 1,
                                 "max_body_bytes": 65536})
    server = LiveServer(config).start()
    yield server
    server.stop()


@pytest.fixture
def drafted(request):
    """After the test: the server it used (`live`, else spec_server, else ngram_server) has
    verified more drafts than before it, so the test exercised speculation."""
    names = request.fixturenames
    if "live" in names:
        server = request.getfixturevalue("live")[0]
    elif "spec_any" in names:
        server = request.getfixturevalue("spec_any")
    else:
        server = request.getfixturevalue("spec_server" if "spec_server" in names
                                         else "ngram_server")
    before = scrape(server)["specdec:spec_decode_num_drafts_total"]
    yield
    after = scrape(server)["specdec:spec_decode_num_drafts_total"]
    assert after > before, "no drafts were verified: the test did not exercise speculation"


# ---------------------------------------------------------------------------------- raw HTTP

async def _request(method: str, url: str, body=None, raw: bytes | None = None,
                   headers: dict | None = None):
    data = raw if raw is not None else (dumps(body) if body is not None else None)
    async with aiohttp.ClientSession() as session:
        async with session.request(method, url, data=data, headers=headers or {}) as resp:
            return resp.status, dict(resp.headers), await resp.read()


def http(method: str, url: str, body=None, raw: bytes | None = None,
         headers: dict | None = None) -> tuple[int, dict, bytes]:
    """One blocking request; returns (status, headers, body bytes)."""
    return asyncio.run(_request(method, url, body, raw, headers))


def sse_events(payload: bytes) -> list:
    """Parse an SSE body into decoded JSON frames plus the literal "[DONE]"."""
    events = []
    for block in payload.decode().split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        data = block[len("data: "):]
        events.append(data if data == "[DONE]" else loads(data))
    return events


_METRIC = re.compile(r'^(specdec:[a-z_]+)(\{[^}]*\})? ([0-9.e+-]+)$')


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {"name{labels}": value} and {"name": value} for unlabelled sums."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _METRIC.match(line)
        if not m:
            continue
        name, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
        out[name + labels] = value
        out[name] = out.get(name, 0.0) + value if labels else value
    return out


def scrape(server: LiveServer) -> dict[str, float]:
    status, _, body = http("GET", server.base_url + "/metrics")
    assert status == 200
    return parse_metrics(body.decode())
