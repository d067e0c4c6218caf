"""LoRA adapters: PEFT loading and validation, slot swapping, and batched per-token application
against peft.PeftModel (float32, within 1e-4) for prefill, chunked prefill, decode and verify
windows, and one ragged batch mixing the base and two adapters over shuffled block tables."""

from __future__ import annotations

import json
import os

import pytest
import torch

from specdec.model.lora import LoRAError, LoRAManager, load_adapter
from specdec.model.weights import load_model
from tests.conftest import PagedSequences

peft = pytest.importorskip("peft")

ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {
    # name -> LoraConfig kwargs
    "a1": dict(r=4, lora_alpha=8, target_modules=ALL_MODULES),
    "a2": dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "k_proj", "o_proj",
                                                                      "up_proj", "down_proj"],
               rank_pattern={"k_proj": 2}, alpha_pattern={"down_proj": 3}),
}


def make_adapter(base_dir: str, out_dir: str, seed: int, **lora_kwargs) -> str:
    """A PEFT adapter with random (non-zero) A and B, saved as adapter_config.json +
    adapter_model.safetensors."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora_kwargs))
    with torch.no_grad():  # larger B so the adapter visibly moves the logits
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(2.0)
    peft_model.save_pretrained(out_dir)
    return out_dir


def peft_logits(base_dir: str, adapter_dir: str | None, tokens: list[int]) -> torch.Tensor:
    """Reference float32 logits [len(tokens), vocab] of the base model plus an adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir).eval()
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float()


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def setup(request, tmp_path_factory):
    base_dir = request.getfixturevalue(f"tiny_{request.param}_dir")
    root = tmp_path_factory.mktemp(f"lora_{request.param}")
    dirs = {name: make_adapter(base_dir, str(root / name), seed=10 + i, **kw)
            for i, (name, kw) in enumerate(ADAPTERS.items())}
    return base_dir, dirs


def _manager(model, max_loras=2, max_lora_rank=8):
    return LoRAManager(model.arch, max_loras, max_lora_rank, 0, model.dtype, model.device)


PROMPT = [(7 * i + 3) % 300 + 5 for i in range(29)]


@pytest.mark.parametrize("windows", [[29], [10, 7, 8, 1, 1, 2], [12, 12, 1, 4]],
                         ids=["prefill", "chunked+decode", "prefill+decode+verify"])
def test_logits_match_peft(setup, windows):
    base_dir, dirs = setup
    model = load_model(base_dir, "float32")
    manager = _manager(model)
    ids = {name: manager.add(name, path).lora_int_id for name, path in dirs.items()}
    for name in dirs:
        want = peft_logits(base_dir, dirs[name], PROMPT)
        base = peft_logits(base_dir, None, PROMPT)
        assert (want - base).abs().max() > 1e-2, "the adapter must change the logits"
        slot = manager.activate({ids[name]})[ids[name]]
        seqs = PagedSequences(num_blocks=16, block_size=4, seed=3)
        caches = model.make_kv_caches(16, 4)
        start = 0
        for n in windows:
            batch = seqs.batch([("s", PROMPT[start:start + n])])
            batch.lora = manager.make_batch([slot] * n, model.device)
            got = model(batch, caches)
            torch.testing.assert_close(got, want[start:start + n], atol=1e-4, rtol=0)
            start += n


def test_ragged_batch_mixes_base_and_two_adapters(setup):
    base_dir, dirs = setup
    model = load_model(base_dir, "float32")
    manager = _manager(model)
    ids = {name: manager.add(name, path).lora_int_id for name, path in dirs.items()}
    by_id = manager.activate(set(ids.values()))
    slots = {name: by_id[i] for name, i in ids.items()}
    prompts = {"base": PROMPT[:17], "a1": PROMPT[3:26], "a2": PROMPT[5:14]}
    want = {name: peft_logits(base_dir, dirs.get(name), p) for name, p in prompts.items()}
    seqs = PagedSequences(num_blocks=32, block_size=4, seed=5)
    caches = model.make_kv_caches(32, 4)
    done = dict.fromkeys(prompts, 0)
    # step 1: prefill chunks of different lengths; then windows of 1..3 tokens (decode/verify)
    for step_sizes in ({"base": 6, "a1": 9, "a2": 4}, {"base": 1, "a1": 3, "a2": 2},
                       {"base": 5, "a1": 1, "a2": 3}, {"base": 5, "a1": 10}):
        windows, token_slots, rows = [], [], []
        for name, n in step_sizes.items():
            start = done[name]
            windows.append((name, prompts[name][start:start + n]))
            token_slots += [slots.get(name, -1)] * n
            rows.append(want[name][start:start + n])
            done[name] += n
        batch = seqs.batch(windows)
        batch.lora = manager.make_batch(token_slots, model.device)
        got = model(batch, caches)
        torch.testing.assert_close(got, torch.cat(rows), atol=1e-4, rtol=0)


