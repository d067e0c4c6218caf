"""Greedy verification and exact rejection sampling over ragged batches of draft tokens.

Glossary
- draft tokens d_1..d_k: what the drafter proposed for one request this step (k may be 0).
- target_probs: the target model's processed distributions for the k + 1 positions of the
  verify window [last, d_1..d_k]; row j is the distribution of the token that follows d_j
  (row 0 follows the last verified token).
- draft_probs: the drafter's processed distribution that d_j was sampled from; None means
  one-hot drafts (the n-gram drafter proposes tokens deterministically).
- accepted: the leading draft tokens that pass verification; they join the output as they are.
- recovered: the token drawn at the first rejection, from normalize(max(0, target - draft));
  with it the output distribution of that position is exactly the target's.
- bonus: the token drawn from the last target row when every draft token was accepted.
Each request therefore gains num_accepted + 1 tokens per step.

Layout (R requests, request r has k_r draft tokens, N = sum k_r):
  cu_num_draft     [R + 1] int64   cumulative k_r, cu_num_draft[0] = 0
  draft_token_ids  [N] int64       request r's drafts at cu_num_draft[r]:cu_num_draft[r + 1]
  draft_probs      [N, vocab] float32 or None
  target_probs     [N + R, vocab] float32; request r's k_r + 1 rows start at cu_num_draft[r] + r
  uniforms         [N] float32 in [0, 1): d_j is accepted iff u_j * draft_prob < target_prob

On the device: `greedy_verify_device` and `rejection_sample_device` never read a device value
on the host; they return one packed int64 tensor [R, 2 + width] per batch (`pack layout`: column
0 num_accepted, then the new tokens, -1 after them) that the caller brings back in ONE transfer
and splits with `unpack_verified`. `greedy_verify` / `rejection_sample` are those plus the one
`.tolist()`.

Randomness for seeded requests comes from sampling.row_generator, keyed by the output index of
the token being decided, so it does not depend on the batch or on earlier acceptance.

How a verify step uses this: build k_r + 1 sampling.RowStates per request (row j's
output_token_ids = output + d_1..d_j), target_probs = compute_probs(process_logits(...)); the
drafter must have sampled d_j from draft_probs processed with the same RowStates (seeded:
row_generator(seed, index, STREAM_DRAFT)). Then uniforms = draft_uniforms(...) and
rejection_sample(...). Greedy requests may go through greedy_verify, or through
rejection_sample too: their one-hot target rows make it return exactly greedy_verify's result.
"""

from __future__ import annotations

import torch
from torch import Tensor

from specdec.sample.sampling import (STREAM_ACCEPT, STREAM_RECOVER, STREAM_SAMPLE, exponential_noise,
                              row_generator)


def _num_draft(cu_num_draft) -> list[int]:
    cu = [int(x) for x in (cu_num_draft.tolist() if isinstance(cu_num_draft, Tensor)
                           else cu_num_draft)]
    if not cu or cu[0] != 0 or any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"cu_num_draft must start at 0 and never decrease, got {cu}")
    return [b - a for a, b in zip(cu, cu[1:])]


def _check_layout(num_draft: list[int], draft_token_ids: Tensor, target_rows: int) -> None:
    n = sum(num_draft)
    if draft_token_ids.shape[0] != n:
        raise ValueError(f"draft_token_ids must have sum(k_r) = {n} entries, "
                         f"got {draft_token_ids.shape[0]}")
    if target_rows != n + len(num_draft):
        raise ValueError(f"target rows must be sum(k_r + 1) = {n + len(num_draft)}, "
                         f"got {target_rows}")


def _ragged_index(num_draft: list[int], device) -> tuple[Tensor, Tensor]:
    """For each flat draft position: (request index [N], position inside its request [N])."""
    counts = torch.tensor(num_draft, dtype=torch.long, device=device)
    req_index = torch.repeat_interleave(torch.arange(len(num_draft), device=device), counts)
    starts = torch.cumsum(counts, 0) - counts
    return req_index, torch.arange(req_index.shape[0], device=device) - starts[req_index]


