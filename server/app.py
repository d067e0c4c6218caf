"""aiohttp application: OpenAI routes, SSE framing, /health, /metrics, admission and draining.

Handlers never touch the engine: they validate (protocol), admit through the bridge, then read
their collector until every choice has finished. A streaming handler writes each merged delta as
one `data: {json}` frame per choice, so several verified tokens may share a frame.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import logging
import sys
import time
import uuid

import structlog
from aiohttp import web

import specdec
from server import fim, limits, openapi, parity, protocol
from server.bridge import AsyncEngine, EngineDeadError
from server.metrics import CONTENT_TYPE, ServerMetrics
from server.protocol import APIError, GenerationRequest, dumps
from server.responses import LogprobFormatter, ResponseState, frame
from server.lora import add_lora_routes, lora_model_cards, served_lora
from server.ui import add_ui_routes

DISCONNECT_POLL_S = 0.5
RETRY_AFTER_S = "1"


def make_logger():
    """The server's JSON-lines logger on stderr (structlog, no global configure)."""
    return structlog.wrap_logger(
        structlog.PrintLogger(sys.stderr),
        processors=[structlog.processors.add_log_level,
                    structlog.processors.TimeStamper(fmt="iso", utc=True),
                    structlog.processors.JSONRenderer(
                        serializer=lambda obj, **kw: dumps(obj).decode())])


class JSONLinesHandler(logging.Handler):
    """Stdlib records of the `specdec` loggers (the engine's start-up facts, warnings, errors
    with tracebacks) as JSON lines of the server's log: one format for a log shipper to parse.
    serve() attaches it for its own lifetime (attach_stdlib_logs)."""

    def __init__(self, log, level: int = logging.INFO):
        super().__init__(level)
        self.log = log

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields = {"logger": record.name}
            if record.exc_info:
                fields["traceback"] = logging.Formatter().formatException(record.exc_info)
            level = {"DEBUG": "debug", "INFO": "info", "WARNING": "warning"}.get(
                record.levelname, "error")
            getattr(self.log, level)(record.getMessage(), **fields)
        except Exception:  # noqa: BLE001 - logging must never raise into the caller
            self.handleError(record)


def attach_stdlib_logs(log):
    """Route the `specdec` stdlib loggers into `log`; returns the function that undoes it."""
    logger = logging.getLogger("specdec")
    handler = JSONLinesHandler(log)
    old_level, old_propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # not a second, plain-text copy through the root logger

    def detach():
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        logger.propagate = old_propagate
    return detach


def json_response(body, status: int = 200, headers: dict | None = None) -> web.Response:
    return web.Response(body=dumps(body), status=status, headers=headers,
                        content_type="application/json")


def error_response(err: APIError) -> web.Response:
    return json_response(err.body(), status=err.status, headers=err.headers)


def internal_error(request_id: str) -> APIError:
    """A 500 with a generic message and the request id; the detail goes to the log only."""
    return APIError(500, f"internal server error (request id {request_id})",
                    code="internal_error", headers={"X-Request-ID": request_id})


