"""Load a Llama-family model and its tokenizer from a local Hugging Face directory (single or
sharded safetensors), or from a name that `specdec fetch` knows."""

from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open

from specdec.fetch import resolve_model_path
from specdec.model import convert, quant_cache, store
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
    straight into its parameter (specdec/model/reader.py), with no memory map. An entry that
    keeps only its GGUF yields its tensors, dequantized on read (convert.GGUFTensor)."""
    if store.gguf_source(path) and not os.path.isfile(os.path.join(path, store.WEIGHTS_NAME)):
        yield from convert.iter_gguf_weights(store.gguf_source(path))
        return
    for file in safetensors_files(path):
        reader = SafetensorsFile(file)
        for name in reader.keys():
            yield name, reader.lazy(name)


def iter_source_weights(path: str):
    """What a quantized load reads: the entry's GGUF if it keeps one (its exact values, and
    the same ones whether or not bf16 safetensors were written next to it), else the
    safetensors."""
    gguf_path = store.gguf_source(path)
    if gguf_path:
        yield from convert.iter_gguf_weights(gguf_path)
    else:
        yield from iter_lazy_weights(path)


def _layer_of(name: str) -> int | None:
    parts = name.removeprefix("model.").split(".")
    return int(parts[1]) if len(parts) > 2 and parts[0] == "layers" else None


class _Unread:
    """A tensor whose module never reads its dequantized values (GGUFGroups plan 'exact'):
    load_weights leaves the (soon freed) parameter as it is."""

    def __init__(self, shape: torch.Size) -> None:
        self.shape = shape

    def read_into(self, dst: torch.Tensor) -> None:
        if tuple(dst.shape) != tuple(self.shape):
            raise ValueError(f"shape {tuple(self.shape)}, destination {tuple(dst.shape)}")


def _checkpoint_groups(module: torch.nn.Module, prefix: str, gguf_groups) -> tuple[dict, set]:
    """The GGUF's 4-bit groups for the Linear modules of `module` (named `prefix`), and the
    names that stay int8, keyed as quantize_weights sees them."""
    groups, int8_names = {}, set()
    for name, linear in module.named_modules():
        if not isinstance(linear, torch.nn.Linear):
            continue
        source = gguf_groups.source_groups(prefix + name, linear.weight.detach())
        if source is None:
            int8_names.add(name)
        else:
            groups[name] = source
    return groups, int8_names


def load_quantized(model: LlamaForCausalLM, path: str, quantization: str,
                   high_bits: str = "int8") -> None:
    """Load and quantize one decoder layer at a time (then the embedding, norm and lm_head):
    a layer's full-precision Linear weights are freed as soon as it is quantized, so the
    peak memory is the quantized model plus one layer, never a full-precision copy.

    An entry that keeps its GGUF: int4 takes the GGUF's Q4_K groups as they are, and the
    modules stored at more bits become `high_bits` (specdec/model/gguf_q4k.py)."""
    from specdec.model.gguf_q4k import GGUFGroups
    from specdec.model.quant import Int4Embedding, quantize_weights

    gguf_path = store.gguf_source(path)
    gguf_groups = (GGUFGroups(gguf_path, high_bits)
                   if quantization == "int4" and gguf_path else None)
    expected = model._expected_slices()
    loaded: set[str] = set()
    by_layer: dict[int | None, list] = {}
    skip = gguf_groups.exact_tensors() if gguf_groups is not None else set()
    for name, tensor in iter_source_weights(path):
        if isinstance(tensor, convert.GGUFTensor) and tensor.tensor.name in skip:
            tensor = _Unread(tensor.shape)  # its module takes the 4-bit groups as they are
        by_layer.setdefault(_layer_of(name), []).append((name, tensor))
    for layer in [*sorted(k for k in by_layer if k is not None), None]:
        loaded |= model.load_weights(by_layer.get(layer, []), strict=False, map_files=False)
        module = model.layers[layer] if layer is not None else model
        groups, int8_names = (_checkpoint_groups(module, "" if layer is None else
                                                 f"layers.{layer}.", gguf_groups)
                              if gguf_groups is not None else (None, None))
        quantize_weights(module, quantization, groups=groups, int8_names=int8_names)
    if gguf_groups is not None:
        # NOTE: the table in int4 too (a quarter of bfloat16's bytes), exact for a Q4_K one;
        # a lookup dequantizes only its rows.
        weight = model.embed_tokens.weight.detach()
        model.embed_tokens = Int4Embedding(model.embed_tokens, model.dtype,
                                           gguf_groups.source_groups("embed_tokens", weight))
        loaded.add("embed_tokens.weight@None")
    missing = sorted(expected - loaded)
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:5]}")
    model.quantization = quantization


def load_model(path: str, dtype: str | torch.dtype = "float32", device: str = "cpu",
               quantization: str | None = None, max_model_len: int | None = None,
               high_bits: str = "int8") -> LlamaForCausalLM:
    """Build the model from `path` (a local HF directory or a fetch name) and load its weights.
    `quantization="int8"` / `"int4"`: weight-only quantized Linear layers (logits stay
    float32; see specdec/model/quant.py). `high_bits`: what an int4 load from a GGUF makes of
    the modules the GGUF stores at more than 4 bits ("int8" or "int4"; gguf_q4k.py)."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    torch_dtype = parse_dtype(dtype)
    path = resolve_model_path(path, verify=True)
    config = load_config(path)
    model = LlamaForCausalLM(config, torch_dtype, device, max_model_len=max_model_len)
    if quantization is None:
        if store.gguf_source(path) and not os.path.isfile(os.path.join(path, store.WEIGHTS_NAME)):
            convert.materialize_safetensors(path)  # once: unquantized serving reads these
        model.load_weights(iter_lazy_weights(path))
    else:
        if torch.device(device).type != "cpu":
            raise ValueError(f"quantization={quantization!r} runs on the CPU only, "
                             f"got device={device}")
        key = quant_cache.cache_key(path, torch_dtype, quantization, high_bits)
        if key is not None and quant_cache.load(model, key, path):
            model.quantization = quantization
            model.quantized_from = "cache"
        else:
            load_quantized(model, path, quantization, high_bits)
            model.quantized_from = "source"
            if key is not None:
                quant_cache.save(model, key, slot=json.dumps(
                    [os.path.abspath(path), str(torch_dtype), quantization, high_bits]))
    model.eval()
    return model


def pack_quantized(path: str, dtype: str | torch.dtype = "float32",
                   quantization: str | None = None, high_bits: str = "int8") -> str:
    """Build the cache entry of packed weights that load_model() with these arguments reads,
    so that the first start does not quantize. Returns "cached" (it was there and matches
    its hash), "packed" (built now), "unquantized" or "uncacheable" (nothing to build: no
    quantization, or a source without a manifest)."""
    if quantization is None:
        return "unquantized"
    path = resolve_model_path(path, verify=True)
    key = quant_cache.cache_key(path, parse_dtype(dtype), quantization, high_bits)
    if key is None:
        return "uncacheable"
    if quant_cache.has_entry(key):
        return "cached"
    model = load_model(path, dtype, "cpu", quantization, high_bits=high_bits)  # saves the entry
    del model
    return "packed" if quant_cache.has_entry(key) else "uncacheable"


def load_tokenizer(path: str):
    """transformers AutoTokenizer of the same directory (or fetch name)."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(resolve_model_path(path))
