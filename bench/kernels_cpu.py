"""CPU matmul micro-benchmark: one linear layer of Qwen2.5-Coder-1.5B (or a given shape) at 1..8
rows (a verify window) and a prefill-sized M, for the kernels a weight-only 4-bit layer could use.
Prints a table of milliseconds (min of --repeats after a warm-up) and writes JSON.

    python bench/kernels_cpu.py --shapes 8960x1536,1536x8960 --rows 1,2,4,5,8,16,128

Kernels: bf16 F.linear; torch int4 (`_weight_int4pack_mm_for_cpu`, what Int4Linear used);
torch int8 weight-only (`_weight_int8pack_mm`); fbgemm dynamic int8 (`quantized.linear_dynamic`,
activations per tensor); `_dyn_quant_matmul_4bit` (KleidiAI on ARM; a reference elsewhere); ours
(specdec/kernels/q4_cpu.cpp, AVX512-VNNI Q4 x Q8).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from specdec.kernels import q4_cpu  # noqa: E402
from specdec.model.quant import int4_groups  # noqa: E402


def best_ms(fns: list, x, repeats: int) -> float:
    """Min time of one call, cycling through copies of the weights so that each call reads
    weights out of DRAM (NOTE: one layer alone stays in the L3 cache, which a real decode step
    never sees; the min discards calls that other jobs on the machine preempted)."""
    for fn in fns:
        fn(x)
    best = float("inf")
    for _ in range(repeats):
        for fn in fns:
            start = time.perf_counter()
            fn(x)
            best = min(best, time.perf_counter() - start)
    return best * 1e3


def kernels_for(n: int, k: int, seed: int) -> dict:
    torch.manual_seed(seed)
    weight = torch.randn(n, k) * 0.02  # [out, in]
    codes, scales, zeros = int4_groups(weight, 32)
    out = {"bf16": lambda x, w=weight.bfloat16(): F.linear(x, w)}
    packed_torch = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
    sz = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous()
    out["torch_int4"] = lambda x: torch._weight_int4pack_mm_for_cpu(x, packed_torch, 32, sz)
    w8_scales = (weight.abs().amax(1) / 127).bfloat16()
    w8 = torch.round(weight / w8_scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
    out["torch_int8"] = lambda x: torch._weight_int8pack_mm(x, w8, w8_scales)
    try:
        packed_fb = torch.ops.quantized.linear_prepack(
            torch.quantize_per_channel(weight, weight.abs().amax(1) / 127,
                                       torch.zeros(n, dtype=torch.long), 0, torch.qint8), None)
        out["fbgemm_dyn_int8"] = lambda x: torch.ops.quantized.linear_dynamic(x.float(),
                                                                              packed_fb)
    except RuntimeError as error:
        print(f"fbgemm dynamic int8 unavailable: {error}")
    try:
        dq = torch.ops.aten._dyn_quant_pack_4bit_weight(
            codes.to(torch.uint8), scales.float(), torch.zeros(n), 32, k, n)
        out["dyn_quant_4bit"] = lambda x: torch.ops.aten._dyn_quant_matmul_4bit(
            x.float(), dq, 32, k, n)
        out["dyn_quant_4bit"](torch.randn(1, k).bfloat16())
    except (RuntimeError, TypeError) as error:
        out.pop("dyn_quant_4bit", None)
        if seed == 0:
            print(f"_dyn_quant_matmul_4bit unavailable: {str(error).splitlines()[0]}")
    kernel = q4_cpu.load_kernel()
    if kernel is not None:
        packed, scale_zero = q4_cpu.q4_pack(codes, scales, zeros - 8 * scales.float())
        out["ours_q4"] = lambda x: q4_cpu.q4_linear(kernel, x, packed, scale_zero)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="8960x1536,1536x8960,1536x1536,256x1536",
                        help="comma-separated NxK (out x in)")
    parser.add_argument("--rows", default="1,2,4,5,8,16,128")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--skip", default="", help="comma-separated kernel names to skip")
    parser.add_argument("--out", default=str(ROOT / "bench/results/kernels-cpu.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [int(r) for r in args.rows.split(",")]
    skip = set(filter(None, args.skip.split(",")))
    results = []
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        # NOTE: enough copies for >= 96 MiB of int4 weights, beyond the L3 cache
        copies = max(2, min(32, (96 << 20) // (n * k // 2)))
        per_copy = [kernels_for(n, k, seed) for seed in range(copies)]
        kernels = {name: [c[name] for c in per_copy] for name in per_copy[0] if name not in skip}
        print(f"\n{n}x{k} (out x in), ms per call, min of {args.repeats}, {args.threads} "
              f"threads, cycling {copies} weight copies")
        print(f"{'kernel':>16} " + " ".join(f"{'M=' + str(m):>8}" for m in rows))
        for name, fns in kernels.items():
            times = []
            for m in rows:
                x = torch.randn(m, k).bfloat16()
                with torch.inference_mode():
                    times.append(best_ms(fns if m <= 16 else fns[:2], x,
                                        args.repeats if m <= 16 else 3))
            print(f"{name:>16} " + " ".join(f"{t:8.3f}" for t in times))
            results.append({"shape": [n, k], "kernel": name,
                            "copies": copies,
                            "ms": dict(zip(map(str, rows), times))})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"threads": args.threads, "results": results},
                                         indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
