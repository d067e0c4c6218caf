"""Structured outputs on real models: SmolLM2-135M (JSON Schema and tool calls, greedy equal
with and without speculation, sampled outputs valid) and the Qwen2.5 tokenizer, whose
<tool_call> tags are added tokens the grammar must name."""

from __future__ import annotations

import json

import jsonschema
import pytest

from server import tools
from specdec import LLM, SamplingParams
from specdec.core.config import Config
from specdec.core.request import StructuredOutput

pytestmark = pytest.mark.slow

PERSON = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 40},
                         "age": {"type": "integer", "minimum": 0, "maximum": 150},
                         "city": {"type": "string", "maxLength": 40}},
          "required": ["name", "age", "city"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object",
                   "properties": {"city": {"type": "string", "maxLength": 40},
                                  "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
PROMPTS = ["Extract the person as JSON: Maria Lopez, 34, lives in Valencia.",
           "Extract the person as JSON: Kenji Watanabe is 41 and lives in Osaka."]


def chat_ids(llm: LLM, text: str, tool_list=None) -> list[int]:
    tok = llm.engine.tokenizer
    rendered = tok.apply_chat_template([{"role": "user", "content": text}], tools=tool_list,
                                       tokenize=False, add_generation_prompt=True)
    return tok.encode(rendered, add_special_tokens=False)


def make(path: str, **kw) -> LLM:
    base = {"model.path": path, "device.device": "cpu", "model.max_model_len": 1024}
    base.update(kw)
    return LLM(Config().replace(**base))


def test_smollm2_json_and_tool_calls_exact_under_speculation(smollm2_dir):
    plain = make(smollm2_dir)
    ngram = make(smollm2_dir, **{"spec.method": "ngram", "spec.num_speculative_tokens": 4,
                                 "spec.adaptive": False})
    selfdraft = make(smollm2_dir, **{"spec.method": "draft", "spec.draft_model": smollm2_dir,
                                     "spec.num_speculative_tokens": 3, "spec.adaptive": False})
    so = StructuredOutput("json", PERSON, "response_format")
    batch = [{"prompt_token_ids": chat_ids(plain, p)} for p in PROMPTS]
    greedy = SamplingParams(temperature=0.0, max_tokens=96, structured_output=so)
    want = plain.generate(batch, greedy)
    for llm in (ngram, selfdraft):
        got = llm.generate(batch, greedy)
        assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
        assert llm.engine.stats().spec_num_forced_tokens > 0
    sampled = selfdraft.generate(batch, SamplingParams(temperature=0.8, seed=1,
                                                       max_tokens=96, structured_output=so))
    for o in want + sampled:
        for c in o.outputs:
            assert c.finish_reason == "stop", c.text
            jsonschema.validate(json.loads(c.text), PERSON)
    # A required tool call, from the first token.
    config = tools.parse_tools({"tools": [WEATHER], "tool_choice": "required",
                                "parallel_tool_calls": False})
    call = tools.call_grammar(config, tools.uses_special_tags(plain.engine.tokenizer))
    ids = chat_ids(plain, "What is the weather in Paris?", [WEATHER])
    for llm in (plain, ngram):
        (out,) = llm.generate([{"prompt_token_ids": ids}],
                              SamplingParams(temperature=0.0, max_tokens=96,
                                             structured_output=call))
        content, calls = tools.parse_calls(out.outputs[0].text)
        assert content is None and len(calls) == 1, out.outputs[0].text
        assert calls[0]["function"]["name"] == "get_weather"
        jsonschema.validate(json.loads(calls[0]["function"]["arguments"]),
                            WEATHER["function"]["parameters"])


def test_qwen_tool_grammar_names_its_added_tag_tokens(qwen_pair_dirs):
    """Tokenizer only (no weights): Qwen2.5's <tool_call> / </tool_call> are added tokens, so
    the grammar must name them; a call in the chat template's format passes, in both modes.

    NOTE: run once with the 0.5B model and tool_choice "auto", Qwen2.5-Coder answered in a
    ```json block instead of opening <tool_call> (allowed under auto, which leaves text free);
    "required" is the reliable route for this model."""
    from transformers import AutoTokenizer

    from specdec.sample.grammar import GrammarCompiler
    draft_dir, _ = qwen_pair_dirs
    tok = AutoTokenizer.from_pretrained(draft_dir)
    assert tools.uses_special_tags(tok)
    compiler = GrammarCompiler(tok, 151936, [151645, 151643])
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", ' \
           '"unit": "celsius"}}\n</tool_call>'
    ids = tok.encode(call, add_special_tokens=False)
    assert ids[0] == tok.convert_tokens_to_ids("<tool_call>")
    for choice in ("required", "auto"):
        config = tools.parse_tools({"tools": [WEATHER], "tool_choice": choice,
                                    "parallel_tool_calls": False})
        prefix = tok.encode("Let me check. ", add_special_tokens=False) if choice == "auto" \
            else []
        matcher = compiler.matcher(tools.call_grammar(config, special_tags=True))
        assert matcher.consume(prefix + ids) and matcher.is_stopped, choice
        wrong = tok.encode(call.replace("Paris", "Paris\""), add_special_tokens=False)
        fresh = compiler.matcher(tools.call_grammar(config, special_tags=True))
        assert fresh.validate(prefix + wrong) < len(prefix + wrong)
    # the body in the gap between the tags is constrained in auto mode too
    config = tools.parse_tools({"tools": [WEATHER], "tool_choice": "auto"})
    matcher = compiler.matcher(tools.call_grammar(config, special_tags=True))
    opened = tok.encode("Sure <tool_call>\nhello", add_special_tokens=False)
    assert matcher.validate(opened) == len(opened) - 1
