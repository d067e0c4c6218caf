"""The adaptive controller's calibration is measured once per machine / models / dtype /
threads and reused by the next start with the same key; anything else measures again. A
server with no cached calibration starts at once with a conservative k and calibrates
between requests."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

import specdec.runner
from specdec.core.config import from_dict
from specdec.engine import Engine
from specdec.spec import calibration

QUIET_SHARE = specdec.runner.QUIET_SHARE


@pytest.fixture(autouse=True)
def _any_load_is_quiet(monkeypatch):
    """These tests time tiny forwards on a CI machine that may be busy: there, every timing
    counts as quiet (the busy case has its own tests below, with a fake thread clock)."""
    monkeypatch.setattr(specdec.runner, "QUIET_SHARE", 0.0)


class FakeThreadClock:
    """time.thread_time for a CPU shared with other jobs: the engine thread runs `share` of
    the wall time in its first `busy` timings (every one: None), all of it after."""

    def __init__(self, share: float, busy: int | None = None):
        self.share, self.busy, self.calls = share, busy, 0

    def __call__(self) -> float:
        timing = self.calls // 2  # calibrate reads the clock before and after each timing
        self.calls += 1
        busy = self.busy is None or timing < self.busy
        return time.perf_counter() * (self.share if busy else 1.0)


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


def test_a_calibration_timed_on_a_busy_cpu_is_not_cached(tiny_llama_dir, tiny_draft_dir,
                                                          tmp_path, monkeypatch, caplog):
    # NOTE: cached, such a table held k at 0 on every later start (a draft forward timed at
    # 102 ms beside a build, against 7 ms on the idle dev VM)
    monkeypatch.setenv("SPECDEC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(specdec.runner, "QUIET_SHARE", QUIET_SHARE)
    clock = FakeThreadClock(share=0.3)
    monkeypatch.setattr(time, "thread_time", clock)
    caplog.set_level("WARNING", logger="specdec.engine")
    busy = _engine(tiny_llama_dir, tiny_draft_dir)
    assert busy.startup["calibration"] == "measured on a busy CPU (not saved)"
    assert "while the CPU was busy" in caplog.text and "30 %" in caplog.text
    assert not (tmp_path / "calibration").exists()
    # the tables still seed this engine's controller
    assert set(busy.target_runner.cost.table) == {1, 2, 4, 8}
    assert set(busy.draft_runner.cost.table) == {1, 2, 4, 16, 64, 256}
    # every size was timed its 2 repeats and all 4 retries (the warm-up reads no clock)
    assert clock.calls == 2 * (2 + specdec.runner.BUSY_RETRIES) * (4 + 6)

    monkeypatch.setattr(time, "thread_time", FakeThreadClock(share=1.0))
    assert _engine(tiny_llama_dir, tiny_draft_dir).startup["calibration"] == "measured"
    assert len(os.listdir(tmp_path / "calibration")) == 1
    assert _engine(tiny_llama_dir, tiny_draft_dir).startup["calibration"] == "cached"


def test_busy_timings_are_taken_again_and_the_quiet_ones_kept(tiny_llama_dir, tiny_draft_dir,
                                                              monkeypatch):
    monkeypatch.setattr(specdec.runner, "QUIET_SHARE", QUIET_SHARE)
    runner = _engine(tiny_llama_dir, tiny_draft_dir, **{"spec.adaptive": False}).target_runner
    assert runner.cost.table == {}
    clock = FakeThreadClock(share=0.5, busy=3)
    monkeypatch.setattr(time, "thread_time", clock)
    assert runner.calibrate([4], repeats=2) >= QUIET_SHARE
    assert clock.calls == 2 * (3 + 2)  # 3 busy timings, then the 2 quiet ones it asked for
    assert set(runner.cost.table) == {4}

    clock = FakeThreadClock(share=0.5)
    monkeypatch.setattr(time, "thread_time", clock)
    share = runner.calibrate([8], repeats=2)
    assert 0.3 < share < QUIET_SHARE  # the busy share is reported
    assert clock.calls == 2 * (2 + specdec.runner.BUSY_RETRIES)
    assert set(runner.cost.table) == {4, 8}

    # Rank 0 of a tensor-parallel group sleeps in its collectives: its thread's share says
    # nothing about other jobs, so its timings all count.
    monkeypatch.setattr(runner.model, "tp", object())
    monkeypatch.setattr(runner, "_forward", lambda batch: None)
    assert runner.calibrate([2], repeats=2) == 1.0


def test_a_background_calibration_on_a_busy_cpu_is_not_cached(tiny_llama_dir, tiny_draft_dir,
                                                               tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDEC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(specdec.runner, "QUIET_SHARE", QUIET_SHARE)
    engine = _engine(tiny_llama_dir, tiny_draft_dir, defer=True)
    # one size times busy, the rest quiet: the whole table is suspect
    clock = FakeThreadClock(share=0.2, busy=2 + specdec.runner.BUSY_RETRIES)
    monkeypatch.setattr(time, "thread_time", clock)
    while engine.run_idle_work():
        pass
    assert engine.startup["calibration"] == "measured in background on a busy CPU (not saved)"
    assert not engine.controller.calibrating
    assert not (tmp_path / "calibration").exists()
