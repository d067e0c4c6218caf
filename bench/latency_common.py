"""What bench/latency.py measures and shares between its systems: per-request and per-system
results, the machine description, prompt encoding and stop ids, and this process's memory."""

from __future__ import annotations

import os
import platform
import statistics
from collections.abc import Generator
from dataclasses import dataclass, field

import torch

from prompts import BenchPrompt


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


# A system's run: a generator that loads the system and warms it up, yields, then runs one
# prompt per resumption (yielding after each) and returns its SystemResult after the last.
SystemRun = Generator[None, None, SystemResult]


def run_to_end(run: SystemRun) -> SystemResult:
    """Runs one system's prompts in a row."""
    while True:
        try:
            next(run)
        except StopIteration as stop:
            return stop.value


def run_interleaved(runs: dict[str, SystemRun], num_prompts: int,
                    on_turn=None) -> dict[str, SystemResult]:
    """Every system loads and warms up in turn (each stays up, idle, while the others run),
    then prompt i runs on every system before prompt i + 1, starting one system later each
    time. A machine whose speed drifts during the run (the shared dev VM: +-20-30 % over
    minutes) then slows every system alike, and their ratio holds; one after the other, it
    did not. `on_turn(name, i)` is called before each turn (i = -1: load and warm-up)."""
    names = list(runs)
    results: dict[str, SystemResult] = {}
    try:
        for name in names:
            if on_turn:
                on_turn(name, -1)
            next(runs[name])
        for i in range(num_prompts):
            shift = i % len(names)
            for name in names[shift:] + names[:shift]:
                if on_turn:
                    on_turn(name, i)
                next(runs[name])
        for name in names:
            results[name] = run_to_end(runs[name])
    finally:
        for run in runs.values():  # a failure anywhere stops every system (their servers)
            run.close()
    return results


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
            "platform": platform.platform(), "torch_threads": threads, "device": device,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def strip_eos(token_ids: list[int], eos_ids: list[int]) -> list[int]:
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


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux: /proc/self/clear_refs "5"), so
    that each system's peak is its own. False if the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_mb() -> dict[str, float]:
    """This process's resident memory now (rss_mb) and its peak since the last reset."""
    usage = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    usage["rss_mb"] = int(line.split()[1]) / 1024
                elif line.startswith("VmHWM:"):
                    usage["peak_rss_mb"] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return usage
