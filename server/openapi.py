"""The OpenAPI 3.1 description of the server, served at GET /openapi.json.

Hand-written from `server.protocol` (what a request may hold, with the ranges it checks) and
`server.responses` (what comes back). The request schemas describe the accepted types and ranges
but leave cross-field rules (prompt + max_tokens <= max_model_len, token ids inside the
vocabulary, the limits in `server.limits`) to the server, which answers them with a 400 of the
`Error` shape. `tests/e2e/test_openapi.py` runs schemathesis against a live server with it.
"""

from __future__ import annotations

from specdec.core.request import MAX_LOGPROBS

from server.protocol import CHAT_ROLES, MAX_N, MAX_PROMPTS


def _nullable(schema: dict) -> dict:
    kind = schema.get("type")
    out = dict(schema)
    out["type"] = [kind, "null"] if isinstance(kind, str) else [*kind, "null"]
    return out


_INT = {"type": "integer"}
_NUM = {"type": "number"}
_BOOL = {"type": "boolean"}
_STR = {"type": "string"}
_TOKEN_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}

# Sampling fields shared by both generation routes (server.protocol._sampling_params).
_SAMPLING = {
    "model": _nullable(_STR),
    "n": _nullable({"type": "integer", "minimum": 1, "maximum": MAX_N}),
    "seed": _nullable(_INT),
    "temperature": _nullable({"type": "number", "minimum": 0, "maximum": 100}),
    "top_p": _nullable({"type": "number", "exclusiveMinimum": 0, "maximum": 1}),
    "top_k": _nullable({"type": "integer", "minimum": -1}),
    "min_p": _nullable({"type": "number", "minimum": 0, "maximum": 1}),
    "repetition_penalty": _nullable({"type": "number", "exclusiveMinimum": 0, "maximum": 2}),
    "presence_penalty": _nullable({"type": "number", "minimum": -2, "maximum": 2}),
    "frequency_penalty": _nullable({"type": "number", "minimum": -2, "maximum": 2}),
    "logit_bias": _nullable({"type": "object",
                             "propertyNames": {"pattern": "^[0-9]+$"},
                             "additionalProperties": {"type": "number", "minimum": -100,
                                                      "maximum": 100}}),
    "min_tokens": _nullable({"type": "integer", "minimum": 0}),
    "stop": {"oneOf": [{"type": "string", "minLength": 1},
                       {"type": "array", "items": {"type": "string", "minLength": 1},
                        "maxItems": 16},
                       {"type": "null"}]},
    "stop_token_ids": _nullable({"type": "array", "items": {"type": "integer", "minimum": 0}}),
    "ignore_eos": _nullable(_BOOL),
    "include_stop_str_in_output": _nullable(_BOOL),
    "skip_special_tokens": _nullable(_BOOL),
    "num_speculative_tokens": _nullable({"type": "integer", "minimum": 0}),
    "stream": _nullable(_BOOL),
    "stream_options": _nullable({"type": "object",
                                 "properties": {"include_usage": _nullable(_BOOL)}}),
    "user": _nullable(_STR),
}

_TEXT_PART = {"type": "object", "required": ["type", "text"],
              "properties": {"type": {"const": "text"}, "text": _STR}}

# Structured outputs (server.structured): one constraint per request.
_JSON_SCHEMA = {"type": "object"}  # a JSON Schema; what the grammar compiler rejects is a 400
_RESPONSE_FORMAT = {"oneOf": [
    {"type": "object", "required": ["type"], "properties": {"type": {"const": "text"}}},
    {"type": "object", "required": ["type"], "properties": {"type": {"const": "json_object"}}},
    {"type": "object", "required": ["type", "json_schema"], "properties": {
        "type": {"const": "json_schema"},
        "json_schema": {"type": "object", "required": ["schema"], "properties": {
            "name": _STR, "description": _STR, "schema": _JSON_SCHEMA,
            "strict": _nullable(_BOOL)}}}},
    {"type": "null"}]}
