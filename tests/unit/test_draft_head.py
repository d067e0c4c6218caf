"""A vocabulary-pruned draft lm_head (spec.draft_vocab_size, quant.prune_rows,
LlamaForCausalLM.prune_head): the kept rows compute exactly what the full head computes, the
others are -inf (never proposed), and greedy speculation with the pruned draft still gives the
target's own tokens. The sampled distribution stays the target's: the pruned-head case of
tests/unit/test_spec_distribution.py."""

from __future__ import annotations

import pytest
import torch

from specdec import SamplingParams
from specdec.core.config import ConfigError
from specdec.model import quant
from specdec.model.weights import load_model
from tests.conftest import PagedSequences
from tests.unit.test_spec import make_llm, prompts, spec_llm


@pytest.mark.parametrize("kind", ["linear", "int8", "int4-q4", "int4-torch"])
def test_pruned_rows_compute_exactly_the_full_rows(kind, monkeypatch):
    from specdec.kernels import q4_cpu

    if kind == "int4-torch":
        monkeypatch.setenv("SPECDEC_Q4_KERNEL", "torch")
        q4_cpu.load_kernel.cache_clear()
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 192)
    full = {"linear": linear, "int8": quant.Int8Linear(linear)}.get(kind) \
        or quant.Int4Linear(linear)
    if kind == "int4-q4" and not full.use_q4_kernel:
        pytest.skip("the q4 kernel does not load here")
    if kind == "int4-torch":
        assert not full.use_q4_kernel
    rows = 64 if kind == "int4-torch" else 48  # torch's int4 layout: blocks of 64
    pruned = quant.prune_rows(full, rows)
    assert type(pruned) is type(full) and pruned.out_features == rows
    x = torch.randn(5, 64)
    with torch.no_grad():
        assert torch.equal(pruned(x), full(x)[:, :rows])
    if kind == "int4-torch":
        q4_cpu.load_kernel.cache_clear()


def test_bad_row_counts_are_named():
    int4 = quant.Int4Linear(torch.nn.Linear(64, 96))
    with pytest.raises(ValueError, match="num_rows must be a multiple of (16|64), got 40"):
        quant.prune_rows(int4, 40)
    with pytest.raises(ValueError, match=r"num_rows must be in \[1, 96\], got 97"):
        quant.prune_rows(int4, 97)


@pytest.mark.parametrize("quantization", [None, "int4"])
def test_pruned_head_logits_are_the_full_ones_or_minus_inf(tiny_draft_dir, quantization):
    full = load_model(tiny_draft_dir, "float32", quantization=quantization)
    pruned = load_model(tiny_draft_dir, "float32", quantization=quantization)
    pruned.prune_head(128)
    prompt = [5, 77, 300, 12, 9, 42]
    want = full(PagedSequences(4, 16).batch([("a", prompt)]), full.make_kv_caches(4, 16))
    got = pruned(PagedSequences(4, 16).batch([("a", prompt)]), pruned.make_kv_caches(4, 16))
    assert got.shape == want.shape
    if quantization is None:
        # NOTE: a float32 BLAS matmul of another width (or another weight alignment: the full
        # head may be memory-mapped, the pruned copy is not) may round differently in the last
        # bits; the quantized kernels compute each output alone and are exact.
        torch.testing.assert_close(got[:, :128], want[:, :128], rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(got[:, :128], want[:, :128])
    assert torch.isneginf(got[:, 128:]).all()
    with pytest.raises(ValueError, match="num_tokens must be in"):
        pruned.prune_head(full.vocab_size + 1)


def test_greedy_speculation_with_a_pruned_draft_is_the_targets(tiny_llama_dir, tiny_draft_dir):
    batch = prompts(4, seed=3)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in make_llm(tiny_llama_dir).generate(batch, params)]
    llm = spec_llm(tiny_llama_dir, tiny_draft_dir, 4, **{"spec.draft_vocab_size": 160})
    assert llm.engine.draft_runner.model.lm_head.out_features == 160
    got = [o.outputs[0].token_ids for o in llm.generate(batch, params)]
    assert got == want
    assert llm.engine.stats().spec_num_draft_tokens > 0


def test_draft_vocab_size_is_checked(tiny_llama_dir, tiny_draft_dir):
    with pytest.raises(ConfigError, match="spec.draft_vocab_size must be unset or positive"):
        spec_llm(tiny_llama_dir, tiny_draft_dir, 4, **{"spec.draft_vocab_size": 0})
    with pytest.raises(ConfigError, match="spec.draft_vocab_size must be at most"):
        spec_llm(tiny_llama_dir, tiny_draft_dir, 4, **{"spec.draft_vocab_size": 10 ** 6})
    with pytest.raises(ConfigError, match="multiple of (16|64)"):
        spec_llm(tiny_llama_dir, tiny_draft_dir, 4, **{"spec.draft_vocab_size": 100,
                                                       "spec.draft_quantization": "int4"})
