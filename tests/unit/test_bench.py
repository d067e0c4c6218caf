"""The benchmark scripts' logic on the CPU, without a model, a server or the network:
bench/serve_stats.py (TTFT/TPOT/ITL/E2E, throughput, failures, /metrics and acceptance length),
bench/prompts.py (synthetic sets, `take`, the shipped code prompts) and bench/plot.py (a PNG).
Expected values are computed by hand. bench/ holds scripts, not a package: its directory goes
on sys.path, as when a script runs."""

from __future__ import annotations

import json
import math
import pathlib
import random
import sys
from types import SimpleNamespace

import numpy as np
import pytest

BENCH = pathlib.Path(__file__).resolve().parents[2] / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import plot
import prompts
import serve_stats
from serve_stats import RequestOutcome, parse_counters, spec_metrics, summarize

PERCENTILES = [50.0, 90.0, 99.0]


def outcome(prompt_id: str, ttft: float, e2e: float, prompt_tokens: int, output_tokens: int,
            itl: list[float], usage_reported: bool = True) -> RequestOutcome:
    return RequestOutcome(prompt_id, success=True, ttft=ttft, e2e=e2e,
                          prompt_tokens=prompt_tokens, output_tokens=output_tokens,
                          usage_reported=usage_reported, itl=itl, text="x")


def failure(prompt_id: str, error: str) -> RequestOutcome:
    # Timings and tokens set on purpose: a failed request must not count in any statistic.
    return RequestOutcome(prompt_id, success=False, error=error, ttft=9.0, e2e=9.0,
                          prompt_tokens=99, output_tokens=99, itl=[9.0])


def three_ok_three_failed() -> list[RequestOutcome]:
    return [
        outcome("a", ttft=0.1, e2e=1.1, prompt_tokens=10, output_tokens=11, itl=[0.2, 0.3, 0.5]),
        outcome("b", ttft=0.3, e2e=2.3, prompt_tokens=20, output_tokens=5, itl=[0.5, 1.5]),
        # One output token: no TPOT (its denominator output_tokens - 1 would be 0).
        outcome("c", ttft=0.2, e2e=0.2, prompt_tokens=30, output_tokens=1, itl=[],
                usage_reported=False),
        failure("d", "HTTP 503: busy"),
        failure("e", "HTTP 503: busy"),
        failure("f", "ClientConnectorError: refused"),
    ]


def check_stats(stats: dict, **expected: float) -> None:
    assert list(stats) == list(expected) == ["mean", "median", "std", "p50", "p90", "p99"]
    for key, value in expected.items():
        assert stats[key] == pytest.approx(value, rel=1e-12, abs=1e-9), key


# ---------------------------------------------------------------- summarize


def test_summarize_counts_tokens_and_throughput_over_successes_only():
    s = summarize(three_ok_three_failed(), duration=2.0, percentiles=PERCENTILES)
    assert (s["completed"], s["failed"], s["duration_s"]) == (3, 3, 2.0)
    assert (s["total_input_tokens"], s["total_output_tokens"]) == (10 + 20 + 30, 11 + 5 + 1)
    assert s["request_throughput"] == pytest.approx(3 / 2.0)
    assert s["output_throughput"] == pytest.approx(17 / 2.0)
    assert s["total_token_throughput"] == pytest.approx((60 + 17) / 2.0)
    assert s["usage_missing"] == 1
    assert s["errors"] == ["ClientConnectorError: refused", "HTTP 503: busy"]  # sorted, unique


