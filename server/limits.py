"""Per-request work limits, checked on the raw JSON body before any parsing or tokenization.

Each limit bounds what one request can make the server do for everyone else: stop strings are
scanned every step, logit_bias and stop_token_ids are applied to every row, a prompt is tokenized
before its length in tokens is known, and n x prompts fans out into engine requests. Past a limit
the request gets a 400 naming the parameter, the value and the limit (the `ServerConfig` key).
Type errors are left to `server.protocol`, which reports them with the same error shape.

`encode_prompts` is the completions tokenizer; the server runs it (and the chat template) in a
thread pool, never on the event loop or the engine thread.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.protocol import APIError, bad_request

PROMPT_CHARS_PER_TOKEN = 32  # the default max_prompt_chars is this x max_model_len


@dataclass(frozen=True, slots=True)
class RequestLimits:
    max_stop_strings: int
    max_stop_string_chars: int
    max_logit_bias_entries: int
    max_stop_token_ids: int
    max_prompt_chars: int
    max_choices_per_request: int
    capacity: int  # max_num_seqs + max_queued_requests: choices the server ever holds at once

    @classmethod
    def from_config(cls, config, max_model_len: int) -> "RequestLimits":
        server = config.server
        return cls(
            max_stop_strings=server.max_stop_strings,
            max_stop_string_chars=server.max_stop_string_chars,
            max_logit_bias_entries=server.max_logit_bias_entries,
            max_stop_token_ids=server.max_stop_token_ids,
            max_prompt_chars=server.max_prompt_chars or PROMPT_CHARS_PER_TOKEN * max_model_len,
            max_choices_per_request=server.max_choices_per_request,
            capacity=config.scheduler.max_num_seqs + server.max_queued_requests)

    # ------------------------------------------------------------------ raw-body checks
    def check_body(self, body: dict, kind: str) -> None:
        """Raise a 400 APIError when a field of a chat/completions body is past its limit."""
        self._check_stop(body.get("stop"))
        bias = body.get("logit_bias")
        if isinstance(bias, dict) and len(bias) > self.max_logit_bias_entries:
            raise _over("logit_bias", f"{len(bias)} entries", self.max_logit_bias_entries,
                        "max_logit_bias_entries")
        ids = body.get("stop_token_ids")
        if isinstance(ids, list) and len(ids) > self.max_stop_token_ids:
            raise _over("stop_token_ids", f"{len(ids)} entries", self.max_stop_token_ids,
                        "max_stop_token_ids")
        if kind == "chat":
            self._check_messages(body.get("messages"))
            num_prompts = 1
        else:
            num_prompts = self._check_prompt(body.get("prompt"))
        n = body.get("n")
        n = n if isinstance(n, int) and not isinstance(n, bool) and n >= 1 else 1
        if n * num_prompts > self.max_choices_per_request:
            raise bad_request("n", f"n x prompts = {n} x {num_prompts} = {n * num_prompts} "
                                   f"choices; the limit is {self.max_choices_per_request} "
                                   f"(server.max_choices_per_request)")

    def check_infill(self, body: dict) -> None:
        """llama.cpp's /infill: each text field, and all of them together, within the prompt
        limit (they become one prompt), before the FIM template tokenizes them."""
        fields = [(name, body.get(name)) for name in ("input_prefix", "input_suffix", "prompt")]
        extra = body.get("input_extra")
        if isinstance(extra, list):
            fields += [(f"input_extra[{i}].text", c.get("text")) for i, c in enumerate(extra)
                       if isinstance(c, dict)]
        total = 0
        for name, text in fields:
            if not isinstance(text, str):
                continue  # type errors are fim.parse_infill's
            if len(text) > self.max_prompt_chars:
                raise _over(name, f"{len(text)} characters", self.max_prompt_chars,
                            "max_prompt_chars")
            total += len(text)
        if total > self.max_prompt_chars:
            raise _over("input_prefix + input_suffix + prompt + input_extra",
                        f"{total} characters", self.max_prompt_chars, "max_prompt_chars",
                        param="input_prefix")

    def check_admissible(self, num_prompts: int, n: int) -> None:
        """A request larger than the server's whole capacity can never run: 400, not 503."""
        num_choices = num_prompts * n
        if num_choices > self.capacity:
            raise bad_request("n", f"n x prompts = {n} x {num_prompts} = {num_choices} choices "
                                   f"can never be admitted: the server holds at most "
                                   f"{self.capacity} (scheduler.max_num_seqs + "
                                   f"server.max_queued_requests)")

    def _check_stop(self, stop) -> None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list):
            return
        if len(stop) > self.max_stop_strings:
            raise _over("stop", f"{len(stop)} strings", self.max_stop_strings,
                        "max_stop_strings")
        for i, s in enumerate(stop):
            if isinstance(s, str) and len(s) > self.max_stop_string_chars:
                raise _over(f"stop[{i}]", f"{len(s)} characters", self.max_stop_string_chars,
                            "max_stop_string_chars", param="stop")

    def _check_prompt(self, prompt) -> int:
        """Check each string prompt's length; return the number of prompts (1 if malformed)."""
        if isinstance(prompt, str):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            prompts = prompt
        else:
            return 1
        for i, p in enumerate(prompts):
            if isinstance(p, str) and len(p) > self.max_prompt_chars:
                name = "prompt" if isinstance(prompt, str) else f"prompt[{i}]"
                raise _over(name, f"{len(p)} characters", self.max_prompt_chars,
                            "max_prompt_chars", param="prompt")
        return len(prompts)

    def _check_messages(self, messages) -> None:
        if not isinstance(messages, list):
            return
        total = 0
        for message in messages:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, str):
                total += len(content)
            elif isinstance(content, list):
                total += sum(len(part["text"]) for part in content
                             if isinstance(part, dict) and isinstance(part.get("text"), str))
        if total > self.max_prompt_chars:
            raise _over("messages", f"{total} characters of content", self.max_prompt_chars,
                        "max_prompt_chars")


def _over(name: str, got: str, limit: int, key: str, param: str | None = None) -> APIError:
    return bad_request(param or name, f"{name} has {got}; the limit is {limit} (server.{key})")


def encode_prompts(tokenizer, prompts: list) -> list[list[int]]:
    """Tokenize string prompts as `Engine.add_request` would; id lists pass through.

    `encode(text)` is `tokenizer(text).input_ids` for Hugging Face tokenizers (special tokens
    added); it is the method the tests can wrap to observe where tokenization runs.
    """
    return [tokenizer.encode(p) if isinstance(p, str) else p for p in prompts]
