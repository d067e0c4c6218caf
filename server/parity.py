"""Drop-in parity with vLLM and llama.cpp: extra routes, CORS, request ids, model aliases.

Routes (registered by `register(server)` from OpenAIServer.__init__):
- POST /tokenize, /detokenize: vLLM's shapes. `{prompt}` or `{messages}` -> `{count,
  max_model_len, tokens, token_strs}`; `{tokens}` -> `{prompt}`.
- GET|POST /ping: SageMaker's health route; answers like /health.
- GET /health/live (in app.py): liveness. 200 while loading, serving or draining; 503 only once the engine
  thread has died (a liveness probe must not kill a pod that is still loading or draining).
- POST /infill: llama.cpp's fill-in-the-middle (server/fim.py).
- OPTIONS *: CORS preflight, only when `server.cors_origins` is set (off by default).

Every response carries `X-Request-Id`: the client's header when it sent one, else the id the
response body uses (`cmpl-<id>` / `chatcmpl-<id>`).
"""

from __future__ import annotations

import asyncio
import functools
import uuid

from aiohttp import web

from server import fim, protocol
from server.protocol import APIError, bad_request

MAX_REQUEST_ID_LEN = 128
REQUEST_ID = web.RequestKey("request_id", str)
PREFLIGHT_MAX_AGE_S = "600"


def parse_origins(value: str) -> frozenset[str]:
    return frozenset(o.strip() for o in (value or "").split(",") if o.strip())


def model_names(served: str, aliases: str) -> list[str]:
    names = [served]
    for alias in (aliases or "").split(","):
        alias = alias.strip()
        if alias and alias not in names:
            names.append(alias)
    return names


def request_id(request: web.Request) -> str:
    """The client's X-Request-Id when it is a sane token, else a fresh uuid."""
    given = request.headers.get("X-Request-Id", "")
    if 0 < len(given) <= MAX_REQUEST_ID_LEN and given.isprintable() and " " not in given:
        return given
    return uuid.uuid4().hex


def register(server) -> None:
    app = server.app
    bind = functools.partial
    app.add_routes([
        web.post("/tokenize", bind(tokenize, server)),
        web.post("/detokenize", bind(detokenize, server)),
        web.get("/ping", server.health),
        web.post("/ping", server.health),
        web.post("/infill", bind(infill, server)),
    ])
    if server.cors_origins:
        app.router.add_route("OPTIONS", "/{tail:.*}", bind(preflight, server))
    app.on_response_prepare.append(bind(_on_prepare, server))


async def _on_prepare(server, request: web.Request, response: web.StreamResponse) -> None:
    rid = request.get(REQUEST_ID)
    if rid is not None:
        response.headers["X-Request-Id"] = rid
    origin = _allowed_origin(server, request)
    if origin is not None:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = "X-Request-Id"
        response.headers["Vary"] = "Origin"


def _allowed_origin(server, request: web.Request) -> str | None:
    origins = server.cors_origins
    origin = request.headers.get("Origin")
    if not origins or not origin:
        return None
    if "*" in origins:
        return "*"
    return origin if origin in origins else None


async def preflight(server, request: web.Request) -> web.Response:
    if _allowed_origin(server, request) is None:
        raise APIError(403, f"origin {request.headers.get('Origin')!r} is not in "
                            f"server.cors_origins")
    headers = request.headers.get("Access-Control-Request-Headers",
                                  "Authorization, Content-Type")
    return web.Response(status=204, headers={
        "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
        "Access-Control-Allow-Headers": headers,
        "Access-Control-Max-Age": PREFLIGHT_MAX_AGE_S})


def _check_model(server, body: dict) -> None:
    model = protocol._get(body, "model", "str")
    if model is not None and model not in server.model_names:
        raise APIError(404, f"model {model!r} does not exist; this server serves "
                            f"{server.model_names!r}", param="model", code="model_not_found")


async def tokenize(server, request: web.Request) -> web.Response:
    from server.app import json_response
    server._require_ready()
    body = await server._read_json(request)
    _check_model(server, body)
    if body.get("messages") is not None:  # the chat limits, or the prompt's
        server.limits.check_body({"messages": body["messages"]}, "chat")
    else:
        server.limits.check_body({"prompt": body.get("prompt")}, "completion")
    result = await asyncio.get_running_loop().run_in_executor(  # templating and encode
        server.tokenize_pool, _tokenize, server, body)
    return json_response(result)


def _tokenize(server, body: dict) -> dict:
    tokenizer = server.engine.tokenizer
    return_strs = protocol._get(body, "return_token_strs", "bool", False)
    if body.get("messages") is not None:
        add_special = protocol._get(body, "add_special_tokens", "bool", False)
        gen_prompt = protocol._get(body, "add_generation_prompt", "bool", True)
        chat = protocol.parse_chat({"messages": body["messages"]}, tokenizer)
        tokens = chat.prompts[0]
        if not gen_prompt:
            messages = [{"role": protocol._developer_role(m["role"], tokenizer),
                         "content": protocol._message_text(m.get("content"), i)}
                        for i, m in enumerate(body["messages"])]
            text = tokenizer.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=False)
            tokens = tokenizer.encode(text, add_special_tokens=add_special)
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise bad_request("prompt", "prompt must be a string (or send messages)")
        add_special = protocol._get(body, "add_special_tokens", "bool", True)
        tokens = tokenizer.encode(prompt, add_special_tokens=add_special)
    return {"count": len(tokens), "max_model_len": server.engine.max_model_len,
            "tokens": tokens,
            "token_strs": tokenizer.convert_ids_to_tokens(tokens) if return_strs else None}


async def detokenize(server, request: web.Request) -> web.Response:
    from server.app import json_response
    server._require_ready()
    body = await server._read_json(request)
    _check_model(server, body)
    tokens = body.get("tokens")
    vocab = server.engine.vocab_size if hasattr(server.engine, "vocab_size") else None
    if not isinstance(tokens, list) or not all(protocol._is_int(t) for t in tokens):
        raise bad_request("tokens", "tokens must be a list of token ids")
    bad = [t for t in tokens if t < 0 or (vocab is not None and t >= vocab)]
    if bad:
        raise bad_request("tokens", f"tokens must be in [0, {vocab}), got {bad[0]}")
    return json_response({"prompt": server.engine.tokenizer.decode(tokens)})


async def infill(server, request: web.Request) -> web.StreamResponse:
    server._check_admitting()
    body = await server._read_json(request)
    server._check_admitting()
    server.limits.check_body(body, "infill")  # stop, logit_bias, stop_token_ids, prompt
    server.limits.check_infill(body)
    parse = functools.partial(  # the FIM template tokenizes: in the pool, off the event loop
        fim.parse_infill, body, server.fim_template, server.engine.tokenizer, server.model_name,
        server.engine.max_model_len, getattr(server.engine, "generation_defaults", None))
    gen, truncated = await asyncio.get_running_loop().run_in_executor(server.tokenize_pool, parse)
    return await server.run_generation(
        request, gen, make_state=lambda g, n: fim.InfillState(g, server.model_name, truncated))
