"""Tool calling: `tools` / `tool_choice` validation, the call grammar, and output parsing.

Format (Hermes, what Qwen2.5's chat template teaches): each call is
    <tool_call>\\n{"name": "<function>", "arguments": {...}}\\n</tool_call>
and parallel calls are separated by a newline. Where the tokenizer has `<tool_call>` and
`</tool_call>` as added tokens (Qwen2.5), the grammar names those tokens; elsewhere it spells
the tags as text.

- tool_choice "required" / a named function: constrained from the first token to one call
  (one or more with parallel_tool_calls) of the offered functions, each `arguments` matching
  that function's `parameters` JSON Schema.
- "auto": free text, until the model opens a call; from the tag on, the same constraint.
- "none": tools are shown to the chat template, the output is plain text.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from specdec.core.request import StructuredOutput
from specdec.sample.grammar import JSON_DEFAULTS

OPEN_TAG = "<tool_call>"
CLOSE_TAG = "</tool_call>"


def _bad(param: str, message: str):
    from server.protocol import bad_request  # NOTE: protocol imports this module
    return bad_request(param, message)


@dataclass(slots=True)
class ToolConfig:
    """The validated `tools`, `tool_choice` and `parallel_tool_calls` of one chat request."""

    tools: list[dict]                 # OpenAI shape, for the chat template
    parameters: dict[str, dict]       # function name -> its parameters JSON Schema
    choice: str = "auto"              # "none" | "auto" | "required" | "named"
    named: str | None = None
    parallel: bool = True

    @property
    def parses_calls(self) -> bool:
        return self.choice != "none"


def parse_tools(body: dict) -> ToolConfig | None:
    """Validate tools / tool_choice / parallel_tool_calls; 400 naming the parameter."""
    tools = body.get("tools")
    choice = body.get("tool_choice")
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise _bad("parallel_tool_calls", f"parallel_tool_calls must be a boolean, got {parallel!r}")
    if tools is None or tools == []:
        if choice not in (None, "none"):
            raise _bad("tool_choice", "tool_choice requires a non-empty tools array")
        return None
    if not isinstance(tools, list):
        raise _bad("tools", "tools must be an array of {\"type\": \"function\", \"function\": ...}")
    parameters: dict[str, dict] = {}
    clean = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise _bad(f"{where}.type", f'{where}.type must be "function"')
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise _bad(f"{where}.function", f"{where}.function must be an object")
        name = fn.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", name):
            raise _bad(f"{where}.function.name", f"{where}.function.name must be 1-64 letters, "
                                                 f"digits, '_', '.' or '-', got {name!r}")
        if name in parameters:
            raise _bad(f"{where}.function.name", f"{where}.function.name {name!r} is repeated")
        params = fn.get("parameters")
        if params is None:
            params = {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise _bad(f"{where}.function.parameters",
                       f"{where}.function.parameters must be a JSON Schema object")
        parameters[name] = params
        clean.append({"type": "function", "function": {
            k: v for k, v in fn.items() if k in ("name", "description", "parameters", "strict")}})
    named = None
    if choice is None:
        choice = "auto"
    elif isinstance(choice, dict):
        fn = choice.get("function") if choice.get("type") == "function" else None
        named = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(named, str):
            raise _bad("tool_choice", 'tool_choice must be "none", "auto", "required" or '
                                      '{"type": "function", "function": {"name": ...}}')
        if named not in parameters:
            raise _bad("tool_choice", f"tool_choice names function {named!r}, which is not in "
                                      f"tools ({sorted(parameters)})")
        choice = "named"
    elif choice not in ("none", "auto", "required"):
        raise _bad("tool_choice", f'tool_choice must be "none", "auto", "required" or a named '
                                  f"function, got {choice!r}")
    return ToolConfig(clean, parameters, choice, named, True if parallel is None else parallel)


def history_message(message: dict, i: int, content: str) -> dict:
    """One chat message for the template: assistant tool_calls (arguments parsed back into
    objects, as the templates expect) and a tool message's tool_call_id and name are kept."""
    role = message["role"]
    out = {"role": role, "content": content}
    calls = message.get("tool_calls")
    if role == "assistant" and calls:
        if not isinstance(calls, list):
            raise _bad(f"messages[{i}].tool_calls", f"messages[{i}].tool_calls must be an array")
        out["tool_calls"] = []
        for j, call in enumerate(calls):
            where = f"messages[{i}].tool_calls[{j}]"
            fn = call.get("function") if isinstance(call, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise _bad(where, f"{where} must be {{\"type\": \"function\", \"id\": ..., "
                                  f"\"function\": {{\"name\": ..., \"arguments\": ...}}}}")
            args = fn.get("arguments", "{}")
            if isinstance(args, str):
                try:
                    args = json.loads(args) if args.strip() else {}
                except ValueError:
                    raise _bad(f"{where}.function.arguments",
                               f"{where}.function.arguments must be a JSON object string") from None
            out["tool_calls"].append({"id": call.get("id"), "type": "function",
                                      "function": {"name": fn["name"], "arguments": args}})
    if role == "tool":
        for key in ("tool_call_id", "name"):
            if isinstance(message.get(key), str):
                out[key] = message[key]
    return out


def uses_special_tags(tokenizer) -> bool:
    """True when <tool_call> and </tool_call> are added tokens (the grammar must name them)."""
    added = tokenizer.get_added_vocab() if hasattr(tokenizer, "get_added_vocab") else {}
    return OPEN_TAG in added and CLOSE_TAG in added


def call_grammar(config: ToolConfig, special_tags: bool) -> StructuredOutput | None:
    """The Lark grammar (llguidance dialect) for config's calls; None for "none"."""
    if config.choice == "none":
        return None
    names = [config.named] if config.choice == "named" else list(config.parameters)
    bodies = []
    for name in names:
        schema = {"type": "object",
                  "properties": {"name": {"const": name}, "arguments": config.parameters[name]},
                  "required": ["name", "arguments"], "additionalProperties": False,
                  "x-guidance": JSON_DEFAULTS}
        bodies.append(f"%json {json.dumps(schema)}")
    if special_tags:
        open_tag, close_tag = OPEN_TAG, CLOSE_TAG
    else:
        open_tag, close_tag = json.dumps(OPEN_TAG), json.dumps(CLOSE_TAG)
    more = '("\\n" call)*' if config.parallel else ""
    lines = ["%llguidance {}"]
    if config.choice == "auto":
        lines.append(f"start: TEXT | TEXT call {more}" if special_tags else
                     f"start: TEXT | lead {more}")
        if not special_tags:  # free text ends lazily at the first opening tag
            lines.append(f'lead: trig "\\n" body "\\n" {close_tag}')
            lines.append(f"trig[lazy]: TEXT {open_tag}")
        lines.append("TEXT: /(.|\\n)*/")
    else:
        lines.append(f"start: call {more}")
    lines.append(f'call: {open_tag} "\\n" body "\\n" {close_tag}')
    lines.append("body: " + " | ".join(f"fn_{i}" for i in range(len(bodies))))
    lines += [f"fn_{i}: {b}" for i, b in enumerate(bodies)]
    return StructuredOutput("grammar", "\n".join(lines) + "\n", param="tools")


# ---------------------------------------------------------------------------------- parsing

_NAME = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')


def new_call_id() -> str:
    return "chatcmpl-tool-" + uuid.uuid4().hex[:24]


def _split_calls(text: str) -> tuple[str, list[str], bool]:
    """(content before the first call, call bodies, whether the last body is closed)."""
    start = text.find(OPEN_TAG)
    if start < 0:
        return text, [], True
    content, rest, bodies, closed = text[:start], text[start:], [], True
    while rest.startswith(OPEN_TAG) or rest.lstrip().startswith(OPEN_TAG):
        rest = rest.lstrip()[len(OPEN_TAG):]
        end = rest.find(CLOSE_TAG)
        if end < 0:
            bodies.append(rest)
            closed = False
            break
        bodies.append(rest[:end])
        rest = rest[end + len(CLOSE_TAG):]
    return content, bodies, closed


def _parse_body(body: str) -> tuple[str, str] | None:
    """(name, arguments JSON text) of a complete call body, or None if it is not one."""
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not (isinstance(obj, dict) and isinstance(obj.get("name"), str) and "arguments" in obj):
        return None
    match = _NAME.match(body)
    raw = body.strip()
    if match is not None and raw.endswith("}"):
        args = body[match.end():body.rstrip().rfind("}")]
        try:
            if json.loads(args) == obj["arguments"]:
                return obj["name"], args
        except ValueError:
            pass
    return obj["name"], json.dumps(obj["arguments"], ensure_ascii=False)


def parse_calls(text: str) -> tuple[str | None, list[dict]]:
    """Final output -> (content or None, tool_calls in OpenAI shape, possibly empty)."""
    content, bodies, closed = _split_calls(text)
    calls = []
    for j, body in enumerate(bodies):
        if not closed and j == len(bodies) - 1:
            break  # a call cut short (max_tokens): dropped, the complete ones are kept
        parsed = _parse_body(body)
        if parsed is None:
            return text, []  # not a well-formed call: plain text
        calls.append({"id": new_call_id(), "type": "function",
                      "function": {"name": parsed[0], "arguments": parsed[1]}})
    if not calls:
        return text, []
    content = content.strip()
    return (content or None), calls


@dataclass(slots=True)
class ToolCallStream:
    """Per-choice streaming parser: cumulative text in, content and delta.tool_calls out.

    Content is released up to the first opening tag (holding back a partial tag). A call's
    header (index, id, type, function.name) is sent once its name is complete; then pieces of
    `arguments`, always a prefix of the final arguments text, so the client's concatenation
    equals the non-streamed value."""

    text: str = ""
    content_sent: int = 0
    ids: list[str] = field(default_factory=list)
    args_sent: list[int] = field(default_factory=list)

    @property
    def num_calls(self) -> int:
        return len(self.ids)

    def feed(self, delta_text: str, finished: bool) -> tuple[str, list[dict]]:
        self.text += delta_text
        content, bodies, closed = _split_calls(self.text)
        content_delta = ""
        if not bodies:
            end = len(content)
            if not finished:  # hold back what may be the start of an opening tag
                for n in range(min(len(OPEN_TAG) - 1, len(content)), 0, -1):
                    if OPEN_TAG.startswith(content[-n:]):
                        end -= n
                        break
            content_delta = content[self.content_sent:end]
            self.content_sent = max(self.content_sent, end)
            return content_delta, []
        if self.content_sent < len(content.rstrip()):
            content_delta = content.rstrip()[self.content_sent:]
            self.content_sent = len(content.rstrip())
        out = []
        for j, body in enumerate(bodies):
            complete = closed or j < len(bodies) - 1
            match = _NAME.match(body)
            if match is None:
                continue
            if j >= len(self.ids):
                self.ids.append(new_call_id())
                self.args_sent.append(0)
                out.append({"index": j, "id": self.ids[j], "type": "function",
                            "function": {"name": json.loads(f'"{match.group(1)}"'),
                                         "arguments": ""}})
            if complete:
                parsed = _parse_body(body)
                args = parsed[1] if parsed is not None else ""
            else:
                args = body[match.end():]
                for n in range(min(len(CLOSE_TAG) - 1, len(args)), 0, -1):
                    if CLOSE_TAG.startswith(args[-n:]):  # a closing tag on its way
                        args = args[:-n]
                        break
                args = args.rstrip()
                if args.endswith("}"):
                    args = args[:-1]  # may be the closing brace of the call object
            if len(args) > self.args_sent[j]:
                piece = args[self.args_sent[j]:]
                self.args_sent[j] = len(args)
                entry = {"index": j, "function": {"arguments": piece}}
                if out and out[-1]["index"] == j and "id" in out[-1]:
                    out[-1]["function"]["arguments"] += piece
                else:
                    out.append(entry)
        return content_delta, out
