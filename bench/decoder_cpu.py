"""One forward of the config's target and draft, the fused CPU decoder stack
(specdec/kernels/decoder_cpu.cpp) against the model's layer loop, at 1..8 rows of one sequence
over a cached context, interleaved in one process: median ms per forward (logits included),
each row count against one row, and the stack against the loop. Also the four q4 matmuls of
every layer plus the lm_head alone ("q4 only": the floor the stack adds its other ops to).

    python bench/decoder_cpu.py --config configs/qwen2.5-coder-1.5b+0.5b.toml --rows 1,5 --context 300
    python bench/decoder_cpu.py --config configs/tiny-random-pair.toml --model.quantization int4 \
        --spec.draft_quantization int4 --rounds 1      (the suite's smoke run)

The context is random token ids written through the layer loop (a prefill); every timed
forward then writes the same window's slots again, so the cache does not grow.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from specdec.core.config import load, parse_overrides  # noqa: E402
from specdec.engine import Engine  # noqa: E402
from specdec.kernels import decoder_cpu, q4_cpu  # noqa: E402
from specdec.model.llama import ForwardBatch  # noqa: E402


def window(rows: int, context: int, block_size: int, vocab: int) -> ForwardBatch:
    """The last `rows` positions of a `context`-token sequence in blocks 0, 1, ..."""
    positions = torch.arange(context - rows, context)
    num_blocks = -(-context // block_size)
    return ForwardBatch(
        input_ids=torch.randint(3, min(vocab, 1000), (rows,)), positions=positions,
        slot_mapping=positions.clone(),
        block_tables=torch.arange(num_blocks, dtype=torch.int32)[None],
        seq_lens=torch.tensor([context], dtype=torch.int32),
        query_start_loc=torch.tensor([0, rows], dtype=torch.int32),
        logits_indices=torch.arange(rows), query_lens=[rows], seq_lens_list=[context],
        use_kernels=False)


def q4_only(model, xs: dict[int, torch.Tensor]) -> None:
    kernel = q4_cpu.load_kernel()
    for layer in model.layers:
        for name in decoder_cpu.PROJECTIONS:
            proj = getattr(layer, name)
            q4_cpu.q4_linear(kernel, xs[proj.in_features], proj.q4_packed, proj.q4_scale_zero)
    head = model.lm_head
    q4_cpu.q4_linear(kernel, xs[head.in_features], head.q4_packed, head.q4_scale_zero)


def config_runners(config: str, rest: list[str]) -> dict:
    """{"target": runner, "draft": runner (where the config has one)} of an engine built from
    `config` with `rest`'s --section.key VALUE overrides (as `specdec serve` takes them)."""
    engine = Engine(load(config, {"spec.adaptive": False, **parse_overrides(rest)}))
    runners = {"target": engine.target_runner}
    if engine.draft_runner is not None:
        runners["draft"] = engine.draft_runner
    return runners


def median_ms(cases: dict, rounds: int) -> dict:
    """Median ms of each case over `rounds`, all cases in a fresh random order each round
    (round 0 warms up and is not counted)."""
    times = {key: [] for key in cases}
    order = list(cases)
    for round_index in range(rounds + 1):
        random.Random(round_index).shuffle(order)
        for key in order:
            start = time.perf_counter()
            cases[key]()
            if round_index:
                times[key].append(time.perf_counter() - start)
    return {key: 1e3 * statistics.median(v) for key, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs/qwen2.5-coder-1.5b+0.5b.toml"))
    parser.add_argument("--rows", default="1,5")
    parser.add_argument("--context", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", default=str(ROOT / "bench/results/decoder-cpu.json"))
    args, rest = parser.parse_known_args()
    runners = config_runners(args.config, rest)
    rows = [int(r) for r in args.rows.split(",")]
    cases = {}
    for role, runner in runners.items():
        model, caches = runner.model, runner.kv_caches
        if decoder_cpu.build(model, caches) is None:
            sys.exit(f"{role}: the fused stack cannot run this model (not q4 int4 on the CPU)")
        block_size = caches[0][0].shape[1]
        model._decoder = False  # the prefill through the layer loop
        model(window(args.context, args.context, block_size, model.num_real_tokens), caches)
        model._decoder = None
        for n in rows:
            batch = window(n, args.context, block_size, model.num_real_tokens)
            model(batch, caches)  # builds the stack
            stack = model._decoder
            xs = {}
            for layer in (model.layers[0], model.lm_head):
                for proj in ([getattr(layer, p) for p in decoder_cpu.PROJECTIONS]
                             if layer is not model.lm_head else [layer]):
                    xs[proj.in_features] = torch.randn(n, proj.in_features)

            def fused(model=model, batch=batch, caches=caches, stack=stack):
                model._decoder = stack
                model(batch, caches)

            def loop(model=model, batch=batch, caches=caches):
                model._decoder = False
                model(batch, caches)

            cases[(role, n, "stack")] = fused
            cases[(role, n, "loop")] = loop
            cases[(role, n, "q4 only")] = lambda model=model, xs=xs: q4_only(model, xs)
    load_avg = os.getloadavg()
    median = median_ms(cases, args.rounds)
    print(f"{args.rounds} rounds, context {args.context}, {torch.get_num_threads()} threads, "
          f"load average {load_avg[0]:.2f}")
    print(f"{'model':<7} {'rows':>4} {'stack ms':>9} {'loop ms':>8} {'q4 only':>8} "
          f"{'loop/stack':>10} {'stack/1 row':>11}")
    results = []
    for role in runners:
        for n in rows:
            s, lp, q = (median[(role, n, kind)] for kind in ("stack", "loop", "q4 only"))
            per_row = s / median[(role, rows[0], "stack")]
            print(f"{role:<7} {n:>4} {s:>9.2f} {lp:>8.2f} {q:>8.2f} {lp / s:>10.2f} "
                  f"{per_row:>11.2f}")
            results.append({"model": role, "rows": n, "stack_ms": s, "loop_ms": lp,
                            "q4_only_ms": q})
    Path(args.out).write_text(json.dumps({
        "config": args.config, "context": args.context, "rounds": args.rounds,
        "threads": torch.get_num_threads(), "load_average": load_avg,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "results": results},
        indent=1) + "\n")


if __name__ == "__main__":
    main()
