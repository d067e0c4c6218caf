"""The LoRA CUDA kernels (cuda/lora.cu) on the GPU: shrink/expand against the torch references in
ops.py at real projection sizes, the model's kernel path against its grouped torch path, and CUDA
graph replay with adapters (slots swapped between replays) against eager."""

from __future__ import annotations

import random

import pytest
import torch

from specdec.kernels import ops
from specdec.model.lora import FUSED, LoRAManager
from tests.conftest import PagedSequences
from tests.gpu.cases import relative_error
from tests.gpu.conftest import poison_allocator
from tests.gpu.test_graphs import tiny_dirs  # noqa: F401 - the module's fixture
from tests.unit.test_lora_graphs import random_adapter

TOLS = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 2e-3}


@pytest.mark.parametrize("dtype", list(TOLS))
@pytest.mark.parametrize("fused,sizes,in_features", [
    ("qkv", [1536, 256, 256], 1536), ("gate_up", [8960, 8960], 1536), ("down", [1536], 8960)])
@pytest.mark.parametrize("mode", ["bgmv", "sgmv"])
def test_shrink_expand_match_reference(kernels, dtype, fused, sizes, in_features, mode):
    gen = torch.Generator(device="cuda").manual_seed(len(sizes) + in_features)
    num_slots, r_max = 4, 16
    if mode == "bgmv":
        seg_lens = [1] * 37
        rng = random.Random(1)
        seg_slots = [rng.randrange(-1, num_slots) for _ in seg_lens]
    else:
        seg_lens, seg_slots = [300, 1, 5, 0, 64, 9], [2, -1, 0, 1, 3, 2]
    rows = sum(seg_lens)
    x = torch.randn(rows, in_features, device="cuda", generator=gen).to(dtype)
    a_stack = (torch.randn(num_slots, len(sizes) * r_max, in_features, device="cuda",
                           generator=gen) * 0.05).to(dtype)
    b_list = [(torch.randn(num_slots, n, r_max, device="cuda", generator=gen) * 0.05).to(dtype)
              for n in sizes]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    y = torch.randn(rows, sum(sizes), device="cuda", generator=gen).to(dtype)
    row_slots = torch.tensor([s for n, s in zip(seg_lens, seg_slots) for _ in range(n)],
                             dtype=torch.int32, device="cuda")
    starts = torch.tensor([sum(seg_lens[:i]) for i in range(len(seg_lens) + 1)],
                          dtype=torch.int32, device="cuda")
    seg = (starts, max(seg_lens)) if mode == "sgmv" else (None, 1)
    poison_allocator((rows, len(sizes) * r_max), torch.float32)
    shrink = ops.lora_shrink(x, a_stack, row_slots, *seg)
    assert not shrink.isnan().any()
    want_shrink = ops.lora_shrink(x, a_stack, row_slots, use_kernels=False)
    assert relative_error(shrink, want_shrink) <= 1e-4
    got = ops.lora_expand(y.clone(), shrink, b_list, offsets, row_slots, r_max, *seg)
    want = ops.lora_expand(y.clone(), want_shrink, b_list, offsets, row_slots, r_max,
                           use_kernels=False)
    assert relative_error(got, want) <= TOLS[dtype]
    base = row_slots < 0
    assert torch.equal(got[base], y[base])


def _manager(model, num_slots=2):
    manager = LoRAManager(model.arch, num_slots, 8, 3, model.dtype, model.device)  # host: all 3
    ids = [manager.add(f"r{i}", f"/random/r{i}", random_adapter(model.arch, f"r{i}", 4 + 2 * i,
                                                                seed=i)).lora_int_id
           for i in range(3)]
    return manager, ids


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4), ("bfloat16", 3e-2)])
def test_kernel_path_matches_grouped_path(kernels, tiny_dirs, dtype, tol):  # noqa: F811
    from specdec.model.weights import load_model

    model = load_model(tiny_dirs["target"], dtype, "cuda")
    manager, ids = _manager(model)
    slot_of = manager.activate(set(ids[:2]))
    windows = [(0, list(range(3, 40))), (1, [5]), (2, list(range(9, 14))), (3, [8])]
    seq_slots = [slot_of[ids[0]], -1, slot_of[ids[1]], slot_of[ids[1]]]
    token_slots = [s for (_, t), s in zip(windows, seq_slots) for _ in t]
    out = {}
    for use_kernels in (False, True):
        batch = PagedSequences(64, 16, seed=4).batch(windows, device="cuda")
        batch.lora = manager.make_batch(token_slots, model.device, use_kernels,
                                        [len(t) for _, t in windows])
        out[use_kernels] = model(batch, model.make_kv_caches(64, 16))
    assert relative_error(out[True], out[False]) <= tol


@pytest.mark.parametrize("query_len", [1, 4])
def test_graph_replay_with_adapters(kernels, tiny_dirs, query_len):  # noqa: F811
    from specdec.kernels.graphs import CudaGraphRunner
    from specdec.model.weights import load_model

    model = load_model(tiny_dirs["target"], "float32", "cuda")
    manager, ids = _manager(model, num_slots=2)
    kv_caches = model.make_kv_caches(96, 16)
    seqs = PagedSequences(96, 16, seed=1)
    rng = random.Random(0)
    model(seqs.batch([(s, [rng.randrange(model.vocab_size) for _ in range(n)])
                      for s, n in enumerate([20, 35, 50, 3, 17])], "last", device="cuda"),
          kv_caches)
    runner = CudaGraphRunner(model, kv_caches, query_len, max_num_seqs=8,
                             max_blocks_per_seq=16, debug=True, lora=manager.slots)
    runner.capture()
    # the third adapter evicts one of the first two from its slot between replays
    for active in ([ids[0], ids[1]], [ids[2], ids[1]], [ids[0]]):
        slot_of = manager.activate(set(active))
        for num_seqs in (3, 5):
            slots = [slot_of[active[s % len(active)]] if s % 3 else -1 for s in range(num_seqs)]
            batch = seqs.batch([(s, [rng.randrange(model.vocab_size) for _ in range(query_len)])
                                for s in range(num_seqs)], "all", device="cuda")
            batch.lora = manager.make_batch([s for s in slots for _ in range(query_len)],
                                            model.device, True, [query_len] * num_seqs)
            assert runner.can_run(batch)
            graph_logits = runner.run(batch).clone()
            eager = model(batch, kv_caches)
            assert relative_error(graph_logits, eager) <= 1e-4
            base_only = seqs.batch([(s, [1] * query_len) for s in range(num_seqs)], "all",
                                   device="cuda")
            assert runner.can_run(base_only)
            torch.testing.assert_close(runner.run(base_only), model(base_only, kv_caches),
                                       atol=1e-4, rtol=0)
    assert set(FUSED) == set(manager.slots.offsets)
