"""Batch-1 latency: transformers `generate` against specdec, side by side, one process.

Systems (all greedy, same prompts with the chat template applied, same dtype and threads):
    hf           transformers generate
    hf-assisted  transformers assisted generation (assistant_model = the same draft model)
    hf-ngram     transformers prompt lookup decoding (prompt_lookup_num_tokens = k)
    ours         specdec, no speculation
    ours-draft   specdec with the draft model
    ours-ngram   specdec with the n-gram (prompt lookup) drafter

Each system loads, warms up on one prompt, then runs the prompts one at a time. tokens/s is
generated tokens / wall time, summed over prompts. The `same` column checks greedy outputs
token for token: ours-* against ours, hf-* against hf, and ours against hf (float32 kernels
may legitimately drift from transformers; our spec outputs must never drift from ours).

    python bench/latency.py --pair qwen --dataset code --num-prompts 8 --max-tokens 128
    python bench/latency.py --pair smollm2 --systems hf,ours,ours-ngram
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # run as a script from a checkout without `pip install -e .`
    sys.path.append(REPO_ROOT)

from prompts import BenchPrompt, load_code_prompts, load_mtbench, take  # noqa: E402
RESULTS_DIR = os.path.join(REPO_ROOT, "bench", "results")
ALL_SYSTEMS = ("hf", "hf-assisted", "hf-ngram", "ours", "ours-draft", "ours-ngram")
DRAFT_SYSTEMS = ("hf-assisted", "ours-draft")


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


@dataclass(slots=True)
class RequestResult:
    prompt_id: str
    num_prompt_tokens: int
    token_ids: list[int]
    wall_s: float
    ttft_s: float | None = None
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0


@dataclass(slots=True)
class SystemResult:
    name: str
    load_s: float
    settings: dict
    requests: list[RequestResult] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(len(r.token_ids) for r in self.requests)

    @property
    def tokens_per_s(self) -> float:
        return self.num_tokens / max(sum(r.wall_s for r in self.requests), 1e-9)

    @property
    def num_drafts(self) -> int:
        return sum(r.num_drafts for r in self.requests)

    @property
    def acceptance_length(self) -> float | None:
        """vLLM's mean acceptance length: 1 + accepted draft tokens per draft."""
        if not self.num_drafts:
            return None
        return 1.0 + sum(r.num_accepted_tokens for r in self.requests) / self.num_drafts

    @property
    def mean_k(self) -> float | None:
        if not self.num_drafts:
            return None
        return sum(r.num_draft_tokens for r in self.requests) / self.num_drafts

    def summary(self) -> dict:
        walls = [r.wall_s for r in self.requests]
        ttfts = [r.ttft_s for r in self.requests if r.ttft_s is not None]
        per_request = [len(r.token_ids) / r.wall_s for r in self.requests if r.wall_s > 0]
        return {
            "num_requests": len(self.requests), "num_output_tokens": self.num_tokens,
            "total_wall_s": sum(walls), "tokens_per_s": self.tokens_per_s,
            "mean_request_tokens_per_s": statistics.fmean(per_request) if per_request else None,
            "median_ttft_s": statistics.median(ttfts) if ttfts else None,
            "acceptance_length": self.acceptance_length, "mean_k": self.mean_k,
            "num_drafts": self.num_drafts,
        }


# ---------------------------------------------------------------- shared helpers


def machine_info(threads: int, device: str) -> dict:
    cpu_model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import transformers
    info = {"cpu_model": cpu_model, "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "torch_threads": threads, "device": device}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _strip_eos(token_ids: list[int], eos_ids: list[int]) -> list[int]:
    while token_ids and token_ids[-1] in eos_ids:
        token_ids = token_ids[:-1]
    return token_ids


def eos_token_ids(model_path: str, tokenizer) -> list[int]:
    """Stop ids from the model's generation_config (a list for Qwen), else the tokenizer's."""
    from transformers import GenerationConfig
    try:
        eos = GenerationConfig.from_pretrained(model_path).eos_token_id
    except OSError:
        eos = None
    eos = tokenizer.eos_token_id if eos is None else eos
    return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))


def encode_prompts(tokenizer, prompts: list[BenchPrompt]) -> list[list[int]]:
    ids = []
    for prompt in prompts:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt.text}],
                                             add_generation_prompt=True, tokenize=False)
        ids.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ids


# ---------------------------------------------------------------- transformers systems


class _FirstTokenTimer:
    """A generate() streamer that notes when the first generated token arrives."""

    def __init__(self):
        self.num_puts = 0
        self.first_token_time: float | None = None

    def put(self, value) -> None:
        self.num_puts += 1
        if self.num_puts == 2 and self.first_token_time is None:  # the first put is the prompt
            self.first_token_time = time.perf_counter()

    def end(self) -> None:
        pass


