"""Load a Llama-family model and its tokenizer from a local Hugging Face directory (single or
sharded safetensors), or from a name that `specdec fetch` knows."""

from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open

from specdec.fetch import resolve_model_path
from specdec.model import quant_cache
from specdec.model.llama import LlamaForCausalLM
from specdec.model.reader import SafetensorsFile

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANTIZATIONS = (None, "int8", "int4")


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def load_config(path: str):
    """The transformers config of a model directory."""
    from transformers import AutoConfig
    return AutoConfig.from_pretrained(path)


def safetensors_files(path: str) -> list[str]:
    """The weight files of a directory: the shards named by model.safetensors.index.json, or
    every *.safetensors file."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return [os.path.join(path, name) for name in sorted(set(weight_map.values()))]
    files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"model path {path!r} has no *.safetensors files")
    return files


def iter_weights(path: str):
    """(name, tensor) for every tensor of every safetensors file of the directory."""
    for file in safetensors_files(path):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def iter_lazy_weights(path: str):
    """(name, LazyTensor) for every tensor of the directory: `load_weights` reads each one
    straight into its parameter (specdec/model/reader.py), with no memory map."""
    for file in safetensors_files(path):
        reader = SafetensorsFile(file)
        for name in reader.keys():
            yield name, reader.lazy(name)


def _layer_of(name: str) -> int | None:
    parts = name.removeprefix("model.").split(".")
    return int(parts[1]) if len(parts) > 2 and parts[0] == "layers" else None


def load_quantized(model: LlamaForCausalLM, path: str, quantization: str) -> None:
    """Load and quantize one decoder layer at a time (then the embedding, norm and lm_head):
    a layer's full-precision Linear weights are freed as soon as it is quantized, so the
    peak memory is the quantized model plus one layer, never a full-precision copy."""
    from specdec.model.quant import quantize_weights

    expected = model._expected_slices()
    loaded: set[str] = set()
    by_layer: dict[int | None, list] = {}
    for name, tensor in iter_lazy_weights(path):
        by_layer.setdefault(_layer_of(name), []).append((name, tensor))
    for layer in [*sorted(k for k in by_layer if k is not None), None]:
        loaded |= model.load_weights(by_layer.get(layer, []), strict=False, map_files=False)
        quantize_weights(model.layers[layer] if layer is not None else model, quantization)
    missing = sorted(expected - loaded)
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:5]}")
    model.quantization = quantization


def load_model(path: str, dtype: str | torch.dtype = "float32", device: str = "cpu",
               quantization: str | None = None, max_model_len: int | None = None,
               ) -> LlamaForCausalLM:
    """Build the model from `path` (a local HF directory or a fetch name) and load its weights.
    `quantization="int8"` / `"int4"`: weight-only quantized Linear layers (logits stay
    float32; see specdec/model/quant.py)."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    torch_dtype = parse_dtype(dtype)
    path = resolve_model_path(path, verify=True)
    config = load_config(path)
    model = LlamaForCausalLM(config, torch_dtype, device, max_model_len=max_model_len)
    if quantization is None:
        model.load_weights(iter_lazy_weights(path))
    else:
        if torch.device(device).type != "cpu":
            raise ValueError(f"quantization={quantization!r} runs on the CPU only, "
                             f"got device={device}")
        key = quant_cache.cache_key(path, torch_dtype, quantization)
        if key is not None and quant_cache.load(model, key, path):
            model.quantization = quantization
            model.quantized_from = "cache"
        else:
            load_quantized(model, path, quantization)
            model.quantized_from = "source"
            if key is not None:
                quant_cache.save(model, key)
    model.eval()
    return model


def load_tokenizer(path: str):
    """transformers AutoTokenizer of the same directory (or fetch name)."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(resolve_model_path(path))
