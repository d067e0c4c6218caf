"""Tensor parallelism (specdec/model/parallel.py, parallel_workers.py): CPU, gloo, 2 ranks.

The TP=2 logits equal the single-process model's within 1e-5 (float32) for a whole prefill, a
chunked prefill, decodes and verify windows, on the tiny random Llama (KV heads split), Qwen2
(q/k/v bias, tied embeddings) and a Llama with one KV head (replicated on both ranks); the
shard layout follows the rules the module states; bad sizes are named.
"""

from __future__ import annotations

import os

import pytest
import torch

from specdec.core.config import ConfigError, from_dict
from specdec.model.llama import _Arch
from specdec.model.parallel import shard_layout
from specdec.model.parallel_workers import start_tensor_parallel
from specdec.model.weights import load_model
from tests.conftest import PagedSequences, make_tiny_config, save_tiny_model

NUM_BLOCKS, BLOCK_SIZE = 24, 8


@pytest.fixture(scope="module")
def tiny_replicated_kv_dir(tmp_path_factory) -> str:
    return save_tiny_model(str(tmp_path_factory.mktemp("tiny_kv1")),
                           make_tiny_config("llama", num_key_value_heads=1), seed=3)


@pytest.fixture(scope="module", params=["llama", "qwen2", "replicated_kv"])
def tp_pair(request):
    """(reference model, its caches, TP=2 driver, rank 0's caches) over one checkpoint."""
    name = "tiny_replicated_kv_dir" if request.param == "replicated_kv" \
        else f"tiny_{request.param}_dir"
    path = request.getfixturevalue(name)
    config = from_dict({"model": {"path": path}, "device": {"device": "cpu", "num_threads": 1},
                        "parallel": {"tensor_parallel_size": 2}})
    driver = start_tensor_parallel(config, torch.device("cpu"))
    driver.allocate_kv(NUM_BLOCKS, BLOCK_SIZE)
    ref = load_model(path, "float32")
    yield (ref, ref.make_kv_caches(NUM_BLOCKS, BLOCK_SIZE), driver,
           driver.model.make_kv_caches(NUM_BLOCKS, BLOCK_SIZE))
    driver.close()


def _prompt(seed: int, length: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 384, (length,), generator=g).tolist()


def _run(tp_pair, windows, logits_rows="all", seed=0):
    ref, ref_kv, driver, tp_kv = tp_pair
    seqs = PagedSequences(NUM_BLOCKS, BLOCK_SIZE, seed=seed)
    outs = []
    for step in windows:
        batch = seqs.batch(step, logits_rows)
        expected = ref(batch, ref_kv)
        got = driver.forward(batch, tp_kv)
        outs.append((expected, got))
    return outs


def _assert_close(outs):
    for expected, got in outs:
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_layout_of_each_case(tp_pair):
    ref, _, driver, _ = tp_pair
    arch = ref.arch
    lay = driver.tp.layout
    assert lay.rank == 0 and lay.world_size == 2
    if arch.num_key_value_heads == 1:  # replicated: both ranks hold KV head 0
        assert [shard_layout(arch, r, 2).kv_heads for r in (0, 1)] == [range(0, 1)] * 2
    else:
        assert len(lay.kv_heads) == arch.num_key_value_heads // 2
    assert driver.model.num_kv_heads == len(lay.kv_heads)
    assert driver.model.layers[0].num_heads == arch.num_attention_heads // 2
    assert driver.model.embed_tokens.weight.shape[0] == arch.vocab_size // 2


def test_whole_prefill(tp_pair):
    _assert_close(_run(tp_pair, [[("a", _prompt(0, 37))]]))


def test_chunked_prefill_then_decodes(tp_pair):
    prompt = _prompt(1, 40)
    windows = [[("a", prompt[:16])], [("a", prompt[16:29])], [("a", prompt[29:])],
               [("a", [7])], [("a", [11])], [("a", [13])]]
    _assert_close(_run(tp_pair, windows, seed=1))


def test_ragged_batch_with_verify_windows(tp_pair):
    """Prefill two sequences, then one step of a prefill chunk, a decode and a 4-token verify
    window side by side; then verify windows for all three."""
    p0, p1, p2 = _prompt(2, 21), _prompt(3, 9), _prompt(4, 30)
    windows = [[("a", p0), ("b", p1)],
               [("a", [5, 6, 7, 8]), ("b", [9]), ("c", p2[:17])],
               [("a", [10, 11, 12]), ("b", [13, 14, 15, 16, 17]), ("c", p2[17:])]]
    _assert_close(_run(tp_pair, windows, seed=2))


