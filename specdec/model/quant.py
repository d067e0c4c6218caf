"""Weight-only quantization for the draft model on the CPU. Every nn.Linear of the decoder
(q/k/v, o, gate/up, down, lm_head) becomes an Int8Linear or an Int4Linear; activations run in
bfloat16; logits stay float32. The tied embedding table keeps the model dtype.

- int8: one scale per output channel, `torch._weight_int8pack_mm`.
- int4: asymmetric, one (scale, zero) per group of 32 input channels. Where the compiled kernel
  of specdec/kernels/q4_cpu.py loads (a C++ compiler and AVX512-VNNI), it runs there: activations
  quantized to int8 per group of 32, Q4 x Q8 dot products, each weight read once for all rows
  (a 5-row verify window costs about 2 single-row steps, not 3.8); otherwise
  `torch._weight_int4pack_mm_for_cpu`. A layer whose shape the kernels cannot take (out_features
  not a multiple of 16, in_features not a multiple of the group) stays int8.

NOTE: measured on the 2-core dev CPU (1 thread, min of 5 runs; M = 1 / 3 / 5 rows):
- fbgemm dynamic quantization (`torch.ao.quantization.quantize_dynamic`, per-channel) is the
  fastest int8 kernel (lm_head 49152x576: 1.8 / 2.2 / 1.1 ms; fp32 12.7 / 64.7 / 27.2 ms), but
  it also quantizes the activations per tensor, and SmolLM2-135M's greedy argmax then agrees
  with float32 on only 54% of prompt positions (per-tensor weights: 38%) -- a draft that
  bad loses more in acceptance than it saves.
- weight-only int8 keeps 95% agreement (bfloat16: 97%), and `_weight_int8pack_mm` with
  bfloat16 activations runs close to fbgemm on the small shapes and 2-4x faster than float32
  on the big ones. With float32 activations the same op is 10-20x slower.
- int4 (2 threads, one batch-1 decode step of Qwen2.5-Coder-0.5B's 24 layers, weights out of
  cache): 11.1 ms against int8's 22.7 ms; its 151936x896 lm_head 3.8 ms against 8.5 ms. The
  price is accuracy: relative weight error ~8 % (int8: 0.8 %), and the 0.5B's greedy argmax
  agrees with float32 on 88 % of 600 code positions (int8: 96.7 %). Speculation still gains:
  the Qwen pair's batch-1 code run went from 10.6-11.8 tok/s (int8 draft) to 13.3-15.0.
  (The GGUF source was Q4_K_M, yet the min/max grid reproduces none of the groups of the
  896-input layers to within 0.05 of a step, and ~77 % of some 4864-input down_proj layers':
  most of this model was evidently not stored as 4-bit groups of 32.)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from specdec.kernels import q4_cpu

INT4_GROUP_SIZE = 32
# NOTE: bump when a quantized layer's buffers change meaning (packing, scales, grouping): it
# keys the disk cache of quantized models (specdec/model/quant_cache.py).
FORMAT_VERSION = "int8-rowwise+int4-g32-cpupack-1"


class Int8Linear(nn.Module):
    """y = x @ (int8_weight * scales).T + bias, computed in bfloat16, returned in x's dtype."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()  # [out_features, in_features]
        # NOTE: round with the bfloat16 scale the kernel will use, not the exact one.
        scales = (weight.abs().amax(dim=1).clamp(min=1e-8) / 127.0).to(torch.bfloat16)
        qweight = torch.round(weight / scales.float()[:, None]).clamp(-127, 127)
        qweight = qweight.to(torch.int8)  # [out_features, in_features]
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.register_buffer("qweight", qweight.contiguous())  # [out, in] int8
        self.register_buffer("scales", scales)  # [out] bfloat16
        bias = None if linear.bias is None else linear.bias.detach().clone()
        self.register_buffer("bias", bias)

    def forward(self, x: Tensor) -> Tensor:
        # x: [num_tokens, in_features] -> [num_tokens, out_features]
        out = torch._weight_int8pack_mm(x.to(torch.bfloat16).contiguous(), self.qweight,
                                        self.scales).to(x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def int4_groups(weight: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric 4-bit codes of `weight` [out, in] per group of `group_size` inputs:
    weight ~= (codes - 8) * scales + zeros, scale and zero broadcast over each group.
    Returns codes [out, in] int32 in 0..15, scales and zeros [out, in / group_size] bfloat16."""
    out_features, in_features = weight.shape
    groups = weight.float().reshape(out_features, in_features // group_size, group_size)
    low = groups.amin(dim=-1)  # [out, num_groups]
    high = groups.amax(dim=-1)
    scales = ((high - low) / 15.0).clamp(min=1e-8).to(torch.bfloat16)
    # NOTE: the kernel computes (code - 8) * scale + zero; zero is the value of code 8.
    zeros = (low + 8.0 * scales.float()).to(torch.bfloat16)
    # Round against the bfloat16 scale and zero the kernel will use.
    codes = torch.round((groups - zeros.float()[..., None]) / scales.float()[..., None]) + 8
    codes = codes.clamp(0, 15).to(torch.int32).reshape(out_features, in_features)
    return codes, scales, zeros


def int4_dequantize(codes: Tensor, scales: Tensor, zeros: Tensor, group_size: int) -> Tensor:
    """The float32 weight [out, in] the int4 kernel multiplies by (the plain reference)."""
    out_features, in_features = codes.shape
    groups = codes.float().reshape(out_features, in_features // group_size, group_size) - 8
    weight = groups * scales.float()[..., None] + zeros.float()[..., None]
    return weight.reshape(out_features, in_features)


class Int4Linear(nn.Module):
    """y = x @ dequant(int4_weight).T + bias, computed in bfloat16, returned in x's dtype."""

    def __init__(self, linear: nn.Linear, group_size: int = INT4_GROUP_SIZE,
                 source_groups: tuple[Tensor, Tensor, Tensor] | None = None) -> None:
        """source_groups: (codes [out, in], scales, zero_eff [out, in / 32]) read from the
        checkpoint (gguf_q4k.q4k_groups), weight = codes * scale + zero_eff; used as they are
        instead of re-quantizing linear.weight."""
        super().__init__()
        if not int4_fits(linear, group_size):
            raise ValueError(f"int4 needs out_features % 16 == 0 and in_features % "
                             f"{group_size} == 0, got {linear.out_features}x{linear.in_features}")
        if source_groups is not None:
            codes, scales, zero_eff = source_groups
            expected = (linear.out_features, linear.in_features)
            if tuple(codes.shape) != expected or group_size != q4_cpu.GROUP_SIZE:
                raise ValueError(f"source_groups: codes {tuple(codes.shape)} for a "
                                 f"{expected} layer (group {group_size})")
            codes = codes.to(torch.int32)
            scales = scales.to(torch.bfloat16)
            zeros = (zero_eff.float() + 8.0 * scales.float()).to(torch.bfloat16)
        else:
            codes, scales, zeros = int4_groups(linear.weight.detach(), group_size)
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.group_size = group_size
        self.use_q4_kernel = (group_size == q4_cpu.GROUP_SIZE
                              and q4_cpu.load_kernel() is not None)
        if self.use_q4_kernel:
            # weight = (code - 8) * scale + zero = code * scale + (zero - 8 * scale)
            zero_eff = (source_groups[2].float() if source_groups is not None
                        else zeros.float() - 8.0 * scales.float())
            packed, scale_zero = q4_cpu.q4_pack(codes, scales, zero_eff)
            self.register_buffer("q4_packed", packed)  # [out / 16, in / 32, 4, 64] uint8
            self.register_buffer("q4_scale_zero", scale_zero)  # [out / 16, in / 32, 2, 16]
        else:
            packed = torch._convert_weight_to_int4pack_for_cpu(codes, 1)  # [out, in / 2] uint8
            self.register_buffer("packed_weight", packed)
            # [num_groups, out, 2] bfloat16: (scale, zero) per group and output channel
            self.register_buffer("scales_and_zeros",
                                 torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous())
        bias = None if linear.bias is None else linear.bias.detach().clone()
        self.register_buffer("bias", bias)

    def register_buffer(self, name: str, tensor: Tensor | None, persistent: bool = True) -> None:
        # the kernel's weights go to huge pages however they arrive (packed here, or read back
        # by quant_cache.load): fewer TLB misses streaming them, the same memory
        if name in ("q4_packed", "q4_scale_zero") and tensor is not None:
            tensor = q4_cpu.to_hugepages(tensor)
        super().register_buffer(name, tensor, persistent)

    def forward(self, x: Tensor) -> Tensor:
        # x: [num_tokens, in_features] -> [num_tokens, out_features]
        if self.use_q4_kernel:
            out = q4_cpu.q4_linear(q4_cpu.load_kernel(), x, self.q4_packed,
                                   self.q4_scale_zero).to(x.dtype)
            if self.bias is not None:
                out = out + self.bias
            return out
        out = torch._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16).contiguous(),
                                                self.packed_weight, self.group_size,
                                                self.scales_and_zeros).to(x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out

    def extra_repr(self) -> str:
        kernel = "q4_cpu" if self.use_q4_kernel else "torch"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"int4 group={self.group_size}, kernel={kernel}")


