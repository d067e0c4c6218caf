"""The automatic KV pool size: max_num_seqs full-length sequences, capped by cache.memory_gb;
a budget short of one max_model_len sequence is a start-up error naming the numbers."""

from __future__ import annotations

import pytest

from specdec.core.kv_budget import GIB, auto_num_blocks, short_pool_message

BLOCK = 16
PER_BLOCK = 1 << 20  # 1 MiB per block: 1024 blocks per GiB


def test_the_scheduler_need_wins_under_a_large_budget():
    # 4 sequences x 4096 tokens = 4 x 256 blocks, far below 64 GiB
    assert auto_num_blocks(64.0, PER_BLOCK, BLOCK, 4, 4096) == 4 * 256


def test_the_budget_caps_the_pool():
    assert auto_num_blocks(0.5, PER_BLOCK, BLOCK, 32, 4096) == 512


def test_exactly_one_full_length_sequence_fits():
    memory_gb = 256 * PER_BLOCK / GIB  # 256 blocks = one 4096-token sequence
    assert auto_num_blocks(memory_gb, PER_BLOCK, BLOCK, 32, 4096) == 256


def test_one_block_short_of_one_sequence_is_an_error():
    memory_gb = 255 * PER_BLOCK / GIB
    with pytest.raises(ValueError) as info:
        auto_num_blocks(memory_gb, PER_BLOCK, BLOCK, 32, 4096)
    message = str(info.value)
    assert "cache.memory_gb=" in message and "model.max_model_len=4096" in message
    assert "255 KV blocks" in message and "needs 256 blocks" in message


def test_a_partial_last_block_counts_as_a_whole_block():
    assert auto_num_blocks(1.0, PER_BLOCK, BLOCK, 2, 17) == 2 * 2
    with pytest.raises(ValueError):
        auto_num_blocks(1.0 / 1024, PER_BLOCK, BLOCK, 2, 17)  # 1 block < 2 needed


def test_bad_block_size_in_bytes_is_named():
    with pytest.raises(ValueError, match="bytes_per_block must be > 0, got 0"):
        auto_num_blocks(1.0, 0, BLOCK, 1, 16)


def test_the_engine_refuses_a_budget_short_of_one_sequence(tiny_llama_dir):
    from specdec.core.config import from_dict
    from specdec.engine import Engine

    config = from_dict({}, {"model.path": tiny_llama_dir, "model.max_model_len": 512,
                                "cache.memory_gb": 1e-6, "spec.method": "none"})
    with pytest.raises(ValueError, match="holds 0 KV blocks"):
        Engine(config)


def test_the_engine_sizes_the_pool_from_the_scheduler(tiny_llama_dir):
    from specdec.core.config import from_dict
    from specdec.engine import Engine

    config = from_dict({}, {"model.path": tiny_llama_dir, "model.max_model_len": 256,
                                "scheduler.max_num_seqs": 3, "cache.block_size": 16,
                                "cache.memory_gb": 4.0, "spec.method": "none"})
    assert Engine(config).num_blocks == 3 * 16


def test_an_explicit_pool_short_of_one_sequence_is_named_at_the_edge():
    assert short_pool_message(4, BLOCK, 64) is None  # exactly one 64-token sequence
    assert short_pool_message(4, BLOCK, 63) is None  # a partial last block still fits
    message = short_pool_message(4, BLOCK, 65)  # one token more: a fifth block
    assert message == ("cache.num_blocks=4 holds 64 tokens, less than one sequence of "
                       "model.max_model_len=65 (5 blocks of 16): requests that may grow past "
                       "64 tokens are refused")


def test_the_engine_warns_about_an_explicit_short_pool(tiny_llama_dir, caplog):
    from specdec.core.config import from_dict
    from specdec.engine import Engine

    caplog.set_level("WARNING", logger="specdec.engine")
    Engine(from_dict({}, {"model.path": tiny_llama_dir, "model.max_model_len": 256,
                          "cache.num_blocks": 8, "cache.block_size": 16,
                          "spec.method": "none"}))
    assert "cache.num_blocks=8 holds 128 tokens" in caplog.text
