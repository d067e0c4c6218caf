"""A Llama-family decoder over the paged KV cache: Llama 2/3 (incl. llama3 rope scaling),
Mistral, Qwen2/2.5 (q/k/v bias), SmolLM2. Grouped-query attention, tied or untied embeddings.

One forward takes a flat ragged batch (prefill chunks, single-token decodes and verify windows
from many sequences at once), writes K/V through `slot_mapping`, attends over the paged cache,
and returns float32 logits for `logits_indices` rows only.

NOTE: q/k/v and gate/up are fused into one Linear each at load time (`load_weights` maps the
Hugging Face names onto slices), so a layer runs four matmuls. On CUDA tensors the forward
never reads the CPU lists nor synchronizes, so it can be captured in a CUDA graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from specdec.kernels import decoder_cpu, ops


@dataclass(slots=True)
class ForwardBatch:
    """One ragged batch of tokens from many sequences (see docs/INTERFACES.md)."""

    input_ids: Tensor        # [num_tokens] int64
    positions: Tensor        # [num_tokens] int64
    slot_mapping: Tensor     # [num_tokens] int64; -1 = skip
    block_tables: Tensor     # [num_seqs, max_blocks_per_seq] int32
    seq_lens: Tensor         # [num_seqs] int32, including this step's window
    query_start_loc: Tensor  # [num_seqs + 1] int32
    logits_indices: Tensor   # [num_logits] int64
    query_lens: list[int]
    seq_lens_list: list[int]
    use_kernels: bool = True  # CUDA: the CuPy kernels (False: the torch reference ops)
    lora: object = None  # a specdec.model.lora.LoRABatch when some token has an adapter


def _get(cfg, name: str, default=None):
    if isinstance(cfg, dict):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def rope_parameters(cfg) -> dict:
    """The rope settings as one dict, from transformers 5 `rope_parameters` or the older
    `rope_theta` + `rope_scaling` fields."""
    params = dict(_get(cfg, "rope_parameters") or {})
    scaling = _get(cfg, "rope_scaling") or {}
    for key, value in scaling.items():
        params.setdefault(key, value)
    if "rope_type" not in params:
        params["rope_type"] = params.pop("type", "default")
    if params.get("rope_theta") is None:
        params["rope_theta"] = _get(cfg, "rope_theta") or 10000.0
    if params["rope_type"] in ("llama3", "yarn", "longrope"):
        params.setdefault("original_max_position_embeddings",
                          _get(cfg, "original_max_position_embeddings")
                          or _get(cfg, "max_position_embeddings"))
    return params


class Linear(nn.Linear):
    """nn.Linear with a faster CPU float32 path for the few-row products of decode and verify.

    NOTE: measured on the 2-core dev VM (torch 2.13, MKL): for float32 and M = 1..32 rows,
    `weight @ x.T` runs 1.5-5x faster than `F.linear` (MKL's gemv and small-M sgemm paths
    read the weight at about half the bandwidth), and a single row padded to two is 2x faster
    than the gemv. bfloat16 and CUDA keep `F.linear`, which is already the fastest there.
    """

    def forward(self, x: Tensor) -> Tensor:
        rows = x.shape[0] if x.dim() == 2 else 0
        if not (x.dtype == torch.float32 and not x.is_cuda and 0 < rows <= 32):
            return F.linear(x, self.weight, self.bias)
        if rows == 1:
            x = torch.cat([x, x.new_zeros(1, x.shape[1])])
        out = (self.weight @ x.t()).t()[:rows]  # [rows, out_features]
        return out + self.bias if self.bias is not None else out


def rope_inv_freq(params: dict, head_dim: int) -> tuple[Tensor, float]:
    """Inverse frequencies [head_dim // 2] (float32) and the cos/sin scaling factor."""
    rope_type = params["rope_type"]
    base = float(params["rope_theta"])
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float()
                               / head_dim))
    if rope_type == "default":
        return inv_freq, 1.0
    if rope_type == "linear":
        return inv_freq / float(params["factor"]), 1.0
    if rope_type == "llama3":
        factor = float(params["factor"])
        low_freq_factor = float(params.get("low_freq_factor", 1.0))
        high_freq_factor = float(params.get("high_freq_factor", 4.0))
        old_len = float(params["original_max_position_embeddings"])
        low_freq_wavelen = old_len / low_freq_factor
        high_freq_wavelen = old_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled), 1.0
    raise NotImplementedError(f"rope_type={rope_type!r} is not supported "
                              "(supported: default, linear, llama3)")


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(hidden_size, dtype=dtype, device="meta"))
        self.eps = eps

    def forward(self, x: Tensor, use_kernels: bool = False) -> Tensor:
        # x: [num_tokens, hidden_size]
        return ops.rms_norm(x, self.weight, self.eps, use_kernels=use_kernels)[0]


