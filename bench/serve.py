"""Serving load generator in the shape of `vllm bench serve`, for a running OpenAI-style server.

Sends streaming requests (SSE) to /v1/completions or /v1/chat/completions at a Poisson request
rate (--request-rate, `inf` sends all at once) and/or under a concurrency cap
(--max-concurrency). Reports, over the measured requests (warm-ups excluded):

- TTFT: request sent -> first frame carrying text.
- TPOT: (e2e - ttft) / (output_tokens - 1), with output_tokens from the final `usage` frame
  (we ask for stream_options.include_usage). Not the mean ITL: with speculative decoding one
  frame may carry several tokens.
- ITL: gaps between successive frames carrying text.
- E2E: request sent -> stream finished.
- request and output-token throughput, failures, and from /metrics the deltas over the run of
  every `specdec:` counter, with acceptance length = 1 + accepted / drafts (vLLM's definition).

The statistics (and the /metrics parsing) live in serve_stats.py; this file sends requests.

    python bench/serve.py --base-url http://127.0.0.1:8000 --dataset mtbench \
        --num-prompts 80 --request-rate 2 --label spec
    python bench/serve.py --dataset random --input-len 256 --output-len 128 --max-concurrency 4
    python bench/serve.py --dataset fim-keystrokes --tokenizer qwen2.5-coder-0.5b-instruct \
        --label spec        # an editor typing: see bench/fim_keystrokes.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict

import aiohttp
from tqdm import tqdm

from prompts import (BenchPrompt, load_code_prompts, load_mtbench, random_prompts,
                     shared_prefix_prompts, take)
from serve_stats import (RequestOutcome, parse_counters, print_summary, proc_memory,
                         spec_metrics, summarize)

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# ---------------------------------------------------------------- one request


def request_body(prompt: BenchPrompt, args, chat: bool) -> dict:
    body: dict = {"model": args.model, "stream": True, "temperature": args.temperature,
                  "max_tokens": prompt.output_len or args.max_tokens,
                  "stream_options": {"include_usage": True}}
    if chat:
        body["messages"] = [{"role": "user", "content": prompt.text}]
    else:
        body["prompt"] = prompt.text
    if args.ignore_eos:
        body["ignore_eos"] = True
    if args.top_p is not None:
        body["top_p"] = args.top_p
    body.update(args.extra_body)
    return body


def _frame_text(chunk: dict, chat: bool) -> str:
    text = ""
    for choice in chunk.get("choices") or []:
        if chat:
            text += (choice.get("delta") or {}).get("content") or ""
        else:
            text += choice.get("text") or ""
    return text


async def send_request(session: aiohttp.ClientSession, url: str, headers: dict, body: dict,
                       prompt_id: str, chat: bool, t_zero: float) -> RequestOutcome:
    outcome = RequestOutcome(prompt_id)
    start = time.perf_counter()
    outcome.start_time = start - t_zero
    last_frame = None
    try:
        async with session.post(url, json=body, headers=headers) as resp:
            if resp.status != 200:
                outcome.error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                return outcome
            async for raw in resp.content:
                line = raw.decode("utf-8").strip()
                if not line.startswith("data:"):
                    continue  # blank separators, comments (": ping"), event names
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    outcome.error = f"stream error: {json.dumps(chunk['error'])[:300]}"
                    return outcome
                now = time.perf_counter()
                text = _frame_text(chunk, chat)
                if text:
                    if last_frame is None:
                        outcome.ttft = now - start
                    else:
                        outcome.itl.append(now - last_frame)
                    last_frame = now
                    outcome.text += text
                usage = chunk.get("usage")
                if usage:
                    outcome.usage_reported = True
                    outcome.prompt_tokens = usage.get("prompt_tokens", 0)
                    outcome.output_tokens = usage.get("completion_tokens", 0)
        outcome.e2e = time.perf_counter() - start
        if not outcome.usage_reported:  # fall back to frames (undercounts multi-token frames)
            outcome.output_tokens = len(outcome.itl) + (1 if last_frame is not None else 0)
        if last_frame is None:
            outcome.error = "stream finished without any text"
            return outcome
        outcome.success = True
    except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError,
            UnicodeDecodeError) as e:
        outcome.error = f"{type(e).__name__}: {e}"
    return outcome


# ---------------------------------------------------------------- /metrics


async def scrape_counters(session: aiohttp.ClientSession, url: str) -> dict[str, float] | None:
    """Sum of each `specdec:` counter over its labels; None if /metrics is unreachable."""
    try:
        async with session.get(url) as resp:
            if resp.status != 200:
                return None
            text = await resp.text()
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return None
    return parse_counters(text)


# ---------------------------------------------------------------- load


async def arrivals(prompts: list[BenchPrompt], rate: float, rng: random.Random):
    """Yield prompts with exponential gaps (a Poisson process) of mean 1 / rate seconds."""
    for i, prompt in enumerate(prompts):
        if i and math.isfinite(rate):
            await asyncio.sleep(rng.expovariate(rate))
        yield prompt


def scrape_startup_seconds(metrics_url: str, api_key: str | None = None) -> float | None:
    """The server's own start-to-ready seconds (our `specdec:startup_seconds` gauge); None
    for a server without it (llama.cpp: bench/footprint.py times its start from outside)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    request = urllib.request.Request(metrics_url, headers={
        "Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            text = resp.read().decode()
        for family in text_string_to_metric_families(text):
            if family.name == "specdec:startup_seconds" and family.samples:
                return family.samples[0].value
    except (OSError, ValueError):
        return None
    return None


async def run_benchmark(args, prompts: list[BenchPrompt]) -> dict:
    chat = args.endpoint.endswith("/chat/completions")
    base = args.base_url.rstrip("/")
    url = base + args.endpoint
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    connector = aiohttp.TCPConnector(limit=args.max_concurrency or 0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        if args.model is None:
            async with session.get(base + "/v1/models", headers=headers) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"GET {base}/v1/models: HTTP {resp.status}; "
                                       f"pass --model or check --base-url/--api-key")
                args.model = (await resp.json())["data"][0]["id"]
        t_zero = time.perf_counter()
        if args.num_warmups:
            warmups = await asyncio.gather(*[
                send_request(session, url, headers, request_body(p, args, chat), p.prompt_id,
                             chat, t_zero) for p in take(prompts, args.num_warmups)])
            failed = [w.error for w in warmups if not w.success]
            if failed:
                raise RuntimeError(f"warm-up request failed: {failed[0]}")
        metrics_url = args.metrics_url or base + "/metrics"
        before = await scrape_counters(session, metrics_url)

        semaphore = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
        progress = tqdm(total=len(prompts), disable=args.disable_tqdm, desc="requests")

        async def limited(prompt: BenchPrompt) -> RequestOutcome:
            body = request_body(prompt, args, chat)
            if semaphore is None:
                outcome = await send_request(session, url, headers, body, prompt.prompt_id,
                                             chat, t_zero)
            else:
                async with semaphore:
                    outcome = await send_request(session, url, headers, body, prompt.prompt_id,
                                                 chat, t_zero)
            progress.update(1)
            return outcome

        rng = random.Random(args.seed)
        start = time.perf_counter()
        t_zero = start
        tasks = [asyncio.create_task(limited(p))
                 async for p in arrivals(prompts, args.request_rate, rng)]
        outcomes = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        progress.close()
        after = await scrape_counters(session, metrics_url)
    summary = summarize(outcomes, duration, args.percentiles)
    summary["spec_decode"] = spec_metrics(before, after)
    return {"summary": summary, "outcomes": outcomes}


# ---------------------------------------------------------------- entry point


def load_prompts(args, tokenizer) -> list[BenchPrompt]:
    if args.dataset == "mtbench":
        prompts = load_mtbench(archive=args.mtbench_archive)
    elif args.dataset == "code":
        prompts = load_code_prompts()
    elif args.dataset == "random":
        return random_prompts(args.num_prompts, args.input_len, args.output_len, args.seed,
                              args.range_ratio, tokenizer)
    else:
        return shared_prefix_prompts(args.num_prompts, args.num_prefixes, args.prefix_len,
                                     args.suffix_len, args.output_len, args.seed, tokenizer)
    return take(prompts, args.num_prompts, seed=args.seed if args.shuffle else None)


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(description="serving load generator (TTFT/TPOT/ITL/E2E)")
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--endpoint", default=None,
                   help="/v1/chat/completions (default for mtbench, code) or /v1/completions")
    p.add_argument("--metrics-url", default=None, help="default: BASE_URL/metrics")
    p.add_argument("--model", default=None, help="default: the first id of /v1/models")
    p.add_argument("--api-key", default=os.environ.get("SPECDEC_API_KEY")
                   or os.environ.get("OPENAI_API_KEY"))
    p.add_argument("--dataset", choices=["mtbench", "code", "random", "shared-prefix",
                                         "fim-keystrokes"], default="mtbench")
    p.add_argument("--file-tokens", type=int, default=2048, help="fim-keystrokes: file size")
    p.add_argument("--cursor-frac", type=float, default=0.6,
                   help="fim-keystrokes: where the typed line is, as a fraction of the file")
    p.add_argument("--keystroke-interval-ms", type=float, default=150.0,
                   help="fim-keystrokes: time between typed characters")
    p.add_argument("--mtbench-archive", default=None)
    p.add_argument("--num-prompts", type=int, default=80)
    p.add_argument("--shuffle", action="store_true", help="seeded shuffle of mtbench/code")
    p.add_argument("--max-tokens", type=int, default=256, help="for mtbench and code")
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--range-ratio", type=float, default=0.0)
    p.add_argument("--num-prefixes", type=int, default=4)
    p.add_argument("--prefix-len", type=int, default=512)
    p.add_argument("--suffix-len", type=int, default=64)
    p.add_argument("--tokenizer", default=None,
                   help="model dir or name: random text from its vocabulary (else English words)")
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=None,
                   help="send ignore_eos (default: on for random and shared-prefix)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--extra-body", type=json.loads, default={},
                   help='JSON merged into every body, e.g. \'{"num_speculative_tokens": 0}\'')
    p.add_argument("--request-rate", type=float, default=float("inf"))
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--num-warmups", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--percentiles", type=lambda s: [float(x) for x in s.split(",")],
                   default=[50.0, 90.0, 99.0])
    p.add_argument("--label", default="specdec", help="series name in plots (spec, no-spec)")
    p.add_argument("--output", default=None, help="JSON path (default bench/results/...)")
    p.add_argument("--save-detailed", action="store_true", help="per-request rows in the JSON")
    p.add_argument("--disable-tqdm", action="store_true")
    p.add_argument("--server-pid", type=int, default=None,
                   help="a local server's pid: report its resident memory (now and peak)")
    args = p.parse_args(argv)
    if args.num_prompts < 1:
        p.error(f"--num-prompts must be >= 1, got {args.num_prompts}")
    if not args.request_rate > 0:
        p.error(f"--request-rate must be > 0 (inf: all at once), got {args.request_rate}")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        p.error(f"--max-concurrency must be >= 1, got {args.max_concurrency}")
    if args.num_warmups < 0:
        p.error(f"--num-warmups must be >= 0, got {args.num_warmups}")
    if not isinstance(args.extra_body, dict):
        p.error(f"--extra-body must be a JSON object, got {args.extra_body!r}")
    if args.endpoint is None:
        args.endpoint = ("/v1/chat/completions" if args.dataset in ("mtbench", "code")
                         else "/v1/completions")
    if args.ignore_eos is None:
        args.ignore_eos = args.dataset in ("random", "shared-prefix")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tokenizer = None
    if args.tokenizer:
        sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from specdec.fetch import resolve_model_path
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(args.tokenizer))
    if args.dataset == "fim-keystrokes":
        return _main_keystrokes(args, tokenizer)
    prompts = load_prompts(args, tokenizer)
    try:
        result = asyncio.run(run_benchmark(args, prompts))
    except (RuntimeError, aiohttp.ClientError, asyncio.TimeoutError) as e:
        print(f"serve.py: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    summary = result["summary"]
    print_summary(summary, args)
    summary["server_startup_s"] = scrape_startup_seconds(
        args.metrics_url or args.base_url.rstrip("/") + "/metrics", args.api_key)
    if summary["server_startup_s"] is not None:
        print(f"server start to ready: {summary['server_startup_s']:.1f} s "
              f"(its specdec:startup_seconds)")
    if args.server_pid:
        summary["server_memory"] = proc_memory(args.server_pid)
        print(f"server pid {args.server_pid}: RSS {summary['server_memory']['rss_mb']:.0f} MB, "
              f"peak RSS {summary['server_memory']['peak_rss_mb']:.0f} MB")

    load = (f"rate{args.request_rate:g}" if math.isfinite(args.request_rate) else "rateinf")
    if args.max_concurrency:
        load += f"-conc{args.max_concurrency}"
    path = args.output or os.path.join(RESULTS_DIR,
                                       f"serve-{args.label}-{args.dataset}-{load}.json")
    out = {"benchmark": "serve", "label": args.label, "dataset": args.dataset,
           "request_rate": args.request_rate if math.isfinite(args.request_rate) else "inf",
           "max_concurrency": args.max_concurrency, "model": args.model,
           "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "args": {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v)
                    for k, v in vars(args).items() if k != "api_key"}, **summary}
    if args.save_detailed:
        out["requests"] = [asdict(o) for o in result["outcomes"]]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=2, default=str)
    print(f"wrote {path}", file=sys.stderr)
    return 0 if summary["completed"] else 1


def _main_keystrokes(args, tokenizer) -> int:
    from fim_keystrokes import print_keystrokes, run_keystrokes
    if args.max_tokens == 256:
        args.max_tokens = 48  # a completion, not an essay
    try:
        result = asyncio.run(run_keystrokes(args, tokenizer))
    except (RuntimeError, aiohttp.ClientError, asyncio.TimeoutError) as e:
        print(f"serve.py: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    summary = result["summary"]
    print_keystrokes(summary, args.label)
    path = args.output or os.path.join(RESULTS_DIR, f"fim-keystrokes-{args.label}.json")
    out = {"benchmark": "fim-keystrokes", "label": args.label, "model": args.model,
           "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "args": {k: v for k, v in vars(args).items() if k != "api_key"
                    and not (isinstance(v, float) and not math.isfinite(v))}, **summary}
    if args.save_detailed:
        out["requests"] = result["records"]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=2, default=str)
    print(f"wrote {path}", file=sys.stderr)
    return 0 if not summary["errors"] and summary["last_finish_reason"] else 1


if __name__ == "__main__":
    sys.exit(main())
