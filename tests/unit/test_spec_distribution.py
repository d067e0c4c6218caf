"""Speculative sampling is exact for every processed distribution, with multi-draft windows.

A tiny target/draft pair with a 16-token vocabulary. Each case samples N independent requests
through the engine with k = 3..5 and max_tokens = k + 2, so verify windows of every length
1..k occur (counted from the drafter's proposals). Three checks per case:
- the exact joint of the first three output tokens (enumerated with transformers' model, an
  "end" symbol after a stop), by chi-square;
- at every output position, each sample's token against the target's exact processed
  distribution given that sample's own prefix (teacher-forced transformers forward), by a
  chi-square on the summed residuals (`conditional_fit_pvalue`): this reaches the deep draft
  positions that no enumerable joint covers;
- the first window's acceptance: P(d1 accepted) = E_t1[sum_x min(p, q)] and P(d1, d2 accepted)
  by enumeration, against the observed counts (binomial z-score).

Mutations planted once to confirm these fail (each reverted):
- engine._accept builds row j's RowState from `drafts[:j + 1]` (a penalty off-by-one): the
  acceptance z-score is -28 (draft) / +30 (n-gram, negative penalties);
- rejection_sample draws the bonus token from row k - 1 instead of row k: p = 0;
- the drafter builds its RowState on `drafts[i][:-1]` and reports those probs (an exact but
  different draft): only the acceptance check sees it, z = -28;
- engine._check_stop tests only the last token of a run: "went on past a stop";
- the classic min(1, draft / target) accept rule: test_a_biased_accept_rule_fails_these_checks
  runs it in the suite.
Seeded-stream mix-ups (recovered token from STREAM_DRAFT, STREAM_DRAFT = STREAM_ACCEPT) are
too weak for 2500 samples here; test_rejection.py's seeded test catches both. A stop token
honoured at n >= min_tokens is an equivalent mutant (min_tokens masks it at that position).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import pytest
import torch

from specdec import LLM, SamplingParams
from specdec.core.config import Config
from specdec.sample.sampling import RowState, compute_probs, process_logits
from specdec.spec.drafters import NgramDrafter
from tests.conftest import make_tiny_config, save_tiny_model
from tests.stats import chi_square_pvalue, conditional_fit_pvalue

VOCAB = 16
END = VOCAB  # the symbol after a stop in the enumerated joint
EOS = 2  # the tiny tokenizer's <|im_end|>
PROMPT = [5, 9, 13, 5, 9, 4, 13, 5]
# NOTE: the target's own greedy cycle (8, 12, 8, ...) from PROMPT: n-gram drafts get accepted.
NGRAM_PROMPT = [5, 9, 13, 8, 12, 8, 12, 8, 12, 8]
NUM_SAMPLES = 2500
ALPHA = 1e-4  # per p-value; a case makes about a dozen


@dataclass(slots=True)
class Case:
    name: str
    method: str  # "draft" or "ngram"
    k: int
    params: dict
    seeded: bool = False
    stops: list[int] = field(default_factory=list)  # tokens that end a sequence (after min)
    prompt: list[int] = field(default_factory=lambda: list(PROMPT))
    draft_vocab: int | None = None  # spec.draft_vocab_size: the draft's pruned lm_head
    lookup_min: int | None = None  # spec.prompt_lookup beside the draft, with this minimum
    lookup_kind: str = ""  # the kind of lookup proposal the case makes (see run_case)
    self_draft: bool = False  # the target drafts for itself


PENALTIES = dict(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.3,
                 logit_bias={3: 1.5, 7: -2.0, 11: 0.8})
REPEATING = dict(repetition_penalty=0.8, presence_penalty=-0.6, frequency_penalty=-0.4,
                 logit_bias={3: 1.5, 7: -1.0, 11: 0.8})
TRUNCATION = dict(top_k=10, top_p=0.9, min_p=0.05)
CASES = [
    Case("penalties-draft-seeded", "draft", 4, dict(temperature=0.9, ignore_eos=True,
                                                    **PENALTIES), seeded=True),
    Case("truncation-draft", "draft", 3, dict(temperature=0.7, ignore_eos=True, **TRUNCATION)),
    # NOTE: the draft proposes only ids < 10 (the stop 11 and the biased 11 never): its
    # distribution is a proper one over those, and the output must still be the target's.
    Case("pruned-head-draft-seeded", "draft", 4, dict(temperature=0.9, min_tokens=1,
                                                      stop_token_ids=[11], **PENALTIES),
         seeded=True, stops=[EOS, 11], draft_vocab=10),
    Case("stops-draft-seeded", "draft", 5, dict(temperature=1.0, min_tokens=2,
                                                stop_token_ids=[11], repetition_penalty=1.2),
         seeded=True, stops=[EOS, 11]),
    # NOTE: negative penalties make the target repeat itself, so n-gram drafts get accepted.
    Case("penalties-stops-ngram", "ngram", 4, dict(temperature=0.7, min_tokens=1,
                                                   stop_token_ids=[7], **REPEATING),
         stops=[EOS, 7], prompt=NGRAM_PROMPT),
    Case("truncation-ngram-seeded", "ngram", 3, dict(temperature=0.8, ignore_eos=True,
                                                     repetition_penalty=0.8, **TRUNCATION),
         seeded=True, prompt=NGRAM_PROMPT),
    # Prompt lookup beside the draft model (spec.prompt_lookup). Tails: model drafts (with
    # probs) ending in one-hot lookup drafts where lookup agrees with the sampled draft token
    # (a self-draft agrees often; no match is long enough for a lookup-only proposal).
    # Mutation planted to confirm: the tail's draft probs set to the model's last row instead
    # of one-hot: joint3 p = 6e-47.
    Case("hot-self-draft-lookup-tails", "draft", 4, dict(temperature=1.3, ignore_eos=True),
         prompt=NGRAM_PROMPT, lookup_min=64, lookup_kind="lookup tail", self_draft=True),
    # Lookup-only proposals (no draft forward) beside model drafts on the host path
    # (penalties read token values).
    Case("penalties-stops-draft-lookup", "draft", 3, dict(temperature=0.7, min_tokens=1,
                                                          stop_token_ids=[7], **REPEATING),
         stops=[EOS, 7], prompt=NGRAM_PROMPT, lookup_min=2, lookup_kind="lookup only"),
]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(target dir, draft dir, HF target, HF draft) over a 16-token vocabulary."""
    from transformers import AutoModelForCausalLM
    target = save_tiny_model(str(tmp_path_factory.mktemp("v16_target")),
                             make_tiny_config("llama", vocab_size=VOCAB), seed=31)
    draft = save_tiny_model(str(tmp_path_factory.mktemp("v16_draft")),
                            make_tiny_config("draft", vocab_size=VOCAB), seed=32)
    load = lambda d: AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()  # noqa
    return target, draft, load(target), load(draft)


