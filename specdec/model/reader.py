"""Read safetensors tensors: mapped straight from the page cache, or read into a destination.

Two ways in, picked per parameter by `LlamaForCausalLM.load_weights`:

- `mapped()`: a tensor that *is* the file's bytes, through one private (copy-on-write) memory
  map per file. Used when a parameter's dtype is the stored dtype and its bytes are one
  contiguous range of the file (a plain tensor, or the adjacent gate/up parts of a fused
  one). Nothing is copied: the process maps the page cache's pages, so the model is resident
  once (file-backed RSS, shared with the page cache and reclaimable) and loading a 3.5 GB model
  costs page-table updates, not 3.5 GB of fresh anonymous pages. A write to such a tensor
  copies only the page it touches (MAP_PRIVATE), never the file.
- `read_into(dst)`: plain `readinto` into the parameter's own memory (or, when the dtype
  differs, into one temporary tensor of the file's dtype, then cast). Used for slices of
  fused parameters whose parts are not adjacent on disk and for dtype changes.

NOTE: why not safetensors' own memory map: `safe_open(...).get_tensor` copies out of its map,
and every page it touched stays resident next to the copy until the file is closed (a 3.5 GB
model peaked near 7 GB of RSS). And why not always `readinto`: on the dev VM, first-touch page
faults of fresh memory made reading 3.5 GB take 4-10 s against 0.2 s to map it.

A mapped file must not be truncated or rewritten in place while a model uses it: every writer
in specdec writes a new file and renames it over the old one (the old inode stays valid).
"""

from __future__ import annotations

import json
import mmap
import struct

import torch

_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
           "I8": torch.int8, "U8": torch.uint8, "I32": torch.int32, "I64": torch.int64,
           "BOOL": torch.bool, "F64": torch.float64, "I16": torch.int16}


# NOTE: torch's CPU allocator aligns to 64 bytes and some of its kernels rely on it
# (torch._weight_int8pack_mm crashes on an 8-byte-aligned int8 weight): quantized buffers are
# mapped only from ranges that start 64-byte aligned in the file (the map is page-aligned).
# Float weights (matmuls through oneDNN / MKL) need only their element's alignment.
MAP_ALIGNMENT = 64


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
        self._bytes: torch.Tensor | None = None  # [file size] uint8 over the private map

    def keys(self) -> list[str]:
        return list(self.entries)

    def lazy(self, name: str) -> "LazyTensor":
        entry = self.entries[name]
        if entry["dtype"] not in _DTYPES:
            raise ValueError(f"{self.path}: tensor {name!r} has unsupported dtype "
                             f"{entry['dtype']}")
        begin, end = entry["data_offsets"]
        return LazyTensor(self.path, self.data_start + begin, end - begin,
                          torch.Size(entry["shape"]), _DTYPES[entry["dtype"]], name, self)

    def file_bytes(self) -> torch.Tensor:
        """The whole file as a uint8 tensor over one private memory map (made on first use;
        the map lives as long as any tensor viewing it)."""
        if self._bytes is None:
            with open(self.path, "rb") as f:
                mapping = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE,
                                    prot=mmap.PROT_READ | mmap.PROT_WRITE)
            # NOTE: WILLNEED starts read-ahead of what is not cached yet; it does not fault
            # pages in (MAP_POPULATE on a writable private map would copy every page).
            mapping.madvise(mmap.MADV_WILLNEED)
            self._bytes = torch.frombuffer(mapping, dtype=torch.uint8)
        return self._bytes

    def view(self, offset: int, nbytes: int, shape: torch.Size, dtype: torch.dtype,
             alignment: int = 1) -> torch.Tensor | None:
        """The file's bytes [offset, offset + nbytes) as a tensor of `shape` and `dtype`, no
        copy; None if the range does not start aligned for the dtype and to `alignment` bytes
        (then the caller reads it into a fresh allocation)."""
        element = torch.empty((), dtype=dtype).element_size()
        numel = 1
        for dim in shape:
            numel *= dim
        if offset % max(element, alignment) or numel * element != nbytes:
            return None
        data = self.file_bytes()
        if offset + nbytes > data.numel():
            raise ValueError(f"{self.path} is truncated: {data.numel()} bytes, a tensor "
                             f"ends at {offset + nbytes}")
        return data[offset:offset + nbytes].view(dtype).view(shape)


class LazyTensor:
    """A tensor still on disk: its shape and dtype, `mapped()` and `read_into(dst)`."""

    __slots__ = ("path", "offset", "nbytes", "shape", "dtype", "name", "file")

    def __init__(self, path: str, offset: int, nbytes: int, shape: torch.Size,
                 dtype: torch.dtype, name: str, file: SafetensorsFile | None = None) -> None:
        self.path, self.offset, self.nbytes = path, offset, nbytes
        self.shape, self.dtype, self.name = shape, dtype, name
        self.file = file

    def mapped(self, alignment: int = 1) -> torch.Tensor | None:
        """The tensor as a view of the file's memory map (no copy), or None when it cannot
        be mapped (no file object, or an offset not aligned to the dtype and `alignment`)."""
        if self.file is None:
            return None
        return self.file.view(self.offset, self.nbytes, self.shape, self.dtype, alignment)

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
