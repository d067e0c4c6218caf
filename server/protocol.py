"""OpenAI request shapes: validate a JSON body into SamplingParams; the error type and body.

Validation is explicit (no schema library): each known field is checked for its type and range,
and every failure raises APIError naming the parameter, the value and the limit. Range checks that
SamplingParams already owns are mapped from its ValueError("<param> must be ...").

Glossary
- choice: one generated sequence of a response; a request with P prompts and n choices per
  prompt fans out into P * n engine requests, choice index = prompt_index * n + i.
- delta: the part of a choice produced since the last frame (several verified tokens may share one).
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field

import orjson

from server import structured as structured_outputs
from server import tools

from specdec.core.request import MAX_LOGPROBS, SamplingParams, StructuredOutput


def dumps(obj) -> bytes:
    return orjson.dumps(obj)


def loads(data: bytes):
    return orjson.loads(data)


MAX_N = 16
MAX_PROMPTS = 64
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


class APIError(Exception):
    """An error that becomes `{"error": {...}}` with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type or _ERROR_TYPES.get(status, "server_error")
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                404: "not_found_error", 405: "invalid_request_error",
                413: "invalid_request_error", 503: "service_unavailable", 500: "server_error"}


def bad_request(param: str | None, message: str) -> APIError:
    return APIError(400, message, param=param)


def from_value_error(exc: ValueError) -> APIError:
    """Map ValueError("<param> must be ...") from SamplingParams or the engine to a 400."""
    message = str(exc) or "invalid request"
    param = message.split(" ", 1)[0].rstrip(":,")
    if param.split("[", 1)[0].split(".", 1)[0] not in _PARAM_NAMES:
        param = None
    return APIError(400, message, param=param)


_PARAM_NAMES = frozenset(SamplingParams.__dataclass_fields__) | {
    "prompt", "input_tokens", "messages", "max_completion_tokens", "top_logprobs", "model",
    "response_format", "structured_outputs", "tools", "tool_choice"}


@dataclass(slots=True)
class GenerationRequest:
    """A validated chat or completions request, ready for the bridge."""

    kind: str                               # "chat" | "completion"
    model: str | None
    prompts: list[str | list[int]]          # one per prompt; chat has exactly one
    params: list[SamplingParams]            # one per choice of one prompt (n entries)
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None             # top-N when logprobs are on
    echo: bool = False
    user: str | None = None
    tools: object | None = None             # server.tools.ToolConfig when tools are offered
    suffix: str | None = None               # completions: fill-in-the-middle (server/fim.py)
    priority: int = 0                       # scheduler.policy = "priority": lower first
    return_token_ids: bool = False          # token_ids per choice, prompt_token_ids once
    continuous_usage_stats: bool = False    # stream: usage in every chunk
    discard_output: bool = False            # echo with max_tokens 0: the prompt only
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def n(self) -> int:
        return len(self.params)

    @property
    def response_id(self) -> str:
        return ("chatcmpl-" if self.kind == "chat" else "cmpl-") + self.request_id


# ---------------------------------------------------------------------------------- field checks

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _get(body: dict, name: str, kind: str, default=None):
    """Read an optional field and check its JSON type; null means the default."""
    value = body.get(name)
    if value is None:
        return default
    ok = {"int": _is_int, "num": _is_num, "bool": lambda v: isinstance(v, bool),
          "str": lambda v: isinstance(v, str), "dict": lambda v: isinstance(v, dict),
          "list": lambda v: isinstance(v, list)}[kind](value)
    if not ok:
        names = {"int": "an integer", "num": "a number", "bool": "a boolean", "str": "a string",
                 "dict": "an object", "list": "an array"}
        raise bad_request(name, f"{name} must be {names[kind]}, got {value!r}")
    return value


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise bad_request("stop", f"stop must be a string or a list of strings, got {stop!r}")
    return stop


def _logit_bias(body: dict) -> dict[int, float] | None:
    bias = _get(body, "logit_bias", "dict")
    if not bias:
        return None
    out = {}
    for key, value in bias.items():
        try:
            token_id = int(key)
        except (TypeError, ValueError):
            raise bad_request("logit_bias", f"logit_bias keys must be token ids, got {key!r}")
        if not _is_num(value):
            raise bad_request("logit_bias", f"logit_bias[{key}] must be a number, got {value!r}")
        out[token_id] = float(value)
    return out


