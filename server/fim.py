"""Fill-in-the-middle: the model's FIM prompt from its special tokens; `suffix` and `/infill`.

Editors ask for the text between the cursor's prefix and suffix. Code models learn it as
prefix-suffix-middle (PSM): `<prefix-token> prefix <suffix-token> suffix <middle-token>`, and the
model writes the middle, then an end token. The token texts differ by family:

| style     | prefix           | suffix           | middle           | repo context               |
|-----------|------------------|------------------|------------------|----------------------------|
| qwen      | <|fim_prefix|>   | <|fim_suffix|>   | <|fim_middle|>   | <|repo_name|>, <|file_sep|> |
| starcoder | <fim_prefix>     | <fim_suffix>     | <fim_middle>     | <repo_name>, <file_sep>     |
| deepseek  | <｜fim▁begin｜>   | <｜fim▁hole｜>    | <｜fim▁end｜>     | -                          |
| codellama | ▁<PRE>           | ▁<SUF>           | ▁<MID>           | -                          |

`model.fim_style = "auto"` picks the first style whose three tokens are all in the vocabulary;
a model without them answers `suffix` / `/infill` with a 400 naming the parameter.

Repo-level context (llama.cpp's `input_extra`, Qwen2.5-Coder's format) goes first:
`<repo_name>NAME\n` then `<file_sep>FILENAME\nTEXT` per chunk, then `<file_sep>FILENAME\n` for
the current file, then the PSM prompt. Without a file separator token the chunks are joined
with a plain-text separator. When the prompt is too long for max_model_len, the context
chunks go first, then the prefix keeps its last 3/4 and the suffix its first 1/4 of what is
left (llama.cpp's split); `truncated` says so.

User text is tokenized with special tokens split into plain text, so a file that contains
`<|fim_middle|>` cannot inject structure.

`/infill` speaks llama.cpp's shapes (llama.vscode, llama.vim, minuet): `input_prefix`,
`input_suffix`, `input_extra` [{filename, text}], `prompt` (appended to the prefix: the
current line up to the cursor), `n_predict`, `stream`; the reply is `{content, stop,
stop_type, tokens_predicted, tokens_evaluated, tokens_cached, timings, ...}`, streamed as
`data: {...}` frames ending with a `"stop": true` frame (no `[DONE]`, like llama.cpp).
"""

from __future__ import annotations

from dataclasses import dataclass

from server import protocol
from server.protocol import GenerationRequest, bad_request

# style -> (prefix, suffix, middle, repo_name, file_sep, end tokens that finish a middle)
STYLES: dict[str, tuple[str, str, str, str | None, str | None, tuple[str, ...]]] = {
    "qwen": ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|repo_name|>",
             "<|file_sep|>", ("<|endoftext|>", "<|file_sep|>")),
    "starcoder": ("<fim_prefix>", "<fim_suffix>", "<fim_middle>", "<repo_name>", "<file_sep>",
                  ("<|endoftext|>", "<file_sep>")),
    "deepseek": ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>", None, None,
                 ("<｜end▁of▁sentence｜>",)),
    "codellama": ("▁<PRE>", "▁<SUF>", "▁<MID>", None, None, ("▁<EOT>",)),
}
DEFAULT_REPO_NAME = "myproject"
DEFAULT_FILENAME = "filename"
CHUNK_SEPARATOR = "\n\n--- snippet ---\n\n"
PREFIX_SHARE = 0.75
MAX_EXTRA_CHUNKS = 64


def _token_id(tokenizer, text: str | None) -> int | None:
    if text is None:
        return None
    token_id = tokenizer.convert_tokens_to_ids(text)
    if not isinstance(token_id, int) or token_id < 0:
        return None
    # NOTE: unknown texts map to the unk id; only an exact round trip counts.
    return token_id if tokenizer.convert_ids_to_tokens(token_id) == text else None


