"""Statistics for bench/serve.py: per-request outcomes -> the summary it prints and writes.

- `summarize`: TTFT, TPOT, ITL and E2E (mean, median, std, percentiles, in ms), request and
  token throughput, failures; failed requests count only as failures.
- `parse_counters` / `spec_metrics`: the `specdec:` counters of a /metrics text body, and the
  acceptance length, acceptance rate, mean k and prefix cache hit rate from the deltas of two
  such snapshots.
- `print_summary`: the table, in the layout of `vllm bench serve`.
- `proc_memory`: a local server process's resident memory now and at its peak (Linux /proc).

Standard library and prometheus-client only: no network here (serve.py sends the requests).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

METRIC_PREFIX = "specdec:"
NUM_DRAFTS = "specdec:spec_decode_num_drafts"
NUM_DRAFT_TOKENS = "specdec:spec_decode_num_draft_tokens"
NUM_ACCEPTED = "specdec:spec_decode_num_accepted_tokens"
PREFIX_QUERIES = "specdec:prefix_cache_queries"
PREFIX_HITS = "specdec:prefix_cache_hits"


@dataclass(slots=True)
class RequestOutcome:
    """One streamed request as bench/serve.py saw it; times in seconds."""

    prompt_id: str
    success: bool = False
    error: str = ""
    start_time: float = 0.0  # seconds since the benchmark started
    ttft: float = 0.0
    e2e: float = 0.0
    prompt_tokens: int = 0
    output_tokens: int = 0
    usage_reported: bool = False
    itl: list[float] = field(default_factory=list)
    text: str = ""


# ---------------------------------------------------------------- /metrics


def parse_counters(text: str) -> dict[str, float]:
    """Sum of each `specdec:` counter over its labels, keyed without `_total`."""
    counters: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if not family.name.startswith(METRIC_PREFIX) or family.type not in (
                "counter", "untyped", "unknown"):
            continue
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            name = sample.name.removesuffix("_total")
            counters[name] = counters.get(name, 0.0) + sample.value
    return counters


def spec_metrics(before: dict | None, after: dict | None) -> dict:
    if before is None or after is None:
        return {"available": False}
    deltas = {k: v - before.get(k, 0.0) for k, v in after.items()}
    drafts, accepted = deltas.get(NUM_DRAFTS, 0.0), deltas.get(NUM_ACCEPTED, 0.0)
    draft_tokens = deltas.get(NUM_DRAFT_TOKENS, 0.0)
    queries = deltas.get(PREFIX_QUERIES, 0.0)
    return {"available": True, "counter_deltas": deltas,
            "prefix_cache_hit_rate": deltas.get(PREFIX_HITS, 0.0) / queries if queries else None,
            "acceptance_length": 1.0 + accepted / drafts if drafts else None,
            "acceptance_rate": accepted / draft_tokens if draft_tokens else None,
            "mean_k": draft_tokens / drafts if drafts else None}


# ---------------------------------------------------------------- summary


def _stats(values: list[float], percentiles: list[float], scale: float = 1e3) -> dict:
    if not values:
        return {"mean": None, "median": None, "std": None,
                **{f"p{p:g}": None for p in percentiles}}
    ordered = sorted(values)

    def pct(p: float) -> float:  # linear interpolation, as numpy's default
        pos = (len(ordered) - 1) * p / 100.0
        low = math.floor(pos)
        high = min(low + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)

    return {"mean": statistics.fmean(values) * scale, "median": statistics.median(values) * scale,
            "std": statistics.pstdev(values) * scale,
            **{f"p{p:g}": pct(p) * scale for p in percentiles}}


def summarize(outcomes: list[RequestOutcome], duration: float, percentiles: list[float]) -> dict:
    ok = [o for o in outcomes if o.success]
    output_tokens = sum(o.output_tokens for o in ok)
    prompt_tokens = sum(o.prompt_tokens for o in ok)
    tpots = [(o.e2e - o.ttft) / (o.output_tokens - 1) for o in ok if o.output_tokens > 1]
    return {
        "completed": len(ok), "failed": len(outcomes) - len(ok), "duration_s": duration,
        "total_input_tokens": prompt_tokens, "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / duration, "output_throughput": output_tokens / duration,
        "total_token_throughput": (prompt_tokens + output_tokens) / duration,
        "usage_missing": sum(not o.usage_reported for o in ok),
        "ttft_ms": _stats([o.ttft for o in ok], percentiles),
        "tpot_ms": _stats(tpots, percentiles),
        "itl_ms": _stats([gap for o in ok for gap in o.itl], percentiles),
        "e2e_ms": _stats([o.e2e for o in ok], percentiles),
        "errors": sorted({o.error for o in outcomes if not o.success})[:10],
    }


def print_summary(s: dict, args) -> None:
    print(f"{'=' * 18} serving benchmark ({args.label}) {'=' * 18}")
    rows = [("Successful requests", s["completed"]), ("Failed requests", s["failed"]),
            ("Request rate (req/s)", args.request_rate),
            ("Max concurrency", args.max_concurrency or "-"),
            ("Benchmark duration (s)", f"{s['duration_s']:.2f}"),
            ("Total input tokens", s["total_input_tokens"]),
            ("Total output tokens", s["total_output_tokens"]),
            ("Request throughput (req/s)", f"{s['request_throughput']:.2f}"),
            ("Output token throughput (tok/s)", f"{s['output_throughput']:.2f}")]
    for name, value in rows:
        print(f"{name:<36}{value:>14}")
    for key, title in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"),
                       ("e2e_ms", "E2E latency")):
        print(f"{'-' * 14} {title} (ms) {'-' * 14}")
        for stat, value in s[key].items():
            print(f"{stat:<36}{'-' if value is None else f'{value:.2f}':>14}")
    spec = s["spec_decode"]
    print(f"{'-' * 14} speculative decoding (/metrics) {'-' * 14}")
    if not spec["available"]:
        print("/metrics not reachable")
    else:
        for key in ("acceptance_length", "acceptance_rate", "mean_k", "prefix_cache_hit_rate"):
            value = spec[key]
            print(f"{key:<36}{'-' if value is None else f'{value:.3f}':>14}")
    for error in s["errors"]:
        print(f"error: {error}")


def proc_memory(pid: int) -> dict[str, float]:
    """VmRSS (now) and VmHWM (the peak over the process's life) of `pid`, in MB."""
    usage = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                usage["rss_mb"] = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                usage["peak_rss_mb"] = int(line.split()[1]) / 1024
    return usage
