"""The on-disk model cache format: safetensors written tensor by tensor, and a manifest that
names the format version, the stored dtype and every file's size and xxh3-128 hash.

A fetched entry `$SPECDEC_MODEL_DIR/NAME` holds `model.gguf` (the verified source) and/or
`model.safetensors` (the weights in the dtype they are served unquantized in), the config /
tokenizer / chat template files, and `MANIFEST_NAME`. An
entry without a manifest, or with an older `format`, predates this layout (float32 weights
converted by transformers) and is upgraded by `specdec.model.convert.upgrade_entry`.

NOTE: xxh3 rather than sha256: on the 2-core dev VM sha256 runs at 0.6 GB/s (6 s for the
1.5B + 0.5B pair) while xxh3 runs at memory speed. The hash guards against corruption (a
truncated copy, a disk error, a half-finished write, an edit); the download itself is checked
against a pinned sha256 before anything is converted.

What is verified when (`hash_matches`):
- a file is hashed in full when it is written, when it has no stamp yet, and whenever its
  stamp changed. The stamp is (size, mtime_ns, ctime_ns, inode, device), recorded in the
  directory's `STAMPS_NAME` after a hash matched. Any write through the file system changes
  mtime and ctime, and ctime cannot be set back from user space (`touch -d`, `os.utime` set
  mtime only), so an edited, truncated, replaced or re-copied file is always re-hashed;
- a file whose stamp is unchanged is trusted without reading it. What a stamp cannot see is
  damage below the file system: bit rot on the medium, a faulty disk or controller, a write to
  the raw block device. `SPECDEC_VERIFY=full` re-hashes every byte at every start and fetch;
- sizes are checked on every resolve.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import tempfile
from dataclasses import dataclass
from typing import Callable, Iterable

import xxhash

# NOTE: torch, numpy and tqdm are imported where tensors are written: `specdec fetch` on a
# fetched entry (every `make serve`) only verifies, and importing torch costs it 1-5 s.

# NOTE: bump when the stored tensors change meaning (dtype, names, layout); older entries are
# then converted or rebuilt, never served as if they were the new format.
FORMAT_VERSION = "specdec-model-2"
MANIFEST_NAME = "specdec-model.json"
STAMPS_NAME = ".specdec-verified.json"  # file -> [stamp, hash] of its last full hash
WEIGHTS_NAME = "model.safetensors"
# An entry may keep its verified GGUF source instead of (or next to) WEIGHTS_NAME: the int4
# loader reads its 4-bit blocks as they are (specdec/model/gguf_q4k.py), and WEIGHTS_NAME is
# written from it only when an unquantized load needs it (convert.materialize_safetensors).
GGUF_NAME = "model.gguf"
_CHUNK = 16 << 20

_SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "int8": "I8",
                       "uint8": "U8", "int32": "I32", "int64": "I64"}


class CorruptEntry(RuntimeError):
    """A cache entry whose files do not match its manifest."""


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One tensor to be written: its name, shape, dtype and a function producing it."""

    name: str
    shape: tuple[int, ...]
    dtype: "torch.dtype"
    produce: Callable[[], "torch.Tensor"]


def write_safetensors(path: str, specs: Iterable[TensorSpec],
                      metadata: dict[str, str] | None = None, progress: str | None = None
                      ) -> None:
    """Write a safetensors file one tensor at a time: only the tensor being written is ever
    in memory. Each `produce()` must return a tensor of exactly its spec's shape and dtype."""
    import numpy as np
    import torch
    from tqdm import tqdm

    def size(spec: TensorSpec) -> int:
        return int(np.prod(spec.shape, dtype=np.int64)) * torch.empty(
            (), dtype=spec.dtype).element_size()

    # NOTE: tensors whose size is a multiple of 64 bytes first, after a data section that
    # starts 64-byte aligned: each of them can then be memory-mapped (reader.MAP_ALIGNMENT);
    # only the odd-sized ones after them are read into fresh memory.
    specs = sorted(specs, key=lambda spec: size(spec) % 64 != 0)
    header: dict = {"__metadata__": dict(metadata or {})}
    offset = 0
    for spec in specs:
        nbytes = size(spec)
        dtype = _SAFETENSORS_DTYPES[str(spec.dtype).removeprefix("torch.")]
        header[spec.name] = {"dtype": dtype, "shape": list(spec.shape),
                             "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-(8 + len(encoded)) % 64)  # the data section starts 64-byte aligned
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


def _stamp(path: str) -> list[int]:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def _read_stamps(directory: str) -> dict:
    try:
        with open(os.path.join(directory, STAMPS_NAME)) as f:
            stamps = json.load(f)
    except (OSError, ValueError):
        return {}
    return stamps if isinstance(stamps, dict) else {}


def _record_stamp(path: str, digest: str | None) -> None:
    """Remember (or, with digest None, forget) that `path` as it is now hashes to `digest`.
    Best effort: a read-only directory only means hashing again next time."""
    directory, name = os.path.split(os.path.abspath(path))
    stamps = _read_stamps(directory)
    if digest is None:
        if stamps.pop(name, None) is None:
            return
    else:
        stamps[name] = [_stamp(path), digest]
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=STAMPS_NAME, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(stamps, f)
        os.replace(tmp, os.path.join(directory, STAMPS_NAME))
    except OSError:
        pass


def full_verify_forced() -> bool:
    return os.environ.get("SPECDEC_VERIFY", "").lower() == "full"


def hash_matches(path: str, expected: str) -> bool:
    """True if the file's xxh3-128 is `expected`: read in full unless its stamp is the one
    recorded after its last matching hash (see the module docstring for what that trusts)."""
    directory, name = os.path.split(os.path.abspath(path))
    recorded = _read_stamps(directory).get(name)
    if (not full_verify_forced() and isinstance(recorded, list) and len(recorded) == 2
            and recorded[1] == expected and recorded[0] == _stamp(path)):
        return True
    digest = file_hash(path)
    _record_stamp(path, digest if digest == expected else None)
    return digest == expected


# NOTE: generation_config.json is metadata that `specdec fetch` refreshes in place (the published
# EOS list and sampling defaults), so it is not part of the hashed payload.
UNHASHED = ("generation_config.json",)


def _payload_files(path: str) -> list[str]:
    skip = {MANIFEST_NAME, *UNHASHED}
    return sorted(name for name in os.listdir(path)
                  if name not in skip and not name.startswith(".")
                  and os.path.isfile(os.path.join(path, name)))


def write_manifest(path: str, dtype, source: dict[str, str]) -> dict:
    """Hash every file of the finished directory `path` into its manifest; returns it.
    NOTE: no stamps here: the caller usually renames the directory next, which changes
    the files' ctime; the first verify hashes them once and records them."""
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
    `full`) its hash: re-read only when the file changed since its last verified hash
    (`hash_matches`). `full=False` checks the sizes only (cheap; catches truncation)."""
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
        if full and not hash_matches(file, expected["xxh3_128"]):
            raise CorruptEntry(f"{file} does not match its xxh3-128 hash in {MANIFEST_NAME}")
