"""CUDA graph replay vs eager forward, and speculative vs plain greedy decoding, on the GPU."""

from __future__ import annotations

import random

import pytest

from tests.conftest import PagedSequences, make_tiny_config, save_tiny_model
from tests.gpu.cases import relative_error

# Kernel-supported head_dim (64); GQA 2.
TINY = dict(hidden_size=256, intermediate_size=256, num_attention_heads=4,
            num_key_value_heads=2, head_dim=64)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, str]:
    target = save_tiny_model(str(tmp_path_factory.mktemp("gpu_target")),
                             make_tiny_config("llama", **TINY), seed=0)
    draft = save_tiny_model(str(tmp_path_factory.mktemp("gpu_draft")),
                            make_tiny_config("draft", hidden_size=128, num_attention_heads=2,
                                             num_key_value_heads=1, head_dim=64), seed=3)
    return {"target": target, "draft": draft}


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4), ("bfloat16", 3e-2)])
@pytest.mark.parametrize("query_len", [1, 4])
def test_graph_replay_matches_eager(kernels, tiny_dirs, dtype, tol, query_len) -> None:
    from specdec.kernels.graphs import CudaGraphRunner
    from specdec.model.weights import load_model

    model = load_model(tiny_dirs["target"], dtype, "cuda")
    num_blocks, block_size = 96, 16
    kv_caches = model.make_kv_caches(num_blocks, block_size)
    seqs = PagedSequences(num_blocks, block_size, seed=1)
    rng = random.Random(0)
    vocab = model.vocab_size
    prompt_lens = [20, 35, 50, 3, 17]
    model(seqs.batch([(s, [rng.randrange(vocab) for _ in range(n)])
                      for s, n in enumerate(prompt_lens)], "last", device="cuda"), kv_caches)
    runner = CudaGraphRunner(model, kv_caches, query_len, max_num_seqs=8,
                             max_blocks_per_seq=16, debug=True)
    assert runner.buckets == [1, 2, 4, 8]
    runner.capture()
    for num_seqs in (3, 1, 5, 2, 3):  # buckets 4, 1, 8, 2, 4: padding sequences each time
        batch = seqs.batch([(s, [rng.randrange(vocab) for _ in range(query_len)])
                            for s in range(num_seqs)], "all", device="cuda")
        assert runner.can_run(batch)
        graph_logits = runner.run(batch).clone()
        eager_logits = model(batch, kv_caches)  # rewrites the same K/V
        assert graph_logits.shape == (num_seqs * query_len, vocab)
        assert relative_error(graph_logits, eager_logits) <= tol
    # Non-uniform windows and too many sequences fall back to eager.
    mixed = seqs.batch([(0, [1] * query_len), (1, [1] * (query_len + 1))], device="cuda")
    assert not runner.can_run(mixed)
    nine = PagedSequences(num_blocks, block_size, seed=2).batch(
        [(s, [1] * query_len) for s in range(9)], device="cuda")
    assert not runner.can_run(nine)


def _generate(config_dict: dict, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    try:
        from specdec.core.config import from_dict
        from specdec.llm import LLM
        from specdec.core.request import SamplingParams
    except ImportError as e:
        pytest.skip(f"engine import failed: {e}")
    llm = LLM(from_dict(config_dict))
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    return [list(o.outputs[0].token_ids) for o in outputs]


@pytest.mark.parametrize("draft", ["copy", "small"])
def test_speculative_greedy_equals_plain_greedy(kernels, tiny_dirs, draft) -> None:
    rng = random.Random(7)
    prompts = [[rng.randrange(3, 384) for _ in range(n)] for n in (5, 23, 40, 11)]
    base = {"model": {"path": tiny_dirs["target"], "dtype": "float32", "max_model_len": 256},
            "cache": {"block_size": 16, "num_blocks": 256},
            "device": {"device": "cuda", "cuda_graphs": True}}
    plain = _generate(base, prompts, max_tokens=32)
    draft_dir = tiny_dirs["target"] if draft == "copy" else tiny_dirs["draft"]
    spec = dict(base, spec={"method": "draft", "draft_model": draft_dir,
                            "num_speculative_tokens": 4})
    speculative = _generate(spec, prompts, max_tokens=32)
    assert all(len(t) == 32 for t in plain)
    assert speculative == plain


def test_ragged_windows_replay_padded_graphs(kernels, tiny_dirs) -> None:
    """A ragged batch (1- to 4-token windows) is padded in front to the 4-token graph; its
    logits equal the eager forward's, and every runner shares one graph memory pool."""
    import torch

    from specdec.runner import ModelRunner, SeqSlice
    from specdec.model.weights import load_model

    model = load_model(tiny_dirs["target"], "float32", "cuda")
    runner = ModelRunner(model, num_blocks=64, block_size=16)
    eager = ModelRunner(model, num_blocks=64, block_size=16)
    eager.kv_caches = runner.kv_caches
    pool = torch.cuda.graph_pool_handle()
    assert runner.capture_graphs([1, 2, 3, 4], max_num_seqs=4, max_model_len=256, pool=pool)
    assert runner.pad_lengths == (1, 2, 3, 4)
    assert {id(g.pool) for g in runner.graph_runners.values()} == {id(pool)}
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 300) for _ in range(n)] for n in (20, 33, 7)]
    tables = [[0, 1, 2], [3, 4, 5], [6, 7]]
    eager.execute([SeqSlice(p, 0, t, 1) for p, t in zip(prompts, tables)])
    windows = [SeqSlice([5], 20, tables[0], 1), SeqSlice([6, 7, 8, 9], 33, tables[1], 4),
               SeqSlice([1, 2], 7, tables[2], 2)]
    want = eager.execute(windows).clone()
    replays = {q: 0 for q in runner.graph_runners}
    for q, graph_runner in runner.graph_runners.items():
        run = graph_runner.run

        def counting_run(batch, run=run, q=q):
            replays[q] += 1
            return run(batch)
        graph_runner.run = counting_run
    got = runner.execute(windows)
    assert replays == {1: 0, 2: 0, 3: 0, 4: 1}
    assert relative_error(got, want) <= 1e-4