_STRUCTURED_OUTPUTS = _nullable({  # vLLM's: exactly one of the kinds
    "type": "object", "minProperties": 1, "maxProperties": 1,
    "properties": {"json": {"oneOf": [_JSON_SCHEMA, _STR]}, "regex": _STR,
                   "choice": {"type": "array", "items": _STR, "minItems": 1},
                   "grammar": _STR, "json_object": {"const": True}}})

# Tool calling (server.tools).
_FUNCTION_NAME = {"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,64}$"}
_TOOL = {"type": "object", "required": ["type", "function"], "properties": {
    "type": {"const": "function"},
    "function": {"type": "object", "required": ["name"], "properties": {
        "name": _FUNCTION_NAME, "description": _STR, "parameters": _JSON_SCHEMA,
        "strict": _nullable(_BOOL)}}}}
_TOOL_CHOICE = {"oneOf": [
    {"enum": ["none", "auto", "required"]},
    {"type": "object", "required": ["type", "function"], "properties": {
        "type": {"const": "function"},
        "function": {"type": "object", "required": ["name"],
                     "properties": {"name": _FUNCTION_NAME}}}},
    {"type": "null"}]}
_TOOL_CALL = {"type": "object", "required": ["id", "type", "function"], "properties": {
    "id": _STR, "type": {"const": "function"},
    "function": {"type": "object", "required": ["name", "arguments"],
                 "properties": {"name": _STR, "arguments": _STR}}}}

_CHAT_REQUEST = {
    "type": "object", "required": ["messages"],
    "properties": {
        "messages": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["role"],
            "properties": {"role": {"enum": list(CHAT_ROLES)},
                           "content": {"oneOf": [_STR, {"type": "array", "items": _TEXT_PART},
                                                 {"type": "null"}]},
                           "name": _STR,
                           "tool_calls": {"type": "array", "items": _TOOL_CALL},
                           "tool_call_id": _STR}}},
        "max_tokens": _nullable({"type": "integer", "minimum": 1}),
        "max_completion_tokens": _nullable({"type": "integer", "minimum": 1}),
        "logprobs": _nullable(_BOOL),
        "top_logprobs": _nullable({"type": "integer", "minimum": 0, "maximum": MAX_LOGPROBS}),
        "response_format": _RESPONSE_FORMAT,
        "structured_outputs": _STRUCTURED_OUTPUTS,
        "tools": _nullable({"type": "array", "items": _TOOL}),
        "tool_choice": _TOOL_CHOICE,
        "parallel_tool_calls": _nullable(_BOOL),
        **_SAMPLING,
    },
}

_COMPLETION_REQUEST = {
    "type": "object", "required": ["prompt"],
    "properties": {
        "prompt": {"oneOf": [
            {"type": "string", "minLength": 1},
            {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1,
             "maxItems": MAX_PROMPTS},
            _TOKEN_IDS,
            {"type": "array", "items": _TOKEN_IDS, "minItems": 1, "maxItems": MAX_PROMPTS}]},
        "max_tokens": _nullable({"type": "integer", "minimum": 1}),
        "logprobs": _nullable({"type": "integer", "minimum": 0, "maximum": MAX_LOGPROBS}),
        "echo": {"const": False},
        "suffix": _nullable(_STR),  # fill-in-the-middle: a 400 when the model has no FIM tokens
        "response_format": _RESPONSE_FORMAT,
        "structured_outputs": _STRUCTURED_OUTPUTS,
        **_SAMPLING,
    },
}

_ERROR = {
    "type": "object", "required": ["error"], "additionalProperties": False,
    "properties": {"error": {
        "type": "object", "required": ["message", "type", "param", "code"],
        "properties": {"message": _STR, "type": _STR, "param": _nullable(_STR),
                       "code": _nullable(_STR)}}},
}

_USAGE = {"type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
          "properties": {"prompt_tokens": _INT, "completion_tokens": _INT,
                         "total_tokens": _INT}}

