"""What a second start skips and what it still checks: weights mapped from the page cache
(equal to reading them), hashes re-read only for files that changed since they were
verified, and a cache entry corrupted behind a kept mtime still caught."""

from __future__ import annotations

import os

import pytest
import torch

from specdec.model import store
from specdec.model.llama import LlamaForCausalLM
from specdec.model.weights import iter_lazy_weights, load_config, safetensors_files
from tests.unit.test_model_cache import fetched  # noqa: F401 - the fixture


def _load(path: str, dtype: torch.dtype, map_files: bool) -> LlamaForCausalLM:
    model = LlamaForCausalLM(load_config(path), dtype)
    model.load_weights(iter_lazy_weights(path), map_files=map_files)
    return model


def _is_mapped(param: torch.Tensor, file: str) -> bool:
    """True if the parameter's storage is the whole file's memory map."""
    return param.untyped_storage().nbytes() == os.path.getsize(file)


@pytest.mark.parametrize("kind", ["tiny_llama_dir", "tiny_qwen2_dir"])
def test_mapped_weights_equal_read_weights(kind, request):
    path = request.getfixturevalue(kind)
    (file,) = safetensors_files(path)
    mapped = _load(path, torch.float32, map_files=True)
    read = _load(path, torch.float32, map_files=False)
    names = [name for name, _ in mapped.named_parameters()]
    assert names == [name for name, _ in read.named_parameters()]
    for (name, a), (_, b) in zip(mapped.named_parameters(), read.named_parameters()):
        assert torch.equal(a, b), name
        assert not _is_mapped(b, file), name
    params = dict(mapped.named_parameters())
    # One tensor on disk, or gate_proj and up_proj back to back: mapped, no copy.
    for name in ("embed_tokens.weight", "layers.0.gate_up_proj.weight",
                 "layers.0.down_proj.weight", "layers.0.o_proj.weight",
                 "norm.weight"):
        assert _is_mapped(params[name], file), name
    # q, k, v are not adjacent in the file (k_proj sorts first): read into the fused tensor.
    assert not _is_mapped(params["layers.0.qkv_proj.weight"], file)


def test_a_dtype_change_is_read_not_mapped(tiny_llama_dir):
    (file,) = safetensors_files(tiny_llama_dir)
    model = _load(tiny_llama_dir, torch.bfloat16, map_files=True)  # the file is float32
    read = _load(tiny_llama_dir, torch.bfloat16, map_files=False)
    for (name, a), (_, b) in zip(model.named_parameters(), read.named_parameters()):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b), name
        assert not _is_mapped(a, file), name


def test_writing_a_mapped_weight_never_changes_the_file(tiny_llama_dir, tmp_path):
    import shutil
    path = str(tmp_path / "model")
    shutil.copytree(tiny_llama_dir, path)
    (file,) = safetensors_files(path)
    before = open(file, "rb").read()
    model = _load(path, torch.float32, map_files=True)
    weight = model.embed_tokens.weight
    assert _is_mapped(weight, file)
    with torch.no_grad():
        weight[3].add_(1.0)  # copy-on-write: this page becomes the process's own
    assert open(file, "rb").read() == before
    assert torch.equal(weight[3], _load(path, torch.float32, False).embed_tokens.weight[3] + 1)


def _count_hashes(monkeypatch) -> list[str]:
    calls: list[str] = []
    real = store.file_hash

    def counting(path):
        calls.append(os.path.basename(path))
        return real(path)
    monkeypatch.setattr(store, "file_hash", counting)
    return calls


def test_a_verified_file_is_not_hashed_again_until_it_changes(tmp_path, monkeypatch):
    file = tmp_path / "weights.bin"
    file.write_bytes(os.urandom(4096))
    expected = store.file_hash(str(file))
    calls = _count_hashes(monkeypatch)
    assert store.hash_matches(str(file), expected) and calls == ["weights.bin"]
    assert store.hash_matches(str(file), expected) and calls == ["weights.bin"]  # stamp
    assert not store.hash_matches(str(file), "0" * 32)  # another expected hash: read it
    assert len(calls) == 2
    monkeypatch.setenv("SPECDEC_VERIFY", "full")
    assert store.hash_matches(str(file), expected) and len(calls) == 3
    monkeypatch.delenv("SPECDEC_VERIFY")
    assert store.hash_matches(str(file), expected) and len(calls) == 3

    # One flipped byte, same size, the old mtime put back: ctime still moved.
    st = os.stat(file)
    data = bytearray(file.read_bytes())
    data[100] ^= 0xFF
    file.write_bytes(bytes(data))
    os.utime(file, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(file).st_mtime_ns == st.st_mtime_ns
    assert not store.hash_matches(str(file), expected)
    assert len(calls) == 4
    assert not store.hash_matches(str(file), expected)  # a failed hash records no stamp
    assert len(calls) == 5


def test_second_start_hashes_nothing_and_a_corrupted_entry_is_still_rebuilt(
        fetched, monkeypatch):  # noqa: F811 - the imported fixture
    from specdec.model.weights import load_model

    path, calls = fetched
    good = load_model("tiny-test", "float32").state_dict()  # verifies, records the stamps
    hashed = _count_hashes(monkeypatch)
    second = load_model("tiny-test", "float32")
    assert hashed == [] and len(calls) == 2  # nothing re-read, nothing fetched
    for name, tensor in second.state_dict().items():
        assert torch.equal(tensor, good[name]), name

    weights = os.path.join(path, store.WEIGHTS_NAME)
    st = os.stat(weights)
    with open(weights, "r+b") as f:  # one flipped byte, same size, mtime restored
        f.seek(st.st_size - 100)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    rebuilt = load_model("tiny-test", "float32")
    assert store.WEIGHTS_NAME in hashed and len(calls) == 4  # caught by its hash, fetched
    for name, tensor in rebuilt.state_dict().items():
        assert torch.equal(tensor, good[name]), name