@dataclass(frozen=True, slots=True)
class FimTemplate:
    """One model's FIM token ids; `build` assembles a prompt as token ids."""

    style: str
    prefix_id: int
    suffix_id: int
    middle_id: int
    repo_name_id: int | None
    file_sep_id: int | None
    stop_token_ids: tuple[int, ...]  # ids that end a middle (besides the model's EOS set)
    bos_id: int | None

    def build(self, tokenizer, prefix: str, suffix: str, extra: list[dict] | None = None,
              max_prompt_tokens: int | None = None, repo_name: str = DEFAULT_REPO_NAME,
              filename: str = DEFAULT_FILENAME) -> tuple[list[int], bool]:
        """(prompt token ids, truncated) for prefix/suffix plus repo-level context chunks."""
        def encode(text: str) -> list[int]:
            return _encode_plain(tokenizer, text) if text else []

        head = [self.bos_id] if self.bos_id is not None else []
        repo: list[int] = []
        chunks: list[list[int]] = []
        current: list[int] = []
        for chunk in extra or ():
            body = encode(chunk.get("text") or "")
            if self.file_sep_id is not None:
                name = chunk.get("filename") or DEFAULT_FILENAME
                chunks.append([self.file_sep_id] + encode(name + "\n") + body)
            else:
                chunks.append(encode(CHUNK_SEPARATOR) + body)
        prefix_ids, suffix_ids = encode(prefix), encode(suffix)
        truncated = False
        if max_prompt_tokens is not None:
            room = max_prompt_tokens - len(head) - 3
            if room < 2:
                raise bad_request("max_tokens", f"max_tokens leaves {max(room, 0)} prompt "
                                                f"tokens for the fill-in-the-middle prompt")
            # Context chunks give way first, the first (oldest) one first.
            while chunks and (self._context_len(tokenizer, chunks, repo_name, filename)
                              + len(prefix_ids) + len(suffix_ids) > room):
                chunks.pop(0)
                truncated = True
            room -= self._context_len(tokenizer, chunks, repo_name, filename)
            if len(prefix_ids) + len(suffix_ids) > room:
                truncated = True
                n_suffix = min(len(suffix_ids), max(room - len(prefix_ids),
                                                    room - int(room * PREFIX_SHARE)))
                n_prefix = min(len(prefix_ids), room - n_suffix)
                prefix_ids = prefix_ids[len(prefix_ids) - n_prefix:]
                suffix_ids = suffix_ids[:n_suffix]
        if chunks:
            if self.repo_name_id is not None:
                repo = [self.repo_name_id] + encode(repo_name + "\n")
            if self.file_sep_id is not None:
                current = [self.file_sep_id] + encode(filename + "\n")
        ids = head + [t for part in (repo, *chunks, current) for t in part]
        ids += [self.prefix_id] + prefix_ids + [self.suffix_id] + suffix_ids + [self.middle_id]
        return ids, truncated

    def _context_len(self, tokenizer, chunks: list[list[int]], repo_name: str,
                     filename: str) -> int:
        """Tokens the repo-level context takes: the chunks plus their two headers."""
        if not chunks:
            return 0
        n = sum(map(len, chunks))
        if self.repo_name_id is not None:
            n += 1 + len(_encode_plain(tokenizer, repo_name + "\n"))
        if self.file_sep_id is not None:
            n += 1 + len(_encode_plain(tokenizer, filename + "\n"))
        return n


def _encode_plain(tokenizer, text: str) -> list[int]:
    """Token ids of user text, special-token texts split into ordinary tokens."""
    try:
        return tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
    except TypeError:  # a tokenizer without split_special_tokens
        return tokenizer.encode(text, add_special_tokens=False)


def detect_fim(tokenizer, style: str = "auto") -> FimTemplate | None:
    """The model's FIM template: `style` forced, or the first style the vocabulary has."""
    if style == "none":
        return None
    candidates = list(STYLES) if style == "auto" else [style]
    for name in candidates:
        prefix, suffix, middle, repo, sep, ends = STYLES[name]
        ids = [_token_id(tokenizer, t) for t in (prefix, suffix, middle)]
        if any(i is None for i in ids):
            continue
        stop_ids = tuple(i for i in (_token_id(tokenizer, t) for t in ends) if i is not None)
        bos = tokenizer.bos_token_id if getattr(tokenizer, "add_bos_token", False) else None
        return FimTemplate(name, ids[0], ids[1], ids[2], _token_id(tokenizer, repo),
                           _token_id(tokenizer, sep), stop_ids, bos)
    return None