class DecoderLayer(nn.Module):
    """`cfg`: the arch, or under tensor parallelism this rank's shard of it (local head and
    intermediate counts); `tp` then all-reduces the row-parallel o_proj and down_proj."""

    def __init__(self, cfg, layer_id: int, dtype: torch.dtype, tp=None) -> None:
        super().__init__()
        hidden = cfg.hidden_size
        self.layer_id = layer_id
        self.tp = tp
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim ** -0.5
        meta = dict(device="meta", dtype=dtype)
        self.input_layernorm = RMSNorm(hidden, cfg.rms_norm_eps, dtype)
        self.qkv_proj = Linear(hidden, self.q_size + 2 * self.kv_size,
                                  bias=cfg.qkv_bias, **meta)
        self.o_proj = Linear(self.q_size, hidden, bias=cfg.o_bias, **meta)
        self.post_attention_layernorm = RMSNorm(hidden, cfg.rms_norm_eps, dtype)
        self.intermediate_size = cfg.intermediate_size
        self.gate_up_proj = Linear(hidden, 2 * cfg.intermediate_size,
                                      bias=cfg.mlp_bias, **meta)
        self.down_proj = Linear(cfg.intermediate_size, hidden, bias=cfg.mlp_bias, **meta)

    def forward(self, hidden: Tensor, cos: Tensor, sin: Tensor, batch: ForwardBatch,
                kv_cache: tuple[Tensor, Tensor]) -> Tensor:
        # hidden: [num_tokens, hidden_size]; cos, sin: [num_tokens, 1, head_dim // 2]
        num_tokens = hidden.shape[0]
        fused = batch.use_kernels  # NOTE: CUDA: fused kernels; the CPU runs the references
        normed = self.input_layernorm(hidden, fused)
        qkv = self._lora(batch, "qkv", normed, self.qkv_proj(normed))  # [num_tokens, q + 2 kv]
        query, key, value = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        query = query.view(num_tokens, self.num_heads, self.head_dim)
        key = key.view(num_tokens, self.num_kv_heads, self.head_dim)
        value = value.view(num_tokens, self.num_kv_heads, self.head_dim)
        k_cache, v_cache = kv_cache
        query = ops.rope_write_kv(query, key, value, cos, sin, k_cache, v_cache,
                                  batch.slot_mapping, use_kernels=fused)
        attn = ops.paged_attention(query, k_cache, v_cache, batch.block_tables, batch.seq_lens,
                                   batch.query_start_loc, self.scale, batch.query_lens,
                                   batch.seq_lens_list, use_kernels=fused)
        # attn: [num_tokens, num_heads, head_dim]
        attn = attn.reshape(num_tokens, self.q_size)
        normed, hidden = ops.rms_norm(self._reduce(self._lora(batch, "o", attn,
                                                              self.o_proj(attn))),
                                      self.post_attention_layernorm.weight,
                                      self.post_attention_layernorm.eps, residual=hidden,
                                      use_kernels=fused)
        gate_up = self._lora(batch, "gate_up", normed, self.gate_up_proj(normed))
        act = ops.silu_mul(gate_up, use_kernels=fused)
        return hidden + self._reduce(self._lora(batch, "down", act, self.down_proj(act)))

    def _reduce(self, partial: Tensor) -> Tensor:
        # Row-parallel output: each rank's partial sum [num_tokens, hidden] -> the full sum
        return partial if self.tp is None else self.tp.all_reduce(partial)

    def _lora(self, batch: ForwardBatch, fused: str, x: Tensor, y: Tensor) -> Tensor:
        # y = proj(x) [num_tokens, out]; plus each token's adapter delta (specdec.model.lora)
        return y if batch.lora is None else batch.lora.apply(self.layer_id, fused, x, y)


