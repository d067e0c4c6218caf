"""The engine at tensor_parallel_size 2 (CPU, gloo): greedy speculative output equals TP=1 token
for token, on the tiny random models and on the real SmolLM2-135M (9 heads in 3 KV groups: an
uneven split of 2 + 1 groups over the two ranks)."""

from __future__ import annotations

import pytest

from specdec.core.config import from_dict
from specdec.core.request import SamplingParams
from specdec.llm import LLM

PROMPTS = ["The quick brown fox", "def add(a, b):", "Once upon a time there"]


def _greedy_outputs(config, tensor_parallel_size: int, max_tokens: int):
    llm = LLM(config, tensor_parallel_size=tensor_parallel_size)
    try:
        outs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                                    ignore_eos=True))
        drafts = llm.engine.counters["drafts"]
        return [o.outputs[0].token_ids for o in outs], drafts, llm.engine.parallel
    finally:
        llm.engine.close()


def _config(target: str, draft: str, draft_dtype: str | None = None):
    return from_dict({"model": {"path": target, "max_model_len": 256},
                      "device": {"device": "cpu", "num_threads": 1},
                      "cache": {"num_blocks": 64},
                      "spec": {"method": "draft", "draft_model": draft,
                               "draft_dtype": draft_dtype, "num_speculative_tokens": 3,
                               "adaptive": False}})


def test_tiny_greedy_speculation_matches_tp1(tiny_llama_dir, tiny_draft_dir):
    config = _config(tiny_llama_dir, tiny_draft_dir)
    single, _, _ = _greedy_outputs(config, 1, 24)
    split, drafts, driver = _greedy_outputs(config, 2, 24)
    assert split == single
    assert drafts > 0 and driver.steps > 0
    assert not any(p.is_alive() for p in driver.workers)  # close() stopped them


def _smollm2() -> str:
    from specdec.fetch import resolve_model_path
    try:
        return resolve_model_path("smollm2-135m-instruct", fetch_if_missing=False)
    except FileNotFoundError:
        pytest.skip("SmolLM2-135M-Instruct is not in the model cache (specdec fetch)")


@pytest.mark.slow
def test_smollm2_greedy_speculation_matches_tp1():
    path = _smollm2()
    # The draft is the same weights in bfloat16: close to the target, not equal, so the
    # verify steps both accept and reject.
    config = _config(path, path, draft_dtype="bfloat16")
    single, _, _ = _greedy_outputs(config, 1, 32)
    split, drafts, _ = _greedy_outputs(config, 2, 32)
    assert drafts > 0
    assert split == single
