"""Logits processors against hand-computed rows; probs; seeded sampling; logprobs."""

import math
import random

import pytest
import torch

from specdec.core.request import SamplingParams
from specdec.sample.sampling import (STREAM_ACCEPT, STREAM_SAMPLE, RowState, compute_logprobs,
                              compute_probs, process_logits, row_generator, sample)
from tests.stats import chi_square_pvalue

INF = float("inf")


def row(prompt=(), output=(), eos=None, **params) -> RowState:
    return RowState(SamplingParams(**params), list(prompt), list(output), eos)




def test_min_tokens_masks_eos_and_stop_token_ids_until_reached():
    logits = torch.zeros(3, 5)
    rows = [row(output=[0], eos=4, min_tokens=2, stop_token_ids=[2]),
            row(output=[0, 1], eos=4, min_tokens=2, stop_token_ids=[2]),
            row(output=[0], eos=4, min_tokens=2, ignore_eos=True),
            row(output=[], eos=frozenset({1, 3}), min_tokens=1)]
    logits = torch.zeros(4, 5)
    out = process_logits(logits, rows)
    assert out[3].tolist() == [0.0, -INF, 0.0, -INF, 0.0]
    assert out[0].tolist() == [0.0, 0.0, -INF, 0.0, -INF]
    assert out[1].tolist() == [0.0] * 5
    assert out[2].tolist() == [0.0, 0.0, 0.0, 0.0, -INF]  # ignore_eos only means "don't stop"
    assert logits.tolist() == [[0.0] * 5] * 4  # the input is not modified


def test_logit_bias_adds_to_named_tokens():
    out = process_logits(torch.zeros(1, 5), [row(logit_bias={1: 2.5, 3: -1.0})])
    assert out[0].tolist() == [0.0, 2.5, 0.0, -1.0, 0.0]
    with pytest.raises(ValueError, match=r"logit_bias token id must be in the vocabulary \[0, 5\), got 7"):
        process_logits(torch.zeros(1, 5), [row(logit_bias={7: 1.0})])


def test_repetition_penalty_divides_positive_and_multiplies_negative_over_prompt_and_output():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0, 0.5]])
    out = process_logits(logits, [row(prompt=[0], output=[1, 1], repetition_penalty=2.0)])
    assert out[0].tolist() == [1.0, -4.0, 1.0, -1.0, 0.5]


def test_presence_and_frequency_penalties_use_output_tokens_only():
    out = process_logits(torch.zeros(1, 5), [row(prompt=[0, 2], output=[1, 1, 3],
                                                 presence_penalty=0.5, frequency_penalty=0.25)])
    assert out[0].tolist() == [0.0, -1.0, 0.0, -0.75, 0.0]


def test_logit_bias_is_applied_before_repetition_penalty():
    out = process_logits(torch.zeros(1, 3), [row(output=[1], logit_bias={1: 2.0},
                                                 repetition_penalty=2.0)])
    assert out[0].tolist() == [0.0, 1.0, 0.0]  # (0 + 2) / 2, not 0 * 2 + 2


def test_temperature_divides_and_greedy_rows_are_untouched():
    logits = torch.tensor([[2.0, 4.0, -1.0], [2.0, 4.0, -1.0]])
    out = process_logits(logits, [row(temperature=2.0), row(temperature=0.0, top_k=1, min_p=0.9)])
    assert out.tolist() == [[1.0, 2.0, -0.5], [2.0, 4.0, -1.0]]


def test_top_k_keeps_ties_at_the_kth_value():
    logits = torch.tensor([[1.0, 3.0, 2.0, 3.0, 0.0], [1.0, 3.0, 2.0, 0.0, -1.0],
                           [1.0, 3.0, 2.0, 0.0, -1.0]])
    out = process_logits(logits, [row(top_k=2), row(top_k=2), row(top_k=-1)])
    assert out[0].tolist() == [-INF, 3.0, -INF, 3.0, -INF]
    assert out[1].tolist() == [-INF, 3.0, 2.0, -INF, -INF]
    assert out[2].tolist() == logits[2].tolist()


def test_top_p_drops_the_low_tail_and_keeps_the_top_token():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().repeat(3, 1)
    out = process_logits(logits, [row(top_p=0.75), row(top_p=0.4), row(top_p=0.01)])
    finite = (out > -INF).tolist()
    assert finite[0] == [True, True, False, False]  # ascending cumsum .05, .2 <= .25
    assert finite[1] == [True, False, False, False]
    assert finite[2] == [True, False, False, False]
    assert out[0, :2].tolist() == logits[0, :2].tolist()