class OpenAIServer:
    """Owns the aiohttp app; `attach(engine)` makes it ready (the engine may load after bind)."""

    def __init__(self, config, logger=None):
        self.config = config
        self.log = logger or make_logger()
        self.api_key = config.server.api_key
        self.engine = None
        self.bridge: AsyncEngine | None = None
        self.metrics: ServerMetrics | None = None
        self.model_name: str | None = None
        self.model_names: list[str] = []  # the served name first, then the aliases
        self.fim_template: fim.FimTemplate | None = None
        self.cors_origins = parity.parse_origins(config.server.cors_origins)
        self.created = int(time.time())
        self.draining = False
        self.num_active = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.limits: limits.RequestLimits | None = None  # set by attach (needs max_model_len)
        self.dead = asyncio.Event()  # set when the engine thread died: serve() exits 1
        self._loop: asyncio.AbstractEventLoop | None = None
        # Tokenization and chat templating run here: never on the loop or the engine thread.
        self.tokenize_pool = concurrent.futures.ThreadPoolExecutor(
            2, thread_name_prefix="specdec-tokenize")
        self.app = web.Application(client_max_size=config.server.max_body_bytes,
                                   middlewares=[self._middleware])
        self.app.add_routes([
            web.post("/v1/chat/completions", self.chat_completions),
            web.post("/v1/completions", self.completions),
            web.get("/v1/models", self.models),
            web.get("/health", self.health),
            web.get("/health/live", self.health_live),
            web.get("/openapi.json", self.openapi),
            web.get("/metrics", self.prometheus),
            web.get("/version", self.version),
        ])
        add_lora_routes(self)
        if config.server.ui:
            add_ui_routes(self.app, api_key_required=bool(self.api_key))
        parity.register(self)  # /tokenize /detokenize /ping /infill, CORS

    # ------------------------------------------------------------------ lifecycle
    def attach(self, engine, thread=None) -> None:
        """Start the engine's step loop on `thread` (bridge.EngineThread: the one that loaded
        it; None: a new thread); called on the event loop once the engine has loaded."""
        self.engine = engine
        self.model_name = engine.model_name
        self.model_names = parity.model_names(engine.model_name,
                                              self.config.server.served_model_aliases)
        self.fim_template = fim.detect_fim(engine.tokenizer, self.config.model.fim_style)
        self.metrics = ServerMetrics(self.model_name, self.config.server.metrics_prefix)
        self.startup_s = seconds_since_process_start()
        _startup_gauge(self.metrics, self.model_name, self.startup_s)
        capacity = self.config.scheduler.max_num_seqs + self.config.server.max_queued_requests
        self.limits = limits.RequestLimits.from_config(self.config, engine.max_model_len)
        self._loop = asyncio.get_running_loop()
        self.bridge = AsyncEngine(engine, max_in_flight=capacity, on_death=self._engine_died,
                                  on_idle_work_done=self._startup_work_done)
        self.bridge.start(thread)

    def _startup_work_done(self) -> None:
        """Engine thread: the deferred start-up work is done (a background calibration)."""
        startup = getattr(self.engine, "startup", {})
        self.log.info("startup_work_done", calibration=startup.get("calibration"),
                      calibration_s=startup.get("calibration_s"))

    def _engine_died(self, exc: BaseException, request_ids: list[str], text: str) -> None:
        """Engine thread, before the waiters are failed: mark dead (serve() exits 1), log."""
        try:
            self._loop.call_soon_threadsafe(self.dead.set)
        except RuntimeError:  # the loop is already closed
            pass
        self.log.error("engine_dead", error=f"{type(exc).__name__}: {exc}",
                       request_ids=request_ids, traceback=text)

    async def drain(self, timeout: float) -> None:
        """Refuse new requests (503), wait up to `timeout` for in-flight ones, abort the rest."""
        self.draining = True
        self.log.info("draining", in_flight=self.num_active, timeout_s=timeout)
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            self.log.warning("shutdown_timeout", aborting=self.num_active)
            if self.bridge is not None:
                self.bridge.abort_all()
            try:
                await asyncio.wait_for(self._idle.wait(), 10.0)
            except asyncio.TimeoutError:
                pass

    def close(self) -> None:
        if self.bridge is not None:
            self.bridge.stop()
        self.tokenize_pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ middleware
    @web.middleware
    async def _middleware(self, request: web.Request, handler):
        request[parity.REQUEST_ID] = parity.request_id(request)
        try:
            if (self.api_key and request.path.startswith("/v1/")
                    and request.method != "OPTIONS"):  # a CORS preflight carries no key
                auth = request.headers.get("Authorization", "").encode()
                if not hmac.compare_digest(auth, f"Bearer {self.api_key}".encode()):
                    raise APIError(401, "invalid or missing API key (Authorization: Bearer ...)",
                                   code="invalid_api_key")
            return await handler(request)
        except APIError as err:
            return error_response(err)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            message = {404: f"route {request.method} {request.path} not found",
                       405: f"method {request.method} not allowed on {request.path}",
                       413: f"request body too large (limit "
                            f"{self.config.server.max_body_bytes} bytes)"}.get(exc.status,
                                                                             exc.reason)
            return error_response(APIError(exc.status, message))
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception as exc:  # never a traceback (or any detail) in a body
            request_id = request.get(parity.REQUEST_ID) or uuid.uuid4().hex
            self.log.error("unhandled_error", path=request.path, request_id=request_id,
                           error=f"{type(exc).__name__}: {exc}")
            logging.getLogger("specdec.server").exception("unhandled error %s", request_id)
            return error_response(internal_error(request_id))

    # ------------------------------------------------------------------ simple routes
    async def health(self, request: web.Request) -> web.Response:
        if self.bridge is None:
            return json_response({"status": "loading"}, status=503)
        if not self.bridge.alive:
            return json_response({"status": "engine_dead"}, status=503)
        if self.draining:
            return json_response({"status": "draining"}, status=503)
        return json_response({"status": "ok"})

    async def health_live(self, request: web.Request) -> web.Response:
        """Liveness: 200 while loading, serving or draining; 503 only once the engine died."""
        if self.dead.is_set() or (self.bridge is not None and self.bridge.error is not None):
            return json_response({"status": "engine_dead"}, status=503)
        return json_response({"status": "alive"})

    async def openapi(self, request: web.Request) -> web.Response:
        return json_response(openapi.document(specdec.__version__))

    async def version(self, request: web.Request) -> web.Response:
        return json_response({"version": specdec.__version__})

    async def models(self, request: web.Request) -> web.Response:
        self._require_ready()
        return json_response({"object": "list", "data": [{
            "id": name, "object": "model", "created": self.created,
            "owned_by": "specdec", "root": self.model_name, "parent": None,
            "max_model_len": self.engine.max_model_len} for name in self.model_names]
            + lora_model_cards(self)})

    async def prometheus(self, request: web.Request) -> web.Response:
        self._require_ready()
        stats = await self.bridge.stats()
        return web.Response(body=self.metrics.render(stats),
                            headers={"Content-Type": CONTENT_TYPE})

    def _check_admitting(self) -> None:
        if self.draining:
            raise APIError(503, "the server is shutting down",
                           headers={"Retry-After": RETRY_AFTER_S})
        self._require_ready()

    def _require_ready(self) -> None:
        if self.bridge is None:
            raise APIError(503, "the model is still loading", headers={"Retry-After": "5"})

    # ------------------------------------------------------------------ generation
    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "chat")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "completion")

    async def _read_json(self, request: web.Request) -> dict:
        raw = await request.read()  # raises HTTPRequestEntityTooLarge (413) past the limit
        try:
            body = protocol.loads(raw)
        except (ValueError, RecursionError) as exc:  # RecursionError: stdlib json, deep nesting
            raise APIError(400, f"request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise APIError(400, "request body must be a JSON object")
        return body

    async def _generate(self, request: web.Request, kind: str) -> web.StreamResponse:
        self._check_admitting()
        body = await self._read_json(request)
        self._check_admitting()  # again: SIGTERM may have come while the body was read
        self.limits.check_body(body, kind)
        defaults = getattr(self.engine, "generation_defaults", None)
        loop = asyncio.get_running_loop()
        tokenizer = self.engine.tokenizer
        if kind == "chat":  # the chat template and encode run in the pool
            gen = await loop.run_in_executor(self.tokenize_pool, protocol.parse_chat, body,
                                             tokenizer, defaults)
        else:
            gen = protocol.parse_completion(body, defaults)

            def encode() -> None:  # FIM prompt (suffix) and tokenization, in the pool
                fim.apply_suffix(gen, self.fim_template, tokenizer, self.model_name,
                                 self.engine.max_model_len)
                gen.prompts = limits.encode_prompts(tokenizer, gen.prompts)
            await loop.run_in_executor(self.tokenize_pool, encode)
        return await self.run_generation(request, gen)

    async def run_generation(self, request: web.Request, gen: GenerationRequest,
                             make_state=None) -> web.StreamResponse:
        """Admit a validated request and answer it; `make_state(gen, num_choices)` builds
        another response shape (llama.cpp's /infill) than ResponseState."""
        if "X-Request-Id" not in request.headers:  # ours: the response id uses it too
            gen.request_id = request.get(parity.REQUEST_ID) or gen.request_id
        lora_name = None
        if gen.model is not None and gen.model not in self.model_names:
            lora_name = served_lora(self, gen.model)  # 404 model_not_found if unknown
        num_choices = len(gen.prompts) * gen.n
        bridge = self.bridge
        self.limits.check_admissible(len(gen.prompts), gen.n)
        if bridge.num_in_flight + num_choices > bridge.max_in_flight:
            raise APIError(503, f"too many requests in flight ({bridge.num_in_flight} + "
                                f"{num_choices} > max_num_seqs + max_queued_requests = "
                                f"{bridge.max_in_flight}); retry later",
                           headers={"Retry-After": RETRY_AFTER_S})
        request_ids = [f"{gen.request_id}-{i}" for i in range(num_choices)]
        prompts = [p for p in gen.prompts for _ in range(gen.n)]
        params = [sp for _ in gen.prompts for sp in gen.params]
        self._enter()
        try:
            try:
                collector = await bridge.add(request_ids, prompts, params, gen.priority,
                                             lora_name)
            except ValueError as exc:
                raise protocol.from_value_error(exc) from None
            except EngineDeadError:
                raise internal_error(gen.request_id) from None
            state = (make_state(gen, num_choices) if make_state is not None else
                     ResponseState(gen, num_choices, LogprobFormatter(self.engine.tokenizer),
                                   lora_name or self.model_name))
            try:
                if gen.stream:
                    return await self._stream(request, gen, collector, state)
                return await self._complete(request, gen, collector, state)
            finally:
                self._finish(gen, collector, state)
        finally:
            self._exit()

    def _enter(self) -> None:
        self.num_active += 1
        self._idle.clear()

    def _exit(self) -> None:
        self.num_active -= 1
        if self.num_active == 0:
            self._idle.set()

    async def _next(self, request: web.Request, collector) -> list | None:
        """Wait for merged deltas; None when the client has gone away.

        The transport is checked on every wake-up, not only on a poll timeout: while tokens
        flow the collector wakes every step, and a walked-away client must still be noticed.
        """
        while True:
            woke = await collector.wait(DISCONNECT_POLL_S)
            transport = request.transport
            if transport is None or transport.is_closing():
                return None
            if woke:
                break
        return collector.take()  # raises the engine's failure, if any

    async def _complete(self, request, gen: GenerationRequest, collector, state
                        ) -> web.StreamResponse | None:
        while not state.all_finished:
            try:
                deltas = await self._next(request, collector)
            except EngineDeadError:
                raise internal_error(gen.request_id) from None
            if deltas is None:
                state.disconnected = True
                return web.Response(status=499)
            state.absorb(deltas, self.metrics)
        return json_response(state.full_response())

    async def _stream(self, request, gen: GenerationRequest, collector, state
                      ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
        try:
            await response.prepare(request)
            if gen.kind == "chat":
                await response.write(b"".join(frame(state.role_chunk(i))
                                              for i in range(state.num_choices)))
            while not state.all_finished:
                try:
                    deltas = await self._next(request, collector)
                except EngineDeadError:  # flushed now: the process exits right after
                    await response.write(frame(internal_error(gen.request_id).body())
                                         + b"data: [DONE]\n\n")
                    await response.write_eof()
                    return response
                if deltas is None:
                    state.disconnected = True
                    return response
                frames = [frame(chunk) for chunk in state.absorb(deltas, self.metrics)]
                if frames:
                    await response.write(b"".join(frames))
            if gen.include_usage:
                await response.write(frame(state.usage_chunk()))
            if gen.kind != "infill":  # llama.cpp's streams end with a "stop": true frame
                await response.write(b"data: [DONE]\n\n")
        except ConnectionError:  # the client went away; _generate's finally aborts the rest
            state.disconnected = True
        except asyncio.CancelledError:
            state.disconnected = True
            raise
        except Exception as exc:  # the stream has started: an error frame, never a 2nd response
            self.log.error("stream_error", request_id=gen.request_id,
                           error=f"{type(exc).__name__}: {exc}")
            logging.getLogger("specdec.server").exception("stream error %s", gen.request_id)
            if not response.prepared:
                raise
            try:
                await response.write(frame(internal_error(gen.request_id).body())
                                     + b"data: [DONE]\n\n")
                await response.write_eof()
            except ConnectionError:
                state.disconnected = True
        return response

    def _finish(self, gen: GenerationRequest, collector, state) -> None:
        unfinished = collector.unfinished_ids()
        self.bridge.release(collector)
        for _ in unfinished:
            self.metrics.observe_finished("abort", None)
        if self.config.server.log_requests:
            self.log.info("request", **state.log_fields(gen, len(unfinished)))


def seconds_since_process_start() -> float | None:
    """Wall seconds since this process started (Linux /proc; None elsewhere): at attach(),
    the start-to-ready time a supervisor sees, interpreter and imports included."""
    import os
    try:
        with open("/proc/self/stat") as f:
            # NOTE: field 22 (starttime, clock ticks after boot) follows the ")" of the name.
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return round(uptime - ticks / os.sysconf("SC_CLK_TCK"), 2)


def _startup_gauge(metrics: ServerMetrics, model_name: str, seconds: float | None) -> None:
    from prometheus_client import Gauge

    if seconds is not None:
        for prefix in metrics.prefixes:  # under every prefix, as every other series
            Gauge(f"{prefix}:startup_seconds", "Seconds from the process start to ready "
                  "(imports and model load; a background calibration runs after it).",
                  ["model_name"], registry=metrics.registry).labels(model_name).set(seconds)
