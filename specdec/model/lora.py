"""LoRA adapters: PEFT loading, resident slots, batched per-token application.

- adapter: a PEFT directory (`adapter_config.json` + `adapter_model.safetensors`) whose
  A [r, in] and B [out, r] factors add `scale * (x @ A^T) @ B^T` to a projection; scale is
  lora_alpha / r (rsLoRA: lora_alpha / sqrt(r)), per module with rank_pattern / alpha_pattern.
- host cache: an LRU of up to `max_cpu_loras` parsed adapters (CPU tensors, scale folded into B);
  an evicted adapter is read again from its directory when next needed, on a worker thread:
  the scheduler admits its requests once `ready` says it is back (the step never waits on disk).
- slot: one of `max_loras` resident places on the model's device. Per layer and projection the
  slot tensors are static: A [slots, n_sub * r_max, in], and per sub-projection B
  [slots, size, r_max] (zero-padded to `max_lora_rank`), so swapping an adapter in is a copy.
- fused projections: qkv_proj (q, k, v) and gate_up_proj (gate, up) shrink once with the
  stacked A's, and each sub-projection's B expands its own rank segment into its own columns.
- application: per forward, a LoRABatch holds each token's slot (-1 = base). On the CPU it is
  grouped by distinct slot: each group is one index_select, one shrink, one expand per
  sub-projection and one index_add_. On CUDA (device.kernels = "cupy") the slot per row goes to
  the CuPy shrink/expand kernels (cuda/lora.cu: BGMV for decode rows, SGMV for prefill and
  verify segments), which CUDA graphs capture with the per-row slots as a static input.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor

ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
SUPPORTED_MODULES = ATTN_MODULES + MLP_MODULES
# fused projection of our decoder -> its sub-projections in column order
FUSED = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",),
         "gate_up": ("gate_proj", "up_proj"), "down": ("down_proj",)}
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# PEFT config keys: what we apply, what is metadata, what must stay at its default (off).
_APPLIED_KEYS = {"r", "lora_alpha", "use_rslora", "target_modules", "rank_pattern",
                 "alpha_pattern", "peft_type", "bias"}
_METADATA_KEYS = {"base_model_name_or_path", "task_type", "revision", "inference_mode",
                  "auto_mapping", "peft_version", "lora_dropout", "init_lora_weights",
                  "megatron_core", "qalora_group_size", "exclude_modules",
                  "layers_to_transform", "layers_pattern", "ensure_weight_tying"}
_UNSUPPORTED_KEYS = {"modules_to_save": "modules_to_save (fully trained modules)",
                     "use_dora": "DoRA (use_dora)", "fan_in_fan_out": "fan_in_fan_out",
                     "lora_bias": "lora_bias", "use_qalora": "QA-LoRA (use_qalora)",
                     "layer_replication": "layer_replication",
                     "target_parameters": "target_parameters",
                     "trainable_token_indices": "trainable_token_indices"}
_TENSOR_KEY = re.compile(r"^base_model\.model\.(?:model\.)?layers\.(\d+)\."
                         r"(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.\w+)?\.weight$")


class LoRAError(ValueError):
    """A bad adapter; the message names the file and the key."""


@dataclass(frozen=True, slots=True)
class LoRARequest:
    """vLLM's shape: `LoRARequest(lora_name, lora_int_id, lora_path)`."""

    lora_name: str
    lora_int_id: int
    lora_path: str


@dataclass(slots=True)
class LoRAAdapter:
    """A parsed adapter on the host: (layer, module) -> (A [r, in], B scaled [out, r])."""

    name: str
    path: str
    rank: int  # the largest module rank
    weights: dict[tuple[int, str], tuple[Tensor, Tensor]]


def _is_off(value) -> bool:
    return value in (None, False, {}, [], "", "none", 0)


