"""Ragged windows padded in front to a captured graph's uniform length (runner.pad_windows).

CUDA graphs replay one window length per graph; adaptive k and the draft's 1- or 2-token
catch-up make batches ragged. The padding rows sit in front of each window, so the real rows
keep their positions and masks. On the CPU the padded batch runs eager: the logits of the
real rows must equal the unpadded run's, and speculation must stay exact with padding on.
"""

from __future__ import annotations

import pytest
import torch

from specdec.runner import SeqSlice, graph_query_len, pad_windows
from tests.unit.test_spec import (GREEDY, assert_same_greedy, make_llm, noisy_draft_dir,  # noqa: F401
                                  prompts, spec_llm)


def test_graph_query_len_picks_the_smallest_fit():
    assert graph_query_len([1, 1], (1, 2)) == 1
    assert graph_query_len([1, 2, 1], (1, 2)) == 2
    assert graph_query_len([3, 1, 5], (1, 2, 3, 4, 5)) == 5
    assert graph_query_len([2], (5, 3)) == 3
    assert graph_query_len([6], (1, 2, 5)) is None  # a prefill chunk: eager
    assert graph_query_len([1], ()) is None


def test_pad_windows_in_front():
    seqs = [SeqSlice([7], 10, [0], 1), SeqSlice([8, 9], 4, [1], 2)]
    padded = pad_windows(seqs, 3)
    assert [s.num_pad for s in padded] == [2, 1]
    assert [s.token_ids for s in padded] == [[7], [8, 9]]
    with pytest.raises(ValueError, match="a window of 2 tokens does not fit query_len 1"):
        pad_windows(seqs, 1)


def test_padded_batch_layout_and_logits(tiny_llama_dir):
    runner = make_llm(tiny_llama_dir).engine.target_runner
    bs = runner.block_size
    # Fill the KV of two sequences (prompts of 20 and 9 tokens) first.
    runner.execute([SeqSlice(list(range(3, 23)), 0, [0, 1], 1),
                    SeqSlice(list(range(30, 39)), 0, [2], 1)])
    windows = [SeqSlice([5], 20, [0, 1], 1), SeqSlice([6, 7, 8], 9, [2], 3)]
    plain = runner.execute(windows)
    batch = runner.build_batch(pad_windows(windows, 4))
    assert batch.query_lens == [4, 4] and batch.seq_lens_list == [21, 12]
    assert batch.input_ids.tolist() == [0, 0, 0, 5, 0, 6, 7, 8]
    assert batch.slot_mapping.tolist()[:4] == [-1, -1, -1, bs + 4]
    assert batch.slot_mapping.tolist()[4] == -1
    assert batch.logits_indices.tolist() == [3, 5, 6, 7]
    runner.pad_lengths = (4,)
    padded = runner.execute(windows)
    runner.pad_lengths = ()
    assert not padded.isnan().any()
    torch.testing.assert_close(padded, plain, atol=1e-5, rtol=1e-5)


def test_spec_exact_with_padding(tiny_llama_dir, noisy_draft_dir):
    """Draft (1- and 2-token catch-ups padded to 2) and target (windows padded up to k + 1),
    with a noisy self-draft so that windows are accepted partway and in full."""
    batch = prompts(6, seed=21)
    expected = make_llm(tiny_llama_dir).generate(batch, GREEDY)
    llm = spec_llm(tiny_llama_dir, noisy_draft_dir, 3)
    engine = llm.engine
    engine.target_runner.pad_lengths = (1, 2, 3, 4)
    engine.draft_runner.pad_lengths = (1, 2)
    padded = {"target": [], "draft": []}
    for role, runner in (("target", engine.target_runner), ("draft", engine.draft_runner)):
        def recording_build(seqs, build=runner.build_batch, role=role):
            batch = build(seqs)
            if max(batch.query_lens) <= 4:  # decode / verify / draft steps (not prefill)
                assert len(set(batch.query_lens)) == 1, batch.query_lens
                padded[role].append(sum(s.num_pad for s in seqs))
            return batch
        runner.build_batch = recording_build
    got = llm.generate(batch, GREEDY)
    assert_same_greedy(got, expected)
    assert sum(padded["draft"]) > 0, "no draft step mixed 1- and 2-token catch-ups"
    # Ragged verify windows: requests near max_tokens get fewer draft slots.
    assert sum(padded["target"]) > 0, "the verify windows were never ragged"


def test_pick_graphs_is_one_rule_for_every_rank():
    """rank 0 and the TP workers choose replay or eager by pick_graphs over the same batch:
    the runner of the batch's query length when it can run it, else None (eager)."""
    from types import SimpleNamespace

    from specdec.kernels.graphs import pick_graphs

    class Fake:
        def __init__(self, q, fits):
            self.query_len, self.fits = q, fits

        def can_run(self, batch):
            return self.fits and all(q == self.query_len for q in batch.query_lens)

    runners = {1: Fake(1, True), 3: Fake(3, False)}
    assert pick_graphs(runners, SimpleNamespace(query_lens=[1, 1])) is runners[1]
    assert pick_graphs(runners, SimpleNamespace(query_lens=[3, 3])) is None  # cannot run
    assert pick_graphs(runners, SimpleNamespace(query_lens=[2])) is None  # none captured
    assert pick_graphs(runners, SimpleNamespace(query_lens=[1, 2])) is None  # ragged
    assert pick_graphs({}, SimpleNamespace(query_lens=[1])) is None
    assert pick_graphs(runners, SimpleNamespace(query_lens=[])) is None
