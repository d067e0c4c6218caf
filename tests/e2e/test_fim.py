"""Fill-in-the-middle end to end on a tiny model whose tokenizer has Qwen's FIM tokens:
`suffix` through the official openai client, llama.cpp's /infill over raw HTTP, special-token
stop strings, generation_config defaults, cancellation freeing the slot and the next
keystroke hitting the prefix cache."""

from __future__ import annotations

import asyncio
import json
import os
import threading

import aiohttp
import openai
import pytest

from server.fim import detect_fim
from server.protocol import dumps, loads
from tests.conftest import make_tiny_config
from tests.e2e.conftest import LiveServer, SPEC_MODEL, http, make_config, scrape, sse_events

FIM_MODEL = "tiny-fim"
FIM_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|fim_prefix|>",
                "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>",
                "<|file_sep|>"]
CODE = ("def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(i, i * i)\n"
        "The quick brown fox jumps over the lazy dog. Hello world! How are you today?\n")


def build_fim_tokenizer(out_dir: str) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tests.conftest import CHAT_TEMPLATE, TINY_VOCAB_SIZE, _TRAIN_TEXT
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB_SIZE, special_tokens=FIM_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([_TRAIN_TEXT] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>",
                                   additional_special_tokens=FIM_SPECIALS[3:])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def fim_dir(tmp_path_factory) -> str:
    import torch
    from transformers import AutoModelForCausalLM

    out = str(tmp_path_factory.mktemp("tiny_fim"))
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(make_tiny_config("llama"), dtype=torch.float32)
    model.save_pretrained(out)
    build_fim_tokenizer(out)
    # The model's published sampling defaults: greedy when a request omits temperature.
    path = os.path.join(out, "generation_config.json")
    with open(path) as f:
        gen_config = json.load(f)
    gen_config.update(temperature=0.0, top_k=5)
    with open(path, "w") as f:
        json.dump(gen_config, f)
    return out


@pytest.fixture(scope="module")
def fim_server(fim_dir):
    config = make_config(fim_dir, spec={"method": "ngram", "num_speculative_tokens": 3},
                         scheduler={"policy": "priority"},
                         server={"served_model_name": FIM_MODEL,
                                 "served_model_aliases": "tiny-alias, other-alias",
                                 "cors_origins": "http://editor.example"})
    server = LiveServer(config).start()
    yield server
    server.stop()


def _template(server):
    return server.app.fim_template


def test_detects_qwen_style(fim_server):
    t = _template(fim_server)
    tok = fim_server.app.engine.tokenizer
    assert t is not None and t.style == "qwen"
    assert tok.convert_ids_to_tokens([t.prefix_id, t.suffix_id, t.middle_id]) == [
        "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"]
    assert set(tok.convert_ids_to_tokens(list(t.stop_token_ids))) == {"<|endoftext|>",
                                                                     "<|file_sep|>"}
    assert detect_fim(tok, "none") is None
    assert detect_fim(tok, "starcoder") is None  # forced style absent from the vocabulary


def test_suffix_builds_the_fim_prompt(fim_server):
    client = fim_server.client()
    tok = fim_server.app.engine.tokenizer
    t = _template(fim_server)
    prefix, suffix = "def add(a, b):\n    return ", "\n\nprint(add(1, 2))\n"
    out = client.completions.create(model=FIM_MODEL, prompt=prefix, suffix=suffix,
                                    max_tokens=8, temperature=0,
                                    extra_body={"ignore_eos": True})
    ids = ([t.prefix_id] + tok.encode(prefix, add_special_tokens=False) + [t.suffix_id]
           + tok.encode(suffix, add_special_tokens=False) + [t.middle_id])
    assert out.usage.prompt_tokens == len(ids)
    # The same prompt sent as token ids gives the same middle: the prompt was PSM.
    raw = client.completions.create(model=FIM_MODEL, prompt=ids, max_tokens=8, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.choices[0].text == raw.choices[0].text
    assert out.choices[0].finish_reason == "length"


def test_suffix_text_cannot_inject_fim_tokens(fim_server):
    client = fim_server.client()
    t = _template(fim_server)
    out = client.completions.create(model=FIM_MODEL, prompt="x <|fim_middle|> y", suffix="z",
                                    max_tokens=1, temperature=0,
                                    extra_body={"return_token_ids": True})
    assert out.choices[0].model_extra["prompt_token_ids"].count(t.middle_id) == 1


def test_suffix_on_a_model_without_fim_tokens_is_400(spec_server):
    client = spec_server.client()
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=SPEC_MODEL, prompt="def f(", suffix=")\n",
                                  max_tokens=4)
    body = err.value.body
    assert body["param"] == "suffix" and "FIM" in body["message"]
    status, _, payload = http("POST", spec_server.base_url + "/infill",
                              {"input_prefix": "a", "input_suffix": "b"})
    assert status == 400 and loads(payload)["error"]["param"] == "input_prefix"


