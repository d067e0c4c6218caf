"""Incremental detokenization with stop strings, for streaming.

Text is decoded from a sliding window of token ids (vLLM's prefix_offset / read_offset
technique): `prefix` = ids[prefix_offset:read_offset] was already turned into text; decoding
ids[prefix_offset:] and dropping the prefix's text gives the new characters. The window keeps a
few tokens of context so that tokenizers that strip or merge at the start of a decode
(sentencepiece's leading space) produce the same characters as a full decode would. New text
that ends in U+FFFD is an unfinished UTF-8 character (its bytes span several tokens): nothing is
emitted and the offsets stay until a later token completes it.

Stop strings: after each token only the new characters plus the last max(len(stop)) - 1 older
ones are searched, so a stop string split across tokens is found. On a match the text is cut at
the stop string (or just after it with include_stop_str_in_output) and the rest of the call's
tokens are not used. A suffix that could still grow into a stop string is held back from the
deltas until it is decided; `flush()` releases it when the request ends for another reason.
That hold-back looks only at the last max(len(stop)) - 1 characters. As in vLLM, stop strings
are matched only once the output has more than `min_tokens` tokens.

Invariant: the deltas returned by add_tokens() and flush() concatenate to exactly `text`.
"""

from __future__ import annotations

from dataclasses import dataclass

# How many prompt tokens of context the first decode window starts with (vLLM uses 5).
INITIAL_CONTEXT_TOKENS = 5
REPLACEMENT_CHAR = "\ufffd"


@dataclass(slots=True)
class DetokenizerDelta:
    text_delta: str  # new text that may be shown to the user
    stop_string: str | None  # the stop string that ended the request, if any
    num_tokens_used: int  # tokens of this call consumed, up to the one completing the stop


class IncrementalDetokenizer:
    """Turns one request's output tokens into text deltas; `text` is the final text so far
    (emitted plus held-back, cut at a matched stop string)."""

    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True,
                 stop: list[str] | tuple[str, ...] = (), include_stop_str_in_output: bool = False,
                 min_tokens: int = 0):
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {list(stop)!r}")
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = list(stop)
        self.include_stop_str_in_output = include_stop_str_in_output
        self._max_stop_len = max((len(s) for s in self.stop), default=0)
        self.min_tokens = min_tokens
        self._num_output_tokens = 0
        self._token_ids = list(prompt_token_ids)
        self._read_offset = len(self._token_ids)
        self._prefix_offset = max(self._read_offset - INITIAL_CONTEXT_TOKENS, 0)
        self._prefix_text = self._decode(self._token_ids[self._prefix_offset:self._read_offset])
        self._text = ""  # decoded output text (cut at a stop string once stopped)
        self._num_emitted = 0  # characters of _text already returned as deltas
        self.stop_string: str | None = None

    @property
    def text(self) -> str:
        return self._text

    @property
    def finished(self) -> bool:
        """True once a stop string matched; later tokens are ignored."""
        return self.stop_string is not None

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def _decode_next(self, final: bool = False) -> str:
        """New characters after the read offset; advances the window when they are complete."""
        new_text = self._decode(self._token_ids[self._prefix_offset:])
        if len(new_text) <= len(self._prefix_text):
            return ""
        if new_text.endswith(REPLACEMENT_CHAR) and not final:
            return ""  # an unfinished UTF-8 character: wait for its remaining bytes
        delta = new_text[len(self._prefix_text):]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._token_ids)
        self._prefix_text = self._decode(self._token_ids[self._prefix_offset:self._read_offset])
        return delta

    def _find_stop(self, num_new_chars: int) -> tuple[int, str] | None:
        """Earliest stop string that ends in the newest num_new_chars characters."""
        start = max(len(self._text) - num_new_chars - self._max_stop_len + 1, 0)
        best = None
        for s in self.stop:
            idx = self._text.find(s, start)
            if idx != -1 and (best is None or idx < best[0]):
                best = (idx, s)
        return best

    def _num_held_back(self) -> int:
        """Length of the longest suffix of text that is a proper prefix of some stop string.

        NOTE: only the last max_stop_len - 1 characters can matter, and each candidate start is
        found with str.find on the stop string's first character, so one call costs about
        (number of stops) x (that tail's length) character compares, never a slice of the
        stop string per length.
        """
        tail = self._text[max(len(self._text) - self._max_stop_len + 1, 0):]
        held = 0
        for s in self.stop:
            # Candidate suffixes tail[p:], longest first, that are shorter than s.
            p = tail.find(s[0], max(len(tail) - len(s) + 1, 0))
            while p != -1 and len(tail) - p > held:
                if s.startswith(tail[p:]):
                    held = len(tail) - p
                    break
                p = tail.find(s[0], p + 1)
        return held

    def _emit(self, upto: int) -> str:
        delta = self._text[self._num_emitted:upto]
        self._num_emitted = max(self._num_emitted, upto)
        return delta

    def add_tokens(self, token_ids: list[int]) -> DetokenizerDelta:
        if self.finished:
            return DetokenizerDelta("", self.stop_string, 0)
        for i, token_id in enumerate(token_ids):
            self._token_ids.append(int(token_id))
            self._num_output_tokens += 1
            new_chars = self._decode_next()
            if not new_chars:
                continue
            self._text += new_chars
            if not self.stop or self._num_output_tokens <= self.min_tokens:
                continue
            match = self._find_stop(len(new_chars))
            if match is not None:
                idx, s = match
                self._text = self._text[:idx + len(s) if self.include_stop_str_in_output else idx]
                self.stop_string = s
                return DetokenizerDelta(self._emit(len(self._text)), s, i + 1)
        upto = len(self._text) - self._num_held_back()
        return DetokenizerDelta(self._emit(upto), None, len(token_ids))

    def flush(self) -> str:
        """End of the request: decode any unfinished character and release held-back text."""
        if not self.finished:
            self._text += self._decode_next(final=True)
        return self._emit(len(self._text))