def sampling_params(case: Case, i: int) -> SamplingParams:
    return SamplingParams(max_tokens=case.k + 2, seed=1000 + i if case.seeded else None,
                          **case.params)


def run_case(case: Case, target: str, draft: str, num_samples: int = NUM_SAMPLES):
    """Sample NUM_SAMPLES requests; returns (outputs, window-length Counter, first-window
    accepted count per request, engine stats)."""
    # NOTE: a budget with room for every draft catch-up: a request whose catch-up is chunked
    # drafts nothing that step, and the checks below count a k-draft window right after t1.
    kw = {"model.path": target, "device.device": "cpu", "model.max_model_len": 64,
          "spec.method": case.method, "spec.num_speculative_tokens": case.k,
          "spec.adaptive": False, "scheduler.max_num_seqs": 512,
          "scheduler.max_num_batched_tokens": 16384, "device.seed": 7,
          "device.num_threads": 1}
    if case.method == "draft":
        kw["spec.draft_model"] = target if case.self_draft else draft
        kw["spec.draft_vocab_size"] = case.draft_vocab
    if case.lookup_min is not None:
        kw.update({"spec.prompt_lookup": True, "spec.prompt_lookup_min": case.lookup_min,
                   "spec.ngram_min": 1})
    llm = LLM(Config().replace(**kw))
    engine = llm.engine
    windows: Counter = Counter()
    first_accepted: dict[str, int] = {}
    propose, count_spec = engine.drafter.propose, engine._count_spec

    def counting_propose(requests):
        proposals = propose(requests)
        windows.update(len(p.draft_token_ids) for p in proposals)
        for p in proposals:  # prompt lookup's kinds of proposal (see Proposal.num_model)
            if p.num_model is not None and p.draft_token_ids:
                windows["lookup only" if p.num_model == 0 else
                        "lookup tail" if p.num_model < len(p.draft_token_ids) else "model"] += 1
        return proposals

    def recording_count_spec(req, num_draft, accepted):
        if len(req.output_token_ids) == 1:  # the window right after t1
            first_accepted[req.request_id] = (num_draft, accepted)
        count_spec(req, num_draft, accepted)

    engine.drafter.propose = counting_propose
    engine._count_spec = recording_count_spec
    params = [sampling_params(case, i) for i in range(num_samples)]
    outs = llm.generate([{"prompt_token_ids": case.prompt}] * num_samples, params)
    return [o.outputs[0] for o in outs], windows, first_accepted, engine.stats()