@dataclass(frozen=True, slots=True)
class _Arch:
    """The few config fields the decoder needs, normalized across model families."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    rope: dict

    @classmethod
    def from_hf(cls, cfg) -> "_Arch":
        hidden = _get(cfg, "hidden_size")
        heads = _get(cfg, "num_attention_heads")
        act = _get(cfg, "hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise NotImplementedError(f"hidden_act={act!r} is not supported (only silu)")
        attention_bias = bool(_get(cfg, "attention_bias", False))
        is_qwen2 = _get(cfg, "model_type") == "qwen2"
        return cls(
            hidden_size=hidden,
            intermediate_size=_get(cfg, "intermediate_size"),
            num_layers=_get(cfg, "num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=_get(cfg, "num_key_value_heads") or heads,
            head_dim=_get(cfg, "head_dim") or hidden // heads,
            vocab_size=_get(cfg, "vocab_size"),
            rms_norm_eps=float(_get(cfg, "rms_norm_eps", 1e-6)),
            max_position_embeddings=int(_get(cfg, "max_position_embeddings", 4096)),
            tie_word_embeddings=bool(_get(cfg, "tie_word_embeddings", False)),
            qkv_bias=attention_bias or is_qwen2,
            o_bias=attention_bias and not is_qwen2,
            mlp_bias=bool(_get(cfg, "mlp_bias", False)),
            rope=rope_parameters(cfg),
        )


class LlamaForCausalLM(nn.Module):
    """Decoder-only Llama-family model over a paged KV cache.

    `max_model_len` (optional) bounds the precomputed rotary table; default
    max_position_embeddings. `tp` (a specdec.model.parallel.TensorParallel): build this
    rank's shard only; the forward then returns the logits on rank 0 and None elsewhere."""

    def __init__(self, hf_config, dtype: torch.dtype, device: torch.device | str = "cpu",
                 max_model_len: int | None = None, tp=None) -> None:
        super().__init__()
        arch = _Arch.from_hf(hf_config)
        self.tp = tp
        self.config = hf_config
        self.arch = arch
        self.dtype = dtype
        self.device = torch.device(device)
        self.num_layers = arch.num_layers
        self.num_kv_heads = arch.num_key_value_heads
        self.head_dim = arch.head_dim
        self.vocab_size = arch.vocab_size
        self.num_real_tokens = arch.vocab_size  # < vocab_size once pad_vocab() padded it
        self.hidden_size = arch.hidden_size
        if arch.num_attention_heads % arch.num_key_value_heads != 0:
            raise ValueError(f"num_attention_heads={arch.num_attention_heads} must be a "
                             f"multiple of num_key_value_heads={arch.num_key_value_heads}")
        local = arch if tp is None else tp.shard_arch(arch)  # this rank's heads and rows
        self.num_kv_heads = local.num_key_value_heads
        # NOTE: _weight skips nn.Embedding's normal_() init, which even on the meta device
        # imports torch._dynamo (1-4 s of a start-up on the dev VM).
        self.embed_tokens = nn.Embedding(local.vocab_size, arch.hidden_size, _weight=torch.empty(
            local.vocab_size, arch.hidden_size, device="meta", dtype=dtype))
        self.layers = nn.ModuleList(DecoderLayer(local, i, dtype, tp)
                                    for i in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype)
        self.lm_head = Linear(arch.hidden_size, local.vocab_size, bias=False, device="meta",
                                 dtype=dtype)
        _materialize(self, self.device)  # NOTE: no random init; weights come from load
        if arch.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # Rotary table, float32 math then cast (as transformers does).
        inv_freq, scaling = rope_inv_freq(arch.rope, arch.head_dim)
        table_len = max_model_len or arch.max_position_embeddings
        freqs = torch.arange(table_len, dtype=torch.float32)[:, None] * inv_freq[None, :]
        self.register_buffer("rope_cos", (freqs.cos() * scaling).to(dtype).to(self.device),
                             persistent=False)  # [table_len, head_dim // 2]
        self.register_buffer("rope_sin", (freqs.sin() * scaling).to(dtype).to(self.device),
                             persistent=False)
        self._decoder = None  # (kv_caches, CpuDecoder) once built; False: the layer loop

    # ------------------------------------------------------------------ forward

    @torch.no_grad()  # NOTE: not inference_mode: callers may edit the logits in place
    def forward(self, batch: ForwardBatch, kv_caches: list[tuple[Tensor, Tensor]]) -> Tensor:
        """Returns float32 logits [num_logits, vocab_size] for batch.logits_indices (under
        tensor parallelism: on rank 0; None on the other ranks)."""
        decoder = self._cpu_decoder(batch, kv_caches)
        if decoder is not None and decoder.has_head():  # ids to logits in one C++ call
            tokens = (batch.input_ids if decoder.has_embedding()
                      else self._embed(batch.input_ids))
            return decoder.forward_logits(tokens, batch.positions, batch.slot_mapping,
                                          batch.block_tables, batch.seq_lens,
                                          batch.query_start_loc, batch.logits_indices,
                                          self.vocab_size)
        if self.tp is not None:  # NOTE: ids past the real rows are on no rank: they embed to 0
            hidden = self.tp.embed(self.embed_tokens.weight, batch.input_ids)
        else:
            hidden = self._embed(batch.input_ids)  # [num_tokens, hidden_size]
        if decoder is not None:  # int4 on the CPU, a decode or verify step: one C++ call
            hidden = decoder.forward(hidden, batch.positions, batch.slot_mapping,
                                     batch.block_tables, batch.seq_lens,
                                     batch.query_start_loc).to(self.dtype)
        else:
            cos = self.rope_cos[batch.positions].unsqueeze(1)  # [num_tokens, 1, head_dim // 2]
            sin = self.rope_sin[batch.positions].unsqueeze(1)
            for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
                hidden = layer(hidden, cos, sin, batch, kv_cache)
        hidden = hidden.index_select(0, batch.logits_indices)  # [num_logits, hidden_size]
        # [num_logits, lm_head rows]: num_real_tokens, or fewer for a pruned draft head
        logits = self.lm_head(self.norm(hidden, batch.use_kernels)).float()
        if self.tp is not None:  # [num_logits, vocab rows of this rank] -> rank 0's full rows
            logits = self.tp.gather_logits(logits, self.num_real_tokens)
            if logits is None:
                return None
        if logits.shape[1] < self.vocab_size:  # padded vocabulary, or a pruned draft head
            logits = torch.nn.functional.pad(logits, (0, self.vocab_size - logits.shape[1]),
                                             value=float("-inf"))  # never sampled
        return logits  # [num_logits, vocab_size]

    def _cpu_decoder(self, batch: ForwardBatch, kv_caches: list[tuple[Tensor, Tensor]]):
        """The fused CPU stack (specdec.kernels.decoder_cpu) for this batch, or None: the
        layer loop. Built on the first step it could take, for these caches; False once it
        cannot run this model."""
        if self._decoder is False or not decoder_cpu.takes(batch):
            return None
        if self._decoder is None or self._decoder[0] is not kv_caches:
            built = decoder_cpu.build(self, kv_caches)
            self._decoder = False if built is None else (kv_caches, built)
            if built is None:
                return None
        return self._decoder[1]

    def _embed(self, input_ids: Tensor) -> Tensor:
        if self.num_real_tokens == self.vocab_size:
            return self.embed_tokens(input_ids)
        hidden = self.embed_tokens(input_ids.clamp(max=self.num_real_tokens - 1))
        padded = (input_ids >= self.num_real_tokens)[:, None]  # [num_tokens, 1]
        return hidden.masked_fill(padded, 0.0)  # padded rows embed to zero

    def prune_head(self, num_tokens: int) -> None:
        """Compute logits for token ids below `num_tokens` only; the others get -inf (never
        proposed). For a draft: its distribution stays a proper one over the kept ids, and the
        target's verification keeps the output exact. The embedding keeps every row."""
        from specdec.model.quant import prune_rows

        if not 0 < num_tokens <= self.num_real_tokens:
            raise ValueError(f"num_tokens must be in [1, {self.num_real_tokens}] (the model's "
                             f"vocabulary), got {num_tokens}")
        self.lm_head = prune_rows(self.lm_head, num_tokens)
        self._decoder = None  # a fused stack built before holds the old head

    def pad_vocab(self, vocab_size: int) -> None:
        """Present a vocabulary of `vocab_size` rows (another model's padding of the same
        tokenizer) without copying weights: ids past the real rows embed to zero and their
        logits are -inf."""
        if vocab_size < self.num_real_tokens:
            raise ValueError(f"vocab_size must be >= {self.num_real_tokens}, got {vocab_size}")
        self.vocab_size = vocab_size

    # ------------------------------------------------------------------ cache

    def make_kv_caches(self, num_blocks: int, block_size: int) -> list[tuple[Tensor, Tensor]]:
        """Per layer (k_cache, v_cache), each [num_blocks, block_size, num_kv_heads, head_dim].

        NOTE: torch.empty, not zeros: a page of the cache becomes resident only when a block in
        it is first written. Attention never reads a row before it is written (and masks the
        padded tail of uniform batches to 0), so the initial contents do not matter."""
        shape = (num_blocks, block_size, self.num_kv_heads, self.head_dim)
        return [(torch.empty(shape, dtype=self.dtype, device=self.device),
                 torch.empty(shape, dtype=self.dtype, device=self.device))
                for _ in range(self.num_layers)]

    def kv_bytes_per_block(self, block_size: int) -> int:
        element_size = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * block_size * self.num_kv_heads * self.head_dim * element_size

    # ------------------------------------------------------------------ weights

    def load_weights(self, weights: Iterable[tuple[str, Tensor]], strict: bool = True,
                     map_files: bool = True) -> set[str]:
        """Copy Hugging Face-named tensors into the (fused) parameters. Raises ValueError
        naming any missing parameter (`strict=False`: the caller checks; returns the
        "param@offset" slices loaded). `map_files`: a parameter whose bytes lie in one range
        of a file on disk becomes a view of that file's memory map instead of a copy (off for
        weights about to be quantized: their map would outlive them)."""
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded: set[str] = set()
        weights = list(weights)
        if map_files:
            loaded |= _map_whole_params(params, [(hf_name, target, offset, tensor)
                                                 for hf_name, tensor in weights
                                                 for target, offset in self._map_name(hf_name)
                                                 if target is not None])
        for hf_name, tensor in weights:
            for target, offset in self._map_name(hf_name):
                if target is None or f"{target}@{offset}" in loaded:
                    continue
                param = params.get(target)
                if param is None:
                    raise ValueError(f"checkpoint tensor {hf_name!r} has no parameter here")
                with torch.no_grad():
                    dst = param.data if offset is None else \
                        param.data.narrow(0, offset, tensor.shape[0])
                    if dst.shape != tensor.shape:
                        raise ValueError(f"checkpoint tensor {hf_name!r} has shape "
                                         f"{tuple(tensor.shape)}, expected {tuple(dst.shape)}")
                    if hasattr(tensor, "read_into"):  # still on disk (specdec/model/reader.py)
                        tensor.read_into(dst)
                    else:
                        dst.copy_(tensor)
                loaded.add(f"{target}@{offset}")
        if not strict:
            return loaded
        expected = self._expected_slices()
        missing = sorted(expected - loaded)
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:5]}")
        return loaded

    def _map_name(self, hf_name: str) -> list[tuple[str | None, int | None]]:
        name = hf_name.removeprefix("model.")
        if name == "lm_head.weight" or hf_name == "lm_head.weight":
            if self.arch.tie_word_embeddings:
                return [(None, None)]  # NOTE: tied; the embedding is the source of truth
            return [("lm_head.weight", None)]
        if not name.startswith("layers."):
            return [(name, None)]
        prefix, _, rest = name.partition(".self_attn.")
        if rest:
            proj, _, kind = rest.partition(".")
            layer = self.layers[int(prefix.split(".")[1])]
            offsets = {"q_proj": 0, "k_proj": layer.q_size,
                       "v_proj": layer.q_size + layer.kv_size}
            if proj in offsets:
                return [(f"{prefix}.qkv_proj.{kind}", offsets[proj])]
            if "rotary_emb" in proj:
                return [(None, None)]
            return [(f"{prefix}.{proj}.{kind}", None)]
        prefix, _, rest = name.partition(".mlp.")
        if rest:
            proj, _, kind = rest.partition(".")
            layer = self.layers[int(prefix.split(".")[1])]
            offsets = {"gate_proj": 0, "up_proj": layer.intermediate_size}
            if proj in offsets:
                return [(f"{prefix}.gate_up_proj.{kind}", offsets[proj])]
            return [(f"{prefix}.down_proj.{kind}", None)]
        return [(name, None)]

    def _expected_slices(self) -> set[str]:
        expected = set()
        for name, _ in self.named_parameters():
            if name == "lm_head.weight" and self.arch.tie_word_embeddings:
                continue
            if ".qkv_proj." in name:
                layer = self.layers[int(name.split(".")[1])]
                expected |= {f"{name}@{o}" for o in
                             (0, layer.q_size, layer.q_size + layer.kv_size)}
            elif ".gate_up_proj." in name:
                layer = self.layers[int(name.split(".")[1])]
                expected |= {f"{name}@0", f"{name}@{layer.intermediate_size}"}
            else:
                expected.add(f"{name}@None")
        return expected


