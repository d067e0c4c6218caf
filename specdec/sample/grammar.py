"""Structured outputs: grammar matchers, token bitmasks, forced tokens (llguidance backend).

Glossary
- grammar: llguidance's compiled form of a StructuredOutput (JSON Schema, regex, choice, Lark).
- matcher: one per request (each of n choices has its own); its state is the verified output.
  It only ever advances with verified tokens; speculation consumes drafts temporarily to fill
  the masks of later window rows and rolls them back in the same step.
- bitmask: int32 [rows, ceil(vocab / 32)], bit t of row r set iff token t is allowed at row r
  (bit t lives in word t // 32, bit t % 32; llguidance's layout).
- forced tokens: where the grammar allows exactly one continuation, llguidance's fast-forward
  tokens (`compute_ff_tokens`, the canonical tokenization of the forced bytes). Proposed as
  one-hot drafts they cost no draft forward and are accepted unless the target prefers another
  tokenization of the same bytes (which the mask still allows): rare, and exact either way,
  since rejection sampling sees the one-hot draft distribution.

The distribution speculation preserves is the masked, processed target distribution: the mask
goes on the raw logits before the logits processors, for target rows and draft rows alike.

The backend sits behind GrammarCompiler/GrammarMatcher, so another one (xgrammar) could be
added; `apply_token_bitmask_` is ours (llguidance's torch helper uses torch.compile).
"""

from __future__ import annotations

import collections
import json

import torch
from torch import Tensor

from specdec.core.request import StructuredOutput

# NOTE: compact JSON with json.dumps' separators: no whitespace loops from weak models, and
# more forced tokens. A schema's own "x-guidance" options override these defaults.
PROTOTYPE_CACHE_SIZE = 64
JSON_DEFAULTS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def new_bitmask(num_rows: int, vocab_size: int) -> Tensor:
    """[num_rows, words] int32, all tokens allowed (-1 = every bit set)."""
    return torch.full((num_rows, bitmask_words(vocab_size)), -1, dtype=torch.int32)


