"""The decoder stack of an int4 model in one C++ call, for the CPU's decode and verify steps
(decoder_cpu.cpp, built into the q4 kernel's extension).

A 0.5B draft step on the 2-core dev VM spent about half its time outside the weights: ~50
torch ops and ~15 Python calls a layer around the four q4 matmuls (RMSNorm 40 us, SDPA's math
path 90-180 us at batch 1). `CpuDecoder` runs a whole step's layers as loops around the same
q4 kernel. It takes decodes, verify windows and prefill chunks, as long as a sequence's window
rows x keys stays within `MAX_SCORES` (its attention holds those scores in float32); longer
chunks, LoRA batches, tensor-parallel shards and models with a projection that is not a q4
`Int4Linear` keep the layer loop, which is also the plain reference the tests compare it
against. `SPECDEC_CPU_DECODER=reference` forces the layer loop (for before/after runs).

NOTE: measured on the dev VM (one forward, the last row's logits only, as a prefill computes):
a 150-token prefill of the 1.5B int4 target 809 ms through the stack against 943 through the
layer loop, of the 0.5B draft 246 against 390; 32 tokens 180 / 207 and 59 / 86.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from specdec.kernels import q4_cpu

# Window rows x keys per sequence: the stack's ATen attention (no AVX-512, or another head
# size) holds [kv_heads, rows x group, keys] float32 scores and their softmax (~100 MB at this
# bound for the 1.5B: 2 kv heads x 6); past it the layer loop's SDPA. The AVX-512 attention
# needs [group, keys] a thread, so the bound could be lifted where it runs (not measured).
MAX_SCORES = 1 << 20
PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def enabled() -> bool:
    return os.environ.get("SPECDEC_CPU_DECODER", "").strip().lower() != "reference"


def takes(batch) -> bool:
    """Whether a batch (a ForwardBatch) is one the fused stack runs: no adapters, and each
    sequence's window rows x keys within MAX_SCORES."""
    return (batch.lora is None and bool(batch.query_lens)
            and all(rows * keys <= MAX_SCORES
                    for rows, keys in zip(batch.query_lens, batch.seq_lens_list)))


def build(model, kv_caches: list[tuple[Tensor, Tensor]]):
    """A CpuDecoder over `model`'s layers (a LlamaForCausalLM) and its KV caches, or None where
    it cannot run them: no compiled kernel, not on the CPU, a tensor-parallel shard, or a
    projection that is not a q4 Int4Linear (int8 or bfloat16 layers)."""
    kernel = q4_cpu.load_kernel()
    if (kernel is None or not enabled() or model.device.type != "cpu"
            or getattr(model, "tp", None) is not None):
        return None
    layers = list(model.layers)
    if not all(getattr(getattr(layer, name), "use_q4_kernel", False)
               for layer in layers for name in PROJECTIONS):
        return None
    decoder = new_decoder(model)
    if decoder is None:
        return None
    for layer, kv_cache in zip(layers, kv_caches, strict=True):
        add_layer(decoder, layer, kv_cache)
    add_ends(decoder, model)
    return decoder


def add_ends(decoder, model) -> None:
    """Gives `decoder` the model's int4 embedding and its final norm + q4 lm_head where they
    are those (a GGUF int4 model on the CPU, in float32 or bfloat16): a forward is then one
    C++ call from token ids to logits (`forward_logits`), with no torch op around it. NOTE:
    measured on the dev VM, a 0.5B draft's one-row forward spent ~0.4 ms of ~7 outside the
    stack and its lm_head: the embedding lookup's ten torch ops, the final RMSNorm (~0.1 ms),
    dtype casts and the -inf padding of a pruned head."""
    from specdec.model.quant import Int4Embedding, Int4Linear

    if model.dtype not in (torch.float32, torch.bfloat16):
        return
    bf16 = model.dtype == torch.bfloat16
    head = model.lm_head
    if isinstance(head, Int4Linear) and head.use_q4_kernel and head.bias is None:
        decoder.set_head(model.norm.weight.detach(), model.norm.eps, head.q4_packed,
                         head.q4_scale_zero, bf16)
    embed = model.embed_tokens
    if (isinstance(embed, Int4Embedding) and embed.out_dtype == str(model.dtype).removeprefix("torch.")
            and model.num_real_tokens <= embed.num_embeddings):
        decoder.set_embedding(embed.packed, embed.scales, embed.zero_eff, embed.group_size,
                              model.num_real_tokens, bf16)


def new_decoder(model):
    """An empty CpuDecoder for `model`'s attention shape, or None where its kernel cannot
    compute that attention."""
    first = model.layers[0]
    if abs(first.scale - first.head_dim ** -0.5) > 1e-12:  # the kernel scales by 1/sqrt(d)
        return None
    return q4_cpu.load_kernel().CpuDecoder(first.num_heads, first.num_kv_heads, first.head_dim,
                                           first.input_layernorm.eps, model.rope_cos,
                                           model.rope_sin, q4_cpu.DYNAMIC_SPLIT)


def rows_alone(model) -> bool:
    """Whether the stack attends every window's rows one by one for `model` (the AVX-512
    attention, head_dim 16/32/64/128): then any window, a whole prefill included, gives a row
    the values a one-row step of it gives. Elsewhere only windows of up to 16 rows do."""
    kernel = q4_cpu.load_kernel()
    return kernel is not None and kernel.decoder_rows_alone(model.layers[0].head_dim)


def add_layer(decoder, layer, kv_cache: tuple[Tensor, Tensor]) -> None:
    """Appends one DecoderLayer (its q4 projections, norms and KV cache) to `decoder`."""
    none = torch.empty(0)
    projections = []
    for name in PROJECTIONS:
        proj = getattr(layer, name)
        projections.append([proj.q4_packed, proj.q4_scale_zero,
                            none if proj.bias is None else proj.bias])
    decoder.add_layer(layer.input_layernorm.weight.detach(),
                      layer.post_attention_layernorm.weight.detach(), *projections, *kv_cache)
