"""Response assembly: merged choice deltas -> OpenAI bodies, SSE chunks, usage and logprobs.

ResponseState accumulates one HTTP request's choices (text, token ids, logprobs, finish) from the
collector's deltas. Non-streaming, it builds the final `chat.completion` / `text_completion`
body; streaming, each absorbed delta becomes one chunk per choice that advanced, so several
verified tokens may share a frame.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from server.protocol import GenerationRequest, dumps
from server.tools import ToolCallStream, parse_calls

if TYPE_CHECKING:
    from server.metrics import ServerMetrics


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> dict:
    out = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
           "total_tokens": prompt_tokens + completion_tokens}
    if cached_tokens:
        out["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return out


class LogprobFormatter:
    """Turns engine logprobs [(chosen_logprob, [(token_id, logprob), ...])] into OpenAI shapes."""

    __slots__ = ("tokenizer", "_cache")

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def token(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id])
            if len(self._cache) < 65536:
                self._cache[token_id] = text
        return text

    def chat(self, token_ids: list[int], logprobs: list) -> dict:
        content = []
        for token_id, (chosen, top) in zip(token_ids, logprobs):
            text = self.token(token_id)
            content.append({
                "token": text, "logprob": _finite_logprob(chosen),
                "bytes": list(text.encode("utf-8")),
                "top_logprobs": [{"token": (t := self.token(tid)),
                                  "logprob": _finite_logprob(lp),
                                  "bytes": list(t.encode("utf-8"))} for tid, lp in top]})
        return {"content": content, "refusal": None}

    def completion(self, token_ids: list[int], logprobs: list, text_offset: int) -> dict:
        tokens, token_logprobs, tops, offsets = [], [], [], []
        for token_id, (chosen, top) in zip(token_ids, logprobs):
            text = self.token(token_id)
            tokens.append(text)
            token_logprobs.append(_finite_logprob(chosen))
            entry = {self.token(tid): _finite_logprob(lp) for tid, lp in top}
            entry.setdefault(text, _finite_logprob(chosen))
            tops.append(entry)
            offsets.append(text_offset)
            text_offset += len(text)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops,
                "text_offset": offsets}


def _finite_logprob(x: float) -> float:
    # NOTE: JSON has no -inf; OpenAI clients expect a number. -9999.0 is what vLLM sends.
    return float(x) if math.isfinite(x) else -9999.0


def frame(obj) -> bytes:
    return b"data: " + dumps(obj) + b"\n\n"


class ResponseState:
    """Per-request accumulation of choices: cumulative text, tokens, logprobs, finish."""

    def __init__(self, gen: GenerationRequest, num_choices: int, formatter, model_name: str):
        self.gen = gen
        self.num_choices = num_choices
        self.formatter = formatter
        self.model_name = model_name
        self.text = [""] * num_choices
        self.token_ids: list[list[int]] = [[] for _ in range(num_choices)]
        self.logprobs: list[list] = [[] for _ in range(num_choices)]
        self.finish_reason: list[str | None] = [None] * num_choices
        self.stop_reason: list = [None] * num_choices
        self.prompt_tokens: list[int] = [0] * num_choices
        self.metrics: list = [None] * num_choices
        self.num_finished = 0
        self.disconnected = False
        self.parses_calls = gen.kind == "chat" and gen.tools is not None \
            and gen.tools.parses_calls
        self.tool_streams = [ToolCallStream() for _ in range(num_choices)] \
            if self.parses_calls and gen.stream else None

    @property
    def all_finished(self) -> bool:
        return self.num_finished == self.num_choices

    def _base(self, obj: str) -> dict:
        return {"id": self.gen.response_id, "object": obj, "created": self.gen.created,
                "model": self.model_name}

    def role_chunk(self, index: int) -> dict:
        chunk = self._base("chat.completion.chunk")
        chunk["choices"] = [{"index": index, "delta": {"role": "assistant", "content": ""},
                             "logprobs": None, "finish_reason": None}]
        return chunk

    def absorb(self, deltas: list, metrics: ServerMetrics) -> list[dict]:
        """Merge deltas into the state; return the stream chunks they make (one per choice)."""
        chunks = []
        chat = self.gen.kind == "chat"
        for i, delta in enumerate(deltas):
            if delta is None:
                continue
            text_offset = len(self.text[i])
            self.text[i] += delta.text
            self.token_ids[i].extend(delta.token_ids)
            if delta.logprobs:
                self.logprobs[i].extend(delta.logprobs)
            if delta.num_prompt_tokens is not None:
                self.prompt_tokens[i] = delta.num_prompt_tokens
            if delta.itl:
                metrics.observe_itl(delta.itl)
            if delta.finished:
                self.finish_reason[i] = delta.finish_reason
                self.stop_reason[i] = delta.stop_reason
                self.metrics[i] = delta.metrics
                self.num_finished += 1
                metrics.observe_finished(delta.finish_reason, delta.metrics)
            if not self.gen.stream:
                continue
            has_logprobs = self.gen.logprobs is not None and delta.token_ids
            if not (delta.text or delta.finished or has_logprobs):
                continue
            logprobs = None
            if has_logprobs and delta.logprobs:
                logprobs = (self.formatter.chat(delta.token_ids, delta.logprobs) if chat else
                            self.formatter.completion(delta.token_ids, delta.logprobs,
                                                      text_offset))
            chunk = self._base("chat.completion.chunk" if chat else "text_completion")
            choice = {"index": i}
            finish_reason = delta.finish_reason if delta.finished else None
            if self.tool_streams is not None:
                stream = self.tool_streams[i]
                content, calls = stream.feed(delta.text, delta.finished)
                choice["delta"] = {"content": content} if content else {}
                if calls:
                    choice["delta"]["tool_calls"] = calls
                if not (choice["delta"] or delta.finished or logprobs):
                    continue
                if finish_reason == "stop" and stream.num_calls:
                    finish_reason = "tool_calls"
            elif chat:
                choice["delta"] = {"content": delta.text} if delta.text else {}
            else:
                choice["text"] = delta.text
            choice["logprobs"] = logprobs
            choice["finish_reason"] = finish_reason
            if delta.finished:
                choice["stop_reason"] = delta.stop_reason
            chunk["choices"] = [choice]
            chunks.append(chunk)
        return chunks

    def usage(self) -> dict:
        n = self.gen.n
        prompt_tokens = sum(self.prompt_tokens[p * n] for p in range(len(self.gen.prompts)))
        completion_tokens = sum(len(ids) for ids in self.token_ids)
        cached = sum((getattr(self.metrics[p * n], "num_cached_tokens", 0) or 0)
                     for p in range(len(self.gen.prompts)) if self.metrics[p * n] is not None)
        return usage(prompt_tokens, completion_tokens, cached)

    def usage_chunk(self) -> dict:
        chunk = self._base("chat.completion.chunk" if self.gen.kind == "chat"
                           else "text_completion")
        chunk["choices"] = []
        chunk["usage"] = self.usage()
        return chunk

    def full_response(self) -> dict:
        chat = self.gen.kind == "chat"
        body = self._base("chat.completion" if chat else "text_completion")
        choices = []
        for i in range(self.num_choices):
            logprobs = None
            if self.gen.logprobs is not None:
                logprobs = (self.formatter.chat(self.token_ids[i], self.logprobs[i]) if chat
                            else self.formatter.completion(self.token_ids[i], self.logprobs[i],
                                                           0))
            choice = {"index": i}
            finish_reason = self.finish_reason[i]
            if chat:
                choice["message"] = {"role": "assistant", "content": self.text[i],
                                     "refusal": None}
                if self.parses_calls:
                    content, calls = parse_calls(self.text[i])
                    if calls:  # NOTE: omitted when empty ([] reads as true in JavaScript)
                        choice["message"]["content"] = content
                        choice["message"]["tool_calls"] = calls
                        if finish_reason == "stop":
                            finish_reason = "tool_calls"
            else:
                choice["text"] = self.text[i]
            choice["logprobs"] = logprobs
            choice["finish_reason"] = finish_reason
            choice["stop_reason"] = self.stop_reason[i]
            choices.append(choice)
        body["choices"] = choices
        body["usage"] = self.usage()
        return body

    def log_fields(self, gen: GenerationRequest, num_aborted: int) -> dict:
        usage = self.usage()
        m = self.metrics[0]
        fields = {"request_id": gen.response_id, "kind": gen.kind, "n": self.num_choices,
                  "stream": gen.stream, "prompt_tokens": usage["prompt_tokens"],
                  "completion_tokens": usage["completion_tokens"],
                  "finish_reason": [r or "abort" for r in self.finish_reason],
                  "disconnected": self.disconnected, "aborted_choices": num_aborted}
        if gen.user:
            fields["user"] = gen.user
        if m is not None:
            if m.first_token_time is not None:
                fields["ttft_s"] = round(m.first_token_time - m.arrival_time, 6)
                num_gen = m.num_generation_tokens
                if m.finished_time is not None and num_gen > 1:
                    fields["tpot_s"] = round((m.finished_time - m.first_token_time)
                                             / (num_gen - 1), 6)
            if m.finished_time is not None:
                fields["e2e_s"] = round(m.finished_time - m.arrival_time, 6)
            fields["acceptance_length"] = m.acceptance_length
            fields["num_cached_tokens"] = m.num_cached_tokens
        return fields
