"""Prompt logprobs (echo + logprobs, lm-evaluation-harness): equal to transformers' log_softmax,
with and without chunked prefill, next to a request without them in the same batch."""

import pytest
import torch

from specdec.core.config import from_dict
from specdec.core.request import SamplingParams
from specdec.engine import Engine
from specdec.sample.sampling import compute_logprobs


@pytest.mark.parametrize("chunk", [512, 16])
def test_prompt_logprobs_match_transformers(tiny_llama_dir, chunk):
    from transformers import AutoModelForCausalLM

    engine = Engine(from_dict({
        "model": {"path": tiny_llama_dir, "max_model_len": 256}, "device": {"device": "cpu"},
        "scheduler": {"max_num_batched_tokens": chunk},
        "spec": {"method": "ngram", "num_speculative_tokens": 3}}))
    prompt = list(range(5, 45))
    engine.add_request("a", prompt, SamplingParams(max_tokens=3, temperature=0,
                                                   prompt_logprobs=2))
    engine.add_request("b", list(range(50, 70)), SamplingParams(max_tokens=3, temperature=0))
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    a = [o for o in outputs if o.request_id == "a"]
    b = [o for o in outputs if o.request_id == "b"]
    assert all(o.prompt_logprobs is None for o in b)
    got = a[-1].prompt_logprobs
    assert got[0] is None and len(got) == len(prompt)

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0]
    ref = compute_logprobs(logits[:-1], torch.tensor(prompt[1:]), [2] * (len(prompt) - 1))
    for (lp, top), (ref_lp, ref_top) in zip(got[1:], ref):
        assert lp == pytest.approx(ref_lp, abs=1e-4)
        assert [t for t, _ in top] == [t for t, _ in ref_top]
    # The sampled tokens are unaffected: greedy equals a run without prompt logprobs.
    engine.add_request("c", prompt, SamplingParams(max_tokens=3, temperature=0))
    plain = []
    while engine.has_unfinished_requests():
        plain += engine.step()
    assert plain[-1].outputs[0].token_ids == a[-1].outputs[0].token_ids
    assert engine.scheduler.block_pool.num_used_blocks == 0
