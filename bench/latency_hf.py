"""The transformers systems of bench/latency.py: plain `generate`, assisted generation with the
same draft model, and prompt lookup decoding, each timed per request like ours."""

from __future__ import annotations

import gc
import os
import time

import torch

from latency_common import RequestResult, SystemResult, SystemRun, sync


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


def load_hf(path: str, dtype: str | None, device: str):
    from transformers import AutoModelForCausalLM

    from specdec.model import convert, store
    if store.gguf_source(path) and not os.path.isfile(os.path.join(path, store.WEIGHTS_NAME)):
        convert.materialize_safetensors(path)  # an entry that keeps only its GGUF
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=getattr(torch, dtype or "float32")).to(device)
    return model.eval()


def run_hf(name: str, args, target_path: str, draft_path: str | None, prompt_ids, prompts,
           eos_ids: list[int], pad_id: int) -> SystemRun:
    start = time.perf_counter()
    model = load_hf(target_path, args.dtype, args.device)
    kwargs: dict = {}
    settings: dict = {"model": target_path}
    if name == "hf-assisted":
        # NOTE: transformers gets its draft unquantized: torch's dynamic int8 also quantizes
        # activations, which ruins its acceptance; weight-only int8/int4 is our own design.
        assistant = load_hf(draft_path, args.draft_dtype or args.dtype, args.device)
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
        sync(args.device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                 max_new_tokens=max_tokens, do_sample=False, temperature=None,
                                 top_p=None, top_k=None, eos_token_id=eos_ids or None,
                                 pad_token_id=pad_id, streamer=timer, **kwargs, **extra)
        sync(args.device)
        wall = time.perf_counter() - t0
        ttft = None if timer.first_token_time is None else timer.first_token_time - t0
        return RequestResult("", len(ids), out[0, len(ids):].tolist(), wall, ttft)

    generate(prompt_ids[0], args.warmup_tokens)
    yield  # a generator, as every latency.py system: after the warm-up and after each prompt
    for prompt, ids in zip(prompts, prompt_ids):
        request = generate(ids, args.max_tokens)
        request.prompt_id = prompt.prompt_id
        result.requests.append(request)
        yield
    del model, kwargs
    gc.collect()
    return result