def _load_hf(path: str, dtype: str, device: str, quantization: str | None = None):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device)
    model.eval()
    if quantization == "int8":
        if not device.startswith("cpu"):
            raise ValueError(f"--draft-quantization int8 for transformers needs the CPU, "
                             f"got --device {device}")
        model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, torch.qint8)
    return model


def run_hf(name: str, args, target_path: str, draft_path: str | None, prompt_ids, prompts,
           eos_ids: list[int], pad_id: int) -> SystemResult:
    start = time.perf_counter()
    model = _load_hf(target_path, args.dtype, args.device)
    kwargs: dict = {}
    settings: dict = {"model": target_path}
    if name == "hf-assisted":
        # NOTE: transformers gets its draft unquantized: torch's dynamic int8 also quantizes
        # activations, which ruins its acceptance; weight-only int8 is our own design choice.
        assistant = _load_hf(draft_path, args.draft_dtype or args.dtype, args.device)
        # NOTE: transformers adapts its own k (confidence threshold, heuristic schedule);
        # we only set where it starts, and record what it used.
        assistant.generation_config.num_assistant_tokens = args.k
        kwargs["assistant_model"] = assistant
        settings.update(draft=draft_path, num_assistant_tokens=args.k,
                        schedule=assistant.generation_config.num_assistant_tokens_schedule,
                        draft_quantization=None)
    elif name == "hf-ngram":
        kwargs["prompt_lookup_num_tokens"] = args.k
        settings["prompt_lookup_num_tokens"] = args.k
    load_s = time.perf_counter() - start
    result = SystemResult(name, load_s, settings)

    def generate(ids: list[int], max_tokens: int) -> RequestResult:
        input_ids = torch.tensor([ids], device=args.device)
        timer = _FirstTokenTimer()
        extra = {"min_new_tokens": max_tokens} if args.ignore_eos else {}
        _sync(args.device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                 max_new_tokens=max_tokens, do_sample=False, temperature=None,
                                 top_p=None, top_k=None, eos_token_id=eos_ids or None,
                                 pad_token_id=pad_id, streamer=timer, **kwargs, **extra)
        _sync(args.device)
        wall = time.perf_counter() - t0
        ttft = None if timer.first_token_time is None else timer.first_token_time - t0
        return RequestResult("", len(ids), out[0, len(ids):].tolist(), wall, ttft)

    generate(prompt_ids[0], args.warmup_tokens)
    for prompt, ids in zip(prompts, prompt_ids):
        request = generate(ids, args.max_tokens)
        request.prompt_id = prompt.prompt_id
        result.requests.append(request)
    del model, kwargs
    gc.collect()
    return result


# ---------------------------------------------------------------- specdec systems


def our_config(name: str, args, pair: Pair | None, target_path: str, draft_path: str | None,
               max_len_needed: int):
    from specdec import config as cfg
    overrides: dict[str, object] = {
        "model.path": target_path, "model.dtype": args.dtype,
        "device.num_threads": args.threads, "device.device": args.device,
    }
    if name == "ours":
        overrides["spec.method"] = "none"
    else:
        overrides.update({"spec.method": "draft" if name == "ours-draft" else "ngram",
                          "spec.num_speculative_tokens": args.k,
                          "spec.adaptive": not args.fixed_k})
        if name == "ours-draft":
            overrides.update({"spec.draft_model": draft_path,
                              "spec.draft_dtype": args.draft_dtype or args.dtype,
                              "spec.draft_quantization": args.draft_quantization})
    config_path = args.config or (os.path.join(REPO_ROOT, pair.config) if pair else None)
    if config_path and os.path.isfile(config_path):
        config = cfg.load(config_path, overrides)
    else:
        config = cfg.from_dict({}, overrides)
    if config.model.max_model_len < max_len_needed:
        config = config.replace(**{"model.max_model_len": max_len_needed})
    return config


