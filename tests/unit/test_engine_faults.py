"""Engine faults that must never happen mid-request: a draft with a shorter context, a failure
inside add_request, tiny temperatures, min_tokens with stop strings, padded vocabularies."""

from __future__ import annotations

import logging
import random

import pytest

from specdec import LLM, SamplingParams
from specdec.core.config import Config

from tests.conftest import make_tiny_config, save_tiny_model

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def make_llm(path: str, draft: str | None = None, **overrides) -> LLM:
    base = {"model.path": path, "device.device": "cpu", "model.max_model_len": 512}
    if draft is not None:
        base.update({"spec.method": "draft", "spec.draft_model": draft,
                     "spec.num_speculative_tokens": 3, "spec.adaptive": False})
    base.update(overrides)
    return LLM(Config().replace(**base))


def prompt(n: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    return {"prompt_token_ids": [rng.randrange(3, 384) for _ in range(n)]}


@pytest.fixture(scope="module")
def short_draft_dir(tmp_path_factory) -> str:
    return save_tiny_model(str(tmp_path_factory.mktemp("short_draft")),
                           make_tiny_config("draft", max_position_embeddings=128), seed=3)


def test_max_model_len_is_the_shorter_of_target_and_draft(tiny_llama_dir, short_draft_dir,
                                                          caplog):
    with caplog.at_level(logging.INFO, logger="specdec.engine"):
        llm = make_llm(tiny_llama_dir, short_draft_dir)
    assert llm.engine.max_model_len == 128
    assert llm.engine.scheduler.max_model_len == 128
    assert any("max_model_len = 128" in r.getMessage() and "draft" in r.getMessage()
               for r in caplog.records)
    # A prompt past the draft's context is a clear error at admission, not a crash mid-step.
    with pytest.raises(ValueError, match="max_model_len 128"):
        llm.generate([prompt(200)], GREEDY)
    assert not llm.engine.has_unfinished_requests()
    # Up to the limit, generation runs to the end of the draft's context.
    out = llm.generate([prompt(100)], SamplingParams(temperature=0.0, max_tokens=None,
                                                      ignore_eos=True))[0].outputs[0]
    assert len(out.token_ids) == 28 and out.finish_reason == "length"
    assert llm.engine.stats().num_blocks_free == llm.engine.num_blocks


def test_add_request_is_atomic(tiny_llama_dir, monkeypatch):
    import specdec.engine as engine_module

    llm = make_llm(tiny_llama_dir)
    engine = llm.engine

    class Boom(RuntimeError):
        pass

    def failing_detokenizer(*args, **kwargs):
        raise Boom("detokenizer failed")

    with monkeypatch.context() as patch:
        patch.setattr(engine_module, "IncrementalDetokenizer", failing_detokenizer)
        with pytest.raises(Boom):
            engine.add_request("r0", prompt(20)["prompt_token_ids"], GREEDY)
    assert engine.tracked == {}
    assert engine.scheduler.requests == {} and not engine.scheduler.waiting
    assert engine.scheduler._block_hashes == {}
    assert engine.stats().num_blocks_free == engine.num_blocks
    assert engine.step() == []  # nothing scheduled, no KeyError
    # The id is free again and the engine still serves.
    engine.add_request("r0", prompt(20)["prompt_token_ids"], GREEDY)
    outputs = []
    while engine.has_unfinished_requests():
        outputs.extend(engine.step())
    assert outputs[-1].finished and len(outputs[-1].outputs[0].token_ids) == 12


@pytest.mark.parametrize("temperature", [1e-40, 1e-6])
def test_tiny_temperature_is_greedy(tiny_llama_dir, temperature):
    llm = make_llm(tiny_llama_dir)
    greedy = llm.generate([prompt(30, seed=1)], GREEDY)[0].outputs[0].token_ids
    params = SamplingParams(temperature=temperature, max_tokens=12, ignore_eos=True)
    assert params.greedy
    assert llm.generate([prompt(30, seed=1)], params)[0].outputs[0].token_ids == greedy
    assert not SamplingParams(temperature=1e-5).greedy


def test_min_tokens_holds_back_stop_strings(tiny_llama_dir):
    llm = make_llm(tiny_llama_dir)
    tokenizer = llm.engine.tokenizer
    free = llm.generate([prompt(30, seed=2)], SamplingParams(
        temperature=0.0, max_tokens=30, ignore_eos=True))[0].outputs[0]
    # A stop string taken from the start of the free-running text: it ends the request early
    # without min_tokens, and may not end it before min_tokens tokens with it.
    first = tokenizer.decode(free.token_ids[:2], skip_special_tokens=True)
    stop = first.strip()[:1] or first[:1]
    assert stop
    early = llm.generate([prompt(30, seed=2)], SamplingParams(
        temperature=0.0, max_tokens=30, ignore_eos=True, stop=[stop]))[0].outputs[0]
    assert early.finish_reason == "stop" and len(early.token_ids) <= 2
    held = llm.generate([prompt(30, seed=2)], SamplingParams(
        temperature=0.0, max_tokens=30, ignore_eos=True, stop=[stop],
        min_tokens=20))[0].outputs[0]
    assert len(held.token_ids) > 20
    assert held.token_ids == free.token_ids[:len(held.token_ids)]


def test_padded_draft_vocabulary_is_masked(tiny_llama_dir, tmp_path):
    """Target with 400 embedding rows, draft with 384, one tokenizer (like Qwen2.5-7B/0.5B):
    the draft is padded, never proposes a padded id, and the output stays the target's."""
    target = save_tiny_model(str(tmp_path / "target400"),
                             make_tiny_config("llama", vocab_size=400), seed=4)
    draft = save_tiny_model(str(tmp_path / "draft384"), make_tiny_config("draft"), seed=2)
    plain = make_llm(target)
    spec = make_llm(target, draft)
    assert spec.engine.draft_runner.model.vocab_size == 400
    assert spec.engine.draft_runner.model.num_real_tokens == 384
    prompts = [prompt(40, seed=s) for s in range(3)]
    want = [o.outputs[0].token_ids for o in plain.generate(prompts, GREEDY)]
    got = [o.outputs[0].token_ids for o in spec.generate(prompts, GREEDY)]
    assert got == want
    assert spec.engine.stats().spec_num_drafts > 0
    sampled = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True, seed=7)
    for out in spec.generate(prompts, sampled):
        assert len(out.outputs[0].token_ids) == 16


