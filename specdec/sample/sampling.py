"""Logits processing, probabilities, seeded sampling and logprobs.

Order of the processors, per row (NOTE: vLLM v1 applies min_p before top-k/top-p; the order
below is Hugging Face's, and the two differ only when top_p and min_p are both set):
  1. min_tokens        while len(output) < min_tokens: eos and stop_token_ids -> -inf
                       (eos is masked even with ignore_eos, as vLLM does: that flag only
                       means "don't stop at eos")
  2. logit_bias        logits[token] += bias
  3. repetition        over prompt + output tokens: positive logits / penalty, negative * penalty
  4. presence/frequency  over output tokens only (OpenAI): -= presence * seen + frequency * count
  5. temperature       logits / temperature (greedy rows skip it and everything below)
  6. top_k             keep logits >= the k-th largest (ties at the k-th value are kept)
  7. top_p             keep a token iff the tokens ranked above it hold < top_p of the mass
                       (HF/vLLM: ascending cumsum <= 1 - top_p is dropped; the top token stays)
  8. min_p             drop tokens with prob < min_p * max prob
Masked entries are -inf. Greedy rows (temperature 0) become one-hot in `compute_probs`; top-k/p
and min-p never drop the argmax, so skipping them for greedy rows changes nothing.

Seeded sampling is counter-based: `row_generator(seed, output_index, stream)` depends only on the
request's seed, which output token is being drawn and for what purpose (`STREAM_*`), so a seeded
request gets the same random numbers whatever else is in the batch and however many draft tokens
were accepted in earlier steps.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import Tensor

from specdec.core.request import SamplingParams

# Purposes of random numbers for one output token; each gets an independent generator.
STREAM_SAMPLE = 0  # the token itself (plain decoding, and the bonus token after all drafts pass)
STREAM_ACCEPT = 1  # the uniform that accepts or rejects a draft token at this position
STREAM_RECOVER = 2  # the recovered token after a rejection at this position
STREAM_DRAFT = 3  # the draft model's own sample at this position

_NEG_INF = float("-inf")


@dataclass(slots=True)
class RequestConstants:
    """One request's logits-processor inputs that never change, built once when it is added
    (`build_request_constants`) and shared by all its rows in every step."""

    banned_ids: Tensor  # [num_banned] int64: eos + stop_token_ids, masked while < min_tokens
    bias_ids: Tensor  # [num_bias] int64
    bias_values: Tensor  # [num_bias] float32


def build_request_constants(params: SamplingParams, eos_token_id, vocab_size: int
                            ) -> RequestConstants:
    """Validate the request's token ids against the vocabulary and build its constants."""
    for t in (params.logit_bias or {}):
        if not 0 <= t < vocab_size:
            raise ValueError(f"logit_bias token id {t} is outside the vocabulary "
                             f"[0, {vocab_size})")
    banned = set(params.stop_token_ids) if params.min_tokens > 0 else set()
    if params.min_tokens > 0:
        if isinstance(eos_token_id, int):
            banned.add(eos_token_id)
        elif eos_token_id is not None:
            banned.update(eos_token_id)
    bias = params.logit_bias or {}
    return RequestConstants(
        banned_ids=torch.tensor(sorted(t for t in banned if t < vocab_size), dtype=torch.long),
        bias_ids=torch.tensor(list(bias), dtype=torch.long),
        bias_values=torch.tensor(list(bias.values()), dtype=torch.float32))


@dataclass(slots=True)
class RowState:
    """What the logits processors need to know about one row of logits.

    `output_token_ids`: the verified output plus any draft tokens that precede this row in a
    verify window (row j of a window sees d_1..d_j as if they were already generated).
    `eos_token_id`: one id, or a collection of ids (models with several end tokens); min_tokens
    masks all of them.
    """

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    eos_token_id: int | frozenset[int] | tuple[int, ...] | None = None
    # The request's prebuilt constants; None: derive them from params (the plain reference).
    constants: RequestConstants | None = None


def _rows_where(rows: list[RowState], pred) -> list[int]:
    return [i for i, row in enumerate(rows) if pred(row)]


def _index(idx: list[int], device) -> Tensor:
    return torch.tensor(idx, dtype=torch.long, device=device)


def _check_token_id(param: str, token_id: int, vocab_size: int) -> None:
    if not 0 <= token_id < vocab_size:
        raise ValueError(f"{param} token id must be in the vocabulary [0, {vocab_size}), "
                         f"got {token_id}")


