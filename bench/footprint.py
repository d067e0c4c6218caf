"""Start-up time and memory of a server, ours next to llama.cpp's `llama-server`.

For each system, one at a time: start the server process on a free loopback port, time how
long until GET /health answers 200, read its resident memory (VmRSS), run a concurrency-N load
of code prompts through bench/serve.py's load generator, then read its peak resident memory
(VmHWM: the high-water mark over the process's whole life, start-up included) and stop it.

    python bench/footprint.py --systems ours,ours,llamacpp --concurrency 16
    python bench/footprint.py --systems ours --config configs/qwen2.5-coder-1.5b+0.5b.toml

`ours` twice measures a first start (no calibration cache yet when run on a fresh cache dir)
and a second one. Before the first, `specdec fetch --config` runs as `make serve` runs it (it
packs the quantized weights the start reads; `--no-prepare` skips it, so the first start
quantizes), and its time is reported as `prepare_s`. Our disk figure counts the model entries
and the packed weights the config reads. llama.cpp runs the same GGUF files the models were converted from
(--target-gguf / --draft-gguf), with the same number of slots and context per slot.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCH_DIR)
if BENCH_DIR not in sys.path:
    sys.path.insert(0, BENCH_DIR)

from serve_stats import proc_memory  # noqa: E402

RESULTS_DIR = os.path.join(BENCH_DIR, "results")
DEFAULT_CONFIG = "configs/qwen2.5-coder-1.5b+0.5b.toml"
LLAMA_SERVER = os.path.join(os.path.expanduser("~"), ".cache", "specdec", "llama.cpp", "build",
                            "bin", "llama-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dir_size(paths: list[str]) -> int:
    total = 0
    for path in paths:
        if os.path.isfile(path):
            total += os.path.getsize(path)
            continue
        for root, _, files in os.walk(path):
            total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> float:
    """Seconds until GET url/health answers 200; raises if the process dies or times out."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before /health was 200")
        try:
            with urllib.request.urlopen(url + "/health", timeout=1.0) as resp:
                if resp.status == 200:
                    return time.perf_counter() - start
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"/health not 200 after {timeout} s")


def our_command(args, port: int) -> tuple[list[str], list[str]]:
    from specdec.core.config import load
    from specdec.fetch import resolve_model_path

    config = load(os.path.join(REPO_ROOT, args.config))
    models = [resolve_model_path(config.model.path)]
    if config.spec.draft_model:
        models.append(resolve_model_path(config.spec.draft_model))
    models += packed_files(config)
    cmd = [sys.executable, "-m", "server", "--config", os.path.join(REPO_ROOT, args.config),
           "--host", "127.0.0.1", "--port", str(port),
           "--scheduler.max_num_seqs", str(args.num_seqs),
           "--model.max_model_len", str(args.ctx)]
    if args.threads:
        cmd += ["--device.num_threads", str(args.threads)]
    return cmd, models


def packed_files(config) -> list[str]:
    """The packed-weight cache files this config's start reads (those that exist)."""
    from specdec.engine import weight_loads
    from specdec.fetch import resolve_model_path
    from specdec.model import quant_cache
    from specdec.model.weights import parse_dtype

    files = []
    for load in weight_loads(config).values():
        if load is None or load["quantization"] is None:
            continue
        key = quant_cache.cache_key(resolve_model_path(load["path"]),
                                    parse_dtype(load["dtype"]), load["quantization"],
                                    load["high_bits"])
        path = os.path.join(quant_cache.cache_dir(), f"{key}.safetensors")
        if key is not None and os.path.isfile(path):
            files.append(path)
    return files


def prepare(args) -> tuple[float, float]:
    """Run `specdec fetch --config` (what `make serve` runs first); returns its seconds and
    its peak resident memory in MB (the first child this process waits for)."""
    import resource

    start = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run([sys.executable, "-m", "specdec.fetch", "--config",
                    os.path.join(REPO_ROOT, args.config)], check=True, cwd=REPO_ROOT, env=env)
    return (time.perf_counter() - start,
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)


def llamacpp_command(args, port: int) -> tuple[list[str], list[str]]:
    if not os.path.isfile(args.llama_server):
        raise FileNotFoundError(f"--llama-server {args.llama_server} does not exist")
    models = [args.target_gguf] + ([args.draft_gguf] if args.draft_gguf else [])
    cmd = [args.llama_server, "-m", args.target_gguf, "--host", "127.0.0.1",
           "--port", str(port), "-np", str(args.num_seqs), "-c", str(args.ctx * args.num_seqs),
           "-t", str(args.threads or os.cpu_count())]
    if args.draft_gguf:
        cmd += ["-md", args.draft_gguf]
    return cmd, models


