"""Per-request sampling constants (min_tokens bans, logit_bias tensors): built once per request,
validated then, and equal to the plain per-row path they replace."""

import dataclasses
import random

import pytest
import torch

from specdec.core.request import SamplingParams
from specdec.sample.sampling import RowState, build_request_constants, process_logits

VOCAB = 500


def random_row(rng: random.Random) -> RowState:
    params = SamplingParams(
        temperature=rng.choice([0.0, 0.7, 1.0]), top_k=rng.choice([0, 7]),
        min_tokens=rng.choice([0, 3, 10]), repetition_penalty=rng.choice([1.0, 1.2]),
        stop_token_ids=rng.sample(range(VOCAB), rng.randrange(4)),
        logit_bias=rng.choice([None, {rng.randrange(VOCAB): rng.uniform(-5, 5)
                                      for _ in range(rng.randrange(1, 30))}]))
    eos = rng.choice([None, 2, frozenset({2, 7})])
    return RowState(params, [rng.randrange(VOCAB) for _ in range(5)],
                    [rng.randrange(VOCAB) for _ in range(rng.randrange(12))], eos)


def test_prebuilt_constants_equal_the_plain_path():
    rng = random.Random(11)
    gen = torch.Generator().manual_seed(11)
    for _ in range(20):
        plain = [random_row(rng) for _ in range(9)]
        prebuilt = [dataclasses.replace(r, constants=build_request_constants(
            r.params, r.eos_token_id, VOCAB)) for r in plain]
        mixed = [p if i % 2 else b for i, (p, b) in enumerate(zip(plain, prebuilt))]
        logits = torch.randn(len(plain), VOCAB, generator=gen)
        want = process_logits(logits, plain)
        assert torch.equal(process_logits(logits, prebuilt), want)
        assert torch.equal(process_logits(logits, mixed), want)


def test_constants_validate_logit_bias_once():
    with pytest.raises(ValueError,
                       match=r"logit_bias token id 500 is outside the vocabulary \[0, 500\)"):
        build_request_constants(SamplingParams(logit_bias={500: 1.0}), None, VOCAB)
    constants = build_request_constants(
        SamplingParams(min_tokens=2, stop_token_ids=[9, 600], logit_bias={4: 1.5}),
        frozenset({2, 3}), VOCAB)
    assert constants.banned_ids.tolist() == [2, 3, 9]  # 600 is past the vocabulary
    assert constants.bias_ids.tolist() == [4] and constants.bias_values.tolist() == [1.5]


def test_engine_builds_constants_once_per_request(tiny_llama_dir, tiny_draft_dir, monkeypatch):
    import specdec.engine as engine_module
    from specdec import LLM
    from specdec.core.config import Config

    calls = []
    real = engine_module.build_request_constants

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)
    monkeypatch.setattr(engine_module, "build_request_constants", counting)
    llm = LLM(Config().replace(**{
        "model.path": tiny_llama_dir, "device.device": "cpu", "model.max_model_len": 256,
        "spec.method": "draft", "spec.draft_model": tiny_draft_dir,
        "spec.num_speculative_tokens": 3, "spec.adaptive": False}))
    bias = {t: 0.5 for t in range(3, 200)}
    params = SamplingParams(temperature=0.8, seed=1, max_tokens=20, min_tokens=10,
                            ignore_eos=True, logit_bias=bias, stop_token_ids=[5, 6])
    prompts = [{"prompt_token_ids": [10 + i, 20, 30, 40]} for i in range(3)]
    out = llm.generate(prompts, params)
    assert len(calls) == 3 and all(len(o.outputs[0].token_ids) == 20 for o in out)
    with pytest.raises(ValueError, match="logit_bias token id 10000 is outside the vocabulary"):
        llm.generate(prompts[:1], SamplingParams(logit_bias={10_000: 1.0}))
    assert not llm.engine.has_unfinished_requests()