class Int4Embedding(nn.Module):
    """An embedding table kept as int4 groups of 32 (a quarter of bfloat16's bytes on disk
    and in memory); a lookup dequantizes only the rows it reads:
    row = codes * scale + zero_eff per group, returned in `dtype`.

    NOTE: scale and zero_eff stay float32: a GGUF's Q4_K rows (d * sc and -dmin * m, fp16
    times 6-bit integers) are then reproduced exactly."""

    def __init__(self, embedding: nn.Embedding, dtype: torch.dtype,
                 source_groups: tuple[Tensor, Tensor, Tensor] | None = None,
                 group_size: int = INT4_GROUP_SIZE) -> None:
        super().__init__()
        num_embeddings, embedding_dim = embedding.weight.shape
        if embedding_dim % group_size or embedding_dim % 2:
            raise ValueError(f"Int4Embedding needs embedding_dim % {group_size} == 0, got "
                             f"{embedding_dim}")
        if source_groups is not None:
            codes, scales, zero_eff = source_groups
            if tuple(codes.shape) != (num_embeddings, embedding_dim):
                raise ValueError(f"source_groups: codes {tuple(codes.shape)} for a "
                                 f"{(num_embeddings, embedding_dim)} embedding")
            scales, zero_eff = scales.float(), zero_eff.float()
        else:
            codes, scales, zeros = int4_groups(embedding.weight.detach(), group_size)
            scales, zero_eff = scales.float(), zeros.float() - 8.0 * scales.float()
        codes = codes.to(torch.uint8)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.group_size = group_size
        self.out_dtype = str(dtype).removeprefix("torch.")  # a plain str: cached as metadata
        # [num_embeddings, embedding_dim / 2] uint8: input 2j in the low nibble, 2j+1 high
        self.register_buffer("packed", (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous())
        self.register_buffer("scales", scales.contiguous())  # [num_embeddings, dim / 32]
        self.register_buffer("zero_eff", zero_eff.contiguous())

    def dequantize(self, ids: Tensor) -> Tensor:
        """float32 rows [len(ids), embedding_dim] (the plain reference of a lookup)."""
        packed = self.packed[ids]  # [n, dim / 2]
        codes = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(len(ids), -1)
        groups = codes.float().reshape(len(ids), -1, self.group_size)
        rows = groups * self.scales[ids][..., None] + self.zero_eff[ids][..., None]
        return rows.reshape(len(ids), self.embedding_dim)

    def forward(self, ids: Tensor) -> Tensor:
        # ids: [num_tokens] -> [num_tokens, embedding_dim]
        rows = self.dequantize(ids.reshape(-1)).to(getattr(torch, self.out_dtype))
        return rows.reshape(*ids.shape, -1)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int4 group={self.group_size}"


def prune_rows(module: nn.Module, num_rows: int) -> nn.Module:
    """A copy of a Linear / Int8Linear / Int4Linear that computes only its first `num_rows`
    outputs (the same values, bit for bit): a draft's vocabulary-pruned lm_head."""
    out_features = module.out_features
    if not 0 < num_rows <= out_features:
        raise ValueError(f"num_rows must be in [1, {out_features}], got {num_rows}")
    # NOTE: the q4 kernel packs tiles of 16 outputs, torch's int4 layout blocks of 64
    # (checked against the full layer in tests/unit/test_draft_head.py).
    tile = (16 if module.use_q4_kernel else 64) if isinstance(module, Int4Linear) else 1
    if num_rows % tile:
        raise ValueError(f"an int4 layer keeps whole tiles of {tile} rows: num_rows must be a "
                         f"multiple of {tile}, got {num_rows}")
    if isinstance(module, nn.Linear):
        pruned = type(module)(module.in_features, num_rows, bias=module.bias is not None,
                              device="meta", dtype=module.weight.dtype)
        pruned.weight = nn.Parameter(module.weight.detach()[:num_rows].clone(),
                                     requires_grad=False)
        if module.bias is not None:
            pruned.bias = nn.Parameter(module.bias.detach()[:num_rows].clone(),
                                       requires_grad=False)
        return pruned
    if not isinstance(module, (Int8Linear, Int4Linear)):
        raise TypeError(f"prune_rows takes a Linear, Int8Linear or Int4Linear, got "
                        f"{type(module).__name__}")
    # NOTE: each layout keeps an output's bytes together along its first dim (q4: tiles of 16
    # outputs), except torch's int4 scales_and_zeros [groups, out, 2].
    rows = {"qweight": num_rows, "scales": num_rows, "bias": num_rows,
            "q4_packed": num_rows // 16, "q4_scale_zero": num_rows // 16,
            "packed_weight": num_rows}
    pruned = type(module).__new__(type(module))
    nn.Module.__init__(pruned)
    for k, v in vars(module).items():
        if not k.startswith("_") and k != "training":
            setattr(pruned, k, v)
    pruned.out_features = num_rows
    for name, buffer in module._buffers.items():
        if buffer is None:
            pruned.register_buffer(name, None)
        elif name == "scales_and_zeros":
            pruned.register_buffer(name, buffer[:, :num_rows].clone())
        else:
            pruned.register_buffer(name, buffer[:rows[name]].clone())
    return pruned


def int4_fits(linear: nn.Linear, group_size: int = INT4_GROUP_SIZE) -> bool:
    return linear.out_features % 16 == 0 and linear.in_features % group_size == 0


def quantize_weights(model: nn.Module, quantization: str,
                     groups: dict[str, tuple[Tensor, Tensor, Tensor]] | None = None,
                     int8_names: set[str] | None = None) -> nn.Module:
    """Replace the model's nn.Linear layers in place with Int8Linear ("int8") or Int4Linear
    ("int4"; int8 for a layer the int4 kernel cannot take). CPU only. Returns the model.
    With "int4", `groups` maps layer names to their checkpoint's 4-bit groups (see
    gguf_q4k.q4k_groups: used as they are), and layers in `int8_names` stay int8 (those the
    checkpoint stored at more than 4 bits)."""
    if quantization not in ("int8", "int4"):
        raise ValueError(f"quantization must be 'int8' or 'int4', got {quantization!r}")
    device = torch.device(getattr(model, "device", "cpu"))
    if device.type != "cpu":
        raise ValueError(f"quantization={quantization!r} runs on the CPU only, got device={device}")
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.Linear)]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        use_int4 = (quantization == "int4" and int4_fits(linear)
                    and name not in (int8_names or ()))
        source = (groups or {}).get(name) if use_int4 else None
        setattr(parent, child,
                Int4Linear(linear, source_groups=source) if use_int4 else Int8Linear(linear))
    model.quantization = quantization
    return model
