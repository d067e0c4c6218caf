"""Config files: every shipped config loads; unknown keys and bad values name the key;
command-line overrides; the tiny random pair config drives a real engine."""

from __future__ import annotations

import glob
import os

import pytest

from specdec.core.config import Config, ConfigError, from_dict, load, parse_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.toml"))))
def test_shipped_configs_load(path):
    config = load(path)
    assert isinstance(config, Config)
    if config.spec.method == "draft":
        assert config.spec.draft_model


def test_default_pair_is_the_qwen_coder_pair():
    config = load(os.path.join(ROOT, "configs", "qwen2.5-coder-1.5b+0.5b.toml"))
    assert config.model.path == "qwen2.5-coder-1.5b-instruct"
    assert config.spec.draft_model == "qwen2.5-coder-0.5b-instruct"
    assert config.spec.prompt_lookup


@pytest.mark.parametrize("method", ["none", "ngram"])
def test_every_shipped_config_takes_another_spec_method(method):
    """A config's method switched from the command line (the benchmarks' no-spec runs) loads:
    options of the other methods, such as prompt_lookup, are ignored, not refused."""
    for path in sorted(glob.glob(os.path.join(ROOT, "configs", "*.toml"))):
        assert load(path, {"spec.method": method}).spec.method == method


@pytest.mark.parametrize("data, message", [
    ({"model": {"pth": "x"}}, "model.pth"),
    ({"modle": {}}, r"\[modle\]"),
    ({"model": {"dtype": "float8"}}, "model.dtype"),
    ({"spec": {"method": "draft"}}, "spec.draft_model"),
    ({"spec": {"num_speculative_tokens": 99}}, "spec.num_speculative_tokens"),
    ({"cache": {"block_size": 7}}, "cache.block_size"),
    ({"scheduler": {"max_num_seqs": "many"}}, "scheduler.max_num_seqs"),
    ({"server": {"port": 70000}}, "server.port"),
    ({"spec": {"method": "draft", "draft_model": "d", "prompt_lookup_min": 0}},
     r"spec.prompt_lookup_min.*\[1, 64\]"),
])
def test_bad_config_names_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(data)


def test_overrides_parse_and_apply():
    overrides = parse_overrides(["--spec.method", "ngram", "--model.max_model_len=1024",
                                 "--cache.enable_prefix_caching", "false"])
    config = Config().replace(**overrides)
    assert config.spec.method == "ngram"
    assert config.model.max_model_len == 1024
    assert config.cache.enable_prefix_caching is False
    with pytest.raises(ConfigError, match="unexpected argument"):
        parse_overrides(["positional"])
    with pytest.raises(ConfigError, match="needs a value"):
        parse_overrides(["--model.dtype"])


def test_tiny_random_pair_config_runs(tiny_llama_dir, tiny_draft_dir, monkeypatch):
    from specdec import LLM, SamplingParams
    monkeypatch.setenv("SPECDEC_TINY_TARGET", tiny_llama_dir)
    monkeypatch.setenv("SPECDEC_TINY_DRAFT", tiny_draft_dir)
    llm = LLM.from_config(os.path.join(ROOT, "configs", "tiny-random-pair.toml"),
                          **{"spec.adaptive": "false"})
    assert llm.engine.config.model.path == tiny_llama_dir
    out = llm.generate(["Hello world"], SamplingParams(temperature=0, max_tokens=8,
                                                       ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 8
    assert out[0].metrics.num_drafts > 0