def test_last_row_logits_only(tp_pair):
    outs = _run(tp_pair, [[("a", _prompt(5, 12)), ("b", _prompt(6, 3))]], logits_rows="last",
                seed=3)
    assert outs[0][1].shape[0] == 2
    _assert_close(outs)


def test_communication_is_counted(tp_pair):
    _run(tp_pair, [[("a", _prompt(7, 5))]], seed=4)
    stats = tp_pair[2].comm_stats()
    assert stats["steps"] >= 1 and stats["broadcast_s"] > 0 and stats["forward_comm_s"] > 0


# ---------------------------------------------------------------------- layout, no processes

def _arch(**overrides) -> _Arch:
    return _Arch.from_hf(make_tiny_config("llama", **overrides))


def test_uneven_kv_groups_keep_their_query_heads():
    # SmolLM2-135M's shape: 9 heads in 3 KV groups over 2 ranks -> 2 groups + 1 group
    arch = _arch(num_attention_heads=9, num_key_value_heads=3, hidden_size=72, head_dim=8,
                 intermediate_size=130, vocab_size=385)
    lays = [shard_layout(arch, r, 2) for r in (0, 1)]
    assert [lay.kv_heads for lay in lays] == [range(0, 2), range(2, 3)]
    assert [lay.q_heads for lay in lays] == [range(0, 6), range(6, 9)]
    assert [lay.intermediate for lay in lays] == [range(0, 65), range(65, 130)]
    assert [lay.vocab for lay in lays] == [range(0, 193), range(193, 385)]
    assert {lay.vocab_rows for lay in lays} == {193}


def test_replicated_kv_heads_over_four_ranks():
    arch = _arch(num_attention_heads=8, num_key_value_heads=2)
    lays = [shard_layout(arch, r, 4) for r in range(4)]
    assert [lay.kv_heads.start for lay in lays] == [0, 0, 1, 1]
    assert [lay.q_heads for lay in lays] == [range(0, 2), range(2, 4), range(4, 6),
                                             range(6, 8)]


def test_sizes_that_do_not_split_are_named():
    with pytest.raises(ValueError, match="tensor_parallel_size.*num_key_value_heads=2"):
        shard_layout(_arch(num_attention_heads=4, num_key_value_heads=2), 0, 3)
    with pytest.raises(ValueError, match="query heads per KV head"):
        shard_layout(_arch(num_attention_heads=2, num_key_value_heads=1, hidden_size=32),
                     0, 4)


def test_config_rejects_what_tp_does_not_split():
    with pytest.raises(ConfigError, match="parallel.tensor_parallel_size must be in"):
        from_dict({"parallel": {"tensor_parallel_size": 0}})
    with pytest.raises(ConfigError, match="model.quantization must be unset"):
        from_dict({"model": {"quantization": "int8"}, "parallel": {"tensor_parallel_size": 2}})
    with pytest.raises(ConfigError, match="lora must be off"):
        from_dict({"lora": {"enabled": True}, "parallel": {"tensor_parallel_size": 2}})
    assert from_dict({"parallel": {"tensor_parallel_size": 2}}).parallel.timeout_s == 30.0


def test_command_line_flag_sets_the_config():
    from server.__main__ import build_config
    assert build_config(["--tensor-parallel-size", "2"]).parallel.tensor_parallel_size == 2
    assert build_config(["-tp", "4", "--parallel.timeout_s", "5"]).parallel == \
        from_dict({"parallel": {"tensor_parallel_size": 4, "timeout_s": 5}}).parallel


def test_a_model_that_does_not_split_fails_before_any_process_starts(tiny_llama_dir):
    import multiprocessing
    config = from_dict({"model": {"path": tiny_llama_dir}, "device": {"device": "cpu"},
                        "parallel": {"tensor_parallel_size": 3}})
    before = multiprocessing.active_children()  # a module fixture's driver may still run
    with pytest.raises(ValueError, match="tensor_parallel_size.*num_key_value_heads=2.*got 3"):
        start_tensor_parallel(config, torch.device("cpu"))
    assert multiprocessing.active_children() == before


def test_gpu_tp_bench_runs_on_the_cpu(tmp_path):
    """bench/gpu_tp.py (bench/gpu_check.sh's TP section) is tested here before a multi-GPU
    machine sees it: TP=2 over gloo against TP=1, tiny random weights, float32."""
    import json
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = tmp_path / "tp.json"
    proc = subprocess.run([sys.executable, "bench/gpu_tp.py", "--device", "cpu", "--shape",
                           "tiny", "--dtype", "float32", "--steps", "2", "--prompt-len", "8",
                           "--out", str(out)], cwd=root, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["batch"], r["phase"]) for r in rows] == [(1, "eager"), (8, "eager")]
    assert all(r["argmax_agree"] and r["max_abs_diff"] < 1e-5 for r in rows)