def unpack_bitmask(bitmask: Tensor, vocab_size: int) -> Tensor:
    """int32 [rows, words] (any device) -> bool [rows, vocab_size]; tokens past 32 * words are
    disallowed."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # [rows, words, 32]
    allowed = bits.reshape(bitmask.shape[0], -1).bool()  # [rows, words * 32]
    if allowed.shape[1] >= vocab_size:
        return allowed[:, :vocab_size]
    pad = torch.zeros(bitmask.shape[0], vocab_size - allowed.shape[1], dtype=torch.bool,
                      device=bitmask.device)
    return torch.cat([allowed, pad], dim=1)


def limited_rows(bitmask: Tensor, vocab_size: int) -> Tensor:
    """bool [rows]: the rows of a CPU bitmask that disallow some token below vocab_size (bits
    past vocab_size are ignored; a bitmask narrower than the vocabulary limits every row)."""
    full, rem = divmod(vocab_size, 32)
    if bitmask.shape[1] * 32 < vocab_size:
        return torch.ones(bitmask.shape[0], dtype=torch.bool)
    limited = (bitmask[:, :full] != -1).any(dim=1)
    if rem:
        low = (1 << rem) - 1
        limited |= (bitmask[:, full] & low) != low
    return limited


def apply_token_bitmask_(logits: Tensor, bitmask: Tensor) -> Tensor:
    """logits [rows, vocab] (CPU or CUDA), bitmask int32 [rows, words] (CPU): disallowed
    logits -> -inf, in place. Rows that allow every token are left alone (a free-text state
    costs a scan of its words, not an unpack); the others' bitmask is copied to the logits'
    device and unpacked there."""
    if logits.dim() != 2 or bitmask.shape[0] != logits.shape[0]:
        raise ValueError(f"bitmask rows ({bitmask.shape[0]}) must match logits "
                         f"{tuple(logits.shape)}")
    vocab = logits.shape[1]
    limited = limited_rows(bitmask, vocab) if bitmask.device.type == "cpu" else None
    if limited is not None and not limited.all():
        index = limited.nonzero()[:, 0]
        if index.numel():
            rows = index.to(logits.device)
            logits[rows] = apply_token_bitmask_(logits[rows], bitmask[index])
        return logits
    allowed = unpack_bitmask(bitmask.to(logits.device, non_blocking=True), vocab)
    return logits.masked_fill_(~allowed, float("-inf"))


def apply_token_bitmask_reference(logits: Tensor, bitmask: Tensor) -> Tensor:
    """Plain loops over bits: what apply_token_bitmask_ must equal (returns a new tensor)."""
    out = logits.clone()
    words = bitmask.tolist()
    for r in range(out.shape[0]):
        for t in range(out.shape[1]):
            word = t // 32
            if word >= len(words[r]) or not (words[r][word] >> (t % 32)) & 1:
                out[r, t] = float("-inf")
    return out


def allowed_token_ids(bitmask_row: Tensor, vocab_size: int, limit: int) -> list[int] | None:
    """The allowed ids of one bitmask row if there are at most `limit`, else None."""
    allowed = unpack_bitmask(bitmask_row[None], vocab_size)[0]
    if int(allowed.sum()) > limit:
        return None
    return allowed.nonzero()[:, 0].tolist()


class GrammarMatcher:
    """One request's grammar state (wraps llguidance.LLMatcher); never raises on bad tokens,
    `error` says what went wrong instead."""

    __slots__ = ("_matcher",)

    def __init__(self, matcher):
        self._matcher = matcher

    @property
    def error(self) -> str | None:
        if not self._matcher.is_error():
            return None
        return self._matcher.get_error() or "the grammar cannot advance"

    @property
    def is_stopped(self) -> bool:
        """The grammar is complete and can take nothing but EOS."""
        return self._matcher.is_stopped()

    def fill_bitmask(self, bitmask: Tensor, row: int) -> None:
        """Write the allowed tokens of the next position into bitmask[row] (CPU int32)."""
        view = bitmask[row]
        self._matcher.unsafe_compute_mask_ptr(view.data_ptr(), view.numel() * 4)

    def validate(self, token_ids: list[int]) -> int:
        """How many leading tokens of token_ids the grammar accepts from here (no advance).

        NOTE: a try-consume and rollback rather than llguidance's validate_tokens, so the
        answer is exactly what `consume` takes (nothing after the grammar stops, not even EOS).
        """
        if not token_ids:
            return 0
        num_valid = self._matcher.try_consume_tokens(token_ids)
        self.rollback(num_valid)
        return num_valid

    def consume(self, token_ids: list[int]) -> bool:
        """Advance by all of token_ids, or by none of them (False) and stay usable."""
        if not token_ids:
            return not self._matcher.is_error()
        num_valid = self._matcher.try_consume_tokens(token_ids)
        if num_valid < len(token_ids):
            self.rollback(num_valid)
            return False
        return True

    def rollback(self, num_tokens: int) -> None:
        if num_tokens:
            self._matcher.rollback(num_tokens)

    def forced_tokens(self, limit: int) -> list[int]:
        """Up to `limit` tokens the grammar forces from here (may be empty)."""
        if limit <= 0 or self._matcher.is_stopped() or self._matcher.is_error():
            return []
        return self._matcher.compute_ff_tokens()[:limit]

    def fill_window(self, bitmask: Tensor, first_row: int, draft_token_ids: list[int]) -> None:
        """Rows first_row .. first_row + len(drafts): the masks of a verify window, row j given
        drafts d_1..d_j. The drafts must be valid (see `validate`); the state is restored."""
        consumed = 0
        try:
            for j, token_id in enumerate(draft_token_ids):
                self.fill_bitmask(bitmask, first_row + j)
                if not self.consume([token_id]):
                    raise ValueError(f"draft token {token_id} is not allowed by the grammar")
                consumed += 1
            self.fill_bitmask(bitmask, first_row + len(draft_token_ids))
        finally:
            self.rollback(consumed)


class GrammarCompiler:
    """Compiles StructuredOutputs for one tokenizer; the llguidance tokenizer is built once,
    on first use (about a second for a 150k vocabulary)."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: list[int]):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self._ll_tokenizer = None
        self._unavailable: str | None = None
        # compiled matchers in their start state, by grammar; requests get deep copies
        self._prototypes: collections.OrderedDict[str, object] = collections.OrderedDict()

    def prepare(self) -> None:
        """Build the llguidance tokenizer now; a tokenizer it cannot take (a slow one) only
        makes structured requests fail, with a 400 that says why."""
        try:
            _ = self.ll_tokenizer
        except Exception as exc:  # noqa: BLE001 - any failure means "unsupported here"
            self._unavailable = f"{type(exc).__name__}: {exc}"

    @property
    def ll_tokenizer(self):
        if self._unavailable is not None:
            raise ValueError(f"structured outputs are unavailable for this tokenizer "
                             f"({self._unavailable})")
        if self._ll_tokenizer is None:
            import llguidance.hf
            self._ll_tokenizer = llguidance.hf.from_tokenizer(
                self.tokenizer, n_vocab=self.vocab_size,
                eos_token=self.eos_token_ids or None)
        return self._ll_tokenizer

    def grammar(self, so: StructuredOutput) -> str:
        """The llguidance grammar text; ValueError naming so.param if it is invalid."""
        import llguidance
        try:
            tokenizer = self.ll_tokenizer
        except ValueError as exc:
            raise ValueError(f"{so.param} cannot be used: {exc}") from None
        matcher_cls = llguidance.LLMatcher
        try:
            if so.kind == "json":
                schema = {"type": "object"} if so.spec is None else so.spec
                if not isinstance(schema, (dict, bool)):
                    raise ValueError(f"must be a JSON Schema object, got {type(schema).__name__}")
                grammar = matcher_cls.grammar_from_json_schema(
                    json.dumps(schema), defaults=JSON_DEFAULTS)
            elif so.kind == "regex":
                if not isinstance(so.spec, str) or not so.spec:
                    raise ValueError("must be a non-empty string")
                grammar = matcher_cls.grammar_from_regex(so.spec)
            elif so.kind == "choice":
                if (not isinstance(so.spec, list) or not so.spec
                        or not all(isinstance(c, str) and c for c in so.spec)):
                    raise ValueError("must be a non-empty list of non-empty strings")
                grammar = matcher_cls.grammar_from_lark(
                    "start: " + " | ".join(json.dumps(c) for c in so.spec))
            else:
                if not isinstance(so.spec, str) or not so.spec.strip():
                    raise ValueError("must be a non-empty Lark grammar string")
                grammar = llguidance.grammar_from("grammar", so.spec)  # Lark or GBNF
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{so.param} is invalid: {exc}") from None
        message = matcher_cls.validate_grammar(grammar, tokenizer)
        if message and not message.startswith("WARNING"):
            raise ValueError(f"{so.param} is invalid or unsupported: {message.strip()}")
        return grammar

    def matcher(self, so: StructuredOutput) -> GrammarMatcher:
        """A fresh matcher; compiling costs milliseconds, so each grammar is compiled once
        (up to PROTOTYPE_CACHE_SIZE of them) and copied."""
        import llguidance
        key = json.dumps([so.kind, so.spec], sort_keys=True)
        prototype = self._prototypes.get(key)
        if prototype is None:
            prototype = llguidance.LLMatcher(self.ll_tokenizer, self.grammar(so), log_level=0)
            if prototype.is_error():
                raise ValueError(f"{so.param} is invalid or unsupported: "
                                 f"{prototype.get_error()}")
            self._prototypes[key] = prototype
            if len(self._prototypes) > PROTOTYPE_CACHE_SIZE:
                self._prototypes.popitem(last=False)
        else:
            self._prototypes.move_to_end(key)
        return GrammarMatcher(prototype.deep_copy())
