"""Every file in configs/ loads, validates and builds an engine that generates. Where the real
weights are absent (the GPU examples, or any pair on a fresh machine), tiny random models in the
same spirit stand in: the same families, tied or untied heads, and for Qwen2.5-7B + 0.5B a
target embedding padded past the draft's (152064 vs 151936 rows, one tokenizer)."""

from __future__ import annotations

import glob
import os

import pytest

from specdec import LLM, SamplingParams
from specdec.core.config import ConfigError, check_device, load
from specdec.fetch import KNOWN_MODELS, is_complete, models_dir

from tests.conftest import make_tiny_config, save_tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.toml")))
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory, tiny_llama_dir, tiny_draft_dir) -> dict[str, tuple[str, str]]:
    """Config file name -> (target dir, draft dir) of tiny models in the real pair's spirit."""
    def save(name, kind, seed, **overrides):
        return save_tiny_model(str(tmp_path_factory.mktemp(name)),
                               make_tiny_config(kind, **overrides), seed=seed)

    qwen_draft = save("qwen_draft", "qwen2", 5)  # tied, 384 rows
    return {
        "llama-3.1-8b+3.2-1b.toml": (
            tiny_llama_dir, save("llama32_draft", "draft", 6, rope_parameters=LLAMA3_ROPE)),
        "qwen2.5-7b+0.5b.toml": (
            save("qwen7b", "qwen2", 7, vocab_size=400, tie_word_embeddings=False), qwen_draft),
        "qwen2.5-coder-1.5b+0.5b.toml": (save("qwen15b", "qwen2", 8), qwen_draft),
        "smollm2-135m-ngram.toml": (tiny_llama_dir, None),
        "tiny-random-pair.toml": (tiny_llama_dir, tiny_draft_dir),
    }


def _real(name: str) -> str | None:
    path = os.path.join(models_dir(), name)
    return path if name in KNOWN_MODELS and is_complete(path) else None


def test_every_config_has_a_stand_in(stand_ins):
    assert sorted(os.path.basename(p) for p in CONFIGS) == sorted(stand_ins)


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_builds_an_engine_that_generates(path, stand_ins, monkeypatch):
    target, draft = stand_ins[os.path.basename(path)]
    monkeypatch.setenv("SPECDEC_TINY_TARGET", target)
    if draft is not None:
        monkeypatch.setenv("SPECDEC_TINY_DRAFT", draft)
    config = load(path)  # loads and validates as shipped (GPU examples included)
    overrides = {"device.device": "cpu"}
    # The small real model is used when fetched; the large ones never are in unit tests.
    smol = _real(config.model.path) if config.model.path == "smollm2-135m-instruct" else None
    overrides["model.path"] = smol or target
    if config.spec.method == "draft":
        overrides["spec.draft_model"] = draft
    if config.spec.draft_vocab_size:  # the stand-in draft's vocabulary is 384 ids
        overrides["spec.draft_vocab_size"] = 128
    llm = LLM(config.replace(**overrides))
    engine = llm.engine
    assert engine.max_model_len <= config.model.max_model_len
    assert engine.config.spec.draft_quantization == config.spec.draft_quantization
    if config.spec.method == "draft":
        assert engine.draft_runner.model.vocab_size == engine.target_runner.model.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    out = llm.generate([{"prompt_token_ids": [5, 17, 42, 99, 7, 250, 31]}], params)[0]
    assert len(out.outputs[0].token_ids) == 6
    stats = engine.stats()
    assert stats.num_blocks_free == stats.num_blocks_total


def test_cpu_only_quantization_on_cuda_is_a_start_up_error():
    path = os.path.join(ROOT, "configs", "qwen2.5-coder-1.5b+0.5b.toml")
    config = load(path)
    assert config.spec.draft_quantization == "int4" and config.device.device == "cpu"
    assert config.model.quantization == "int4"
    with pytest.raises(ConfigError, match=r"model.quantization must be unset on device "
                                          r"'cuda', got 'int4'.*CPU only"):
        load(path, {"device.device": "cuda"})
    with pytest.raises(ConfigError, match=r"spec.draft_quantization must be unset on device "
                                          r"'cuda', got 'int4'.*CPU only"):
        load(path, {"device.device": "cuda", "model.quantization": None})
    with pytest.raises(ConfigError, match="spec.draft_quantization"):
        check_device(config.replace(**{"device.device": "auto", "model.quantization": None}),
                     "cuda")  # auto -> CUDA
    with pytest.raises(ConfigError, match="model.quantization"):
        load(path, {"device.device": "cuda:1", "model.quantization": "int8",
                    "spec.method": "ngram"})
    check_device(config, "cpu")
    gpu = load(os.path.join(ROOT, "configs", "qwen2.5-7b+0.5b.toml"))
    check_device(gpu, "cuda")  # the GPU examples validate as shipped
