"""LoRA adapters over HTTP, in vLLM's shape.

- A request picks an adapter with `model = NAME`; an unknown name gets 404 model_not_found.
- GET /v1/models lists each adapter with `parent` = the base id and `root` = its path.
- POST /v1/load_lora_adapter {"lora_name", "lora_path"} and POST /v1/unload_lora_adapter
  {"lora_name"}, when lora.allow_runtime_updates (404 otherwise, as vLLM without
  VLLM_ALLOW_RUNTIME_LORA_UPDATING). The adapter is parsed on a worker thread, then registered
  on the engine thread between steps, so a load never blocks a step. A bad adapter is a 400
  naming the file and the key; the server keeps serving.
- `lora_requests_info{running_lora_adapters, waiting_lora_adapters, max_lora}` (a gauge whose
  value is the scrape's Unix time, as vLLM's).
"""

from __future__ import annotations

import asyncio
import time

from aiohttp import web
from prometheus_client.core import GaugeMetricFamily

from server.protocol import APIError


def _manager(server):
    return getattr(server.engine, "lora", None) if server.engine is not None else None


def served_lora(server, model: str) -> str:
    """The adapter a request's `model` names; APIError 404 model_not_found otherwise."""
    manager = _manager(server)
    if manager is not None and model in manager.registry:
        return model
    served = [server.model_name] + (sorted(manager.registry) if manager is not None else [])
    raise APIError(404, f"model {model!r} does not exist; this server serves "
                        f"{', '.join(repr(m) for m in served)}", param="model",
                   code="model_not_found")


def lora_model_cards(server) -> list[dict]:
    manager = _manager(server)
    if manager is None:
        return []
    return [{"id": req.lora_name, "object": "model", "created": server.created,
             "owned_by": "specdec", "max_model_len": server.engine.max_model_len,
             "root": req.lora_path, "parent": server.model_name}
            for req in list(manager.registry.values())]


def lora_info_metric(info, prefix: str = "specdec") -> GaugeMetricFamily:
    gauge = GaugeMetricFamily(f"{prefix}:lora_requests_info",
                              "Running and waiting LoRA adapters (value: Unix time).",
                              labels=["running_lora_adapters", "waiting_lora_adapters",
                                      "max_lora"])
    gauge.add_metric([",".join(info.running_lora_adapters),
                      ",".join(info.waiting_lora_adapters), str(info.max_lora)], time.time())
    return gauge


def add_lora_routes(server) -> None:
    async def load(request: web.Request) -> web.Response:
        manager, body = await _prepare(server, request)
        name, path = _string(body, "lora_name"), _string(body, "lora_path")
        if name == server.model_name:
            raise APIError(400, f"lora_name {name!r} is the base model's name",
                           param="lora_name")
        if name in manager.registry:
            raise APIError(400, f"the lora adapter {name!r} has already been loaded; unload "
                                f"it first", param="lora_name")
        from specdec.model.lora import LoRAError, load_adapter
        loop = asyncio.get_running_loop()
        try:
            adapter = await loop.run_in_executor(None, load_adapter, name, path,
                                                 manager.max_lora_rank, manager.arch)
        except LoRAError as exc:
            raise APIError(400, str(exc), param="lora_path") from None
        await server.bridge.call(lambda engine: engine.lora.add(name, path, adapter))
        server.log.info("lora_loaded", lora_name=name, lora_path=path)
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def unload(request: web.Request) -> web.Response:
        manager, body = await _prepare(server, request)
        name = _string(body, "lora_name")
        if name not in manager.registry:
            raise APIError(404, f"the lora adapter {name!r} cannot be found", param="lora_name",
                           code="model_not_found")
        try:
            await server.bridge.call(lambda engine: engine.lora.remove(name))
        except KeyError:
            raise APIError(404, f"the lora adapter {name!r} cannot be found", param="lora_name",
                           code="model_not_found") from None
        server.log.info("lora_unloaded", lora_name=name)
        return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")

    server.app.add_routes([web.post("/v1/load_lora_adapter", load),
                           web.post("/v1/unload_lora_adapter", unload)])


async def _prepare(server, request: web.Request):
    if not server.config.lora.allow_runtime_updates:
        raise APIError(404, f"route {request.method} {request.path} is disabled: set "
                            f"lora.allow_runtime_updates = true", code="not_found")
    server._check_admitting()
    manager = _manager(server)
    if manager is None:
        raise APIError(400, "LoRA is not enabled on this server ([lora] enabled = true)")
    return manager, await server._read_json(request)


def _string(body: dict, key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise APIError(400, f"{key} must be a non-empty string, got {value!r}", param=key)
    return value
