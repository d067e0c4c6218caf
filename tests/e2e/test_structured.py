"""Structured outputs and tool calling through the official client, on the tiny models with
speculation (draft model and n-gram): every output validates against its schema."""

from __future__ import annotations

import json
import re
from typing import Literal

import jsonschema
import pydantic
import pytest

from tests.e2e.conftest import NGRAM_MODEL, SPEC_MODEL, http, sse_events

MESSAGES = [{"role": "user", "content": "Describe the weather."}]
SCHEMA = {"type": "object",
          "properties": {"ok": {"type": "boolean"},
                         "n": {"type": "integer", "minimum": 0, "maximum": 999},
                         "colour": {"enum": ["red", "green", "blue"]}},
          "required": ["ok", "n", "colour"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object",
                   "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]},
                                  "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {
        "type": "object", "properties": {"utc": {"type": "boolean"}}, "required": ["utc"],
        "additionalProperties": False}}}
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}


@pytest.fixture(params=["spec", "ngram"])
def live(request, spec_server, ngram_server):
    return (spec_server, SPEC_MODEL) if request.param == "spec" else (ngram_server, NGRAM_MODEL)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_outputs_validate(live, temperature):
    server, model = live
    out = server.client().chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=64, temperature=temperature, n=3, seed=7,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "w", "schema": SCHEMA, "strict": True}})
    for choice in out.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
        assert choice.message.tool_calls is None


def test_json_object_and_vllm_structured_outputs(live):
    server, model = live
    client = server.client()
    out = client.completions.create(model=model, prompt="x", max_tokens=48, temperature=1.0,
                                    seed=3, extra_body={"structured_outputs": {"regex": "[ab]{3}-[0-9]{2}"}})
    assert re.fullmatch("[ab]{3}-[0-9]{2}", out.choices[0].text)
    out = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=16,
                                         extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert out.choices[0].message.content in ("yes", "no")
    lark = 'start: "x=" NUM ";"\nNUM: /[1-9][0-9]?/'
    out = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=16,
                                         extra_body={"structured_outputs": {"grammar": lark}})
    assert re.fullmatch(r"x=[1-9][0-9]?;", out.choices[0].message.content)
    out = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8,
                                         temperature=0, response_format={"type": "json_object"})
    text = out.choices[0].message.content
    assert text.startswith("{")
    if out.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


class Weather(pydantic.BaseModel):
    ok: bool
    n: int = pydantic.Field(ge=0, le=99)
    colour: Literal["red", "green", "blue"]


def test_parse_with_pydantic_model(spec_server):
    out = spec_server.client().chat.completions.parse(
        model=SPEC_MODEL, messages=MESSAGES, max_tokens=64, temperature=1.0, seed=1,
        response_format=Weather)
    parsed = out.choices[0].message.parsed
    assert isinstance(parsed, Weather) and 0 <= parsed.n <= 99


def _check_calls(calls, allowed=("get_weather", "get_time")):
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("chatcmpl-tool-")
        assert call.function.name in allowed
        jsonschema.validate(json.loads(call.function.arguments), PARAMS[call.function.name])


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_required_and_named_tool_calls(live, temperature):
    server, model = live
    client = server.client()
    out = client.chat.completions.create(
        model=model, messages=MESSAGES, tools=[WEATHER, TIME], tool_choice="required",
        parallel_tool_calls=False, max_tokens=96, temperature=temperature, n=2, seed=5)
    for choice in out.choices:
        assert choice.finish_reason == "tool_calls"
        _check_calls(choice.message.tool_calls)
        assert len(choice.message.tool_calls) == 1
        assert choice.message.content is None
    out = client.chat.completions.create(
        model=model, messages=MESSAGES, tools=[WEATHER, TIME], max_tokens=200,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        temperature=temperature, seed=5)
    # parallel_tool_calls defaults to true: one or more calls, all of the named function
    _check_calls(out.choices[0].message.tool_calls, allowed=("get_time",))