def _count_accepted(accept: Tensor, num_draft: list[int]) -> Tensor:
    """accept [N] bool -> [R] int64 length of each request's leading run of True."""
    num_req, k_max = len(num_draft), max(num_draft, default=0)
    if k_max == 0:
        return torch.zeros(num_req, dtype=torch.long, device=accept.device)
    req_index, pos = _ragged_index(num_draft, accept.device)
    grid = torch.zeros(num_req, k_max, dtype=torch.long, device=accept.device)  # padding rejects
    grid[req_index, pos] = accept.long()
    return grid.cumprod(dim=1).sum(dim=1)


def _pack(draft_token_ids: Tensor, num_draft: list[int], num_accepted: Tensor, last: Tensor,
          width: int | None) -> Tensor:
    """[R, 2 + width] int64: num_accepted, then drafts[:num_accepted] + [last], then -1."""
    device = last.device
    width = max(num_draft, default=0) if width is None else width
    if width < max(num_draft, default=0):
        raise ValueError(f"width must be >= the longest draft ({max(num_draft)}), got {width}")
    num_req = len(num_draft)
    grid = torch.full((num_req, width + 1), -1, dtype=torch.long, device=device)
    if draft_token_ids.shape[0]:
        req_index, pos = _ragged_index(num_draft, device)
        grid[req_index, pos] = draft_token_ids.to(device).long()
    column = torch.arange(width + 1, device=device)
    grid = torch.where(column[None, :] < num_accepted[:, None], grid, -1)
    grid.scatter_(1, num_accepted[:, None], last.long()[:, None])
    return torch.cat([num_accepted[:, None], grid], dim=1)


def unpack_verified(packed: list[list[int]]) -> tuple[list[list[int]], list[int]]:
    """Host rows of a packed result -> (new token ids per request, num_accepted per request)."""
    tokens = [row[1:row[0] + 2] for row in packed]
    return tokens, [row[0] for row in packed]


def greedy_verify_device(target_argmax: Tensor, draft_token_ids: Tensor, cu_num_draft,
                         width: int | None = None) -> Tensor:
    """greedy_verify without leaving the device: returns the packed [R, 2 + width] result."""
    num_draft = _num_draft(cu_num_draft)
    _check_layout(num_draft, draft_token_ids, target_argmax.shape[0])
    device = target_argmax.device
    draft_token_ids = draft_token_ids.to(device)
    req_index, _ = _ragged_index(num_draft, device)
    flat = torch.arange(draft_token_ids.shape[0], device=device)
    match = draft_token_ids == target_argmax[flat + req_index]  # [N]
    num_accepted = _count_accepted(match, num_draft)
    counts = torch.tensor(num_draft, dtype=torch.long, device=device)
    starts = torch.cumsum(counts, 0) - counts + torch.arange(len(num_draft), device=device)
    last = target_argmax[starts + num_accepted]  # [R]
    return _pack(draft_token_ids, num_draft, num_accepted, last, width)


def greedy_verify(target_argmax: Tensor, draft_token_ids: Tensor, cu_num_draft
                  ) -> tuple[list[list[int]], list[int]]:
    """Accept the longest prefix of drafts equal to the target's argmax, then one target token.

    target_argmax [N + R] int64; returns (new token ids per request, num_accepted per request).
    """
    return unpack_verified(greedy_verify_device(target_argmax, draft_token_ids,
                                                cu_num_draft).tolist())


def draft_uniforms(seeds: list[int | None], num_output_tokens: list[int], cu_num_draft,
                   device: torch.device | str = "cpu") -> Tensor:
    """[N] float32 uniforms for the accept test; seeded requests use row_generator per position.

    num_output_tokens[r]: verified output tokens of request r before this window, so draft j
    (0-based) decides output index num_output_tokens[r] + j.
    """
    num_draft = _num_draft(cu_num_draft)
    uniforms = torch.rand(sum(num_draft), device=device)
    offset = 0
    for r, k in enumerate(num_draft):
        if seeds[r] is not None:
            for j in range(k):
                g = row_generator(seeds[r], num_output_tokens[r] + j, STREAM_ACCEPT, device)
                uniforms[offset + j] = torch.rand(1, generator=g, device=device)[0]
        offset += k
    return uniforms


