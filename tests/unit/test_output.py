"""Incremental detokenization with real tokenizers built offline (byte-level BPE like Qwen2 /
SmolLM2, and a sentencepiece-style BPE with byte fallback like Llama 2), plus the SmolLM2 and
Qwen2.5 tokenizers themselves (fetched once, as every real-model test fetches its model)."""

import json
import random

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from specdec.core.detokenizer import IncrementalDetokenizer

CORPUS = ["Hello world! The quick brown fox jumps over the lazy dog.",
          "你好，世界。今天天气很好。我们去公园散步吧。",
          "Emoji party 🎉🎉 with 👍 and 🚀 rockets!",
          "STOP here. The end.", "naïve café déjà vu"] * 3
TEXT = "Hello 你好世界! The quick brown fox 🎉 jumps 🚀 over the lazy dog. 天气很好 👍 END"
PROMPT = "Say something: 公园 "


def byte_level_bpe():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def sentencepiece_style_bpe():
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                           normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"] + byte_tokens, limit_alphabet=40))
    # NOTE: byte tokens are ordinary vocabulary in Llama-style tokenizers, not special tokens
    # (skip_special_tokens must keep them).
    data = json.loads(tok.to_str())
    for added in data["added_tokens"]:
        added["special"] = added["content"] not in byte_tokens
    tok = Tokenizer.from_str(json.dumps(data))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def fetched(name: str):
    """A real model's tokenizer, the model fetched into the model cache first if absent."""
    from specdec.fetch import resolve_model_path
    return AutoTokenizer.from_pretrained(resolve_model_path(name))


# NOTE: the real tokenizers are always cases. They were once added only where their files
# already were at collection time, so on a fresh machine (CI: the models are fetched by later
# tests) their cases, 10 each, silently did not exist.
TOKENIZERS = {"byte_level": byte_level_bpe, "sentencepiece": sentencepiece_style_bpe,
              "smollm2-135m-instruct": lambda: fetched("smollm2-135m-instruct"),
              "qwen2.5-coder-0.5b-instruct": lambda: fetched("qwen2.5-coder-0.5b-instruct")}
_CACHE = {}


@pytest.fixture(params=sorted(TOKENIZERS))
def tokenizer(request):
    if request.param not in _CACHE:
        _CACHE[request.param] = TOKENIZERS[request.param]()
    return _CACHE[request.param]


@pytest.fixture
def byte_tok():
    if "byte_level" not in _CACHE:
        _CACHE["byte_level"] = byte_level_bpe()
    return _CACHE["byte_level"]


