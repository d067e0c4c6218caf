"""Prompt lookup beside the draft model (`spec.prompt_lookup`), A/B in one engine.

One engine of the config as shipped (by default the Qwen pair), prefix caching off (every run
of a prompt pays its prefill), and per prompt one greedy run in each mode, in a rotating
order: `off` (the draft model alone) and `MIN:NGRAM` (lookup on, a MIN-token match proposes
with no draft forward, a NGRAM..4-token match that agrees with a draft token ends the
drafting). Counts every decode-size forward (at most 16 rows) of the target and the draft, so
a mode's cost can be read apart from the machine's noise: verify calls and rows, draft calls.

    python bench/lookup_ab.py --dataset code-heldout --modes 4:2,6:2
    python bench/lookup_ab.py --num-prompts 4 --max-tokens 32 --fixed-k 4 --modes 4:2
    python bench/lookup_ab.py --config configs/tiny-random-pair.toml --model.quantization int4

`same` counts a mode's outputs equal to the `off` run's, token for token (greedy; both are
speculative runs of one target, so a difference is a near-tie or a bug).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.append(REPO_ROOT)

from latency_common import machine_info  # noqa: E402
from prompts import CODE_HELDOUT_PROMPTS, CODE_PROMPTS, load_code_prompts, take  # noqa: E402

DEFAULT_CONFIG = os.path.join(REPO_ROOT, "configs", "qwen2.5-coder-1.5b+0.5b.toml")
MAX_DECODE_ROWS = 16  # forwards with more rows are prefill chunks


def count_forwards(model, label: str, counts: collections.Counter) -> None:
    forward = model.forward

    def counted(batch, *args, **kwargs):
        start = time.perf_counter()
        out = forward(batch, *args, **kwargs)
        rows = int(batch.input_ids.numel())
        if rows <= MAX_DECODE_ROWS:
            counts[f"{label}_calls"] += 1
            counts[f"{label}_rows"] += rows
            counts[f"{label}_s"] += time.perf_counter() - start
        return out

    model.forward = counted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=DEFAULT_CONFIG)
    parser.add_argument("--dataset", choices=["code", "code-heldout"], default="code-heldout")
    parser.add_argument("--num-prompts", type=int, default=None, help="default: all")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--modes", default="4:2", help="MIN:NGRAM,... beside `off`")
    parser.add_argument("--fixed-k", type=int, default=None, help="k, not adaptive")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(REPO_ROOT, "bench", "results",
                                                      "lookup-ab.json"))
    args, rest = parser.parse_known_args(argv)  # the rest: config overrides, --key value

    from specdec import LLM, SamplingParams
    from specdec.core import config as cfg
    from specdec.spec.drafters import NgramDrafter

    modes: dict[str, tuple[int, int] | None] = {"off": None}
    for spec in args.modes.split(","):
        first, ngram = (int(v) for v in spec.split(":"))
        modes[spec] = (first, ngram)
    overrides: dict[str, object] = {"spec.prompt_lookup": True,
                                    "cache.enable_prefix_caching": False}
    if args.threads:
        overrides["device.num_threads"] = args.threads
    if args.fixed_k is not None:
        overrides.update({"spec.num_speculative_tokens": args.fixed_k, "spec.adaptive": False})
    overrides.update(cfg.parse_overrides(rest))
    config = cfg.load(args.config, overrides)
    llm = LLM(config)
    engine = llm.engine
    drafter = engine.drafter
    counts: collections.Counter = collections.Counter()
    count_forwards(engine.target_runner.model, "verify", counts)
    count_forwards(drafter.runner.model, "draft", counts)

    path = CODE_HELDOUT_PROMPTS if args.dataset == "code-heldout" else CODE_PROMPTS
    prompts = take(load_code_prompts(path), args.num_prompts)
    ids = [llm.apply_chat_template([{"role": "user", "content": p.text}]) for p in prompts]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    llm.generate([{"prompt_token_ids": ids[0]}], SamplingParams(temperature=0.0, max_tokens=8))

    totals = {m: collections.Counter() for m in modes}
    outputs: dict[str, list[list[int]]] = {m: [] for m in modes}
    names = list(modes)
    for turn, prompt_ids in enumerate(ids):
        for mode in names[turn % len(names):] + names[:turn % len(names)]:
            setting = modes[mode]
            if setting is None:
                drafter.lookup = drafter.first = None
            else:
                drafter.lookup = NgramDrafter(setting[1], max(setting[1], 4))
                drafter.first = NgramDrafter(setting[0], max(setting[0], 4))
            before = counts.copy()
            lookup_before = engine.counters["lookup_tokens"]
            start = time.perf_counter()
            (out,) = llm.generate([{"prompt_token_ids": prompt_ids}], params)
            wall = time.perf_counter() - start
            tokens = list(out.outputs[0].token_ids)
            outputs[mode].append(tokens)
            totals[mode].update(counts - before)
            totals[mode].update(tokens=len(tokens), wall_s=wall,
                                lookup_tokens=engine.counters["lookup_tokens"] - lookup_before)

    rows = []
    print(f"{len(prompts)} prompts ({args.dataset}) x {args.max_tokens} tokens, "
          f"{'k = %d' % args.fixed_k if args.fixed_k is not None else 'adaptive k'}")
    print("mode      tok/s  decode ms/tok  verify calls  rows  draft calls  lookup tok  same")
    for mode, c in totals.items():
        same = sum(a == b for a, b in zip(outputs[mode], outputs["off"]))
        decode_ms = (c["verify_s"] + c["draft_s"]) * 1e3 / max(c["tokens"], 1)
        row = {"mode": mode, "tokens": c["tokens"], "wall_s": c["wall_s"],
               "tokens_per_s": c["tokens"] / c["wall_s"], "decode_ms_per_token": decode_ms,
               "verify_calls": c["verify_calls"], "verify_rows": c["verify_rows"],
               "draft_calls": c["draft_calls"], "lookup_tokens": c["lookup_tokens"],
               "same_as_off": same}
        rows.append(row)
        print(f"{mode:8s} {row['tokens_per_s']:6.2f} {decode_ms:14.2f} {c['verify_calls']:13d} "
              f"{c['verify_rows']:5d} {c['draft_calls']:12d} {c['lookup_tokens']:11d} "
              f"{same:3d}/{len(prompts)}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump({"benchmark": "lookup_ab", "args": vars(args),
                   "machine": machine_info(config.device.num_threads or 0, "cpu"),
                   "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "modes": rows}, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