def test_summarize_latency_statistics_in_ms():
    s = summarize(three_ok_three_failed(), duration=2.0, percentiles=PERCENTILES)
    # TTFT [100, 200, 300] ms sorted; p90 at rank 1.8 -> 200 + 0.8 * 100.
    check_stats(s["ttft_ms"], mean=200, median=200, std=math.sqrt((100**2 + 0 + 100**2) / 3),
                p50=200, p90=280, p99=298)
    # TPOT (e2e - ttft) / (output_tokens - 1): a 1.0 / 10 = 100 ms, b 2.0 / 4 = 500 ms; c none.
    check_stats(s["tpot_ms"], mean=300, median=300, std=200, p50=300, p90=100 + 0.9 * 400,
                p99=100 + 0.99 * 400)
    # ITL: all gaps of all requests, [200, 300, 500, 500, 1500] ms.
    check_stats(s["itl_ms"], mean=600, median=500,
                std=math.sqrt((400**2 + 300**2 + 100**2 + 100**2 + 900**2) / 5),
                p50=500, p90=500 + 0.6 * 1000, p99=500 + 0.96 * 1000)
    # E2E [200, 1100, 2300] ms sorted.
    check_stats(s["e2e_ms"], mean=1200, median=1100,
                std=math.sqrt((1000**2 + 100**2 + 1100**2) / 3),
                p50=1100, p90=1100 + 0.8 * 1200, p99=1100 + 0.98 * 1200)


def test_tpot_is_not_the_mean_itl():
    # Speculative decoding, 9 tokens in 3 frames: TPOT is per token after the first, ITL per frame.
    s = summarize([outcome("a", ttft=0.5, e2e=1.3, prompt_tokens=4, output_tokens=9,
                           itl=[0.4, 0.4])], duration=1.3, percentiles=[50.0])
    assert s["tpot_ms"]["mean"] == pytest.approx(800 / 8)
    assert s["itl_ms"]["mean"] == pytest.approx(400)


def test_summarize_with_no_successes_has_empty_statistics():
    s = summarize([failure("a", "boom")], duration=1.0, percentiles=[50.0, 99.9])
    assert (s["completed"], s["failed"], s["total_output_tokens"], s["request_throughput"]) == (
        0, 1, 0, 0.0)
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        assert s[key] == {"mean": None, "median": None, "std": None, "p50": None, "p99.9": None}
    assert s["errors"] == ["boom"]


def test_percentiles_match_numpy_linear_interpolation():
    rng, percentiles = random.Random(0), [0.0, 25.0, 50.0, 90.0, 99.0, 99.9, 100.0]
    for n in (1, 2, 7, 100):
        values = [rng.expovariate(5.0) for _ in range(n)]
        stats = serve_stats._stats(values, percentiles)
        for p in percentiles:
            assert stats[f"p{p:g}"] == pytest.approx(np.percentile(values, p) * 1e3, rel=1e-12)
        assert stats["median"] == pytest.approx(np.median(values) * 1e3, rel=1e-12)
        assert stats["std"] == pytest.approx(np.std(values) * 1e3, rel=1e-12, abs=1e-12)


# ---------------------------------------------------------------- /metrics


