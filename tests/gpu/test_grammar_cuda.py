"""The grammar bitmask on CUDA logits equals the CPU loop reference (needs CUDA)."""

from __future__ import annotations

import pytest
import torch

from specdec.sample.grammar import apply_token_bitmask_, apply_token_bitmask_reference


@pytest.mark.parametrize("vocab", [33, 4096, 151936])
def test_apply_bitmask_on_cuda_matches_reference(vocab):
    gen = torch.Generator().manual_seed(vocab)
    words = (vocab + 31) // 32
    bitmask = torch.randint(-2**31, 2**31 - 1, (4, words), generator=gen,
                            dtype=torch.int64).to(torch.int32)
    bitmask[0] = -1
    logits = torch.randn(4, vocab, generator=gen)
    got = apply_token_bitmask_(logits.cuda(), bitmask).cpu()  # CPU bitmask, CUDA logits
    if vocab <= 4096:
        want = apply_token_bitmask_reference(logits, bitmask)
    else:  # the loop reference is too slow here; the CPU path was tested against it
        want = apply_token_bitmask_(logits.clone(), bitmask)
    assert torch.equal(got, want)
