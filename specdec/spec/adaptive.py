"""Adaptive speculation: choose k per request per step from measured acceptance and costs.

Model: request i accepts each successive draft token with probability alpha_i (estimated from its
own history), so k drafts yield 1 + alpha + ... + alpha^k tokens in expectation. A step costs
one target forward over (decodes + drafts) tokens plus max(k) draft forwards; both costs come from
the runners' measured cost tables. For each candidate K = 0..k_max every request gets
min(K, its cap, its useful depth) drafts, where the useful depth stops where alpha^j would add
less than the tokens per second of plain decoding would buy with the same time. The K with the
best expected tokens per second wins.

Catch-up: a request the draft has not followed (a new one, or one held at k = 0 for a while)
must first run every token the draft has not seen. That one-time cost is charged spread over
the steps the request has left (remaining tokens / expected tokens per step, at most
CATCH_UP_HORIZON, or CATCH_UP_HORIZON_FEW while only a few requests decode): worth paying for
a prompt at batch 1, never for the last few tokens of a request, nor for a crowd of fresh
requests under load.

K = 0 (no speculation) is always a candidate, so the expected throughput is never planned
below no-spec — under load the per-token verify cost rises and K falls to 0 by itself. A
request held at k = 0 drafts nothing; its alpha drifts back toward the prior, so k can return
when acceptance or load changes.
"""

from __future__ import annotations

from dataclasses import dataclass

from specdec.core.request import Request
from specdec.runner import CostModel

PRIOR_ACCEPT = 0.7
PRIOR_WEIGHT = 2.0
DECAY = 0.9
EXPLORE_RATE = 0.02  # per idle step, alpha drifts back toward the prior so k can recover
# A new request's prior is the acceptance the engine has seen lately (over every request, this
# decay per observed draft window) where that is above PRIOR_ACCEPT. NOTE: with a draft
# step ~0.45 of a target step (the int4 pair on the 2-core CPU) speculation pays at batch 1
# only above alpha ~0.8, where code runs (~0.85-0.9); with the fixed 0.7 prior every new
# request, whose draft must first catch up on its whole prompt, was planned at k = 0 for good.
POPULATION_DECAY = 0.98
PROBE_ALPHA = 0.9  # what code reaches with the Qwen pair (acceptance length ~3.5 at k ~3)
# NOTE: a draft token also costs work the cost tables do not see (its logits row is processed
# and verified on the host), so one whose chance of acceptance is below this never pays.
MIN_GAIN = 0.1
# NOTE: catch-up is amortized over at most this many steps: under load the plan may fall back
# to k = 0 right after, and a catch-up paid for 100 future steps is then wasted (measured:
# 16 fresh requests caught up once, drafted once, and cost 8 s of a 100 s run).
CATCH_UP_HORIZON = 8
# At most CONSERVATIVE_DECODES decoding requests there is no crowd to push k back to 0, and a
# fresh request's catch-up (its whole prompt: ~60 tokens of a chat prompt, ~0.1 s for the
# 0.5B draft on the 2-core CPU) is spread over up to this many steps. NOTE: over 8 steps such
# a prompt cost more than speculation gains, so a new request at batch 1 never drafted.
CATCH_UP_HORIZON_FEW = 32
# While the cost tables are being measured (a first start calibrates in the background), k is
# planned without them: CONSERVATIVE_K drafts per request when at most CONSERVATIVE_DECODES
# requests decode, else none. NOTE: on the dev VM a bf16 1.5B verify of 12 tokens costs 1.2x
# a 1-token step (bench calibration tables), so 4 requests x (1 + 2) rows stay near one
# step's cost; beyond that the verify cost is unknown, and k = 0 is never below no-spec.
CONSERVATIVE_K = 2
CONSERVATIVE_DECODES = 4


@dataclass(slots=True)
class AcceptanceStats:
    accepted: float = PRIOR_ACCEPT * PRIOR_WEIGHT
    rejected: float = (1 - PRIOR_ACCEPT) * PRIOR_WEIGHT

    @property
    def alpha(self) -> float:
        return self.accepted / (self.accepted + self.rejected)


