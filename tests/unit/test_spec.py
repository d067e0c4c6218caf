"""Speculative decoding on tiny random models: greedy exactness for k = 1..8 at batch 1 and in
a mixed batch, n-gram drafting, the sampled distribution against the target's exact one,
rollback after rejections, adaptive k with a bad drafter, and the k = 0 path."""

from __future__ import annotations

import math
import random

import pytest
import torch

from specdec import LLM, SamplingParams
from specdec.core.config import Config
from specdec.runner import CostModel
from tests.conftest import make_tiny_config, save_tiny_model
from tests.stats import chi_square_pvalue

MAX_NEAR_TIE_GAP = 1e-3  # fp32: a flipped token with a bigger top-2 logit gap is a bug


def make_llm(path: str, **overrides) -> LLM:
    base = {"model.path": path, "device.device": "cpu", "model.max_model_len": 512}
    base.update(overrides)
    return LLM(Config().replace(**base))


def spec_llm(target: str, draft: str | None, k: int, method: str = "draft", **overrides) -> LLM:
    kw = {"spec.method": method, "spec.num_speculative_tokens": k, "spec.adaptive": False}
    if draft is not None:
        kw["spec.draft_model"] = draft
    kw.update(overrides)
    return make_llm(target, **kw)


def prompts(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(3, 384) for _ in range(rng.randint(4, 70))]}
            for _ in range(n)]


def assert_same_greedy(spec_outputs, ref_outputs) -> None:
    """Token-for-token equality; at a mismatch the reference's top-2 logprob gap (= logit gap)
    must show a near-tie, otherwise it is a bug."""
    for i, (s, r) in enumerate(zip(spec_outputs, ref_outputs)):
        got, want = s.outputs[0].token_ids, r.outputs[0].token_ids
        if got == want:
            continue
        pos = next(j for j, (a, b) in enumerate(zip(got, want)) if a != b)
        _, top = r.outputs[0].logprobs[pos]
        gap = top[0][1] - top[1][1]
        assert gap <= MAX_NEAR_TIE_GAP, (
            f"request {i}: token {pos} differs ({got[pos]} vs {want[pos]}) with top-2 gap "
            f"{gap:.2e} > {MAX_NEAR_TIE_GAP}: a bug, not a near-tie")


GREEDY = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True, logprobs=2)


@pytest.fixture(scope="module")
def reference(tiny_llama_dir):
    llm = make_llm(tiny_llama_dir)
    batch = prompts(8, seed=11)
    return batch, llm.generate(batch, GREEDY)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 6, 7, 8])
def test_greedy_exact_tiny_pair(tiny_llama_dir, tiny_draft_dir, reference, k):
    batch, expected = reference
    llm = spec_llm(tiny_llama_dir, tiny_draft_dir, k)
    assert_same_greedy(llm.generate(batch[:1], GREEDY), expected[:1])  # batch 1
    mixed = llm.generate(batch, GREEDY)  # a mixed batch of 8
    assert_same_greedy(mixed, expected)
    stats = llm.engine.stats()
    assert stats.spec_num_drafts > 0 and stats.spec_num_draft_tokens > 0
    assert stats.num_blocks_free == stats.num_blocks_total


def test_mixed_greedy_and_seeded_sampled_batch_with_an_int4_draft(tiny_llama_dir, tiny_draft_dir,
                                                                   reference):
    """Greedy rows (argmax drafts, no draft probs) and seeded sampled rows (sampled drafts with
    probs) in one batch: greedy equals the no-spec reference, each sampled request equals
    itself run alone -- a row mix-up between the two kinds would break one or the other."""
    batch, expected = reference
    llm = spec_llm(tiny_llama_dir, tiny_draft_dir, 3, **{"spec.draft_quantization": "int4"})
    sampled = [SamplingParams(temperature=0.8, top_p=0.9, max_tokens=32, ignore_eos=True,
                              seed=100 + i) for i in range(4)]
    alone = [llm.generate([p], s)[0] for p, s in zip(batch[:4], sampled)]
    mixed = llm.generate(batch[:4] + batch[:4], [GREEDY] * 4 + sampled)
    assert_same_greedy(mixed[:4], expected[:4])
    for got, want in zip(mixed[4:], alone):
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
    assert len({tuple(o.outputs[0].token_ids) for o in alone}) == 4
    stats = llm.engine.stats()
    assert 0 < stats.spec_num_accepted_tokens < stats.spec_num_draft_tokens
    assert stats.num_blocks_free == stats.num_blocks_total


