"""An int4 load of an entry that keeps its GGUF (specdec/model/gguf_q4k.py, weights.py): the
Q4_K tensors' 4-bit groups are taken as they are, so the served weights equal the GGUF's own
dequantized values (gguf-py's `dequantize`, the reference) up to the kernel's bfloat16 scale
and zero; Q6_K modules stay int8 (or are re-quantized, with high_bits="int4"); the embedding is
an exact int4 table; the packed result is cached, keyed by the GGUF and the code."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
import torch

from specdec import fetch
from specdec.model import quant, store
from tests.conftest import PagedSequences
from tests.unit.test_fetch import HEADS, KV_HEADS, LAYERS, _fake_source, write_tiny_gguf

HIDDEN, INTER, HEAD_DIM = 256, 512, 64
# layer 0's v and layer 1's down are Q6_K (as a Q4_K_M file does), and the output too
KINDS = {"token_embd.weight": "Q4_K", "output.weight": "Q6_K",
         **{f"blk.{i}.{p}.weight": "Q4_K" for i in range(LAYERS)
            for p in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up",
                      "ffn_down")},
         "blk.0.attn_v.weight": "Q6_K", "blk.1.ffn_down.weight": "Q6_K"}


@pytest.fixture()
def q4k_entry(tmp_path, monkeypatch, tiny_tokenizer_dir):
    gguf_path = tmp_path / "tiny-q4k.gguf"
    write_tiny_gguf(str(gguf_path), tiny_tokenizer_dir, seed=4, hidden=HIDDEN, inter=INTER,
                    head_dim=HEAD_DIM, kinds=KINDS)
    payload = gguf_path.read_bytes()
    monkeypatch.setenv("SPECDEC_MODEL_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("SPECDEC_CACHE_DIR", str(tmp_path / "cache"))
    _fake_source(monkeypatch, payload, hashlib.sha256(payload).hexdigest(), 2)
    return fetch.fetch("tiny-test"), str(gguf_path)


def gguf_reference(gguf_path: str) -> dict[str, torch.Tensor]:
    """HF name -> the GGUF's dequantized float32 weight (gguf-py), q / k unpermuted."""
    import gguf

    from specdec.model.convert import hf_name, unpermute_rope

    out = {}
    for t in gguf.GGUFReader(gguf_path).tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        weight = torch.from_numpy(np.array(gguf.dequantize(t.data, t.tensor_type),
                                           dtype=np.float32)).reshape(shape)
        if ".attn_q." in t.name:
            weight = unpermute_rope(weight, HEADS)
        elif ".attn_k." in t.name:
            weight = unpermute_rope(weight, KV_HEADS)
        out[hf_name(t.name)] = weight
    return out


def served_weight(module) -> torch.Tensor:
    """The [out, in] weight a quantized Linear multiplies by, read back through its own
    forward: a one-hot row is quantized exactly (q = 127, dx = 1/127) by the q4 kernel."""
    eye = torch.eye(module.in_features)
    bias = 0 if module.bias is None else module.bias
    return (module(eye) - bias).T.float()


def test_entry_keeps_the_gguf_and_no_bfloat16_copy(q4k_entry):
    path, gguf_path = q4k_entry
    assert store.gguf_source(path) and not os.path.exists(os.path.join(path, store.WEIGHTS_NAME))
    with open(gguf_path, "rb") as a, open(store.gguf_source(path), "rb") as b:
        assert a.read() == b.read()
    assert store.GGUF_NAME in store.read_manifest(path)["files"]
    store.verify_entry(path)