def run_ours(name: str, args, pair: Pair | None, target_path: str, draft_path: str | None,
             prompt_ids, prompts, eos_ids: list[int]) -> SystemResult:
    from specdec import LLM, SamplingParams, config as cfg
    max_len = max(len(ids) for ids in prompt_ids) + args.max_tokens + 1
    config = our_config(name, args, pair, target_path, draft_path, max_len)
    start = time.perf_counter()
    llm = LLM(config)
    result = SystemResult(name, time.perf_counter() - start, {"config": cfg.to_dict(config)})

    def generate(ids: list[int], max_tokens: int) -> RequestResult:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, stop_token_ids=eos_ids,
                                min_tokens=max_tokens if args.ignore_eos else 0)
        _sync(args.device)
        t0 = time.perf_counter()
        (out,) = llm.generate([{"prompt_token_ids": ids}], params)
        _sync(args.device)
        wall = time.perf_counter() - t0
        m = out.metrics
        ttft = None
        if getattr(m, "first_token_time", None) and getattr(m, "arrival_time", None):
            ttft = m.first_token_time - m.arrival_time
        return RequestResult("", len(ids), list(out.outputs[0].token_ids), wall, ttft,
                             getattr(m, "num_drafts", 0) or 0,
                             getattr(m, "num_draft_tokens", 0) or 0,
                             getattr(m, "num_accepted_tokens", 0) or 0)

    generate(prompt_ids[0], args.warmup_tokens)
    for prompt, ids in zip(prompts, prompt_ids):
        request = generate(ids, args.max_tokens)
        request.prompt_id = prompt.prompt_id
        result.requests.append(request)
    del llm
    gc.collect()
    return result


# ---------------------------------------------------------------- report


def count_same(result: SystemResult, reference: SystemResult, eos_ids: list[int]) -> int:
    return sum(_strip_eos(a.token_ids, eos_ids) == _strip_eos(b.token_ids, eos_ids)
               for a, b in zip(result.requests, reference.requests))


def report(results: dict[str, SystemResult], eos_ids: list[int]) -> tuple[str, dict]:
    hf, ours = results.get("hf"), results.get("ours")
    header = (f"{'system':<12} {'tok/s':>8} {'x hf':>6} {'x ours':>7} {'accept':>7} "
              f"{'mean k':>7} {'ttft ms':>8} {'tokens':>7} {'same':>9}")
    lines = [header, "-" * len(header)]
    rows = {}
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    for name, res in results.items():
        summary = res.summary()
        reference = ours if name.startswith("ours-") else hf if name != "hf" else None
        if name == "ours":
            reference = hf
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
        lines.append(f"{name:<12} {summary['tokens_per_s']:>8.2f} {fmt(summary['x_hf'], '.2f'):>6} "
                     f"{fmt(summary['x_ours'], '.2f'):>7} "
                     f"{fmt(summary['acceptance_length'], '.2f'):>7} "
                     f"{fmt(summary['mean_k'], '.2f'):>7} "
                     f"{fmt(None if ttft is None else ttft * 1e3, '.1f'):>8} "
                     f"{summary['num_output_tokens']:>7} {same_text:>9}")
    return "\n".join(lines), rows


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(description="batch-1 latency: transformers vs specdec")
    p.add_argument("--pair", choices=sorted(PAIRS), default="qwen")
    p.add_argument("--target", default=None, help="override the pair's target (dir or name)")
    p.add_argument("--draft", default=None, help="override the pair's draft (dir or name)")
    p.add_argument("--config", default=None, help="specdec TOML (default: the pair's)")
    p.add_argument("--dataset", choices=["code", "mtbench"], default="code")
    p.add_argument("--mtbench-archive", default=None)
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--warmup-tokens", type=int, default=16)
    p.add_argument("--ignore-eos", action="store_true",
                   help="always generate --max-tokens (min_tokens / min_new_tokens)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--draft-dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument("--draft-quantization", choices=["int8"], default=None)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--k", type=int, default=4, help="speculative tokens (k max when adaptive)")
    p.add_argument("--fixed-k", action="store_true", help="turn off our adaptive k")
    p.add_argument("--systems", default=None,
                   help=f"comma-separated subset of {','.join(ALL_SYSTEMS)}")
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

    dataset = load_code_prompts() if args.dataset == "code" else load_mtbench(
        archive=args.mtbench_archive)
    prompts = take(dataset, args.num_prompts)
    prompt_ids = encode_prompts(tokenizer, prompts)

    results: dict[str, SystemResult] = {}
    for name in systems:
        print(f"[latency] {name}: {len(prompts)} prompts x {args.max_tokens} tokens ...",
              file=sys.stderr, flush=True)
        if name.startswith("hf"):
            results[name] = run_hf(name, args, target_path, draft_path, prompt_ids, prompts,
                                   eos_ids, pad_id)
        else:
            results[name] = run_ours(name, args, pair, target_path, draft_path, prompt_ids,
                                     prompts, eos_ids)
    table, rows = report(results, eos_ids)
    print(table)

    out = {
        "benchmark": "latency", "pair": args.pair, "target": target_path, "draft": draft_path,
        "dataset": args.dataset, "args": vars(args), "machine": machine_info(threads, args.device),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "summary": rows,
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
