"""A disk cache of quantized models: the packed int4 / int8 tensors as `load_quantized` built
them, so a second start reads them instead of quantizing again.

An entry `$SPECDEC_CACHE_DIR/quantized/<key>.safetensors` holds the buffers of the quantized
modules (packed weights, scales, biases) and, in its metadata, which module is of which
quantized class with which constructor attributes; the embedding and the norms are read from
the source entry as on a first load. The key hashes the
source weights (the xxh3 hashes of the model entry's manifest), the dtype, the quantization,
torch's version, `quant.FORMAT_VERSION` and the source code of quant.py itself, so any change
to the packing invalidates old entries. The file carries its own xxh3 hash next to it
(`.xxh3`): a damaged entry is rebuilt, never served.

Only classes named in CACHEABLE are cached: each is rebuilt from its buffers and simple
attributes alone. A model with any other module type (a new kernel's Linear) is quantized
from the source weights as before.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import struct
import tempfile

import torch
from torch import nn

from specdec.model import quant, store
from specdec.model.reader import MAP_ALIGNMENT, SafetensorsFile

CACHE_FORMAT = 2
CACHEABLE = ("Int8Linear", "Int4Linear", "Int4Embedding")
_SIMPLE = (int, float, str, bool, type(None))


def cache_dir() -> str:
    root = os.environ.get("SPECDEC_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "specdec")
    return os.path.join(root, "quantized")


def cache_key(path: str, dtype: torch.dtype, quantization: str,
              high_bits: str = "int8") -> str | None:
    """The entry name for this source and settings; None if the source has no manifest
    (a local directory we cannot fingerprint cheaply: no caching). An entry that keeps its
    GGUF is keyed by the GGUF alone (the quantized load reads only it), with the code that
    reads its 4-bit groups and `high_bits`."""
    manifest = store.read_manifest(path)
    if manifest is None:
        return None
    from specdec.model import gguf_q4k

    suffix = ".gguf" if store.gguf_source(path) else ".safetensors"
    source = {name: entry["xxh3_128"] for name, entry in manifest["files"].items()
              if name.endswith(suffix)}
    code = hashlib.sha256(inspect.getsource(quant).encode()).hexdigest()
    key = {"cache_format": CACHE_FORMAT, "source": source, "dtype": str(dtype),
           "quantization": quantization, "torch": torch.__version__,
           "quant_format": getattr(quant, "FORMAT_VERSION", None), "quant_code": code}
    if suffix == ".gguf":
        key["gguf_code"] = hashlib.sha256(inspect.getsource(gguf_q4k).encode()).hexdigest()
        key["high_bits"] = high_bits
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def _modules(model: nn.Module) -> dict[str, dict]:
    """name -> {"class", "attrs", "buffers"} for every quantized module; None if a module of
    a class outside CACHEABLE is quantized (not cacheable)."""
    out = {}
    for name, module in model.named_modules():
        cls = type(module).__name__
        if module.__class__.__module__ != quant.__name__:
            continue
        if cls not in CACHEABLE:
            return None
        attrs = {k: v for k, v in vars(module).items()
                 if not k.startswith("_") and k != "training" and isinstance(v, _SIMPLE)}
        out[name] = {"class": cls, "attrs": attrs,
                     "buffers": {k: v is not None for k, v in module._buffers.items()}}
    return out


def _metadata(path: str) -> dict:
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(size)).get("__metadata__", {})


def _evict_superseded(slot: str, keep: str) -> None:
    """Remove the entries of the same slot (source entry and settings) other than `keep`:
    after a code or source change, the old packed copy would otherwise stay on disk."""
    for name in os.listdir(cache_dir()):
        path = os.path.join(cache_dir(), name)
        if not name.endswith(".safetensors") or name == f"{keep}.safetensors":
            continue
        try:
            if _metadata(path).get("slot") != slot:
                continue
        except (OSError, ValueError):
            continue
        _remove(path)


def save(model: nn.Module, key: str, slot: str | None = None) -> str | None:
    """Write the quantized model's tensors under `key`; returns the file, or None when the
    model is not cacheable or the cache is not writable. `slot` (the source entry and the
    settings, without the code and source hashes): older entries of the same slot are
    removed once this one is written."""
    modules = _modules(model)
    if modules is None:
        return None
    # NOTE: only the quantized modules' buffers: the embedding and the norms are read from
    # the source entry on load (the float32 embedding of a draft would double its size here).
    tensors = {f"{name}.{buffer}": tensor for name in modules
               for buffer, tensor in model.get_submodule(name)._buffers.items()
               if tensor is not None}
    specs = [store.TensorSpec(name, tuple(t.shape), t.dtype, lambda t=t: t)
             for name, t in tensors.items()]
    path = os.path.join(cache_dir(), f"{key}.safetensors")
    try:
        os.makedirs(cache_dir(), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_dir(), suffix=".tmp")
        os.close(fd)
        metadata = {"modules": json.dumps(modules)}
        if slot is not None:
            metadata["slot"] = slot
        store.write_safetensors(tmp, specs, metadata=metadata)
        with open(tmp + ".xxh3", "w") as f:
            f.write(store.file_hash(tmp))
        os.replace(tmp + ".xxh3", path + ".xxh3")
        os.replace(tmp, path)
    except OSError:
        return None
    if slot is not None:
        _evict_superseded(slot, key)
    return path


def _shell(cls_name: str, attrs: dict) -> nn.Module:
    cls = getattr(quant, cls_name)
    module = cls.__new__(cls)
    nn.Module.__init__(module)
    for k, v in attrs.items():
        setattr(module, k, v)
    return module


def _remove(path: str) -> None:
    """Delete an entry's file and its hash, whichever exist."""
    for stale in (path, path + ".xxh3"):
        try:
            os.remove(stale)
        except OSError:
            pass