def test_int4_load_takes_the_q4k_groups_as_they_are(q4k_entry):
    from specdec.model.weights import load_model

    path, gguf_path = q4k_entry
    want = gguf_reference(gguf_path)
    model = load_model("tiny-test", "float32", quantization="int4")
    assert model.quantized_from == "source"
    for i in range(LAYERS):
        layer = model.layers[i]
        qkv = torch.cat([want[f"model.layers.{i}.self_attn.{p}_proj.weight"] for p in "qkv"])
        gate_up = torch.cat([want[f"model.layers.{i}.mlp.{p}_proj.weight"]
                             for p in ("gate", "up")])
        o = want[f"model.layers.{i}.self_attn.o_proj.weight"]
        for module, weight in ((layer.qkv_proj, qkv), (layer.gate_up_proj, gate_up),
                               (layer.o_proj, o)):
            assert isinstance(module, quant.Int4Linear)
            got = served_weight(module)
            # NOTE: the stated tolerance: scale and zero are rounded to bfloat16 (2^-9
            # relative each), so a weight moves by at most 2^-8 of its group's range.
            groups = weight.reshape(weight.shape[0], -1, 32)
            span = (groups.abs().amax(-1, keepdim=True) + groups.amax(-1, keepdim=True)
                    - groups.amin(-1, keepdim=True)).expand_as(groups).reshape(weight.shape)
            exact_rows = slice(0, weight.shape[0]) if (i, module) != (0, layer.qkv_proj) \
                else slice(0, layer.q_size + layer.kv_size)  # layer 0's v is Q6_K
            err = (got - weight).abs()[exact_rows]
            assert (err <= span[exact_rows] * 2 ** -8 + 1e-6).all(), (i, module)
        down = want[f"model.layers.{i}.mlp.down_proj.weight"]
        if i == 1:  # Q6_K: int8 per output channel, within half an int8 step (+ the
            # bfloat16 rounding of the product it computes)
            assert isinstance(layer.down_proj, quant.Int8Linear)
            step = down.abs().amax(dim=1, keepdim=True) / 127
            err = (served_weight(layer.down_proj) - down).abs()
            assert (err <= 0.51 * step + down.abs() * 2 ** -7).all()
        else:
            assert isinstance(layer.down_proj, quant.Int4Linear)
    # layer 0's Q6_K v rows were re-quantized to int4: within half a step of their grid
    v = want["model.layers.0.self_attn.v_proj.weight"]
    got_v = served_weight(model.layers[0].qkv_proj)[-v.shape[0]:]
    groups = v.reshape(v.shape[0], -1, 32)
    step = ((groups.amax(-1) - groups.amin(-1)) / 15).repeat_interleave(32, 1)
    assert ((got_v - v).abs() <= 0.51 * step + 2 ** -7 * v.abs().amax()).all()
    assert isinstance(model.lm_head, quant.Int8Linear)  # the output is Q6_K
    assert isinstance(model.embed_tokens, quant.Int4Embedding)
    embedding = want["model.embed_tokens.weight"]
    ids = torch.arange(embedding.shape[0])
    torch.testing.assert_close(model.embed_tokens.dequantize(ids), embedding, rtol=1e-6,
                               atol=1e-7)
    assert model.embed_tokens(ids[:5]).dtype == torch.float32


def test_high_bits_int4_requantizes_the_q6k_modules(q4k_entry):
    from specdec.model.weights import load_model

    model = load_model("tiny-test", "float32", quantization="int4", high_bits="int4")
    assert isinstance(model.layers[1].down_proj, quant.Int4Linear)
    assert isinstance(model.lm_head, quant.Int4Linear)
    with pytest.raises(ValueError, match="high_bits must be one of"):
        load_model("tiny-test", "float32", quantization="int4", high_bits="int2")


def test_gguf_int4_cache_is_reused_and_matches(q4k_entry):
    from specdec.model import quant_cache
    from specdec.model.weights import load_model

    path, _ = q4k_entry
    first = load_model("tiny-test", "bfloat16", quantization="int4")
    second = load_model("tiny-test", "bfloat16", quantization="int4")
    assert (first.quantized_from, second.quantized_from) == ("source", "cache")
    assert isinstance(second.embed_tokens, quant.Int4Embedding)
    want, got = first.state_dict(), second.state_dict()
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    prompt = [5, 77, 300, 12, 9]
    out = [m(PagedSequences(4, 16).batch([("a", prompt)]), m.make_kv_caches(4, 16))
           for m in (first, second)]
    assert torch.equal(out[0], out[1])
    # the key follows the GGUF and high_bits, not a bfloat16 copy written later
    key = quant_cache.cache_key(path, torch.bfloat16, "int4")
    assert key != quant_cache.cache_key(path, torch.bfloat16, "int4", "int4")
    load_model("tiny-test", "bfloat16")  # writes model.safetensors next to the GGUF
    assert os.path.isfile(os.path.join(path, store.WEIGHTS_NAME))
    store.verify_entry(path)
    assert quant_cache.cache_key(path, torch.bfloat16, "int4") == key
    assert load_model("tiny-test", "bfloat16", quantization="int4").quantized_from == "cache"