def test_padded_model_masks_padded_rows(tiny_draft_dir):
    import torch

    from specdec.model.weights import load_model
    from specdec.runner import ModelRunner, SeqSlice

    model = load_model(tiny_draft_dir)
    model.pad_vocab(400)
    runner = ModelRunner(model, 8, 16)
    logits = runner.execute([SeqSlice([5, 390, 7], 0, [0], 3)])  # [3, 400]
    assert logits.shape == (3, 400)
    assert torch.isneginf(logits[:, 384:]).all() and torch.isfinite(logits[:, :384]).all()


def test_different_tokenizers_still_refused(tiny_llama_dir, tmp_path):
    from transformers import AutoTokenizer

    draft = save_tiny_model(str(tmp_path / "draft400"),
                            make_tiny_config("draft", vocab_size=400), seed=2)
    tokenizer = AutoTokenizer.from_pretrained(draft)
    tokenizer.add_tokens(["<extra-token>"])
    tokenizer.save_pretrained(draft)
    with pytest.raises(ValueError, match="share a tokenizer"):
        make_llm(tiny_llama_dir, draft)


def test_outputs_do_not_copy_the_whole_request_every_step(tiny_llama_dir):
    """_make_output hands out the request's own token and logprob lists (O(1) per step) and
    the deltas still add up to the final output (what server/bridge.py reads)."""
    llm = make_llm(tiny_llama_dir)
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, logprobs=2)
    engine.add_request("r", prompt(20)["prompt_token_ids"], params)
    request = engine.tracked["r"].request
    outputs = []
    while engine.has_unfinished_requests():
        outputs.extend(engine.step())
    assert len(outputs) == 40
    assert all(o.outputs[0].token_ids is request.output_token_ids for o in outputs)
    assert len({id(o.outputs[0].logprobs) for o in outputs}) == 1
    final = outputs[-1].outputs[0]
    assert final.token_ids == sum((o.outputs[0].token_ids_delta for o in outputs), [])
    assert final.logprobs == sum((o.outputs[0].logprobs_delta for o in outputs), [])
    assert final.text == "".join(o.outputs[0].text_delta for o in outputs)
    assert len(final.token_ids) == len(final.logprobs) == 40