def _scatter_constants(rows: list[RowState], which: list[int], field: str
                       ) -> tuple[Tensor, Tensor]:
    """(row index per entry, entry) over the prebuilt constant `field` of rows `which`."""
    parts = [getattr(rows[i].constants, field) for i in which]
    lengths = torch.tensor([len(p) for p in parts], dtype=torch.long)
    row_ids = torch.repeat_interleave(torch.tensor(which, dtype=torch.long), lengths)
    return row_ids, torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)


def _apply_min_tokens(logits: Tensor, rows: list[RowState]) -> None:
    vocab_size = logits.shape[1]
    row_ids, token_ids = [], []
    prebuilt = []
    for i, row in enumerate(rows):
        if len(row.output_token_ids) >= row.params.min_tokens:
            continue
        if row.constants is not None:
            prebuilt.append(i)
            continue
        banned = set(row.params.stop_token_ids)
        if isinstance(row.eos_token_id, int):
            banned.add(row.eos_token_id)
        elif row.eos_token_id is not None:
            banned.update(row.eos_token_id)
        for t in banned:
            if t < vocab_size:  # ids past the vocab can never be sampled anyway
                row_ids.append(i)
                token_ids.append(t)
    if row_ids:
        logits[_index(row_ids, logits.device), _index(token_ids, logits.device)] = _NEG_INF
    if prebuilt:
        r, t = _scatter_constants(rows, prebuilt, "banned_ids")
        logits[r.to(logits.device), t.to(logits.device)] = _NEG_INF


def _apply_logit_bias(logits: Tensor, rows: list[RowState]) -> None:
    vocab_size = logits.shape[1]
    row_ids, token_ids, biases = [], [], []
    prebuilt = [i for i, row in enumerate(rows)
                if row.constants is not None and len(row.constants.bias_ids)]
    if prebuilt:
        r, t = _scatter_constants(rows, prebuilt, "bias_ids")
        values = torch.cat([rows[i].constants.bias_values for i in prebuilt])
        logits.index_put_((r.to(logits.device), t.to(logits.device)),
                          values.to(logits.dtype).to(logits.device), accumulate=True)
    for i, row in enumerate(rows):
        if row.constants is not None:
            continue
        for t, bias in (row.params.logit_bias or {}).items():
            _check_token_id("logit_bias", t, vocab_size)
            row_ids.append(i)
            token_ids.append(t)
            biases.append(bias)
    if row_ids:
        r, t = _index(row_ids, logits.device), _index(token_ids, logits.device)
        logits.index_put_((r, t), torch.tensor(biases, dtype=logits.dtype, device=logits.device),
                          accumulate=True)


def _pairs(token_lists: list[list[int]], row_ids: list[int], vocab_size: int, device
           ) -> tuple[Tensor, Tensor, Tensor]:
    """Distinct (row, token) pairs of the lists and how often each occurs: (rows, tokens, counts).

    Ids >= vocab_size are ignored. Cost follows the number of tokens, not rows * vocab.
    """
    lengths = torch.tensor([len(toks) for toks in token_lists], dtype=torch.long)
    flat = torch.tensor([t for toks in token_lists for t in toks], dtype=torch.long)
    rows = torch.repeat_interleave(torch.tensor(row_ids, dtype=torch.long), lengths)
    keep = flat < vocab_size
    keys, counts = torch.unique(rows[keep] * vocab_size + flat[keep], return_counts=True)
    keys, counts = keys.to(device), counts.to(device)
    return keys // vocab_size, keys % vocab_size, counts


def _apply_penalties(logits: Tensor, rows: list[RowState]) -> None:
    """Touches only the (row, token) pairs that occur, never a whole [rows, vocab] tensor."""
    device, vocab_size = logits.device, logits.shape[1]
    rep_rows = _rows_where(rows, lambda r: r.params.repetition_penalty != 1.0)
    if rep_rows:
        r, t, _ = _pairs([rows[i].prompt_token_ids + rows[i].output_token_ids for i in rep_rows],
                         rep_rows, vocab_size, device)
        penalty = torch.tensor([row.params.repetition_penalty for row in rows],
                               dtype=logits.dtype, device=device)[r]
        values = logits[r, t]
        logits[r, t] = torch.where(values > 0, values / penalty, values * penalty)
    pf_rows = _rows_where(rows, lambda r: r.params.presence_penalty != 0.0
                          or r.params.frequency_penalty != 0.0)
    if pf_rows:
        r, t, counts = _pairs([rows[i].output_token_ids for i in pf_rows], pf_rows, vocab_size,
                              device)
        frequency = torch.tensor([row.params.frequency_penalty for row in rows],
                                 dtype=logits.dtype, device=device)[r]
        presence = torch.tensor([row.params.presence_penalty for row in rows],
                                dtype=logits.dtype, device=device)[r]
        logits[r, t] = logits[r, t] - frequency * counts.to(logits.dtype) - presence


