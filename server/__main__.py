"""`python -m server` / `specdec serve`: load a config, bind, load the engine, serve, drain.

    specdec serve --config configs/X.toml [--host H] [--port P] [--api-key K]
                  [--max-queued-requests N] [--shutdown-timeout S] [--tensor-parallel-size N]
                  [--section.key VALUE ...]
                  [--lora-modules NAME=PATH|'{"name": N, "path": P}' ...]

The socket is bound before the engine loads, so /health answers 503 while loading. SIGTERM or
SIGINT: new requests get 503, in-flight ones may finish for up to --shutdown-timeout seconds,
the rest are aborted, and the process exits 0. If the engine thread dies, every in-flight
request fails (500, or an error frame then [DONE]) and the process exits 1, so that a
supervisor restarts it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

from aiohttp import web

from specdec.core.config import Config, ConfigError, from_dict, load, parse_overrides

ENGINE_DEAD_GRACE_S = 5.0  # after an engine fault: time for handlers to send their errors


def build_config(argv: list[str]) -> Config:
    parser = argparse.ArgumentParser(prog="specdec serve", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="TOML config file (defaults for every key otherwise)")
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' "
                                          "(env SPECDEC_API_KEY)")
    parser.add_argument("--max-queued-requests", type=int)
    parser.add_argument("--shutdown-timeout", type=float)
    parser.add_argument("--tensor-parallel-size", "-tp", type=int,
                        help="split the target model over N ranks (N - 1 worker processes)")
    parser.add_argument("--lora-modules", nargs="+", metavar="NAME=PATH",
                        help='LoRA adapters (PEFT directories) served as model NAME; also '
                             'the JSON form {"name", "path", "base_model_name"}')
    args, rest = parser.parse_known_args(argv)
    overrides: dict[str, object] = dict(parse_overrides(rest))
    for flag, key in (("host", "server.host"), ("port", "server.port"),
                      ("api_key", "server.api_key"),
                      ("max_queued_requests", "server.max_queued_requests"),
                      ("shutdown_timeout", "server.shutdown_timeout"),
                      ("tensor_parallel_size", "parallel.tensor_parallel_size")):
        value = getattr(args, flag)
        if value is not None:
            overrides[key] = value
    if args.lora_modules:
        overrides["lora.modules"] = args.lora_modules
    if "server.api_key" not in overrides and os.environ.get("SPECDEC_API_KEY"):
        overrides["server.api_key"] = os.environ["SPECDEC_API_KEY"]
    if args.config:
        return load(args.config, overrides)
    return from_dict({}, overrides)


def describe_engine(engine) -> dict:
    """What the start-up line reports about a loaded engine."""
    config = engine.config
    stats = engine.stats()
    device = str(getattr(engine, "device", config.device.device))
    graphs_active = bool(getattr(engine, "cuda_graphs", False))
    kernels_active = False
    if device.startswith("cuda"):
        try:
            from specdec.kernels import cupy as kernels
            kernels_active = bool(kernels.available())
        except Exception:  # no cupy / no nvrtc: ops fall back to the torch reference
            kernels_active = False
    return {
        "model": config.model.path, "served_model_name": engine.model_name,
        "dtype": config.model.dtype, "device": device,
        "spec_method": config.spec.method, "draft_model": config.spec.draft_model,
        "num_speculative_tokens": getattr(engine, "k_max", config.spec.num_speculative_tokens),
        "max_model_len": engine.max_model_len,
        "kv_blocks": stats.num_blocks_total, "kv_block_size": config.cache.block_size,
        "kv_tokens": stats.num_blocks_total * config.cache.block_size,
        "cuda_kernels": kernels_active,
        "cuda_graphs": graphs_active,
        # start_s, calibration (cached / measured / off), rss_mb, peak_rss_mb
        **getattr(engine, "startup", {}),
    }


async def serve(config: Config, *, install_signals: bool = True,
                stop_event: asyncio.Event | None = None, started=None, engine=None) -> int:
    """Run until `stop_event` is set (SIGTERM/SIGINT set it when install_signals)."""
    from server.app import OpenAIServer, attach_stdlib_logs

    server = OpenAIServer(config)
    log = server.log
    loop = asyncio.get_running_loop()
    stop_event = stop_event or asyncio.Event()
    if install_signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop_event.set)
    # NOTE: handler_cancellation: a client that hangs up (an editor's superseded keystroke)
    # cancels its handler at once, whose finally aborts the engine request and frees its slot.
    runner = web.AppRunner(server.app, handle_signals=False, access_log=None,
                           shutdown_timeout=1.0, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, config.server.host, config.server.port)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    url = f"http://{config.server.host}:{port}"
    log.info("listening", url=url, status="loading")
    detach_logs = attach_stdlib_logs(log)
    engine_thread = None
    try:
        if engine is None:
            from server.bridge import EngineThread
            from specdec.engine import Engine
            # NOTE: deferred: the calibration (when none is cached) and the grammar tokenizer
            # run between requests once /health is 200 (Engine.run_idle_work). The thread that
            # loads the engine then steps it (bridge.EngineThread: one OpenMP team).
            engine_thread = EngineThread()
            load_task = asyncio.wrap_future(engine_thread.submit(Engine.from_config, config,
                                                                 True))
            stop_task = asyncio.ensure_future(stop_event.wait())
            await asyncio.wait([load_task, stop_task], return_when=asyncio.FIRST_COMPLETED)
            if not load_task.done():
                engine_thread.finish()  # the load runs out on its daemon thread
                log.info("stopped_while_loading")
                return 0
            stop_task.cancel()
            try:
                engine = load_task.result()
            except Exception as exc:
                engine_thread.finish()
                log.error("engine_load_failed", error=f"{type(exc).__name__}: {exc}")
                return 1
        server.attach(engine, engine_thread)
        log.info("ready", url=url, api_key_required=bool(config.server.api_key),
                 process_ready_s=server.startup_s, **describe_engine(engine))
        if started is not None:
            started(server, port)
        stop_task = asyncio.ensure_future(stop_event.wait())
        dead_task = asyncio.ensure_future(server.dead.wait())
        await asyncio.wait([stop_task, dead_task], return_when=asyncio.FIRST_COMPLETED)
        stop_task.cancel()
        dead_task.cancel()
        if server.dead.is_set():  # every in-flight request was failed; let them flush, exit 1
            await server.drain(min(config.server.shutdown_timeout, ENGINE_DEAD_GRACE_S))
            # A handler leaves the in-flight count before aiohttp writes the response it
            # returned; give those writes a few loop turns before the connections close.
            for _ in range(20):
                await asyncio.sleep(0)
            await asyncio.sleep(0.05)
            log.error("exiting", url=url, reason="engine_dead", exit_code=1)
            return 1
        await server.drain(config.server.shutdown_timeout)
        if server.dead.is_set():  # the engine died while draining: still a failure
            log.error("exiting", url=url, reason="engine_dead", exit_code=1)
            return 1
        log.info("stopped", url=url)
        return 0
    finally:
        await runner.cleanup()
        server.close()
        detach_logs()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        config = build_config(argv)
    except (ConfigError, OSError) as exc:
        print(f"specdec serve: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(serve(config))


if __name__ == "__main__":
    sys.exit(main())
