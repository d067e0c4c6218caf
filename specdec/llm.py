"""The offline API in vLLM's shape: `LLM(config)`, `generate(prompts, params)`, `chat(...)`,
and `specdec generate` on the command line."""

from __future__ import annotations

import dataclasses
import itertools
import time

from specdec.core.config import Config, load, parse_overrides
from specdec.engine import Engine, RequestOutput
from specdec.core.request import SamplingParams
from specdec.model.lora import LoRARequest  # noqa: F401 - vLLM's import site: specdec.llm

class LLM:
    """Offline API in vLLM's shape: `LLM(config)`, `generate(prompts, params)`, `chat(...)`.

    `tensor_parallel_size=N` (vLLM's keyword) is `parallel.tensor_parallel_size`; other
    overrides are dotted config keys."""

    def __init__(self, config: Config | None = None, tensor_parallel_size: int | None = None,
                 **overrides):
        config = config or Config()
        if tensor_parallel_size is not None:
            overrides["parallel.tensor_parallel_size"] = tensor_parallel_size
        if overrides:
            config = config.replace(**overrides)
        self.engine = Engine(config)
        self._counter = itertools.count()

    @classmethod
    def from_config(cls, path: str, **overrides) -> "LLM":
        return cls(load(path, overrides))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False, lora_request=None) -> list[RequestOutput]:
        """A prompt is a string or {"prompt_token_ids": [...]} (or {"prompt": str}).
        `lora_request`: a LoRARequest (or adapter name), or a list of them, one per prompt."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        loras = lora_request if isinstance(lora_request, list) else [lora_request] * len(prompts)
        if len(loras) != len(prompts):
            raise ValueError(f"lora_request has {len(loras)} entries for {len(prompts)} prompts")
        params = sampling_params or SamplingParams()
        params = params if isinstance(params, list) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"sampling_params has {len(params)} entries for {len(prompts)} prompts")
        children: dict[str, tuple[int, int]] = {}
        try:
            for i, (prompt, p, lora) in enumerate(zip(prompts, params, loras)):
                if isinstance(prompt, dict):
                    prompt = (prompt["prompt_token_ids"] if "prompt_token_ids" in prompt
                              else prompt.get("prompt"))
                base = f"gen-{next(self._counter)}"
                for j in range(p.n):
                    child = dataclasses.replace(p, n=1, seed=None if p.seed is None else p.seed + j)
                    rid = f"{base}-{j}"
                    self.engine.add_request(rid, prompt, child, lora_request=lora)
                    children[rid] = (i, j)
            finals = self._run(set(children), use_tqdm)
        except BaseException:
            for rid in children:
                self.engine.abort_request(rid)
            raise
        merged: list[RequestOutput | None] = [None] * len(prompts)
        for rid, (i, j) in sorted(children.items(), key=lambda kv: kv[1]):
            out = finals[rid]
            out.outputs[0].index = j
            if merged[i] is None:
                merged[i] = RequestOutput(f"gen-{i}", out.prompt, out.prompt_token_ids,
                                          [], True, out.metrics)
            merged[i].outputs.append(out.outputs[0])
        return merged

    def _run(self, pending: set[str], use_tqdm: bool) -> dict[str, RequestOutput]:
        finals: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm import tqdm
            bar = tqdm(total=len(pending), desc="generate")
        while pending:
            for out in self.engine.step():
                if out.finished and out.request_id in pending:
                    finals[out.request_id] = out
                    pending.discard(out.request_id)
                    if bar is not None:
                        bar.update(1)
            if not self.engine.has_unfinished_requests() and pending:
                raise RuntimeError(f"requests vanished without finishing: {sorted(pending)}")
        if bar is not None:
            bar.close()
        return finals

    def chat(self, messages, sampling_params: SamplingParams | None = None,
             use_tqdm: bool = False) -> list[RequestOutput]:
        """`messages` is one conversation (a list of {"role", "content"}) or a list of them."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [{"prompt_token_ids": self.apply_chat_template(c)} for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def apply_chat_template(self, messages) -> list[int]:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                 tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)


def generate_main(argv: list[str]) -> int:
    """`specdec generate --config X.toml --prompt "..." [--max-tokens N] [--section.key V ...]`."""
    import argparse
    parser = argparse.ArgumentParser(prog="specdec generate")
    parser.add_argument("--config", required=True)
    parser.add_argument("--prompt", action="append", required=True)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--chat", action="store_true", help="apply the chat template")
    parser.add_argument("--tensor-parallel-size", "-tp", type=int,
                        help="split the target model over N ranks (N - 1 worker processes)")
    args, rest = parser.parse_known_args(argv)
    overrides = parse_overrides(rest)
    if args.tensor_parallel_size is not None:
        overrides["parallel.tensor_parallel_size"] = args.tensor_parallel_size
    llm = LLM.from_config(args.config, **overrides)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
    t0 = time.perf_counter()
    if args.chat:
        outs = llm.chat([[{"role": "user", "content": p}] for p in args.prompt], params)
    else:
        outs = llm.generate(args.prompt, params)
    seconds = time.perf_counter() - t0
    total = 0
    for prompt, out in zip(args.prompt, outs):
        c = out.outputs[0]
        total += len(c.token_ids)
        print(f"--- {prompt!r}\n{c.text}\n[{len(c.token_ids)} tokens, {c.finish_reason}, "
              f"acceptance length {out.metrics.acceptance_length:.2f}]")
    print(f"{total} tokens in {seconds:.2f}s = {total / seconds:.1f} tok/s")
    llm.engine.close()
    return 0
