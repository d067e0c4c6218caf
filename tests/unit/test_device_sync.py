"""Logits never leave the device: one host read of device data per engine step (the packed
accepted ids), and one host -> device copy of a forward's inputs.

On the CPU there is no real sync to count, so a TorchFunctionMode follows the data instead:
every tensor computed from the target runner's logits is tagged, and each host read of a
tagged tensor (.tolist(), .item(), bool(), int(), float(), .cpu(), .numpy()) is recorded.
The same code runs on CUDA, where each recorded read is a device -> host sync.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from specdec import SamplingParams
from specdec.runner import SeqSlice
from specdec import engine as engine_module
from specdec.sample import sampling
from specdec.spec.rejection import rejection_sample_device
from specdec.sample.sampling import _apply_top_p
from tests.unit.test_spec import make_llm, prompts, spec_llm

_READS = {torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__int__,
          torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.cpu, torch.Tensor.numpy}
_TAG = "_specdec_device_data"


def _tagged(tensors) -> bool:
    return any(isinstance(t, torch.Tensor) and getattr(t, _TAG, False) for t in tensors)


class HostReads(TorchFunctionMode):
    """Records host reads of tensors derived from tagged ones (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs, _ = tree_flatten((args, kwargs))
        derived = _tagged(inputs)
        if derived and func in _READS:
            import traceback
            where = traceback.extract_stack(limit=2)[0]
            self.reads.append(f"{getattr(func, '__name__', func)} at {where.filename}:{where.lineno}")
        out = func(*args, **kwargs)
        if derived:
            name = getattr(func, "__name__", "")
            inplace = (name.endswith("_") and not name.endswith("__")) or name in (
                "__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__")
            for t in tree_flatten(out)[0] + ([args[0]] if args and inplace else []):
                if isinstance(t, torch.Tensor):  # outputs, and the target of in-place ops
                    setattr(t, _TAG, True)
                    if t._base is not None:  # a write into a view writes its base
                        setattr(t._base, _TAG, True)
        return out


def count_reads_per_step(llm, requests, params, role: str = "target") -> list[int]:
    """Run requests to completion; returns the host reads of the `role` runner's logits data
    per step (each read as 'function at file:line')."""
    engine = llm.engine
    runner = engine.target_runner if role == "target" else engine.draft_runner
    execute = runner.execute

    def tagged_execute(*args, **kwargs):
        logits = execute(*args, **kwargs)
        setattr(logits, _TAG, True)
        return logits

    for i, req in enumerate(requests):
        engine.add_request(f"sync-{i}", req["prompt_token_ids"], params)
    per_step, uploads = [], []
    runner.execute = tagged_execute
    try:
        while engine.has_unfinished_requests():
            before = runner.num_uploads
            mode = HostReads()
            with mode:
                engine.step()
            per_step.append(mode.reads)
            uploads.append(runner.num_uploads - before)
    finally:
        del runner.execute
    if role == "target":
        assert set(uploads) == {1}, f"host -> device input copies per target step: {uploads}"
    return per_step


@pytest.fixture(autouse=True)
def device_branches(monkeypatch):
    """The two places where the CPU takes a different branch, set as on a GPU: top-p sorts the
    whole row (its CPU branch grows a sorted prefix with a host check; compared below), and
    seeded rejection sampling draws every candidate row instead of reading num_accepted
    (test_rejection.py checks that both give the same tokens). Both reads are free on a CPU."""
    monkeypatch.setattr(sampling, "_apply_top_p", functools.partial(_apply_top_p, grow=False))
    monkeypatch.setattr(engine_module, "rejection_sample_device", functools.partial(
        rejection_sample_device, precompute_seeded=True))


@pytest.fixture(scope="module")
def ngram_llm(tiny_llama_dir):
    return spec_llm(tiny_llama_dir, None, 3, method="ngram")


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
    SamplingParams(temperature=0.8, top_p=0.9, top_k=50, max_tokens=12, ignore_eos=True),
    SamplingParams(temperature=1.0, seed=7, max_tokens=12, ignore_eos=True),
], ids=["greedy", "top_p_top_k", "seeded"])
def test_one_host_read_per_step_ngram(ngram_llm, params):
    # A repetitive prompt so that the n-gram drafter proposes (verify windows > 1 row).
    reqs = [{"prompt_token_ids": [5, 6, 7, 8] * 6}, *prompts(2, seed=3)]
    reads = count_reads_per_step(ngram_llm, reqs, params)
    assert reads and set(map(len, reads)) == {1}, reads
    assert ngram_llm.engine.counters["draft_tokens"] > 0