def test_infill_matches_suffix_and_streams_llamacpp_frames(fim_server):
    url = fim_server.base_url + "/infill"
    body = {"input_prefix": "def add(a, b):\n", "prompt": "    return ",
            "input_suffix": "\n\nprint(1)\n", "n_predict": 6, "temperature": 0,
            "ignore_eos": True}
    status, _, payload = http("POST", url, body)
    assert status == 200
    full = loads(payload)
    assert full["stop"] is True and full["stop_type"] == "limit"
    assert full["tokens_predicted"] == 6 and full["truncated"] is False
    assert {"content", "tokens_evaluated", "tokens_cached", "timings", "generation_settings",
            "stopping_word", "has_new_line"} <= set(full)
    client = fim_server.client()
    ref = client.completions.create(model=FIM_MODEL, prompt="def add(a, b):\n    return ",
                                    suffix="\n\nprint(1)\n", max_tokens=6, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert full["content"] == ref.choices[0].text
    assert full["tokens_evaluated"] == ref.usage.prompt_tokens

    status, headers, payload = http("POST", url, {**body, "stream": True})
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    events = sse_events(payload)
    assert "[DONE]" not in events
    assert events[-1]["stop"] is True and events[-1]["stop_type"] == "limit"
    assert all(e["stop"] is False for e in events[:-1])
    assert "".join(e["content"] for e in events) == full["content"]


def test_infill_repo_level_context(fim_server):
    tok = fim_server.app.engine.tokenizer
    t = _template(fim_server)
    extra = [{"filename": "util.py", "text": "def sub(a, b):\n    return a - b\n"}]
    status, _, payload = http("POST", fim_server.base_url + "/infill", {
        "input_prefix": "x = ", "input_suffix": "\n", "input_extra": extra, "n_predict": 1})
    assert status == 200
    ids, truncated = t.build(tok, "x = ", "\n", extra)
    assert not truncated
    assert loads(payload)["tokens_evaluated"] == len(ids)
    names = tok.convert_ids_to_tokens(ids)
    assert names[0] == "<|repo_name|>" and names.count("<|file_sep|>") == 2
    status, _, payload = http("POST", fim_server.base_url + "/infill",
                              {"input_prefix": "x", "input_extra": [{"text": 3}]})
    assert status == 400 and loads(payload)["error"]["param"] == "input_extra"


def test_fim_prompt_truncation_keeps_the_cursor_context(fim_server):
    tok = fim_server.app.engine.tokenizer
    t = _template(fim_server)
    prefix, suffix = CODE * 6, CODE * 6
    extra = [{"filename": "a.py", "text": CODE * 3}]
    ids, truncated = t.build(tok, prefix, suffix, extra, max_prompt_tokens=200)
    assert truncated and len(ids) <= 200
    text = tok.decode(ids)
    assert prefix.endswith(text.split("<|fim_prefix|>")[1].split("<|fim_suffix|>")[0])
    assert suffix.startswith(text.split("<|fim_suffix|>")[1].split("<|fim_middle|>")[0])
    # llama.cpp's 3:1 prefix:suffix split.
    n_prefix = ids.index(t.suffix_id) - ids.index(t.prefix_id) - 1
    n_suffix = ids.index(t.middle_id) - ids.index(t.suffix_id) - 1
    assert n_prefix >= 2 * n_suffix > 0


def test_special_token_stop_string_becomes_a_stop_id(fim_server):
    client = fim_server.client()
    tok = fim_server.app.engine.tokenizer
    pad = tok.convert_tokens_to_ids("<|fim_pad|>")
    bias = {str(pad): 100}
    stopped = client.completions.create(model=FIM_MODEL, prompt="hello", max_tokens=8,
                                        temperature=0, logit_bias=bias, stop=["<|fim_pad|>"])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].model_extra["stop_reason"] == pad
    assert stopped.usage.completion_tokens == 1
    ran = client.completions.create(model=FIM_MODEL, prompt="hello", max_tokens=8,
                                    temperature=0, logit_bias=bias)
    assert ran.choices[0].finish_reason == "length" and ran.usage.completion_tokens == 8