def processed_probs(model, params: SamplingParams, prompt: list[int],
                    prefixes: list[list[int]], head_rows: int | None = None) -> torch.Tensor:
    """[len(prefixes), V]: the processed next-token distribution after prompt + prefix
    (head_rows: only ids below it have logits, as a pruned draft head gives)."""
    out = []
    for lo in range(0, len(prefixes), 2048):
        chunk = prefixes[lo:lo + 2048]
        by_len: dict[int, list[int]] = {}  # no padding: one batch per prefix length
        for i, p in enumerate(chunk):
            by_len.setdefault(len(p), []).append(i)
        probs = torch.empty(len(chunk), VOCAB)
        for idx in by_len.values():
            ids = torch.tensor([prompt + chunk[i] for i in idx])
            with torch.no_grad():
                logits = model(ids).logits[:, -1].float()
            if head_rows is not None:
                logits[:, head_rows:] = float("-inf")
            rows = [RowState(params, prompt, chunk[i], frozenset([EOS])) for i in idx]
            probs[idx] = compute_probs(process_logits(logits, rows), rows)
        out.append(probs)
    return torch.cat(out)


def ended(case: Case, prefix: list[int], max_tokens: int) -> bool:
    if len(prefix) >= max_tokens:
        return True
    return any(t in case.stops and n > case.params.get("min_tokens", 0)
               for n, t in enumerate(prefix, 1))


def exact_joint(case: Case, model, depth: int) -> torch.Tensor:
    """P(t1..t_depth) over V + 1 symbols (END after the sequence stops), by enumeration."""
    params = sampling_params(case, 0)
    joint = torch.ones(1)
    prefixes: list[list[int]] = [[]]
    for _ in range(depth):
        live = [i for i, p in enumerate(prefixes) if END not in p
                and not ended(case, p, params.max_tokens)]
        nxt = torch.zeros(len(prefixes), VOCAB + 1)
        nxt[:, END] = 1.0
        if live:
            nxt[live] = torch.cat([processed_probs(model, params, case.prompt,
                                                   [prefixes[i] for i in live]),
                                   torch.zeros(len(live), 1)], dim=1)
        joint = (joint[:, None] * nxt).flatten()
        prefixes = [p + [t] for p in prefixes for t in range(VOCAB + 1)]
    return joint.view(*([VOCAB + 1] * depth))