def _final_noise(seeds, num_output_tokens, num_draft: list[int], num_accepted: Tensor,
                 vocab_size: int, device, precompute_seeded: bool | None) -> Tensor:
    """[R, vocab] Exp(1) noise for each request's recovered (or bonus) token.

    A seeded request's row depends on num_accepted (output index and stream). On a GPU
    (`precompute_seeded`, the default off the CPU) the host does not read it: the k_r + 1
    candidate rows are drawn and the right one is gathered on the device. On the CPU, where a
    read costs nothing and each 150k-vocab row costs milliseconds, num_accepted is read and
    one row drawn. Both give the same noise (the same generator per row). Unseeded rows come
    from the default generator, one [num_unseeded, vocab] draw."""
    num_req = len(num_draft)
    seeded = [r for r in range(num_req) if seeds is not None and seeds[r] is not None]
    if not seeded:
        return exponential_noise(num_req, vocab_size, [None] * num_req, device)
    if precompute_seeded is None:
        precompute_seeded = torch.device(device).type != "cpu"
    gens, first = [], []
    accepted = None if precompute_seeded else num_accepted.tolist()
    for r in seeded:
        first.append(len(gens))
        k = num_draft[r]
        for j in range(k + 1):  # j drafts accepted: recovered at j < k, bonus at j == k
            if accepted is not None and j != accepted[r]:
                continue
            stream = STREAM_SAMPLE if j == k else STREAM_RECOVER
            gens.append(row_generator(seeds[r], num_output_tokens[r] + j, stream, device))
    candidates = exponential_noise(len(gens), vocab_size, gens, device)  # [sum(k_r+1), vocab]
    seeded_index = torch.tensor(seeded, dtype=torch.long, device=device)
    pick = torch.tensor(first, dtype=torch.long, device=device)
    if precompute_seeded:
        pick = pick + num_accepted[seeded_index]
    seeded_set = set(seeded)
    unseeded = [r for r in range(num_req) if r not in seeded_set]
    noise = torch.empty(num_req, vocab_size, dtype=torch.float32, device=device)
    noise[seeded_index] = candidates[pick]
    if unseeded:
        noise[torch.tensor(unseeded, dtype=torch.long, device=device)] = exponential_noise(
            len(unseeded), vocab_size, [None] * len(unseeded), device)
    return noise


def rejection_sample_device(draft_token_ids: Tensor, cu_num_draft, draft_probs: Tensor | None,
                            target_probs: Tensor, uniforms: Tensor,
                            seeds: list[int | None] | None = None,
                            num_output_tokens: list[int] | None = None,
                            width: int | None = None,
                            precompute_seeded: bool | None = None) -> Tensor:
    """rejection_sample without leaving the device: returns the packed [R, 2 + width] result.
    (`precompute_seeded`: see _final_noise; None = on any device but the CPU.)

    The accept scan runs over all requests at once; one vectorised exponential race then draws
    every request's recovered or bonus token (seeded requests from their own row_generator with
    output index num_output_tokens[r] + num_accepted[r]).
    """
    num_draft = _num_draft(cu_num_draft)
    _check_layout(num_draft, draft_token_ids, target_probs.shape[0])
    num_req, device, vocab_size = len(num_draft), target_probs.device, target_probs.shape[1]
    if seeds is not None and num_output_tokens is None:
        raise ValueError("num_output_tokens is required when seeds are given")
    draft_token_ids = draft_token_ids.to(device).long()
    num_total = draft_token_ids.shape[0]
    req_index, _ = _ragged_index(num_draft, device)
    flat = torch.arange(num_total, device=device)
    target_p = target_probs[flat + req_index, draft_token_ids]  # [N]
    if draft_probs is None:
        accept = uniforms.to(device) < target_p  # one-hot drafts: draft prob is 1
    else:
        draft_p = draft_probs[flat, draft_token_ids]  # [N]
        accept = uniforms.to(device) * draft_p < target_p
    num_accepted = _count_accepted(accept, num_draft)  # [R]

    counts = torch.tensor(num_draft, dtype=torch.long, device=device)
    draft_starts = torch.cumsum(counts, 0) - counts  # [R]
    final_rows = target_probs[draft_starts + torch.arange(num_req, device=device) + num_accepted]
    if num_total:
        # NOTE: computed for every request (no host check of which were rejected); a request
        # that accepted everything keeps its bonus row. Its draft index is clamped in range.
        rejected = num_accepted < counts  # [R]
        rej_draft = (draft_starts + num_accepted).clamp_max(num_total - 1)  # [R]
        if draft_probs is None:
            residual = final_rows.clone()
            residual[torch.arange(num_req, device=device), draft_token_ids[rej_draft]] = 0.0
        else:
            residual = (final_rows - draft_probs[rej_draft]).clamp_min_(0.0)
        # NOTE: target == draft (numerically) leaves nothing; the target itself is then exact.
        empty = residual.sum(dim=-1, keepdim=True) <= 0.0
        use_residual = rejected[:, None] & ~empty
        final_rows = torch.where(use_residual, residual, final_rows)

    noise = _final_noise(seeds, num_output_tokens, num_draft, num_accepted, vocab_size, device,
                         precompute_seeded)
    last = (final_rows / noise).argmax(dim=-1)  # [R]
    return _pack(draft_token_ids, num_draft, num_accepted, last, width)