def has_entry(key: str) -> bool:
    """True if the entry `key` is there and matches its hash (a damaged one is deleted)."""
    path = os.path.join(cache_dir(), f"{key}.safetensors")
    if not os.path.isfile(path):
        return False
    try:
        with open(path + ".xxh3") as f:
            if store.hash_matches(path, f.read().strip()):  # re-read only if it changed
                return True
    except OSError:
        pass
    _remove(path)
    return False


def load(model: nn.Module, key: str, source_path: str) -> bool:
    """Fill `model` (built, weights not loaded) from the cache entry `key`: quantized modules
    rebuilt from their buffers, the other parameters (embedding, norms) read from the source
    entry `source_path`. False if there is no entry, or it does not match its hash (then it is
    deleted and the caller quantizes)."""
    from specdec.model.weights import iter_source_weights

    if not has_entry(key):
        return False
    path = os.path.join(cache_dir(), f"{key}.safetensors")
    try:
        reader = SafetensorsFile(path)
        modules = json.loads(_metadata(path)["modules"])
    except (OSError, ValueError, KeyError):
        _remove(path)
        return False
    for name, spec in modules.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        module = _shell(spec["class"], spec["attrs"])
        for buffer, present in spec["buffers"].items():
            value = None
            if present:  # NOTE: mapped, not copied (specdec/model/reader.py); save() never
                lazy = reader.lazy(f"{name}.{buffer}")  # rewrites a file in place
                value = lazy.mapped(MAP_ALIGNMENT)  # NOTE: quantized kernels want 64
                value = lazy.load() if value is None else value
            module.register_buffer(buffer, value)
        setattr(parent, child, module)
    params = set(dict(model.named_parameters(remove_duplicate=False)))
    rest = [(name, tensor) for name, tensor in iter_source_weights(source_path)
            if any(target in params for target, _ in model._map_name(name))]
    loaded = model.load_weights(rest, strict=False)
    missing = sorted(p for p in params if not any(s.startswith(p + "@") for s in loaded)
                     and not (p == "lm_head.weight" and model.arch.tie_word_embeddings))
    if missing:
        raise ValueError(f"{source_path} lacks {missing[:5]} for the quantized cache entry")
    return True
