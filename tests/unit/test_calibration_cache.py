"""The adaptive controller's calibration is measured once per machine / models / dtype /
threads and reused by the next start with the same key; anything else measures again."""

from __future__ import annotations

import json
import os

import torch

from specdec.core.config import from_dict
from specdec.engine import Engine
from specdec.spec import calibration


def _engine(target: str, draft: str, **overrides) -> Engine:
    settings = {"model.path": target, "model.max_model_len": 256, "spec.method": "draft",
                "spec.draft_model": draft, "spec.num_speculative_tokens": 3,
                "spec.adaptive": True, "cache.num_blocks": 64}
    settings.update(overrides)
    return Engine(from_dict({}, settings))


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
