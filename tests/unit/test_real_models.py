"""Real models (fetched once into the model cache): continuous batching, preemption and
speculative decoding stay token-for-token exact on SmolLM2-135M and the Qwen2.5-Coder pair.

A mismatch is either a bug or a near-tie flipped by different matmul shapes (a k+1 window vs
one token, a batch of 8 vs 1): at a mismatch the reference's top-2 logit gap must be
<= 1e-3 (fp32), otherwise the test fails as a bug; at most one such flip per comparison.
"""

from __future__ import annotations

import pytest

from specdec import LLM, SamplingParams
from specdec.core.config import Config
from tests.unit.test_spec import REAL_NEAR_TIE_GAP, assert_same_greedy

pytestmark = pytest.mark.slow

CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a hash table is in two sentences.",
    "List three prime numbers.",
    "Translate 'good morning' into Spanish.",
    "Why is the sky blue? Answer briefly.",
    "Give me a name for a pet turtle.",
    "What is 12 times 12?",
    "Summarize the plot of Romeo and Juliet in one sentence.",
    "Name a famous physicist and one discovery.",
    "How do I boil an egg?",
    "Write a Python one-liner that sums a list.",
    "What does HTTP stand for?",
    "Suggest a title for a blog post about gardening.",
    "Describe the color green to someone who cannot see. Keep it short, but vivid, please.",
    "Hi!",
]

CODE_PROMPTS = [
    "Write a Python function that checks whether a string is a palindrome.",
    "Write a Python function `fib(n)` that returns the n-th Fibonacci number iteratively.",
    "Add type hints and a docstring to this function:\n\ndef area(w, h):\n    return w * h\n",
    "Rewrite this loop as a list comprehension:\n\nout = []\nfor x in xs:\n    if x > 0:\n"
    "        out.append(x * 2)\n",
    "Write a JavaScript function that debounces another function.",
    "Write a SQL query that returns the ten most recent orders from a table `orders`.",
    "Fix the bug in this code:\n\ndef mean(xs):\n    return sum(xs) / len(x)\n",
    "Write a Python class `Stack` with push, pop and peek methods.",
    "Write a bash command that counts the lines of all .py files in a directory.",
    "Write a Python function that merges two sorted lists into one sorted list.",
]


def make_llm(path: str, **overrides) -> LLM:
    base = {"model.path": path, "device.device": "cpu", "model.max_model_len": 1024,
            "model.dtype": "float32"}
    base.update(overrides)
    return LLM(Config().replace(**base))


def chat_ids(llm: LLM, prompts: list[str]) -> list[dict]:
    return [{"prompt_token_ids": llm.apply_chat_template([{"role": "user", "content": p}])}
            for p in prompts]


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    return make_llm(smollm2_dir)


def test_smollm2_batched_equals_alone_and_survives_preemption(smollm2_dir, smol):
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=2)
    prompts = chat_ids(smol, CHAT_PROMPTS)
    alone = [smol.generate([p], params)[0] for p in prompts]
    together = smol.generate(prompts, params)
    assert_same_greedy(together, alone, max_gap=REAL_NEAR_TIE_GAP)
    tight = make_llm(smollm2_dir, **{"cache.num_blocks": 24, "cache.block_size": 16,
                                     "scheduler.max_num_batched_tokens": 128})
    squeezed = tight.generate(prompts, params)
    assert tight.engine.scheduler.num_preemptions > 0
    assert_same_greedy(squeezed, alone, max_gap=REAL_NEAR_TIE_GAP)
    assert tight.engine.stats().num_blocks_free == tight.engine.num_blocks


def test_smollm2_ngram_greedy_exact(smollm2_dir, smol):
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True, logprobs=2)
    prompts = chat_ids(smol, CODE_PROMPTS[:8])
    reference = smol.generate(prompts, params)
    ngram = make_llm(smollm2_dir, **{"spec.method": "ngram", "spec.num_speculative_tokens": 4,
                                     "spec.adaptive": False})
    first = ngram.generate(prompts[:1], params)
    out = ngram.generate(prompts, params)
    assert_same_greedy(first + out, reference[:1] + reference, max_gap=REAL_NEAR_TIE_GAP)
    assert ngram.engine.stats().spec_num_accepted_tokens > 0


@pytest.fixture(scope="module")
def qwen_spec(qwen_pair_dirs):
    """The real pair loaded once (1.5B fp32 target, int4 0.5B draft, k = 4 pinned); the no-spec
    reference runs on the same engine with num_speculative_tokens = 0 (the k = 0 path)."""
    draft_dir, target_dir = qwen_pair_dirs
    return make_llm(target_dir, **{"spec.method": "draft", "spec.draft_model": draft_dir,
                                   "spec.draft_quantization": "int4",
                                   "spec.num_speculative_tokens": 4, "spec.adaptive": False,
                                   "scheduler.max_num_seqs": 8})


def test_qwen_pair_greedy_exact(qwen_spec):
    """The real draft/target pair on 10 code prompts x 64 tokens: 2 alone and all 10 in
    batches of 8 equal the no-spec reference (batch-1 exactness at scale is the SmolLM2 and
    tiny tests' job; this one loads the 1.5B once)."""
    spec = qwen_spec
    reference_params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True,
                                      logprobs=2, num_speculative_tokens=0)
    prompts = chat_ids(spec, CODE_PROMPTS)
    reference = spec.generate(prompts, reference_params)
    assert spec.engine.stats().spec_num_drafts == 0
    plain = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    alone = [spec.generate([p], plain)[0] for p in prompts[:2]]
    batched = spec.generate(prompts, plain)
    assert_same_greedy(alone + batched, reference[:2] + reference, max_gap=REAL_NEAR_TIE_GAP)
    stats = spec.engine.stats()
    rate = stats.spec_num_accepted_tokens / stats.spec_num_draft_tokens
    assert rate > 0.3, f"acceptance rate {rate:.2f}: the draft is broken, not just weak"


def test_default_int4_config_spec_equals_its_own_no_spec(qwen_pair_dirs):
    """The default config as `make serve` runs it (int4 target and draft from their GGUFs, the
    draft's pruned head, bfloat16 activations), k = 2 and 4 pinned: 4 code prompts x 64 tokens,
    each request alone, equal the same engine's no-spec output (num_speculative_tokens = 0)
    token for token, with no near-tie forgiven: the CPU decoder stack computes a verify row
    exactly as the decode step of its position (test_decoder_cpu)."""
    import os

    from specdec.core import config as cfg

    draft_dir, target_dir = qwen_pair_dirs
    path = os.path.join(os.path.dirname(__file__), "..", "..", "configs",
                        "qwen2.5-coder-1.5b+0.5b.toml")
    config = cfg.load(path, {"model.path": target_dir, "spec.draft_model": draft_dir,
                             "spec.num_speculative_tokens": 4, "spec.adaptive": False,
                             "model.max_model_len": 1024, "scheduler.max_num_seqs": 4})
    assert config.model.quantization == "int4" and config.spec.draft_vocab_size
    llm = LLM(config)
    prompts = chat_ids(llm, CODE_PROMPTS[:4])

    def alone(k: int):
        return [llm.generate([p], SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True,
                                                 logprobs=2, num_speculative_tokens=k))[0]
                for p in prompts]

    reference = alone(0)
    assert llm.engine.stats().spec_num_drafts == 0
    for k in (2, 4):
        assert_same_greedy(alone(k), reference, max_gap=0.0, max_flips=0)
    stats = llm.engine.stats()
    assert stats.spec_num_accepted_tokens / stats.spec_num_draft_tokens > 0.3
