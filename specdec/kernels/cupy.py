"""CuPy raw CUDA kernels for the hot ops, launched on torch's current stream.

`specdec.kernels.ops` dispatches CUDA tensors here with the same signatures as its torch reference.
The sources live in `cuda/*.cu`; each is compiled once (NVRTC through `cupy.RawModule`) the
first time `load()` or `available()` runs, and every kernel function is looked up then, so
nothing is compiled or loaded during CUDA graph capture. A launch reads only device tensors
(the CPU lists of the reference path are ignored), passes raw `data_ptr()`s, and allocates
nothing through CuPy, which keeps it capturable.

Kernel behaviour the callers rely on:
- paged_attention: rows that belong to no sequence or whose context length is <= 0 (padding
  sequences with seq_len 0) are written with zeros; a row whose context needs more blocks than
  the block table has is written with NaN (never an out-of-bounds read). Decode and verify
  windows run split-context (flash-decoding: `split_plan`, then a combine kernel); windows
  longer than SDPA_MIN_QUERY_LEN (prefill chunks) go through SDPA with a bottom-right causal
  mask (`ops.prefill_attention`), which reads the CPU lists. `impl="single"` is the first
  kernel (one block per (row, head)), kept for comparison.
- write_kv: slots < 0 (padding) and slots >= num_blocks * block_size are skipped.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

CUDA_DIR = Path(__file__).resolve().parents[2] / "cuda"
SOURCES = ("paged_attention.cu", "kv_cache.cu", "fused.cu", "lora.cu")
NVRTC_OPTIONS = ("--std=c++17",)
HEAD_DIMS = (32, 64, 128, 256)
DTYPE_TAGS = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
ATTN_THREADS = 128  # must match kAttnThreads in paged_attention.cu
MAX_GRID_Y = 65535  # CUDA's limit on gridDim.y: longer batches launch in row chunks
WRITE_KV_WORDS = (16, 4, 2)  # bytes per copied word, widest first
FUSED_THREADS = 256  # rms_norm and rope_kv: one block of these per token
LORA_WARPS = 4  # must match kLoraWarps in lora.cu (shrink: one rank element per warp)
LORA_ROW_TILE = 8  # must match kLoraRowTile in lora.cu (sgmv: rows per block)
LORA_MAX_SLICES = 3  # must match kLoraMaxSlices in lora.cu
LORA_EXPAND_THREADS = 128  # expand: one output column per thread

LORA_KERNELS = ("bgmv_shrink", "sgmv_shrink", "bgmv_expand", "sgmv_expand")
SPLIT_SLOTS_PER_BLOCK = 16  # kSlotsPerBlock in paged_attention.cu: query slots per block
SPLIT_TILE = 16  # kTile in paged_attention.cu (and ops.SPLIT_TILE)
MAX_SPLITS = 64
SDPA_MIN_QUERY_LEN = 32  # windows longer than this (prefill chunks) go through SDPA

_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.MULTILINE)


def read_source(name: str, cuda_dir: Path = CUDA_DIR) -> str:
    """A .cu file with its local `#include "x.cuh"` lines inlined (recursively, once each).

    NOTE: inlining (instead of `-I cuda/`) makes the source text the whole compile input, so
    CuPy's on-disk kernel cache is keyed on header changes too.
    """
    seen: set[str] = set()

    def expand(file_name: str) -> str:
        if file_name in seen:
            return ""
        seen.add(file_name)
        text = (cuda_dir / file_name).read_text()
        return _INCLUDE.sub(lambda m: expand(m.group(1)), text)

    return expand(name)


class _Loaded:
    """The compiled modules and their kernel functions (one per dtype/head_dim/word size)."""

    __slots__ = ("cupy", "modules", "functions", "streams")

    def __init__(self) -> None:
        import cupy

        self.cupy = cupy
        self.modules = {}
        self.functions = {}
        self.streams: dict[int, object] = {}
        names = {
            "paged_attention.cu": [f"paged_attention{kind}_{tag}_d{d}"
                                   for kind in ("", "_split", "_combine")
                                   for tag in DTYPE_TAGS.values() for d in HEAD_DIMS],
            "kv_cache.cu": [f"write_kv_w{w}" for w in WRITE_KV_WORDS],
            "fused.cu": [f"{op}_{tag}" for op in ("rms_norm", "silu_mul", "rope_kv")
                         for tag in DTYPE_TAGS.values()],
            "lora.cu": [f"{op}_{tag}" for op in LORA_KERNELS for tag in DTYPE_TAGS.values()],
        }
        for source in SOURCES:
            module = cupy.RawModule(code=read_source(source), options=NVRTC_OPTIONS)
            module.compile()
            self.modules[source] = module
            for name in names[source]:
                self.functions[name] = module.get_function(name)

    def stream(self, device: torch.device):
        """CuPy's view of torch's current stream on `device` (cached per stream handle)."""
        ptr = torch.cuda.current_stream(device).cuda_stream
        stream = self.streams.get(ptr)
        if stream is None:
            try:
                stream = self.cupy.cuda.ExternalStream(ptr, device.index or 0)
            except TypeError:  # older CuPy: no device_id argument
                stream = self.cupy.cuda.ExternalStream(ptr)
            self.streams[ptr] = stream
        return stream

    def launch(self, name: str, device: torch.device, grid: tuple, block: tuple,
               args: tuple) -> None:
        with self.cupy.cuda.Device(device.index or 0), self.stream(device):
            self.functions[name](grid, block, args)


_lock = threading.Lock()
_loaded: _Loaded | None = None
_load_error: str | None = None


def load() -> _Loaded:
    """Compile and load every kernel once; raises RuntimeError naming the reason on failure."""
    global _loaded, _load_error
    if _loaded is not None:
        return _loaded
    with _lock:
        if _loaded is None and _load_error is None:
            try:
                if not torch.cuda.is_available():
                    raise RuntimeError("torch.cuda.is_available() is False")
                _loaded = _Loaded()
            except Exception as e:  # ImportError, NVRTC CompileException, driver errors
                _load_error = f"{type(e).__name__}: {e}"
    if _loaded is None:
        raise RuntimeError(f"specdec CUDA kernels unavailable: {_load_error}")
    return _loaded


def available() -> bool:
    """True when CUDA, CuPy and a successful compile of every kernel are all present."""
    try:
        load()
    except RuntimeError:
        return False
    return True


def load_error() -> str | None:
    """Why `available()` is False (None if it is True or was never asked)."""
    return _load_error


def supports(head_dim: int, dtype: torch.dtype) -> bool:
    return head_dim in HEAD_DIMS and dtype in DTYPE_TAGS


def require(head_dim: int, dtype: torch.dtype) -> None:
    """Raise RuntimeError, naming the reason and the way out, unless the kernels load and
    support this head size and dtype."""
    try:
        load()
    except RuntimeError as e:
        raise RuntimeError(f"{e}. Install CuPy for your CUDA version (pip install -e '.[cuda]') "
                           "and make its headers findable (CUDA_PATH), or set "
                           "device.kernels = \"torch\" for the slow reference path") from None
    if not supports(head_dim, dtype):
        raise RuntimeError(f"specdec CUDA kernels support head_dim in {HEAD_DIMS} and dtypes "
                           f"{sorted(str(d) for d in DTYPE_TAGS)}, not head_dim={head_dim} "
                           f"dtype={dtype}; set device.kernels = \"torch\" for this model")


def _int32(t: Tensor) -> Tensor:
    return t if t.dtype == torch.int32 and t.is_contiguous() else t.to(torch.int32).contiguous()


def split_plan(num_seqs: int, num_kv_heads: int, group: int, max_query_len: int,
               max_context: int, num_sms: int) -> tuple[int, int]:
    """(slot_groups, num_splits) of a split-context launch.

    slot_groups: blocks along x per KV head, so that each covers SPLIT_SLOTS_PER_BLOCK of the
    window's query slots (max_query_len * group). num_splits: enough blocks for about two per
    SM, at most one split per two tiles of the largest context the block table allows (a
    static number, so a captured graph keeps it), at most MAX_SPLITS."""
    for name, value in (("num_seqs", num_seqs), ("num_kv_heads", num_kv_heads),
                        ("group", group), ("max_query_len", max_query_len),
                        ("max_context", max_context), ("num_sms", num_sms)):
        if value < 1:
            raise ValueError(f"split_plan: {name} must be >= 1, got {value}")
    slot_groups = -(-max_query_len * group // SPLIT_SLOTS_PER_BLOCK)
    blocks = num_kv_heads * slot_groups * num_seqs
    wanted = -(-2 * num_sms // blocks)
    return slot_groups, max(1, min(wanted, -(-max_context // (2 * SPLIT_TILE)), MAX_SPLITS))


_NUM_SMS: dict[int, int] = {}


def _num_sms(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _NUM_SMS:
        _NUM_SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _NUM_SMS[index]


def paged_attention(query: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                    seq_lens: Tensor, query_start_loc: Tensor, scale: float,
                    query_lens: list[int] | None = None,
                    seq_lens_list: list[int] | None = None, impl: str = "split") -> Tensor:
    """Same contract as `specdec.kernels.ops.paged_attention`. The CPU lists only route long
    windows to SDPA and size the grid; without them every window runs in the kernels."""
    # query: [num_rows, num_heads, head_dim] -> out: [num_rows, num_heads, head_dim]
    # k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
    # block_tables: [num_seqs, max_blocks_per_seq] int32; seq_lens: [num_seqs] int32
    # query_start_loc: [num_seqs + 1] int32
    num_rows, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, cache_head_dim = k_cache.shape
    dtype = query.dtype
    if not supports(head_dim, dtype):
        raise ValueError(f"paged_attention: head_dim={head_dim}, dtype={dtype} not supported; "
                         f"head_dim must be one of {HEAD_DIMS}, dtype one of "
                         f"{list(DTYPE_TAGS)}")
    if cache_head_dim != head_dim or k_cache.dtype != dtype or v_cache.dtype != dtype \
            or v_cache.shape != k_cache.shape:
        raise ValueError(f"paged_attention: k_cache {tuple(k_cache.shape)} {k_cache.dtype} and "
                         f"v_cache {tuple(v_cache.shape)} {v_cache.dtype} must match query "
                         f"head_dim={head_dim} dtype={dtype}")
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"paged_attention: num_heads={num_heads} must be a multiple of "
                         f"num_kv_heads={num_kv_heads}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("paged_attention: k_cache and v_cache must be contiguous")
    num_seqs = seq_lens.shape[0]
    if query_start_loc.shape[0] != num_seqs + 1 or block_tables.shape[0] < num_seqs:
        raise ValueError(f"paged_attention: query_start_loc has {query_start_loc.shape[0]} "
                         f"entries and block_tables {block_tables.shape[0]} rows; need "
                         f"num_seqs + 1 = {num_seqs + 1} and >= num_seqs = {num_seqs}")
    out = torch.empty((num_rows, num_heads, head_dim), dtype=dtype, device=query.device)
    if num_rows == 0 or num_seqs == 0:
        return out.zero_()
    per_lane = head_dim // 32
    align = per_lane * query.element_size()
    if (query.stride(2) != 1 or query.stride(0) % per_lane or query.stride(1) % per_lane
            or query.data_ptr() % align):
        query = query.contiguous()
    if k_cache.data_ptr() % align or v_cache.data_ptr() % align:
        raise ValueError(f"paged_attention: k_cache/v_cache must be {align}-byte aligned")
    block_tables = _int32(block_tables)
    seq_lens = _int32(seq_lens)
    query_start_loc = _int32(query_start_loc)
    if impl == "split":
        return _split_attention(out, query, k_cache, v_cache, block_tables, seq_lens,
                                query_start_loc, scale, query_lens, seq_lens_list)
    if impl != "single":
        raise ValueError(f"paged_attention: impl must be 'split' or 'single', got {impl!r}")
    kernels = load()
    name = f"paged_attention_{DTYPE_TAGS[dtype]}_d{head_dim}"
    for row_offset in range(0, num_rows, MAX_GRID_Y):
        grid = (num_heads, min(MAX_GRID_Y, num_rows - row_offset), 1)
        args = (out.data_ptr(), query.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                block_tables.data_ptr(), seq_lens.data_ptr(), query_start_loc.data_ptr(),
                _i32(num_seqs), _i32(num_heads), _i32(num_kv_heads), _i64(query.stride(0)),
                _i64(query.stride(1)), _i32(block_size), _i32(block_tables.shape[1]),
                _f32(scale), _i32(row_offset))
        kernels.launch(name, query.device, grid, (ATTN_THREADS, 1, 1), args)
    return out


def _split_attention(out: Tensor, query: Tensor, k_cache: Tensor, v_cache: Tensor,
                     block_tables: Tensor, seq_lens: Tensor, query_start_loc: Tensor,
                     scale: float, query_lens: list[int] | None,
                     seq_lens_list: list[int] | None) -> Tensor:
    """Split kernel + combine kernel for decode/verify windows; SDPA for long windows."""
    from specdec.kernels import ops

    num_rows, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    num_seqs = seq_lens.shape[0]
    group = num_heads // num_kv_heads
    long = []
    # NOTE: never while capturing a graph: the SDPA path reads the capture-time lists.
    if query_lens is not None and seq_lens_list is not None \
            and not torch.cuda.is_current_stream_capturing():
        long = [s for s, q in enumerate(query_lens) if q > SDPA_MIN_QUERY_LEN]
        short = [q for s, q in enumerate(query_lens) if q <= SDPA_MIN_QUERY_LEN]
        max_query_len = max(short, default=1)
    else:
        max_query_len = num_rows  # NOTE: unknown without a sync; surplus blocks exit at once
    kernel_seq_lens = seq_lens
    if long:  # their rows come from SDPA below; the kernels write zeros there
        kernel_seq_lens = seq_lens.clone()
        kernel_seq_lens[torch.tensor(long, device=seq_lens.device)] = 0
    max_context = block_tables.shape[1] * block_size
    slot_groups, num_splits = split_plan(max(num_seqs, 1), num_kv_heads, group,
                                         max(max_query_len, 1), max(max_context, 1),
                                         _num_sms(query.device))
    # Workspace: [num_rows, num_heads, num_splits] x (head_dim accumulators + max + sum).
    parts = num_rows * num_heads * num_splits
    workspace = torch.empty(parts * (head_dim + 2), dtype=torch.float32, device=query.device)
    part_acc, part_max, part_sum = workspace[:parts * head_dim], \
        workspace[parts * head_dim:parts * (head_dim + 1)], workspace[parts * (head_dim + 1):]
    kernels = load()
    tag = f"{DTYPE_TAGS[query.dtype]}_d{head_dim}"
    args = (part_acc.data_ptr(), part_max.data_ptr(), part_sum.data_ptr(), query.data_ptr(),
            k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr(),
            kernel_seq_lens.data_ptr(), query_start_loc.data_ptr(), _i32(num_heads),
            _i32(num_kv_heads), _i64(query.stride(0)), _i64(query.stride(1)),
            _i32(block_size), _i32(block_tables.shape[1]), _f32(scale), _i32(num_splits))
    kernels.launch(f"paged_attention_split_{tag}", query.device,
                   (num_kv_heads * slot_groups, num_seqs, num_splits), (ATTN_THREADS, 1, 1),
                   args)
    for row_offset in range(0, num_rows, MAX_GRID_Y):
        grid = (num_heads, min(MAX_GRID_Y, num_rows - row_offset), 1)
        args = (out.data_ptr(), part_acc.data_ptr(), part_max.data_ptr(), part_sum.data_ptr(),
                kernel_seq_lens.data_ptr(), query_start_loc.data_ptr(), _i32(num_seqs),
                _i32(num_heads), _i32(num_kv_heads), _i32(block_size),
                _i32(block_tables.shape[1]), _i32(num_splits), _i32(slot_groups),
                _i32(row_offset))
        kernels.launch(f"paged_attention_combine_{tag}", query.device, grid,
                       (ATTN_THREADS, 1, 1), args)
    starts = [0]
    for q in (query_lens or []):
        starts.append(starts[-1] + q)
    for s in long:
        if seq_lens_list[s] > 0:
            out[starts[s]:starts[s + 1]] = ops.prefill_attention(
                query[starts[s]:starts[s + 1]], k_cache, v_cache, block_tables[s],
                query_lens[s], seq_lens_list[s], scale)
    return out


def write_kv(key: Tensor, value: Tensor, k_cache: Tensor, v_cache: Tensor,
             slot_mapping: Tensor) -> None:
    """Same contract as `specdec.kernels.ops.write_kv`: slot -1 (and any slot out of range) skipped."""
    # key, value: [num_tokens, num_kv_heads, head_dim]
    # k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]; slot_mapping: [num_tokens]
    num_tokens, num_kv_heads, head_dim = key.shape
    num_blocks, block_size, cache_kv_heads, cache_head_dim = k_cache.shape
    if (cache_kv_heads, cache_head_dim) != (num_kv_heads, head_dim) or value.shape != key.shape \
            or v_cache.shape != k_cache.shape:
        raise ValueError(f"write_kv: key {tuple(key.shape)}, value {tuple(value.shape)} do not "
                         f"fit k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}")
    if not (key.dtype == value.dtype == k_cache.dtype == v_cache.dtype):
        raise ValueError(f"write_kv: dtypes differ: key {key.dtype}, value {value.dtype}, "
                         f"k_cache {k_cache.dtype}, v_cache {v_cache.dtype}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("write_kv: k_cache and v_cache must be contiguous")
    if slot_mapping.shape[0] != num_tokens:
        raise ValueError(f"write_kv: slot_mapping has {slot_mapping.shape[0]} entries, "
                         f"key has {num_tokens} tokens")
    if num_tokens == 0:
        return None
    if key.stride(2) != 1 or key.stride(1) != head_dim:
        key = key.contiguous()
    if value.stride(2) != 1 or value.stride(1) != head_dim:
        value = value.contiguous()
    if slot_mapping.dtype != torch.int64 or not slot_mapping.is_contiguous():
        slot_mapping = slot_mapping.to(torch.int64).contiguous()
    elem = key.element_size()
    row_bytes = num_kv_heads * head_dim * elem
    byte_quantities = (row_bytes, key.stride(0) * elem, value.stride(0) * elem, key.data_ptr(),
                       value.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr())
    word = next(w for w in WRITE_KV_WORDS if all(q % w == 0 for q in byte_quantities))
    row_words = row_bytes // word
    threads = min(256, max(32, (row_words + 31) // 32 * 32))
    args = (key.data_ptr(), value.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
            slot_mapping.data_ptr(), _i64(key.stride(0) * elem // word),
            _i64(value.stride(0) * elem // word), _i32(row_words),
            _i64(num_blocks * block_size))
    load().launch(f"write_kv_w{word}", key.device, (num_tokens, 1, 1), (threads, 1, 1), args)
    return None


def _rows(x: Tensor, name: str) -> Tensor:
    """x as [rows, features] with unit column stride (a strided row view stays a view)."""
    if x.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D tensor, got shape {tuple(x.shape)}")
    if x.dtype not in DTYPE_TAGS:
        raise ValueError(f"{name}: dtype {x.dtype} not supported ({list(DTYPE_TAGS)})")
    return x if x.stride(1) == 1 else x.contiguous()


def rms_norm(x: Tensor, weight: Tensor, eps: float,
             residual: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Same contract as `specdec.kernels.ops.rms_norm`; `residual` is updated in place."""
    # x: [num_tokens, hidden]; weight: [hidden]; residual: [num_tokens, hidden] contiguous
    x = _rows(x, "rms_norm")
    num_tokens, hidden = x.shape
    out = torch.empty((num_tokens, hidden), dtype=x.dtype, device=x.device)
    if residual is not None and not (residual.is_contiguous() and residual.shape == x.shape
                                     and residual.dtype == x.dtype):
        raise ValueError(f"rms_norm: residual {tuple(residual.shape)} {residual.dtype} must be "
                         f"contiguous and match x {tuple(x.shape)} {x.dtype}")
    weight = weight.contiguous()
    if num_tokens:
        res = residual if residual is not None else out
        args = (out.data_ptr(), res.data_ptr(), x.data_ptr(), weight.data_ptr(), _i32(hidden),
                _i64(x.stride(0)), _f32(eps), _i32(residual is not None))
        load().launch(f"rms_norm_{DTYPE_TAGS[x.dtype]}", x.device, (num_tokens, 1, 1),
                      (FUSED_THREADS, 1, 1), args)
    return out, residual