def test_min_p_drops_tokens_below_a_fraction_of_the_top_prob():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    out = process_logits(logits, [row(min_p=0.2)])  # threshold 0.1
    assert (out > -INF).tolist() == [[True, True, True, False]]


def test_top_k_then_top_p_then_min_p_compose():
    logits = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log()
    # top_k=3 renormalises to .444 .333 .222; top_p=0.7 drops .222 (cumsum .222 <= .3);
    # min_p=0.8 then drops .333 < .8 * .444.
    out = process_logits(logits, [row(top_k=3, top_p=0.7, min_p=0.8)])
    assert (out > -INF).tolist() == [[True, False, False, False]]
    out = process_logits(logits, [row(top_k=3, top_p=0.7)])
    assert (out > -INF).tolist() == [[True, True, False, False]]


def test_compute_probs_softmax_and_greedy_one_hot_with_lowest_id_on_ties():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [1.0, 2.0, 0.0, 0.0]])
    rows = [row(temperature=0.0), row()]
    probs = compute_probs(process_logits(logits, rows), rows)
    assert probs[0].tolist() == [0.0, 1.0, 0.0, 0.0]
    assert torch.allclose(probs[1], logits[1].softmax(-1))
    assert sample(probs, [None, None])[0].item() == 1


def test_greedy_one_hot_rows_always_sample_their_argmax():
    probs = torch.zeros(64, 1000)
    hot = torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(1))
    probs[torch.arange(64), hot] = 1.0
    gens = [row_generator(i, 0, STREAM_SAMPLE) if i % 2 else None for i in range(64)]
    assert sample(probs, gens).tolist() == hot.tolist()


def test_row_generator_is_counter_based():
    a = torch.rand(4, generator=row_generator(7, 3, STREAM_SAMPLE)).tolist()
    assert a == torch.rand(4, generator=row_generator(7, 3, STREAM_SAMPLE)).tolist()
    others = [row_generator(7, 4, STREAM_SAMPLE), row_generator(7, 3, STREAM_ACCEPT),
              row_generator(8, 3, STREAM_SAMPLE)]
    for g in others:
        assert torch.rand(4, generator=g).tolist() != a


def test_seeded_rows_do_not_depend_on_batch_position_or_composition():
    torch.manual_seed(0)
    vocab = 5000
    mine = torch.rand(vocab)
    tokens_alone, tokens_in_batch = [], []
    for index in range(20):
        alone = sample(mine[None], [row_generator(42, index, STREAM_SAMPLE)])
        batch = torch.rand(7, vocab)
        batch[4] = mine
        gens = [None, row_generator(1, index, STREAM_SAMPLE), None, None,
                row_generator(42, index, STREAM_SAMPLE), None, row_generator(3, 0, STREAM_SAMPLE)]
        tokens_alone.append(alone.item())
        tokens_in_batch.append(sample(batch, gens)[4].item())
    assert tokens_alone == tokens_in_batch
    assert len(set(tokens_alone)) > 15  # different output indices draw different numbers


def test_sample_matches_probs_empirically():
    probs = torch.tensor([0.30, 0.20, 0.15, 0.12, 0.10, 0.07, 0.04, 0.02])
    n = 40_000
    torch.manual_seed(1234)
    tokens = sample(probs.repeat(n, 1), [None] * n)
    counts = torch.bincount(tokens, minlength=8)
    assert chi_square_pvalue(counts, probs) > 1e-3
    # the same test rejects a sampler that is off by a little (0.30 -> 0.28, 0.02 -> 0.04)
    biased = probs.clone()
    biased[0], biased[7] = 0.28, 0.04
    biased_counts = torch.bincount(sample(biased.repeat(n, 1), [None] * n), minlength=8)
    assert chi_square_pvalue(biased_counts, probs) < 1e-6


def test_seeded_sample_matches_probs_empirically():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    n = 4000
    gens = [row_generator(99, i, STREAM_SAMPLE) for i in range(n)]
    counts = torch.bincount(sample(probs.repeat(n, 1), gens), minlength=4)
    assert chi_square_pvalue(counts, probs) > 1e-3


def test_sample_accepts_unnormalised_rows_and_never_picks_zero_prob_tokens():
    probs = torch.tensor([[0.0, 2.0, 0.0, 6.0]]).repeat(2000, 1)
    tokens = sample(probs, [None] * 2000)
    assert set(tokens.tolist()) == {1, 3}


