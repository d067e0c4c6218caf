"""Structured outputs in the engine, exact under speculation (tiny fp32 models):

- greedy output under a grammar is token-for-token the same with and without speculation
  (draft model, n-gram, and a drafter that proposes illegal tokens), and validates;
- illegal drafts never reach verification, so they are never accepted;
- the constrained sampled distribution matches the exact masked target distribution
  (enumerated with transformers) with and without speculation (chi-square);
- structured and unstructured requests share a batch; preemption keeps matchers valid;
- a grammar that cannot advance finishes only its request, with finish_reason "error";
- min_tokens against a grammar that allows only EOS: the grammar wins.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random

import jsonschema
import pytest
import torch

from server import tools
from specdec import LLM, SamplingParams
from specdec.core.config import Config
from specdec.core.request import StructuredOutput
from specdec.spec.drafters import Proposal
from tests.stats import chi_square_pvalue

SCHEMA = {"type": "object",
          "properties": {"ok": {"type": "boolean"},
                         "n": {"type": "integer", "minimum": 0, "maximum": 999},
                         "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]},
                                  "maxItems": 3},
                         "colour": {"enum": ["red", "green", "blue"]}},
          "required": ["ok", "n", "colour"], "additionalProperties": False}
TOOL_CONFIG = tools.parse_tools({"tools": [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]},
                                         "days": {"type": "integer", "minimum": 1,
                                                  "maximum": 7}},
        "required": ["city", "days"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"utc": {"type": "boolean"}}, "required": ["utc"],
        "additionalProperties": False}}}],
    "tool_choice": "required", "parallel_tool_calls": False})
GRAMMARS = {
    "json": StructuredOutput("json", SCHEMA, "response_format"),
    "regex": StructuredOutput("regex", r"(ab|cd)[0-9]{2,4}!", "structured_outputs.regex"),
    "tools": tools.call_grammar(TOOL_CONFIG, special_tags=False),
}


def make_llm(target: str, **overrides) -> LLM:
    base = {"model.path": target, "device.device": "cpu", "model.max_model_len": 512}
    base.update(overrides)
    return LLM(Config().replace(**base))


def spec_kw(method: str, draft: str | None = None, k: int = 4) -> dict:
    kw = {"spec.method": method, "spec.num_speculative_tokens": k, "spec.adaptive": False}
    if draft:
        kw["spec.draft_model"] = draft
    return kw


def prompts(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(3, 384) for _ in range(rng.randint(4, 40))]}
            for _ in range(n)]


def check_valid(kind: str, text: str) -> None:
    if kind == "json":
        jsonschema.validate(json.loads(text), SCHEMA)
    elif kind == "regex":
        import re
        assert re.fullmatch(r"(ab|cd)[0-9]{2,4}!", text), text
    else:
        content, calls = tools.parse_calls(text)
        assert content is None and len(calls) == 1, text
        fn = calls[0]["function"]
        params = TOOL_CONFIG.parameters[fn["name"]]
        jsonschema.validate(json.loads(fn["arguments"]), params)


class IllegalDrafter:
    """Proposes k random token ids whatever the grammar says (one-hot drafts)."""

    has_model = False

    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def propose(self, requests, matchers=None):
        return [Proposal([self.rng.randrange(384) for _ in range(k)], None) for _, k in requests]


def spy_verified_drafts(llm: LLM) -> list[tuple[str, list[int], list[int]]]:
    """Record (request id, verified output, drafts) of every window sent to verification."""
    seen = []
    engine = llm.engine
    original = engine._accept

    def accept(sampled, logits, errors):
        for req, drafts, _ in sampled:
            seen.append((req.request_id, list(req.output_token_ids), list(drafts)))
        return original(sampled, logits, errors)
    engine._accept = accept
    return seen


@pytest.fixture(scope="module")
def reference(tiny_llama_dir):
    return make_llm(tiny_llama_dir)


@pytest.mark.parametrize("kind", sorted(GRAMMARS))
def test_greedy_under_a_grammar_is_the_same_with_and_without_speculation(
        tiny_llama_dir, tiny_draft_dir, reference, kind):
    params = SamplingParams(temperature=0.0, max_tokens=120, structured_output=GRAMMARS[kind])
    batch = prompts(4, seed=len(kind))
    want = reference.generate(batch, params)
    for o in want:
        assert o.outputs[0].finish_reason == "stop"
        check_valid(kind, o.outputs[0].text)
    for kw in (spec_kw("draft", tiny_draft_dir, 3), spec_kw("ngram", k=4)):
        llm = make_llm(tiny_llama_dir, **kw)
        got = llm.generate(batch, params)
        assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
        assert llm.engine.stats().spec_num_forced_tokens > 0
        forced = sum(o.metrics.num_forced_tokens for o in got)
        accepted = sum(o.metrics.num_accepted_tokens for o in got)
        assert 0 < forced <= accepted
    assert reference.engine.stats().spec_num_forced_tokens == 0


def test_illegal_drafts_are_cut_and_never_accepted(tiny_llama_dir, reference):
    llm = make_llm(tiny_llama_dir, **spec_kw("ngram", k=4))
    llm.engine.drafter = IllegalDrafter(seed=3)
    seen = spy_verified_drafts(llm)
    so = GRAMMARS["json"]
    batch = prompts(3, seed=11)
    greedy = SamplingParams(temperature=0.0, max_tokens=120, structured_output=so)
    got = llm.generate(batch, greedy)
    want = reference.generate(batch, greedy)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    sampled = llm.generate(batch, SamplingParams(temperature=1.0, seed=5, max_tokens=120,
                                                 structured_output=so))
    for o in sampled:
        assert o.outputs[0].finish_reason == "stop"
        check_valid("json", o.outputs[0].text)
    # Replay every verify window: its drafts were grammar-valid after the verified output.
    compiler = llm.engine.grammar_compiler
    assert any(drafts for _, _, drafts in seen)
    for _, output, drafts in seen:
        matcher = compiler.matcher(so)
        assert matcher.consume(output)
        assert matcher.validate(drafts) == len(drafts)


def test_sampled_outputs_validate_with_a_draft_model(tiny_llama_dir, tiny_draft_dir):
    llm = make_llm(tiny_llama_dir, **spec_kw("draft", tiny_draft_dir, 4))
    for kind, so in GRAMMARS.items():
        params = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=160, seed=9, n=3,
                                structured_output=so)
        for o in llm.generate(prompts(2, seed=5), params):
            for c in o.outputs:
                assert c.finish_reason == "stop", (kind, c.text)
                check_valid(kind, c.text)


def test_mixed_structured_and_unstructured_batch(tiny_llama_dir, tiny_draft_dir, reference):
    free = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    structured = SamplingParams(temperature=0.0, max_tokens=120,
                                structured_output=GRAMMARS["json"])
    batch = prompts(6, seed=21)
    params = [free if i % 2 else structured for i in range(6)]
    llm = make_llm(tiny_llama_dir, **spec_kw("draft", tiny_draft_dir, 3))
    mixed = llm.generate(batch, params)
    alone_free = reference.generate(batch[1::2], free)
    alone_structured = reference.generate(batch[0::2], structured)
    assert [o.outputs[0].token_ids for o in mixed[1::2]] == \
        [o.outputs[0].token_ids for o in alone_free]
    assert [o.outputs[0].token_ids for o in mixed[0::2]] == \
        [o.outputs[0].token_ids for o in alone_structured]
    for o in mixed[0::2]:
        check_valid("json", o.outputs[0].text)


def test_preemption_keeps_matchers_valid(tiny_llama_dir, tiny_draft_dir, reference):
    params = SamplingParams(temperature=0.0, max_tokens=120, structured_output=GRAMMARS["tools"])
    batch = prompts(6, seed=31)
    want = reference.generate(batch, params)
    llm = make_llm(tiny_llama_dir, **spec_kw("draft", tiny_draft_dir, 3),
                   **{"cache.num_blocks": 21, "cache.block_size": 8})
    got = llm.generate(batch, params)
    assert llm.engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    for o in got:
        check_valid("tools", o.outputs[0].text)


def test_a_grammar_that_cannot_advance_finishes_only_its_request(tiny_llama_dir):
    llm = make_llm(tiny_llama_dir, **spec_kw("ngram", k=3))
    engine = llm.engine
    so = GRAMMARS["json"]
    engine.add_request("bad", [5, 6, 7], SamplingParams(temperature=0.0, max_tokens=64,
                                                        structured_output=so))
    engine.add_request("good", [5, 6, 7], SamplingParams(temperature=0.0, max_tokens=64,
                                                         structured_output=so))
    engine.add_request("free", [8, 9], SamplingParams(temperature=0.0, max_tokens=8,
                                                      ignore_eos=True))
    # Poison one matcher: llguidance enters its error state on a token it cannot take.
    engine.tracked["bad"].matcher._matcher.consume_token(engine.tokenizer.encode("]")[0])
    assert engine.tracked["bad"].matcher.error is not None
    finals = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out.outputs[0]
    assert finals["bad"].finish_reason == "error"
    assert "structured output" in finals["bad"].stop_reason
    assert finals["good"].finish_reason == "stop"
    check_valid("json", finals["good"].text)
    assert finals["free"].finish_reason == "length" and len(finals["free"].token_ids) == 8
    pool = engine.scheduler.block_pool
    assert pool.num_free_blocks == engine.num_blocks - 1 or pool.usage == 0.0


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_min_tokens_yields_to_a_grammar_that_allows_only_eos(tiny_llama_dir, tiny_draft_dir,
                                                             method):
    llm = make_llm(tiny_llama_dir, **spec_kw(method, tiny_draft_dir if method == "draft"
                                             else None, k=3))
    so = StructuredOutput("regex", "ab[0-9]?", "structured_outputs.regex")
    out = llm.generate(prompts(2, seed=41), SamplingParams(temperature=1.0, seed=3, max_tokens=32,
                                                           min_tokens=20, structured_output=so))
    for o in out:
        assert o.outputs[0].finish_reason == "stop"
        assert o.outputs[0].text in ["ab"] + [f"ab{d}" for d in range(10)]
        assert len(o.outputs[0].token_ids) < 20


class CountingMatcher:
    """Wraps a GrammarMatcher and counts the tokens it has net advanced by."""

    def __init__(self, inner):
        self.inner, self.advanced = inner, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def consume(self, token_ids):
        ok = self.inner.consume(token_ids)
        self.advanced += len(token_ids) if ok else 0
        return ok

    def rollback(self, num_tokens):
        self.inner.rollback(num_tokens)
        self.advanced -= num_tokens


def test_the_grammar_advances_only_by_the_tokens_left_after_a_stop_string(tiny_llama_dir):
    # The choice is forced token by token, so one verify window carries the stop string and
    # the tokens after it; the matcher must end where the output ends.
    llm = make_llm(tiny_llama_dir, **spec_kw("ngram", k=8))
    engine = llm.engine
    so = StructuredOutput("choice", ["alpha beta gamma delta epsilon"], "structured_outputs.choice")
    engine.add_request("r", [5, 6, 7], SamplingParams(temperature=0.0, max_tokens=32,
                                                      stop=["gamma"], structured_output=so))
    spy = CountingMatcher(engine.tracked["r"].matcher)
    engine.tracked["r"].matcher = spy
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final = out.outputs[0]
    assert final.finish_reason == "stop" and final.stop_reason == "gamma"
    assert final.text == "alpha beta "
    assert engine.stats().spec_num_forced_tokens > 0
    assert spy.advanced == len(final.token_ids)


def test_forced_tokens_are_drafted_even_when_the_controller_picks_k_0(tiny_llama_dir,
                                                                      tiny_draft_dir,
                                                                      reference):
    llm = make_llm(tiny_llama_dir, **spec_kw("draft", tiny_draft_dir, 4))
    engine = llm.engine
    choose = engine.controller.choose

    def choose_zero(decodes):
        choose(decodes)
        for req in decodes:
            req.num_lookahead_tokens = 0
    engine.controller.choose = choose_zero
    observed = []
    engine.controller.observe = lambda *a: observed.append(a)
    params = SamplingParams(temperature=0.0, max_tokens=120, structured_output=GRAMMARS["json"])
    batch = prompts(2, seed=51)
    got = llm.generate(batch, params)
    want = reference.generate(batch, params)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    stats = engine.stats()
    # every draft was a forced one, and forced drafts do not move the drafter's alpha
    assert stats.spec_num_forced_tokens == stats.spec_num_draft_tokens > 0
    assert all(o.metrics.num_drafts > 0 for o in got)
    assert observed == []


# ---------------------------------------------------------------- the constrained distribution

PROMPT = [5, 9, 13, 17]
REGEX = r"[a-d][a-d]?"
DIST_PARAMS = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=4,
                             structured_output=StructuredOutput("regex", REGEX))
NUM_SAMPLES = 3000  # per engine; the attention of 3000 tiny requests dominates the cost


def exact_distribution(target_dir: str, compiler, params: SamplingParams = DIST_PARAMS
                       ) -> dict[tuple[int, ...], float]:
    """P(output token ids) under the masked, processed target, enumerated over the grammar's
    token tree with transformers' model (independent of our paged model and of speculation)."""
    from transformers import AutoModelForCausalLM

    from specdec.sample.grammar import apply_token_bitmask_, new_bitmask
    from specdec.sample.sampling import RowState, compute_probs, process_logits
    model = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    leaves: dict[tuple[int, ...], float] = {}
    frontier = [((), 1.0)]
    while frontier:
        with torch.no_grad():
            logits = model(torch.tensor([PROMPT + list(p) for p, _ in frontier])
                           ).logits[:, -1].float()
        bitmask = new_bitmask(len(frontier), logits.shape[1])
        for r, (prefix, _) in enumerate(frontier):
            matcher = compiler.matcher(params.structured_output)
            assert matcher.consume(list(prefix))
            matcher.fill_bitmask(bitmask, r)
        rows = [RowState(params, PROMPT, list(p), None) for p, _ in frontier]
        probs = compute_probs(process_logits(apply_token_bitmask_(logits, bitmask), rows), rows)
        nxt = []
        for r, (prefix, mass) in enumerate(frontier):
            for t in probs[r].nonzero()[:, 0].tolist():
                seq, p = prefix + (t,), mass * float(probs[r, t])
                matcher = compiler.matcher(params.structured_output)
                assert matcher.consume(list(seq))
                (leaves.__setitem__(seq, leaves.get(seq, 0.0) + p) if matcher.is_stopped
                 else nxt.append((seq, p)))
        frontier = nxt
    return leaves