def test_slot_eviction_reloads(setup):
    """One slot, two adapters: each activation swaps the slot's weights in."""
    base_dir, dirs = setup
    model = load_model(base_dir, "float32")
    manager = _manager(model, max_loras=1)
    ids = {name: manager.add(name, path).lora_int_id for name, path in dirs.items()}
    for name in ["a1", "a2", "a1"]:
        slot = manager.activate({ids[name]})[ids[name]]
        assert slot == 0
        seqs = PagedSequences(num_blocks=16, block_size=4, seed=1)
        batch = seqs.batch([("s", PROMPT)])
        batch.lora = manager.make_batch([slot] * len(PROMPT), model.device)
        got = model(batch, model.make_kv_caches(16, 4))
        torch.testing.assert_close(got, peft_logits(base_dir, dirs[name], PROMPT),
                                   atol=1e-4, rtol=0)
    with pytest.raises(RuntimeError, match="max_loras"):
        manager.activate(set(ids.values()))
    # max_cpu_loras = 0 means max_loras = 1 here: an adapter evicted from the host LRU is
    # read again from its path when next activated
    assert manager.max_cpu_loras == 1 and list(manager.host) == [ids["a1"]]
    assert ids["a2"] not in manager.host and manager.slot_owner[0] == ids["a1"]
    slot = manager.activate({ids["a2"]})[ids["a2"]]
    assert ids["a2"] in manager.host and manager.slot_owner[slot] == ids["a2"]


# ---- validation --------------------------------------------------------------------------

def _copy_adapter(src: str, dst: str, edit_config=None, edit_tensors=None) -> str:
    from safetensors.torch import load_file, save_file
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(src, "adapter_config.json")) as f:
        cfg = json.load(f)
    if edit_config:
        edit_config(cfg)
    with open(os.path.join(dst, "adapter_config.json"), "w") as f:
        json.dump(cfg, f)
    tensors = load_file(os.path.join(src, "adapter_model.safetensors"))
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, os.path.join(dst, "adapter_model.safetensors"))
    return dst


Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


@pytest.mark.parametrize("case,match", [
    ("modules_to_save", r"adapter_config.json key 'modules_to_save'"),
    ("dora", r"adapter_config.json key 'use_dora': DoRA"),
    ("unknown_key", r"adapter_config.json key 'my_new_feature': unknown key"),
    ("bad_target", r"key 'target_modules': module 'lm_head'"),
    ("rank_too_big", r"adapter_config.json key 'r': rank 4 .*max_lora_rank=2"),
    ("bad_shape", r"adapter_model.safetensors key '" + Q_A.replace(".", r"\.") + "' has shape"),
    ("extra_tensor", r"adapter_model.safetensors key 'base_model.model.lm_head.weight'"),
    ("missing_b", r"q_proj\.lora_B\.weight' is missing"),
    ("no_dir", r"adapter_config.json does not exist"),
])
def test_bad_adapters_name_file_and_key(setup, tmp_path, case, match):
    base_dir, dirs = setup
    model = load_model(base_dir, "float32")
    src, dst = dirs["a1"], str(tmp_path / case)
    max_rank = 8
    if case == "modules_to_save":
        _copy_adapter(src, dst, lambda c: c.update(modules_to_save=["lm_head"]))
    elif case == "dora":
        _copy_adapter(src, dst, lambda c: c.update(use_dora=True))
    elif case == "unknown_key":
        _copy_adapter(src, dst, lambda c: c.update(my_new_feature={"x": 1}))
    elif case == "bad_target":
        _copy_adapter(src, dst, lambda c: c.update(target_modules=["q_proj", "lm_head"]))
    elif case == "rank_too_big":
        _copy_adapter(src, dst)
        max_rank = 2
    elif case == "bad_shape":
        _copy_adapter(src, dst, edit_tensors=lambda t: t.update({Q_A: t[Q_A][:, :-1].clone()}))
    elif case == "extra_tensor":
        _copy_adapter(src, dst, edit_tensors=lambda t: t.update(
            {"base_model.model.lm_head.weight": torch.zeros(2, 2)}))
    elif case == "missing_b":
        _copy_adapter(src, dst, edit_tensors=lambda t: t.pop(Q_A.replace("lora_A", "lora_B")))
    manager = _manager(model, max_lora_rank=max_rank)
    with pytest.raises(LoRAError, match=match):
        manager.add("bad", dst)
    assert "bad" not in manager.registry


def test_scale_and_patterns(setup):
    """rank_pattern / alpha_pattern / rsLoRA give each module its own rank and scale."""
    base_dir, dirs = setup
    model = load_model(base_dir, "float32")
    adapter = load_adapter("a2", dirs["a2"], 8, model.arch)
    assert adapter.weights[(0, "k_proj")][0].shape[0] == 2
    assert adapter.weights[(0, "q_proj")][0].shape[0] == 8
    assert (0, "v_proj") not in adapter.weights
    from safetensors.torch import load_file
    raw = load_file(os.path.join(dirs["a2"], "adapter_model.safetensors"))
    b_key = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
    torch.testing.assert_close(adapter.weights[(1, "down_proj")][1], raw[b_key] * 3 / 8 ** 0.5)