_FINISH = {"type": ["string", "null"]}


def _response(obj: str, choice: dict) -> dict:
    return {"type": "object", "required": ["id", "object", "created", "model", "choices"],
            "properties": {"id": _STR, "object": {"const": obj}, "created": _INT,
                           "model": _STR, "usage": _USAGE,
                           "choices": {"type": "array", "items": {
                               "type": "object", "required": ["index", "finish_reason"],
                               "properties": {"index": _INT, "finish_reason": _FINISH,
                                              **choice}}}}}


_CHAT_RESPONSE = _response("chat.completion", {"message": {
    "type": "object", "required": ["role", "content"],
    "properties": {"role": {"const": "assistant"}, "content": _nullable(_STR),
                   "tool_calls": {"type": "array", "items": _TOOL_CALL, "minItems": 1}}}})
_COMPLETION_RESPONSE = _response("text_completion", {"text": _STR})

# One Server-Sent Event: `data:` holds a JSON chunk, an error object, or the literal [DONE].
_SSE_EVENT = {"type": "object", "required": ["data"],
              "properties": {"data": _STR, "event": _STR, "id": _STR}}

_STATUS = {"type": "object", "required": ["status"], "properties": {"status": _STR}}


def _errors(*codes: int) -> dict:
    words = {400: "invalid request (the message names the parameter, value and limit)",
             401: "missing or wrong API key", 404: "unknown model", 413: "body too large",
             500: "internal error (a generic message with the request id)",
             503: "loading, draining or overloaded (Retry-After)"}
    return {str(c): {"description": words[c],
                     "content": {"application/json": {"schema": {"$ref":
                                                                 "#/components/schemas/Error"}}}}
            for c in codes}


def _generation(summary: str, request: str, response: str) -> dict:
    return {"post": {
        "summary": summary,
        "requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{request}"}}}},
        "responses": {
            "200": {"description": "the completion, or with stream=true Server-Sent Events "
                                   "(`data: {chunk}` frames, an error frame on a fault, "
                                   "then `data: [DONE]`)",
                    "content": {"application/json": {"schema": {
                                    "$ref": f"#/components/schemas/{response}"}},
                                "text/event-stream": {"schema": _SSE_EVENT}}},
            **_errors(400, 401, 404, 413, 500, 503)},
    }}


def _get(summary: str, schema: dict, codes: tuple[int, ...] = (), media="application/json"
         ) -> dict:
    return {"get": {"summary": summary, "responses": {
        "200": {"description": summary, "content": {media: {"schema": schema}}},
        **_errors(*codes)}}}


def _health(summary: str) -> dict:
    body = {"content": {"application/json": {"schema": _STATUS}}}
    return {"get": {"summary": summary, "responses": {
        "200": {"description": "ready / alive", **body},
        "503": {"description": "not ready / dead", **body}}}}


_TOKENIZE_REQUEST = {"oneOf": [
    {"type": "object", "required": ["prompt"], "properties": {
        "model": _nullable(_STR), "prompt": _STR, "add_special_tokens": _nullable(_BOOL),
        "return_token_strs": _nullable(_BOOL)}},
    {"type": "object", "required": ["messages"], "properties": {
        "model": _nullable(_STR), "messages": _CHAT_REQUEST["properties"]["messages"],
        "add_special_tokens": _nullable(_BOOL), "add_generation_prompt": _nullable(_BOOL),
        "return_token_strs": _nullable(_BOOL)}}]}
_TOKENIZE_RESPONSE = {"type": "object", "required": ["count", "max_model_len", "tokens"],
                      "properties": {"count": _INT, "max_model_len": _INT,
                                     "tokens": {"type": "array", "items": _INT},
                                     "token_strs": _nullable({"type": "array", "items": _STR})}}
_DETOKENIZE_REQUEST = {"type": "object", "required": ["tokens"], "properties": {
    "model": _nullable(_STR), "tokens": {"type": "array", "items": {"type": "integer",
                                                                    "minimum": 0}}}}
