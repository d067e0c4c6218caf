"""The on-disk model cache format: safetensors written tensor by tensor, and a manifest that
names the format version, the stored dtype and every file's size and xxh3-128 hash.

A fetched entry `$SPECDEC_MODEL_DIR/NAME` holds `model.gguf` (the verified source) and/or
`model.safetensors` (the weights in the dtype they are served unquantized in), the config /
tokenizer / chat template files, and `MANIFEST_NAME`. An
entry without a manifest, or with an older `format`, predates this layout (float32 weights
converted by transformers) and is upgraded by `specdec.model.convert.upgrade_entry`.

NOTE: xxh3 rather than sha256: a start-up verifies every byte of the entry, and on the 2-core
dev VM sha256 runs at 0.6 GB/s (6 s for the 1.5B + 0.5B pair) while xxh3 runs at memory speed.
The hash guards against corruption (a truncated copy, a disk error, a half-finished write);
the download itself is checked against a pinned sha256 before anything is converted.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch
import xxhash
from tqdm import tqdm

# NOTE: bump when the stored tensors change meaning (dtype, names, layout); older entries are
# then converted or rebuilt, never served as if they were the new format.
FORMAT_VERSION = "specdec-model-2"
MANIFEST_NAME = "specdec-model.json"
WEIGHTS_NAME = "model.safetensors"
# An entry may keep its verified GGUF source instead of (or next to) WEIGHTS_NAME: the int4
# loader reads its 4-bit blocks as they are (specdec/model/gguf_q4k.py), and WEIGHTS_NAME is
# written from it only when an unquantized load needs it (convert.materialize_safetensors).
GGUF_NAME = "model.gguf"
_CHUNK = 16 << 20

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
                      torch.int8: "I8", torch.uint8: "U8", torch.int32: "I32",
                      torch.int64: "I64"}


class CorruptEntry(RuntimeError):
    """A cache entry whose files do not match its manifest."""


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One tensor to be written: its name, shape, dtype and a function producing it."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor]


def write_safetensors(path: str, specs: Iterable[TensorSpec],
                      metadata: dict[str, str] | None = None, progress: str | None = None
                      ) -> None:
    """Write a safetensors file one tensor at a time: only the tensor being written is ever
    in memory. Each `produce()` must return a tensor of exactly its spec's shape and dtype."""
    specs = list(specs)
    header: dict = {"__metadata__": dict(metadata or {})}
    offset = 0
    for spec in specs:
        nbytes = int(np.prod(spec.shape, dtype=np.int64)) * torch.empty(
            (), dtype=spec.dtype).element_size()
        header[spec.name] = {"dtype": SAFETENSORS_DTYPES[spec.dtype], "shape": list(spec.shape),
                             "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        bar = tqdm(total=len(specs), desc=progress, unit="tensor", file=sys.stderr,
                   disable=progress is None)
        for spec in specs:
            tensor = spec.produce()
            if tuple(tensor.shape) != tuple(spec.shape) or tensor.dtype != spec.dtype:
                raise ValueError(f"tensor {spec.name!r}: produced {tuple(tensor.shape)} "
                                 f"{tensor.dtype}, declared {spec.shape} {spec.dtype}")
            # NOTE: bfloat16 has no numpy dtype; write the raw bytes through a uint8 view.
            data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
            f.write(memoryview(data))
            del tensor, data
            bar.update(1)
        bar.close()
        f.flush()
        os.fsync(f.fileno())


def file_hash(path: str) -> str:
    digest = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# NOTE: generation_config.json is metadata that `specdec fetch` refreshes in place (the published
# EOS list and sampling defaults), so it is not part of the hashed payload.
UNHASHED = ("generation_config.json",)


def _payload_files(path: str) -> list[str]:
    skip = {MANIFEST_NAME, *UNHASHED}
    return sorted(name for name in os.listdir(path)
                  if name not in skip and not name.startswith(".")
                  and os.path.isfile(os.path.join(path, name)))


def write_manifest(path: str, dtype: torch.dtype, source: dict[str, str]) -> dict:
    """Hash every file of the finished directory `path` into its manifest; returns it."""
    files = {name: {"size": os.path.getsize(os.path.join(path, name)),
                    "xxh3_128": file_hash(os.path.join(path, name))}
             for name in _payload_files(path)}
    manifest = {"format": FORMAT_VERSION, "dtype": str(dtype).removeprefix("torch."),
                "source": source, "files": files}
    tmp = os.path.join(path, MANIFEST_NAME + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp, os.path.join(path, MANIFEST_NAME))
    return manifest


def gguf_source(path: str) -> str | None:
    """The GGUF file an entry keeps (None: a plain safetensors directory)."""
    file = os.path.join(path, GGUF_NAME)
    return file if os.path.isfile(file) else None


def read_manifest(path: str) -> dict | None:
    """The entry's manifest, or None for an entry from before manifests existed."""
    file = os.path.join(path, MANIFEST_NAME)
    if not os.path.isfile(file):
        return None
    with open(file) as f:
        return json.load(f)


def is_current(path: str) -> bool:
    """True if the entry is in this version's format (not whether its bytes are intact)."""
    manifest = read_manifest(path)
    return manifest is not None and manifest.get("format") == FORMAT_VERSION


def verify_entry(path: str, full: bool = True) -> None:
    """Raise CorruptEntry unless every file the manifest names exists with its size and (if
    `full`) its hash. `full=False` checks the sizes only (cheap; catches truncation)."""
    manifest = read_manifest(path)
    if manifest is None:
        raise CorruptEntry(f"{path} has no {MANIFEST_NAME}")
    for name, expected in manifest["files"].items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise CorruptEntry(f"{file} is missing")
        size = os.path.getsize(file)
        if size != expected["size"]:
            raise CorruptEntry(f"{file} has {size} bytes, the manifest says {expected['size']}")
        if full and file_hash(file) != expected["xxh3_128"]:
            raise CorruptEntry(f"{file} does not match its xxh3-128 hash in {MANIFEST_NAME}")
