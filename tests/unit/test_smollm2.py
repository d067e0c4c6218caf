"""The real SmolLM2-135M-Instruct: our greedy loop over the paged cache reproduces
transformers' `generate` token for token."""

from __future__ import annotations

import torch

from specdec.model.weights import load_model, load_tokenizer
from tests.conftest import PagedSequences

NUM_TOKENS = 64


def _greedy(model, prompt_ids: list[int], num_tokens: int, eos_id: int) -> list[int]:
    """Greedy decoding with EOS masked (what `min_new_tokens` does in transformers)."""
    seqs = PagedSequences(num_blocks=16, block_size=16, seed=5)
    caches = model.make_kv_caches(16, 16)
    # prefill in two chunks, then one token per step
    model(seqs.batch([("a", prompt_ids[:20])], logits_rows="last"), caches)
    logits = model(seqs.batch([("a", prompt_ids[20:])], logits_rows="last"), caches)
    out: list[int] = []
    for _ in range(num_tokens):
        logits[:, eos_id] = float("-inf")
        out.append(int(logits[-1].argmax()))
        logits = model(seqs.batch([("a", [out[-1]])]), caches)
    return out


def test_greedy_matches_transformers_generate(smollm2_dir):
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(smollm2_dir)
    messages = [{"role": "user", "content": "Explain in two sentences what a KV cache is."}]
    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                               tokenize=True, return_dict=True)["input_ids"]
    assert len(prompt_ids) > 20
    model = load_model(smollm2_dir, "float32")
    ours = _greedy(model, prompt_ids, NUM_TOKENS, tokenizer.eos_token_id)

    ref = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        generated = ref.generate(torch.tensor([prompt_ids]), max_new_tokens=NUM_TOKENS,
                                 min_new_tokens=NUM_TOKENS, do_sample=False)
    expected = generated[0, len(prompt_ids):].tolist()
    assert len(expected) == NUM_TOKENS
    assert ours == expected, (tokenizer.decode(ours), tokenizer.decode(expected))


def test_chat_template_and_special_tokens(smollm2_dir):
    tokenizer = load_tokenizer(smollm2_dir)
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [1, 2]
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