def _no_fim(param: str, model_name: str) -> protocol.APIError:
    return bad_request(param, f"{param} needs a fill-in-the-middle model; {model_name!r} has no "
                              f"FIM special tokens (set model.fim_style to force one of "
                              f"{', '.join(STYLES)})")


def _add_stop_ids(gen: GenerationRequest, template: FimTemplate) -> None:
    for params in gen.params:
        for token_id in template.stop_token_ids:
            if token_id not in params.stop_token_ids:
                params.stop_token_ids.append(token_id)


def apply_suffix(gen: GenerationRequest, template: FimTemplate | None, tokenizer,
                 model_name: str, max_model_len: int) -> None:
    """/v1/completions with `suffix`: every prompt becomes the model's FIM prompt (in place)."""
    if gen.suffix is None:
        return
    if template is None:
        raise _no_fim("suffix", model_name)
    if gen.echo:
        raise bad_request("echo", "echo cannot be combined with suffix")
    max_tokens = gen.params[0].max_tokens or 1
    prompts = []
    for prompt in gen.prompts:
        if not isinstance(prompt, str):
            raise bad_request("suffix", "suffix needs a text prompt, not token ids")
        ids, _ = template.build(tokenizer, prompt, gen.suffix,
                                max_prompt_tokens=max_model_len - max_tokens)
        prompts.append(ids)
    gen.prompts = prompts
    _add_stop_ids(gen, template)


# ------------------------------------------------------------------------------ /infill

_INFILL_RENAMES = {"n_predict": "max_tokens", "repeat_penalty": "repetition_penalty"}


def parse_infill(body: dict, template: FimTemplate | None, tokenizer, model_name: str,
                 max_model_len: int, defaults: dict | None) -> tuple[GenerationRequest, bool]:
    """Validate a llama.cpp /infill body into a one-choice completion request."""
    if template is None:
        raise _no_fim("input_prefix", model_name)
    texts = {}
    for name in ("input_prefix", "input_suffix", "prompt"):
        value = body.get(name, "")
        if value is None:
            value = ""
        if not isinstance(value, str):
            raise bad_request(name, f"{name} must be a string, got {value!r}")
        texts[name] = value
    extra = body.get("input_extra") or []
    if not isinstance(extra, list) or len(extra) > MAX_EXTRA_CHUNKS or not all(
            isinstance(c, dict) and isinstance(c.get("text", ""), str)
            and isinstance(c.get("filename", ""), str) for c in extra):
        raise bad_request("input_extra", f"input_extra must be a list of at most "
                                         f"{MAX_EXTRA_CHUNKS} {{\"filename\": str, "
                                         f"\"text\": str}} objects")
    mapped = {k: v for k, v in body.items() if k not in _INFILL_RENAMES}
    for old, new in _INFILL_RENAMES.items():
        if body.get(old) is not None:
            mapped[new] = body[old]
    n_predict = mapped.get("max_tokens")
    if n_predict is not None and (not protocol._is_int(n_predict) or n_predict == 0):
        raise bad_request("n_predict", f"n_predict must be a positive integer or -1 "
                                       f"(until a stop), got {n_predict!r}")
    if n_predict is not None and n_predict < 0:
        mapped["max_tokens"] = None  # llama.cpp: -1 = until a stop (capped by max_model_len)
    for name in ("n", "echo", "suffix", "logprobs", "stream_options"):
        mapped.pop(name, None)
    stream = protocol._get(body, "stream", "bool", False)
    mapped["prompt"] = "x"  # replaced below; parse_completion validates the sampling fields
    mapped["stream"] = False
    if mapped.get("max_tokens") is None:
        mapped.pop("max_tokens", None)
        max_tokens = None
    else:
        max_tokens = mapped["max_tokens"]
    try:
        gen = protocol.parse_completion(mapped, defaults=defaults)
    except protocol.APIError as err:
        if err.param == "max_tokens":
            err.param = "n_predict"
            err.message = err.message.replace("max_tokens", "n_predict")
        raise
    params = gen.params[0]
    params.max_tokens = max_tokens  # None: up to max_model_len (the engine fills it in)
    budget = max_model_len - (max_tokens or 1)
    ids, truncated = template.build(tokenizer, texts["input_prefix"] + texts["prompt"],
                                    texts["input_suffix"], extra, max_prompt_tokens=budget)
    if max_tokens is None and len(ids) >= max_model_len:
        raise bad_request("input_prefix", f"the infill prompt has {len(ids)} tokens, more "
                                          f"than max_model_len {max_model_len}")
    gen.kind = "infill"
    gen.prompts = [ids]
    gen.stream = stream
    gen.include_usage = False
    _add_stop_ids(gen, template)
    return gen, truncated


