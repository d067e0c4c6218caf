"""Local scale-out demo: one replica at twice the load against two replicas sharing it.

What the Kubernetes kit (deploy/k8s) does with an HPA on queue depth, on one machine: start
server processes on free localhost ports, each with its own fixed thread count (a pod's CPU
limit), and spread a closed-loop load over them round-robin (what a Service does). Two runs:

- `1x2C`: one replica, 2*C concurrent streams;
- `2xC`:  two replicas, the same 2*C streams spread over both (C each).

For each run and replica it reports output tokens/s, TTFT/TPOT medians and, from the replica's
/metrics counters, the acceptance length and mean k (how much speculation still does under that
replica's load). Prints a table and writes JSON to bench/results/.

    python bench/scaleout.py --config configs/smollm2-135m-ngram.toml --concurrency 2 \
        --num-prompts 24 --max-tokens 64 --threads 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time

import aiohttp

from prompts import load_code_prompts
from serve import RESULTS_DIR, scrape_counters, send_request
from serve_stats import spec_metrics, summarize

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start_replica(config: str, threads: int, memory_gb: float) -> tuple[subprocess.Popen, str]:
    """`python -m server` on port 0; returns the process and its URL once it says "ready"."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", "--config", config, "--host", "127.0.0.1",
         "--port", "0", "--device.num_threads", str(threads),
         "--cache.memory_gb", str(memory_gb), "--server.log_requests", "false",
         "--server.ui", "false"],
        stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    for line in proc.stderr:
        if '"event":"ready"' in line.replace(" ", ""):
            url = re.search(r'"url":\s*"([^"]+)"', line).group(1)
            # Keep draining stderr so the pipe never fills.
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            return proc, url
        if proc.poll() is not None:
            break
    proc.kill()
    raise SystemExit(f"replica failed to start: {line.strip()}")


async def run_load(urls: list[str], prompts, concurrency: int, args) -> dict:
    chat_urls = [u + "/v1/chat/completions" for u in urls]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as session:
        for url in chat_urls:  # warm-up, not measured
            await send_request(session, url, {}, _body(prompts[0], args), "warmup", True, 0.0)
        before = [await scrape_counters(session, u + "/metrics") for u in urls]
        results: list[list] = [[] for _ in urls]
        next_index = 0
        t_zero = time.perf_counter()

        async def worker():
            nonlocal next_index
            while next_index < args.num_prompts:
                i = next_index
                next_index += 1
                replica = i % len(urls)  # round-robin, as a Service spreads connections
                prompt = prompts[i % len(prompts)]
                outcome = await send_request(session, chat_urls[replica], {},
                                             _body(prompt, args), prompt.prompt_id, True, t_zero)
                results[replica].append(outcome)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        duration = time.perf_counter() - t_zero
        after = [await scrape_counters(session, u + "/metrics") for u in urls]
    per_replica = []
    for r, outcomes in enumerate(results):
        summary = summarize(outcomes, duration, [50, 90])
        summary["spec"] = spec_metrics(before[r], after[r])
        per_replica.append(summary)
    total = summarize([o for rs in results for o in rs], duration, [50, 90])
    return {"replicas": len(urls), "concurrency": concurrency, "duration_s": duration,
            "total": total, "per_replica": per_replica}


def _body(prompt, args) -> dict:
    return {"messages": [{"role": "user", "content": prompt.text}], "stream": True,
            "max_tokens": args.max_tokens, "temperature": args.temperature,
            "stream_options": {"include_usage": True}}


def run_scenario(num_replicas: int, concurrency: int, prompts, args) -> dict:
    replicas = []
    try:
        for _ in range(num_replicas):
            replicas.append(start_replica(args.config, args.threads, args.memory_gb))
        return asyncio.run(run_load([url for _, url in replicas], prompts, concurrency, args))
    finally:
        for proc, _ in replicas:
            proc.terminate()
        for proc, _ in replicas:
            proc.wait(60)


def _fmt(x, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def print_table(runs: dict) -> None:
    print(f"{'run':6} {'replica':8} {'reqs':>5} {'out tok/s':>10} {'TTFT p50 ms':>12} "
          f"{'TPOT p50 ms':>12} {'accept len':>11} {'mean k':>7}")
    for name, run in runs.items():
        rows = [(str(i), s) for i, s in enumerate(run["per_replica"])]
        rows.append(("all", dict(run["total"], spec={})))
        for label, s in rows:
            spec = s.get("spec") or {}
            print(f"{name:6} {label:8} {s['completed']:>5} {s['output_throughput']:>10.2f} "
                  f"{_fmt(s['ttft_ms']['median'], '.0f'):>12} "
                  f"{_fmt(s['tpot_ms']['median'], '.1f'):>12} "
                  f"{_fmt(spec.get('acceptance_length')):>11} {_fmt(spec.get('mean_k')):>7}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/smollm2-135m-ngram.toml")
    parser.add_argument("--concurrency", type=int, default=2, help="C: streams per replica "
                        "in the 2xC run (the 1x2C run sends 2*C to one replica)")
    parser.add_argument("--num-prompts", type=int, default=24, help="requests per run")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per replica")
    parser.add_argument("--memory-gb", type=float, default=0.25, help="KV cache per replica")
    parser.add_argument("--label", default="smollm2-code")
    args = parser.parse_args()

    prompts = load_code_prompts()
    runs = {"1x2C": run_scenario(1, 2 * args.concurrency, prompts, args),
            "2xC": run_scenario(2, 2 * args.concurrency, prompts, args)}
    print_table(runs)
    os.makedirs(RESULTS_DIR, exist_ok=True)
    out = os.path.join(RESULTS_DIR, f"scaleout-{args.label}-c{args.concurrency}.json")
    with open(out, "w") as f:
        json.dump({"args": vars(args), "machine": {"platform": platform.platform(),
                                                  "cpus": os.cpu_count()},
                   "runs": runs}, f, indent=1)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