def _pattern_value(pattern: dict, module_key: str, default):
    """PEFT's rule: the first pattern key k with re.match(rf"(.*\\.)?({k})$", module_key)."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", module_key):
            return value
    return default


def load_adapter(name: str, path: str, max_lora_rank: int, arch) -> LoRAAdapter:
    """Read and check a PEFT LoRA directory against the model's `arch` (llama._Arch)."""
    config_path = os.path.join(path, CONFIG_FILE)
    weights_path = os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(config_path):
        raise LoRAError(f"lora adapter {name!r}: {config_path} does not exist")
    if not os.path.isfile(weights_path):
        raise LoRAError(f"lora adapter {name!r}: {weights_path} does not exist "
                        f"(only safetensors adapters are supported)")
    try:
        with open(config_path) as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise LoRAError(f"lora adapter {name!r}: {config_path} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise LoRAError(f"lora adapter {name!r}: {config_path} must hold a JSON object")

    def bad(key: str, why: str):
        raise LoRAError(f"lora adapter {name!r}: {config_path} key {key!r}: {why}")

    for key, value in cfg.items():
        if key in _UNSUPPORTED_KEYS:
            if not _is_off(value):
                bad(key, f"{_UNSUPPORTED_KEYS[key]} is not supported, got {value!r}")
        elif key not in _APPLIED_KEYS and key not in _METADATA_KEYS and not _is_off(value):
            bad(key, f"unknown key (value {value!r}); this server cannot apply it")
    if cfg.get("peft_type", "LORA") != "LORA":
        bad("peft_type", f"must be 'LORA', got {cfg.get('peft_type')!r}")
    if cfg.get("bias", "none") != "none":
        bad("bias", f"must be 'none', got {cfg.get('bias')!r}")
    r = cfg.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        bad("r", f"must be a positive integer, got {r!r}")
    alpha = cfg.get("lora_alpha", r)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        bad("lora_alpha", f"must be a number, got {alpha!r}")
    rslora = bool(cfg.get("use_rslora", False))
    targets = cfg.get("target_modules")
    if isinstance(targets, list):
        for t in targets:
            if t not in SUPPORTED_MODULES:
                bad("target_modules", f"module {t!r} is not supported "
                    f"(supported: {', '.join(SUPPORTED_MODULES)})")
    elif not isinstance(targets, str):
        bad("target_modules", f"must be a list of module names or a regex, got {targets!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(cfg.get(key) or {}, dict):
            bad(key, f"must be an object, got {cfg.get(key)!r}")

    from safetensors import safe_open
    sizes = _module_shapes(arch)
    raw: dict[tuple[int, str], dict[str, Tensor]] = {}
    try:
        handle = safe_open(weights_path, "pt")
    except Exception as e:  # noqa: BLE001 - safetensors raises several types
        raise LoRAError(f"lora adapter {name!r}: {weights_path} is not a safetensors "
                        f"file: {e}") from None
    with handle as f:
        for key in f.keys():
            m = _TENSOR_KEY.match(key)
            if m is None or m.group(3) not in SUPPORTED_MODULES:
                raise LoRAError(f"lora adapter {name!r}: {weights_path} key {key!r}: "
                                f"unsupported tensor (only lora_A/lora_B of "
                                f"{', '.join(SUPPORTED_MODULES)} are applied)")
            layer, module = int(m.group(1)), m.group(3)
            if layer >= arch.num_layers:
                raise LoRAError(f"lora adapter {name!r}: {weights_path} key {key!r}: layer "
                                f"{layer} >= the model's {arch.num_layers} layers")
            raw.setdefault((layer, module), {})[m.group(4)] = f.get_tensor(key)
    if not raw:
        raise LoRAError(f"lora adapter {name!r}: {weights_path} holds no LoRA tensors")
    weights: dict[tuple[int, str], tuple[Tensor, Tensor]] = {}
    max_rank = 0
    for (layer, module), pair in sorted(raw.items()):
        block = "self_attn" if module in ATTN_MODULES else "mlp"
        prefix = f"base_model.model.model.layers.{layer}.{block}.{module}"
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise LoRAError(f"lora adapter {name!r}: {weights_path} key "
                            f"'{prefix}.{missing}.weight' is missing")
        module_key = f"model.layers.{layer}.{block}.{module}"
        rank = _pattern_value(cfg.get("rank_pattern"), module_key, r)
        mod_alpha = _pattern_value(cfg.get("alpha_pattern"), module_key, alpha)
        out_features, in_features = sizes[module]
        a, b = pair["A"], pair["B"]
        for kind, tensor, want in (("A", a, (rank, in_features)), ("B", b, (out_features, rank))):
            if tuple(tensor.shape) != want:
                raise LoRAError(f"lora adapter {name!r}: {weights_path} key "
                                f"'{prefix}.lora_{kind}.weight' has shape {tuple(tensor.shape)}, "
                                f"expected {want} (r={rank}, the model's {module})")
        if rank > max_lora_rank:
            raise LoRAError(f"lora adapter {name!r}: {config_path} key 'r': rank {rank} of "
                            f"{module_key} exceeds lora.max_lora_rank={max_lora_rank}")
        scale = mod_alpha / (math.sqrt(rank) if rslora else rank)
        weights[(layer, module)] = (a.float(), b.float() * scale)
        max_rank = max(max_rank, rank)
    return LoRAAdapter(name, path, max_rank, weights)


def _module_shapes(arch) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each Hugging Face projection."""
    hidden, inter = arch.hidden_size, arch.intermediate_size
    q = arch.num_attention_heads * arch.head_dim
    kv = arch.num_key_value_heads * arch.head_dim
    return {"q_proj": (q, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden),
            "o_proj": (hidden, q), "gate_proj": (inter, hidden), "up_proj": (inter, hidden),
            "down_proj": (hidden, inter)}


class LoRASlots:
    """Static per-layer slot tensors on the model's device; `load(slot, adapter)` copies in."""

    def __init__(self, arch, num_slots: int, max_rank: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.num_slots = num_slots
        self.max_rank = max_rank
        sizes = _module_shapes(arch)
        self.sizes = sizes
        # fused name -> each sub-projection's first output column (slice-aware expand)
        self.offsets = {fused: [sum(sizes[s][0] for s in subs[:j]) for j in range(len(subs))]
                        for fused, subs in FUSED.items()}
        # layer -> fused name -> (A [slots, n_sub * r_max, in], [B [slots, size, r_max], ...])
        self.layers: list[dict[str, tuple[Tensor, list[Tensor]]]] = []
        for _ in range(arch.num_layers):
            per = {}
            for fused, subs in FUSED.items():
                in_features = sizes[subs[0]][1]
                a = torch.zeros(num_slots, len(subs) * max_rank, in_features, dtype=dtype,
                                device=device)
                bs = [torch.zeros(num_slots, sizes[s][0], max_rank, dtype=dtype, device=device)
                      for s in subs]
                per[fused] = (a, bs)
            self.layers.append(per)

    def load(self, slot: int, adapter: LoRAAdapter) -> None:
        r_max = self.max_rank
        for layer, per in enumerate(self.layers):
            for fused, (a_stack, b_list) in per.items():
                a_stack[slot].zero_()
                for j, module in enumerate(FUSED[fused]):
                    b_list[j][slot].zero_()
                    pair = adapter.weights.get((layer, module))
                    if pair is None:
                        continue
                    a, b = pair  # [r, in], [out, r]
                    r = a.shape[0]
                    a_stack[slot, j * r_max:j * r_max + r].copy_(a)
                    b_list[j][slot, :, :r].copy_(b)


@dataclass(slots=True)
class LoRABatch:
    """Per-forward context: the slot tensors and each token's slot.

    Two ways to apply it, with the same result:
    - grouped (the CPU, and CUDA with device.kernels = "torch"): `groups` holds each distinct
      slot's token indices; one index_select, shrink, expand and index_add_ per group.
    - kernels (CUDA): `row_slots` [num_tokens] int32 on the device, one slot per row (-1: the
      base), through ops.lora_shrink / ops.lora_expand (Punica-style BGMV for one-row
      segments, SGMV over `seg_starts` otherwise). Nothing here depends on which adapters are
      in the batch, so a CUDA graph captures it with `row_slots` as a static input."""

    slots: LoRASlots
    groups: list[tuple[int, Tensor | None]]  # (slot, token indices [n] int64; None = all)
    row_slots: Tensor | None = None  # [num_tokens] int32: the kernel path
    seg_starts: Tensor | None = None  # [num_segments + 1] int32: rows of one slot each
    max_seg_len: int = 1  # the longest segment (sizes the SGMV grid); 1: BGMV

    def apply(self, layer_id: int, fused: str, x: Tensor, y: Tensor) -> Tensor:
        """y [num_tokens, out] += per token: (x @ A_slot^T) @ B_slot^T, slice by slice."""
        a_stack, b_list = self.slots.layers[layer_id][fused]
        r_max = self.slots.max_rank
        if self.row_slots is not None:
            from specdec.kernels import ops
            shrink = ops.lora_shrink(x, a_stack, self.row_slots, self.seg_starts,
                                     self.max_seg_len)  # [num_tokens, n_sub * r_max] float32
            return ops.lora_expand(y, shrink, b_list, self.slots.offsets[fused], self.row_slots,
                                   r_max, self.seg_starts, self.max_seg_len)
        for slot, idx in self.groups:
            xs = x if idx is None else x.index_select(0, idx)  # [n, in]
            shrink = xs @ a_stack[slot].t()  # [n, n_sub * r_max]
            parts = [shrink[:, j * r_max:(j + 1) * r_max] @ b[slot].t()  # [n, size_j]
                     for j, b in enumerate(b_list)]
            delta = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)  # [n, out]
            if idx is None:
                y = y + delta.to(y.dtype)
            else:
                y = y.index_add(0, idx, delta.to(y.dtype))
        return y


def segment_starts(query_lens: list[int]) -> tuple[list[int], int]:
    """The SGMV segments of a ragged batch: one per sequence (each runs on one adapter).
    Returns (starts [num_seqs + 1], the longest segment)."""
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    return starts, max(query_lens, default=0)


def lora_reference(x: Tensor, adapter: LoRAAdapter, layer: int, fused: str) -> Tensor:
    """Plain reference: the unpadded per-module delta for one adapter, [n, out]."""
    parts = []
    for module in FUSED[fused]:
        pair = adapter.weights.get((layer, module))
        if pair is None:
            raise KeyError(module)
        a, b = pair
        parts.append((x.float() @ a.t()) @ b.t())
    return torch.cat(parts, dim=-1)


class LoRAManager:
    """Adapters: the registry by name, a host LRU and the resident slots, both by lora_int_id.

    An id is never reused: re-adding a name gets a new id, so prefix-cache blocks (keyed by
    the id) are never shared across different weights. Removing a name stops new requests;
    requests already running keep their id (and reload it from its path if it was evicted)."""

    def __init__(self, arch, max_loras: int, max_lora_rank: int, max_cpu_loras: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.arch = arch
        self.max_loras = max_loras
        self.max_lora_rank = max_lora_rank
        self.max_cpu_loras = max(max_cpu_loras, max_loras)
        self.slots = LoRASlots(arch, max_loras, max_lora_rank, dtype, device)
        self.registry: dict[str, LoRARequest] = {}
        self.by_id: dict[int, LoRARequest] = {}
        self._next_id = 1
        self.host: OrderedDict[int, LoRAAdapter] = OrderedDict()  # LRU: oldest first
        self.slot_of: OrderedDict[int, int] = OrderedDict()  # resident; LRU: oldest first
        self.slot_owner: list[int | None] = [None] * max_loras
        self._loading: dict[int, Future] = {}  # lora_id -> a load_adapter on the worker thread
        self.failed: dict[int, BaseException] = {}  # lora_id -> why its re-read failed
        self._loader: ThreadPoolExecutor | None = None

    def add(self, name: str, path: str, adapter: LoRAAdapter | None = None) -> LoRARequest:
        """Register (and parse, so that a bad adapter fails here) an adapter; LoRAError if bad.
        `adapter`: already parsed by load_adapter (off the engine thread, so a load never
        blocks a step)."""
        if not isinstance(name, str) or not name:
            raise LoRAError(f"lora_name must be a non-empty string, got {name!r}")
        if not isinstance(path, str) or not path:
            raise LoRAError(f"lora_path must be a non-empty string, got {path!r}")
        if adapter is None:
            adapter = load_adapter(name, path, self.max_lora_rank, self.arch)
        if name in self.registry:
            self.remove(name)
        request = LoRARequest(name, self._next_id, path)
        self._next_id += 1
        self.registry[name] = request
        self.by_id[request.lora_int_id] = request
        self._cache(request.lora_int_id, adapter)
        self._trim_host(keep={request.lora_int_id})
        return request

    def remove(self, name: str) -> LoRARequest:
        """Unregister a name (KeyError if unknown): new requests can no longer pick it.

        NOTE: its host copy and slot stay until the LRUs evict them, so requests already
        running on it finish without reading its directory again (it may be gone)."""
        return self.registry.pop(name)

    def _cache(self, lora_id: int, adapter: LoRAAdapter) -> None:
        self.host[lora_id] = adapter
        self.host.move_to_end(lora_id)

    def _trim_host(self, keep: set[int]) -> None:
        """Evict the least recently used host copies beyond max_cpu_loras, never one in `keep`.
        NOTE: only in add() and at the end of activate(): between the scheduler's `ready`
        checks and the step's activate() the host copies only grow, so an adapter found ready
        is still there when its slot is loaded."""
        for lora_id in [i for i in self.host if i not in keep]:
            if len(self.host) <= self.max_cpu_loras:
                break
            del self.host[lora_id]

    def ready(self, lora_id: int) -> bool:
        """Whether activate() can take `lora_id` without reading its directory. If not, starts
        reading it on a worker thread and says False until that is done (engine thread only;
        the result is moved into the host cache here, on the caller's thread). A failed read
        (the directory was removed or damaged since it was registered) keeps saying False
        and is kept in `failed`: the engine finishes that adapter's waiting requests with the
        error (take_failed) instead of raising inside a step."""
        if lora_id in self.slot_of or lora_id in self.host:
            return True
        if lora_id in self.failed:  # until the engine has failed its requests
            return False
        future = self._loading.get(lora_id)
        if future is None:
            if self._loader is None:
                self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lora-load")
            req = self.by_id[lora_id]
            self._loading[lora_id] = self._loader.submit(
                load_adapter, req.lora_name, req.lora_path, self.max_lora_rank, self.arch)
            return False
        if not future.done():
            return False
        del self._loading[lora_id]
        if future.exception() is not None:
            self.failed[lora_id] = future.exception()
            return False
        self._cache(lora_id, future.result())
        return True

    def take_failed(self) -> dict[int, BaseException]:
        """The adapters whose re-read failed since the last call (lora_int_id -> error); a
        later request on one of them reads its directory again."""
        failed, self.failed = self.failed, {}
        return failed

    def _host_adapter(self, lora_id: int) -> LoRAAdapter:
        adapter = self.host.get(lora_id)
        if adapter is None:
            req = self.by_id[lora_id]
            adapter = load_adapter(req.lora_name, req.lora_path, self.max_lora_rank, self.arch)
            self._cache(lora_id, adapter)
        self.host.move_to_end(lora_id)
        return adapter

    def activate(self, lora_ids: set[int], protect: set[int] = frozenset()) -> dict[int, int]:
        """Slots for the adapters of one step (at most max_loras distinct ids); loads the missing
        ones into slots held by adapters outside `lora_ids`, least recently used first, those
        outside `protect` (the adapters of running requests not in this step) before those in
        it; host copies of `lora_ids` and `protect` are kept."""
        if len(lora_ids) > self.max_loras:
            raise RuntimeError(f"{len(lora_ids)} adapters in one step > lora.max_loras="
                               f"{self.max_loras}")
        for lora_id in lora_ids:
            if lora_id in self.slot_of:
                self.slot_of.move_to_end(lora_id)
        for lora_id in lora_ids:
            if lora_id in self.slot_of:
                continue
            if None in self.slot_owner:
                slot = self.slot_owner.index(None)
            else:
                others = [i for i in self.slot_of if i not in lora_ids]
                victim = next((i for i in others if i not in protect), others[0])
                slot = self.slot_of.pop(victim)
            self.slots.load(slot, self._host_adapter(lora_id))
            self.slot_owner[slot] = lora_id
            self.slot_of[lora_id] = slot
        self._trim_host(keep=lora_ids | protect)
        return {lora_id: self.slot_of[lora_id] for lora_id in lora_ids}

    def make_batch(self, token_slots: list[int], device: torch.device,
                   use_kernels: bool = False,
                   query_lens: list[int] | None = None) -> LoRABatch | None:
        """token_slots: per token, its slot or -1 (base). None when no token has an adapter.
        `use_kernels`: the row-indexed kernel path (CUDA), its segments the sequences of
        `query_lens` (every token of a sequence has the sequence's slot)."""
        distinct = sorted(set(token_slots) - {-1})
        if not distinct:
            return None
        if use_kernels:
            row_slots = torch.tensor(token_slots, dtype=torch.int32).to(device)
            starts, longest = segment_starts(query_lens or [1] * len(token_slots))
            if starts[-1] != len(token_slots):
                raise ValueError(f"query_lens sum to {starts[-1]}, token_slots has "
                                 f"{len(token_slots)} entries")
            if longest <= 1:
                return LoRABatch(self.slots, [], row_slots)
            return LoRABatch(self.slots, [], row_slots,
                             torch.tensor(starts, dtype=torch.int32).to(device), longest)
        if len(distinct) == 1 and -1 not in token_slots:
            return LoRABatch(self.slots, [(distinct[0], None)])
        slots_t = torch.tensor(token_slots, dtype=torch.long)
        groups = [(s, (slots_t == s).nonzero().flatten().to(device)) for s in distinct]
        return LoRABatch(self.slots, groups)
