"""One-call GPU benchmark: kernel bandwidth, batch-1 decode (eager vs CUDA graphs), verify-step
time for k = 1..8, and speculative decoding end to end. Random weights with real model shapes.

Also: split-context vs single-pass attention (kernels), padded ragged verify windows on graphs
vs eager (verify_steps.ragged), and host syncs per engine step (host_syncs, CUDA's sync debug
mode: logits stay on the device, one read of accepted ids per step).

Every section is independent: a failure is recorded and the next section runs. Prints a short
table last and writes JSON to --out (default $OUT/gpu_bench.json when OUT is set).

    python bench/gpu_bench.py [--budget SECONDS] [--out PATH] [--smoke]

--smoke runs tiny shapes (on the CPU when there is no GPU) to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from specdec.model.llama import ForwardBatch, LlamaForCausalLM  # noqa: E402

# Real configs (values from the models' config.json), random weights.
SHAPES = {
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576,
                         intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, tie_word_embeddings=True, rope_theta=100000.0,
                         rms_norm_eps=1e-5, max_position_embeddings=8192),
    "qwen2.5-coder-0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896,
                               intermediate_size=4864, num_hidden_layers=24,
                               num_attention_heads=14, num_key_value_heads=2,
                               tie_word_embeddings=True, rope_theta=1000000.0,
                               rms_norm_eps=1e-6, max_position_embeddings=32768),
    "qwen2.5-coder-1.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=1536,
                               intermediate_size=8960, num_hidden_layers=28,
                               num_attention_heads=12, num_key_value_heads=2,
                               tie_word_embeddings=True, rope_theta=1000000.0,
                               rms_norm_eps=1e-6, max_position_embeddings=32768),
}
SMOKE_SHAPES = {
    name: dict(shape, vocab_size=512, hidden_size=128, intermediate_size=256,
               num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    for name, shape in SHAPES.items()}
BLOCK_SIZE = 16


def hf_config(shape: dict):
    from transformers import LlamaConfig, Qwen2Config

    kw = dict(shape)
    cls = Qwen2Config if kw.pop("model_type") == "qwen2" else LlamaConfig
    theta = kw.pop("rope_theta")
    return cls(**kw, rope_parameters={"rope_type": "default", "rope_theta": theta})


def random_model(shape: dict, dtype: torch.dtype, device: str, seed: int = 0,
                 max_model_len: int = 4096) -> LlamaForCausalLM:
    model = LlamaForCausalLM(hf_config(shape), dtype, device, max_model_len=max_model_len)
    gen = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=gen)
    return model.eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def one_seq_batch(tokens: list[int], start: int, block_ids: list[int], device: str,
                  all_logits: bool = False) -> ForwardBatch:
    """One sequence: `tokens` at positions start .. start + len - 1 (blocks = block_ids)."""
    n = len(tokens)
    pos = list(range(start, start + n))
    slots = [block_ids[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in pos]
    t = lambda x, dt: torch.tensor(x, dtype=dt, device=device)  # noqa: E731
    return ForwardBatch(
        input_ids=t(tokens, torch.long), positions=t(pos, torch.long),
        slot_mapping=t(slots, torch.long), block_tables=t([block_ids], torch.int32),
        seq_lens=t([start + n], torch.int32), query_start_loc=t([0, n], torch.int32),
        logits_indices=t(list(range(n)) if all_logits else [n - 1], torch.long),
        query_lens=[n], seq_lens_list=[start + n])


# ---------------------------------------------------------------------------------- sections

def section_env(args, res: dict) -> None:
    res["torch"] = torch.__version__
    res["cuda"] = torch.cuda.is_available()
    if res["cuda"]:
        res["device"] = torch.cuda.get_device_name()
    try:
        import cupy
        res["cupy"] = cupy.__version__
    except Exception as e:
        res["cupy"] = f"unavailable: {e}"
    from specdec.kernels import cupy as kernels
    res["kernels_available"] = kernels.available()
    res["kernels_error"] = kernels.load_error()


def section_copy_bandwidth(args, res: dict) -> None:
    n = (1 << 20) if args.smoke else (1 << 30)
    src = torch.empty(n, dtype=torch.uint8, device=args.device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    seconds = timed(lambda: dst.copy_(src), args.device, iters=5 if args.smoke else 20)
    res["copy_GBps"] = 2 * n / seconds / 1e9  # read + write
    args.copy_bw = res["copy_GBps"]


def timed(fn, device: str, iters: int = 20, warmup: int = 3) -> float:
    """Seconds per call (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def graphed(fn, device: str, repeats: int = 10):
    """fn captured `repeats` times in one CUDA graph: returns a replay callable and repeats."""
    if not device.startswith("cuda"):
        return fn, 1
    fn()
    sync(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeats):
            fn()
    return graph.replay, repeats


def section_kernels(args, res: dict) -> None:
    from specdec.kernels import ops
    from tests.gpu.cases import make_attention_case

    dtype = torch.bfloat16
    rows = []
    configs = [("decode", 1, 1, 512), ("decode", 1, 1, 2048), ("decode", 1, 1, 8192),
               ("decode", 8, 1, 1024), ("decode", 32, 1, 1024), ("verify_k4", 1, 5, 1024),
               ("verify_k4", 1, 5, 8192), ("verify_k4", 16, 5, 1024), ("prefill", 1, 512, 512)]
    if args.smoke:
        configs = [("decode", 2, 1, 40), ("verify_k4", 2, 5, 40)]
    num_heads, num_kv_heads, head_dim = 12, 2, 128  # Qwen2.5-1.5B attention
    for kind, num_seqs, query_len, ctx in configs:
        case = make_attention_case([(query_len, ctx)] * num_seqs, num_heads, num_kv_heads,
                                   head_dim, BLOCK_SIZE, dtype, device=args.device, seed=1)
        call = lambda: ops.paged_attention(  # noqa: E731
            case.query, case.k_cache, case.v_cache, case.block_tables, case.seq_lens,
            case.query_start_loc, case.scale, case.query_lens, case.seq_lens_list)
        eager = timed(call, args.device)
        replay, repeats = graphed(call, args.device)
        seconds = timed(replay, args.device) / repeats
        elem = 2
        kv_bytes = 2 * num_seqs * ctx * num_kv_heads * head_dim * elem
        io_bytes = 2 * num_seqs * query_len * num_heads * head_dim * elem
        gbps = (kv_bytes + io_bytes) / seconds / 1e9
        row = dict(kernel="paged_attention", kind=kind, num_seqs=num_seqs,
                   query_len=query_len, ctx=ctx, us=seconds * 1e6, eager_us=eager * 1e6,
                   GBps=gbps, frac_copy_bw=gbps / args.copy_bw if args.copy_bw else None)
        if args.device.startswith("cuda") and query_len <= 32:
            # The first kernel (one block per (row, head)) against the split-context default,
            # and the two against each other (a kernel-vs-kernel equality check on the GPU).
            from specdec.kernels import cupy as kernels
            single = lambda: kernels.paged_attention(  # noqa: E731
                case.query, case.k_cache, case.v_cache, case.block_tables, case.seq_lens,
                case.query_start_loc, case.scale, case.query_lens, case.seq_lens_list,
                impl="single")
            replay, repeats = graphed(single, args.device)
            row["single_us"] = timed(replay, args.device) / repeats * 1e6
            row["split_speedup"] = row["single_us"] / row["us"]
            diff = (call().float() - single().float()).abs().max()
            row["split_vs_single_max_abs"] = float(diff)
        rows.append(row)
    for num_tokens in ((4, 64) if args.smoke else (1, 32, 512)):
        key = torch.randn(num_tokens, num_kv_heads, head_dim, device=args.device).to(dtype)
        value = torch.randn_like(key)
        k_cache = torch.zeros(1024, BLOCK_SIZE, num_kv_heads, head_dim, dtype=dtype,
                              device=args.device)
        v_cache = torch.zeros_like(k_cache)
        slots = torch.randperm(1024 * BLOCK_SIZE, device=args.device)[:num_tokens]
        call = lambda: ops.write_kv(key, value, k_cache, v_cache, slots)  # noqa: E731
        replay, repeats = graphed(call, args.device)
        seconds = timed(replay, args.device) / repeats
        gbps = 4 * key.numel() * 2 / seconds / 1e9  # read + write of K and V
        rows.append(dict(kernel="write_kv", kind="tokens", num_seqs=num_tokens, query_len=1,
                         ctx=0, us=seconds * 1e6, eager_us=timed(call, args.device) * 1e6,
                         GBps=gbps, frac_copy_bw=gbps / args.copy_bw if args.copy_bw else None))
    res["rows"] = rows


def _decode_setup(model, prompt_len: int, steps: int, device: str):
    num_blocks = -(-(prompt_len + steps + 16) // BLOCK_SIZE)
    kv_caches = model.make_kv_caches(num_blocks + 1, BLOCK_SIZE)
    block_ids = list(range(1, num_blocks + 1))
    prompt = [(7 * i) % model.vocab_size for i in range(prompt_len)]
    model(one_seq_batch(prompt, 0, block_ids, device), kv_caches)
    batches = [one_seq_batch([(3 * i + 1) % model.vocab_size], prompt_len + i, block_ids, device)
               for i in range(steps)]
    return kv_caches, block_ids, batches


def section_decode(args, res: dict) -> None:
    from specdec.kernels.graphs import CudaGraphRunner

    prompt_len, steps = (16, 4) if args.smoke else (128, 64)
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    for name, shape in shapes.items():
        if args.out_of_time():
            res[name] = "skipped: out of time"
            continue
        model = random_model(shape, args.dtype, args.device)
        kv_caches, block_ids, batches = _decode_setup(model, prompt_len, steps, args.device)
        entry = {}

        def loop(forward):
            for b in batches:
                forward(b).argmax(-1)
        for label, forward in [("eager", lambda b: model(b, kv_caches))]:
            loop(forward)
            sync(args.device)
            t0 = time.perf_counter()
            loop(forward)
            sync(args.device)
            entry[f"{label}_tok_s"] = steps / (time.perf_counter() - t0)
        if args.device.startswith("cuda"):
            runner = CudaGraphRunner(model, kv_caches, 1, max_num_seqs=1,
                                     max_blocks_per_seq=len(block_ids))
            runner.capture()
            loop(runner.run)
            sync(args.device)
            t0 = time.perf_counter()
            loop(runner.run)
            sync(args.device)
            entry["graph_tok_s"] = steps / (time.perf_counter() - t0)
            entry["max_abs_diff_graph_vs_eager"] = float(
                (runner.run(batches[0]) - model(batches[0], kv_caches)).abs().max())
        # The batch-1 bound: every weight read once per token at the measured copy bandwidth.
        weight_bytes = sum(t.numel() * t.element_size() for t in
                           {id(t): t for t in model.parameters()}.values())
        entry["weight_GB"] = weight_bytes / 1e9
        if args.copy_bw:
            entry["bound_tok_s"] = args.copy_bw * 1e9 / weight_bytes
            best = entry.get("graph_tok_s", entry["eager_tok_s"])
            entry["share_of_bound"] = best / entry["bound_tok_s"]
        if "graph_tok_s" in entry:
            entry["graph_vs_eager"] = entry["graph_tok_s"] / entry["eager_tok_s"]
        res[name] = entry
        del model, kv_caches
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    draft, target = res.get("qwen2.5-coder-0.5b"), res.get("qwen2.5-coder-1.5b")
    if isinstance(draft, dict) and isinstance(target, dict):
        key = "graph_tok_s" if "graph_tok_s" in draft and "graph_tok_s" in target \
            else "eager_tok_s"
        res["draft_step_over_target_step"] = target[key] / draft[key]


def section_profile(args, res: dict) -> None:
    """torch profiler over a few batch-1 decode steps of the 1.5B shape: the top kernels by
    device time, and how many kernels one step launches (eager, so each op is visible)."""
    from torch.profiler import ProfilerActivity, profile

    shape = (SMOKE_SHAPES if args.smoke else SHAPES)["qwen2.5-coder-1.5b"]
    model = random_model(shape, args.dtype, args.device)
    steps = 4
    kv_caches, _, batches = _decode_setup(model, 32, steps, args.device)
    activities = [ProfilerActivity.CPU]
    if args.device.startswith("cuda"):
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        for b in batches:
            model(b, kv_caches)
        sync(args.device)
    cuda = args.device.startswith("cuda")
    events = [e for e in prof.key_averages()
              if (e.device_type.name == "CUDA") == cuda and not e.key.startswith("ProfilerStep")]
    timing = "device_time_total" if cuda else "self_cpu_time_total"
    events.sort(key=lambda e: getattr(e, timing, 0.0), reverse=True)
    res["top"] = [{"name": e.key[:80], "count_per_step": e.count / steps,
                   "us_per_step": getattr(e, timing, 0.0) / steps} for e in events[:15]]
    if cuda:
        res["kernels_per_step"] = sum(e.count for e in events) / steps
        res["kernels_per_layer"] = res["kernels_per_step"] / shape["num_hidden_layers"]
    del model, kv_caches


def section_verify(args, res: dict) -> None:
    from specdec.kernels.graphs import CudaGraphRunner

    name = "qwen2.5-coder-1.5b"
    shape = (SMOKE_SHAPES if args.smoke else SHAPES)[name]
    model = random_model(shape, args.dtype, args.device)
    prompt_len = 16 if args.smoke else 512
    kv_caches, block_ids, _ = _decode_setup(model, prompt_len, 16, args.device)
    res["model"] = name
    res["ctx"] = prompt_len
    for k in range(1, 9):
        if args.out_of_time():
            res[f"k{k}"] = "skipped: out of time"
            continue
        tokens = [(5 * i + 2) % model.vocab_size for i in range(k + 1)]
        batch = one_seq_batch(tokens, prompt_len, block_ids, args.device, all_logits=True)
        entry = {"eager_ms": timed(lambda: model(batch, kv_caches), args.device, 10) * 1e3}
        if args.device.startswith("cuda"):
            runner = CudaGraphRunner(model, kv_caches, k + 1, max_num_seqs=1,
                                     max_blocks_per_seq=len(block_ids))
            runner.capture()
            entry["graph_ms"] = timed(lambda: runner.run(batch), args.device, 20) * 1e3
            del runner
        res[f"k{k}"] = entry
    if not args.out_of_time():
        res["ragged"] = _ragged_verify(model, args, prompt_len)


def _ragged_verify(model, args, prompt_len: int) -> dict:
    """4 sequences with verify windows of 1, 5, 3 and 2 tokens (adaptive k): the ModelRunner
    step (upload + forward) eager vs padded in front to the 5-token graph."""
    from specdec.runner import ModelRunner, SeqSlice

    blocks_per_seq = -(-(prompt_len + 16) // BLOCK_SIZE)
    runner = ModelRunner(model, 4 * blocks_per_seq + 1, BLOCK_SIZE)
    tables = [list(range(1 + i * blocks_per_seq, 1 + (i + 1) * blocks_per_seq))
              for i in range(4)]
    prompt = [(7 * i) % model.vocab_size for i in range(prompt_len)]
    for table in tables:
        runner.execute([SeqSlice(prompt, 0, table, 1)])
    windows = [SeqSlice([3] * q, prompt_len, table, q) for q, table in zip((1, 5, 3, 2), tables)]
    entry = {"window_lens": [len(w.token_ids) for w in windows]}
    eager_logits = runner.execute(windows).clone()
    entry["eager_ms"] = timed(lambda: runner.execute(windows), args.device, 10) * 1e3
    if args.device.startswith("cuda"):
        runner.capture_graphs([1, 2, 3, 4, 5], 4, prompt_len + 16 * 4)
        graph_logits = runner.execute(windows)
        entry["graph_ms"] = timed(lambda: runner.execute(windows), args.device, 20) * 1e3
        entry["graph_vs_eager"] = entry["eager_ms"] / entry["graph_ms"]
        entry["max_abs_diff_graph_vs_eager"] = float((graph_logits - eager_logits).abs().max())
    del runner
    return entry


def section_host_syncs(args, res: dict) -> None:
    """Device -> host syncs per engine step (CUDA sync debug mode counts each blocking
    transfer or synchronize): no-spec, n-gram spec and sampled n-gram spec, batch 2."""
    import warnings

    from specdec.core.config import from_dict
    from specdec.core.request import SamplingParams
    from specdec.llm import LLM

    if not args.device.startswith("cuda"):
        res["note"] = "CUDA only (tests/unit/test_device_sync.py counts on the CPU)"
        return
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    tmp = tempfile.mkdtemp(prefix="specdec_syncs_")
    target = _save_hf_model(shapes["smollm2-135m"], f"{tmp}/target", 0, args.device)
    vocab = shapes["smollm2-135m"]["vocab_size"]
    prompt = [(11 * (i % 16) + 5) % (vocab - 2) + 2 for i in range(64)]
    base = {"model": {"path": target, "dtype": "bfloat16", "max_model_len": 512},
            "cache": {"block_size": BLOCK_SIZE, "num_blocks": 128},
            "scheduler": {"max_num_seqs": 4},  # few graph buckets: a short capture
            "device": {"device": args.device}}
    ngram = {"method": "ngram", "num_speculative_tokens": 4, "adaptive": False}
    runs = [("no_spec_greedy", base, 0.0), ("ngram_greedy", dict(base, spec=ngram), 0.0),
            ("ngram_sampled", dict(base, spec=ngram), 0.8)]
    for label, cfg, temperature in runs:
        llm = LLM(from_dict(cfg))
        engine = llm.engine
        params = SamplingParams(temperature=temperature, top_p=0.9 if temperature else 1.0,
                                max_tokens=24, ignore_eos=True)
        for i in range(2):
            engine.add_request(f"{label}-{i}", prompt, params)
        engine.step()  # prefill, untimed
        counts = []
        while engine.has_unfinished_requests():
            torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    engine.step()
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            counts.append(sum("synchroniz" in str(w.message) for w in caught))
        res[label] = {"steps": len(counts), "syncs_per_step_max": max(counts, default=0),
                      "syncs_per_step_mean": sum(counts) / max(len(counts), 1)}
        del llm
        torch.cuda.empty_cache()


def _save_hf_model(shape: dict, out_dir: str, seed: int, device: str) -> str:
    """Random bf16 weights in a HF directory plus a word-level tokenizer over the full vocab."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config(shape), dtype=torch.bfloat16)
    model.save_pretrained(out_dir)
    vocab = {f"t{i}": i for i in range(shape["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", eos_token="t1").save_pretrained(
        out_dir)
    del model
    return out_dir


NEAR_TIE_GAP = {"float32": 1e-3, "bfloat16": 0.25}  # top-2 logprob gap forgiven per dtype


def _greedy_runs(target: str, draft: str, base: dict) -> dict[str, dict]:
    return {"no_spec": base,
            "draft_copy_k4": dict(base, spec={"method": "draft", "draft_model": target,
                                              "num_speculative_tokens": 4, "adaptive": False}),
            "draft_0.5b_k4": dict(base, spec={"method": "draft", "draft_model": draft,
                                              "num_speculative_tokens": 4, "adaptive": False}),
            "draft_0.5b_adaptive": dict(base, spec={"method": "draft", "draft_model": draft,
                                                    "num_speculative_tokens": 4}),
            "ngram_k4": dict(base, spec={"method": "ngram", "num_speculative_tokens": 4,
                                         "adaptive": False})}


def compare_greedy(outputs: dict[str, list[int]], top2: list, dtype: str) -> dict:
    """Each run against no_spec: equal, or where it first differs and how close no_spec's top
    two candidates were there (a near tie is a rounding flip, not a bug)."""
    want = outputs.get("no_spec")
    report = {}
    for label, got in outputs.items():
        if label == "no_spec" or want is None:
            continue
        pos = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
        if pos is None and len(got) != len(want):
            pos = min(len(got), len(want))
        if pos is None:
            report[label] = {"equal": True}
            continue
        gap = None
        if pos < len(top2) and len(top2[pos][1]) >= 2:
            gap = top2[pos][1][0][1] - top2[pos][1][1][1]
        report[label] = {"equal": False, "first_difference": pos, "top2_gap": gap,
                         "near_tie": gap is not None and gap <= NEAR_TIE_GAP[dtype]}
    return report


def section_spec_e2e(args, res: dict) -> None:
    """Spec vs no-spec end to end: speed in the bench dtype, greedy equality in float32 (the
    exactness claim), both on a repetitive prompt so the n-gram drafter has matches."""
    from specdec.core.config import from_dict
    from specdec.core.request import SamplingParams
    from specdec.llm import LLM

    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    tmp = tempfile.mkdtemp(prefix="specdec_bench_")
    target = _save_hf_model(shapes["qwen2.5-coder-1.5b"], f"{tmp}/target", 0, args.device)
    draft = _save_hf_model(shapes["qwen2.5-coder-0.5b"], f"{tmp}/draft", 1, args.device)
    vocab = shapes["qwen2.5-coder-1.5b"]["vocab_size"]
    prompt = [(11 * (i % 16) + 5) % (vocab - 2) + 2 for i in range(64)]  # period 16
    bench_dtype = "bfloat16" if args.dtype == torch.bfloat16 else "float32"
    passes = [("speed", bench_dtype, 16 if args.smoke else 128)]
    passes.append(("exact_float32", "float32", 16 if args.smoke else 48))
    for pass_name, dtype, max_tokens in passes:
        base = {"model": {"path": target, "dtype": dtype, "max_model_len": 1024},
                "cache": {"block_size": BLOCK_SIZE, "num_blocks": 256},
                "device": {"device": args.device}}
        outputs, entries, top2 = {}, {}, []
        for label, cfg in _greedy_runs(target, draft, base).items():
            if args.out_of_time():
                entries[label] = "skipped: out of time"
                continue
            try:
                llm = LLM(from_dict(cfg))
                llm.generate([{"prompt_token_ids": prompt}], SamplingParams(
                    temperature=0.0, max_tokens=8, ignore_eos=True))  # warm-up
                params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
                t0 = time.perf_counter()
                out = llm.generate([{"prompt_token_ids": prompt}], params)
                seconds = time.perf_counter() - t0
                ids = list(out[0].outputs[0].token_ids)
                outputs[label] = ids
                entry = {"tok_s": len(ids) / seconds, "tokens": len(ids)}
                stats = llm.engine.counters
                if stats.get("draft_tokens"):
                    entry["acceptance"] = stats["accepted_tokens"] / stats["draft_tokens"]
                    entry["acceptance_length"] = 1 + stats["accepted_tokens"] / stats["drafts"]
                if label == "no_spec":  # untimed: the top-2 candidates at every position
                    top2 = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(
                        temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                        logprobs=2))[0].outputs[0].logprobs or []
                entries[label] = entry
                del llm
            except Exception as e:
                entries[label] = f"FAILED: {type(e).__name__}: {e}"
                args.failures.append(f"spec_e2e/{pass_name}/{label}")
                traceback.print_exc()
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
        res[pass_name] = {"dtype": dtype, "runs": entries,
                          "greedy": compare_greedy(outputs, top2, dtype)}
        if dtype == "float32":
            res["float32_greedy_equal"] = all(
                r["equal"] for r in res[pass_name]["greedy"].values())


# ------------------------------------------------------------------------------------- LoRA
# A separate block, run by name only (`--only lora`; bench/gpu_check.sh runs it on its own).

def _random_adapter(arch, name: str, rank: int, seed: int):
    from specdec.model.lora import LoRAAdapter, _module_shapes

    gen = torch.Generator().manual_seed(seed)
    weights = {(layer, module): (torch.randn(rank, n_in, generator=gen) * 0.05,
                                 torch.randn(n_out, rank, generator=gen) * 0.05)
               for layer in range(arch.num_layers)
               for module, (n_out, n_in) in _module_shapes(arch).items()}
    return LoRAAdapter(name, f"/random/{name}", rank, weights)


def section_lora(args, res: dict) -> None:
    """LoRA shrink + expand (cuda/lora.cu) at Qwen2.5-1.5B's fused projections (4 slots, rank 16,
    graphed) next to the projection matmul they follow, each checked against the torch
    reference; then a decode step of 8 sequences on 4 adapters vs the base (0.5B shape)."""
    import torch.nn.functional as F

    from specdec.kernels import ops
    from specdec.model.lora import LoRAManager

    dtype, dev = args.dtype, args.device
    hidden, q, kv, inter = (128, 128, 64, 256) if args.smoke else (1536, 1536, 256, 8960)
    r_max, num_slots = (4 if args.smoke else 16), 4
    cases = [("bgmv", 2), ("sgmv", 20)] if args.smoke else [
        ("bgmv", 1), ("bgmv", 8), ("bgmv", 32), ("sgmv", 40), ("sgmv", 512)]
    tol = 8e-3 if dtype == torch.bfloat16 else 1e-4
    iters = 2 if args.smoke else 20
    gen = torch.Generator(dev).manual_seed(0)
    rows, bad = [], []
    for fused, sizes, n_in in (("qkv", [q, kv, kv], hidden), ("gate_up", [inter, inter], hidden),
                               ("down", [hidden], inter)):
        a_stack = (torch.randn(num_slots, len(sizes) * r_max, n_in, device=dev, generator=gen)
                   * 0.05).to(dtype)
        b_list = [(torch.randn(num_slots, n, r_max, device=dev, generator=gen) * 0.05).to(dtype)
                  for n in sizes]
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        weight = (torch.randn(sum(sizes), n_in, device=dev, generator=gen) * 0.02).to(dtype)
        for mode, n in cases:
            x = torch.randn(n, n_in, device=dev, generator=gen).to(dtype)
            if mode == "bgmv":  # decode rows on every slot and the base
                row_slots = torch.arange(n, device=dev, dtype=torch.int32) % (num_slots + 1) - 1
                seg = (None, 1)
            else:  # verify windows of 5 / one prefill chunk, one adapter per segment
                seg_len = 5 if n <= 40 else n
                row_slots = (torch.arange(n, device=dev, dtype=torch.int32) // seg_len
                             ) % num_slots
                seg = (torch.arange(0, n + 1, seg_len, device=dev, dtype=torch.int32), seg_len)

            def with_lora():
                y = F.linear(x, weight)
                return ops.lora_expand(y, ops.lora_shrink(x, a_stack, row_slots, *seg), b_list,
                                       offsets, row_slots, r_max, *seg)

            want = ops.lora_expand(F.linear(x, weight), ops.lora_shrink(
                x, a_stack, row_slots, use_kernels=False), b_list, offsets, row_slots, r_max,
                use_kernels=False)
            got = with_lora()
            err = float(((got.float() - want.float()).norm() / want.float().norm()).item())
            replay, repeats = graphed(lambda: F.linear(x, weight), dev)
            base_s = timed(replay, dev, iters) / repeats
            replay, repeats = graphed(with_lora, dev)
            lora_s = timed(replay, dev, iters) / repeats
            rows.append(dict(proj=fused, mode=mode, rows=n, base_us=round(base_s * 1e6, 2),
                             lora_us=round(lora_s * 1e6, 2),
                             overhead=round(lora_s / base_s, 3), rel_err=err))
            if not err <= tol:
                bad.append(f"{fused}/{mode}/{n}: rel_err {err:.2e} > {tol}")
    res["rows"] = rows
    # A decode step: 8 sequences on 4 adapters (2 each) vs the same sequences on the base.
    shape = (SMOKE_SHAPES if args.smoke else SHAPES)["qwen2.5-coder-0.5b"]
    model = random_model(shape, dtype, dev)
    manager = LoRAManager(model.arch, num_slots, r_max, num_slots, model.dtype, model.device)
    ids = [manager.add(f"r{i}", f"/random/r{i}", _random_adapter(model.arch, f"r{i}", r_max, i))
           .lora_int_id for i in range(num_slots)]
    slot_of = manager.activate(set(ids))
    num_seqs, ctx = 8, (16 if args.smoke else 256)
    num_blocks = num_seqs * (-(-(ctx + 4) // BLOCK_SIZE)) + 1
    kv_caches = model.make_kv_caches(num_blocks, BLOCK_SIZE)
    per_seq = num_blocks // num_seqs
    tables = [list(range(1 + s * per_seq, 1 + (s + 1) * per_seq)) for s in range(num_seqs)]
    t = lambda v, dt: torch.tensor(v, dtype=dt, device=dev)  # noqa: E731
    batch = ForwardBatch(
        input_ids=t([3 + s for s in range(num_seqs)], torch.long),
        positions=t([ctx] * num_seqs, torch.long),
        slot_mapping=t([tables[s][ctx // BLOCK_SIZE] * BLOCK_SIZE + ctx % BLOCK_SIZE
                        for s in range(num_seqs)], torch.long),
        block_tables=t(tables, torch.int32), seq_lens=t([ctx + 1] * num_seqs, torch.int32),
        query_start_loc=t(list(range(num_seqs + 1)), torch.int32),
        logits_indices=t(list(range(num_seqs)), torch.long), query_lens=[1] * num_seqs,
        seq_lens_list=[ctx + 1] * num_seqs, use_kernels=dev.startswith("cuda"))
    lora = manager.make_batch([slot_of[ids[s % num_slots]] for s in range(num_seqs)],
                              model.device, dev.startswith("cuda"), [1] * num_seqs)
    step = {}
    for label, ctx_lora in (("base", None), ("4_adapters", lora)):
        batch.lora = ctx_lora
        step[f"eager_{label}_ms"] = round(
            timed(lambda: model(batch, kv_caches), dev, iters) * 1e3, 3)
    if dev.startswith("cuda"):
        from specdec.kernels.graphs import CudaGraphRunner

        for label, slots in (("graph_base", None), ("graph_lora", manager.slots)):
            runner = CudaGraphRunner(model, kv_caches, 1, num_seqs, per_seq, lora=slots,
                                     buckets=[num_seqs])
            runner.capture()
            batch.lora = lora if slots is not None else None
            step[f"{label}_ms"] = round(timed(lambda: runner.run(batch), dev) * 1e3, 3)
            if slots is not None:
                batch.lora = None
                step["graph_lora_base_rows_ms"] = round(
                    timed(lambda: runner.run(batch), dev) * 1e3, 3)
            del runner
    res["decode_step"] = step
    if bad:
        raise AssertionError("LoRA kernels differ from the reference: " + "; ".join(bad))


# Sections run only when named in --only.
EXTRA_SECTIONS = [("lora", section_lora)]


SECTIONS = [("env", section_env), ("copy_bandwidth", section_copy_bandwidth),
            ("kernels", section_kernels), ("decode_batch1", section_decode),
            ("verify_steps", section_verify), ("spec_e2e", section_spec_e2e),
            ("host_syncs", section_host_syncs), ("profile", section_profile)]


def print_table(results: dict) -> None:
    print("\n=== specdec GPU bench ===")
    env = results.get("env", {})
    print(f"device={env.get('device')} torch={env.get('torch')} cupy={env.get('cupy')} "
          f"kernels={env.get('kernels_available')} copy_GBps="
          f"{results.get('copy_bandwidth', {}).get('copy_GBps', float('nan')):.0f}")
    for row in results.get("kernels", {}).get("rows", []):
        frac = row["frac_copy_bw"]
        single = (f" single {row['single_us']:7.1f} us (split x{row['split_speedup']:.2f})"
                  if "single_us" in row else "")
        print(f"  {row['kernel']:15s} {row['kind']:9s} seqs={row['num_seqs']:<4d} "
              f"q={row['query_len']:<4d} ctx={row['ctx']:<5d} {row['us']:8.1f} us "
              f"(eager {row['eager_us']:7.1f}) {row['GBps']:7.1f} GB/s "
              f"{'' if frac is None else f'{100 * frac:5.1f}% of copy'}{single}")
    for name, entry in results.get("decode_batch1", {}).items():
        if name != "seconds":
            print(f"  decode b=1 {name:20s} {entry}")
    prof = results.get("profile", {})
    if "kernels_per_layer" in prof:
        print(f"  kernels per decode step {prof['kernels_per_step']:.0f} "
              f"({prof['kernels_per_layer']:.1f} per layer)")
    for row in prof.get("top", [])[:10]:
        print(f"  top {row['us_per_step']:9.1f} us/step x{row['count_per_step']:5.1f}  "
              f"{row['name']}")
    for k, entry in results.get("verify_steps", {}).items():
        if k.startswith("k") or k == "ragged":
            print(f"  verify {k:6s} {entry}")
    for label, entry in results.get("host_syncs", {}).items():
        if isinstance(entry, dict):
            print(f"  host syncs {label:16s} {entry}")
    for pass_name, entry in results.get("spec_e2e", {}).items():
        if isinstance(entry, dict) and "runs" in entry:
            for label, run in entry["runs"].items():
                print(f"  e2e {pass_name} {entry['dtype']} {label:20s} {run} "
                      f"{entry['greedy'].get(label, '')}")
    for row in results.get("lora", {}).get("rows", []):
        print(f"  lora {row['proj']:7s} {row['mode']} rows={row['rows']:<4d} matmul "
              f"{row['base_us']:8.1f} us, +lora {row['lora_us']:8.1f} us "
              f"(x{row['overhead']:.2f}) rel_err {row['rel_err']:.1e}")
    if "decode_step" in results.get("lora", {}):
        print(f"  lora decode step {results['lora']['decode_step']}")
    for name, value in results.items():
        if isinstance(value, dict) and "error" in value:
            print(f"  SECTION {name} FAILED: {value['error']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=300.0, help="seconds for all sections")
    parser.add_argument("--out", default=None)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--only", default=None, help="comma-separated section names")
    args = parser.parse_args()
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    args.copy_bw = None
    args.failures = []
    start = time.perf_counter()
    args.out_of_time = lambda: time.perf_counter() - start > args.budget
    out = args.out or (os.path.join(os.environ["OUT"], "gpu_bench.json")
                       if os.environ.get("OUT") else None)
    results: dict = {}
    only = set(args.only.split(",")) if args.only else None
    for name, fn in SECTIONS + [(n, f) for n, f in EXTRA_SECTIONS if only and n in only]:
        if only and name not in only:
            continue
        res: dict = {}
        results[name] = res
        if args.out_of_time() and name != "env":
            res["error"] = "skipped: out of time"
            continue
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                fn(args, res)
        except Exception as e:
            res["error"] = f"{type(e).__name__}: {e}"
            args.failures.append(name)
            traceback.print_exc()
        res["seconds"] = round(time.perf_counter() - t0, 2)
        print(f"[{name}] {json.dumps(res, default=str)[:2000]}", flush=True)
        if out:
            Path(out).write_text(json.dumps(results, indent=1, default=str))
    if results.get("spec_e2e", {}).get("float32_greedy_equal") is False:
        args.failures.append("spec_e2e: float32 greedy output differs from no-spec")
    results["failures"] = args.failures
    if out:
        Path(out).write_text(json.dumps(results, indent=1, default=str))
    print_table(results)
    if args.failures:
        print(f"FAILED: {', '.join(args.failures)}")
    return 1 if args.failures else 0


if __name__ == "__main__":
    sys.exit(main())
