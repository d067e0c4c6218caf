"""CPU matmul micro-benchmark for the weight-only 4-bit kernel: every linear layer shape of
Qwen2.5-Coder-1.5B and -0.5B (or given shapes) at 1..8 rows (a verify window), ours against
torch's bf16 F.linear and fbgemm's dynamic int8 linear, in one process. Prints, per shape, the
median milliseconds per call and the ratios (each row count against one row; the others against
ours), then one decode step's linear layers per model (the sum over its layers), and writes JSON.

    python bench/kernels_cpu.py --models qwen1.5b,qwen0.5b --rows 1,2,4,5,8 --threads 2
    python bench/kernels_cpu.py --shapes 8960x1536 --kernels bf16,torch_int4,ours

Kernels: `bf16` F.linear; `fbgemm` dynamic int8 (`quantized.linear_dynamic`, activations per
tensor, float32 in and out); `ours` (specdec/kernels/q4_cpu.cpp through q4_cpu.q4_linear, then
to bf16 as Int4Linear does: weights in huge pages, q4_cpu.to_hugepages, threads taking blocks of
tiles from a shared counter); `ours_4k` (the same, weights in 4 KiB pages); `ours_static` (4 KiB
pages and at::parallel_for's static split: the kernel before both); `ours_avx2` (the AVX2 path,
huge pages); `torch_int4`
(`_weight_int4pack_mm_for_cpu`); `torch_int8` (`_weight_int8pack_mm`).

NOTE: the timed calls cycle over enough copies of each layer's weights that every call reads
them from DRAM, as a decode step does (one layer alone would stay in the 32 MB L3); calls of
all kernels and row counts are interleaved in a random order each round, so other jobs on a
shared machine slow them alike. On a machine busier than its cores, run 2 threads with
OMP_WAIT_POLICY=passive: OpenMP's spinning workers (after every torch op, and `ours_static`'s
own region) otherwise take the core the next call needs, ~20 ms a call.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from specdec.kernels import q4_cpu  # noqa: E402

# (name, out_features, in_features, count per decode step); from the models' config.json
MODELS = {
    "qwen1.5b": [("q_proj/o_proj", 1536, 1536, 2 * 28), ("k_proj/v_proj", 256, 1536, 2 * 28),
                 ("gate/up_proj", 8960, 1536, 2 * 28), ("down_proj", 1536, 8960, 28),
                 ("lm_head", 151936, 1536, 1)],
    "qwen0.5b": [("q_proj/o_proj", 896, 896, 2 * 24), ("k_proj/v_proj", 128, 896, 2 * 24),
                 ("gate/up_proj", 4864, 896, 2 * 24), ("down_proj", 896, 4864, 24),
                 ("lm_head", 151936, 896, 1)],
}
KERNELS = ("bf16", "fbgemm", "ours", "ours_4k", "ours_static", "ours_avx2", "torch_int4",
           "torch_int8")
OURS = {"ours", "ours_4k", "ours_static", "ours_avx2"}
DRAM_BYTES = 96 << 20  # the int4 weights cycled per shape: 3x the L3


def make_kernels(n: int, k: int, seed: int, names: list[str]) -> dict:
    """name -> fn(x [M, K] bf16) for one random layer; weights drawn straight in each
    kernel's format (their values do not change the time), so lm_head-sized layers fit."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    if "bf16" in names:
        weight = (torch.randn(n, k, generator=gen) * 0.02).bfloat16()
        out["bf16"] = lambda x: F.linear(x, weight)
    int8 = None
    if {"fbgemm", "torch_int8"} & set(names):
        int8 = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
    if "fbgemm" in names:
        warnings.filterwarnings("ignore", message=".*quantized tensor creation.*")
        qweight = torch._make_per_channel_quantized_tensor(
            int8, torch.full((n,), 1e-3, dtype=torch.double), torch.zeros(n, dtype=torch.long),
            0)
        packed_fb = torch.ops.quantized.linear_prepack(qweight, None)
        out["fbgemm"] = lambda x: torch.ops.quantized.linear_dynamic(x.float(), packed_fb)
    if "torch_int8" in names:
        scales8 = torch.full((n,), 1e-3).bfloat16()
        out["torch_int8"] = lambda x: torch._weight_int8pack_mm(x, int8, scales8)
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen)
    scales = torch.rand(n, k // 32, generator=gen) * 0.02
    zeros = torch.randn(n, k // 32, generator=gen) * 0.1
    kernel = q4_cpu.load_kernel()
    if kernel is not None and (OURS & set(names)):
        packed, scale_zero = q4_cpu.q4_pack(codes, scales, zeros)
        huge, huge_sz = q4_cpu.to_hugepages(packed), q4_cpu.to_hugepages(scale_zero)
        if "ours" in names:
            out["ours"] = lambda x: q4_cpu.q4_linear(kernel, x, huge, huge_sz).to(x.dtype)
        if "ours_4k" in names:
            out["ours_4k"] = lambda x: q4_cpu.q4_linear(kernel, x, packed,
                                                        scale_zero).to(x.dtype)
        if "ours_static" in names:
            out["ours_static"] = lambda x: q4_cpu.q4_linear(
                kernel, x, packed, scale_zero, split_dynamic=False).to(x.dtype)
        if "ours_avx2" in names and "avx2" in kernel.q4_isas():
            out["ours_avx2"] = lambda x: q4_cpu.q4_linear(kernel, x, huge, huge_sz,
                                                          isa="avx2").to(x.dtype)
    if "torch_int4" in names:
        packed_t = torch._convert_weight_to_int4pack_for_cpu(codes.int(), 1)
        sz = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous().bfloat16()
        out["torch_int4"] = lambda x: torch._weight_int4pack_mm_for_cpu(x, packed_t, 32, sz)
    return out


def time_shape(n: int, k: int, names: list[str], rows: list[int], rounds: int) -> dict:
    """{kernel: {rows: median ms}} over `rounds` interleaved rounds."""
    copies = max(1, min(16, DRAM_BYTES // (n * k // 2)))
    per_copy = [make_kernels(n, k, seed, names) for seed in range(copies)]
    kernels = [name for name in names if name in per_copy[0]]
    xs = {m: torch.randn(m, k).bfloat16() for m in rows}
    samples = {(name, m): [] for name in kernels for m in rows}
    with torch.inference_mode():
        for name in kernels:  # warm-up: the first call of each kernel pays page faults
            for m in rows:
                for fns in per_copy:
                    fns[name](xs[m])
        turn = 0
        order = [(name, m) for name in kernels for m in rows]
        for round_index in range(rounds):
            # NOTE: a fresh order each round: a fixed one made the first call after another
            # kernel's (here M=1) measurably slower for every kernel
            random.Random(round_index).shuffle(order)
            for name, m in order:
                fn = per_copy[turn % copies][name]
                turn += 1
                start = time.perf_counter()
                fn(xs[m])
                samples[(name, m)].append(time.perf_counter() - start)
    del per_copy
    return {name: {m: statistics.median(samples[(name, m)]) * 1e3 for m in rows}
            for name in kernels}


def print_shape(label: str, n: int, k: int, ms: dict, rows: list[int]) -> None:
    print(f"\n{label} {n}x{k} (out x in): median ms per call")
    print(f"{'kernel':>11} " + " ".join(f"{'M=' + str(m):>7}" for m in rows)
          + "   " + " ".join(f"{f'{m}/1':>5}" for m in rows[1:]))
    for name, by_rows in ms.items():
        first = by_rows[rows[0]]
        print(f"{name:>11} " + " ".join(f"{by_rows[m]:7.3f}" for m in rows) + "   "
              + " ".join(f"{by_rows[m] / first:5.2f}" for m in rows[1:]))
    if "ours" in ms:
        for name in ms:
            if name != "ours":
                print(f"{name + '/ours':>16} " + " ".join(
                    f"{ms[name][m] / ms['ours'][m]:5.2f}" for m in rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="qwen1.5b,qwen0.5b",
                        help=f"comma-separated, of {sorted(MODELS)}; ignored with --shapes")
    parser.add_argument("--shapes", default="", help="comma-separated NxK (out x in)")
    parser.add_argument("--rows", default="1,2,4,5,8")
    parser.add_argument("--kernels", default="bf16,fbgemm,ours",
                        help=f"comma-separated, of {KERNELS}")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=21, help="timed calls per kernel and M")
    parser.add_argument("--out", default=str(ROOT / "bench/results/kernels-cpu.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [int(r) for r in args.rows.split(",")]
    names = [name for name in args.kernels.split(",") if name]
    for name in names:
        if name not in KERNELS:
            parser.error(f"--kernels: {name!r} is not one of {KERNELS}")
    if args.shapes:
        plans = {"shapes": [(s, *map(int, s.split("x")), 1) for s in args.shapes.split(",")]}
    else:
        plans = {}
        for model in args.models.split(","):
            if model not in MODELS:
                parser.error(f"--models: {model!r} is not one of {sorted(MODELS)}")
            plans[model] = MODELS[model]
    load = os.getloadavg()
    kernel = q4_cpu.load_kernel()
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    thp = thp.read_text().strip() if thp.exists() else "n/a"
    print(f"{args.threads} threads, {args.rounds} rounds, load average {load[0]:.2f} "
          f"{load[1]:.2f} {load[2]:.2f}, q4 paths {kernel.q4_isas() if kernel else None}, "
          f"THP {thp}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}")
    results = []
    for plan, layers in plans.items():
        step = {}
        for label, n, k, count in layers:
            ms = time_shape(n, k, names, rows, args.rounds)
            print_shape(label, n, k, ms, rows)
            results.append({"plan": plan, "layer": label, "shape": [n, k], "count": count,
                            "ms": {name: {str(m): t for m, t in v.items()}
                                   for name, v in ms.items()}})
            for name, by_rows in ms.items():
                for m, t in by_rows.items():
                    step[(name, m)] = step.get((name, m), 0.0) + count * t
        if plan in MODELS:
            print(f"\n{plan}: one decode step's linear layers (sum of count x median), ms")
            for name in dict.fromkeys(name for name, _ in step):
                print(f"{name:>11} " + " ".join(f"{step[(name, m)]:7.2f}" for m in rows)
                      + "   " + " ".join(f"{step[(name, m)] / step[(name, rows[0])]:5.2f}"
                                         for m in rows[1:]))
    load_end = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(
        {"threads": args.threads, "rounds": args.rounds, "rows": rows,
         "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
         "load_average_start": load, "load_average_end": load_end, "results": results},
        indent=1))
    print(f"\nload average at the end {load_end[0]:.2f}; wrote {args.out}")


if __name__ == "__main__":
    main()