def test_endoftext_is_an_eos_even_without_generation_config(fim_server):
    engine = fim_server.app.engine
    tok = engine.tokenizer
    assert tok.convert_tokens_to_ids("<|endoftext|>") in engine.eos_token_ids
    assert tok.eos_token_id in engine.eos_token_ids


def test_generation_config_defaults_apply_when_omitted(fim_server):
    engine = fim_server.app.engine
    assert engine.generation_defaults == {"temperature": 0.0, "top_k": 5}
    client = fim_server.client()
    texts = {client.completions.create(model=FIM_MODEL, prompt="The quick", max_tokens=12,
                                       seed=s, extra_body={"ignore_eos": True}).choices[0].text
             for s in range(3)}
    assert len(texts) == 1  # temperature 0 from generation_config.json: greedy
    sampled = {client.completions.create(model=FIM_MODEL, prompt="The quick", max_tokens=12,
                                         temperature=1.0, seed=s,
                                         extra_body={"ignore_eos": True, "top_k": 0}
                                         ).choices[0].text
               for s in range(3)}
    assert len(sampled) > 1  # the request's own values win


async def _keystroke(url: str, body: dict) -> None:
    """Start a streamed completion and hang up after its first frame (a newer keystroke)."""
    async with aiohttp.ClientSession() as session:
        async with session.post(url, data=dumps(body)) as resp:
            assert resp.status == 200
            await resp.content.readuntil(b"\n\n")


def test_cancelled_keystroke_frees_its_slot_and_the_next_hits_the_prefix_cache(fim_server):
    engine = fim_server.app.engine
    url = fim_server.base_url + "/v1/completions"
    prefix = CODE * 2
    body = {"model": FIM_MODEL, "prompt": prefix, "suffix": "\n", "max_tokens": 300,
            "temperature": 0, "ignore_eos": True, "stream": True}
    abort = f'specdec:request_success_total{{finished_reason="abort",model_name="{FIM_MODEL}"}}'
    aborts_before = scrape(fim_server)[abort]
    asyncio.run(_keystroke(url, body))
    bridge = fim_server.app.bridge
    for _ in range(100):
        if bridge.num_in_flight == 0 and not engine.scheduler.has_unfinished_requests():
            break
        asyncio.run(asyncio.sleep(0.1))
    assert bridge.num_in_flight == 0
    assert not engine.scheduler.has_unfinished_requests()
    assert engine.scheduler.block_pool.num_used_blocks == 0  # cached blocks are free ones
    assert scrape(fim_server)[abort] == aborts_before + 1  # aborted, not run to 300 tokens
    client = fim_server.client()
    out = client.completions.create(model=FIM_MODEL, prompt=prefix + "d", suffix="\n",
                                    max_tokens=2, temperature=0)
    tok = engine.tokenizer
    common = len(tok.encode(prefix, add_special_tokens=False)) + 1  # + <|fim_prefix|>
    block = fim_server.config.cache.block_size
    cached = out.usage.prompt_tokens_details.cached_tokens
    assert cached >= (common - 2) // block * block > 0