def _apply_top_k(sub: Tensor, top_k: Tensor) -> Tensor:
    """sub [n, vocab]; top_k [n] int64 in [1, vocab]. Keeps logits >= the k-th largest."""
    k_max = int(top_k.max())
    top_values = sub.topk(k_max, dim=-1).values  # [n, k_max], descending
    kth = top_values.gather(1, (top_k - 1)[:, None])  # [n, 1]
    return sub.masked_fill(sub < kth, _NEG_INF)


def _apply_top_p(sub: Tensor, top_p: Tensor, grow: bool | None = None) -> Tensor:
    """sub [n, vocab]; top_p [n] in (0, 1). Keeps a token iff the probability of the tokens
    ranked above it is < top_p (Hugging Face / vLLM: ascending cumsum <= 1 - top_p is dropped).

    NOTE: on the CPU (`grow`) sorts only the top m tokens, growing m until they hold top_p of
    the mass in every row; a full sort of a 152k vocab is the slowest op here on a CPU. On a
    GPU the full sort is cheap and the growth test would be a host sync: one sort, no check.
    """
    probs = sub.softmax(dim=-1)  # [n, vocab]
    vocab_size = probs.shape[1]
    if grow is None:
        grow = sub.device.type == "cpu"
    m = min(256, vocab_size) if grow else vocab_size
    while True:
        top_probs, top_ids = probs.topk(m, dim=-1)  # [n, m], descending
        cum = top_probs.cumsum(dim=-1)
        if m == vocab_size or bool((cum[:, -1] >= top_p).all()):
            break
        m = min(m * 8, vocab_size)
    keep_sorted = (cum - top_probs) < top_p[:, None]
    keep_sorted[:, 0] = True  # the largest token always survives
    keep = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, top_ids, keep_sorted)
    return sub.masked_fill(~keep, _NEG_INF)


def _apply_min_p(sub: Tensor, min_p: Tensor) -> Tensor:
    probs = sub.softmax(dim=-1)  # [n, vocab]
    threshold = probs.amax(dim=-1, keepdim=True) * min_p[:, None]
    return sub.masked_fill(probs < threshold, _NEG_INF)


def _apply_temperature_and_truncation(logits: Tensor, rows: list[RowState]) -> None:
    device, vocab_size = logits.device, logits.shape[1]
    sampled = _rows_where(rows, lambda r: not r.params.greedy)
    temp_rows = [i for i in sampled if rows[i].params.temperature != 1.0]
    if temp_rows:
        index = _index(temp_rows, device)
        temps = torch.tensor([rows[i].params.temperature for i in temp_rows],
                             dtype=logits.dtype, device=device)
        logits[index] = logits[index] / temps[:, None]
    k_rows = [i for i in sampled if 0 < rows[i].params.top_k < vocab_size]
    if k_rows:
        index = _index(k_rows, device)
        top_k = torch.tensor([rows[i].params.top_k for i in k_rows], device=device)
        logits[index] = _apply_top_k(logits[index], top_k)
    p_rows = [i for i in sampled if rows[i].params.top_p < 1.0]
    if p_rows:
        index = _index(p_rows, device)
        top_p = torch.tensor([rows[i].params.top_p for i in p_rows], device=device)
        logits[index] = _apply_top_p(logits[index], top_p)
    m_rows = [i for i in sampled if rows[i].params.min_p > 0.0]
    if m_rows:
        index = _index(m_rows, device)
        min_p = torch.tensor([rows[i].params.min_p for i in m_rows], device=device)
        logits[index] = _apply_min_p(logits[index], min_p)


def process_logits(logits: Tensor, rows: list[RowState]) -> Tensor:
    """logits [num_rows, vocab] float32 -> processed logits [num_rows, vocab] (a new tensor).

    Each processor touches only the rows that need it, as one batched op over those rows.
    """
    if logits.dim() != 2 or logits.shape[0] != len(rows):
        raise ValueError(f"logits must be [num_rows={len(rows)}, vocab], got {tuple(logits.shape)}")
    out = logits.clone()
    _apply_min_tokens(out, rows)
    _apply_logit_bias(out, rows)
    _apply_penalties(out, rows)
    _apply_temperature_and_truncation(out, rows)
    return out


