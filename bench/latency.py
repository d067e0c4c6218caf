"""Batch-1 latency: transformers `generate` against specdec, side by side, one process.

Systems (all greedy, same prompts with the chat template applied, same dtype and threads):
    hf           transformers generate
    hf-assisted  transformers assisted generation (assistant_model = the same draft model)
    hf-ngram     transformers prompt lookup decoding (prompt_lookup_num_tokens = k)
    ours         specdec, no speculation
    ours-draft   specdec with the draft model
    ours-ngram   specdec with the n-gram (prompt lookup) drafter
    ours-served  our server (`python -m server`) on the config as shipped, over HTTP
                 (ours-served-nospec: the same with spec.method = "none"); latency_served.py
    llamacpp     llama.cpp's llama-server on the same Q4_K_M GGUF (built once; see
                 latency_llamacpp.py), over HTTP
    llamacpp-draft  the same with the draft GGUF (-md, --spec-draft-n-max --llamacpp-k)

Each system loads, warms up on one prompt, then runs the prompts one at a time; with
--interleave every system is up at once and each prompt runs on all of them before the next
(the order rotating), so a machine whose speed drifts over minutes slows them alike and their
ratio holds. tokens/s is generated tokens / wall time, summed over prompts. The `same` column checks greedy outputs
token for token: ours-* against ours, hf-* against hf, and ours against hf (float32 kernels
may legitimately drift from transformers; our spec outputs must never drift from ours).

    python bench/latency.py --pair qwen --dataset code --num-prompts 8 --max-tokens 128
    python bench/latency.py --pair smollm2 --systems hf,ours,ours-ngram
    python bench/latency.py --pair qwen --dataset json   # schema-constrained (ours-* only)

With --dataset json every request carries its prompt's JSON Schema as a structured output;
the table adds the share of output tokens that were grammar-forced drafts and how many outputs
validate against their schema (transformers systems are skipped: they have no grammar).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # run as a script from a checkout without `pip install -e .`
    sys.path.append(REPO_ROOT)

from latency_common import (RequestResult, SystemResult, SystemRun,  # noqa: E402
                            encode_prompts, eos_token_ids, machine_info, memory_mb,
                            reset_peak_rss, run_interleaved, run_to_end, strip_eos, sync)
from latency_hf import run_hf  # noqa: E402
from prompts import (CODE_HELDOUT_PROMPTS, load_code_prompts, load_json_prompts,  # noqa: E402
                     load_mtbench, take)

RESULTS_DIR = os.path.join(REPO_ROOT, "bench", "results")
ALL_SYSTEMS = ("hf", "hf-assisted", "hf-ngram", "ours", "ours-draft", "ours-ngram",
               "ours-served", "ours-served-nospec", "llamacpp", "llamacpp-draft")
DRAFT_SYSTEMS = ("hf-assisted", "ours-draft", "llamacpp-draft")


@dataclass(frozen=True, slots=True)
class Pair:
    target: str
    draft: str | None
    config: str  # relative to the repo root


PAIRS = {
    "qwen": Pair("qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct",
                 "configs/qwen2.5-coder-1.5b+0.5b.toml"),
    "smollm2": Pair("smollm2-135m-instruct", None, "configs/smollm2-135m-ngram.toml"),
}


# ---------------------------------------------------------------- specdec systems


def our_config(name: str, args, pair: Pair | None, target_path: str, draft_path: str | None,
               max_len_needed: int):
    from specdec.core import config as cfg
    # NOTE: only the flags given override the config: the default run measures the default
    # config as `make serve` serves it (dtype, quantization, draft settings).
    overrides: dict[str, object] = {
        "model.path": target_path, "device.num_threads": args.threads,
        "device.device": args.device,
    }
    if args.dtype:
        overrides["model.dtype"] = args.dtype
    if args.quantization:
        overrides["model.quantization"] = args.quantization
    if name == "ours":
        overrides["spec.method"] = "none"
    else:
        overrides.update({"spec.method": "draft" if name == "ours-draft" else "ngram",
                          "spec.num_speculative_tokens": args.k,
                          "spec.adaptive": not args.fixed_k})
        if name == "ours-draft":
            overrides["spec.draft_model"] = draft_path
            if args.draft_dtype or args.dtype:
                overrides["spec.draft_dtype"] = args.draft_dtype or args.dtype
            if args.draft_quantization:
                overrides["spec.draft_quantization"] = args.draft_quantization
    config_path = args.config or (os.path.join(REPO_ROOT, pair.config) if pair else None)
    if config_path and os.path.isfile(config_path):
        config = cfg.load(config_path, overrides)
    else:
        config = cfg.from_dict({}, overrides)
    if config.model.max_model_len < max_len_needed:
        config = config.replace(**{"model.max_model_len": max_len_needed})
    return config


def run_ours(name: str, args, pair: Pair | None, target_path: str, draft_path: str | None,
             prompt_ids, prompts, eos_ids: list[int]) -> SystemRun:
    from specdec import LLM, SamplingParams
    from specdec.core import config as cfg
    max_len = max(len(ids) for ids in prompt_ids) + args.max_tokens + 1
    config = our_config(name, args, pair, target_path, draft_path, max_len)
    start = time.perf_counter()
    llm = LLM(config)
    result = SystemResult(name, time.perf_counter() - start, {"config": cfg.to_dict(config)})
    result.settings["startup"] = dict(getattr(llm.engine, "startup", {}))

    forced = {"tokens": 0, "valid": 0}

    def generate(ids: list[int], max_tokens: int, schema: dict | None = None) -> RequestResult:
        from specdec.core.request import StructuredOutput
        structured = None if schema is None else StructuredOutput("json", schema)
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, stop_token_ids=eos_ids,
                                min_tokens=max_tokens if args.ignore_eos else 0,
                                structured_output=structured)
        sync(args.device)
        t0 = time.perf_counter()
        (out,) = llm.generate([{"prompt_token_ids": ids}], params)
        sync(args.device)
        wall = time.perf_counter() - t0
        m = out.metrics
        if schema is not None:
            forced["tokens"] += m.num_forced_tokens
            forced["valid"] += schema_valid(out.outputs[0].text, schema)
        ttft = None
        if getattr(m, "first_token_time", None) and getattr(m, "arrival_time", None):
            ttft = m.first_token_time - m.arrival_time
        return RequestResult("", len(ids), list(out.outputs[0].token_ids), wall, ttft,
                             getattr(m, "num_drafts", 0) or 0,
                             getattr(m, "num_draft_tokens", 0) or 0,
                             getattr(m, "num_accepted_tokens", 0) or 0)

    generate(prompt_ids[0], args.warmup_tokens)
    forced.update(tokens=0, valid=0)
    yield  # a generator, as every system: after the warm-up and after each prompt
    for prompt, ids in zip(prompts, prompt_ids):
        request = generate(ids, args.max_tokens, prompt.schema)
        request.prompt_id = prompt.prompt_id
        result.requests.append(request)
        yield
    if args.dataset == "json":
        num_tokens = sum(len(r.token_ids) for r in result.requests)
        result.settings["forced_tokens"] = forced["tokens"]
        result.settings["forced_share"] = forced["tokens"] / num_tokens if num_tokens else 0.0
        result.settings["schema_valid"] = forced["valid"]
    del llm
    gc.collect()
    return result


def schema_valid(text: str, schema: dict) -> bool:
    try:
        import jsonschema
        jsonschema.validate(json.loads(text), schema)
    except Exception:  # invalid JSON, a schema violation, or jsonschema missing
        return False
    return True


def first_difference(got: list[int], want: list[int]) -> int | None:
    """Index of the first token where two greedy outputs differ (None: identical)."""
    for i, (a, b) in enumerate(zip(got, want)):
        if a != b:
            return i
    return None if len(got) == len(want) else min(len(got), len(want))


def explain_differences(results: dict[str, SystemResult], args, pair: Pair | None,
                        target_path: str, prompt_ids, eos_ids: list[int]) -> list[dict]:
    """Every ours-* request whose greedy tokens differ from ours: where, and how close the
    no-spec run's top two candidates were there (an untimed re-run with logprobs=2). A gap
    near zero is a tie that dtype rounding may break either way; a large one is a bug."""
    ours = results.get("ours")
    if ours is None:
        return []
    diffs = []
    for name, res in results.items():
        if not name.startswith("ours-"):
            continue
        for i, (got, want) in enumerate(zip(res.requests, ours.requests)):
            got_ids = strip_eos(got.token_ids, eos_ids)
            want_ids = strip_eos(want.token_ids, eos_ids)
            pos = first_difference(got_ids, want_ids)
            if pos is not None:
                diffs.append({"system": name, "prompt_id": want.prompt_id, "prompt_index": i,
                              "token_index": pos,
                              "ours_token": want_ids[pos] if pos < len(want_ids) else None,
                              "spec_token": got_ids[pos] if pos < len(got_ids) else None})
    if not diffs:
        return diffs
    from specdec import LLM, SamplingParams
    max_len = max(len(ids) for ids in prompt_ids) + args.max_tokens + 1
    llm = LLM(our_config("ours", args, pair, target_path, None, max_len))
    for d in diffs:
        num_tokens = d["token_index"] + 1
        params = SamplingParams(temperature=0.0, max_tokens=num_tokens, stop_token_ids=eos_ids,
                                min_tokens=num_tokens if args.ignore_eos else 0, logprobs=2)
        (out,) = llm.generate([{"prompt_token_ids": prompt_ids[d["prompt_index"]]}], params)
        logprobs = out.outputs[0].logprobs
        if len(logprobs) >= num_tokens:
            _, top = logprobs[d["token_index"]]
            d["top2_logprob_gap"] = top[0][1] - top[1][1]
            d["top2_tokens"] = [top[0][0], top[1][0]]
    del llm
    gc.collect()
    return diffs


# ---------------------------------------------------------------- report


def count_same(result: SystemResult, reference: SystemResult, eos_ids: list[int]) -> int:
    return sum(strip_eos(a.token_ids, eos_ids) == strip_eos(b.token_ids, eos_ids)
               for a, b in zip(result.requests, reference.requests))


def report(results: dict[str, SystemResult], eos_ids: list[int]) -> tuple[str, dict]:
    hf, ours = results.get("hf"), results.get("ours")
    header = (f"{'system':<12} {'tok/s':>8} {'x hf':>6} {'x ours':>7} {'accept':>7} "
              f"{'mean k':>7} {'ttft ms':>8} {'tokens':>7} {'same':>9} {'peak MB':>8}")
    lines = [header, "-" * len(header)]
    rows = {}
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    for name, res in results.items():
        summary = res.summary()
        reference = ours if name.startswith("ours-") else hf if name != "hf" else None
        if name == "ours":
            reference = hf
        if name.startswith("llamacpp"):  # its kernels differ from ours: informative only
            reference = results.get("llamacpp") if name != "llamacpp" else ours
        same = None
        if reference is not None:
            same = {"reference": reference.name, "identical": count_same(res, reference, eos_ids),
                    "total": len(res.requests)}
        summary["x_hf"] = res.tokens_per_s / hf.tokens_per_s if hf else None
        summary["x_ours"] = res.tokens_per_s / ours.tokens_per_s if ours else None
        summary["same_as"] = same
        rows[name] = summary
        ttft = summary["median_ttft_s"]
        same_text = "-" if same is None else f"{same['identical']}/{same['total']}"
        summary["peak_rss_mb"] = peak_mb(res)
        lines.append(f"{name:<12} {summary['tokens_per_s']:>8.2f} {fmt(summary['x_hf'], '.2f'):>6} "
                     f"{fmt(summary['x_ours'], '.2f'):>7} "
                     f"{fmt(summary['acceptance_length'], '.2f'):>7} "
                     f"{fmt(summary['mean_k'], '.2f'):>7} "
                     f"{fmt(None if ttft is None else ttft * 1e3, '.1f'):>8} "
                     f"{summary['num_output_tokens']:>7} {same_text:>9} "
                     f"{fmt(summary['peak_rss_mb'], '.0f'):>8}")
    return "\n".join(lines), rows


def peak_mb(res: SystemResult) -> float | None:
    """A server's peak: its own process's VmHWM. An in-process system's: this process's since
    the reset before it, or None where it shared the process (--interleave)."""
    if res.settings.get("peak_rss_mb") is not None:
        return res.settings["peak_rss_mb"]
    memory = res.settings.get("memory", {})
    return memory.get("peak_rss_mb") if memory.get("peak_is_own") else None


def memory_table(results: dict[str, SystemResult]) -> str:
    """Load time and peak resident memory per system (peak: since that system's start)."""
    lines = [f"{'system':<12} {'load s':>7} {'start s':>8} {'peak MB':>8} {'calibration':>12}"]
    for name, res in results.items():
        startup = res.settings.get("startup", {})
        peak = peak_mb(res)
        lines.append(f"{name:<12} {res.load_s:>7.2f} "
                     f"{startup.get('start_s', float('nan')):>8.2f} "
                     f"{'-' if peak is None else format(peak, '.0f'):>8} "
                     f"{startup.get('calibration', '-'):>12}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(description="batch-1 latency: transformers vs specdec")
    p.add_argument("--pair", choices=sorted(PAIRS), default="qwen")
    p.add_argument("--target", default=None, help="override the pair's target (dir or name)")
    p.add_argument("--draft", default=None, help="override the pair's draft (dir or name)")
    p.add_argument("--config", default=None, help="specdec TOML (default: the pair's)")
    p.add_argument("--dataset", choices=["code", "code-heldout", "mtbench", "json"],
                   default="code")
    p.add_argument("--mtbench-archive", default=None)
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--warmup-tokens", type=int, default=16)
    p.add_argument("--ignore-eos", action="store_true",
                   help="always generate --max-tokens (min_tokens / min_new_tokens)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="override the config's model.dtype (hf systems: float32 if unset)")
    p.add_argument("--draft-dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument("--draft-quantization", choices=["int8", "int4"], default=None)
    p.add_argument("--quantization", choices=["int8", "int4"], default=None,
                   help="target weight-only quantization (model.quantization)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--k", type=int, default=4, help="speculative tokens (k max when adaptive)")
    p.add_argument("--fixed-k", action="store_true", help="turn off our adaptive k")
    p.add_argument("--llamacpp-k", type=int, default=8,
                   help="llama.cpp's --spec-draft-n-max for llamacpp-draft")
    p.add_argument("--systems", default=None,
                   help=f"comma-separated subset of {','.join(ALL_SYSTEMS)}")
    p.add_argument("--interleave", action="store_true",
                   help="all systems up at once, each prompt on every system in turn (the "
                        "ratio then survives the machine's drift; in-process systems share "
                        "this process's memory)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-outputs", action="store_true", help="keep token ids in the JSON")
    p.add_argument("--output", default=None, help="JSON path (default bench/results/...)")
    args = p.parse_args(argv)
    if args.num_prompts < 1:
        p.error(f"--num-prompts must be >= 1, got {args.num_prompts}")
    if args.max_tokens < 1:
        p.error(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if not 1 <= args.k <= 16:
        p.error(f"--k must be in [1, 16], got {args.k}")
    return args, p


def main(argv: list[str] | None = None) -> int:
    args, parser = parse_args(argv)
    pair = PAIRS[args.pair]
    draft_name = args.draft or pair.draft
    default_systems = [s for s in ALL_SYSTEMS if draft_name or s not in DRAFT_SYSTEMS]
    if args.dataset == "json":  # transformers has no grammar: compare ours with and without spec
        default_systems = [s for s in default_systems if not s.startswith("hf")]
    systems = args.systems.split(",") if args.systems else default_systems
    for name in systems:
        if name not in ALL_SYSTEMS:
            parser.error(f"--systems: unknown system {name!r}; known: {', '.join(ALL_SYSTEMS)}")
        if name in DRAFT_SYSTEMS and not draft_name:
            parser.error(f"--systems {name} needs a draft model; --pair {args.pair} has none "
                         f"(give --draft)")
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    torch.manual_seed(args.seed)

    from specdec.fetch import resolve_model_path
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    target_path = resolve_model_path(args.target or pair.target)
    draft_path = resolve_model_path(draft_name) if draft_name else None
    tokenizer = AutoTokenizer.from_pretrained(target_path)
    eos_ids = eos_token_ids(target_path, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]

    if args.dataset == "json":
        if any(s.startswith("hf") for s in systems):
            parser.error("--dataset json runs ours-* systems only (transformers has no grammar)")
        dataset = load_json_prompts()
    else:
        dataset = (load_code_prompts() if args.dataset == "code"
                   else load_code_prompts(CODE_HELDOUT_PROMPTS) if args.dataset == "code-heldout"
                   else load_mtbench(archive=args.mtbench_archive))
    prompts = take(dataset, args.num_prompts)
    prompt_ids = encode_prompts(tokenizer, prompts)

    def system_run(name: str) -> SystemRun:
        if name.startswith("llamacpp"):
            from latency_llamacpp import run_llamacpp
            max_len = max(len(ids) for ids in prompt_ids) + args.max_tokens + 16
            return run_llamacpp(name, args, args.target or pair.target, draft_name,
                                prompt_ids, prompts, max_len)
        if name.startswith("ours-served"):
            from latency_served import run_served
            config_path = args.config or os.path.join(REPO_ROOT, pair.config)
            return run_served(name, args, config_path, prompt_ids, prompts)
        if name.startswith("hf"):
            return run_hf(name, args, target_path, draft_path, prompt_ids, prompts, eos_ids,
                          pad_id)
        return run_ours(name, args, pair, target_path, draft_path, prompt_ids, prompts, eos_ids)

    results: dict[str, SystemResult] = {}
    if args.interleave:
        def on_turn(name: str, i: int) -> None:
            what = "load and warm-up" if i < 0 else f"prompt {i + 1}/{len(prompts)}"
            print(f"[latency] {name}: {what}", file=sys.stderr, flush=True)

        results = run_interleaved({name: system_run(name) for name in systems}, len(prompts),
                                  on_turn)
        for res in results.values():
            # NOTE: the in-process systems share this process: its peak is theirs together
            res.settings["memory"] = dict(memory_mb(), peak_is_own=False)
    else:
        for name in systems:
            print(f"[latency] {name}: {len(prompts)} prompts x {args.max_tokens} tokens ...",
                  file=sys.stderr, flush=True)
            gc.collect()
            peak_is_own = reset_peak_rss()
            results[name] = run_to_end(system_run(name))
            # NOTE: one process runs every system: the peak is this system's only after a reset
            results[name].settings["memory"] = dict(memory_mb(), peak_is_own=peak_is_own)
            # NOTE: a table after every system, so a run cut off by a timeout keeps its numbers
            print(report(results, eos_ids)[0], file=sys.stderr, flush=True)
    table, rows = report(results, eos_ids)
    print(table)
    for name, res in results.items():
        if "forced_share" in res.settings:
            rows[name]["forced_share"] = res.settings["forced_share"]
            rows[name]["schema_valid"] = res.settings["schema_valid"]
            print(f"{name:<12} forced tokens {res.settings['forced_tokens']} "
                  f"({res.settings['forced_share']:.1%} of output), schema-valid outputs "
                  f"{res.settings['schema_valid']}/{len(res.requests)}")
    print(memory_table(results))
    differences = explain_differences(results, args, pair, target_path, prompt_ids, eos_ids)
    for d in differences:
        gap = d.get("top2_logprob_gap")
        print(f"differs: {d['system']} prompt {d['prompt_id']} token {d['token_index']}: "
              f"ours {d['ours_token']} vs {d['spec_token']}; ours' top-2 logprob gap there "
              f"{'-' if gap is None else format(gap, '.4f')} (tokens {d.get('top2_tokens')})")

    out = {
        "benchmark": "latency", "pair": args.pair, "target": target_path, "draft": draft_path,
        "dataset": args.dataset, "args": vars(args), "machine": machine_info(threads, args.device),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "summary": rows,
        "differences": differences,
        "systems": {
            name: {"load_s": res.load_s, "settings": res.settings,
                   "requests": [{k: v for k, v in asdict(r).items()
                                 if k != "token_ids" or args.save_outputs}
                                | {"num_output_tokens": len(r.token_ids)}
                                for r in res.requests]}
            for name, res in results.items()},
    }
    path = args.output or os.path.join(RESULTS_DIR, f"latency-{args.pair}-{args.dataset}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=2, default=str)
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