def _sampling_params(body: dict, max_tokens: int | None, logprobs: int | None,
                     structured: StructuredOutput | None = None, defaults: dict | None = None,
                     prompt_logprobs: int | None = None) -> list[SamplingParams]:
    """`defaults`: the model's generation_config sampling defaults for omitted fields."""
    defaults = defaults or {}
    n = _get(body, "n", "int", 1)
    if not 1 <= n <= MAX_N:
        raise bad_request("n", f"n must be an integer in [1, {MAX_N}], got {n}")
    seed = _get(body, "seed", "int")
    stop_token_ids = _get(body, "stop_token_ids", "list", [])
    if not all(_is_int(t) for t in stop_token_ids):
        raise bad_request("stop_token_ids",
                          f"stop_token_ids must be a list of integers, got {stop_token_ids!r}")
    kwargs = dict(
        temperature=float(_get(body, "temperature", "num", defaults.get("temperature", 1.0))),
        top_p=float(_get(body, "top_p", "num", defaults.get("top_p", 1.0))),
        top_k=_get(body, "top_k", "int", defaults.get("top_k", 0)),
        min_p=float(_get(body, "min_p", "num", 0.0)),
        repetition_penalty=float(_get(body, "repetition_penalty", "num",
                                      defaults.get("repetition_penalty", 1.0))),
        presence_penalty=float(_get(body, "presence_penalty", "num", 0.0)),
        frequency_penalty=float(_get(body, "frequency_penalty", "num", 0.0)),
        logit_bias=_logit_bias(body),
        max_tokens=max_tokens,
        min_tokens=_get(body, "min_tokens", "int", 0),
        stop=_stop(body),
        stop_token_ids=stop_token_ids,
        ignore_eos=_get(body, "ignore_eos", "bool", False),
        include_stop_str_in_output=_get(body, "include_stop_str_in_output", "bool", False),
        skip_special_tokens=_get(body, "skip_special_tokens", "bool", True),
        logprobs=logprobs,
        num_speculative_tokens=_get(body, "num_speculative_tokens", "int"),
        cache_salt=_get(body, "cache_salt", "str"),  # vLLM's field: prefix-cache isolation
        structured_output=structured,
        prompt_logprobs=prompt_logprobs,
    )
    params = []
    for i in range(n):
        try:
            params.append(SamplingParams(n=1, seed=None if seed is None else seed + i, **kwargs))
        except ValueError as exc:
            raise from_value_error(exc) from None
    return params


def _common(body: dict) -> tuple[bool, bool, str | None]:
    stream = _get(body, "stream", "bool", False)
    options = _get(body, "stream_options", "dict")
    include_usage = False
    if options is not None:
        continuous = options.get("continuous_usage_stats")
        if continuous is not None and not isinstance(continuous, bool):
            raise bad_request("stream_options.continuous_usage_stats",
                              f"stream_options.continuous_usage_stats must be a boolean, "
                              f"got {continuous!r}")
        if not stream:
            raise bad_request("stream_options",
                              "stream_options is only allowed when stream is true")
        include_usage = options.get("include_usage") or False
        if not isinstance(include_usage, bool):
            raise bad_request("stream_options.include_usage",
                              f"stream_options.include_usage must be a boolean, "
                              f"got {include_usage!r}")
    for unsupported in ("functions",):
        if body.get(unsupported):
            raise bad_request(unsupported, f"{unsupported} is not supported by this server")
    _get(body, "model", "str")
    return stream, include_usage, _get(body, "user", "str")


def _max_tokens(body: dict, *names: str, default: int | None) -> int | None:
    for name in names:
        value = _get(body, name, "int")
        if value is not None:
            if value < 1:
                raise bad_request(name, f"{name} must be an integer >= 1, got {value}")
            return value
    return default


def _extras(gen: GenerationRequest, body: dict) -> GenerationRequest:
    """The vLLM extras every generation request may carry (priority, return_token_ids...)."""
    gen.priority = _get(body, "priority", "int", 0)
    gen.return_token_ids = _get(body, "return_token_ids", "bool", False)
    options = body.get("stream_options") or {}
    gen.continuous_usage_stats = bool(gen.stream and options.get("continuous_usage_stats"))
    return gen


def _developer_role(role: str, tokenizer) -> str:
    # NOTE: OpenAI's `developer` is the newer name of `system`; templates that don't know it
    # (Qwen2.5, SmolLM2) would drop or reject it.
    if role == "developer" and "developer" not in (getattr(tokenizer, "chat_template", None)
                                                   or ""):
        return "system"
    return role