def first_window_acceptance(case: Case, target, draft) -> tuple[float, float]:
    """Exact P(d1 accepted) and P(d1 and d2 accepted) in the window right after t1:
    E_t1[sum_x min(p, q)] and the two-step analogue (n-gram: p is one-hot on the proposal,
    and 0 where no n-gram matches, since then there is no window). t1 never stops."""
    params = sampling_params(case, 0)
    p1 = processed_probs(target, params, case.prompt, [[]])[0]
    firsts = [[a] for a in range(VOCAB)]
    q1 = processed_probs(target, params, case.prompt, firsts)  # [V, V]: q(x | t1)
    seconds = [[a, x] for a in range(VOCAB) for x in range(VOCAB)]
    q2 = processed_probs(target, params, case.prompt, seconds).view(VOCAB, VOCAB, VOCAB)
    if case.method == "draft":
        d1 = processed_probs(draft, params, case.prompt, firsts, case.draft_vocab)
        d2 = processed_probs(draft, params, case.prompt, seconds,
                             case.draft_vocab).view(VOCAB, VOCAB, VOCAB)
    else:  # one-hot n-gram proposals
        ngram = NgramDrafter(1, 4)
        d1, d2 = torch.zeros(VOCAB, VOCAB), torch.zeros(VOCAB, VOCAB, VOCAB)
        for a in range(VOCAB):
            prop = ngram.lookup(case.prompt + [a], case.k)
            if prop:
                d1[a, prop[0]] = 1.0
                if len(prop) > 1:
                    d2[a, prop[0], prop[1]] = 1.0
    m1 = torch.minimum(q1, d1)  # [V, V]
    m2 = torch.minimum(q2, d2).sum(dim=-1)  # [V, V]: P(d2 accepted | t1, d1 = x)
    return float((p1 * m1.sum(-1)).sum()), float((p1 * (m1 * m2).sum(-1)).sum())


def z_score(successes: int, trials: int, prob: float) -> float:
    return (successes - trials * prob) / math.sqrt(max(trials * prob * (1 - prob), 1e-12))


def fit_pvalues(case: Case, seqs: list[list[int]], target) -> dict[str, float]:
    """The joint of t1..t3 (END-padded) by chi-square, and every position against the target's
    exact conditional given the sample's own prefix."""
    pvalues = {}
    joint = exact_joint(case, target, 3)
    assert math.isclose(float(joint.sum()), 1.0, abs_tol=1e-4)
    counts = torch.zeros_like(joint)
    for s in seqs:
        counts[tuple((s + [END] * 3)[:3])] += 1
    pvalues["joint3"] = chi_square_pvalue(counts, joint)
    pvalues["pair23"] = chi_square_pvalue(counts.sum(dim=0), joint.sum(dim=0))
    params = sampling_params(case, 0)
    all_tokens, all_probs = [], []
    for pos in range(case.k + 2):
        have = [s for s in seqs if len(s) > pos]
        probs = processed_probs(target, params, case.prompt, [s[:pos] for s in have])
        tokens = torch.tensor([s[pos] for s in have])
        pvalues[f"pos{pos + 1}"] = conditional_fit_pvalue(tokens, probs)
        all_tokens.append(tokens)
        all_probs.append(probs)
    pvalues["all positions"] = conditional_fit_pvalue(torch.cat(all_tokens), torch.cat(all_probs))
    return pvalues