def test_fim_keystrokes_bench_runs_against_a_live_server(fim_server):
    """The bench script end to end (a smoke test; it prints, the numbers are not asserted)."""
    import pathlib
    import sys
    import types
    bench = str(pathlib.Path(__file__).resolve().parents[2] / "bench")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    from fim_keystrokes import build_file, run_keystrokes

    tok = fim_server.app.engine.tokenizer
    before, typed, after = build_file(tok, 300, 0.5, 6)
    assert 0 < len(typed) <= 6 and "\n" not in typed
    assert len(tok.encode(before + typed + after)) <= 310
    args = types.SimpleNamespace(
        base_url=fim_server.base_url, api_key=None, model=None, file_tokens=300,
        cursor_frac=0.5, num_prompts=6, max_tokens=4, temperature=0.0, extra_body={},
        keystroke_interval_ms=5.0, timeout=120.0, percentiles=[50.0, 90.0])
    result = asyncio.run(run_keystrokes(args, tok))
    s = result["summary"]
    assert s["keystrokes"] == len(typed) and s["errors"] == []
    assert s["last_finish_reason"] in ("stop", "length")
    assert s["cached_tokens_last"] > 0  # the previous keystrokes' blocks were reused
    engine = fim_server.app.engine
    for _ in range(100):
        if not engine.scheduler.has_unfinished_requests():
            break
        asyncio.run(asyncio.sleep(0.1))
    assert not engine.scheduler.has_unfinished_requests()


def test_infill_n_predict_validation_and_minus_one(fim_server):
    url = fim_server.base_url + "/infill"
    for bad in (0, "ten", 1.5):
        status, _, payload = http("POST", url, {"input_prefix": "a", "n_predict": bad})
        assert status == 400 and loads(payload)["error"]["param"] == "n_predict", bad
    status, _, payload = http("POST", url, {"input_prefix": "def add(a, b):\n",
                                            "n_predict": -1, "temperature": 0,
                                            "stop": ["\n"]})
    assert status == 200 and loads(payload)["stop"] is True


INFILL_LIMITS = [  # (body, param, words the message must contain); the server's default limits
    ({"input_prefix": "y" * 16385}, "input_prefix",
     ["input_prefix has 16385 characters", "16384", "max_prompt_chars"]),
    ({"input_prefix": "a", "input_suffix": "y" * 16385}, "input_suffix",
     ["input_suffix has 16385 characters", "max_prompt_chars"]),
    ({"input_prefix": "a", "input_extra": [{"filename": "f.py", "text": "y" * 16385}]},
     "input_extra[0].text", ["16385 characters"]),
    ({"input_prefix": "y" * 9000, "input_suffix": "z" * 8000}, "input_prefix",
     ["17000 characters", "16384", "max_prompt_chars"]),
    ({"input_prefix": "a", "stop": [f"s{i}" for i in range(17)]}, "stop",
     ["17 strings", "max_stop_strings"]),
    ({"input_prefix": "a", "logit_bias": {str(i): 1 for i in range(1025)}}, "logit_bias",
     ["1025 entries", "max_logit_bias_entries"]),
]


@pytest.mark.parametrize("body,param,words", INFILL_LIMITS)
def test_infill_past_a_limit_is_a_400_before_tokenizing(fim_server, body, param, words):
    tokenizer = fim_server.app.engine.tokenizer
    calls = []

    def encode(text, *args, **kwargs):
        calls.append(len(text))
        return type(tokenizer).encode(tokenizer, text, *args, **kwargs)

    tokenizer.encode = encode
    try:
        status, _, payload = http("POST", fim_server.base_url + "/infill",
                                  {**body, "n_predict": 2})
    finally:
        del tokenizer.encode
    assert status == 400, payload
    err = loads(payload)["error"]
    assert err["param"] == param, err
    for word in words:
        assert word in err["message"], err["message"]
    assert calls == []  # rejected on the raw body: nothing was tokenized


def test_infill_tokenizes_in_the_pool(fim_server):
    tokenizer = fim_server.app.engine.tokenizer
    threads = []

    def encode(text, *args, **kwargs):
        threads.append(threading.current_thread())
        return type(tokenizer).encode(tokenizer, text, *args, **kwargs)

    tokenizer.encode = encode
    try:
        status, _, payload = http("POST", fim_server.base_url + "/infill",
                                  {"input_prefix": "def f(", "input_suffix": "):\n",
                                   "n_predict": 2})
    finally:
        del tokenizer.encode
    assert status == 200, payload
    assert threads and all(t.name.startswith("specdec-tokenize") for t in threads), threads
