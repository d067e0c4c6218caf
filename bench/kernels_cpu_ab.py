"""A/B timing of edited copies of the CPU 4-bit kernel (specdec/kernels/q4_cpu.cpp): each source
is built as its own extension and all of them run in one process, calls of every (source,
threads, rows) interleaved in a fresh random order each round, so a shared machine's load
slows them alike. Prints median wall ms and process CPU ms per call, and M/1-row ratios.

    python bench/kernels_cpu_ab.py /tmp/edited.cpp --threads 1,2
    python bench/kernels_cpu_ab.py --bounds --threads 1

`--bounds` adds three copies of the current source with part of the float epilogue removed
(wrong results; upper bounds on what amortizing it could gain): `no_epilogue` (the group's
int32 sum added to an int32 accumulator, no float work), `no_dx_mul` (no scale x dx multiply),
`no_zero_fma` (no zero x xsum FMA). They patch the VNNI inner loop's text and fail loudly when
it has changed.

NOTE: CPU time is the whole process's (all threads): CPU close to wall with 2 threads means the
helper thread hardly ran (the cores were busy with other jobs), i.e. a 1-thread measurement.
Weights are cycled over copies from DRAM as in bench/kernels_cpu.py.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from specdec.kernels import q4_cpu  # noqa: E402

DRAM_BYTES = 96 << 20
_EPILOGUE = """      const __m512 step = _mm512_mul_ps(scale, _mm512_set1_ps(dx[m * G + g]));
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(total), step, acc[m]);
      acc[m] = _mm512_fmadd_ps(zero, _mm512_set1_ps(xsum[m * G + g]), acc[m]);"""
_BOUNDS = {
    "no_epilogue": "      acc[m] = _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512("
                   "acc[m]), total));",
    "no_dx_mul": "      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(total), scale, acc[m]);\n"
                 "      acc[m] = _mm512_fmadd_ps(zero, _mm512_set1_ps(xsum[m * G + g]), acc[m]);",
    "no_zero_fma": _EPILOGUE.splitlines()[0] + "\n" + _EPILOGUE.splitlines()[1]
                   + "\n      (void)zero;",
}


def build(label: str, source: str, build_root: Path):
    from torch.utils import cpp_extension

    digest = hashlib.sha256(source.encode()).hexdigest()[:12]
    name = f"q4_ab_{label}_{digest}".replace("-", "_")
    build_dir = build_root / name
    build_dir.mkdir(parents=True, exist_ok=True)
    path = build_dir / f"{name}.cpp"
    path.write_text(source)
    # NOTE: the module also registers the decoder stack (decoder_cpu.cpp), built as it is
    return cpp_extension.load(name=name, sources=[str(path), str(q4_cpu._SOURCES[1])],
                              build_directory=str(build_dir),
                              extra_cflags=["-O3", "-march=native", "-fopenmp"],
                              extra_ldflags=["-fopenmp"], verbose=False)


def make_layers(n: int, k: int) -> list:
    copies = max(1, min(16, DRAM_BYTES // (n * k // 2)))
    layers = []
    for seed in range(copies):
        gen = torch.Generator().manual_seed(seed)
        codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen)
        scales = torch.rand(n, k // 32, generator=gen) * 0.02
        zeros = torch.randn(n, k // 32, generator=gen) * 0.1
        packed, scale_zero = q4_cpu.q4_pack(codes, scales, zeros)
        layers.append((q4_cpu.to_hugepages(packed), q4_cpu.to_hugepages(scale_zero)))
    return layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sources", nargs="*", help="edited copies of q4_cpu.cpp")
    parser.add_argument("--bounds", action="store_true", help="add the epilogue-removed copies")
    parser.add_argument("--shapes", default="8960x1536,1536x8960", help="NxK (out x in), ...")
    parser.add_argument("--rows", default="1,5,8")
    parser.add_argument("--threads", default="1", help="comma-separated thread counts")
    parser.add_argument("--rounds", type=int, default=41)
    parser.add_argument("--build-dir", default=str(Path.home() / ".cache/specdec/ext-ab"))
    parser.add_argument("--out", default=str(ROOT / "bench/results/kernels-cpu-ab.json"))
    args = parser.parse_args()
    current = q4_cpu._SOURCES[0].read_text()
    sources = {"current": current}
    for path in args.sources:
        sources[Path(path).stem] = Path(path).read_text()
    if args.bounds:
        if _EPILOGUE not in current:
            parser.error("--bounds: the VNNI epilogue in q4_cpu.cpp changed; update _EPILOGUE")
        sources.update({name: current.replace(_EPILOGUE, text) for name, text in _BOUNDS.items()})
    root = Path(args.build_dir)
    modules = {label: build(label, text, root) for label, text in sources.items()}
    threads = [int(t) for t in args.threads.split(",")]
    rows = [int(r) for r in args.rows.split(",")]
    load = os.getloadavg()
    print(f"threads {threads}, {args.rounds} rounds, load average {load[0]:.2f} {load[1]:.2f} "
          f"{load[2]:.2f}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}")
    results = []
    keys = [(label, t) for label in modules for t in threads]
    for shape in args.shapes.split(","):
        n, k = map(int, shape.split("x"))
        layers = make_layers(n, k)
        xs = {m: torch.randn(m, k).bfloat16() for m in rows}
        wall = {(key, m): [] for key in keys for m in rows}
        cpu = {(key, m): [] for key in keys for m in rows}
        order = [(key, m) for key in keys for m in rows]
        for (label, t), m in order:  # warm-up: page faults, helper threads started
            torch.set_num_threads(t)
            for packed, scale_zero in layers:
                modules[label].q4_linear(xs[m], packed, scale_zero, -1, True)
        turn = 0
        for round_index in range(args.rounds):
            random.Random(round_index).shuffle(order)
            for (label, t), m in order:
                packed, scale_zero = layers[turn % len(layers)]
                turn += 1
                torch.set_num_threads(t)
                cpu_start, start = time.process_time(), time.perf_counter()
                modules[label].q4_linear(xs[m], packed, scale_zero, -1, True)
                wall[((label, t), m)].append(time.perf_counter() - start)
                cpu[((label, t), m)].append(time.process_time() - cpu_start)
        del layers
        print(f"\n{n}x{k}: median wall ms (process CPU ms) at rows {rows}; wall M/1")
        for key in keys:
            w = [statistics.median(wall[(key, m)]) * 1e3 for m in rows]
            c = [statistics.median(cpu[(key, m)]) * 1e3 for m in rows]
            print(f"{key[0] + '@' + str(key[1]):>16} "
                  + " ".join(f"{a:6.3f} ({b:5.3f})" for a, b in zip(w, c)) + "   "
                  + " ".join(f"{a / w[0]:5.2f}" for a in w[1:]))
            results.append({"shape": [n, k], "source": key[0], "threads": key[1],
                            "wall_ms": dict(zip(map(str, rows), w)),
                            "cpu_ms": dict(zip(map(str, rows), c))})
    load_end = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(
        {"threads": threads, "rounds": args.rounds, "rows": rows, "load_average_start": load,
         "load_average_end": load_end, "results": results}, indent=1))
    print(f"\nload average at the end {load_end[0]:.2f}; wrote {args.out}")


if __name__ == "__main__":
    main()