def parse_chat(body: dict, tokenizer, defaults: dict | None = None) -> GenerationRequest:
    """Validate a /v1/chat/completions body; renders the chat template into token ids."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages", "messages must be a non-empty array of messages")
    rendered = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in CHAT_ROLES:
            raise bad_request(f"messages[{i}].role",
                              f"messages[{i}].role must be one of {list(CHAT_ROLES)}")
        entry = tools.history_message(message, i, _message_text(message.get("content"), i))
        entry["role"] = _developer_role(entry["role"], tokenizer)
        rendered.append(entry)
    stream, include_usage, user = _common(body)
    tool_config = tools.parse_tools(body)
    structured = structured_outputs.parse_structured(body)
    if tool_config is not None and tool_config.choice in ("required", "named"):
        if structured is not None:
            raise bad_request("tool_choice", f"tool_choice {tool_config.choice!r} cannot be "
                                             f"combined with response_format or "
                                             f"structured_outputs")
    if tool_config is not None and structured is None:
        structured = tools.call_grammar(tool_config, tools.uses_special_tags(tokenizer))
    logprobs_on = _get(body, "logprobs", "bool", False)
    top_logprobs = _get(body, "top_logprobs", "int")
    if top_logprobs is not None:
        if not logprobs_on:
            raise bad_request("top_logprobs", "top_logprobs requires logprobs to be true")
        if not 0 <= top_logprobs <= MAX_LOGPROBS:
            raise bad_request("top_logprobs", f"top_logprobs must be an integer in "
                                              f"[0, {MAX_LOGPROBS}], got {top_logprobs}")
    logprobs = (top_logprobs or 0) if logprobs_on else None
    max_tokens = _max_tokens(body, "max_completion_tokens", "max_tokens", default=None)
    params = _sampling_params(body, max_tokens, logprobs, structured, defaults)
    try:
        text = tokenizer.apply_chat_template(
            rendered, tools=tool_config.tools if tool_config is not None else None,
            tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # a template may raise on role order (e.g. two system messages)
        raise bad_request("messages", f"messages could not be rendered by the chat template: "
                                      f"{type(exc).__name__}: {exc}") from None
    prompt = tokenizer.encode(text, add_special_tokens=False)
    if tool_config is not None and structured is not None and structured.param != "tools":
        tool_config = None  # the output is constrained to another format: no call parsing
    return _extras(GenerationRequest("chat", body.get("model"), [prompt], params, stream,
                                     include_usage, logprobs, user=user, tools=tool_config),
                   body)


def _message_text(content, i: int) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise bad_request(f"messages[{i}].content",
                                  f"messages[{i}].content parts must be "
                                  '{"type": "text", "text": "..."}')
            parts.append(part["text"])
        return "".join(parts)
    raise bad_request(f"messages[{i}].content",
                      f"messages[{i}].content must be a string or an array of text parts")


def parse_completion(body: dict, defaults: dict | None = None) -> GenerationRequest:
    """Validate a /v1/completions body; prompts stay strings or token-id lists.

    `echo` returns the prompt before the completion (with `logprobs`, the prompt's logprobs
    too); `max_tokens: 0` with echo scores the prompt only (lm-evaluation-harness)."""
    prompts = _prompts(body.get("prompt"))
    stream, include_usage, user = _common(body)
    logprobs = _get(body, "logprobs", "int")
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise bad_request("logprobs", f"logprobs must be an integer in [0, {MAX_LOGPROBS}], "
                                      f"got {logprobs}")
    echo = _get(body, "echo", "bool", False)
    if body.get("tools"):
        raise bad_request("tools", "tools are only supported on /v1/chat/completions")
    discard = False
    if echo and body.get("max_tokens") == 0 and not isinstance(body.get("max_tokens"), bool):
        body = {**body, "max_tokens": 1}  # NOTE: one token is generated and dropped
        discard = True
    max_tokens = _max_tokens(body, "max_tokens", default=16)
    prompt_logprobs = _get(body, "prompt_logprobs", "int")
    if prompt_logprobs is not None and not 0 <= prompt_logprobs <= MAX_LOGPROBS:
        raise bad_request("prompt_logprobs", f"prompt_logprobs must be an integer in "
                                             f"[0, {MAX_LOGPROBS}], got {prompt_logprobs}")
    if echo and logprobs is not None and prompt_logprobs is None:
        prompt_logprobs = logprobs  # echo's logprobs cover the prompt tokens too
    suffix = _get(body, "suffix", "str")
    params = _sampling_params(body, max_tokens, logprobs,
                              structured_outputs.parse_structured(body), defaults,
                              prompt_logprobs)
    gen = GenerationRequest("completion", body.get("model"), prompts, params, stream,
                            include_usage, logprobs, echo=echo, user=user)
    gen.suffix = suffix
    gen.discard_output = discard
    return _extras(gen, body)


def _prompts(prompt) -> list[str | list[int]]:
    """A string, a list of strings, a list of token ids, or a list of lists of token ids."""
    msg = ("prompt must be a non-empty string, a list of strings, a list of token ids "
           "or a list of lists of token ids")
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    elif (isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt)
          and all(_is_int(t) for p in prompt for t in p)):
        prompts = [list(p) for p in prompt]
    else:
        raise bad_request("prompt", msg)
    if len(prompts) > MAX_PROMPTS:
        raise bad_request("prompt", f"prompt must hold at most {MAX_PROMPTS} prompts, "
                                    f"got {len(prompts)}")
    for p in prompts:
        if len(p) == 0:
            raise bad_request("prompt", "prompt must not be empty")
        if not isinstance(p, str) and min(p) < 0:
            raise bad_request("prompt", f"prompt token ids must be >= 0, got {min(p)}")
    return prompts
