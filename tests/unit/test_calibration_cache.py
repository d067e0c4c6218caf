"""The adaptive controller's calibration is measured once per machine / models / dtype /
threads and reused by the next start with the same key; anything else measures again. A
server with no cached calibration starts at once with a conservative k and calibrates
between requests."""

from __future__ import annotations

import json
import os

import torch

from specdec.core.config import from_dict
from specdec.engine import Engine
from specdec.spec import calibration


def _engine(target: str, draft: str, defer: bool = False, **overrides) -> Engine:
    settings = {"model.path": target, "model.max_model_len": 256, "spec.method": "draft",
                "spec.draft_model": draft, "spec.num_speculative_tokens": 3,
                "spec.adaptive": True, "cache.num_blocks": 64}
    settings.update(overrides)
    return Engine(from_dict({}, settings), defer_startup_work=defer)


def test_second_start_reuses_the_calibration(tiny_llama_dir, tiny_draft_dir, tmp_path,
                                             monkeypatch):
    monkeypatch.setenv("SPECDEC_CACHE_DIR", str(tmp_path))
    first = _engine(tiny_llama_dir, tiny_draft_dir)
    assert first.startup["calibration"] == "measured"
    files = os.listdir(tmp_path / "calibration")
    assert len(files) == 1
    second = _engine(tiny_llama_dir, tiny_draft_dir)
    assert second.startup["calibration"] == "cached"
    assert second.target_runner.cost.table == first.target_runner.cost.table
    assert second.draft_runner.cost.table == first.draft_runner.cost.table
    assert set(second.target_runner.cost.table) == {1, 2, 4, 8}
    for key in ("start_s", "load_s", "rss_mb", "peak_rss_mb", "calibration_s"):
        assert second.startup[key] >= 0, key


def test_a_different_key_or_a_forced_run_measures_again(tiny_llama_dir, tiny_draft_dir,
                                                        tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDEC_CACHE_DIR", str(tmp_path))
    assert _engine(tiny_llama_dir, tiny_draft_dir).startup["calibration"] == "measured"
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert _engine(tiny_llama_dir, tiny_draft_dir).startup["calibration"] == "measured"
    finally:
        torch.set_num_threads(threads)
    other = _engine(tiny_llama_dir, tiny_draft_dir, **{"spec.draft_quantization": "int8"})
    assert other.startup["calibration"] == "measured"
    assert len(os.listdir(tmp_path / "calibration")) == 3
    monkeypatch.setenv("SPECDEC_RECALIBRATE", "1")
    assert _engine(tiny_llama_dir, tiny_draft_dir).startup["calibration"] == "measured"


def test_a_damaged_calibration_file_is_measured_again(tiny_llama_dir, tiny_draft_dir,
                                                      tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDEC_CACHE_DIR", str(tmp_path))
    _engine(tiny_llama_dir, tiny_draft_dir)
    (file,) = (tmp_path / "calibration").iterdir()
    saved = json.loads(file.read_text())
    saved["tables"]["target"] = "garbage"
    file.write_text(json.dumps(saved))
    assert _engine(tiny_llama_dir, tiny_draft_dir).startup["calibration"] == "measured"
    file.write_text("{not json")
    assert _engine(tiny_llama_dir, tiny_draft_dir).startup["calibration"] == "measured"


def test_the_key_names_the_machine_models_dtype_and_threads(tiny_llama_dir):
    key = calibration.calibration_key(
        torch.device("cpu"), {"target": {"path": tiny_llama_dir, "dtype": "float32",
                                         "quantization": None}}, {"target": [1, 2]}, 16)
    assert key["threads"] == torch.get_num_threads()
    assert key["machine"]["cpu_count"] == os.cpu_count()
    assert key["models"]["target"]["dtype"] == "float32"
    assert key["models"]["target"]["files"]  # the weight files' identity


def _generate(engine: Engine, prompts: list[list[int]], max_tokens: int = 12) -> list[list[int]]:
    from specdec.core.request import SamplingParams

    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=max_tokens,
                                                           temperature=0.0, ignore_eos=True))
    tokens: dict[str, list[int]] = {}
    ks: list[int] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                tokens[out.request_id] = out.outputs[0].token_ids
        ks.extend(engine.controller.last_k)
    return [tokens[f"r{i}"] for i in range(len(prompts))], ks


def test_background_calibration_serves_at_once_then_switches(tiny_llama_dir, tiny_draft_dir,
                                                             tmp_path, monkeypatch, caplog):
    from specdec.spec.adaptive import CONSERVATIVE_DECODES, CONSERVATIVE_K

    monkeypatch.setenv("SPECDEC_CACHE_DIR", str(tmp_path))
    caplog.set_level("INFO", logger="specdec.engine")
    engine = _engine(tiny_llama_dir, tiny_draft_dir, defer=True)
    assert engine.startup["calibration"] == "running in background"
    assert "calibration: running in background" in caplog.text
    assert engine.controller.calibrating and engine.has_idle_work
    assert engine.target_runner.cost.table == {} and engine.draft_runner.cost.table == {}
    assert not (tmp_path / "calibration").exists()

    # Served before any calibration: a conservative k, the target's greedy tokens all the same.
    prompts = [[5, 9, 14, 3], [7, 7, 21], [30, 2, 8, 11, 4], [12], [40, 41], [3, 3, 3]]
    reference, _ = _generate(_engine(tiny_llama_dir, tiny_draft_dir,
                                     **{"spec.method": "none"}), prompts)
    few, ks_few = _generate(engine, prompts[:2])
    many, ks_many = _generate(engine, prompts)
    assert few == reference[:2] and many == reference
    assert max(ks_few) == CONSERVATIVE_K  # 2 decodes: speculating, but only k = 2 of 3
    assert len(prompts) > CONSERVATIVE_DECODES and 0 in ks_many

    pieces = 1
    while engine.run_idle_work():
        pieces += 1
    assert pieces == 1 + 4 + 6 + 1  # grammar tokenizer, 4 target sizes, 6 draft sizes, save
    assert not engine.controller.calibrating and not engine.has_idle_work
    assert engine.startup["calibration"] == "measured in background"
    assert "calibration: measured in background" in caplog.text
    assert {1, 2, 4, 8} <= set(engine.target_runner.cost.table)
    assert len(os.listdir(tmp_path / "calibration")) == 1
    assert _engine(tiny_llama_dir, tiny_draft_dir, defer=True).startup["calibration"] == "cached"


def test_the_server_engine_thread_calibrates_while_idle(tiny_llama_dir, tiny_draft_dir,
                                                        tmp_path, monkeypatch):
    import time

    from server.bridge import AsyncEngine

    monkeypatch.setenv("SPECDEC_CACHE_DIR", str(tmp_path))
    engine = _engine(tiny_llama_dir, tiny_draft_dir, defer=True)
    done: list[str] = []
    bridge = AsyncEngine(engine, max_in_flight=4,
                         on_idle_work_done=lambda: done.append(engine.startup["calibration"]))
    bridge.start()
    try:
        deadline = time.monotonic() + 60
        while not done and time.monotonic() < deadline:
            time.sleep(0.05)
        assert bridge.alive
    finally:
        bridge.stop()
    assert done == ["measured in background"] and not engine.has_idle_work
    assert len(os.listdir(tmp_path / "calibration")) == 1