def server_metrics_text(drafts: int, draft_tokens: int, accepted: int, per_pos: list[int],
                        queries: int, hits: int, successes: int) -> str:
    """A /metrics body in the exact text format server/metrics.py renders (prometheus-client's
    text format 0.0.4), with fewer gauges and histogram buckets."""
    lines = []

    def family(name, kind, doc, samples):
        lines.append(f"# HELP {name} {doc}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(f"{name}{labels} {value}" for labels, value in samples)

    model = '{model_name="tiny"}'
    family("specdec:num_blocks_total", "gauge", "KV blocks in the pool.", [(model, 64.0)])
    for name, doc, value in (
            ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", queries),
            ("prefix_cache_hits", "Prompt tokens served by the prefix cache.", hits),
            ("spec_decode_num_drafts", "Speculative drafts proposed.", drafts),
            ("spec_decode_num_draft_tokens", "Draft tokens proposed.", draft_tokens),
            ("spec_decode_num_accepted_tokens", "Draft tokens accepted.", accepted)):
        family(f"specdec:{name}_total", "counter", doc, [(model, float(value))])
    family("specdec:spec_decode_num_accepted_tokens_per_pos_total", "counter",
           "Accepted draft tokens by position.",
           [(f'{{model_name="tiny",position="{i}"}}', float(v)) for i, v in enumerate(per_pos)])
    family("specdec:request_success_total", "counter", "Finished requests by finish reason.",
           [('{finished_reason="stop",model_name="tiny"}', float(successes)),
            ('{finished_reason="length",model_name="tiny"}', 1.0)])
    family("specdec:request_success_created", "gauge", "Finished requests by finish reason.",
           [('{finished_reason="stop",model_name="tiny"}', 1.7957e9)])
    family("specdec:time_to_first_token_seconds", "histogram", "Time to first token.",
           [('_bucket{le="+Inf",model_name="tiny"}', 3.0), ('_count{model_name="tiny"}', 3.0),
            ('_sum{model_name="tiny"}', 0.6)])
    return "\n".join(lines) + "\n"


BEFORE = server_metrics_text(drafts=10, draft_tokens=40, accepted=25, per_pos=[9, 8, 5, 3],
                             queries=100, hits=40, successes=2)
AFTER = server_metrics_text(drafts=30, draft_tokens=140, accepted=85, per_pos=[29, 25, 18, 13],
                            queries=300, hits=90, successes=7)


def test_parse_counters_sums_labels_and_skips_gauges_histograms_and_created():
    assert parse_counters(BEFORE) == {
        "specdec:prefix_cache_queries": 100.0,
        "specdec:prefix_cache_hits": 40.0,
        "specdec:spec_decode_num_drafts": 10.0,
        "specdec:spec_decode_num_draft_tokens": 40.0,
        "specdec:spec_decode_num_accepted_tokens": 25.0,
        "specdec:spec_decode_num_accepted_tokens_per_pos": 9.0 + 8 + 5 + 3,
        "specdec:request_success": 2.0 + 1.0,
    }  # no num_blocks_total gauge (it ends in _total), no _created, no histogram


def test_parse_counters_without_type_lines_skips_created_samples():
    text = ('specdec:spec_decode_num_drafts_total{model_name="tiny"} 3.0\n'
            'specdec:spec_decode_num_drafts_created{model_name="tiny"} 1.7957e9\n'
            'other:requests_total 5.0\n')
    assert parse_counters(text) == {"specdec:spec_decode_num_drafts": 3.0}


def test_spec_metrics_from_two_snapshots():
    spec = spec_metrics(parse_counters(BEFORE), parse_counters(AFTER))
    assert spec["available"] is True
    # Deltas: 20 drafts, 100 draft tokens, 60 accepted, 200 queries, 50 hits.
    assert spec["acceptance_length"] == pytest.approx(1 + 60 / 20)
    assert spec["acceptance_rate"] == pytest.approx(60 / 100)
    assert spec["mean_k"] == pytest.approx(100 / 20)
    assert spec["prefix_cache_hit_rate"] == pytest.approx(50 / 200)
    deltas = spec["counter_deltas"]
    assert deltas["specdec:spec_decode_num_accepted_tokens_per_pos"] == 85 - 25
    assert deltas["specdec:request_success"] == 5.0


def test_spec_metrics_parses_what_the_server_renders():
    # The bench parser and server/metrics.py must agree on names and format.
    from server.metrics import ServerMetrics

    def render(drafts, draft_tokens, accepted, queries, hits):
        metrics = ServerMetrics("tiny")
        stats = SimpleNamespace(
            num_running=0, num_waiting=0, kv_cache_usage=0.0, num_blocks_total=64,
            num_blocks_free=64, prefix_cache_queries=queries, prefix_cache_hits=hits,
            num_preemptions=0, prompt_tokens_total=0, generation_tokens_total=0,
            spec_num_drafts=drafts, spec_num_draft_tokens=draft_tokens,
            spec_num_accepted_tokens=accepted, spec_accepted_per_pos=[accepted])
        return metrics.render(stats).decode()

    spec = spec_metrics(parse_counters(render(4, 16, 6, 10, 0)),
                        parse_counters(render(12, 48, 30, 50, 30)))
    assert spec["acceptance_length"] == pytest.approx(1 + 24 / 8)
    assert spec["acceptance_rate"] == pytest.approx(24 / 32)
    assert spec["mean_k"] == pytest.approx(32 / 8)
    assert spec["prefix_cache_hit_rate"] == pytest.approx(30 / 40)


def test_spec_metrics_without_metrics_or_without_drafts():
    assert spec_metrics(None, {"specdec:spec_decode_num_drafts": 1.0}) == {"available": False}
    assert spec_metrics({}, None) == {"available": False}
    same = parse_counters(BEFORE)
    spec = spec_metrics(same, same)  # no speculation during the run
    assert spec["available"] is True
    assert (spec["acceptance_length"], spec["acceptance_rate"], spec["mean_k"],
            spec["prefix_cache_hit_rate"]) == (None, None, None, None)


def test_print_summary_table(capsys):
    s = summarize(three_ok_three_failed(), duration=2.0, percentiles=PERCENTILES)
    s["spec_decode"] = spec_metrics(parse_counters(BEFORE), parse_counters(AFTER))
    args = SimpleNamespace(label="spec", request_rate=float("inf"), max_concurrency=None)
    serve_stats.print_summary(s, args)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{'=' * 18} serving benchmark (spec) {'=' * 18}"
    assert f"{'Successful requests':<36}{3:>14}" in lines
    assert f"{'Failed requests':<36}{3:>14}" in lines
    assert f"{'Max concurrency':<36}{'-':>14}" in lines
    assert f"{'Output token throughput (tok/s)':<36}{'8.50':>14}" in lines
    assert f"{'p90':<36}{'280.00':>14}" in lines  # TTFT p90
    assert f"{'acceptance_length':<36}{'4.000':>14}" in lines
    assert lines[-2:] == ["error: ClientConnectorError: refused", "error: HTTP 503: busy"]

    s["spec_decode"] = {"available": False}
    serve_stats.print_summary(s, args)
    assert "/metrics not reachable" in capsys.readouterr().out


# ---------------------------------------------------------------- prompts


def test_random_prompts_count_lengths_and_determinism():
    a = prompts.random_prompts(5, input_len=16, output_len=8, seed=3)
    assert [p.prompt_id for p in a] == [f"random-{i}" for i in range(5)]
    assert all(p.category == "random" and p.output_len == 8 for p in a)
    assert all(len(p.text.split()) == 16 for p in a)  # English words without a tokenizer
    assert all(w in prompts._WORDS for p in a for w in p.text.split())
    assert prompts.random_prompts(5, 16, 8, seed=3) == a
    assert [p.text for p in prompts.random_prompts(5, 16, 8, seed=4)] != [p.text for p in a]


def test_random_prompts_range_ratio_bounds():
    a = prompts.random_prompts(50, input_len=20, output_len=10, seed=0, range_ratio=0.5)
    input_lens = [len(p.text.split()) for p in a]
    output_lens = [p.output_len for p in a]
    assert min(input_lens) >= 10 and max(input_lens) <= 30
    assert min(output_lens) >= 5 and max(output_lens) <= 15
    assert len(set(input_lens)) > 1 and len(set(output_lens)) > 1
    assert prompts.random_prompts(50, 20, 10, seed=0, range_ratio=0.5) == a


def test_random_prompts_with_a_tokenizer_never_draw_special_ids():
    class Tokenizer:  # the three things _random_text uses
        all_special_ids = (0, 1)

        def __len__(self):
            return 6

        def decode(self, ids):
            return " ".join(f"t{i}" for i in ids)

    a = prompts.random_prompts(3, input_len=40, output_len=4, seed=1, tokenizer=Tokenizer())
    assert all(len(p.text.split()) == 40 for p in a)
    assert {word for p in a for word in p.text.split()} <= {"t2", "t3", "t4", "t5"}


def test_shared_prefix_prompts_share_the_prefix_within_a_group_only():
    a = prompts.shared_prefix_prompts(8, num_prefixes=2, prefix_len=6, suffix_len=3,
                                      output_len=5, seed=0)
    assert len(a) == 8 and len({p.prompt_id for p in a}) == 8
    assert all(p.output_len == 5 and len(p.text.split()) == 6 + 3 for p in a)
    groups: dict[str, list[str]] = {}
    for p in a:
        groups.setdefault(p.category, []).append(p.text)
    assert sorted(groups) == ["prefix-0", "prefix-1"] and all(len(t) == 4 for t in groups.values())
    prefixes = {}
    for category, texts in groups.items():
        prefix = " ".join(texts[0].split()[:6]) + " "
        assert all(t.startswith(prefix) for t in texts)  # the exact same text
        assert len({t[len(prefix):] for t in texts}) == 4  # distinct suffixes
        prefixes[category] = prefix
    assert prefixes["prefix-0"] != prefixes["prefix-1"]
    # Shuffled so that groups interleave, and the same for the same seed.
    assert [p.prompt_id for p in a] != sorted((p.prompt_id for p in a),
                                              key=lambda i: int(i.split("-")[1]))
    assert prompts.shared_prefix_prompts(8, 2, 6, 3, 5, seed=0) == a


def test_take_cycles_shuffles_deterministically_and_keeps_the_input():
    items = [prompts.BenchPrompt(f"p{i}", f"text {i}", "c") for i in range(3)]
    assert [p.prompt_id for p in prompts.take(items, None)] == ["p0", "p1", "p2"]
    assert [p.prompt_id for p in prompts.take(items, 2)] == ["p0", "p1"]
    assert [p.prompt_id for p in prompts.take(items, 5)] == ["p0", "p1", "p2", "p0", "p1"]
    expected = list(items)
    random.Random(7).shuffle(expected)
    assert prompts.take(items, 3, seed=7) == expected
    assert [p.prompt_id for p in items] == ["p0", "p1", "p2"]  # not shuffled in place


@pytest.mark.parametrize("call, message", [
    (lambda: prompts.random_prompts(0, 16, 8), "num_prompts must be >= 1, got 0"),
    (lambda: prompts.random_prompts(2, 0, 8), "input_len must be >= 1, got 0"),
    (lambda: prompts.random_prompts(2, 16, -3), "output_len must be >= 1, got -3"),
    (lambda: prompts.random_prompts(2, 16, 8, range_ratio=1.0),
     "range_ratio must be in [0, 1), got 1.0"),
    (lambda: prompts.shared_prefix_prompts(4, 0, 8, 4, 4), "num_prefixes must be >= 1, got 0"),
    (lambda: prompts.shared_prefix_prompts(4, 2, 0, 4, 4), "prefix_len must be >= 1, got 0"),
    (lambda: prompts.shared_prefix_prompts(4, 2, 8, 0, 4), "suffix_len must be >= 1, got 0"),
    (lambda: prompts.shared_prefix_prompts(4, 2, 8, 4, 0), "output_len must be >= 1, got 0"),
    (lambda: prompts.take([prompts.BenchPrompt("p", "t", "c")], 0),
     "num_prompts must be >= 1, got 0"),
    (lambda: prompts.take([], -1), "num_prompts must be >= 1, got -1"),
])
def test_bad_counts_and_lengths_raise_with_name_value_and_limit(call, message):
    with pytest.raises(ValueError) as info:
        call()
    assert str(info.value) == message


def test_load_code_prompts_reads_the_shipped_file():
    with open(prompts.CODE_PROMPTS, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    loaded = prompts.load_code_prompts()
    assert len(loaded) == len(rows) == 16
    assert [p.prompt_id for p in loaded] == [f"code-{row['id']}" for row in rows]
    assert loaded[0].category == "write"
    assert loaded[0].text.startswith("Write a Python function `is_palindrome(s: str) -> bool`")
    assert {p.category for p in loaded} == {"write", "edit", "fix", "explain"}
    assert all(p.output_len is None and p.second_turn is None for p in loaded)


def test_load_code_prompts_skips_blank_lines(tmp_path):
    path = tmp_path / "code.jsonl"
    path.write_text('{"id": 7, "category": "edit", "prompt": "Add types."}\n\n'
                    '{"id": 9, "category": "fix", "prompt": "Fix it."}\n')
    assert prompts.load_code_prompts(str(path)) == [
        prompts.BenchPrompt("code-7", "Add types.", "edit"),
        prompts.BenchPrompt("code-9", "Fix it.", "fix")]


# ---------------------------------------------------------------- plot


def serve_result(label: str, request_rate, max_concurrency, ttft: float) -> dict:
    """The JSON bench/serve.py writes (its main()), minus args and timestamps."""
    summary = summarize([outcome("a", ttft=ttft, e2e=ttft + 0.9, prompt_tokens=8,
                                 output_tokens=10, itl=[0.1] * 9)],
                        duration=1.0, percentiles=PERCENTILES)
    summary["spec_decode"] = {"available": False}
    return {"benchmark": "serve", "label": label, "dataset": "code",
            "request_rate": request_rate, "max_concurrency": max_concurrency,
            "model": "tiny", **summary}


def test_load_axis_is_the_rate_when_it_varies_else_the_concurrency():
    by_rate = [serve_result("spec", 1.0, None, 0.1), serve_result("spec", "inf", None, 0.2)]
    name, x_of = plot.load_axis(by_rate)
    assert name == "request rate (req/s)"
    assert [x_of(r) for r in by_rate] == [1.0, math.inf]
    by_conc = [serve_result("spec", "inf", 4, 0.1), serve_result("spec", "inf", None, 0.2)]
    name, x_of = plot.load_axis(by_conc)
    assert name == "max concurrency"
    assert [x_of(r) for r in by_conc] == [4, math.inf]


def test_plot_writes_a_png(tmp_path):
    results = [serve_result("spec", 1.0, None, 0.1), serve_result("spec", "inf", None, 0.15),
               serve_result("no-spec", 1.0, None, 0.2), serve_result("no-spec", "inf", None, 0.3)]
    results = json.loads(json.dumps(results))  # as plot.main reads them: "inf" a string
    path = tmp_path / "serve.png"
    plot.plot(results, str(path), title="spec vs no-spec")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 1000


def test_plot_refuses_no_results(tmp_path):
    with pytest.raises(ValueError, match="no results to plot"):
        plot.plot([], str(tmp_path / "x.png"))


# ---- bench/latency.py ------------------------------------------------------------------------


def test_first_difference_names_the_first_differing_token():
    import latency

    assert latency.first_difference([1, 2, 3], [1, 2, 3]) is None
    assert latency.first_difference([1, 2, 4, 5], [1, 2, 3, 5]) == 2
    assert latency.first_difference([7, 2], [1, 2]) == 0
    assert latency.first_difference([1, 2], [1, 2, 3]) == 2  # one output stops early
    assert latency.first_difference([], [4]) == 0


def test_json_dataset_prompts_carry_valid_schemas():
    import jsonschema
    import latency
    from prompts import load_json_prompts

    prompts = load_json_prompts()
    assert len(prompts) >= 8 and len({p.prompt_id for p in prompts}) == len(prompts)
    for p in prompts:
        jsonschema.Draft202012Validator.check_schema(p.schema)
        assert p.schema["type"] == "object" and p.schema["required"]
    person = prompts[0].schema
    assert latency.schema_valid('{"name": "a", "age": 3, "email": "e", "city": "c"}', person)
    assert not latency.schema_valid('{"name": "a"}', person)
    assert not latency.schema_valid('{"name": ', person)
    args, _ = latency.parse_args(["--dataset", "json", "--pair", "smollm2"])
    assert args.dataset == "json"


def test_served_config_copy_applies_overrides_and_round_trips():
    """latency_served writes the shipped config with spec.method = "none" for the no-spec
    served run: every other key must survive the copy unchanged."""
    import os
    import tomllib

    import latency_served

    shipped = pathlib.Path(__file__).parents[2] / "configs" / "qwen2.5-coder-1.5b+0.5b.toml"
    with open(shipped, "rb") as f:
        want = tomllib.load(f)
    path = latency_served.write_config(str(shipped), {"spec": {"method": "none"},
                                                      "device": {"num_threads": 2}})
    try:
        with open(path, "rb") as f:
            got = tomllib.load(f)
    finally:
        os.unlink(path)
    assert got["spec"]["method"] == "none" and got["device"]["num_threads"] == 2
    want["spec"]["method"] = "none"
    want.setdefault("device", {})["num_threads"] = 2
    assert got == want


@pytest.mark.parametrize("lines, timeout_s, want", [
    (['{"event": "request_done"}', '{"event": "startup_work_done", "calibration": "cached"}'],
     30.0, "cached"),
    (['{"event": "request_done"}'], 0.5, "not done"),
])
def test_served_bench_waits_for_the_startup_work(lines, timeout_s, want):
    """latency_served reads the server's stderr until `startup_work_done` (the background
    calibration), so served rows measure the steady state; a server that never says it times
    out to "not done". The fake server prints its log lines, then idles."""
    import subprocess

    import latency_served

    script = ("import sys, time\n" + "".join(f"print({line!r}, file=sys.stderr, flush=True)\n"
                                             for line in lines) + "time.sleep(30)\n")
    server = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
    try:
        assert latency_served._wait_for_startup_work(server, timeout_s) == want
    finally:
        server.kill()
        server.wait()


def _fake_run(name: str, num_prompts: int, log: list, fail_at: int | None = None):
    """A latency.py system run: yields after its warm-up and after each prompt."""
    from latency_common import RequestResult, SystemResult

    result = SystemResult(name, 0.0, {})
    try:
        log.append((name, "warm-up"))
        yield
        for i in range(num_prompts):
            if i == fail_at:
                raise RuntimeError(f"{name} failed at prompt {i}")
            log.append((name, i))
            result.requests.append(RequestResult(str(i), 1, [i], 1.0))
            yield
        return result
    finally:
        log.append((name, "closed"))


def test_interleaved_runs_rotate_the_systems_per_prompt():
    """--interleave: every system warms up first, then prompt i runs on every system (the
    order starting one system later each prompt), and each result holds its own requests."""
    from latency_common import run_interleaved, run_to_end

    log: list = []
    runs = {n: _fake_run(n, 3, log) for n in ("a", "b", "c")}
    turns: list = []
    results = run_interleaved(runs, 3, lambda name, i: turns.append((name, i)))
    assert turns == [("a", -1), ("b", -1), ("c", -1), ("a", 0), ("b", 0), ("c", 0),
                     ("b", 1), ("c", 1), ("a", 1), ("c", 2), ("a", 2), ("b", 2)]
    assert [e for e in log if e[1] != "closed"] == [
        ("a", "warm-up"), ("b", "warm-up"), ("c", "warm-up"), ("a", 0), ("b", 0), ("c", 0),
        ("b", 1), ("c", 1), ("a", 1), ("c", 2), ("a", 2), ("b", 2)]
    assert {n: [r.prompt_id for r in res.requests] for n, res in results.items()} == {
        n: ["0", "1", "2"] for n in "abc"}
    assert sorted(e[0] for e in log if e[1] == "closed") == ["a", "b", "c"]
    # one after the other: the same generator protocol, run to its end
    log.clear()
    assert [r.prompt_id for r in run_to_end(_fake_run("d", 2, log)).requests] == ["0", "1"]


def test_a_failing_interleaved_system_stops_every_other():
    """A system that raises mid-run stops the run, and every other system's run is closed
    (its `finally`: the bench's servers are terminated, none is left behind)."""
    from latency_common import run_interleaved

    log: list = []
    runs = {"a": _fake_run("a", 3, log), "b": _fake_run("b", 3, log, fail_at=1),
            "c": _fake_run("c", 3, log)}
    with pytest.raises(RuntimeError, match="b failed at prompt 1"):
        run_interleaved(runs, 3)
    assert sorted(e[0] for e in log if e[1] == "closed") == ["a", "b", "c"]


@pytest.mark.parametrize("interleave", [False, True])
def test_latency_bench_runs_our_systems_end_to_end(smollm2_dir, tmp_path, interleave):
    """bench/latency.py on the real SmolLM2 (2 prompts x 6 tokens, our in-process systems),
    one after the other and interleaved: every request is measured, and the n-gram run's
    greedy tokens equal the plain run's."""
    import json

    import latency

    out = tmp_path / "latency.json"
    argv = ["--pair", "smollm2", "--systems", "ours,ours-ngram", "--num-prompts", "2",
            "--max-tokens", "6", "--warmup-tokens", "2", "--output", str(out)]
    assert latency.main(argv + (["--interleave"] if interleave else [])) == 0
    data = json.loads(out.read_text())
    for name in ("ours", "ours-ngram"):
        summary = data["summary"][name]
        assert summary["num_requests"] == 2 and summary["num_output_tokens"] > 0
        assert summary["tokens_per_s"] > 0
        # in one process the in-process systems' peaks are not their own when interleaved
        assert (summary["peak_rss_mb"] is None) == interleave
    assert data["summary"]["ours-ngram"]["same_as"] == {"reference": "ours", "identical": 2,
                                                        "total": 2}
    assert data["args"]["interleave"] is interleave
