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


def spec_decode_stats(metrics: list) -> dict:
    """vLLM's `spec_decode_stats` shape, summed over a request's finished choices."""
    num_drafts = sum(m.num_drafts for m in metrics)
    num_draft_tokens = sum(m.num_draft_tokens for m in metrics)
    num_accepted = sum(m.num_accepted_tokens for m in metrics)
    return {"num_drafts": num_drafts, "num_draft_tokens": num_draft_tokens,
            "num_accepted_tokens": num_accepted,
            "acceptance_rate": num_accepted / num_draft_tokens if num_draft_tokens else 0.0,
            "mean_acceptance_length": 1.0 + num_accepted / num_drafts if num_drafts else 1.0}


def timings(m) -> dict:
    """Per-request timings of one choice (seconds, and llama.cpp's millisecond names)."""
    out: dict = {}
    if m.first_scheduled_time is not None:
        out["queue_s"] = m.first_scheduled_time - m.arrival_time
    if m.first_token_time is not None:
        out["ttft_s"] = m.first_token_time - m.arrival_time
        out["prompt_n"] = m.num_prompt_tokens - m.num_cached_tokens
        out["cache_n"] = m.num_cached_tokens
        out["prompt_ms"] = 1000.0 * (m.first_token_time - (m.first_scheduled_time
                                                           or m.arrival_time))
        if m.finished_time is not None:
            decode_s = m.finished_time - m.first_token_time
            out["predicted_n"] = m.num_generation_tokens
            out["predicted_ms"] = 1000.0 * decode_s
            if decode_s > 0 and m.num_generation_tokens > 1:
                out["predicted_per_second"] = (m.num_generation_tokens - 1) / decode_s
    if m.finished_time is not None:
        out["e2e_s"] = m.finished_time - m.arrival_time
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

    def prompt(self, token_ids: list[int], prompt_logprobs: list | None) -> dict:
        """echo with logprobs: the prompt's tokens; the first has no logprob (null)."""
        tokens, token_logprobs, tops, offsets = [], [], [], []
        text_offset = 0
        for j, token_id in enumerate(token_ids):
            text = self.token(token_id)
            entry = prompt_logprobs[j] if prompt_logprobs and j < len(prompt_logprobs) else None
            tokens.append(text)
            offsets.append(text_offset)
            text_offset += len(text)
            if entry is None:
                token_logprobs.append(None)
                tops.append(None)
                continue
            chosen, top = entry
            token_logprobs.append(_finite_logprob(chosen))
            tops.append({self.token(tid): _finite_logprob(lp) for tid, lp in top}
                        | {text: _finite_logprob(chosen)})
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
        self.prompt_token_ids: list = [None] * num_choices
        self.prompt_logprobs: list = [None] * num_choices
        self.num_finished = 0
        self.disconnected = False
        self.parses_calls = gen.kind == "chat" and gen.tools is not None \
            and gen.tools.parses_calls
        self.tool_streams = [ToolCallStream() for _ in range(num_choices)] \
            if self.parses_calls and gen.stream else None

    def _echo_text(self, i: int) -> str:
        prompt = self.gen.prompts[i // self.gen.n]
        if isinstance(prompt, str):
            return prompt
        return self.formatter.tokenizer.decode(prompt)

    def _echo_logprobs(self, i: int) -> dict:
        ids = self.prompt_token_ids[i] or []
        return self.formatter.prompt(ids, self.prompt_logprobs[i])

    @staticmethod
    def _join_logprobs(head: dict, tail: dict | None) -> dict:
        if tail is None:
            return head
        shift = (head["text_offset"][-1] + len(head["tokens"][-1])) if head["tokens"] else 0
        return {"tokens": head["tokens"] + tail["tokens"],
                "token_logprobs": head["token_logprobs"] + tail["token_logprobs"],
                "top_logprobs": head["top_logprobs"] + tail["top_logprobs"],
                "text_offset": head["text_offset"] + [o + shift for o in tail["text_offset"]]}

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
            first = delta.num_prompt_tokens is not None
            if first:
                self.prompt_tokens[i] = delta.num_prompt_tokens
                self.prompt_token_ids[i] = delta.prompt_token_ids
                self.prompt_logprobs[i] = delta.prompt_logprobs
            if self.gen.discard_output:  # echo with max_tokens 0: nothing generated is shown
                delta.text, delta.token_ids, delta.logprobs = "", [], None
            text_offset = len(self.text[i])
            self.text[i] += delta.text
            self.token_ids[i].extend(delta.token_ids)
            if delta.logprobs:
                self.logprobs[i].extend(delta.logprobs)
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
            echo = self.gen.echo and first
            ids = self.gen.return_token_ids and delta.token_ids
            if not (delta.text or delta.finished or has_logprobs or echo or ids):
                continue
            logprobs = None
            if has_logprobs and delta.logprobs:
                shift = len(self._echo_text(i)) if self.gen.echo else 0
                logprobs = (self.formatter.chat(delta.token_ids, delta.logprobs) if chat else
                            self.formatter.completion(delta.token_ids, delta.logprobs,
                                                      text_offset + shift))
            if echo and self.gen.logprobs is not None:
                logprobs = self._join_logprobs(self._echo_logprobs(i), logprobs)
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
                choice["text"] = (self._echo_text(i) if echo else "") + delta.text
            if self.gen.return_token_ids:
                choice["token_ids"] = list(delta.token_ids)
                if first:
                    chunk["prompt_token_ids"] = self.prompt_token_ids[i]
            choice["logprobs"] = logprobs
            choice["finish_reason"] = finish_reason
            if delta.finished:
                choice["stop_reason"] = delta.stop_reason
            chunk["choices"] = [choice]
            if self.gen.continuous_usage_stats:
                chunk["usage"] = self.usage()
            chunks.append(chunk)
        return chunks

    def usage(self) -> dict:
        n = self.gen.n
        prompt_tokens = sum(self.prompt_tokens[p * n] for p in range(len(self.gen.prompts)))
        completion_tokens = sum(len(ids) for ids in self.token_ids)
        cached = sum((getattr(self.metrics[p * n], "num_cached_tokens", 0) or 0)
                     for p in range(len(self.gen.prompts)) if self.metrics[p * n] is not None)
        out = usage(prompt_tokens, completion_tokens, cached)
        finished = [m for m in self.metrics if m is not None]
        if finished and hasattr(finished[0], "num_drafts"):
            out["spec_decode_stats"] = spec_decode_stats(finished)
            out["timings"] = [timings(m) for m in self.metrics if m is not None]
        return out

    def _vllm_prompt_logprobs(self, i: int) -> list:
        """vLLM's `prompt_logprobs`: per prompt token None or {token_id: {logprob, ...}}."""
        out = []
        for j, entry in enumerate(self.prompt_logprobs[i]):
            if entry is None:
                out.append(None)
                continue
            chosen, top = entry
            token_id = self.prompt_token_ids[i][j]
            d = {str(tid): {"logprob": _finite_logprob(lp), "rank": r + 1,
                            "decoded_token": self.formatter.token(tid)}
                 for r, (tid, lp) in enumerate(top)}
            d.setdefault(str(token_id), {"logprob": _finite_logprob(chosen), "rank": None,
                                         "decoded_token": self.formatter.token(token_id)})
            out.append(d)
        return out

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
            elif self.gen.echo:
                choice["text"] = self._echo_text(i) + self.text[i]
                if logprobs is not None:
                    shifted = self.formatter.completion(
                        self.token_ids[i], self.logprobs[i], 0) if self.token_ids[i] else None
                    logprobs = self._join_logprobs(self._echo_logprobs(i), shifted)
            else:
                choice["text"] = self.text[i]
            if self.gen.return_token_ids:
                choice["token_ids"] = list(self.token_ids[i])
                choice["prompt_token_ids"] = self.prompt_token_ids[i]
            if self.prompt_logprobs[i] is not None and not self.gen.echo:
                choice["prompt_logprobs"] = self._vllm_prompt_logprobs(i)
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