def silu_mul(gate_up: Tensor) -> Tensor:
    """Same contract as `specdec.kernels.ops.silu_mul`."""
    # gate_up: [num_tokens, 2 * inter] -> [num_tokens, inter]
    gate_up = gate_up.contiguous()
    num_tokens, width = gate_up.shape
    inter = width // 2
    out = torch.empty((num_tokens, inter), dtype=gate_up.dtype, device=gate_up.device)
    if num_tokens:
        threads = 256
        for offset in range(0, num_tokens, MAX_GRID_Y):
            rows = min(MAX_GRID_Y, num_tokens - offset)
            args = (out[offset:].data_ptr(), gate_up[offset:].data_ptr(), _i32(inter))
            load().launch(f"silu_mul_{DTYPE_TAGS[gate_up.dtype]}", gate_up.device,
                          (-(-inter // threads), rows, 1), (threads, 1, 1), args)
    return out


def rope_write_kv(query: Tensor, key: Tensor, value: Tensor, cos: Tensor, sin: Tensor,
                  k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> Tensor:
    """Same contract as `specdec.kernels.ops.rope_write_kv`; rotates `query` in place."""
    # query: [num_tokens, num_heads, head_dim]; key, value: [num_tokens, num_kv_heads, head_dim]
    # cos, sin: [num_tokens, 1, head_dim // 2]; caches: [num_blocks, block_size, kv_heads, dim]
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[1]
    if query.dtype not in DTYPE_TAGS or not (query.dtype == key.dtype == value.dtype
                                             == k_cache.dtype == cos.dtype == sin.dtype):
        raise ValueError("rope_write_kv: query, key, value, cache and cos/sin dtypes must match")
    if k_cache.shape[2:] != (num_kv_heads, head_dim) or not (
            k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError(f"rope_write_kv: caches {tuple(k_cache.shape)} must be contiguous and "
                         f"hold {num_kv_heads} heads of {head_dim}")
    if query.stride(2) != 1 or query.stride(1) != head_dim:
        query = query.contiguous()
    if key.stride(2) != 1 or key.stride(1) != head_dim:
        key = key.contiguous()
    if value.stride(2) != 1 or value.stride(1) != head_dim:
        value = value.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    if slot_mapping.dtype != torch.int64 or not slot_mapping.is_contiguous():
        slot_mapping = slot_mapping.to(torch.int64).contiguous()
    if num_tokens:
        num_slots = k_cache.shape[0] * k_cache.shape[1]
        args = (query.data_ptr(), key.data_ptr(), value.data_ptr(), k_cache.data_ptr(),
                v_cache.data_ptr(), cos.data_ptr(), sin.data_ptr(), slot_mapping.data_ptr(),
                _i32(num_heads), _i32(num_kv_heads), _i32(head_dim), _i64(query.stride(0)),
                _i64(key.stride(0)), _i64(value.stride(0)), _i64(num_slots))
        load().launch(f"rope_kv_{DTYPE_TAGS[query.dtype]}", query.device, (num_tokens, 1, 1),
                      (FUSED_THREADS, 1, 1), args)
    return query


def lora_shrink(x: Tensor, a_stack: Tensor, row_slots: Tensor, seg_starts: Tensor | None = None,
                max_seg_len: int = 1) -> Tensor:
    """Same contract as `specdec.kernels.ops.lora_shrink`: BGMV when every segment is one row
    (or `seg_starts` is None), SGMV over the segments otherwise."""
    # x: [num_rows, in]; a_stack: [num_slots, rank_total, in] -> [num_rows, rank_total] float32
    x = _rows(x, "lora_shrink")
    out = torch.empty((x.shape[0], a_stack.shape[1]), dtype=torch.float32, device=x.device)
    launch = lora_shrink_launch(out, x, a_stack, _int32(row_slots),
                                None if seg_starts is None else _int32(seg_starts), max_seg_len)
    if launch is not None:
        name, grid, block, args = launch
        load().launch(name, x.device, grid, block, args)
    return out


def lora_shrink_launch(out: Tensor, x: Tensor, a_stack: Tensor, row_slots: Tensor,
                       seg_starts: Tensor | None, max_seg_len: int):
    """(kernel name, grid, block, args) of one shrink, or None for no rows. Plain arithmetic
    over data_ptr()s: the CPU emulation test launches exactly this geometry."""
    num_rows, in_features = x.shape
    num_slots, rank_total, a_in = a_stack.shape
    if x.dtype not in DTYPE_TAGS or x.stride(1) != 1:
        raise ValueError(f"lora_shrink: x {tuple(x.shape)} {x.dtype} needs unit column stride "
                         f"and a dtype in {list(DTYPE_TAGS)}")
    if a_in != in_features or a_stack.dtype != x.dtype or not a_stack.is_contiguous():
        raise ValueError(f"lora_shrink: a_stack {tuple(a_stack.shape)} {a_stack.dtype} must be "
                         f"contiguous and match x {tuple(x.shape)} {x.dtype}")
    if row_slots.shape[0] != num_rows or row_slots.dtype != torch.int32:
        raise ValueError(f"lora_shrink: row_slots ({row_slots.shape[0]} {row_slots.dtype}) "
                         f"must be int32 with one entry per row of x ({num_rows})")
    if tuple(out.shape) != (num_rows, rank_total) or out.dtype != torch.float32:
        raise ValueError(f"lora_shrink: out {tuple(out.shape)} {out.dtype} must be float32 "
                         f"[{num_rows}, {rank_total}]")
    if num_rows == 0:
        return None
    tag = DTYPE_TAGS[x.dtype]
    rank_blocks = -(-rank_total // LORA_WARPS)
    block = (LORA_WARPS * 32, 1, 1)
    common = (_i32(rank_total), _i32(in_features), _i64(x.stride(0)), _i32(num_slots))
    if seg_starts is None or max_seg_len <= 1:
        args = (out.data_ptr(), x.data_ptr(), a_stack.data_ptr(), row_slots.data_ptr(), *common)
        return f"bgmv_shrink_{tag}", (num_rows, rank_blocks, 1), block, args
    num_segments = _check_segments("lora_shrink", seg_starts)
    args = (out.data_ptr(), x.data_ptr(), a_stack.data_ptr(), row_slots.data_ptr(),
            seg_starts.data_ptr(), *common)
    grid = (-(-max_seg_len // LORA_ROW_TILE), num_segments, rank_blocks)
    return f"sgmv_shrink_{tag}", grid, block, args


def lora_expand(y: Tensor, shrink: Tensor, b_list: list[Tensor], offsets: list[int],
                row_slots: Tensor, r_max: int, seg_starts: Tensor | None = None,
                max_seg_len: int = 1) -> Tensor:
    """Same contract as `specdec.kernels.ops.lora_expand`: y updated in place and returned."""
    launch = lora_expand_launch(y, shrink, b_list, offsets, _int32(row_slots), r_max,
                                None if seg_starts is None else _int32(seg_starts), max_seg_len)
    if launch is not None:
        name, grid, block, args = launch
        load().launch(name, y.device, grid, block, args)
    return y


def lora_expand_launch(y: Tensor, shrink: Tensor, b_list: list[Tensor], offsets: list[int],
                       row_slots: Tensor, r_max: int, seg_starts: Tensor | None,
                       max_seg_len: int):
    """(kernel name, grid, block, args) of one expand over all slices, or None for no rows."""
    # y: [num_rows, out] (unit column stride); shrink: [num_rows, len(b_list) * r_max] float32
    # b_list[i]: [num_slots, size_i, r_max], written into y[:, offsets[i]:offsets[i] + size_i]
    num_rows = y.shape[0]
    if y.dim() != 2 or y.stride(1) != 1 or y.dtype not in DTYPE_TAGS:
        raise ValueError(f"lora_expand: y must be 2-D with unit column stride and a dtype in "
                         f"{list(DTYPE_TAGS)}, got {tuple(y.shape)} {y.dtype}")
    if not 1 <= len(b_list) <= LORA_MAX_SLICES or len(offsets) != len(b_list):
        raise ValueError(f"lora_expand: {len(b_list)} slices with {len(offsets)} offsets; need "
                         f"1..{LORA_MAX_SLICES} of each")
    rank_total = shrink.shape[1]
    if (shrink.dtype != torch.float32 or not shrink.is_contiguous()
            or shrink.shape[0] != num_rows or rank_total != len(b_list) * r_max):
        raise ValueError(f"lora_expand: shrink {tuple(shrink.shape)} {shrink.dtype} must be "
                         f"contiguous float32 [{num_rows}, {len(b_list) * r_max}]")
    if row_slots.shape[0] != num_rows or row_slots.dtype != torch.int32:
        raise ValueError(f"lora_expand: row_slots ({row_slots.shape[0]} {row_slots.dtype}) "
                         f"must be int32 with one entry per row of y ({num_rows})")
    num_slots = b_list[0].shape[0]
    for b, offset in zip(b_list, offsets):
        if (b.dtype != y.dtype or not b.is_contiguous() or b.shape[0] != num_slots
                or b.shape[2] != r_max or offset < 0 or offset + b.shape[1] > y.shape[1]):
            raise ValueError(f"lora_expand: B {tuple(b.shape)} {b.dtype} at column {offset} "
                             f"does not fit y {tuple(y.shape)} {y.dtype} (r_max={r_max})")
    if num_rows == 0:
        return None
    pad = LORA_MAX_SLICES - len(b_list)
    sizes = [b.shape[1] for b in b_list] + [0] * pad
    slices = (*(np.uint64(b.data_ptr()) for b in b_list), *(np.uint64(0) for _ in range(pad)),
              *(_i32(n) for n in sizes), *(_i32(o) for o in list(offsets) + [0] * pad))
    column_blocks = -(-max(sizes) // LORA_EXPAND_THREADS)
    tag = DTYPE_TAGS[y.dtype]
    block = (LORA_EXPAND_THREADS, 1, 1)
    common = (_i32(r_max), _i32(rank_total), _i64(y.stride(0)), _i32(num_slots))
    if seg_starts is None or max_seg_len <= 1:
        args = (y.data_ptr(), shrink.data_ptr(), *slices, row_slots.data_ptr(), *common)
        return f"bgmv_expand_{tag}", (num_rows, column_blocks, len(b_list)), block, args
    num_segments = _check_segments("lora_expand", seg_starts)
    args = (y.data_ptr(), shrink.data_ptr(), *slices, row_slots.data_ptr(),
            seg_starts.data_ptr(), *common, _i32(column_blocks))
    grid = (-(-max_seg_len // LORA_ROW_TILE) * column_blocks, num_segments, len(b_list))
    return f"sgmv_expand_{tag}", grid, block, args


def _check_segments(name: str, seg_starts: Tensor) -> int:
    num_segments = seg_starts.shape[0] - 1
    if seg_starts.dtype != torch.int32 or not 1 <= num_segments <= MAX_GRID_Y:
        raise ValueError(f"{name}: seg_starts ({seg_starts.shape[0]} {seg_starts.dtype}) must "
                         f"be int32 with 2..{MAX_GRID_Y + 1} entries")
    return num_segments


def _i32(x: int) -> np.int32:
    return np.int32(x)


def _i64(x: int) -> np.int64:
    return np.int64(x)


def _f32(x: float) -> np.float32:
    return np.float32(x)