def test_greedy_exact_self_draft_accepts_everything(tiny_llama_dir, reference):
    batch, expected = reference
    llm = spec_llm(tiny_llama_dir, tiny_llama_dir, 4)
    out = llm.generate(batch, GREEDY)
    assert_same_greedy(out, expected)
    stats = llm.engine.stats()
    # A copy of the target as draft: every draft token is accepted (up to max_tokens caps).
    assert stats.spec_num_accepted_tokens == stats.spec_num_draft_tokens
    assert all(o.metrics.acceptance_length > 3.0 for o in out)


def test_greedy_exact_ngram(tiny_llama_dir, reference):
    batch, expected = reference
    llm = spec_llm(tiny_llama_dir, None, 4, method="ngram", **{"spec.ngram_min": 1})
    assert_same_greedy(llm.generate(batch[:1], GREEDY), expected[:1])
    out = llm.generate(batch, GREEDY)
    assert_same_greedy(out, expected)
    assert llm.engine.stats().spec_num_accepted_tokens > 0


def test_rollback_logits_equal_fresh_run(tiny_llama_dir, tiny_draft_dir, reference):
    """After many rejections the target's next-token distributions (top-5 logprobs at every
    position) equal a no-spec run's: rejected draft KV never leaks into later steps."""
    batch, _ = reference
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, logprobs=5)
    spec = spec_llm(tiny_llama_dir, tiny_draft_dir, 6).generate(batch, params)
    ref = make_llm(tiny_llama_dir).generate(batch, params)
    rejected = sum(o.metrics.num_draft_tokens - o.metrics.num_accepted_tokens for o in spec)
    assert rejected > 50
    for s, r in zip(spec, ref):
        assert s.outputs[0].token_ids == r.outputs[0].token_ids
        for (c1, top1), (c2, top2) in zip(s.outputs[0].logprobs, r.outputs[0].logprobs):
            assert [t for t, _ in top1] == [t for t, _ in top2]
            assert max(abs(a - b) for (_, a), (_, b) in zip(top1, top2)) < 1e-4
            assert abs(c1 - c2) < 1e-4


def test_k_zero_is_a_clean_path(tiny_llama_dir, tiny_draft_dir, reference):
    batch, expected = reference
    llm = spec_llm(tiny_llama_dir, tiny_draft_dir, 4)
    off = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True, logprobs=2,
                         num_speculative_tokens=0)
    out = llm.generate(batch, off)
    assert_same_greedy(out, expected)
    assert llm.engine.stats().spec_num_drafts == 0
    assert all(o.metrics.acceptance_length == 1.0 for o in out)


class AlwaysWrongDrafter:
    """Proposes token 0 (a special token the random target never picks) k times."""

    has_model = False

    def propose(self, requests, matchers=None):
        from specdec.spec.drafters import Proposal
        return [Proposal([0] * k, None) for _, k in requests]


def test_adaptive_k_falls_to_zero_with_a_bad_drafter(tiny_llama_dir):
    llm = make_llm(tiny_llama_dir, **{"spec.method": "ngram", "spec.num_speculative_tokens": 4,
                                      "spec.adaptive": True})
    engine = llm.engine
    engine.drafter = AlwaysWrongDrafter()
    # NOTE: fixed costs (a verify token costs 1 % of a step), so the test does not depend on
    # this machine's timings: only the measured acceptance may turn k down.
    cost = CostModel()
    cost.table = {n: 0.010 + 0.0001 * (n - 1) for n in (1, 2, 8, 64)}
    engine.controller.target_cost = cost
    engine.add_request("bad", [5, 6, 7, 8], SamplingParams(temperature=0.0, max_tokens=80,
                                                           ignore_eos=True))
    ks, produced = [], []
    while engine.has_unfinished_requests():
        outs = engine.step()
        if engine.controller.last_k:
            ks.append(engine.controller.last_k[0])
            produced.append(sum(len(o.outputs[0].token_ids_delta) for o in outs))
    assert ks[0] > 0, "the prior should start by speculating"
    assert all(n >= 1 for n in produced), "every decode step yields at least one token"
    tail = ks[-30:]
    # Mostly 0, with an occasional k = 1 probe (alpha drifts back toward the prior when idle).
    assert sum(k == 0 for k in tail) >= 0.6 * len(tail) and max(tail) <= 1, ks
    ref = make_llm(tiny_llama_dir).generate([{"prompt_token_ids": [5, 6, 7, 8]}],
                                            SamplingParams(temperature=0.0, max_tokens=80,
                                                           ignore_eos=True))
    assert engine.stats().spec_num_accepted_tokens == 0
    assert ref[0].outputs[0].token_ids  # the reference ran; equality is covered above


