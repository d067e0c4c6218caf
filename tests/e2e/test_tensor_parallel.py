"""`python -m server --tensor-parallel-size 2` as a subprocess: the worker is its child; SIGTERM
stops both and leaves no orphan; a killed worker, or a stuck one (a collective that times out),
makes the server exit non-zero instead of hanging."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from tests.e2e.conftest import http
from tests.e2e.test_shutdown import ROOT, _free_port, _wait_ready

HANG_GUARD_S = 60  # a hang guard, not a timing assertion


def _children(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of every live process whose parent is `pid` (a process listing)."""
    out = subprocess.run(["ps", "-ww", "-eo", "pid=,ppid=,stat=,args="], capture_output=True,
                         text=True, check=True).stdout
    rows = []
    for line in out.splitlines():
        child, parent, stat, args = line.split(None, 3)
        if int(parent) == pid and not stat.startswith("Z"):
            rows.append((int(child), args))
    return rows


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _start(tmp_path, tiny_llama_dir, *extra: str):
    config = tmp_path / "server.toml"
    config.write_text(f'[model]\npath = "{tiny_llama_dir}"\nmax_model_len = 256\n'
                      f'[spec]\nmethod = "ngram"\nadaptive = false\n'
                      f'[device]\ndevice = "cpu"\nnum_threads = 1\n'
                      f'[server]\nserved_model_name = "tiny"\n')
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "server.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", "--config", str(config), "--port", str(port),
         "--tensor-parallel-size", "2", *extra],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(log_path, "wb"))
    try:
        _wait_ready(proc, url, log_path)
        workers = [pid for pid, args in _children(proc.pid) if "spawn_main" in args]
        assert len(workers) == 1, _children(proc.pid)
    except BaseException:
        proc.kill()  # the worker follows its parent (it polls for it)
        raise
    return proc, url, log_path, workers[0]


def _completion(url: str) -> int:
    return http("POST", url + "/v1/completions", {"prompt": "Hello", "max_tokens": 8,
                                                  "temperature": 0})[0]


def test_sigterm_stops_the_worker_and_leaves_no_orphan(tmp_path, tiny_llama_dir):
    proc, url, log_path, worker = _start(tmp_path, tiny_llama_dir)
    try:
        assert _completion(url) == 200
        descendants = [pid for pid, _ in _children(proc.pid)]  # the worker and any helper
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(HANG_GUARD_S) == 0, log_path.read_text()
        deadline = time.monotonic() + 10  # the worker leaves after its shutdown message
        while any(_alive(pid) for pid in descendants) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [pid for pid in descendants if _alive(pid)] == [], log_path.read_text()
        assert worker in descendants
    finally:
        proc.kill()


def test_killed_worker_makes_the_server_exit_non_zero(tmp_path, tiny_llama_dir):
    proc, url, log_path, worker = _start(tmp_path, tiny_llama_dir)
    try:
        assert _completion(url) == 200
        os.kill(worker, signal.SIGKILL)
        code = proc.wait(HANG_GUARD_S)
        log = log_path.read_text()
        assert code != 0, log
        assert "tensor-parallel worker rank 1" in log and "exited with code -9" in log, log
        assert [pid for pid, _ in _children(proc.pid)] == []
    finally:
        proc.kill()


def test_stuck_worker_times_out_and_the_server_exits_non_zero(tmp_path, tiny_llama_dir):
    proc, url, log_path, worker = _start(tmp_path, tiny_llama_dir, "--parallel.timeout_s", "2")
    try:
        assert _completion(url) == 200
        os.kill(worker, signal.SIGSTOP)  # alive, but answers no collective
        assert _completion(url) == 500
        code = proc.wait(HANG_GUARD_S)
        assert code != 0, log_path.read_text()
        deadline = time.monotonic() + 10
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(worker), "the stopped worker outlived the server"
    finally:
        proc.kill()
        if _alive(worker):
            os.kill(worker, signal.SIGKILL)
