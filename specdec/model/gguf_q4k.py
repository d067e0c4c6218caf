"""Faithful int4 from a GGUF's Q4_K tensors: their 4-bit codes, scale and minimum per 32 weights,
read as they are instead of re-quantizing the dequantized float32 weights.

A Q4_K block holds 256 weights: f16 d and dmin, 12 bytes of 6-bit sub-scales sc[j] and
sub-minimums m[j] for its 8 sub-blocks of 32, and 128 bytes of 4-bit codes q. Weight
w = d * sc[j] * q - dmin * m[j], which is our int4 group-32 asymmetric format exactly:
codes = q, scale = d * sc[j], zero_eff = -dmin * m[j] (the kernel then rounds scale and zero_eff
to bfloat16: a relative 2^-9 of each, well under a quantization step).

Other tensor types (a Q4_K_M file stores some ffn_down / attn_v and the 1.5B's output as
Q6_K, and layers whose width is not a multiple of 256 as Q5_0 or Q8_0) have no 4-bit groups
of 32 to take. `GGUFGroups` decides per module of our (fused) model: a module whose parts are
all Q4_K gets their groups exactly; a module whose parts are all Q6_K / Q8_0 stays int8 when
`high_bits="int8"`; every other part is re-quantized to int4 groups from its dequantized
values (the min/max grid of quant.int4_groups), so a fused qkv_proj whose v part is Q6_K is
exact in q and k.

The loader (specdec/model/weights.py) uses it for an entry that keeps its GGUF.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

BLOCK_BYTES = 144
BLOCK_WEIGHTS = 256

_GGUF_TO_HF = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def hf_linear_name(gguf_name: str) -> str | None:
    """'blk.3.ffn_up.weight' -> 'model.layers.3.mlp.up_proj'; 'output.weight' -> 'lm_head'."""
    if gguf_name == "output.weight":
        return "lm_head"
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[3] == "weight" and parts[2] in _GGUF_TO_HF:
        return f"model.layers.{parts[1]}.{_GGUF_TO_HF[parts[2]]}"
    return None


def decode_q4k(raw: np.ndarray) -> tuple[Tensor, Tensor, Tensor]:
    """raw [rows, blocks * 144] uint8 Q4_K -> codes [rows, blocks * 256] uint8 (0..15),
    scales and zero_eff [rows, blocks * 8] float32; weight = codes * scale + zero_eff."""
    rows = raw.shape[0]
    blocks = raw.reshape(rows, -1, BLOCK_BYTES)  # [rows, nb, 144]
    d = blocks[..., 0:2].copy().view(np.float16).astype(np.float32)  # [rows, nb, 1]
    dmin = blocks[..., 2:4].copy().view(np.float16).astype(np.float32)
    sc_bytes = blocks[..., 4:16].astype(np.int32)  # [rows, nb, 12]
    qs = blocks[..., 16:144]  # [rows, nb, 128]
    # 6-bit sub-scales and minimums (llama.cpp's get_scale_min_k4)
    low_sc = sc_bytes[..., 0:4] & 63
    low_m = sc_bytes[..., 4:8] & 63
    high_sc = (sc_bytes[..., 8:12] & 0x0F) | ((sc_bytes[..., 0:4] >> 6) << 4)
    high_m = (sc_bytes[..., 8:12] >> 4) | ((sc_bytes[..., 4:8] >> 6) << 4)
    sc = np.concatenate([low_sc, high_sc], axis=-1).astype(np.float32)  # [rows, nb, 8]
    m = np.concatenate([low_m, high_m], axis=-1).astype(np.float32)
    # sub-block j: the low (j even) or high (j odd) nibbles of qs[32 * (j // 2) : + 32]
    q = qs.reshape(rows, -1, 4, 1, 32)
    codes = np.concatenate([q & 0x0F, q >> 4], axis=3)  # [rows, nb, 4, 2, 32]
    codes = codes.reshape(rows, -1)
    scales = (d * sc).reshape(rows, -1)
    zero_eff = (-dmin * m).reshape(rows, -1)
    return torch.from_numpy(codes), torch.from_numpy(scales), torch.from_numpy(zero_eff)


def q4k_groups(gguf_path: str) -> tuple[dict[str, tuple[Tensor, Tensor, Tensor]], set[str]]:
    """(groups, int8_names): the Q4_K linear layers of a GGUF as {hf_name: (codes, scales,
    zero_eff)}, and the names of the layers stored at more than 4 bits (Q5_0, Q6_K, Q8_0...),
    which stay int8."""
    import gguf

    from specdec.model.gguf_reader import open_gguf

    reader = open_gguf(gguf_path)
    groups, int8_names = {}, set()
    for tensor in reader.tensors:
        name = hf_linear_name(tensor.name)
        if name is None:
            continue
        kind = tensor.tensor_type
        if kind == gguf.GGMLQuantizationType.Q4_K:
            groups[name] = decode_q4k(np.asarray(tensor.data))
        elif kind not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16,
                          gguf.GGMLQuantizationType.BF16):
            int8_names.add(name)
    return groups, int8_names


# our fused module (suffix) -> its GGUF parts, in row order
_MODULE_PARTS = {"qkv_proj": ("attn_q", "attn_k", "attn_v"), "o_proj": ("attn_output",),
                 "gate_up_proj": ("ffn_gate", "ffn_up"), "down_proj": ("ffn_down",)}
HIGH_BITS = ("int8", "int4")
# The types a Q4_K_M recipe picks for the tensors that matter most (some attn_v / ffn_down,
# the output): `high_bits` decides those. Anything else that is not Q4_K (Q5_0, Q4_1, F32...)
# is re-quantized to int4, as an int4 load asks.
HIGH_BIT_TYPES = ("Q6_K", "Q8_0")


class GGUFGroups:
    """The 4-bit groups a GGUF holds for each Linear module of LlamaForCausalLM (names as
    `model.named_modules()` gives them: 'layers.3.qkv_proj', 'lm_head').

    high_bits: what a module none of whose parts is Q4_K becomes: "int8" (per-channel, close
    to the 6- and 8-bit source) or "int4" (re-quantized, smaller and faster)."""

    def __init__(self, gguf_path: str, high_bits: str = "int8") -> None:
        import gguf

        from specdec.model.gguf_reader import open_gguf

        if high_bits not in HIGH_BITS:
            raise ValueError(f"high_bits must be one of {HIGH_BITS}, got {high_bits!r}")
        self.high_bits = high_bits
        self._q4k = gguf.GGMLQuantizationType.Q4_K
        self.reader = open_gguf(gguf_path)
        self.tensors = {t.name: t for t in self.reader.tensors}
        arch = str(self.reader.fields["general.architecture"].contents())
        self._heads = None
        if arch == "llama":  # convert_hf_to_gguf permuted the q / k rows
            heads = int(self.reader.fields["llama.attention.head_count"].contents())
            kv = self.reader.fields.get("llama.attention.head_count_kv")
            self._heads = {"attn_q": heads,
                           "attn_k": int(kv.contents()) if kv is not None else heads}

    def exact_tensors(self) -> set[str]:
        """GGUF names of the tensors whose modules take their 4-bit groups as they are: a
        quantized load need not dequantize them."""
        blocks = {int(n.split(".")[1]) for n in self.tensors if n.startswith("blk.")}
        modules = ["embed_tokens", "lm_head"] + [f"layers.{i}.{m}" for i in sorted(blocks)
                                                 for m in _MODULE_PARTS]
        return {t.name for m in modules if self.plan(m) == "exact" for t in self.parts(m)}

    def parts(self, module_name: str) -> list:
        """The GGUF tensors of one of our modules, in row order ([] if none)."""
        if module_name == "embed_tokens":
            return [self.tensors["token_embd.weight"]]
        if module_name == "lm_head":
            name = "output.weight" if "output.weight" in self.tensors else "token_embd.weight"
            return [self.tensors[name]]
        pieces = module_name.split(".")
        if len(pieces) != 3 or pieces[0] != "layers" or pieces[2] not in _MODULE_PARTS:
            return []
        names = [f"blk.{pieces[1]}.{part}.weight" for part in _MODULE_PARTS[pieces[2]]]
        return [self.tensors[n] for n in names if n in self.tensors]

    def plan(self, module_name: str) -> str:
        """'exact' (all parts Q4_K), 'int8' or 'mixed' (some parts re-quantized)."""
        parts = self.parts(module_name)
        if parts and all(t.tensor_type == self._q4k for t in parts):
            return "exact"
        if (parts and self.high_bits == "int8"
                and all(t.tensor_type.name in HIGH_BIT_TYPES for t in parts)):
            return "int8"
        return "mixed"

    def source_groups(self, module_name: str, weight: Tensor
                      ) -> tuple[Tensor, Tensor, Tensor] | None:
        """(codes, scales, zero_eff) for the module whose loaded (dequantized) weight is
        `weight` [out, in]; None when it stays int8 (plan 'int8')."""
        from specdec.model.convert import unpermute_rope
        from specdec.model.quant import int4_groups

        plan = self.plan(module_name)
        if plan == "int8":
            return None
        out = []
        row = 0
        for tensor in self.parts(module_name):
            rows = int(tensor.shape[-1])
            if tensor.tensor_type == self._q4k:
                codes, scales, zero_eff = decode_q4k(np.asarray(tensor.data))
                part = tensor.name.split(".")[2] if tensor.name.startswith("blk.") else ""
                if self._heads is not None and part in self._heads:
                    codes, scales, zero_eff = (unpermute_rope(t, self._heads[part])
                                               for t in (codes, scales, zero_eff))
            else:
                codes, scales, zeros = int4_groups(weight[row:row + rows], 32)
                zero_eff = zeros.float() - 8.0 * scales.float()
            out.append((codes, scales.float(), zero_eff.float()))
            row += rows
        if row != weight.shape[0]:
            raise ValueError(f"{module_name}: GGUF parts have {row} rows, the module "
                             f"{weight.shape[0]}")
        return tuple(torch.cat([o[i] for o in out]) for i in range(3))