def test_compute_logprobs_top_n_in_descending_order_from_raw_logits():
    torch.manual_seed(3)
    logits = torch.randn(3, 50)
    chosen = torch.tensor([5, 17, 0])
    result = compute_logprobs(logits, chosen, [3, 0, 20], with_rank=True)
    expected = torch.log_softmax(logits, dim=-1)
    for i, (lp, top, rank) in enumerate(result):
        assert math.isclose(lp, expected[i, chosen[i]].item(), rel_tol=1e-6)
        order = expected[i].argsort(descending=True)
        assert [t for t, _ in top] == order[:len(top)].tolist()
        for t, v in top:
            assert math.isclose(v, expected[i, t].item(), rel_tol=1e-6)
        assert rank == (order == chosen[i]).nonzero().item() + 1
    assert [len(top) for _, top, _ in result] == [3, 0, 20]
    lp, top = compute_logprobs(logits[:1], chosen[:1], [2])[0]
    assert len(top) == 2 and lp == result[0][0]


def test_process_logits_checks_the_row_count():
    with pytest.raises(ValueError, match="num_rows=2"):
        process_logits(torch.zeros(3, 4), [row(), row()])


def test_penalties_in_a_mixed_batch_touch_only_their_rows():
    logits = torch.tensor([[1.0, -1.0, 2.0]] * 4)
    rows = [row(prompt=[0], output=[1]), row(prompt=[0], output=[1], repetition_penalty=2.0),
            row(prompt=[0], output=[2, 2], frequency_penalty=1.0),
            row(repetition_penalty=1.5, presence_penalty=1.0)]  # no tokens seen yet
    out = process_logits(logits, rows)
    assert out.tolist() == [[1.0, -1.0, 2.0], [0.5, -2.0, 2.0], [1.0, -1.0, 0.0],
                            [1.0, -1.0, 2.0]]


def reference_row(logits: torch.Tensor, r: RowState) -> torch.Tensor:
    """One row, plain loops over tokens, HF-style full sort for top-p."""
    x = logits.clone().double()
    p = r.params
    for t, bias in (p.logit_bias or {}).items():
        x[t] += bias
    for t in set(r.prompt_token_ids + r.output_token_ids):
        x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t in set(r.output_token_ids):
        x[t] -= p.frequency_penalty * r.output_token_ids.count(t) + p.presence_penalty
    if p.greedy:
        return x.float()
    x = x / p.temperature
    if p.top_k > 0:
        kth = sorted(x.tolist(), reverse=True)[p.top_k - 1]
        x[x < kth] = -INF
    if p.top_p < 1.0:
        ascending, order = x.sort()
        cum = ascending.softmax(-1).cumsum(-1)
        drop = cum <= 1 - p.top_p
        drop[-1] = False
        x[order[drop]] = -INF
    if p.min_p > 0:
        probs = x.softmax(-1)
        x[probs < p.min_p * probs.max()] = -INF
    return x.float()


def test_process_logits_matches_a_per_row_reference_on_random_rows():
    gen = torch.Generator().manual_seed(7)
    rng = random.Random(7)
    vocab = 1000
    for _ in range(5):
        rows = []
        for _ in range(12):
            rows.append(row(
                prompt=[rng.randrange(vocab) for _ in range(rng.randrange(6))],
                output=[rng.randrange(vocab) for _ in range(rng.randrange(6))],
                temperature=rng.choice([0.0, 0.5, 1.0, 3.0]), top_k=rng.choice([0, 1, 5, 600]),
                top_p=rng.choice([1.0, 0.3, 0.9, 0.99]), min_p=rng.choice([0.0, 0.05]),
                repetition_penalty=rng.choice([1.0, 1.3]), presence_penalty=rng.choice([0.0, 0.7]),
                frequency_penalty=rng.choice([0.0, -0.4]),
                logit_bias=rng.choice([None, {3: 5.0, 9: -2.0}])))
        logits = torch.randn(len(rows), vocab, generator=gen) * rng.choice([0.3, 3.0])
        out = process_logits(logits, rows)
        for i, r in enumerate(rows):
            expected = reference_row(logits[i], r)
            assert torch.equal(out[i].isinf(), expected.isinf()), i
            finite = ~expected.isinf()
            assert torch.allclose(out[i][finite], expected[finite], rtol=1e-5, atol=1e-5)
