"""Multi-LoRA cost: a mixed load (base plus N adapters, round robin) against the base alone, at
several concurrencies, through the offline engine (same process, same prompts, greedy).

Adapters are random PEFT LoRAs on every projection (init_lora_weights=False, B scaled by
--b-scale so the output stays near the base's), built once into --adapter-dir. Concurrency c
submits c requests at a time to one LLM.generate call (continuous batching inside).
Prints a table (tokens/s, LoRA cost vs base, acceptance length per adapter) and writes JSON.

    python bench/lora.py --model smollm2-135m-instruct --spec ngram --num-adapters 4 \
        --concurrency 1,8 --num-prompts 16 --max-tokens 64
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.append(REPO_ROOT)

PROMPTS = ["Write a Python function that reverses a linked list.",
           "Explain what a paged KV cache is in two sentences.",
           "def fibonacci(n):", "List three uses of binary search.",
           "Write a haiku about compilers.", "What does HTTP 404 mean?",
           "Sort [5, 3, 9, 1] step by step.", "Summarize the rules of chess briefly."]


def build_adapters(model_path: str, out_dir: str, num: int, rank: int, b_scale: float) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    paths = {}
    for i in range(num):
        path = os.path.join(out_dir, f"lora{i}")
        paths[f"lora{i}"] = path
        if os.path.exists(os.path.join(path, "adapter_model.safetensors")):
            continue
        torch.manual_seed(100 + i)
        base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        model = get_peft_model(base, LoraConfig(
            r=rank, lora_alpha=2 * rank, init_lora_weights=False,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                            "down_proj"]))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.mul_(b_scale)
        model.save_pretrained(path)
    return paths


def run(llm, prompts, loras, concurrency: int, params):
    """Returns (seconds, generated tokens, {adapter: [drafts, accepted]})."""
    total, per_adapter = 0, {}
    t0 = time.perf_counter()
    for i in range(0, len(prompts), concurrency):
        chunk, chunk_loras = prompts[i:i + concurrency], loras[i:i + concurrency]
        outs = llm.generate(chunk, params, lora_request=chunk_loras)
        for out, lora in zip(outs, chunk_loras):
            total += len(out.outputs[0].token_ids)
            acc = per_adapter.setdefault(lora or "base", [0, 0])
            acc[0] += out.metrics.num_drafts
            acc[1] += out.metrics.num_accepted_tokens
    return time.perf_counter() - t0, total, per_adapter


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--spec", default="ngram", choices=["none", "ngram"])
    parser.add_argument("--num-adapters", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--b-scale", type=float, default=0.02)
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--adapter-dir", default=os.path.expanduser("~/.cache/specdec/bench-lora"))
    parser.add_argument("--out", default=os.path.join(REPO_ROOT, "bench", "results", "lora.json"))
    args = parser.parse_args(argv)

    from specdec import LLM, SamplingParams
    from specdec.core.config import Config
    from specdec.fetch import resolve_model_path
    model_path = resolve_model_path(args.model)
    adapters = build_adapters(model_path, args.adapter_dir, args.num_adapters, args.rank,
                              args.b_scale)
    overrides = {"model.path": model_path, "device.device": "cpu",
                 "device.num_threads": args.threads, "model.max_model_len": 1024,
                 "lora.modules": [f"{n}={p}" for n, p in adapters.items()],
                 "lora.max_lora_rank": args.rank, "lora.max_loras": args.num_adapters}
    if args.spec != "none":
        overrides.update({"spec.method": args.spec, "spec.num_speculative_tokens": 4})
    llm = LLM(Config().replace(**overrides))
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.num_prompts)]
    names = [None] + list(adapters)
    mixed = [names[i % len(names)] for i in range(args.num_prompts)]
    llm.generate(prompts[:2], params, lora_request=[None, names[1]])  # warm-up
    rows = []
    for c in (int(x) for x in args.concurrency.split(",")):
        base = run(llm, prompts, [None] * len(prompts), c, params)
        mix = run(llm, prompts, mixed, c, params)
        base_tps, mix_tps = base[1] / base[0], mix[1] / mix[0]
        acceptance = {k: round(1 + a / d, 3) if d else 1.0 for k, (d, a) in mix[2].items()}
        rows.append({"concurrency": c, "base_tok_s": round(base_tps, 2),
                     "mixed_tok_s": round(mix_tps, 2),
                     "lora_cost_pct": round(100 * (1 - mix_tps / base_tps), 1),
                     "acceptance_length": acceptance})
    print(f"{'conc':>4} {'base tok/s':>11} {'mixed tok/s':>12} {'cost %':>7}  acceptance length")
    for r in rows:
        acc = " ".join(f"{k}={v}" for k, v in r["acceptance_length"].items())
        print(f"{r['concurrency']:>4} {r['base_tok_s']:>11} {r['mixed_tok_s']:>12} "
              f"{r['lora_cost_pct']:>7}  {acc}")
    result = {"benchmark": "lora", "model": args.model, "spec": args.spec,
              "num_adapters": args.num_adapters, "rank": args.rank,
              "num_prompts": args.num_prompts, "max_tokens": args.max_tokens,
              "machine": f"{platform.processor() or platform.machine()}, "
                         f"{os.cpu_count()} CPUs", "rows": rows}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