def sample_counts(llm: LLM, keys: list[tuple[int, ...]], params: SamplingParams = DIST_PARAMS
                  ) -> torch.Tensor:
    index = {k: i for i, k in enumerate(keys)}
    counts = torch.zeros(len(keys) + 1)
    for o in llm.generate([{"prompt_token_ids": PROMPT}] * NUM_SAMPLES, params):
        counts[index.get(tuple(o.outputs[0].token_ids), len(keys))] += 1
    return counts


def test_constrained_distribution_is_the_same_with_and_without_speculation(
        tiny_llama_dir, tiny_draft_dir):
    many = {"scheduler.max_num_seqs": 256, "scheduler.max_num_batched_tokens": 2048,
            "model.max_model_len": 64, "device.seed": 1}
    plain = make_llm(tiny_llama_dir, **many)
    exact = exact_distribution(tiny_llama_dir, plain.engine.grammar_compiler)
    keys = sorted(exact)
    probs = torch.tensor([exact[k] for k in keys] + [0.0])
    assert math.isclose(float(probs.sum()), 1.0, abs_tol=1e-4) and len(keys) >= 8
    spec = make_llm(tiny_llama_dir, **many, **spec_kw("draft", tiny_draft_dir, 2))
    for llm in (plain, spec):
        counts = sample_counts(llm, keys)
        assert counts[-1] == 0  # never an output outside the grammar
        p_value = chi_square_pvalue(counts, probs)
        assert p_value > 1e-3, p_value
    stats = spec.engine.stats()
    rate = stats.spec_num_accepted_tokens / stats.spec_num_draft_tokens
    assert 0.05 < rate < 0.95, f"acceptance {rate:.2f}: the test needs both outcomes"


