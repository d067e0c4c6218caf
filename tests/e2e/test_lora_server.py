"""LoRA through the live server: `model = NAME` picks an adapter, two adapters requested
concurrently each give their own tokens, /v1/models lists adapters, runtime load/unload with
400/404 errors while the server keeps serving, prefix-cache isolation, lora_requests_info."""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil

import pytest

from server.protocol import loads
from tests.e2e.conftest import LiveServer, http, make_config
from tests.unit.test_lora import ADAPTERS, make_adapter

pytest.importorskip("peft")

BASE = "tiny-lora-base"
PROMPT = [(13 * i + 7) % 300 + 5 for i in range(40)]


@pytest.fixture(scope="module")
def adapter_dirs(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_server")
    return {name: make_adapter(tiny_llama_dir, str(root / name), seed=30 + i, **kw)
            for i, (name, kw) in enumerate(ADAPTERS.items())}


@pytest.fixture(scope="module")
def lora_server(tiny_llama_dir, adapter_dirs):
    config = make_config(tiny_llama_dir,
                         spec={"method": "ngram", "num_speculative_tokens": 3},
                         server={"served_model_name": BASE},
                         lora={"modules": [f"{n}={p}" for n, p in adapter_dirs.items()],
                               "max_lora_rank": 8, "max_loras": 2,
                               "allow_runtime_updates": True})
    server = LiveServer(config).start()
    yield server
    server.stop()


def complete(server, model: str, prompt=PROMPT, max_tokens: int = 12) -> tuple[int, dict]:
    status, _, body = http("POST", server.base_url + "/v1/completions",
                           {"model": model, "prompt": prompt, "max_tokens": max_tokens,
                            "temperature": 0, "logprobs": 0})
    return status, loads(body)


def tokens_of(body: dict) -> list:
    return body["choices"][0]["logprobs"]["tokens"]


def test_models_lists_adapters(lora_server, adapter_dirs):
    status, _, body = http("GET", lora_server.base_url + "/v1/models")
    assert status == 200
    cards = {c["id"]: c for c in loads(body)["data"]}
    assert set(cards) == {BASE, "a1", "a2"}
    assert cards[BASE]["parent"] is None
    for name, path in adapter_dirs.items():
        assert cards[name]["parent"] == BASE and cards[name]["root"] == path


def test_concurrent_adapters_each_give_their_own_tokens(lora_server):
    alone = {m: complete(lora_server, m, PROMPT[:20]) for m in (BASE, "a1", "a2")}
    for status, body in alone.values():
        assert status == 200
    assert alone["a1"][1]["model"] == "a1"
    texts = {m: tokens_of(b) for m, (_, b) in alone.items()}
    assert texts["a1"] != texts["a2"] and texts["a1"] != texts[BASE]
    models = ["a1", "a2", BASE, "a2", "a1", "a1"]
    with concurrent.futures.ThreadPoolExecutor(len(models)) as pool:
        results = list(pool.map(lambda m: complete(lora_server, m, PROMPT[:20]), models))
    for model, (status, body) in zip(models, results):
        assert status == 200, body
        assert tokens_of(body) == texts[model], model


def test_unknown_model_is_404(lora_server):
    status, body = complete(lora_server, "nope")
    assert status == 404
    assert body["error"]["code"] == "model_not_found" and "'a1'" in body["error"]["message"]


def test_load_and_unload_at_runtime(lora_server, adapter_dirs, tmp_path):
    url = lora_server.base_url
    status, want = complete(lora_server, "a2", PROMPT[:15])
    assert status == 200
    status, _, body = http("POST", url + "/v1/load_lora_adapter",
                           {"lora_name": "a3", "lora_path": adapter_dirs["a2"]})
    assert status == 200, body
    status, got = complete(lora_server, "a3", PROMPT[:15])
    assert status == 200 and tokens_of(got) == tokens_of(want)
    status, _, body = http("GET", url + "/v1/models")
    assert "a3" in {c["id"] for c in loads(body)["data"]}
    # a name already loaded, then a bad adapter: 400 naming the file and the key
    status, _, body = http("POST", url + "/v1/load_lora_adapter",
                           {"lora_name": "a3", "lora_path": adapter_dirs["a1"]})
    assert status == 400 and "already been loaded" in loads(body)["error"]["message"]
    bad = str(tmp_path / "dora")
    shutil.copytree(adapter_dirs["a1"], bad)
    with open(os.path.join(bad, "adapter_config.json")) as f:
        cfg = json.load(f)
    cfg["use_dora"] = True
    with open(os.path.join(bad, "adapter_config.json"), "w") as f:
        json.dump(cfg, f)
    status, _, body = http("POST", url + "/v1/load_lora_adapter",
                           {"lora_name": "bad", "lora_path": bad})
    message = loads(body)["error"]["message"]
    assert status == 400 and "adapter_config.json key 'use_dora'" in message
    status, _, body = http("POST", url + "/v1/load_lora_adapter", {"lora_name": "x"})
    assert status == 400 and loads(body)["error"]["param"] == "lora_path"
    status, _, body = http("POST", url + "/v1/unload_lora_adapter", {"lora_name": "a3"})
    assert status == 200, body
    assert complete(lora_server, "a3")[0] == 404
    status, _, body = http("POST", url + "/v1/unload_lora_adapter", {"lora_name": "a3"})
    assert status == 404 and loads(body)["error"]["code"] == "model_not_found"
    # still serving
    assert http("GET", url + "/health")[0] == 200
    assert complete(lora_server, "a1", PROMPT[:10])[0] == 200


def test_prefix_cache_isolated_between_adapters(lora_server):
    prompt = [(17 * i + 3) % 300 + 5 for i in range(48)]  # 3 full blocks of 16

    def cached(model):
        status, body = complete(lora_server, model, prompt, max_tokens=2)
        assert status == 200
        return (body["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0)

    assert cached("a1") == 0
    assert cached("a2") == 0
    assert cached(BASE) == 0
    assert cached("a1") > 0


def test_lora_requests_info_metric(lora_server):
    status, _, body = http("GET", lora_server.base_url + "/metrics")
    assert status == 200
    lines = [line for line in body.decode().splitlines()
             if line.startswith("specdec:lora_requests_info{")]
    assert len(lines) == 1 and 'max_lora="2"' in lines[0]
    assert 'running_lora_adapters=""' in lines[0]  # idle between requests
    vllm = [line for line in body.decode().splitlines()
            if line.startswith("vllm:lora_requests_info{")]
    assert len(vllm) == 1 and 'max_lora="2"' in vllm[0]  # vLLM's name too (metrics_prefix)


def test_runtime_updates_off_by_default(ngram_server):
    status, _, body = http("POST", ngram_server.base_url + "/v1/load_lora_adapter",
                           {"lora_name": "a", "lora_path": "/nowhere"})
    assert status == 404 and "allow_runtime_updates" in loads(body)["error"]["message"]


def test_cli_lora_modules():
    from server.__main__ import build_config
    config = build_config(["--lora-modules", "a=/x", '{"name": "b", "path": "/y"}',
                           "--lora.max_lora_rank", "32"])
    assert config.lora.modules == (("a", "/x"), ("b", "/y"))
    assert config.lora.max_lora_rank == 32 and config.lora.active
