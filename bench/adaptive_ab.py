"""The adaptive controller against fixed k, offline, in one engine: every prompt runs once per
setting (adaptive, then k = 1..K through the request's `num_speculative_tokens`) in a shuffled
order each round, greedy. Prints tokens/s per setting and the cost tables the engine ended with.

    python bench/adaptive_ab.py --config configs/qwen2.5-coder-1.5b+0.5b.toml --first 6 --num-prompts 6

`--first 6` skips the code prompts latency.py runs by default, so the prompts are held out.
`--caps 5,8` runs the adaptive controller under each cap (the engine's cap set per request, so
give `--spec.num_speculative_tokens` the largest); `--max-k 0` runs no fixed k.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import prompts  # noqa: E402

from specdec.core.config import parse_overrides  # noqa: E402
from specdec.core.request import SamplingParams  # noqa: E402
from specdec.llm import LLM  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs/qwen2.5-coder-1.5b+0.5b.toml"))
    parser.add_argument("--first", type=int, default=6, help="skip this many code prompts")
    parser.add_argument("--num-prompts", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--max-k", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--caps", default="", help="adaptive caps, e.g. 5,8 (default: the "
                        "config's num_speculative_tokens)")
    parser.add_argument("--out", default=str(ROOT / "bench/results/adaptive-ab.json"))
    args, rest = parser.parse_known_args()
    llm = LLM.from_config(args.config, **parse_overrides(rest))
    tokenizer = llm.tokenizer
    chosen = prompts.load_code_prompts()[args.first:args.first + args.num_prompts]
    texts = [tokenizer.decode(llm.apply_chat_template([{"role": "user", "content": p.text}]))
             for p in chosen]
    engine = llm.engine
    caps = [int(c) for c in args.caps.split(",") if c] or [engine.controller.k_max]
    if max(caps) > engine.controller.k_max:
        parser.error(f"--caps {args.caps}: above the engine's cap {engine.controller.k_max}; "
                     "raise --spec.num_speculative_tokens")
    # a setting: ("adaptive", cap) or ("fixed", k)
    settings = [("adaptive", c) for c in caps] + [("fixed", k) for k in range(1, args.max_k + 1)]
    engine_cap = engine.controller.k_max

    def run(text, setting):
        kind, k = setting
        engine.controller.k_max = k if kind == "adaptive" else engine_cap
        try:
            return llm.generate([text], SamplingParams(
                temperature=0.0, max_tokens=args.max_tokens, repetition_penalty=1.0,
                num_speculative_tokens=k if kind == "fixed" else None))
        finally:
            engine.controller.k_max = engine_cap

    run(texts[0], settings[0])  # warm-up
    totals = collections.defaultdict(lambda: [0, 0.0])
    spec = collections.defaultdict(collections.Counter)  # speculation counters per setting
    for round_index in range(args.rounds):
        order = [(i, s) for i in range(len(texts)) for s in settings]
        random.Random(round_index).shuffle(order)
        for i, setting in order:
            before = dict(engine.counters)
            start = time.perf_counter()
            out = run(texts[i], setting)
            totals[setting][1] += time.perf_counter() - start
            totals[setting][0] += len(out[0].outputs[0].token_ids)
            for key in ("drafts", "draft_tokens", "accepted_tokens"):
                spec[setting][key] += engine.counters[key] - before.get(key, 0)
    rows = []
    for setting in settings:
        tokens, seconds = totals[setting]
        kind, k = setting
        name = k if kind == "fixed" else "adaptive" + (f"<={k}" if len(caps) > 1 else "")
        counts = spec[setting]
        windows = max(counts["drafts"], 1)
        rows.append({"k": name, "tokens": tokens, "seconds": seconds,
                     "tokens_per_s": tokens / max(seconds, 1e-9),
                     "mean_drafts": counts["draft_tokens"] / windows,
                     "acceptance_length": 1 + counts["accepted_tokens"] / windows})
        print(f"k {name!s:>20}: {rows[-1]['tokens_per_s']:.2f} tok/s, acceptance length "
              f"{rows[-1]['acceptance_length']:.2f} at {rows[-1]['mean_drafts']:.2f} drafts")
    tables = {role: {n: round(s * 1e3, 2) for n, s in sorted(runner.cost.table.items())}
              for role, runner in (("target", engine.target_runner),
                                   ("draft", engine.draft_runner)) if runner is not None}
    print("cost tables, ms:", tables)
    Path(args.out).write_text(json.dumps({
        "config": args.config, "prompts": [p.prompt_id for p in chosen],
        "max_tokens": args.max_tokens, "rounds": args.rounds, "load_average": os.getloadavg(),
        "results": rows, "cost_tables_ms": tables}, indent=1) + "\n")


if __name__ == "__main__":
    main()
