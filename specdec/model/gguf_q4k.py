"""Faithful int4 from a GGUF's Q4_K tensors: their 4-bit codes, scale and minimum per 32 weights,
read as they are instead of re-quantizing the dequantized float32 weights.

A Q4_K block holds 256 weights: f16 d and dmin, 12 bytes of 6-bit sub-scales sc[j] and
sub-minimums m[j] for its 8 sub-blocks of 32, and 128 bytes of 4-bit codes q. Weight
w = d * sc[j] * q - dmin * m[j], which is our int4 group-32 asymmetric format exactly:
codes = q, scale = d * sc[j], zero_eff = -dmin * m[j] (the kernel then rounds scale and zero_eff
to bfloat16: a relative 2^-9 of each, well under a quantization step).

Other tensor types (a Q4_K_M file stores some ffn_down / attn_v as Q6_K, and layers whose
width is not a multiple of 256 as Q5_0 or Q8_0) are not returned; `quantize_weights` keeps
them on its own path (int8 for the names in `int8_names`).

Interface for the loader (the footprint helper owns fetching): call
`q4k_groups(gguf_path)` on the GGUF the model was converted from, then
`quantize_weights(model, "int4", groups=..., int8_names=...)`.
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

    reader = gguf.GGUFReader(gguf_path)
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
