"""`response_format` (OpenAI) and `structured_outputs` (vLLM) -> StructuredOutput.

OpenAI: {"type": "text"} | {"type": "json_object"} |
        {"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}}.
vLLM:   {"json": schema (object or JSON text)} | {"regex": str} | {"choice": [str, ...]} |
        {"grammar": Lark or GBNF text} | {"json_object": true}; exactly one of them.
The grammar itself is compiled (and rejected with a 400 naming the parameter) by the engine.
"""

from __future__ import annotations

import json

from specdec.core.request import StructuredOutput

_VLLM_KINDS = ("json", "regex", "choice", "grammar", "json_object")


def _bad(param: str, message: str):
    from server.protocol import bad_request  # NOTE: protocol imports this module
    return bad_request(param, message)


def parse_response_format(body: dict) -> StructuredOutput | None:
    fmt = body.get("response_format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
        raise _bad("response_format", 'response_format must be an object with a "type": '
                                      '"text", "json_object" or "json_schema"')
    kind = fmt["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutput("json", None, "response_format")
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict):
            raise _bad("response_format.json_schema",
                       "response_format.json_schema must be an object with a \"schema\"")
        schema = spec.get("schema")
        if schema is None:  # OpenAI allows a missing schema: any JSON object
            schema = {"type": "object"}
        if not isinstance(schema, (dict, bool)):
            raise _bad("response_format.json_schema.schema",
                       "response_format.json_schema.schema must be a JSON Schema object")
        return StructuredOutput("json", schema, "response_format.json_schema.schema")
    raise _bad("response_format.type", f'response_format.type must be "text", "json_object" '
                                       f'or "json_schema", got {kind!r}')


def parse_structured_outputs(body: dict) -> StructuredOutput | None:
    spec = body.get("structured_outputs")
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise _bad("structured_outputs", "structured_outputs must be an object")
    given = [k for k in _VLLM_KINDS if spec.get(k) not in (None, False)]
    unknown = sorted(set(spec) - set(_VLLM_KINDS)
                     - {"disable_any_whitespace", "disable_additional_properties",
                        "whitespace_pattern", "structural_tag"})
    if unknown:
        raise _bad(f"structured_outputs.{unknown[0]}",
                   f"structured_outputs.{unknown[0]} is not supported; use one of "
                   f"{list(_VLLM_KINDS)}")
    if len(given) != 1:
        raise _bad("structured_outputs", f"structured_outputs must set exactly one of "
                                         f"{list(_VLLM_KINDS)}, got {given}")
    kind = given[0]
    value = spec[kind]
    param = f"structured_outputs.{kind}"
    if kind == "json_object":
        return StructuredOutput("json", None, param)
    if kind == "json" and isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise _bad(param, f"{param} is not valid JSON: {exc}") from None
    return StructuredOutput(kind, value, param)


def parse_structured(body: dict) -> StructuredOutput | None:
    """The one output constraint of a request (response_format or structured_outputs)."""
    fmt = parse_response_format(body)
    so = parse_structured_outputs(body)
    if fmt is not None and so is not None:
        raise _bad("structured_outputs",
                   "structured_outputs and a non-text response_format cannot both be set")
    return fmt or so