def test_unquantized_load_of_a_gguf_entry_is_the_dequantized_gguf(q4k_entry):
    from specdec.model.weights import load_model

    path, gguf_path = q4k_entry
    want = gguf_reference(gguf_path)
    model = load_model("tiny-test", "float32")  # materializes bfloat16 safetensors once
    assert store.read_manifest(path)["files"][store.WEIGHTS_NAME]["size"] > 0
    embedding = want["model.embed_tokens.weight"]
    assert torch.equal(model.embed_tokens.weight, embedding.to(torch.bfloat16).float())


def test_a_superseded_cache_entry_is_removed(q4k_entry, monkeypatch):
    from specdec.model import quant_cache
    from specdec.model.weights import load_model

    load_model("tiny-test", "bfloat16", quantization="int4")
    entries = lambda: sorted(f for f in os.listdir(quant_cache.cache_dir())  # noqa: E731
                             if f.endswith(".safetensors"))
    (first,) = entries()
    load_model("tiny-test", "bfloat16", quantization="int8")  # another slot: both stay
    assert len(entries()) == 2
    monkeypatch.setattr(quant, "FORMAT_VERSION", "a-new-packing")  # a new key, same slot
    assert load_model("tiny-test", "bfloat16", quantization="int4").quantized_from == "source"
    assert len(entries()) == 2 and first not in entries()


def test_engine_passes_gguf_high_bits_to_the_target(q4k_entry):
    from specdec.core.config import Config, ConfigError
    from specdec.engine import Engine

    base = {"model.path": "tiny-test", "model.quantization": "int4", "device.device": "cpu",
            "model.max_model_len": 64, "model.dtype": "bfloat16"}
    engine = Engine(Config().replace(**base, **{"model.gguf_high_bits": "int4"}))
    assert isinstance(engine.target_runner.model.lm_head, quant.Int4Linear)  # Q6_K output
    engine = Engine(Config().replace(**base))
    assert isinstance(engine.target_runner.model.lm_head, quant.Int8Linear)
    with pytest.raises(ConfigError, match="model.gguf_high_bits must be"):
        Config().replace(**{"model.gguf_high_bits": "int6"})


def test_fetch_with_a_config_packs_what_its_first_start_reads(q4k_entry, tmp_path, capsys):
    """`specdec fetch --config` (what `make serve` runs first) packs the int4 weights of the
    config's target and draft; the first start then reads both from the cache, a second fetch
    rebuilds nothing, and a damaged entry is rebuilt by the next fetch, never served."""
    from specdec.core.config import load
    from specdec.engine import Engine
    from specdec.model import quant_cache

    config = tmp_path / "serve.toml"
    config.write_text('[model]\npath = "tiny-test"\ndtype = "bfloat16"\nmax_model_len = 64\n'
                      'quantization = "int4"\ngguf_high_bits = "int4"\n'
                      '[spec]\nmethod = "draft"\ndraft_model = "tiny-test"\n'
                      'draft_dtype = "float32"\ndraft_quantization = "int4"\n'
                      'num_speculative_tokens = 2\n[device]\ndevice = "cpu"\n')
    assert fetch.main(["--config", str(config)]) == 0
    assert capsys.readouterr().out.count("tiny-test: int4 weights packed") == 2

    def entries():
        folder = quant_cache.cache_dir()
        return {f: os.stat(os.path.join(folder, f)).st_mtime_ns for f in os.listdir(folder)
                if f.endswith(".safetensors")}
    packed = entries()
    assert len(packed) == 2  # bfloat16 target and float32 draft: two keys
    engine = Engine(load(str(config)))
    assert engine.target_runner.model.quantized_from == "cache"
    assert engine.startup["draft_quantized_from"] == "cache"
    assert entries() == packed

    assert fetch.main(["--config", str(config)]) == 0
    assert capsys.readouterr().out.count("tiny-test: int4 weights cached") == 2
    assert entries() == packed
    damaged = os.path.join(quant_cache.cache_dir(), sorted(packed)[0])
    with open(damaged, "r+b") as f:
        f.seek(os.path.getsize(damaged) - 10)
        f.write(b"\x00\x01")
    assert fetch.main(["--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert out.count("weights packed") == 1 and out.count("weights cached") == 1
    assert set(entries()) == set(packed)