def rejection_sample(draft_token_ids: Tensor, cu_num_draft, draft_probs: Tensor | None,
                     target_probs: Tensor, uniforms: Tensor, seeds: list[int | None] | None = None,
                     num_output_tokens: list[int] | None = None,
                     precompute_seeded: bool | None = None
                     ) -> tuple[list[list[int]], list[int]]:
    """Exact speculative sampling; returns (new token ids per request, num_accepted per request).
    See rejection_sample_device; this adds the one transfer of the packed result."""
    return unpack_verified(rejection_sample_device(
        draft_token_ids, cu_num_draft, draft_probs, target_probs, uniforms, seeds,
        num_output_tokens, precompute_seeded=precompute_seeded).tolist())


def rejection_sample_reference(draft_token_ids: Tensor, cu_num_draft, draft_probs: Tensor | None,
                               target_probs: Tensor, uniforms: Tensor,
                               seeds: list[int | None] | None = None,
                               num_output_tokens: list[int] | None = None
                               ) -> tuple[list[list[int]], list[int]]:
    """Plain loops, one request and one draft token at a time; same outputs as rejection_sample
    given the same uniforms and seeds (unseeded requests draw from the default generator)."""
    num_draft = _num_draft(cu_num_draft)
    drafts, u = draft_token_ids.tolist(), uniforms.tolist()
    target = target_probs.tolist()
    draft = draft_probs.tolist() if draft_probs is not None else None
    vocab_size = target_probs.shape[1]
    out, accepted_list, offset = [], [], 0
    for r, k in enumerate(num_draft):
        row0 = offset + r
        tokens, residual = [], None
        for j in range(k):
            d = drafts[offset + j]
            target_row = target[row0 + j]
            draft_row = draft[offset + j] if draft is not None else [
                1.0 if t == d else 0.0 for t in range(vocab_size)]
            # float32 product, as in the vectorised path
            if float(torch.tensor(u[offset + j]) * torch.tensor(draft_row[d])) < target_row[d]:
                tokens.append(d)
                continue
            residual = [max(0.0, float(torch.tensor(target_row[t]) - torch.tensor(draft_row[t])))
                        for t in range(vocab_size)]
            if sum(residual) <= 0.0:
                residual = list(target_row)
            break
        num_accepted = len(tokens)
        weights = residual if residual is not None else target[row0 + k]
        gen = None
        if seeds is not None and seeds[r] is not None:
            stream = STREAM_SAMPLE if num_accepted == k else STREAM_RECOVER
            gen = row_generator(seeds[r], num_output_tokens[r] + num_accepted, stream,
                                target_probs.device)
        noise = exponential_noise(1, vocab_size, [gen], target_probs.device)[0].tolist()
        ratios = [float(torch.tensor(w, dtype=torch.float32) / torch.tensor(e))
                  for w, e in zip(weights, noise)]
        best = max(range(vocab_size), key=lambda t: (ratios[t], -t))  # first maximum, like argmax
        out.append(tokens + [best])
        accepted_list.append(num_accepted)
        offset += k
    return out, accepted_list