def test_forced_tokens_inside_a_draft_window_keep_the_distribution(tiny_llama_dir,
                                                                   tiny_draft_dir):
    # "xyz" is forced after the draft's first sampled token: the draft model appends it as
    # one-hot drafts (no draft forward) and samples the last letter after it, in one window.
    params = dataclasses.replace(DIST_PARAMS, temperature=1.0, top_p=1.0, max_tokens=8,
                                 structured_output=StructuredOutput(
        "regex", r"[a-c][a-c]xyz[a-c]"))
    many = {"scheduler.max_num_seqs": 256, "scheduler.max_num_batched_tokens": 2048,
            "model.max_model_len": 64, "device.seed": 2}
    spec = make_llm(tiny_llama_dir, **many, **spec_kw("draft", tiny_draft_dir, 6))
    exact = exact_distribution(tiny_llama_dir, spec.engine.grammar_compiler, params)
    keys = sorted(exact)
    probs = torch.tensor([exact[k] for k in keys] + [0.0])
    assert math.isclose(float(probs.sum()), 1.0, abs_tol=1e-4) and len(keys) >= 27
    propose, mid_window = spec.engine.drafter.propose, []

    def spy(requests, matchers=None):
        out = propose(requests, matchers)
        mid_window.extend(p for p in out if p.forced and p.forced[0] > 0)
        return out
    spec.engine.drafter.propose = spy
    counts = sample_counts(spec, keys, params)
    assert mid_window and all(p.draft_probs is not None for p in mid_window)
    assert counts[-1] == 0
    p_value = chi_square_pvalue(counts, probs)
    assert p_value > 1e-3, p_value
    stats = spec.engine.stats()
    assert stats.spec_num_forced_tokens > 0
    rate = stats.spec_num_accepted_tokens / stats.spec_num_draft_tokens
    assert rate < 0.95, f"acceptance {rate:.2f}: the test needs rejections"