def test_tool_round_trip(spec_server):
    client = spec_server.client()
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    first = client.chat.completions.create(model=SPEC_MODEL, messages=messages,
                                           tools=[WEATHER], tool_choice="required",
                                           parallel_tool_calls=False, max_tokens=96, temperature=0)
    call = first.choices[0].message.tool_calls[0]
    _check_calls([call])
    messages.append(first.choices[0].message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": call.id, "name": call.function.name,
                     "content": json.dumps({"temperature_c": 21})})
    final = client.chat.completions.create(model=SPEC_MODEL, messages=messages, tools=[WEATHER],
                                           tool_choice="none", max_tokens=12, temperature=0)
    assert final.choices[0].finish_reason in ("stop", "length")
    assert isinstance(final.choices[0].message.content, str)
    assert final.choices[0].message.tool_calls is None
    # The history reached the template: the prompt grew by the call and the tool result.
    assert final.usage.prompt_tokens > first.usage.prompt_tokens


def test_streamed_tool_calls_assemble_to_the_non_streamed_ones(live):
    server, model = live
    client = server.client()
    kw = dict(model=model, messages=MESSAGES, tools=[WEATHER, TIME], tool_choice="required",
              parallel_tool_calls=False, max_tokens=160, temperature=0)
    full = client.chat.completions.create(**kw)
    with client.chat.completions.stream(**kw) as stream:
        streamed = stream.get_final_completion()
    want = [(c.function.name, c.function.arguments) for c in full.choices[0].message.tool_calls]
    got = [(c.function.name, c.function.arguments)
           for c in streamed.choices[0].message.tool_calls]
    assert got == want
    assert streamed.choices[0].finish_reason == full.choices[0].finish_reason
    _check_calls(full.choices[0].message.tool_calls)


def test_streamed_fragments_shape(spec_server):
    status, _, body = http("POST", spec_server.base_url + "/v1/chat/completions", {
        "model": SPEC_MODEL, "messages": MESSAGES, "tools": [WEATHER], "stream": True,
        "tool_choice": "required", "parallel_tool_calls": False, "max_tokens": 96,
        "temperature": 0})
    assert status == 200
    frames = [e for e in sse_events(body) if e != "[DONE]"]
    pieces = [tc for f in frames for c in f["choices"] for tc in c["delta"].get("tool_calls", [])]
    assert pieces[0]["index"] == 0 and pieces[0]["type"] == "function"
    assert pieces[0]["id"].startswith("chatcmpl-tool-")
    assert pieces[0]["function"]["name"] == "get_weather"
    args = "".join(p["function"].get("arguments", "") for p in pieces)
    jsonschema.validate(json.loads(args), PARAMS["get_weather"])
    assert frames[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert not any("content" in c["delta"] and c["delta"]["content"] for f in frames
                   for c in f["choices"])


def test_auto_tool_choice_and_no_tool_calls_key(live):
    server, model = live
    status, _, body = http("POST", server.base_url + "/v1/chat/completions", {
        "model": model, "messages": MESSAGES, "tools": [WEATHER], "max_tokens": 12,
        "temperature": 0, "ignore_eos": True})
    assert status == 200
    message = json.loads(body)["choices"][0]["message"]
    assert "tool_calls" not in message  # omitted, never []
    assert isinstance(message["content"], str)


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x",
                                                                 "schema": {"type": "foo"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"structured_outputs": {"regex": "a(b"}}, "structured_outputs.regex"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "foo"}}}],
      "tool_choice": "required"}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
])
def test_bad_structured_requests_are_400_naming_the_parameter(spec_server, body, param):
    base = {"model": SPEC_MODEL, "messages": MESSAGES, "max_tokens": 4}
    status, _, raw = http("POST", spec_server.base_url + "/v1/chat/completions", {**base, **body})
    assert status == 400, raw
    error = json.loads(raw)["error"]
    assert error["param"] == param, error
    assert error["type"] == "invalid_request_error"
    # the server keeps serving
    ok = spec_server.client().chat.completions.create(model=SPEC_MODEL, messages=MESSAGES,
                                                      max_tokens=2)
    assert ok.choices[0].finish_reason in ("stop", "length")
