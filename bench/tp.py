"""Tensor parallelism on this machine: TP=1 (one process, T threads) against TP=2 (two
processes, T/2 threads each), same model, same prompts, greedy, offline engine.

Per system: generated tokens/s, target forwards (steps), wall time per step, and for TP=2 the
communication per step: the broadcast of the step input (header + packed ids/positions/slots/
block tables) and the forward's collectives (two all-reduces per layer, the embedding's
all-reduce, the logits gather), in milliseconds and as a share of the step. On a CPU the two
ranks share the memory bandwidth that one process with both threads already had, so TP=2 is
not expected to be faster here; the communication share is what carries over to judge a GPU
run (where NCCL replaces gloo).

    python bench/tp.py --model smollm2-135m-instruct --threads 2 --batch 1,4 --max-tokens 64
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

PROMPTS = ["Write a Python function that checks whether a number is prime.",
           "Explain what a paged key-value cache is in two sentences.",
           "List three uses of speculative decoding.",
           "Summarize the plot of a short story about a lighthouse keeper.",
           "What is the difference between a list and a tuple in Python?",
           "Give me a haiku about tensor parallelism.",
           "Describe how rejection sampling keeps a distribution exact.",
           "Write a SQL query that counts orders per customer."]


def run_system(model: str, dtype: str, tp: int, threads: int, batch: int, max_tokens: int,
               repeats: int) -> dict:
    from specdec.core.config import from_dict
    from specdec.core.request import SamplingParams
    from specdec.llm import LLM

    config = from_dict({"model": {"path": model, "dtype": dtype, "max_model_len": 1024},
                        "device": {"device": "cpu", "num_threads": threads},
                        "cache": {"num_blocks": 256}, "spec": {"method": "none"},
                        "parallel": {"tensor_parallel_size": tp}})
    llm = LLM(config)
    _count_forwards(llm)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        llm.generate(PROMPTS[:1], SamplingParams(temperature=0.0, max_tokens=8))  # warm-up
        driver = llm.engine.parallel
        before = driver.comm_stats() if driver else None
        steps0 = _steps(llm)
        tokens, t0 = 0, time.perf_counter()
        outputs = []
        for r in range(repeats):
            prompts = [PROMPTS[(r * batch + i) % len(PROMPTS)] for i in range(batch)]
            outs = llm.generate(prompts, params)
            tokens += sum(len(o.outputs[0].token_ids) for o in outs)
            outputs.append([o.outputs[0].token_ids for o in outs])
        seconds = time.perf_counter() - t0
        steps = _steps(llm) - steps0
        row = {"tp": tp, "threads_per_rank": threads if tp == 1 else
               __import__("torch").get_num_threads(), "batch": batch, "tokens": tokens,
               "seconds": round(seconds, 3), "tok_s": round(tokens / seconds, 2),
               "steps": steps, "step_ms": round(1e3 * seconds / max(steps, 1), 3),
               "outputs": outputs}
        if driver is not None:
            after = driver.comm_stats()
            n = max(after["steps"] - before["steps"], 1)
            bcast = 1e3 * (after["broadcast_s"] - before["broadcast_s"]) / n
            coll = 1e3 * (after["forward_comm_s"] - before["forward_comm_s"]) / n
            row.update(broadcast_ms=round(bcast, 3), collectives_ms=round(coll, 3),
                       comm_ms=round(bcast + coll, 3),
                       comm_share=round((bcast + coll) / row["step_ms"], 3))
        return row
    finally:
        llm.engine.close()


def _count_forwards(llm) -> None:
    """Count the target's forwards (the bench's own wrapper around the runner)."""
    runner = llm.engine.target_runner
    execute = runner.execute
    llm.forwards = 0

    def counted(*args, **kwargs):
        llm.forwards += 1
        return execute(*args, **kwargs)
    runner.execute = counted


def _steps(llm) -> int:
    return llm.forwards


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=2, help="TP=1 threads; TP=2: half per rank")
    parser.add_argument("--batch", default="1,4")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(REPO_ROOT, "bench", "results",
                                                      "tp-cpu.json"))
    args = parser.parse_args()
    load_before = os.getloadavg()
    rows = []
    for batch in [int(b) for b in args.batch.split(",")]:
        single = run_system(args.model, args.dtype, 1, args.threads, batch, args.max_tokens,
                            args.repeats)
        split = run_system(args.model, args.dtype, 2, max(1, args.threads // 2), batch,
                           args.max_tokens, args.repeats)
        # TP=1 with one rank's threads: how much of TP=1's time is the thread count (under
        # load, two OpenMP threads that wait on each other can cost more than they give)
        half = run_system(args.model, args.dtype, 1, max(1, args.threads // 2), batch,
                          args.max_tokens, args.repeats)
        reference = single.pop("outputs")
        split["same_tokens_as_tp1"] = split.pop("outputs") == reference
        half["same_tokens_as_tp1"] = half.pop("outputs") == reference
        split["speed_vs_tp1"] = round(split["tok_s"] / single["tok_s"], 3)
        half["speed_vs_tp1"] = round(half["tok_s"] / single["tok_s"], 3)
        rows += [single, split, half]
    print(f"{'tp':>3} {'thr/rank':>8} {'batch':>5} {'tok/s':>8} {'step ms':>8} "
          f"{'bcast ms':>8} {'coll ms':>8} {'comm %':>7} {'vs tp1':>6} same")
    for r in rows:
        print(f"{r['tp']:>3} {r['threads_per_rank']:>8} {r['batch']:>5} {r['tok_s']:>8} "
              f"{r['step_ms']:>8} {r.get('broadcast_ms', '-'):>8} "
              f"{r.get('collectives_ms', '-'):>8} "
              f"{round(100 * r['comm_share'], 1) if 'comm_share' in r else '-':>7} "
              f"{r.get('speed_vs_tp1', '-'):>6} {r.get('same_tokens_as_tp1', '-')}")
    result = {"model": args.model, "dtype": args.dtype, "max_tokens": args.max_tokens,
              "cpu_count": os.cpu_count(), "loadavg_before": load_before,
              "loadavg_after": os.getloadavg(), "rows": rows}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"load average before {load_before}, after {os.getloadavg()}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
