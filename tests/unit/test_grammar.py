"""specdec/sample/grammar.py: bitmask unpacking against a loop reference, matcher windows and
rollback, forced tokens, compile errors naming the parameter, n-gram drafts cut to the
grammar-valid prefix, and tools.py's grammar and parsers."""

from __future__ import annotations

import json

import pytest
import torch

from server import tools
from specdec.core.request import StructuredOutput
from specdec.sample.grammar import (GrammarCompiler, allowed_token_ids, apply_token_bitmask_,
                                    apply_token_bitmask_reference, limited_rows, new_bitmask,
                                    unpack_bitmask)
from specdec.spec.drafters import NgramDrafter
from specdec.core.request import Request, SamplingParams

SCHEMA = {"type": "object", "properties": {"a": {"enum": ["x", "y"]}, "b": {"type": "boolean"}},
          "required": ["a", "b"], "additionalProperties": False}


@pytest.fixture(scope="module")
def compiler(tiny_tokenizer_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    return GrammarCompiler(tok, 384, [tok.eos_token_id])


@pytest.mark.parametrize("vocab", [1, 31, 32, 33, 100, 384])
def test_apply_bitmask_matches_loop_reference(vocab):
    gen = torch.Generator().manual_seed(vocab)
    words = (vocab + 31) // 32
    bitmask = torch.randint(-2**31, 2**31 - 1, (3, words), generator=gen, dtype=torch.int64
                            ).to(torch.int32)
    bitmask[0] = -1  # every bit set, including the sign bit
    bitmask[1, 0] = -2**31  # only bit 31
    logits = torch.randn(3, vocab, generator=gen)
    want = apply_token_bitmask_reference(logits, bitmask)
    got = apply_token_bitmask_(logits.clone(), bitmask)
    assert torch.equal(got, want)
    allowed = unpack_bitmask(bitmask, vocab)
    assert torch.equal(allowed, ~torch.isneginf(want))


@pytest.mark.parametrize("vocab", [32, 33, 100])
def test_rows_that_allow_everything_are_left_alone(vocab):
    words = (vocab + 31) // 32
    bitmask = torch.full((4, words), -1, dtype=torch.int32)
    if vocab % 32:
        bitmask[:, -1] = (1 << (vocab % 32)) - 1  # bits past the vocabulary clear: still free
    bitmask[2, 0] = 0x7FFFFFFE  # row 2 disallows tokens 0 and 31
    logits = torch.randn(4, vocab)
    assert limited_rows(bitmask, vocab).tolist() == [False, False, True, False]
    got = apply_token_bitmask_(logits.clone(), bitmask)
    assert torch.equal(got, apply_token_bitmask_reference(logits, bitmask))
    assert torch.isneginf(got).sum() == 2
    free = bitmask[[0, 1, 3]]
    assert torch.equal(apply_token_bitmask_(logits[[0, 1, 3]].clone(), free), logits[[0, 1, 3]])


def test_bitmask_narrower_than_vocab_disallows_the_rest():
    bitmask = torch.full((1, 1), -1, dtype=torch.int32)  # 32 tokens
    out = apply_token_bitmask_(torch.zeros(1, 40), bitmask)
    assert torch.isneginf(out[0, 32:]).all() and not torch.isneginf(out[0, :32]).any()


def test_matcher_window_rollback_and_forced_tokens(compiler):
    tok = compiler.tokenizer
    matcher = compiler.matcher(StructuredOutput("json", SCHEMA, "response_format"))
    forced = matcher.forced_tokens(8)
    assert tok.decode(forced) == '{"a": "'[:len(tok.decode(forced))] and forced
    text_ids = tok.encode('{"a": "x", "b": true}')
    assert matcher.validate(text_ids) == len(text_ids)
    bad = tok.encode('{"c": 1}')
    assert matcher.validate(bad) < len(bad)
    bitmask = new_bitmask(len(text_ids) + 1, compiler.vocab_size)
    matcher.fill_window(bitmask, 0, text_ids)
    for j, t in enumerate(text_ids):  # row j allows the draft that follows it
        assert unpack_bitmask(bitmask[j:j + 1], compiler.vocab_size)[0, t]
    # the window was rolled back: the state is the start again
    assert matcher.forced_tokens(8) == forced
    assert matcher.consume(text_ids) and matcher.is_stopped
    last = allowed_token_ids(bitmask[-1], compiler.vocab_size, 4)
    assert last == [tok.eos_token_id]  # complete: only EOS
    assert not matcher.consume([5]) and matcher.error is None  # refused, still usable


@pytest.mark.parametrize("so, param", [
    (StructuredOutput("json", {"type": "foo"}, "response_format.json_schema.schema"),
     "response_format.json_schema.schema"),
    (StructuredOutput("regex", "a(b", "structured_outputs.regex"), "structured_outputs.regex"),
    (StructuredOutput("grammar", "start: nope", "structured_outputs.grammar"),
     "structured_outputs.grammar"),
    (StructuredOutput("choice", [], "structured_outputs.choice"), "structured_outputs.choice"),
])
def test_compile_errors_name_the_parameter(compiler, so, param):
    with pytest.raises(ValueError, match=f"^{param.replace('.', '[.]')} is invalid"):
        compiler.matcher(so)


def test_ngram_drafts_are_cut_to_the_grammar_valid_prefix(compiler):
    tok = compiler.tokenizer
    so = StructuredOutput("json", SCHEMA)
    matcher = compiler.matcher(so)
    # The prompt repeats '{"a": "x", "c"': the n-gram continuation after '{"a": "x", ' is '"c"'.
    prompt = tok.encode('{"a": "x", "c" {"a": "x", ')
    req = Request("r", prompt, SamplingParams())
    out = tok.encode('{"a": "x", ')
    assert matcher.consume(out)
    req.output_token_ids = list(out)
    drafter = NgramDrafter(1, 4)
    free = drafter.propose([(req, 6)])[0].draft_token_ids
    cut = drafter.propose([(req, 6)], [matcher])[0].draft_token_ids
    assert free and len(cut) < len(free) and free[:len(cut)] == cut
    assert matcher.validate(free) == len(cut)
    assert matcher.validate(cut) == len(cut)


def test_tool_grammar_and_parsers(compiler):
    config = tools.parse_tools({"tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"x": {"enum": [1, 2]}},
                                    "required": ["x"], "additionalProperties": False}}}],
        "tool_choice": "required", "parallel_tool_calls": False})
    so = tools.call_grammar(config, special_tags=False)
    matcher = compiler.matcher(so)
    tok = compiler.tokenizer
    text = '<tool_call>\n{"name": "f", "arguments": {"x": 2}}\n</tool_call>'
    ids = tok.encode(text)
    assert matcher.validate(ids) == len(ids)
    assert matcher.consume(ids) and matcher.is_stopped  # one call only
    content, calls = tools.parse_calls("Sure. " + text)
    assert content == "Sure."
    assert calls[0]["function"] == {"name": "f", "arguments": '{"x": 2}'}
    # streaming: fed in small pieces, fragments concatenate to the same arguments
    stream = tools.ToolCallStream()
    pieces, content_out = [], ""
    full = "Sure. " + text + "\n" + text.replace("2", "1")
    for i in range(0, len(full), 3):
        c, calls_delta = stream.feed(full[i:i + 3], i + 3 >= len(full))
        content_out += c
        pieces += calls_delta
    assert content_out.rstrip() == "Sure."  # streamed before the tag was seen
    args = {}
    for p in pieces:
        args[p["index"]] = args.get(p["index"], "") + p["function"].get("arguments", "")
    assert [json.loads(a) for a in args.values()] == [{"x": 2}, {"x": 1}]
    assert [p["function"]["name"] for p in pieces if "id" in p] == ["f", "f"]
