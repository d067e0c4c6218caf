"""`latency.py`'s served systems: our own server over HTTP, as a user runs it, next to
llama.cpp's `llama-server` (latency_llamacpp.py) in the same run.

- `ours-served`: `python -m server --config CONFIG` with the config as shipped (the default
  config: what `make serve` serves, speculation included).
- `ours-served-nospec`: the same config with `spec.method = "none"`.

Each request goes to `/v1/completions` with the prompt's token ids, greedy, not streamed, with
`return_token_ids` (our output ids, for the `same` column) and `repetition_penalty: 1.0`: the
server otherwise applies the model's generation_config.json default (1.1 for Qwen2.5, as vLLM
does), which neither the in-process systems nor llama.cpp use. tok/s is generated tokens over the
client's wall time of the request (prefill included, as for every system); TTFT is the server's
`timings[0].ttft_s`; the acceptance length comes from vLLM's `spec_decode_stats`; peak memory
is the server process's VmHWM. Start-up (process start to /health 200) is `load_s`.

Before the first request the benchmark waits (up to `STARTUP_WORK_TIMEOUT_S`) for the server's
`startup_work_done` log line: a server without a cached calibration times its forwards in the
background while idle and drafts at a conservative k until then, which is the first minute of
a first start, not the steady state this table compares (`calibration` in the JSON says which
it was: "cached", "measured in background", or "not done" on a timeout).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
import tomllib

from latency_common import RequestResult, SystemResult, SystemRun
from latency_llamacpp import _free_port, _post, run_prompts, stop_server, wait_for_health

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STARTUP_WORK_TIMEOUT_S = 300.0


def _wait_for_startup_work(server: subprocess.Popen, timeout_s: float) -> str:
    """Reads the server's stderr (on a thread that keeps draining it) until its
    `startup_work_done` line; returns the calibration it reports, or "not done"."""
    import json

    done = threading.Event()
    seen: dict = {}

    def drain() -> None:
        for line in server.stderr:
            if not done.is_set() and "startup_work_done" in line:
                try:
                    seen.update(json.loads(line))
                except ValueError:
                    seen["calibration"] = "done"
                done.set()

    threading.Thread(target=drain, daemon=True).start()
    done.wait(timeout_s)
    return str(seen.get("calibration", "done")) if done.is_set() else "not done"


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def write_config(path: str, overrides: dict[str, dict]) -> str:
    """A copy of the TOML config at `path` with `overrides` ({section: {key: value}}) applied;
    returns the new file's path (a temporary file)."""
    with open(path, "rb") as f:
        config = tomllib.load(f)
    for section, values in overrides.items():
        config.setdefault(section, {}).update(values)
    lines = []
    for section, values in config.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
        lines.append("")
    fd, out = tempfile.mkstemp(suffix=".toml", prefix="specdec-bench-")
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines))
    return out


def run_served(name: str, args, config_path: str, prompt_ids, prompts) -> SystemRun:
    overrides: dict[str, dict] = {}
    if name == "ours-served-nospec":
        overrides["spec"] = {"method": "none"}
    if args.threads:
        overrides["device"] = {"num_threads": args.threads}
    config = write_config(config_path, overrides)
    port = _free_port()
    cmd = [sys.executable, "-m", "server", "--config", config, "--host", "127.0.0.1",
           "--port", str(port)]
    start = time.perf_counter()
    server = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(server, base, "our server")
        load_s = time.perf_counter() - start
        calibration = _wait_for_startup_work(server, STARTUP_WORK_TIMEOUT_S)
        result = SystemResult(name, load_s, {"command": cmd, "config": config_path,
                                             "overrides": overrides,
                                             "startup": {"calibration": calibration}})

        def generate(ids: list[int], max_tokens: int) -> RequestResult:
            t0 = time.perf_counter()
            out = _post(base + "/v1/completions", {
                "prompt": ids, "max_tokens": max_tokens, "temperature": 0.0,
                "repetition_penalty": 1.0,  # else generation_config.json's 1.1 applies
                "return_token_ids": True, "stream": False,
                "ignore_eos": bool(args.ignore_eos)})
            wall = time.perf_counter() - t0
            choice = out["choices"][0]
            usage = out.get("usage", {})
            stats = usage.get("spec_decode_stats") or {}
            timing = (usage.get("timings") or [{}])[0]
            return RequestResult("", len(ids), list(choice.get("token_ids") or []), wall,
                                 timing.get("ttft_s"), int(stats.get("num_drafts", 0)),
                                 int(stats.get("num_draft_tokens", 0)),
                                 int(stats.get("num_accepted_tokens", 0)))

        return (yield from run_prompts(server, result, generate, args, prompt_ids, prompts))
    finally:
        stop_server(server, 60)
        os.unlink(config)
