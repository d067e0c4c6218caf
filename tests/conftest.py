"""Shared test fixtures: an offline tiny tokenizer, tiny random Llama / Qwen2 / draft models
saved as Hugging Face directories, the real fetched models, and a paged-batch builder.

Helpers importable by tests: `make_tiny_config`, `build_tiny_tokenizer`, `save_tiny_model`,
`PagedSequences` (block tables over a shuffled block pool -> ForwardBatch).
"""

from __future__ import annotations

import random

import pytest

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_VOCAB_SIZE = 384

_TRAIN_TEXT = """
The quick brown fox jumps over the lazy dog. A paged key value cache stores attention keys
and values in fixed size blocks. Speculative decoding lets a small draft model propose tokens
that a large target model verifies in one forward pass. Hello world! How are you today?
def add(a, b):
    return a + b
for i in range(10):
    print(i, i * i)
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Once upon a time there was a little server that
answered every request quickly and never dropped a token. The end.
"""


def make_tiny_config(kind: str = "llama", **overrides):
    """A tiny transformers config. kind: "llama" (llama3 rope scaling, untied), "qwen2"
    (q/k/v bias, tied), "draft" (smaller llama, tied), "mistral"."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=TINY_VOCAB_SIZE, max_position_embeddings=512, rms_norm_eps=1e-5,
                  initializer_range=0.1, bos_token_id=None, eos_token_id=2, pad_token_id=0)
    if kind == "llama":
        kw = dict(common, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  tie_word_embeddings=False,
                  rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0,
                                   "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 64})
        kw.update(overrides)
        return LlamaConfig(**kw)
    if kind == "qwen2":
        kw = dict(common, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
        kw.update(overrides)
        return Qwen2Config(**kw)
    if kind == "draft":
        kw = dict(common, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
        kw.update(overrides)
        return LlamaConfig(**kw)
    if kind == "mistral":
        kw = dict(common, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                  tie_word_embeddings=False, sliding_window=None)
        kw.update(overrides)
        return MistralConfig(**kw)
    raise ValueError(f"kind must be llama, qwen2, draft or mistral, got {kind!r}")


def build_tiny_tokenizer(out_dir: str) -> str:
    """Train a byte-level BPE (vocab TINY_VOCAB_SIZE) offline and save it as a transformers
    PreTrainedTokenizerFast with a ChatML chat template; eos = <|im_end|> (id 2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB_SIZE, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([_TRAIN_TEXT] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return out_dir


def save_tiny_model(out_dir: str, config, seed: int = 0) -> str:
    """A seeded random transformers model (fp32), norms and biases perturbed too, saved with
    the tiny tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            elif name.endswith(".bias"):
                param.copy_(0.1 * torch.randn_like(param))
    model.save_pretrained(out_dir)
    build_tiny_tokenizer(out_dir)
    return out_dir


class PagedSequences:
    """Test helper: sequences over a paged cache whose blocks come from a shuffled pool, so
    block tables are non-contiguous. `batch()` appends windows and builds a ForwardBatch."""

    def __init__(self, num_blocks: int, block_size: int, seed: int = 0) -> None:
        self.block_size = block_size
        self.free = list(range(num_blocks))
        random.Random(seed).shuffle(self.free)
        self.block_ids: dict[object, list[int]] = {}
        self.lens: dict[object, int] = {}

    def batch(self, windows: list[tuple[object, list[int]]], logits_rows: str = "all",
              device: str = "cpu"):
        """windows: (seq_id, new token ids) per sequence. logits_rows: "all" or "last"."""
        import torch

        from specdec.model.llama import ForwardBatch

        input_ids, positions, slots, query_lens, seq_lens, tables, logits = [], [], [], [], [], [], []
        for seq_id, tokens in windows:
            start = self.lens.get(seq_id, 0)
            end = start + len(tokens)
            blocks = self.block_ids.setdefault(seq_id, [])
            while len(blocks) * self.block_size < end:
                blocks.append(self.free.pop())
            for pos, token in enumerate(tokens, start):
                input_ids.append(token)
                positions.append(pos)
                slots.append(blocks[pos // self.block_size] * self.block_size
                             + pos % self.block_size)
            first_row = len(input_ids) - len(tokens)
            logits += (list(range(first_row, len(input_ids))) if logits_rows == "all"
                       else [len(input_ids) - 1])
            self.lens[seq_id] = end
            query_lens.append(len(tokens))
            seq_lens.append(end)
            tables.append(list(blocks))
        width = max(len(t) for t in tables)
        tables = [t + [0] * (width - len(t)) for t in tables]
        qsl = [0]
        for n in query_lens:
            qsl.append(qsl[-1] + n)
        i32, i64 = torch.int32, torch.int64
        return ForwardBatch(
            input_ids=torch.tensor(input_ids, dtype=i64, device=device),
            positions=torch.tensor(positions, dtype=i64, device=device),
            slot_mapping=torch.tensor(slots, dtype=i64, device=device),
            block_tables=torch.tensor(tables, dtype=i32, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=i32, device=device),
            query_start_loc=torch.tensor(qsl, dtype=i32, device=device),
            logits_indices=torch.tensor(logits, dtype=i64, device=device),
            query_lens=query_lens, seq_lens_list=seq_lens)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> str:
    return build_tiny_tokenizer(str(tmp_path_factory.mktemp("tiny_tokenizer")))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> str:
    return save_tiny_model(str(tmp_path_factory.mktemp("tiny_llama")),
                           make_tiny_config("llama"), seed=0)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory) -> str:
    return save_tiny_model(str(tmp_path_factory.mktemp("tiny_qwen2")),
                           make_tiny_config("qwen2"), seed=1)


@pytest.fixture(scope="session")
def tiny_draft_dir(tmp_path_factory) -> str:
    return save_tiny_model(str(tmp_path_factory.mktemp("tiny_draft")),
                           make_tiny_config("draft"), seed=2)


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    """The real SmolLM2-135M-Instruct (fetched once into the model cache)."""
    from specdec.fetch import resolve_model_path
    return resolve_model_path("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def qwen_pair_dirs() -> tuple[str, str]:
    """(draft, target) = Qwen2.5-Coder 0.5B / 1.5B Instruct, fetched once."""
    from specdec.fetch import resolve_model_path
    return (resolve_model_path("qwen2.5-coder-0.5b-instruct"),
            resolve_model_path("qwen2.5-coder-1.5b-instruct"))



@pytest.fixture(scope="session", autouse=True)
def _isolated_calibration_cache(tmp_path_factory):
    """Engines built by tests save their adaptive calibration here, not in ~/.cache."""
    import os

    old = os.environ.get("SPECDEC_CACHE_DIR")
    os.environ["SPECDEC_CACHE_DIR"] = str(tmp_path_factory.mktemp("specdec_cache"))
    yield
    if old is None:
        os.environ.pop("SPECDEC_CACHE_DIR", None)
    else:
        os.environ["SPECDEC_CACHE_DIR"] = old
