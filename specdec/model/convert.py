"""Convert a GGUF file (or an older float32 cache entry) into the cache format of
specdec/model/store.py: bfloat16 safetensors, dequantized one tensor at a time.

Only the config and the tokenizer go through transformers (metadata only). The tensors are
read with the `gguf` package's memory-mapped reader and dequantized one by one to float32,
then rounded to bfloat16 and written: the peak memory is one float32 tensor (the 1.5B's
151936x1536 embedding, 0.9 GB), never a float32 copy of the model.

NOTE: bfloat16 is the dtype the shipped configs serve the targets in, and the dtype the
models were published in. The draft is served through int4 / int8 weights built from these
tensors (its float32 `draft_dtype` only concerns the embedding and the norms). The GGUF's
dequantized values are products of fp16 scales and small integers; rounding them to bfloat16
moves each weight by at most 2^-9 relative, far below the 4-bit quantization step.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile

import numpy as np
import torch
from specdec.model import store

STORAGE_DTYPE = torch.bfloat16

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_ROW_CHUNK = 8192
_ARCHITECTURE_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_SKIPPED = {"rope_freqs.weight"}  # llama3 rope factors: recomputed from the config
_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor (None: not stored). Raises on unknown names."""
    if gguf_name in _SKIPPED:
        return None
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _BLOCK.fullmatch(gguf_name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no known Hugging Face name")


def unpermute_rope(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo convert_hf_to_gguf's q/k row permutation for llama-architecture files.
    weight: [num_heads * head_dim, ...] -> same shape, rows back in Hugging Face order."""
    head_dim_half = weight.shape[0] // num_heads // 2
    rest = weight.shape[1:]
    return weight.reshape(num_heads, head_dim_half, 2, *rest).transpose(1, 2).reshape(
        weight.shape)


def _dequantize_rows(tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Dequantize one GGUF tensor into `dtype`, _ROW_CHUNK rows at a time, so that the float32
    intermediates (numpy makes several) never span a whole embedding table."""
    from gguf import dequantize

    out = torch.empty(shape, dtype=dtype)
    data = tensor.data  # [rows, bytes per row] for quantized types; [rows, cols] or [n] else
    if len(shape) == 1:
        out.copy_(torch.from_numpy(np.array(dequantize(data, tensor.tensor_type),
                                            dtype=np.float32)).reshape(shape))
        return out
    rows = out.reshape(-1, shape[-1])
    for start in range(0, rows.shape[0], _ROW_CHUNK):
        # NOTE: np.array copies: a float32 tensor's data is a read-only view of the mmap.
        part = np.array(dequantize(data[start:start + _ROW_CHUNK], tensor.tensor_type),
                        dtype=np.float32)
        rows[start:start + part.shape[0]].copy_(torch.from_numpy(part).reshape(-1, shape[-1]))
    return out


def _dequantize(tensor, shape: tuple[int, ...], dtype: torch.dtype, arch: str,
                num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """One GGUF tensor in Hugging Face layout (q/k rows unpermuted for llama) and `dtype`."""
    if arch == "llama" and ".attn_q." in tensor.name:
        return unpermute_rope(_dequantize_rows(tensor, shape, torch.float32), num_heads).to(dtype)
    if arch == "llama" and ".attn_k." in tensor.name:
        return unpermute_rope(_dequantize_rows(tensor, shape, torch.float32),
                              num_kv_heads).to(dtype)
    return _dequantize_rows(tensor, shape, dtype)


def _tensor_shape(tensor) -> tuple[int, ...]:
    return tuple(int(d) for d in reversed(tensor.shape.tolist()))  # [out, in]


def _gguf_tensor_specs(reader, arch: str, num_heads: int, num_kv_heads: int,
                       dtype: torch.dtype) -> list[store.TensorSpec]:
    specs = []
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        if name is None:
            continue
        shape = _tensor_shape(tensor)
        specs.append(store.TensorSpec(
            name, shape, dtype, lambda tensor=tensor, shape=shape: _dequantize(
                tensor, shape, dtype, arch, num_heads, num_kv_heads)))
    return specs


class GGUFTensor:
    """A GGUF tensor still on disk, read like reader.LazyTensor: `read_into(dst)` dequantizes
    it (into float32 chunks of rows, then `dst`'s dtype) in Hugging Face layout."""

    __slots__ = ("tensor", "shape", "dtype", "name", "_heads")

    def __init__(self, tensor, name: str, heads: tuple[str, int, int]) -> None:
        self.tensor, self.name, self._heads = tensor, name, heads
        self.shape = torch.Size(_tensor_shape(tensor))
        self.dtype = torch.float32  # what the dequantized values are exact in

    @property
    def gguf_type(self) -> str:
        return self.tensor.tensor_type.name  # "Q4_K", "Q6_K", "F32", ...

    def read_into(self, dst: torch.Tensor) -> None:
        if tuple(dst.shape) != tuple(self.shape):
            raise ValueError(f"tensor {self.name!r}: shape {tuple(self.shape)}, destination "
                             f"{tuple(dst.shape)}")
        dst.copy_(_dequantize(self.tensor, tuple(self.shape), dst.dtype, *self._heads))

    def load(self) -> torch.Tensor:
        return _dequantize(self.tensor, tuple(self.shape), torch.float32, *self._heads)


def _read_gguf(gguf_path: str):
    from specdec.model.gguf_reader import open_gguf

    reader = open_gguf(gguf_path)  # NOTE: metadata arrays skipped (seconds per open)
    arch = str(reader.fields["general.architecture"].contents())
    if arch not in _ARCHITECTURE_CLASSES:
        raise ValueError(f"GGUF architecture {arch!r} is not supported "
                         f"(supported: {', '.join(_ARCHITECTURE_CLASSES)})")
    num_heads = int(reader.fields[f"{arch}.attention.head_count"].contents())
    kv_field = reader.fields.get(f"{arch}.attention.head_count_kv")
    num_kv_heads = int(kv_field.contents()) if kv_field is not None else num_heads
    return reader, arch, num_heads, num_kv_heads


def iter_gguf_weights(gguf_path: str):
    """(Hugging Face name, GGUFTensor) for every stored tensor of a GGUF file: the weight
    loader reads an entry that keeps its GGUF (and no safetensors) through these."""
    reader, arch, num_heads, num_kv_heads = _read_gguf(gguf_path)
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        if name is not None:
            yield name, GGUFTensor(tensor, name, (arch, num_heads, num_kv_heads))


def materialize_safetensors(path: str, dtype: torch.dtype = STORAGE_DTYPE) -> None:
    """Write `model.safetensors` (`dtype`, dequantized tensor by tensor) next to the entry's
    GGUF and re-hash the manifest: done once, by the first load that serves unquantized
    weights (a default int4 deployment never needs it). The file appears by one rename."""
    gguf_path = os.path.join(path, store.GGUF_NAME)
    reader, arch, num_heads, num_kv_heads = _read_gguf(gguf_path)
    specs = _gguf_tensor_specs(reader, arch, num_heads, num_kv_heads, dtype)
    fd, tmp = tempfile.mkstemp(dir=path, prefix=".materialize-", suffix=".tmp")
    os.close(fd)
    try:
        store.write_safetensors(tmp, specs, metadata={"format": "pt"}, progress="materialize")
        os.replace(tmp, os.path.join(path, store.WEIGHTS_NAME))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    del reader
    manifest = store.read_manifest(path) or {}
    store.write_manifest(path, dtype, manifest.get("source", {}))


def _write_config_and_tokenizer(gguf_path: str, out_dir: str, arch: str, tied: bool,
                                dtype: torch.dtype) -> None:
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    gguf_dir, gguf_file = os.path.split(gguf_path)
    config = AutoConfig.from_pretrained(gguf_dir, gguf_file=gguf_file)
    config.tie_word_embeddings = tied
    config.architectures = [_ARCHITECTURE_CLASSES[arch]]
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = dtype
    config.save_pretrained(out_dir)
    GenerationConfig.from_model_config(config).save_pretrained(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    tokenizer.save_pretrained(out_dir)


def gguf_to_entry(gguf_path: str, out_dir: str, source: dict[str, str],
                  dtype: torch.dtype = STORAGE_DTYPE, keep_gguf: bool = False) -> None:
    """GGUF -> `out_dir` (created): config, tokenizer, manifest and either `dtype` safetensors
    or (`keep_gguf`) the GGUF itself, moved in as `store.GGUF_NAME`: then the int4 loader
    takes its 4-bit blocks as they are, and `materialize_safetensors` writes the `dtype`
    tensors only if an unquantized load asks for them."""
    reader, arch, num_heads, num_kv_heads = _read_gguf(gguf_path)
    tied = all(t.name != "output.weight" for t in reader.tensors)
    os.makedirs(out_dir)
    _write_config_and_tokenizer(gguf_path, out_dir, arch, tied, dtype)
    if keep_gguf:
        del reader
        shutil.move(gguf_path, os.path.join(out_dir, store.GGUF_NAME))
    else:
        specs = _gguf_tensor_specs(reader, arch, num_heads, num_kv_heads, dtype)
        store.write_safetensors(os.path.join(out_dir, store.WEIGHTS_NAME), specs,
                                metadata={"format": "pt"}, progress="convert")
        del reader
    store.write_manifest(out_dir, dtype, source)


# ---------------------------------------------------------------- older entries


def _safetensors_specs(files: list[str], dtype: torch.dtype) -> list[store.TensorSpec]:
    from specdec.model.reader import SafetensorsFile

    specs = []
    for file in files:
        reader = SafetensorsFile(file)
        for name in reader.keys():
            lazy = reader.lazy(name)
            specs.append(store.TensorSpec(name, tuple(lazy.shape), dtype,
                                          lambda lazy=lazy: lazy.load().to(dtype)))
    return specs


def upgrade_entry(path: str, source: dict[str, str],
                  dtype: torch.dtype = STORAGE_DTYPE) -> None:
    """Rewrite an entry of an older format (float32 safetensors, no manifest) in place into
    the current one, tensor by tensor, with no download. The swap is one rename: a reader
    never sees a half-written entry."""
    from specdec.model.weights import safetensors_files

    parent = os.path.dirname(os.path.abspath(path))
    work = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.upgrade-", dir=parent)
    old = None
    try:
        new = os.path.join(work, "model")
        os.makedirs(new)
        weight_files = safetensors_files(path)
        skip = {os.path.basename(f) for f in weight_files} | {
            "model.safetensors.index.json", store.MANIFEST_NAME}
        for name in os.listdir(path):
            if name not in skip and os.path.isfile(os.path.join(path, name)):
                shutil.copy2(os.path.join(path, name), os.path.join(new, name))
        config_file = os.path.join(new, "config.json")
        if os.path.isfile(config_file):
            with open(config_file) as f:
                config = json.load(f)
            config["dtype"] = str(dtype).removeprefix("torch.")
            config.pop("torch_dtype", None)
            with open(config_file, "w") as f:
                json.dump(config, f, indent=2)
        store.write_safetensors(os.path.join(new, store.WEIGHTS_NAME),
                                _safetensors_specs(weight_files, dtype),
                                metadata={"format": "pt"}, progress="upgrade")
        store.write_manifest(new, dtype, source)
        old = os.path.join(work, "old")
        os.rename(path, old)
        os.rename(new, path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
