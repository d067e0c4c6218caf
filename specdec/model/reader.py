"""Read safetensors tensors straight into their destination tensors.

`safe_open(...).get_tensor` reads through a memory map: every page it touches stays resident
in the process (file-backed RSS) until the file is closed, next to the parameter the bytes are
copied into. Loading a 3.5 GB model then peaks near 7 GB of RSS. Here each tensor is read with
plain `readinto` into the parameter's own memory (or, when the dtype differs, into one
temporary tensor of the file's dtype, then cast), so the page cache holds the file and the
process holds the model once.
"""

from __future__ import annotations

import json
import struct

import torch

_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
           "I8": torch.int8, "U8": torch.uint8, "I32": torch.int32, "I64": torch.int64,
           "BOOL": torch.bool, "F64": torch.float64, "I16": torch.int16}


class SafetensorsFile:
    """The header of one safetensors file, and reads of its tensors by name."""

    def __init__(self, path: str) -> None:
        self.path = path
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        header.pop("__metadata__", None)
        self.data_start = 8 + size
        self.entries = header  # name -> {"dtype", "shape", "data_offsets"}

    def keys(self) -> list[str]:
        return list(self.entries)

    def lazy(self, name: str) -> "LazyTensor":
        entry = self.entries[name]
        if entry["dtype"] not in _DTYPES:
            raise ValueError(f"{self.path}: tensor {name!r} has unsupported dtype "
                             f"{entry['dtype']}")
        begin, end = entry["data_offsets"]
        return LazyTensor(self.path, self.data_start + begin, end - begin,
                          torch.Size(entry["shape"]), _DTYPES[entry["dtype"]], name)


class LazyTensor:
    """A tensor still on disk: its shape and dtype, and `read_into(dst)`."""

    __slots__ = ("path", "offset", "nbytes", "shape", "dtype", "name")

    def __init__(self, path: str, offset: int, nbytes: int, shape: torch.Size,
                 dtype: torch.dtype, name: str) -> None:
        self.path, self.offset, self.nbytes = path, offset, nbytes
        self.shape, self.dtype, self.name = shape, dtype, name

    def read_into(self, dst: torch.Tensor) -> None:
        """Fill `dst` (same shape, CPU; any dtype: cast if it differs) from the file."""
        if tuple(dst.shape) != tuple(self.shape):
            raise ValueError(f"tensor {self.name!r}: shape {tuple(self.shape)}, destination "
                             f"{tuple(dst.shape)}")
        direct = dst.dtype == self.dtype and dst.is_contiguous() and dst.device.type == "cpu"
        buffer = dst if direct else torch.empty(self.shape, dtype=self.dtype)
        view = memoryview(buffer.reshape(-1).view(torch.uint8).numpy())
        if len(view) != self.nbytes:
            raise ValueError(f"tensor {self.name!r}: {self.nbytes} bytes on disk, "
                             f"{len(view)} expected for {tuple(self.shape)} {self.dtype}")
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.offset)
            done = 0
            while done < len(view):
                n = f.readinto(view[done:])
                if not n:
                    raise ValueError(f"{self.path}: tensor {self.name!r} is truncated")
                done += n
        if not direct:
            dst.copy_(buffer)

    def load(self) -> torch.Tensor:
        out = torch.empty(self.shape, dtype=self.dtype)
        self.read_into(out)
        return out