_INFILL_REQUEST = {"type": "object", "properties": {  # llama.cpp's /infill
    "input_prefix": _nullable(_STR), "input_suffix": _nullable(_STR), "prompt": _nullable(_STR),
    "input_extra": _nullable({"type": "array", "maxItems": 64, "items": {
        "type": "object", "properties": {"filename": _STR, "text": _STR}}}),
    "n_predict": {"oneOf": [{"type": "integer", "minimum": 1}, {"const": -1}, {"type": "null"}]},
    "temperature": _nullable({"type": "number", "minimum": 0, "maximum": 100}),
    "top_k": _nullable({"type": "integer", "minimum": -1}),
    "top_p": _nullable({"type": "number", "exclusiveMinimum": 0, "maximum": 1}),
    "seed": _nullable(_INT), "stop": _SAMPLING["stop"], "stream": _nullable(_BOOL)}}
_INFILL_RESPONSE = {"type": "object", "required": ["content"],
                    "properties": {"content": _STR, "stop": _BOOL}}


def _post(summary: str, request: dict, response: dict, codes: tuple[int, ...]) -> dict:
    return {"post": {
        "summary": summary,
        "requestBody": {"required": True, "content": {"application/json": {"schema": request}}},
        "responses": {"200": {"description": summary, "content": {
            "application/json": {"schema": response}}}, **_errors(*codes)}}}


def document(version: str) -> dict:
    """The OpenAPI 3.1 document (a fresh dict each call)."""
    return {
        "openapi": "3.1.0",
        "info": {"title": "specdec", "version": version,
                 "description": "OpenAI-compatible server with exact speculative decoding."},
        "paths": {
            "/v1/chat/completions": _generation("Chat completion", "ChatCompletionRequest",
                                                "ChatCompletion"),
            "/v1/completions": _generation("Text completion", "CompletionRequest",
                                           "Completion"),
            "/v1/models": _get("The served model", {
                "type": "object", "required": ["object", "data"],
                "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": {
                    "type": "object", "required": ["id", "object"],
                    "properties": {"id": _STR, "object": {"const": "model"},
                                   "max_model_len": _INT}}}}}, (401, 503)),
            "/health": _health("Readiness: 200 when serving; 503 while loading, draining "
                               "or once the engine died"),
            "/health/live": _health("Liveness: 200 while loading, serving or draining; 503 "
                                    "only once the engine died"),
            "/version": _get("Server version", {"type": "object", "required": ["version"],
                                                "properties": {"version": _STR}}),
            "/metrics": _get("Prometheus metrics", _STR, (503,), media="text/plain"),
            "/tokenize": _post("Token ids of a prompt or of chat messages (vLLM's)",
                               _TOKENIZE_REQUEST, _TOKENIZE_RESPONSE, (400, 404, 413, 503)),
            "/detokenize": _post("Text of token ids (vLLM's)", _DETOKENIZE_REQUEST,
                                 {"type": "object", "required": ["prompt"],
                                  "properties": {"prompt": _STR}}, (400, 404, 413, 503)),
            "/infill": {"post": {**_post(
                "Fill-in-the-middle in llama.cpp's shape (a 400 when the model has no FIM "
                "tokens; with stream=true Server-Sent Events)", _INFILL_REQUEST,
                _INFILL_RESPONSE, (400, 401, 413, 500, 503))["post"]}},
            "/ping": {**_health("Readiness, as /health (SageMaker's name)"),
                      "post": _health("Readiness, as /health")["get"]},
        },
        "components": {"schemas": {
            "ChatCompletionRequest": _CHAT_REQUEST,
            "CompletionRequest": _COMPLETION_REQUEST,
            "ChatCompletion": _CHAT_RESPONSE,
            "Completion": _COMPLETION_RESPONSE,
            "Error": _ERROR,
        }},
    }
