"""Drafters: propose up to k tokens per request for the target to verify in one pass.

- `DraftModelDrafter`: a smaller model with the same tokenizer. Its KV lives in its own tensors in
  the target's block layout and reuses the target's block ids, so one allocation covers both. Each
  step it first catches up on the tokens it has not seen (the prompt on the first step, then the
  one or two tokens the last verify produced), then runs k-1 single-token steps batched across
  requests. Draft tokens are sampled from the draft's *processed* distribution (the request's own
  temperature, top-k/p, penalties), which is what rejection sampling needs.
- `NgramDrafter` (prompt lookup): match the last n tokens against prompt + output so far and
  propose what followed the latest earlier match. No model; its distribution is one-hot.
- Both at once (`spec.prompt_lookup`, a draft model's drafter with a `lookup`): a request whose
  last `lookup_min` tokens occurred before proposes what followed them with no draft forward;
  otherwise the model drafts, and when a shorter match's next token equals the draft token just
  sampled, the rest of what followed that match becomes the proposal's tail and drafting stops.
  Prompt-lookup drafts are one-hot (deterministic given the tokens before them), so rejection
  sampling stays exact; the draft model catches up on them in its next first forward.

Draft KV bookkeeping: `request.draft_num_computed_tokens` counts positions whose draft KV is
valid. After a verify that kept `num_computed_tokens` target positions, the engine lowers it to
`min(draft_num_computed_tokens, num_computed_tokens)`: rejected draft positions are rewritten next
time, exactly like the target's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from specdec.core.request import Request
from specdec.core.scheduler import pins_lookahead
from specdec.runner import ModelRunner, SeqSlice
from specdec.sample.grammar import GrammarMatcher, apply_token_bitmask_, new_bitmask
from specdec.sample.sampling import (STREAM_DRAFT, RowState, compute_probs, process_logits,
                              row_generator, sample)



@dataclass(slots=True)
class Proposal:
    draft_token_ids: list[int]
    # [len(draft_token_ids), vocab] processed; None: one-hot (n-gram), or a greedy request
    # (greedy verification compares tokens and never reads probs)
    draft_probs: torch.Tensor | None
    forced: tuple[int, ...] = ()  # indices of the drafts the grammar forced (one-hot)
    # How many leading drafts the draft model sampled; the rest came from prompt lookup
    # (one-hot). None: all of them came from this proposal's one drafter.
    num_model: int | None = None


class Drafter(Protocol):
    has_model: bool

    def propose(self, requests: list[tuple[Request, int]],
                matchers: list[GrammarMatcher | None] | None = None) -> list[Proposal]:
        """For each (request, k) with k >= 1, up to k draft tokens following all_token_ids.

        matchers[i] (structured output): the drafts must be grammar-valid; a model drafter
        samples under the grammar's masks, so its draft probs are masked too. A matcher is
        left in the state it came in."""
        ...


class NgramDrafter:
    """Prompt-lookup drafting: the longest recent n-gram match (n from max down to min)."""

    has_model = False

    def __init__(self, ngram_min: int = 1, ngram_max: int = 4):
        self.ngram_min = ngram_min
        self.ngram_max = ngram_max

    def propose(self, requests: list[tuple[Request, int]],
                matchers: list[GrammarMatcher | None] | None = None) -> list[Proposal]:
        out = []
        for i, (req, k) in enumerate(requests):
            drafts = self.lookup(req.all_token_ids, k)
            matcher = matchers[i] if matchers else None
            if matcher is not None and drafts:
                drafts = drafts[:matcher.validate(drafts)]  # the grammar-valid prefix
            out.append(Proposal(drafts, None))
        return out

    def lookup(self, tokens: list[int], k: int) -> list[int]:
        num_tokens = len(tokens)
        for n in range(min(self.ngram_max, num_tokens - 1), self.ngram_min - 1, -1):
            suffix = tokens[num_tokens - n:]
            first = suffix[0]
            # Latest earlier occurrence whose continuation exists: start i < num_tokens - n.
            for i in range(num_tokens - n - 1, -1, -1):
                if tokens[i] == first and tokens[i:i + n] == suffix:
                    return tokens[i + n:i + n + k]
        return []


class DraftModelDrafter:
    """Runs the draft model batched across requests; returns tokens and their draft probs."""

    has_model = True

    def __init__(self, runner: ModelRunner, max_num_batched_tokens: int | None = None,
                 lookup: NgramDrafter | None = None, lookup_min: int = 4):
        self.runner = runner
        # Most tokens one draft forward may take (the step's token budget); None: no limit.
        self.max_num_batched_tokens = max_num_batched_tokens
        # Prompt lookup beside the model (see the module docstring): `lookup` finds the matches
        # that extend a draft token, `first` (n >= lookup_min) the ones that replace the model.
        self.lookup = lookup
        self.first = (NgramDrafter(lookup_min, max(lookup_min, lookup.ngram_max))
                      if lookup is not None else None)

    def _catch_up(self, requests: list[tuple[Request, int]]) -> tuple[list[SeqSlice], list[int]]:
        """The first forward's windows: each request's unseen tokens up to its last one.

        Requests are served in order while the token budget lasts; a request whose catch-up
        does not fit gets a chunk of what is left (no logits, no drafts this step) and
        continues next step, so one forward never exceeds the budget (a long prompt, a prefix
        hit or a preemption would otherwise run thousands of tokens, and their mask, at once).
        Returns the windows and the indices of the requests that draft this step.
        """
        budget = self.max_num_batched_tokens
        seqs, drafting = [], []
        for i, (req, _) in enumerate(requests):
            start = min(req.draft_num_computed_tokens, req.num_tokens - 1)
            num_missing = req.num_tokens - start
            if budget is not None and num_missing > budget and pins_lookahead(req):
                # NOTE: a seeded request must draft the k it was granted (which random stream
                # decides a position depends on it): it catches up now, in forwards of its own
                # of at most the budget each, instead of waiting for a later step.
                chunk = self.max_num_batched_tokens
                while num_missing > chunk:
                    self.runner.execute([SeqSlice(req.token_ids_slice(start, start + chunk),
                                                  start, req.block_ids, 0)])
                    start += chunk
                    num_missing -= chunk
                    req.draft_num_computed_tokens = start
            elif budget is not None and num_missing > budget:
                if budget > 0:
                    seqs.append(SeqSlice(req.token_ids_slice(start, start + budget), start,
                                         req.block_ids, 0))
                    req.draft_num_computed_tokens = start + budget
                    budget = 0
                continue
            if budget is not None:
                budget = max(budget - num_missing, 0)
            seqs.append(SeqSlice(req.token_ids_slice(start, req.num_tokens), start,
                                 req.block_ids, 1))
            drafting.append(i)
        return seqs, drafting

    def propose(self, requests: list[tuple[Request, int]],
                matchers: list[GrammarMatcher | None] | None = None) -> list[Proposal]:
        if not requests:
            return []
        matchers = matchers or [None] * len(requests)
        if self.first is None:
            return self._propose_model(requests, matchers)
        out: list[Proposal | None] = [None] * len(requests)
        for i, (req, k) in enumerate(requests):
            # NOTE: a seeded sampled request keeps model drafts: which random stream decides
            # a position depends on how it was drafted (see pins_lookahead).
            if matchers[i] is None and not pins_lookahead(req):
                tokens = self.first.lookup(req.all_token_ids, k)
                if tokens:
                    out[i] = Proposal(tokens, None, num_model=0)
        rest = [i for i, prop in enumerate(out) if prop is None]
        if rest:
            drafted = self._propose_model([requests[i] for i in rest], [matchers[i] for i in rest])
            for i, prop in zip(rest, drafted):
                out[i] = prop
        return out

    def _propose_model(self, requests: list[tuple[Request, int]],
                       matchers: list[GrammarMatcher | None]) -> list[Proposal]:
        consumed = [0] * len(requests)  # draft tokens fed to each matcher, rolled back below
        cut = [None] * len(requests)  # first draft index the grammar could not extend
        try:
            return self._propose(requests, matchers, consumed, cut)
        finally:
            for matcher, n in zip(matchers, consumed):
                if matcher is not None:
                    matcher.rollback(n)

    def _propose(self, requests, matchers, consumed, cut) -> list[Proposal]:
        if all(m is None for m in matchers) and not any(
                _reads_token_values(req.sampling_params) for req, _ in requests):
            return self._propose_on_device(requests)
        drafts: list[list[int]] = [[] for _ in requests]
        probs: list[list[torch.Tensor]] = [[] for _ in requests]
        fed = [0] * len(requests)  # drafts already run through the draft model
        forced: list[list[int]] = [[] for _ in requests]  # indices of forced drafts
        first_seqs, drafting = self._catch_up(requests)
        if not drafting and first_seqs:
            self.runner.execute(first_seqs)  # catch-up chunks only; nothing to propose
        step = 0
        while True:
            active = [i for i in drafting if len(drafts[i]) < requests[i][1]]
            if not active:
                break
            if step == 0:
                seqs = first_seqs
            else:
                # NOTE: a request whose grammar forced tokens after its last draft runs them
                # all in this one forward (draft j sits at position num_tokens + j).
                seqs = [SeqSlice(drafts[i][fed[i]:], requests[i][0].num_tokens + fed[i],
                                 requests[i][0].block_ids, 1) for i in active]
            logits = self.runner.execute(seqs, observe=step > 0)  # [len(active), vocab]
            for i in active:
                fed[i] = len(drafts[i])
            masked = [r for r, i in enumerate(active) if matchers[i] is not None
                      and cut[i] is None]
            if masked:
                # The draft samples under the same grammar masks as the target's rows.
                bitmask = new_bitmask(len(masked), logits.shape[1])
                for m, r in enumerate(masked):
                    matchers[active[r]].fill_bitmask(bitmask, m)
                index = torch.tensor(masked, device=logits.device)
                logits = logits.clone()
                logits[index] = apply_token_bitmask_(logits[index], bitmask)
                dead = torch.isneginf(logits[index].amax(dim=-1)).tolist()
                for m, r in enumerate(masked):
                    if dead[m]:  # nothing allowed (grammar complete or failed): stop here
                        cut[active[r]] = len(drafts[active[r]])
                        logits[r] = 0.0
            rows = [RowState(requests[i][0].sampling_params, requests[i][0].prompt_token_ids,
                             requests[i][0].output_token_ids + drafts[i],
                             requests[i][0].eos_token_id, requests[i][0].sampling_constants)
                    for i in active]
            processed = process_logits(logits, rows)
            if masked:
                # e.g. min_tokens banning the EOS that is all the grammar allows: the target
                # rows let the grammar win; the draft just stops proposing here.
                index = torch.tensor(masked, device=processed.device)
                for m, d in enumerate(torch.isneginf(processed[index].amax(dim=-1)).tolist()):
                    if d and cut[active[masked[m]]] is None:
                        cut[active[masked[m]]] = len(drafts[active[masked[m]]])
                    if d:
                        processed[masked[m]] = 0.0
            # Greedy rows propose the draft's argmax (what compute_probs makes one-hot) and
            # keep no probs: greedy verification compares tokens only.
            token_ids = processed.argmax(dim=-1).tolist()
            sampled = [r for r, row in enumerate(rows) if not row.params.greedy]
            if sampled:
                sampled_rows = [rows[r] for r in sampled]
                row_probs = compute_probs(processed[torch.tensor(sampled)], sampled_rows)
                generators = []
                for row in sampled_rows:
                    index = len(row.output_token_ids)  # this draft token's output index
                    generators.append(None if row.params.seed is None
                                      else row_generator(row.params.seed, index, STREAM_DRAFT))
                for j, token_id in enumerate(sample(row_probs, generators).tolist()):
                    token_ids[sampled[j]] = token_id
                    probs[active[sampled[j]]].append(row_probs[j])
            for row, i in enumerate(active):
                drafts[i].append(token_ids[row])
                if matchers[i] is not None and cut[i] is None:
                    if not matchers[i].consume([token_ids[row]]):
                        cut[i] = len(drafts[i]) - 1
                        continue
                    consumed[i] += 1
                    if matchers[i].is_stopped:  # complete: nothing may follow this token
                        cut[i] = len(drafts[i])
                        continue
                    self._force(i, requests, matchers, drafts, probs, consumed, forced,
                                logits.device, logits.shape[1])
            for i in active:
                req = requests[i][0]
                req.draft_num_computed_tokens = req.num_tokens + fed[i]
            step += 1
        out = []
        for d, p, c, f in zip(drafts, probs, cut, forced):
            if c is not None:
                d, p = d[:c], p[:c]
            out.append(Proposal(d, torch.stack(p) if p else None,
                                tuple(j for j in f if j < len(d))))
        return out

    @staticmethod
    def _force(i, requests, matchers, drafts, probs, consumed, forced, device, vocab) -> None:
        """Append the tokens request i's grammar forces after its last draft (up to its k):
        one-hot drafts, so no draft forward samples them; the next forward runs them at once.
        Their draft probs are one-hot (the proposal is deterministic there), which keeps
        rejection sampling exact."""
        req, k = requests[i]
        tokens = matchers[i].forced_tokens(k - len(drafts[i]))
        if not tokens or not matchers[i].consume(tokens):
            return
        consumed[i] += len(tokens)
        forced[i].extend(range(len(drafts[i]), len(drafts[i]) + len(tokens)))
        drafts[i].extend(tokens)
        if not req.sampling_params.greedy:
            one_hot = torch.zeros(len(tokens), vocab, device=device)
            one_hot[torch.arange(len(tokens)), torch.tensor(tokens)] = 1.0
            probs[i].extend(one_hot)

    def _propose_on_device(self, requests) -> list[Proposal]:
        """The draft loop without a host read per step: each step's tokens feed the next
        step's input ids on the device, and all k steps' tokens come back in ONE transfer.

        Only for requests whose logits processors never read the draft token values (no
        grammar, no repetition/presence/frequency penalty): their rows' output_token_ids
        then need the right length only, and the drafts are placeholders until the end."""
        first_seqs, drafting = self._catch_up(requests)
        max_k = max((requests[i][1] for i in drafting), default=0)
        if not drafting and first_seqs:
            self.runner.execute(first_seqs)  # catch-up chunks only; nothing to propose
        device = self.runner.device
        column = {i: c for c, i in enumerate(drafting)}
        grid = torch.full((max_k, len(drafting)), -1, dtype=torch.long, device=device)
        probs: list[list[torch.Tensor]] = [[] for _ in requests]
        previous = None  # [len(previous active)] token ids of the last step, on the device
        previous_active: list[int] = []
        # Prompt lookup's tail per request (ends its drafting), and its model drafts so far
        # (read back each step: only with a lookup, where the host needs the tokens anyway).
        tails: dict[int, list[int]] = {}
        drafted: dict[int, list[int]] = {i: [] for i in drafting}
        for step in range(max_k):
            active = [i for i in drafting if requests[i][1] > step and i not in tails]
            if not active:
                break
            if step == 0:
                seqs, input_ids = first_seqs, None
            else:
                seqs = [SeqSlice([0], requests[i][0].num_tokens + step - 1,
                                 requests[i][0].block_ids, 1) for i in active]
                where = {i: r for r, i in enumerate(previous_active)}
                pick = torch.tensor([where[i] for i in active], dtype=torch.long)
                input_ids = previous.index_select(0, pick.to(device))  # [len(active)]
            logits = self.runner.execute(seqs, observe=step > 0, input_ids=input_ids)
            rows = [RowState(requests[i][0].sampling_params, requests[i][0].prompt_token_ids,
                             requests[i][0].output_token_ids + [0] * step,
                             requests[i][0].eos_token_id, requests[i][0].sampling_constants)
                    for i in active]
            processed = process_logits(logits, rows)
            token_ids = processed.argmax(dim=-1)  # [len(active)], greedy rows keep these
            sampled = [r for r, row in enumerate(rows) if not row.params.greedy]
            if sampled:
                sampled_rows = [rows[r] for r in sampled]
                index = torch.tensor(sampled, dtype=torch.long, device=device)
                row_probs = compute_probs(processed[index], sampled_rows)
                generators = [None if row.params.seed is None
                              else row_generator(row.params.seed, len(row.output_token_ids),
                                                 STREAM_DRAFT)
                              for row in sampled_rows]
                token_ids = token_ids.index_copy(0, index, sample(row_probs, generators))
                for j, r in enumerate(sampled):
                    probs[active[r]].append(row_probs[j])
            cols = torch.tensor([column[i] for i in active], dtype=torch.long, device=device)
            grid[step].index_copy_(0, cols, token_ids)
            previous, previous_active = token_ids, active
            for i in active:
                req = requests[i][0]
                req.draft_num_computed_tokens = req.num_tokens + step
            if self.lookup is not None:
                self._extend(requests, active, token_ids.tolist(), drafted, tails, probs,
                             logits.shape[1], device)
        # the round's one read, [drafting][max_k] (with a lookup `drafted` holds them already)
        host = grid.t().tolist() if max_k and self.lookup is None else []
        out = []
        for i, (_, k) in enumerate(requests):
            if i not in column:
                out.append(Proposal([], None))
                continue
            p = probs[i]
            if self.lookup is None:
                out.append(Proposal(host[column[i]][:k], torch.stack(p) if p else None))
                continue
            tokens = drafted[i] + tails.get(i, [])
            out.append(Proposal(tokens, torch.stack(p) if p else None,
                                num_model=len(drafted[i])))
        return out

    def _extend(self, requests, active: list[int], token_ids: list[int],
                drafted: dict[int, list[int]], tails: dict[int, list[int]],
                probs: list[list[torch.Tensor]], vocab: int, device) -> None:
        """After a draft step: each active request whose newest draft token is also what
        prompt lookup predicts there takes the rest of the lookup's continuation as its tail
        (one-hot draft probs for sampled requests) and stops drafting."""
        for i, token in zip(active, token_ids):
            req, k = requests[i]
            before = drafted[i]
            drafted[i] = before + [token]
            if len(drafted[i]) >= k or pins_lookahead(req):
                continue
            follow = self.lookup.lookup(req.all_token_ids + before, k - len(before))
            if len(follow) < 2 or follow[0] != token:
                continue
            tails[i] = follow[1:]
            if not req.sampling_params.greedy:
                one_hot = torch.zeros(len(tails[i]), vocab, device=device)
                one_hot[torch.arange(len(tails[i])), torch.tensor(tails[i])] = 1.0
                probs[i].extend(one_hot)


def _reads_token_values(params) -> bool:
    """Whether a request's logits processors read the values of earlier tokens (penalties),
    not just how many there are."""
    return (params.repetition_penalty != 1.0 or params.presence_penalty != 0.0
            or params.frequency_penalty != 0.0)