class SpeculationController:
    """Sets `request.num_lookahead_tokens` before each schedule()."""

    def __init__(self, k_max: int, adaptive: bool, target_cost: CostModel,
                 draft_cost: CostModel | None, max_model_len: int):
        self.k_max = k_max
        self.adaptive = adaptive
        self.target_cost = target_cost
        self.draft_cost = draft_cost  # None: drafting is free (n-gram)
        self.max_model_len = max_model_len
        self.stats: dict[str, AcceptanceStats] = {}
        self.last_k: list[int] = []
        self.calibrating = False  # True until the engine's background calibration is done
        self.conservative_k = min(CONSERVATIVE_K, k_max)
        self.population = AcceptanceStats(0.0, 0.0)  # every request's windows, decayed

    def _seen_any(self) -> bool:
        return self.population.accepted + self.population.rejected > 0

    def prior(self) -> float:
        """The alpha a new request starts from (and an idle one drifts back to): the recent
        acceptance over all requests where it beats PRIOR_ACCEPT. NOTE: never below it, or a
        poor stretch would start every later request at k = 0, and with no drafts nothing
        would ever be observed again."""
        return max(PRIOR_ACCEPT, self.population.alpha) if self._seen_any() else PRIOR_ACCEPT

    def _stats(self, request_id: str) -> AcceptanceStats:
        st = self.stats.get(request_id)
        if st is None:
            a = self.prior()
            st = self.stats[request_id] = AcceptanceStats(a * PRIOR_WEIGHT,
                                                          (1 - a) * PRIOR_WEIGHT)
        return st

    def cap(self, req: Request) -> int:
        """The most drafts that can still be useful for this request."""
        params = req.sampling_params
        k = self.k_max if params.num_speculative_tokens is None else min(
            params.num_speculative_tokens, self.k_max)
        if params.max_tokens is not None:
            k = min(k, params.max_tokens - len(req.output_token_ids) - 1)
        k = min(k, self.max_model_len - req.num_tokens - 1)
        return max(k, 0)

    def choose(self, decodes: list[Request]) -> None:
        adaptive_reqs: list[tuple[Request, int, float]] = []
        for req in decodes:
            cap = self.cap(req)
            params = req.sampling_params
            # NOTE: a seeded sampled request keeps a fixed k: its random numbers are tied to
            # (seed, position, purpose), but which positions are drafts and which are bonus
            # tokens depends on k, so a timing-driven k would change its text from run to run.
            fixed = params.num_speculative_tokens is not None or (
                params.seed is not None and not params.greedy)
            if not self.adaptive or fixed:
                req.num_lookahead_tokens = cap
            else:
                st = self._stats(req.request_id)
                adaptive_reqs.append((req, cap, st.alpha))
        if adaptive_reqs:
            ks = self._plan(adaptive_reqs, len(decodes))
            if not self._seen_any() and len(decodes) <= CONSERVATIVE_DECODES:
                # NOTE: a probe: nothing was ever accepted or rejected, so every alpha is the
                # prior, and planned on it the first requests of a fresh engine may never
                # draft, leaving it nothing to learn from. Where drafting would pay at
                # PROBE_ALPHA, a few requests draft (at most conservative_k) until the first
                # windows are verified.
                hopeful = self._plan([(r, cap, PROBE_ALPHA) for r, cap, _ in adaptive_reqs],
                                     len(decodes))
                ks = [k or min(h, self.conservative_k) for k, h in zip(ks, hopeful)]
            for (req, _, _), k in zip(adaptive_reqs, ks):
                req.num_lookahead_tokens = k
                if k == 0:
                    # NOTE: no probe drafts: after idle steps the draft must first catch up on
                    # every token it missed, which under load cost more than it ever gained
                    # (measured: concurrency 16 fell to 0.6x no-spec). alpha drifts back
                    # toward the prior instead, and speculation resumes once the costs allow.
                    st, a = self.stats[req.request_id], self.prior()
                    st.accepted += EXPLORE_RATE * a
                    st.rejected += EXPLORE_RATE * (1 - a)
        self.last_k = [r.num_lookahead_tokens for r in decodes]

    def _draft_time(self, num_tokens: int) -> float:
        return 0.0 if self.draft_cost is None else self.draft_cost.predict(num_tokens)

    @staticmethod
    def catch_up(req: Request) -> int:
        """Tokens the draft runs before this request's first new draft (what it has not seen;
        1 or 2 when it drafted last step)."""
        return req.num_tokens - min(req.draft_num_computed_tokens, req.num_tokens - 1)

    def remaining(self, req: Request) -> int:
        """Tokens this request can still generate."""
        left = self.max_model_len - req.num_tokens
        if req.sampling_params.max_tokens is not None:
            left = min(left, req.sampling_params.max_tokens - len(req.output_token_ids))
        return max(left, 1)

    def _catch_up_time(self, reqs, ks: list[int], lags: list[int], first_step: int,
                       num_decodes: int) -> float:
        """Amortized time of catch-up tokens beyond the usual one or two per request."""
        excess = sum(lag - 2 for lag, k in zip(lags, ks) if k and lag > 2)
        if not excess or self.draft_cost is None:
            return 0.0
        per_token = (self._draft_time(first_step + excess) - self._draft_time(first_step)) / excess
        horizon = (CATCH_UP_HORIZON_FEW if num_decodes <= CONSERVATIVE_DECODES
                   else CATCH_UP_HORIZON)
        seconds = 0.0
        for (req, _, alpha), k, lag in zip(reqs, ks, lags):
            if k and lag > 2:
                tokens_per_step = 1.0 + sum(alpha ** j for j in range(1, k + 1))
                steps_left = min(max(self.remaining(req) / tokens_per_step, 1.0), horizon)
                seconds += per_token * (lag - 2) / steps_left
        return seconds

    def _plan(self, reqs: list[tuple[Request, int, float]], num_decodes: int) -> list[int]:
        if self.calibrating:
            k = self.conservative_k if num_decodes <= CONSERVATIVE_DECODES else 0
            return [min(cap, k) for _, cap, _ in reqs]
        if not self.target_cost.ready:
            return [cap for _, cap, _ in reqs]
        lags = [self.catch_up(req) for req, _, _ in reqs]
        base_time = self.target_cost.predict(num_decodes)
        base_rate = num_decodes / max(base_time, 1e-9)  # tokens per second without drafts
        per_token = max(self.target_cost.predict(num_decodes + 1) - base_time, 1e-9)
        per_draft = per_token + max(self._draft_time(num_decodes + 1)
                                    - self._draft_time(num_decodes), 0.0)
        # Useful depth: the j-th draft adds alpha^j tokens for per_draft seconds.
        depth = []
        for _, cap, alpha in reqs:
            j = 0
            while j < cap and alpha ** (j + 1) >= max(per_draft * base_rate, MIN_GAIN):
                j += 1
            depth.append(j)
        best_k, best_rate = [0] * len(reqs), base_rate
        for big_k in range(1, self.k_max + 1):
            ks = [min(big_k, d) for d in depth]
            if not any(ks):
                continue
            tokens = num_decodes + sum(sum(a ** j for j in range(1, k + 1))
                                       for (_, _, a), k in zip(reqs, ks))
            seconds = self.target_cost.predict(num_decodes + sum(ks))
            # The first draft step also catches up one or two tokens per request (more for a
            # request the draft has not followed: amortized below).
            first_step = sum(min(lag, 2) for lag, k in zip(lags, ks) if k)
            seconds += self._draft_time(first_step)
            for step in range(1, max(ks)):
                seconds += self._draft_time(sum(1 for k in ks if k > step))
            seconds += self._catch_up_time(reqs, ks, lags, first_step, num_decodes)
            rate = tokens / max(seconds, 1e-9)
            if rate > best_rate:
                best_k, best_rate = ks, rate
        return best_k

    def observe(self, request_id: str, num_draft: int, num_accepted: int) -> None:
        if num_draft == 0:
            return
        st = self._stats(request_id)
        rejected = 1 if num_accepted < num_draft else 0
        st.accepted = st.accepted * DECAY + num_accepted
        st.rejected = st.rejected * DECAY + rejected
        pop = self.population
        pop.accepted = pop.accepted * POPULATION_DECAY + num_accepted
        pop.rejected = pop.rejected * POPULATION_DECAY + rejected

    def forget(self, request_id: str) -> None:
        self.stats.pop(request_id, None)