def _materialize(module: nn.Module, device: torch.device) -> None:
    """`module.to_empty(device)` for meta parameters and buffers: uninitialised storage.
    NOTE: to_empty's empty_like on a meta tensor runs through torch's Python reference ops
    (about 2 ms a tensor, and an import of torch.fx's symbolic shapes): ~1 s for a 28-layer
    model, where torch.empty costs microseconds."""
    for sub in module.modules():
        for table in (sub._parameters, sub._buffers):
            for name, tensor in table.items():
                if tensor is None or not tensor.is_meta:
                    continue
                empty = torch.empty(tensor.shape, dtype=tensor.dtype, device=device)
                table[name] = (nn.Parameter(empty, requires_grad=tensor.requires_grad)
                               if isinstance(tensor, nn.Parameter) else empty)


def _map_whole_params(params: dict[str, nn.Parameter], parts: list[tuple]) -> set[str]:
    """Point each parameter whose bytes are one contiguous range of a memory-mapped file at
    that range (no copy; specdec/model/reader.py); returns the "param@offset" slices done.

    parts: (hf_name, param name, row offset or None, tensor). A parameter qualifies when every
    part is still on disk, in one file, in the parameter's dtype, on the CPU, and the parts
    in row order tile the parameter and sit back to back in the file (a plain tensor, or
    gate_proj followed by up_proj). The others are read into their parameter as before."""
    by_param: dict[str, list[tuple]] = {}
    for _, target, offset, tensor in parts:
        by_param.setdefault(target, []).append((offset, tensor))
    done: set[str] = set()
    for target, pieces in by_param.items():
        param = params.get(target)
        file = getattr(pieces[0][1], "file", None)
        if param is None or file is None or param.device.type != "cpu" or any(
                getattr(t, "file", None) is not file or t.dtype != param.dtype
                for _, t in pieces):
            continue
        if [o for o, _ in pieces] == [None]:
            tiles = tuple(pieces[0][1].shape) == tuple(param.shape)
        else:
            pieces.sort(key=lambda p: p[0] if p[0] is not None else -1)
            rows, tiles = 0, True
            for offset, t in pieces:
                tiles &= offset == rows and tuple(t.shape[1:]) == tuple(param.shape[1:])
                rows += t.shape[0] if len(t.shape) else 0
            tiles &= rows == param.shape[0]
        start = end = pieces[0][1].offset
        for _, t in pieces:
            tiles &= t.offset == end
            end += t.nbytes
        view = file.view(start, end - start, param.shape, param.dtype) if tiles else None
        if view is None:
            continue
        param.data = view
        done |= {f"{target}@{offset}" for offset, _ in pieces}
    return done