class InfillState:
    """llama.cpp's /infill (and /completion) response shapes for one choice.

    Same interface as server.responses.ResponseState, so the app's admission, streaming,
    disconnect and abort handling serve /infill unchanged."""

    def __init__(self, gen: GenerationRequest, model_name: str, truncated: bool):
        self.gen = gen
        self.num_choices = 1
        self.model_name = model_name
        self.truncated = truncated
        self.text = ""
        self.token_ids: list[int] = []
        self.prompt_tokens = len(gen.prompts[0])
        self.finish_reason: str | None = None
        self.stop_reason = None
        self.metrics = None
        self.disconnected = False

    @property
    def all_finished(self) -> bool:
        return self.finish_reason is not None

    def absorb(self, deltas: list, metrics) -> list[dict]:
        chunks = []
        delta = deltas[0]
        if delta is None:
            return chunks
        self.text += delta.text
        self.token_ids.extend(delta.token_ids)
        if delta.itl:
            metrics.observe_itl(delta.itl)
        if delta.finished:
            self.finish_reason = delta.finish_reason
            self.stop_reason = delta.stop_reason
            self.metrics = delta.metrics
            metrics.observe_finished(delta.finish_reason, delta.metrics)
        if not self.gen.stream:
            return chunks
        if delta.text or delta.token_ids:
            chunks.append({"index": 0, "content": delta.text, "tokens": list(delta.token_ids),
                           "stop": False, "id_slot": -1,
                           "tokens_predicted": len(self.token_ids),
                           "tokens_evaluated": self.prompt_tokens})
        if delta.finished:
            chunks.append(self.full_response(final_chunk=True))
        return chunks

    def _stop_type(self) -> tuple[str, str]:
        if self.finish_reason == "length":
            return "limit", ""
        if self.finish_reason == "stop":
            if isinstance(self.stop_reason, str):
                return "word", self.stop_reason
            return "eos", ""
        return "none", ""

    def full_response(self, final_chunk: bool = False) -> dict:
        stop_type, word = self._stop_type()
        params = self.gen.params[0]
        body = {"index": 0, "content": "" if final_chunk else self.text,
                "tokens": [] if final_chunk else list(self.token_ids), "id_slot": -1,
                "stop": True, "model": self.model_name,
                "tokens_predicted": len(self.token_ids),
                "tokens_evaluated": self.prompt_tokens,
                "generation_settings": {"n_predict": params.max_tokens,
                                        "temperature": params.temperature,
                                        "top_k": params.top_k, "top_p": params.top_p,
                                        "repeat_penalty": params.repetition_penalty,
                                        "seed": params.seed, "stream": self.gen.stream},
                "has_new_line": "\n" in self.text, "truncated": self.truncated,
                "stop_type": stop_type, "stopping_word": word,
                "tokens_cached": getattr(self.metrics, "num_cached_tokens", 0) or 0}
        if self.metrics is not None:
            from server.responses import spec_decode_stats, timings
            body["timings"] = timings(self.metrics)
            body["spec_decode_stats"] = spec_decode_stats([self.metrics])
        return body

    def usage_chunk(self) -> dict:  # never asked for: include_usage is off for /infill
        return {}

    def log_fields(self, gen: GenerationRequest, num_aborted: int) -> dict:
        return {"request_id": gen.response_id, "kind": "infill", "n": 1, "stream": gen.stream,
                "prompt_tokens": self.prompt_tokens, "completion_tokens": len(self.token_ids),
                "finish_reason": [self.finish_reason or "abort"],
                "disconnected": self.disconnected, "aborted_choices": num_aborted}