def compute_probs(processed_logits: Tensor, rows: list[RowState]) -> Tensor:
    """processed logits [num_rows, vocab] -> probs [num_rows, vocab] float32.

    Greedy rows are one-hot at torch.argmax of the processed logits (ties -> lowest id).
    """
    greedy = _rows_where(rows, lambda r: r.params.greedy)
    if not greedy:
        return processed_logits.float().softmax(dim=-1)
    device = processed_logits.device
    probs = torch.zeros(processed_logits.shape, dtype=torch.float32, device=device)
    index = _index(greedy, device)
    argmax = processed_logits[index].argmax(dim=-1)  # [num_greedy]
    probs[index, argmax] = 1.0
    sampled = _rows_where(rows, lambda r: not r.params.greedy)
    if sampled:
        index = _index(sampled, device)
        probs[index] = processed_logits[index].float().softmax(dim=-1)
    return probs


def row_generator(seed: int, output_index: int, stream: int,
                  device: torch.device | str = "cpu") -> torch.Generator:
    """A generator for one (request seed, output token index, purpose) triple.

    The triple is hashed (blake2b) into a 63-bit seed, so neighbouring triples are unrelated.
    """
    key = f"{seed}:{output_index}:{stream}".encode()
    derived = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1
    generator = torch.Generator(device=device)
    generator.manual_seed(derived)
    return generator


def exponential_noise(num_rows: int, vocab_size: int, generators: list[torch.Generator | None],
                      device: torch.device | str) -> Tensor:
    """[num_rows, vocab] Exp(1) noise, clamped away from 0; row i drawn from generators[i]."""
    noise = torch.empty(num_rows, vocab_size, dtype=torch.float32, device=device)
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if len(unseeded) == num_rows:
        noise.exponential_()
    else:
        for i, g in enumerate(generators):
            if g is not None:
                noise[i].exponential_(generator=g)
        if unseeded:
            index = _index(unseeded, device)
            noise[index] = torch.empty(len(unseeded), vocab_size, device=device).exponential_()
    # NOTE: exponential_ can return exactly 0 in float32; p / 0 would be inf or nan.
    return noise.clamp_min_(torch.finfo(torch.float32).tiny)


def sample(probs: Tensor, generators: list[torch.Generator | None]) -> Tensor:
    """probs [num_rows, vocab] (need not be normalised) -> token ids [num_rows] int64.

    Exponential race: argmax_i p_i / E_i with E_i ~ Exp(1) is exactly a draw from p / sum(p).
    A one-hot row always returns its hot index (every other ratio is 0).
    """
    if len(generators) != probs.shape[0]:
        raise ValueError(f"generators must have one entry per row ({probs.shape[0]}), "
                         f"got {len(generators)}")
    noise = exponential_noise(probs.shape[0], probs.shape[1], generators, probs.device)
    return (probs / noise).argmax(dim=-1)


def compute_logprobs(logits: Tensor, token_ids: Tensor, num_top: list[int],
                     with_rank: bool = False) -> list[tuple]:
    """log_softmax of the RAW logits [num_rows, vocab] (vLLM's default).

    Returns per row (chosen token's logprob, [(token id, logprob), ...] top-N descending), plus
    the chosen token's rank (1 = most likely) as a third element when `with_rank`.
    """
    if len(num_top) != logits.shape[0]:
        raise ValueError(f"num_top must have one entry per row ({logits.shape[0]}), "
                         f"got {len(num_top)}")
    logprobs = logits.float().log_softmax(dim=-1)  # [num_rows, vocab]
    token_ids = torch.as_tensor(token_ids, device=logits.device).long()
    chosen = logprobs.gather(1, token_ids[:, None])  # [num_rows, 1]
    n_max = max(num_top, default=0)
    if n_max > 0:
        top = logprobs.topk(n_max, dim=-1)
        top_values, top_ids = top.values.tolist(), top.indices.tolist()
    ranks = ((logprobs > chosen).sum(dim=-1) + 1).tolist() if with_rank else None
    chosen_list = chosen[:, 0].tolist()
    out = []
    for i, n in enumerate(num_top):
        top_n = list(zip(top_ids[i][:n], top_values[i][:n])) if n > 0 else []
        out.append((chosen_list[i], top_n, ranks[i]) if with_rank else (chosen_list[i], top_n))
    return out