def test_one_host_read_per_step_draft_model(tiny_llama_dir, tiny_draft_dir):
    llm = spec_llm(tiny_llama_dir, tiny_draft_dir, 3)
    params = SamplingParams(temperature=0.7, seed=1, max_tokens=10, ignore_eos=True)
    reads = count_reads_per_step(llm, prompts(3, seed=4), params)
    assert set(map(len, reads)) == {1}, reads


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True),
    SamplingParams(temperature=0.9, top_k=20, seed=3, max_tokens=10, ignore_eos=True),
], ids=["greedy", "seeded"])
def test_draft_loop_reads_the_host_once_per_round(tiny_llama_dir, tiny_draft_dir, params):
    """k = 4 draft steps, their tokens fed forward on the device: one read per round."""
    llm = spec_llm(tiny_llama_dir, tiny_draft_dir, 4)
    reads = count_reads_per_step(llm, prompts(3, seed=8), params, role="draft")
    # NOTE: sampled rows' draft probs also flow into the verify step's one read (engine.py).
    in_drafter = [[r for r in step if "drafters.py" in r] for step in reads]
    assert set(map(len, in_drafter)) <= {0, 1} and sum(map(len, in_drafter)) >= 3, reads
    assert all(len(step) - len(d) <= 1 for step, d in zip(reads, in_drafter)), reads


def test_draft_loop_with_penalties_reads_every_step(tiny_llama_dir, tiny_draft_dir):
    """A repetition penalty reads the draft tokens' values: the host loop, k reads a round
    (which shows the counter sees the draft's reads)."""
    llm = spec_llm(tiny_llama_dir, tiny_draft_dir, 4)
    params = SamplingParams(temperature=0.0, repetition_penalty=1.3, max_tokens=10,
                            ignore_eos=True)
    reads = count_reads_per_step(llm, prompts(1, seed=8), params, role="draft")
    assert max(len([r for r in step if "drafters.py" in r]) for step in reads) == 4, reads


def test_one_host_read_per_step_no_spec(tiny_llama_dir):
    llm = make_llm(tiny_llama_dir)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    reads = count_reads_per_step(llm, prompts(3, seed=5), params)
    assert set(map(len, reads)) == {1}, reads


def test_counter_sees_an_extra_read(tiny_llama_dir):
    """The detector itself: a step that reads the logits on the host once more is caught."""
    llm = make_llm(tiny_llama_dir)
    engine = llm.engine
    accept = engine._accept

    def leaky_accept(sampled, logits, errors):
        logits[:, 0].tolist()  # the kind of per-row read this file exists to forbid
        return accept(sampled, logits, errors)

    engine._accept = leaky_accept
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    reads = count_reads_per_step(llm, prompts(1, seed=6), params)
    assert set(map(len, reads)) == {2}, reads
    assert all(any("test_device_sync.py" in r for r in step) for step in reads), reads


def test_batch_inputs_are_one_buffer(tiny_llama_dir):
    runner = make_llm(tiny_llama_dir).engine.target_runner
    before = runner.num_uploads
    batch = runner.build_batch([SeqSlice([3, 4, 5], 0, [0], 1), SeqSlice([9], 20, [1, 2], 1)])
    assert runner.num_uploads - before == 1
    tensors = [batch.input_ids, batch.positions, batch.slot_mapping, batch.block_tables,
               batch.seq_lens, batch.query_start_loc, batch.logits_indices]
    assert len({t.untyped_storage().data_ptr() for t in tensors}) == 1
    bs = runner.block_size
    assert batch.input_ids.tolist() == [3, 4, 5, 9]
    assert batch.positions.tolist() == [0, 1, 2, 20]
    assert batch.slot_mapping.tolist() == [0, 1, 2, 2 * bs + 20 - bs]
    assert batch.block_tables.tolist() == [[0, 0], [1, 2]]
    assert batch.block_tables.dtype == batch.seq_lens.dtype == torch.int32
    assert batch.seq_lens.tolist() == [3, 21]
    assert batch.query_start_loc.tolist() == [0, 3, 4]
    assert batch.logits_indices.tolist() == [2, 3]
    assert batch.input_ids.dtype == batch.slot_mapping.dtype == torch.int64


def test_top_p_without_growth_equals_growth():
    """The device branch of top-p (one full sort, no host check) keeps the same tokens."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 3000, generator=g) * 3
    top_p = torch.tensor([0.1, 0.5, 0.9, 0.99, 0.999, 0.3])
    grown = _apply_top_p(logits, top_p, grow=True)
    full = _apply_top_p(logits, top_p, grow=False)
    assert torch.equal(torch.isneginf(grown), torch.isneginf(full))
    assert int((~torch.isneginf(full)).sum(dim=-1).max()) > 256  # growth was exercised