def encode(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def expected_text(tokenizer, prompt_ids, output_ids):
    """What a full decode gives for the output, in the context of the prompt."""
    return (tokenizer.decode(prompt_ids + output_ids)[len(tokenizer.decode(prompt_ids)):]
            if prompt_ids else tokenizer.decode(output_ids))


def stream(detok, output_ids, chunks):
    deltas, used = [], 0
    pos = 0
    for size in chunks:
        delta = detok.add_tokens(output_ids[pos:pos + size])
        deltas.append(delta.text_delta)
        used += delta.num_tokens_used
        pos += size
        if delta.stop_string is not None:
            break
    return deltas, used


def random_chunks(n, rng):
    chunks = []
    while sum(chunks) < n:
        chunks.append(rng.randint(1, 4))
    return chunks


def test_emoji_and_cjk_deltas_concatenate_to_the_full_decode(tokenizer):
    prompt_ids, output_ids = encode(tokenizer, PROMPT), encode(tokenizer, TEXT)
    # the test means something only if some characters span several tokens
    assert any("\ufffd" in tokenizer.decode([t]) for t in output_ids)
    rng = random.Random(0)
    for chunks in ([1] * len(output_ids), random_chunks(len(output_ids), rng), [len(output_ids)]):
        detok = IncrementalDetokenizer(tokenizer, prompt_ids)
        deltas, used = stream(detok, output_ids, chunks)
        deltas.append(detok.flush())
        assert all("\ufffd" not in d for d in deltas)
        assert "".join(deltas) == detok.text == expected_text(tokenizer, prompt_ids, output_ids)
        assert detok.text.endswith("lazy dog. 天气很好 👍 END")
        assert used == len(output_ids)


def test_without_a_prompt(tokenizer):
    output_ids = encode(tokenizer, TEXT)
    detok = IncrementalDetokenizer(tokenizer, [])
    text = "".join(detok.add_tokens([t]).text_delta for t in output_ids) + detok.flush()
    assert text == tokenizer.decode(output_ids)


def first_tokens_containing(tokenizer, prompt_ids, output_ids, s):
    for n in range(1, len(output_ids) + 1):
        if s in expected_text(tokenizer, prompt_ids, output_ids[:n]):
            return n
    raise AssertionError(f"{s!r} not in the text")


@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize("stop", ["brown fox", "🎉 jumps", "世界!", "y dog"])
def test_stop_string_across_token_boundaries(tokenizer, stop, include):
    prompt_ids, output_ids = encode(tokenizer, PROMPT), encode(tokenizer, TEXT)
    n_stop = first_tokens_containing(tokenizer, prompt_ids, output_ids, stop)
    full = expected_text(tokenizer, prompt_ids, output_ids)
    cut = full.index(stop) + (len(stop) if include else 0)
    for chunks in ([1] * len(output_ids), random_chunks(len(output_ids), random.Random(1)),
                   [len(output_ids)]):
        detok = IncrementalDetokenizer(tokenizer, prompt_ids, stop=["never", stop],
                                       include_stop_str_in_output=include)
        deltas, used = stream(detok, output_ids, chunks)
        assert detok.stop_string == stop
        assert used == n_stop
        assert "".join(deltas) == detok.text == full[:cut]
        assert detok.flush() == ""
        later = detok.add_tokens(output_ids[:2])
        assert (later.text_delta, later.num_tokens_used) == ("", 0)


def test_a_possible_stop_prefix_is_held_back_until_decided(byte_tok):
    output_ids = encode(byte_tok, "the quick brown fox")
    detok = IncrementalDetokenizer(byte_tok, [], stop=["fox!", "quick brown cat"])
    emitted = "".join(detok.add_tokens([t]).text_delta for t in output_ids)
    assert emitted == "the quick brown "  # "fox" could still become "fox!"
    assert detok.text == "the quick brown fox"
    assert detok.flush() == "fox"
    # a prefix that turns out not to be a stop string is released by the next token
    detok = IncrementalDetokenizer(byte_tok, [], stop=["quick brown cat"])
    deltas = [detok.add_tokens([t]).text_delta for t in output_ids]
    assert "".join(deltas) == "the quick brown fox"


def test_stop_string_inside_the_first_token(byte_tok):
    output_ids = encode(byte_tok, "Hello world!")
    first = byte_tok.decode(output_ids[:1])
    assert len(first) >= 2
    detok = IncrementalDetokenizer(byte_tok, [], stop=[first[1:]])
    delta = detok.add_tokens(output_ids)
    assert (delta.text_delta, delta.stop_string, delta.num_tokens_used) == (first[:1], first[1:], 1)
    detok = IncrementalDetokenizer(byte_tok, [], stop=[first[:2]])
    delta = detok.add_tokens(output_ids)
    assert (delta.text_delta, delta.num_tokens_used, detok.text) == ("", 1, "")


def test_the_earliest_completed_stop_string_wins(byte_tok):
    output_ids = encode(byte_tok, "The quick brown fox jumps")
    detok = IncrementalDetokenizer(byte_tok, [], stop=["jumps", "brown", "quick brown"])
    delta = detok.add_tokens(output_ids)
    # "brown" and "quick brown" complete with the same characters; the earlier start wins
    assert (detok.text, delta.stop_string) == ("The ", "quick brown")


def test_skip_special_tokens(byte_tok):
    eos = byte_tok.eos_token_id
    output_ids = encode(byte_tok, "Hello") + [eos] + encode(byte_tok, " world")
    for skip, expected in ((True, "Hello world"), (False, "Hello<|endoftext|> world")):
        detok = IncrementalDetokenizer(byte_tok, [], skip_special_tokens=skip)
        text = "".join(detok.add_tokens([t]).text_delta for t in output_ids) + detok.flush()
        assert text == detok.text == expected


def test_unfinished_character_is_released_at_flush(byte_tok):
    emoji_ids = encode(byte_tok, "ok 🚀")
    partial = emoji_ids[:-1]
    assert byte_tok.decode(partial).endswith("\ufffd")
    detok = IncrementalDetokenizer(byte_tok, [])
    emitted = detok.add_tokens(partial).text_delta
    assert emitted in ("ok", "ok ")  # the space may share a token with the emoji's first byte
    rest = detok.flush()
    assert rest.endswith("\ufffd") and emitted + rest == detok.text == byte_tok.decode(partial)


def test_stop_strings_are_validated(byte_tok):
    with pytest.raises(ValueError, match="stop must be a list of non-empty strings"):
        IncrementalDetokenizer(byte_tok, [], stop=[""])


@pytest.mark.parametrize("seed", range(3))
def test_random_stop_strings_match_a_plain_search(byte_tok, seed):
    rng = random.Random(seed)
    output_ids = encode(byte_tok, TEXT)
    full = byte_tok.decode(output_ids)
    for _ in range(30):
        start = rng.randrange(len(full) - 1)
        stop = full[start:start + rng.randint(1, 6)]
        include = rng.random() < 0.5
        detok = IncrementalDetokenizer(byte_tok, [], stop=[stop],
                                       include_stop_str_in_output=include)
        deltas, _ = stream(detok, output_ids, random_chunks(len(output_ids), rng))
        deltas.append(detok.flush())
        cut = full.index(stop) + (len(stop) if include else 0)
        assert "".join(deltas) == detok.text == full[:cut]
        assert all("\ufffd" not in d for d in deltas)


def _held_back_reference(text: str, stops: list[str]) -> int:
    """Plain reference: the longest suffix of text that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for n in range(1, min(len(s) - 1, len(text)) + 1):
            if text.endswith(s[:n]):
                best = max(best, n)
    return best


def test_held_back_matches_reference_and_reads_only_the_tail():
    rng = random.Random(5)
    detok = IncrementalDetokenizer(byte_level_bpe(), [], stop=["x"])
    for _ in range(3000):
        stops = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 9)))
                 for _ in range(rng.randint(1, 4))]
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 30)))
        detok.stop = stops
        detok._max_stop_len = max(map(len, stops))
        detok._text = text
        assert detok._num_held_back() == _held_back_reference(text, stops), (text, stops)

    class WholeText(str):
        """A long text that may only be read through one slice of its tail."""

        reads: list[int] = []

        def __getitem__(self, key):
            piece = str.__getitem__(self, key)
            WholeText.reads.append(len(piece))
            return piece

        def _refuse(self, *args):
            raise AssertionError("the hold-back scanned the whole text")

        endswith = find = rfind = startswith = __contains__ = _refuse

    detok.stop, detok._max_stop_len = ["a" * 50 + "b", "ab"], 51
    detok._text = WholeText("a" * 100_000)
    assert detok._num_held_back() == 50
    assert WholeText.reads == [50]


def test_min_tokens_defers_stop_strings():
    tokenizer = byte_level_bpe()
    ids = tokenizer("Hello world! The quick brown fox", add_special_tokens=False).input_ids
    plain = IncrementalDetokenizer(tokenizer, [], stop=["o"])
    assert plain.add_tokens(ids).stop_string == "o"
    # The "o"s all lie in the first min_tokens tokens: no stop, and nothing is cut.
    detok = IncrementalDetokenizer(tokenizer, [], stop=["o"], min_tokens=len(ids))
    delta = detok.add_tokens(ids)
    assert delta.stop_string is None and delta.num_tokens_used == len(ids)
    assert delta.text_delta + detok.flush() == tokenizer.decode(ids)
    # Past min_tokens the next "o" stops the request.
    more = tokenizer(" jumps over", add_special_tokens=False).input_ids
    later = detok.add_tokens(more)
    assert later.stop_string == "o" and detok.text == tokenizer.decode(ids) + " jumps "
