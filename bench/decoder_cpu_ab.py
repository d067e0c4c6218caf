"""A/B of two builds of the CPU decoder stack (specdec/kernels/decoder_cpu.cpp) in one process:
the current source against an edited or older copy, each built with the q4 kernel into its own
extension, the model's full forward (logits included) with each stack over the same cached
context, calls in a fresh random order each round so the VM's drift falls on both alike.
Prints median ms per forward and new / old per model and row count.

    git show HEAD~1:specdec/kernels/decoder_cpu.cpp > /tmp/old.cpp
    python bench/decoder_cpu_ab.py --old /tmp/old.cpp --rows 1,2,5,64 --context 300
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from decoder_cpu import config_runners, median_ms, window  # noqa: E402

from specdec.kernels import decoder_cpu, q4_cpu  # noqa: E402


def build(label: str, source: str, root: Path):
    from torch.utils import cpp_extension

    name = f"decoder_ab_{label}_{hashlib.sha256(source.encode()).hexdigest()[:12]}"
    build_dir = root / name
    build_dir.mkdir(parents=True, exist_ok=True)
    path = build_dir / "decoder_cpu.cpp"
    path.write_text(source)
    return cpp_extension.load(name=name, sources=[str(q4_cpu._SOURCES[0]), str(path)],
                              build_directory=str(build_dir),
                              extra_cflags=["-O3", "-march=native", "-fopenmp"],
                              extra_ldflags=["-fopenmp"], verbose=False)


def stack_with(module, model, caches):
    """decoder_cpu.build(model, caches) with `module` in place of the q4 extension."""
    saved = q4_cpu.load_kernel
    q4_cpu.load_kernel = lambda use_simd=True: module
    try:
        return decoder_cpu.build(model, caches)
    finally:
        q4_cpu.load_kernel = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", required=True, help="the other decoder_cpu.cpp")
    parser.add_argument("--config", default=str(ROOT / "configs/qwen2.5-coder-1.5b+0.5b.toml"))
    parser.add_argument("--rows", default="1,5")
    parser.add_argument("--context", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--build-dir", default=str(Path.home() / ".cache/specdec/ext-ab"))
    parser.add_argument("--out", default=str(ROOT / "bench/results/decoder-cpu-ab.json"))
    args, rest = parser.parse_known_args()
    modules = {label: build(label, text, Path(args.build_dir)) for label, text in
               (("old", Path(args.old).read_text()), ("new", q4_cpu._SOURCES[1].read_text()))}
    runners = config_runners(args.config, rest)
    rows = [int(r) for r in args.rows.split(",")]
    cases = {}
    for role, runner in runners.items():
        model, caches = runner.model, runner.kv_caches
        stacks = {label: stack_with(module, model, caches) for label, module in modules.items()}
        if any(stack is None for stack in stacks.values()):
            sys.exit(f"{role}: the fused stack cannot run this model (not q4 int4 on the CPU)")
        block_size = caches[0][0].shape[1]
        model._decoder = False  # the context's prefill through the layer loop
        model(window(args.context, args.context, block_size, model.num_real_tokens), caches)
        for n in rows:
            batch = window(n, args.context, block_size, model.num_real_tokens)
            for label, stack in stacks.items():
                def forward(model=model, batch=batch, caches=caches, stack=stack):
                    model._decoder = (caches, stack)
                    model(batch, caches)

                cases[(role, n, label)] = forward
    median = median_ms(cases, args.rounds)
    results = []
    for role in runners:
        for n in rows:
            old, new = (median[(role, n, label)] for label in ("old", "new"))
            print(f"{role:<7} rows {n:>4}: old {old:8.2f} ms  new {new:8.2f} ms  "
                  f"new/old {new / old:.3f}")
            results.append({"model": role, "rows": n, "old_ms": old, "new_ms": new})
    Path(args.out).write_text(json.dumps({
        "config": args.config, "old": args.old, "context": args.context,
        "rounds": args.rounds, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