def acceptance_z(case: Case, first_accepted, num_samples: int, target, draft):
    """z-scores of P(d1 accepted) and P(d1, d2 accepted) in the window after t1."""
    exact1, exact2 = first_window_acceptance(case, target, draft)
    accepted = [a for _, a in first_accepted.values()]
    return (z_score(sum(a >= 1 for a in accepted), num_samples, exact1),
            z_score(sum(a >= 2 for a in accepted), num_samples, exact2))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_speculative_distribution_is_the_targets(pair, case):
    target_dir, draft_dir, target, draft = pair
    outs, windows, first_accepted, stats = run_case(case, target_dir, draft_dir)
    max_tokens = case.k + 2

    # Windows of every length 1..k happened (many times each; with prompt lookup, where
    # self-drafts are accepted, some lengths are rare).
    assert all(windows[n] >= (10 if case.lookup_min else 50) for n in range(1, case.k + 1)), \
        windows
    assert stats.spec_num_draft_tokens / stats.spec_num_drafts > 1.5
    assert 0 < stats.spec_num_accepted_tokens < stats.spec_num_draft_tokens
    assert all(n > 0 for n in stats.spec_accepted_per_pos[:2]), stats.spec_accepted_per_pos
    assert stats.num_blocks_free == stats.num_blocks_total

    seqs = [list(o.token_ids) for o in outs]
    min_tokens = case.params.get("min_tokens", 0)
    for s, o in zip(seqs, outs):
        assert 1 <= len(s) <= max_tokens
        assert not ended(case, s[:-1], max_tokens), f"{s} went on past a stop"
        stop_hit = s[-1] in case.stops and len(s) > min_tokens
        assert o.finish_reason == ("stop" if stop_hit else "length"), (s, o.finish_reason)
        assert stop_hit or len(s) == max_tokens, f"{s} stopped early"

    pvalues = fit_pvalues(case, seqs, target)
    if case.lookup_min is not None:
        assert windows[case.lookup_kind] >= 50, windows
        assert stats.spec_num_lookup_tokens > 0
    elif case.method == "draft":  # always a window of k drafts right after t1
        assert len(first_accepted) == NUM_SAMPLES
        assert all(n == case.k for n, _ in first_accepted.values())
    if case.lookup_min is None:  # the exact acceptance below models the drafter alone
        z1, z2 = acceptance_z(case, first_accepted, NUM_SAMPLES, target, draft)
        assert abs(z1) < 4.5 and abs(z2) < 4.5, (z1, z2)
    assert min(pvalues.values()) > ALPHA, pvalues


def test_a_biased_accept_rule_fails_these_checks(pair, monkeypatch):
    """The checks above have the power to see a real bias: the engine with the classic bug
    (accept with min(1, draft / target)) on the truncation case, 1500 samples."""
    import specdec.engine as engine_module
    target_dir, draft_dir, target, draft = pair
    case = CASES[1]
    monkeypatch.setattr(engine_module, "rejection_sample_device", biased_rejection_sample_device)
    outs, _, first_accepted, _ = run_case(case, target_dir, draft_dir, num_samples=1500)
    pvalues = fit_pvalues(case, [list(o.token_ids) for o in outs], target)
    z1, z2 = acceptance_z(case, first_accepted, 1500, target, draft)
    assert min(pvalues.values()) < 1e-6 and max(abs(z1), abs(z2)) > 6, (pvalues, z1, z2)


def biased_rejection_sample_device(*args, width: int, **kwargs):
    """biased_rejection_sample in the engine's packed layout (rejection.rejection_sample_device:
    [num_accepted, tokens..., -1 padding] per request)."""
    out, accepted = biased_rejection_sample(*args, **kwargs)
    return torch.tensor([[a] + t + [-1] * (width + 1 - len(t)) for t, a in zip(out, accepted)])


def biased_rejection_sample(draft_token_ids, cu_num_draft, draft_probs, target_probs, uniforms,
                            **_):
    """The classic bug: accept with min(1, draft_prob / target_prob); otherwise as usual."""
    out, accepted = [], []
    ids, u = draft_token_ids.tolist(), uniforms.tolist()
    for r in range(len(cu_num_draft) - 1):
        tokens = []
        for j in range(cu_num_draft[r], cu_num_draft[r + 1]):
            row, d = target_probs[j + r], ids[j]
            if u[j] * row[d] < draft_probs[j, d]:
                tokens.append(d)
                continue
            residual = (row - draft_probs[j]).clamp_min(0.0)
            residual = residual if residual.sum() > 0 else row
            tokens.append(int(torch.multinomial(residual, 1)))
            break
        else:
            tokens.append(int(torch.multinomial(target_probs[cu_num_draft[r + 1] + r], 1)))
        out.append(tokens)
        accepted.append(len(tokens) - 1)
    return out, accepted