def run_load(url: str, args) -> dict:
    import serve

    load_args = serve.parse_args([
        "--base-url", url, "--dataset", "code", "--num-prompts", str(args.num_prompts),
        "--max-tokens", str(args.max_tokens), "--max-concurrency", str(args.concurrency),
        "--num-warmups", "1", "--disable-tqdm", "--timeout", "900"])
    result = asyncio.run(serve.run_benchmark(load_args, serve.load_prompts(load_args, None)))
    summary = result["summary"]
    return {k: summary.get(k) for k in ("completed", "failed", "duration_s",
                                        "output_throughput", "total_output_tokens")}


def measure(system: str, args) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd, models = (our_command if system == "ours" else llamacpp_command)(args, port)
    log_path = os.path.join(args.log_dir, f"footprint-{system}-{port}.log")
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                                env=env)
        try:
            start_s = wait_healthy(url, proc, args.start_timeout)
            after_start = proc_memory(proc.pid)
            load = run_load(url, args) if args.num_prompts else {}
            at_end = proc_memory(proc.pid)
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    row = {"system": system, "start_s": start_s, "rss_after_start_mb": after_start["rss_mb"],
           "peak_rss_mb": at_end["peak_rss_mb"], "disk_mb": dir_size(models) / 1e6,
           "models": models, "command": cmd, "load": load, "log": log_path}
    ready = [line for line in open(log_path) if '"ready"' in line]
    if ready:
        try:
            row["ready_line"] = json.loads(ready[-1])
        except ValueError:
            pass
    return row


def report(rows: list[dict]) -> str:
    header = (f"{'system':<10} {'start s':>8} {'RSS MB':>8} {'peak MB':>8} {'disk MB':>8} "
              f"{'tok/s':>7} {'calibration':>12}")
    lines = [header, "-" * len(header)]
    for row in rows:
        calib = row.get("ready_line", {}).get("calibration", "-")
        tps = row["load"].get("output_throughput")
        lines.append(f"{row['system']:<10} {row['start_s']:>8.2f} "
                     f"{row['rss_after_start_mb']:>8.0f} {row['peak_rss_mb']:>8.0f} "
                     f"{row['disk_mb']:>8.0f} {'-' if tps is None else format(tps, '.1f'):>7} "
                     f"{calib:>12}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(description="server start-up time and memory")
    p.add_argument("--systems", default="ours,ours,llamacpp",
                   help="comma-separated, in order: ours, llamacpp (repeat to restart)")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="our TOML, relative to the repo")
    p.add_argument("--num-seqs", type=int, default=16, help="sequences (llama.cpp slots)")
    p.add_argument("--ctx", type=int, default=4096, help="context length per sequence")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--num-prompts", type=int, default=32, help="0: start-up only, no load")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=0, help="0: our config's / all cores")
    p.add_argument("--llama-server", default=LLAMA_SERVER)
    p.add_argument("--target-gguf", default=None)
    p.add_argument("--draft-gguf", default=None)
    p.add_argument("--start-timeout", type=float, default=600.0)
    p.add_argument("--no-prepare", action="store_true",
                   help="do not run `specdec fetch --config` before our first start")
    p.add_argument("--log-dir", default=None, help="server logs (default: $TMPDIR/specdec-footprint-logs)")
    p.add_argument("--output", default=None, help="JSON path (default bench/results/...)")
    args = p.parse_args(argv)
    systems = args.systems.split(",")
    for name in systems:
        if name not in ("ours", "llamacpp"):
            p.error(f"--systems: unknown system {name!r}; known: ours, llamacpp")
    if "llamacpp" in systems and not args.target_gguf:
        p.error("--systems llamacpp needs --target-gguf (and --draft-gguf for its draft)")
    if args.num_seqs < 1 or args.ctx < 1 or args.concurrency < 1:
        p.error("--num-seqs, --ctx and --concurrency must be >= 1")
    args.systems = systems
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.log_dir = args.log_dir or os.path.join(tempfile.gettempdir(), "specdec-footprint-logs")
    os.makedirs(args.log_dir, exist_ok=True)
    sys.path.insert(0, REPO_ROOT)
    from latency_common import machine_info

    rows = []
    prepare_s = prepare_peak_mb = None
    if "ours" in args.systems and not args.no_prepare:
        print("[footprint] specdec fetch --config ...", file=sys.stderr, flush=True)
        prepare_s, prepare_peak_mb = prepare(args)
    for system in args.systems:
        print(f"[footprint] {system} ...", file=sys.stderr, flush=True)
        rows.append(measure(system, args))
        print(report(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    print(report(rows))
    if prepare_s is not None:
        print(f"specdec fetch --config before the first start: {prepare_s:.1f} s, "
              f"peak RSS {prepare_peak_mb:.0f} MB")
    out = {"benchmark": "footprint", "args": vars(args),
           "machine": machine_info(args.threads or os.cpu_count(), "cpu"),
           "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "prepare_s": prepare_s,
           "prepare_peak_rss_mb": prepare_peak_mb,
           "systems": rows}
    path = args.output or os.path.join(RESULTS_DIR, "footprint.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=2, default=str)
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
