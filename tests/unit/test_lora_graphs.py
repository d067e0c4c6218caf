"""CUDA graphs with LoRA, the parts that run without a GPU: staging a batch's per-row slots into
the static buffer (padding rows -1), the static LoRA context a graph captures giving the same
delta as the eager one, which batches may replay, and slot swaps keeping every captured address.
(The replay itself is in tests/gpu/test_lora_gpu.py.)"""

from __future__ import annotations

import pytest
import torch

from specdec.kernels.graphs import CudaGraphRunner, lora_fits, stage_lora_slots
from specdec.model.lora import LoRAAdapter, LoRAManager, _module_shapes
from specdec.model.weights import load_model
from tests.conftest import PagedSequences


def random_adapter(arch, name: str, rank: int, seed: int) -> LoRAAdapter:
    """An adapter on every module with random A and B (scale folded into B)."""
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for layer in range(arch.num_layers):
        for module, (out_features, in_features) in _module_shapes(arch).items():
            weights[(layer, module)] = (torch.randn(rank, in_features, generator=gen) * 0.1,
                                        torch.randn(out_features, rank, generator=gen) * 0.1)
    return LoRAAdapter(name, f"/random/{name}", rank, weights)


@pytest.fixture(scope="module")
def model(tiny_llama_dir):
    return load_model(tiny_llama_dir, "float32")


def _manager(model, num_slots=2, num_adapters=3):
    manager = LoRAManager(model.arch, num_slots, 8, num_adapters, model.dtype, model.device)
    ids = [manager.add(f"r{i}", f"/random/r{i}",
                       random_adapter(model.arch, f"r{i}", 4 + 2 * i, seed=i)).lora_int_id
           for i in range(num_adapters)]
    return manager, ids


def test_stage_lora_slots_pads_with_base():
    static = torch.full((12,), 7, dtype=torch.int32)

    class Batch:
        row_slots = torch.tensor([1, 0, -1, 1, 1], dtype=torch.int32)

    stage_lora_slots(static, Batch, rows=5, padded_rows=8)
    assert static.tolist() == [1, 0, -1, 1, 1, -1, -1, -1, 7, 7, 7, 7]
    stage_lora_slots(static, None, rows=5, padded_rows=8)  # a base-only batch
    assert static.tolist() == [-1] * 8 + [7] * 4


@pytest.mark.parametrize("query_len", [1, 3])
def test_static_lora_context_equals_eager(model, query_len):
    manager, ids = _manager(model)
    slot_of = manager.activate(set(ids[:2]))
    kv_caches = model.make_kv_caches(64, 4)
    runner = CudaGraphRunner(model, kv_caches, query_len, max_num_seqs=8, max_blocks_per_seq=8,
                             lora=manager.slots)
    num_seqs = 3  # bucket 4: one padding sequence
    seq_slots = [slot_of[ids[1]], -1, slot_of[ids[0]]]
    batch = PagedSequences(64, 4, seed=1).batch([(s, [5 + s] * query_len)
                                                for s in range(num_seqs)])
    batch.lora = manager.make_batch([s for s in seq_slots for _ in range(query_len)],
                                    model.device, True, [query_len] * num_seqs)
    assert runner.can_run(batch) is False  # nothing captured yet
    assert lora_fits(runner.lora, batch.lora)
    bucket = runner.stage(batch)
    assert bucket == 4
    rows, padded = num_seqs * query_len, bucket * query_len
    want_slots = [s for s in seq_slots for _ in range(query_len)] + [-1] * query_len
    assert runner.lora_slots[:padded].tolist() == want_slots
    static = runner._static_batch(bucket).lora
    assert static.row_slots.data_ptr() == runner.lora_slots.data_ptr()
    assert (static.seg_starts is None) == (query_len == 1)
    gen = torch.Generator().manual_seed(3)
    for layer in range(model.arch.num_layers):
        for fused in ("qkv", "o", "gate_up", "down"):
            a_stack, b_list = manager.slots.layers[layer][fused]
            out = sum(b.shape[1] for b in b_list)
            x = torch.randn(padded, a_stack.shape[2], generator=gen)
            y = torch.randn(padded, out, generator=gen)
            got = static.apply(layer, fused, x, y.clone())
            want = batch.lora.apply(layer, fused, x[:rows], y[:rows].clone())
            torch.testing.assert_close(got[:rows], want, atol=1e-5, rtol=0)
            assert torch.equal(got[rows:], y[rows:])  # padding rows: the base
    # a base-only batch stages -1 everywhere
    plain = PagedSequences(64, 4, seed=2).batch([(0, [1] * query_len)])
    runner.stage(plain)
    assert runner.lora_slots[:query_len].tolist() == [-1] * query_len


def test_which_batches_replay(model):
    manager, ids = _manager(model)
    slot_of = manager.activate({ids[0]})
    kernel_path = manager.make_batch([slot_of[ids[0]]], model.device, True, [1])
    grouped = manager.make_batch([slot_of[ids[0]]], model.device, False, [1])
    assert lora_fits(None, None) and lora_fits(manager.slots, None)
    assert lora_fits(manager.slots, kernel_path)
    assert not lora_fits(None, kernel_path)  # graphs captured without LoRA
    assert not lora_fits(manager.slots, grouped)  # the torch path reads no per-row tensor
    other, _ = _manager(model)
    assert not lora_fits(other.slots, kernel_path)  # another model's slots (the draft's)


def test_slot_swaps_keep_captured_addresses(model):
    """Activating a third adapter with two slots copies into the slot tensors in place: the
    addresses the graphs baked in (checked on every replay with debug) do not move."""
    manager, ids = _manager(model, num_slots=2, num_adapters=3)
    runner = CudaGraphRunner(model, model.make_kv_caches(16, 4), 1, max_num_seqs=4,
                             max_blocks_per_seq=4, debug=True, lora=manager.slots)
    before = runner._buffer_pointers()
    assert before == runner._pointers
    manager.activate({ids[0], ids[1]})
    first = manager.slots.layers[0]["qkv"][0].clone()
    manager.activate({ids[2]})  # evicts the least recently used
    assert not torch.equal(manager.slots.layers[0]["qkv"][0], first)
    assert runner._buffer_pointers() == before
    assert len(before) > 8 + 2 * model.arch.num_layers  # the slot tensors are among them