# ---- distribution exactness ---------------------------------------------------------------

VOCAB = 32
PROMPT = [5, 9, 13]
NUM_SAMPLES = 20_000
DIST_PARAMS = SamplingParams(temperature=0.7, top_k=20, top_p=0.9, max_tokens=3,
                             ignore_eos=True)


@pytest.fixture(scope="module")
def small_vocab_pair(tmp_path_factory):
    target = save_tiny_model(str(tmp_path_factory.mktemp("v32_target")),
                             make_tiny_config("llama", vocab_size=VOCAB, initializer_range=0.1),
                             seed=21)
    draft = save_tiny_model(str(tmp_path_factory.mktemp("v32_draft")),
                            make_tiny_config("draft", vocab_size=VOCAB, initializer_range=0.1),
                            seed=22)
    return target, draft


def exact_joint(target_dir: str, params: SamplingParams) -> torch.Tensor:
    """P(t1, t2, t3) [V, V, V] of the target's processed distribution, by enumeration with
    transformers' model (independent of our paged model and of speculation)."""
    from transformers import AutoModelForCausalLM

    from specdec.sample.sampling import RowState, compute_probs, process_logits
    model = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()

    def step_probs(prefixes: list[list[int]]) -> torch.Tensor:
        with torch.no_grad():
            logits = model(torch.tensor([PROMPT + p for p in prefixes])).logits[:, -1].float()
        rows = [RowState(params, PROMPT, p, None) for p in prefixes]
        return compute_probs(process_logits(logits, rows), rows)

    p1 = step_probs([[]])[0]  # [V]
    p2 = step_probs([[a] for a in range(VOCAB)])  # [V, V]
    p3 = step_probs([[a, b] for a in range(VOCAB) for b in range(VOCAB)]).view(VOCAB, VOCAB,
                                                                               VOCAB)
    return p1[:, None, None] * p2[:, :, None] * p3


def sample_joint(llm: LLM) -> torch.Tensor:
    outs = llm.generate([{"prompt_token_ids": PROMPT}] * NUM_SAMPLES, DIST_PARAMS)
    counts = torch.zeros(VOCAB, VOCAB, VOCAB)
    for o in outs:
        a, b, c = o.outputs[0].token_ids
        counts[a, b, c] += 1
    return counts


def dist_llm(target: str, draft: str) -> LLM:
    return spec_llm(target, draft, 2, **{"scheduler.max_num_seqs": 512,
                                         "scheduler.max_num_batched_tokens": 4096,
                                         "model.max_model_len": 64, "device.seed": 1})


def test_distribution_matches_target_and_catches_a_biased_rule(small_vocab_pair, monkeypatch):
    target, draft = small_vocab_pair
    joint = exact_joint(target, DIST_PARAMS)
    assert math.isclose(float(joint.sum()), 1.0, abs_tol=1e-4)
    llm = dist_llm(target, draft)
    counts = sample_joint(llm)
    stats = llm.engine.stats()
    rate = stats.spec_num_accepted_tokens / stats.spec_num_draft_tokens
    assert 0.05 < rate < 0.95, f"acceptance {rate:.2f}: the test needs both outcomes"
    p_first = chi_square_pvalue(counts.sum(dim=(1, 2)), joint.sum(dim=(1, 2)))
    p_pair = chi_square_pvalue(counts.sum(dim=2), joint.sum(dim=2))
    p_third = chi_square_pvalue(counts.sum(dim=(0, 1)), joint.sum(dim=(0, 1)))
    p_joint = chi_square_pvalue(counts, joint)
    assert min(p_first, p_pair, p_third, p_joint) > 1e-3, (p_first, p_pair, p_third, p_joint)

    # The same test must fail for a real bias: accepting with min(1, draft / target).
    import specdec.engine as engine_module
    monkeypatch.setattr(engine_module, "rejection_sample", biased_rejection_sample)
    biased_counts = sample_joint(dist_llm(target, draft))
    p_biased = chi_square_pvalue(biased_counts, joint)
    p_biased_pair = chi_square_pvalue(biased_counts.sum(dim=2), joint.sum(dim=2))
    assert min(p_biased, p_biased_pair) < 1e-6, (p_biased, p_biased_pair)


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
