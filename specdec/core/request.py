"""Requests and their sampling parameters: plain bookkeeping, standard library only.

Glossary
- prompt_token_ids: the tokens the user sent.
- output_token_ids: verified tokens generated so far (accepted drafts, bonus and recovered tokens).
- num_computed_tokens: how many of prompt + output tokens have their KV written in the target's
  cache. Rollback after a rejected draft is just this number not moving past the accepted tokens.
- spec_token_ids: draft tokens proposed for the current step; never part of the output until verified.
- num_lookahead_tokens: how many draft tokens the engine wants to verify for this request next step
  (the adaptive k); the scheduler reserves KV slots and token budget for them.
"""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field

MAX_LOGPROBS = 20
MAX_CACHE_SALT = 1024
# Temperatures below this are greedy (vLLM's _SAMPLING_EPS): dividing float32 logits by a
# smaller one overflows to inf and gives NaN probabilities.
GREEDY_TEMPERATURE = 1e-5


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def finished(self) -> bool:
        return self.name.startswith("FINISHED")

    @property
    def finish_reason(self) -> str | None:
        return self.value if self.finished else None


STRUCTURED_KINDS = ("json", "regex", "choice", "grammar")


@dataclass(frozen=True, slots=True)
class StructuredOutput:
    """A constraint on the output text, compiled by specdec.sample.grammar.

    kind: "json" (spec: a JSON Schema dict, or None for any JSON object), "regex" (spec: str),
    "choice" (spec: list of strings), "grammar" (spec: a Lark grammar in llguidance's dialect).
    param: the request parameter it came from, so a compile error names it (a 400).
    """

    kind: str
    spec: object = None
    param: str = "structured_outputs"

    def __post_init__(self) -> None:
        if self.kind not in STRUCTURED_KINDS:
            _fail(self.param, self.kind, f"one of {list(STRUCTURED_KINDS)}")


def _fail(param: str, value, limit: str) -> None:
    raise ValueError(f"{param} must be {limit}, got {value!r}")


@dataclass(slots=True)
class SamplingParams:
    """What to generate and how; the fields and defaults follow vLLM's SamplingParams.

    `num_speculative_tokens`: None lets the engine choose k each step (adaptive speculation),
    0 turns speculation off for this request, k > 0 fixes it (capped by the configured maximum).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logprobs: int | None = None  # None: off; N: the chosen token plus the top N
    num_speculative_tokens: int | None = None
    # Prefix-cache isolation (vLLM's field): only requests with the same salt share KV blocks.
    cache_salt: str | None = None
    # NOTE: under a grammar, the grammar wins over min_tokens and ignore_eos: when it allows
    # only EOS (or nothing more), the request stops.
    structured_output: StructuredOutput | None = None
    prompt_logprobs: int | None = None  # None: off; N: each prompt token's logprob + top N

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.logit_bias:
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
        checks = [
            ("n", isinstance(self.n, int) and self.n >= 1, "an integer >= 1"),
            ("temperature", _finite(self.temperature) and 0.0 <= self.temperature <= 100.0,
             "in [0, 100]"),
            ("top_p", _finite(self.top_p) and 0.0 < self.top_p <= 1.0, "in (0, 1]"),
            ("top_k", isinstance(self.top_k, int) and self.top_k >= -1,
             "-1, 0 (off) or a positive integer"),
            ("min_p", _finite(self.min_p) and 0.0 <= self.min_p <= 1.0, "in [0, 1]"),
            ("repetition_penalty", _finite(self.repetition_penalty)
             and 0.0 < self.repetition_penalty <= 2.0, "in (0, 2]"),
            ("presence_penalty", _finite(self.presence_penalty)
             and -2.0 <= self.presence_penalty <= 2.0, "in [-2, 2]"),
            ("frequency_penalty", _finite(self.frequency_penalty)
             and -2.0 <= self.frequency_penalty <= 2.0, "in [-2, 2]"),
            ("max_tokens", self.max_tokens is None
             or (isinstance(self.max_tokens, int) and self.max_tokens >= 1), "an integer >= 1"),
            ("min_tokens", isinstance(self.min_tokens, int) and self.min_tokens >= 0,
             "an integer >= 0"),
            ("seed", self.seed is None or isinstance(self.seed, int), "an integer"),
            ("logprobs", self.logprobs is None
             or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_LOGPROBS),
             f"an integer in [0, {MAX_LOGPROBS}]"),
            ("prompt_logprobs", self.prompt_logprobs is None
             or (isinstance(self.prompt_logprobs, int)
                 and 0 <= self.prompt_logprobs <= MAX_LOGPROBS),
             f"an integer in [0, {MAX_LOGPROBS}]"),
            ("num_speculative_tokens", self.num_speculative_tokens is None
             or (isinstance(self.num_speculative_tokens, int)
                 and self.num_speculative_tokens >= 0), "null or an integer >= 0"),
        ]
        for name, ok, limit in checks:
            if not ok:
                _fail(name, getattr(self, name), limit)
        if self.cache_salt is not None and not (
                isinstance(self.cache_salt, str) and 0 < len(self.cache_salt) <= MAX_CACHE_SALT):
            _fail("cache_salt", self.cache_salt,
                  f"null or a non-empty string of at most {MAX_CACHE_SALT} characters")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            _fail("min_tokens", self.min_tokens, f"<= max_tokens ({self.max_tokens})")
        if not all(isinstance(s, str) and s for s in self.stop):
            _fail("stop", self.stop, "a list of non-empty strings")
        if len(self.stop) > 16:
            _fail("stop", self.stop, "at most 16 strings")
        if not all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids):
            _fail("stop_token_ids", self.stop_token_ids, "a list of non-negative integers")
        if self.logit_bias:
            for token_id, bias in self.logit_bias.items():
                if not (_finite(bias) and -100.0 <= bias <= 100.0):
                    _fail(f"logit_bias[{token_id}]", bias, "in [-100, 100]")
                if token_id < 0:
                    _fail("logit_bias", token_id, "a non-negative token id")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def needs_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(slots=True)
class Request:
    """One sequence being generated (a completion with n > 1 is n requests)."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_id: int | frozenset[int] | None = None  # every id that ends generation
    arrival_time: float = field(default_factory=time.monotonic)
    prompt: str | None = None
    priority: int = 0  # scheduler.policy = "priority": lower runs first (vLLM's semantics)
    # LoRA adapter (specdec.model.lora): its name and never-reused id; 0 = the base model.
    lora_name: str | None = None
    lora_int_id: int = 0

    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    # Draft model bookkeeping: how many tokens the draft's KV holds (it may lag by one).
    draft_num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache at first admission
    num_lookahead_tokens: int = 0
    spec_token_ids: list[int] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    num_preemptions: int = 0
    # Opaque to the bookkeeping: the sampler's per-request constants, built once when the
    # engine adds the request (specdec.sample.sampling.RequestConstants).
    sampling_constants: object = None

    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None

    # Speculative decoding counters (vLLM's definitions).
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_ids_slice(self, start: int, end: int) -> list[int]:
        """all_token_ids[start:end] without concatenating prompt and output (per-step path)."""
        num_prompt = len(self.prompt_token_ids)
        if start >= num_prompt:
            return self.output_token_ids[start - num_prompt:end - num_prompt]
        if end <= num_prompt:
            return self.prompt_token_ids[start:end]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - num_prompt]

    @property
    def max_tokens(self) -> int | None:
        return self.sampling_params.max_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    @property
    def is_prefill(self) -> bool:
        """True while tokens other than the last sampled one still lack KV."""
        return self.num_tokens - self.num_computed_tokens > 1 or not self.output_token_ids
