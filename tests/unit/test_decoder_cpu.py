"""The fused CPU decoder stack (specdec/kernels/decoder_cpu.cpp) against the model's own layer
loop, its plain reference.

- Layer by layer, fed the same input: the same hidden states and the same cache writes, for
  prefills, decodes, ragged verify windows and several sequences over non-contiguous block
  tables. Within what rounding allows, which is not 1e-5 here: the q4 kernel quantizes each
  projection's input to int8 per group of 32, and a one-ulp difference in an RMSNorm or
  attention sum (summed in another order) can move one code by one step, which shifts every
  output of that projection by ~1e-3 of its scale. Measured on the tiny models, float32: max
  0.7 %, mean 0.05 % of the values' scale (most rows see no such step: 3e-5); bfloat16, where
  the layer loop also rounds its activations to bfloat16 between ops: max 7 %, mean 2 %.
  A wrong mask, rotary angle, cache slot or bias moves the values by tens of percent.
- The whole model: the stack runs for decode and verify steps and its logits stay close; a
  verify window's rows give exactly (bit for bit) the logits of one-row decodes.
- The layer loop wherever the stack cannot run.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from specdec.kernels import decoder_cpu, q4_cpu
from specdec.model.weights import load_model
from tests.conftest import PagedSequences

pytestmark = pytest.mark.skipif(q4_cpu.load_kernel() is None,
                                reason="the q4 CPU kernel does not build here")

# (max, mean) absolute difference over the reference's largest magnitude
LAYER_TOLERANCE = {"float32": (2e-2, 1e-3), "bfloat16": (1.5e-1, 4e-2)}
# (max, mean) of the logits' difference over their largest magnitude, fused ends against torch's:
# measured on the tiny models, float32 at most 3e-7 (bfloat16 equal); a flipped int8 code
# of the head's input would move them ~1e-3
LOGIT_TOLERANCE = {"float32": (2e-3, 1e-4), "bfloat16": (2e-2, 1e-3)}
MODELS = ["tiny_llama_dir", "tiny_qwen2_dir", "tiny_draft_dir"]


def _close(got, want, tolerance) -> bool:
    diff = (got.float() - want.float()).abs()
    scale = max(want.float().abs().max().item(), 1e-6)
    return diff.max().item() <= tolerance[0] * scale and diff.mean().item() <= tolerance[1] * scale


def _steps():
    """(seq, tokens) windows per step: a prefill each (25 and 7 tokens, through the stack like
    every step here), decodes, ragged verify windows, 16 rows of one sequence alone."""
    g = torch.Generator().manual_seed(0)

    def toks(n):
        return torch.randint(3, 380, (n,), generator=g).tolist()

    return [
        [("a", toks(25)), ("b", toks(7))],
        [("a", toks(1)), ("b", toks(1))],
        [("a", toks(5)), ("b", toks(3))],
        [("b", toks(16))],
        [("a", toks(1)), ("b", toks(4))],
    ]


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_each_layer_matches_the_layer_loop(model, dtype, request):
    model = load_model(request.getfixturevalue(model), dtype, quantization="int4")
    loop_caches, fused_caches = model.make_kv_caches(16, 8), model.make_kv_caches(16, 8)
    decoders = []
    for layer, kv_cache in zip(model.layers, fused_caches):
        decoder = decoder_cpu.new_decoder(model)
        decoder_cpu.add_layer(decoder, layer, kv_cache)
        decoders.append(decoder)
    seqs = PagedSequences(16, 8, seed=3)
    tolerance = LAYER_TOLERANCE[dtype]
    for step, windows in enumerate(_steps()):
        batch = seqs.batch(windows)
        with torch.no_grad():
            hidden = model._embed(batch.input_ids)
        cos = model.rope_cos[batch.positions].unsqueeze(1)
        sin = model.rope_sin[batch.positions].unsqueeze(1)
        for i, layer in enumerate(model.layers):
            with torch.no_grad():
                got = decoders[i].forward(hidden, batch.positions, batch.slot_mapping,
                                          batch.block_tables, batch.seq_lens,
                                          batch.query_start_loc)
                hidden = layer(hidden, cos, sin, batch, loop_caches[i])
            assert got.dtype == torch.float32 and got.shape == hidden.shape
            assert _close(got, hidden, tolerance), (dtype, step, i)
            written = batch.slot_mapping
            for fused, loop in zip(fused_caches[i], loop_caches[i]):
                assert fused.dtype == loop.dtype
                assert _close(fused.flatten(0, 1)[written], loop.flatten(0, 1)[written],
                              tolerance), (dtype, step, i)


@pytest.mark.parametrize("model", MODELS)
def test_the_model_uses_the_stack_for_decode_and_verify_steps(model, request):
    fused = load_model(request.getfixturevalue(model), "float32", quantization="int4")
    loop = load_model(request.getfixturevalue(model), "float32", quantization="int4")
    loop._decoder = False
    fused_caches, loop_caches = fused.make_kv_caches(16, 8), loop.make_kv_caches(16, 8)
    fused_seqs, loop_seqs = PagedSequences(16, 8, seed=3), PagedSequences(16, 8, seed=3)
    for step, windows in enumerate(_steps()):
        want = loop(loop_seqs.batch(windows), loop_caches)
        got = fused(fused_seqs.batch(windows), fused_caches)
        assert isinstance(fused._decoder, tuple)  # the prefills too
        diff = (got - want).abs()
        scale = want.abs().max().item()
        assert diff.mean().item() <= 1e-2 * scale and diff.max().item() <= 1e-1 * scale, step


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_window_row_equals_a_one_row_step(model, dtype, request):
    """Speculation's premise, to the bit: a verify window's rows give the logits that plain
    decodes of the same tokens give, in float32 and in bfloat16 (where a last-bit difference
    before a rounding to bfloat16 can flip a greedy near-tie: a batched attention over the
    window's rows did, on 1-2 of 16 real code prompts). The window also holds more rows than
    the q4 kernel's row chunk (8), and the context spans several cache blocks."""
    model = load_model(request.getfixturevalue(model), dtype, quantization="int4")
    prompt, window = list(range(10, 40)), [41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51]
    one_caches, win_caches = model.make_kv_caches(16, 8), model.make_kv_caches(16, 8)
    one, win = PagedSequences(16, 8, seed=1), PagedSequences(16, 8, seed=2)
    model(one.batch([("s", prompt)]), one_caches)
    model(win.batch([("s", prompt)]), win_caches)
    # a usual verify window, then one past the row chunk; each extends both sequences alike
    for size in (5, len(window)):
        rows = torch.cat([model(one.batch([("s", [t])]), one_caches) for t in window[:size]])
        together = model(win.batch([("s", window[:size])]), win_caches)
        assert isinstance(model._decoder, tuple)
        assert torch.equal(rows, together), (size, (rows - together).abs().max().item())


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_prefill_row_equals_it_after_a_cached_prefix(model, dtype, request):
    """Prefix caching's premise, to the bit: a 40-token prompt prefilled at once gives every
    row the logits it gets when its first 24 tokens came from the cache and only the tail (16
    rows) runs, or the last 7. In bfloat16 a batched attention over a long window against a
    row-wise one over a short window flipped the first token of 1 of 4 real code prompts."""
    model = load_model(request.getfixturevalue(model), dtype, quantization="int4")
    if not decoder_cpu.rows_alone(model):
        pytest.skip("no AVX-512 attention for this head_dim: long prefill chunks attend batched")
    prompt = list(range(10, 50))
    whole = model(PagedSequences(16, 8, seed=1).batch([("s", prompt)]), model.make_kv_caches(16, 8))
    assert isinstance(model._decoder, tuple)
    for cut in (24, 33):
        seqs = PagedSequences(16, 8, seed=2)
        caches = model.make_kv_caches(16, 8)
        head = model(seqs.batch([("s", prompt[:cut])]), caches)
        tail = model(seqs.batch([("s", prompt[cut:])]), caches)
        split = torch.cat([head, tail])
        assert torch.equal(whole, split), (cut, (whole - split).abs().max().item())


def _with_int4_embedding(model):
    """`model` with its embedding as an int4 table (what a GGUF int4 load gives it)."""
    from specdec.model.quant import Int4Embedding

    model.embed_tokens = Int4Embedding(model.embed_tokens, model.dtype)
    return model


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("head", ["full", "pruned"])
def test_one_call_from_ids_to_logits_matches_the_torch_ends(model, dtype, head, request,
                                                             monkeypatch):
    """`forward_logits` (the int4 embedding, the stack, the final RMSNorm and the q4 lm_head in
    one C++ call) against the stack between the model's own torch embedding, norm and head,
    over the same steps: the same logits within rounding (the norm's sum runs in another
    order, which can move one int8 code of the head's input by a step), the pruned head's
    columns -inf, and the forward's -inf padding of a padded vocabulary kept."""
    path = request.getfixturevalue(model)
    fused = _with_int4_embedding(load_model(path, dtype, quantization="int4"))
    ends = _with_int4_embedding(load_model(path, dtype, quantization="int4"))
    vocab = fused.num_real_tokens
    for m in (fused, ends):
        if head == "pruned":
            m.prune_head(vocab // 2 // 16 * 16)
        else:
            m.pad_vocab(vocab + 16)
    fused_caches, ends_caches = fused.make_kv_caches(16, 8), ends.make_kv_caches(16, 8)
    fused_seqs, ends_seqs = PagedSequences(16, 8, seed=3), PagedSequences(16, 8, seed=3)
    for step, windows in enumerate(_steps()):
        got = fused(fused_seqs.batch(windows), fused_caches)
        assert fused._decoder[1].has_head() and fused._decoder[1].has_embedding()
        with monkeypatch.context() as patched:
            patched.setattr(decoder_cpu, "add_ends", lambda decoder, model: None)
            want = ends(ends_seqs.batch(windows), ends_caches)
        assert not ends._decoder[1].has_head()
        assert got.shape == want.shape and got.dtype == torch.float32
        real = torch.isfinite(want)
        assert torch.equal(torch.isfinite(got), real), step
        assert real[:, :vocab // 2 // 16 * 16].all()
        assert _close(got[real], want[real], LOGIT_TOLERANCE[dtype]), (step, dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_stacks_embedding_is_the_int4_tables_to_the_bit(tiny_qwen2_dir, dtype):
    """CpuDecoder.embed against Int4Embedding's torch lookup: every value equal, ids past the
    real rows of a padded vocabulary zero, as the model's _embed gives them."""
    model = _with_int4_embedding(load_model(tiny_qwen2_dir, dtype, quantization="int4"))
    vocab = model.num_real_tokens
    model.pad_vocab(vocab + 16)
    decoder = decoder_cpu.build(model, model.make_kv_caches(4, 8))
    assert decoder.has_embedding()
    ids = torch.tensor([0, 1, 7, vocab - 1, vocab, vocab + 15, 3, 3])
    with torch.no_grad():
        want = model._embed(ids).float()
    got = decoder.embed(ids)
    assert torch.equal(got, want)
    assert not got[4:6].any()
    with pytest.raises(RuntimeError, match="token id -1 is negative"):
        decoder.embed(torch.tensor([-1]))


def test_layer_loop_where_the_stack_cannot_run(tiny_llama_dir, monkeypatch):
    seqs = PagedSequences(16, 8)
    decode = seqs.batch([("a", [5, 6, 7])])
    plain = load_model(tiny_llama_dir, "float32")  # not quantized: no q4 projection
    plain(decode, plain.make_kv_caches(16, 8))
    assert plain._decoder is False
    int8 = load_model(tiny_llama_dir, "float32", quantization="int8")
    int8(decode, int8.make_kv_caches(16, 8))
    assert int8._decoder is False
    int4 = load_model(tiny_llama_dir, "float32", quantization="int4")
    monkeypatch.setattr(decoder_cpu, "MAX_SCORES", 40 * 40)
    long = PagedSequences(16, 8).batch([("a", list(range(3, 3 + 41)))])
    assert not decoder_cpu.takes(long)  # 41 rows x 41 keys
    int4(long, int4.make_kv_caches(16, 8))
    assert int4._decoder is None  # past the bound: the loop, the stack still to be built
    assert decoder_cpu.takes(PagedSequences(16, 8).batch([("a", list(range(3, 3 + 40)))]))
    decode.lora = object()  # a batch with adapters
    assert not decoder_cpu.takes(decode)
    monkeypatch.setenv("SPECDEC_CPU_DECODER", "reference")
    forced = load_model(tiny_llama_dir, "float32", quantization="int4")
    forced(PagedSequences(16, 8).batch([("a", [5, 6, 7])]), forced.make_kv_caches(16, 8))
    assert forced._decoder is False


def test_stack_rejects_a_batch_past_its_cache(tiny_draft_dir):
    model = load_model(tiny_draft_dir, "float32", quantization="int4")
    caches = model.make_kv_caches(4, 8)
    batch = PagedSequences(4, 8).batch([("a", [5, 6, 7])])
    model(batch, caches)
    decoder = model._decoder[1]
    hidden = torch.zeros(3, model.hidden_size)
    bad_slots = batch.slot_mapping + 4 * 8
    with pytest.raises(RuntimeError, match="slot .* is past the cache"):
        decoder.forward(hidden, batch.positions, bad_slots, batch.block_tables, batch.seq_lens,
                        batch.query_start_loc)
    with pytest.raises(RuntimeError, match="past the rotary table"):
        decoder.forward(hidden, batch.positions + 10_000, batch.slot_mapping,
                        batch.block_tables, batch.seq_lens, batch.query_start_loc)


def _run_bench_on_tiny_pair(script: str, args: list[str], targets: tuple[str, str],
                           tmp_path) -> dict:
    """Runs bench/<script> on the tiny int4 pair (configs/tiny-random-pair.toml); its JSON."""
    root = pathlib.Path(__file__).resolve().parents[2]
    env = dict(os.environ, SPECDEC_TINY_TARGET=targets[0], SPECDEC_TINY_DRAFT=targets[1],
               SPECDEC_CACHE_DIR=str(tmp_path / "cache"))
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, str(root / "bench" / script), "--config",
         str(root / "configs/tiny-random-pair.toml"), "--model.quantization", "int4",
         "--spec.draft_quantization", "int4", *args, "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(out.read_text())


def test_the_benchmark_runs_on_a_tiny_pair(tiny_llama_dir, tiny_draft_dir, tmp_path):
    """bench/decoder_cpu.py end to end, so it works before anyone times with it."""
    results = _run_bench_on_tiny_pair(
        "decoder_cpu.py", ["--rounds", "1", "--rows", "1,3", "--context", "40"],
        (tiny_llama_dir, tiny_draft_dir), tmp_path)["results"]
    assert {(r["model"], r["rows"]) for r in results} == {
        ("target", 1), ("target", 3), ("draft", 1), ("draft", 3)}
    assert all(r["stack_ms"] > 0 and r["loop_ms"] > 0 and r["q4_only_ms"] > 0 for r in results)


def test_the_stack_ab_benchmark_runs_on_a_tiny_pair(tiny_llama_dir, tiny_draft_dir, tmp_path):
    """bench/decoder_cpu_ab.py end to end, the current source against itself (one build)."""
    results = _run_bench_on_tiny_pair(
        "decoder_cpu_ab.py", ["--old", str(q4_cpu._SOURCES[1]), "--rounds", "1", "--rows", "1,3",
                              "--context", "40", "--build-dir", str(tmp_path / "ext")],
        (tiny_llama_dir, tiny_draft_dir), tmp_path)["results"]
    assert {(r["model"], r["rows"]) for r in results} == {
        ("target", 1), ("target", 3), ("draft", 1), ("draft", 3)}
    assert all(r["old_ms"] > 0 and r["new_ms"] > 0 for r in results)


def test_the_lookup_ab_benchmark_runs_on_a_tiny_pair(tiny_llama_dir, tiny_draft_dir, tmp_path):
    """bench/lookup_ab.py end to end on the tiny int4 pair: every mode ran, and counted."""
    rows = _run_bench_on_tiny_pair(
        "lookup_ab.py", ["--num-prompts", "2", "--max-tokens", "8", "--fixed-k", "3",
                         "--modes", "4:2,2:1"],
        (tiny_llama_dir, tiny_draft_dir), tmp_path)["modes"]
    assert [r["mode"] for r in rows] == ["off", "4:2", "2:1"]
    assert all(r["tokens"] == rows[0]["tokens"] > 0 and r["verify_calls"] > 0 for r in rows)
    assert rows[0]["lookup_tokens"] == 0 and rows[0]["same_as_off"] == 2


def test_the_adaptive_ab_benchmark_runs_on_a_tiny_pair(tiny_llama_dir, tiny_draft_dir, tmp_path):
    """bench/adaptive_ab.py end to end on the tiny int4 pair (its tokenizer is the models')."""
    rows = _run_bench_on_tiny_pair(
        "adaptive_ab.py", ["--first", "0", "--num-prompts", "2", "--max-tokens", "8",
                           "--max-k", "2", "--rounds", "1"],
        (tiny_llama_dir, tiny_draft_dir), tmp_path)["results"]
    assert [r["k"] for r in rows] == ["adaptive", 1, 2]
    assert all(r["tokens"] > 0 and r["tokens_per_s"] > 0 for r in rows)
    # a fixed k drafts k a window (fewer only where max_tokens cuts the last one)
    assert 0 < rows[1]["mean_drafts"] <= 1 < rows[2]["mean_drafts"] <= 2
    assert all(1 <= r["acceptance_length"] <= 1 + r["mean_drafts"] for r in rows[1:])


def test_the_adaptive_ab_benchmark_compares_caps(tiny_llama_dir, tiny_draft_dir, tmp_path):
    rows = _run_bench_on_tiny_pair(
        "adaptive_ab.py", ["--first", "0", "--num-prompts", "2", "--max-tokens", "8",
                           "--max-k", "0", "--rounds", "1", "--caps", "1,3",
                           "--spec.num_speculative_tokens", "3"],
        (tiny_llama_dir, tiny_draft_dir), tmp_path)["results"]
    assert [r["k"] for r in rows] == ["adaptive<=1", "adaptive<=3"]
    assert rows[0]["mean_drafts"] <= 1  # the cap held for its requests
