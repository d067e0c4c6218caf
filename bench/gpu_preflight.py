"""GPU preflight: exit 2, saying why, unless CUDA works and every CuPy kernel compiles, loads and
matches its torch reference on a small case. Run first by bench/gpu_check.sh, so a lease is never
spent measuring a fallback.

    python bench/gpu_preflight.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def fail(message: str) -> int:
    print(f"PREFLIGHT FAILED: {message}", flush=True)
    return 2


def main() -> int:
    if not torch.cuda.is_available():
        return fail("torch.cuda.is_available() is False "
                    f"(torch {torch.__version__}, built for CUDA {torch.version.cuda})")
    try:
        import cupy
    except Exception as e:
        return fail(f"cannot import cupy: {type(e).__name__}: {e}")
    print(f"torch {torch.__version__} cuda {torch.version.cuda} cupy {cupy.__version__} "
          f"device {torch.cuda.get_device_name()} CUDA_PATH={os.environ.get('CUDA_PATH')}")
    from specdec.kernels import cupy as kernels
    from specdec.kernels import ops
    from tests.gpu.cases import make_attention_case
    try:
        kernels.load()
    except RuntimeError as e:
        return fail(str(e))
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        # decode, verify, a short prefill (split kernel) and a long one (SDPA, bottom-right)
        case = make_attention_case([(1, 37), (5, 70), (20, 20), (48, 60)], 12, 2, 128, 16,
                                   dtype, device="cuda", seed=3)
        args = (case.query, case.k_cache, case.v_cache, case.block_tables, case.seq_lens,
                case.query_start_loc, case.scale, case.query_lens, case.seq_lens_list)
        try:
            got = ops.paged_attention(*args, use_kernels=True)
            torch.cuda.synchronize()
        except Exception as e:
            return fail(f"paged_attention kernel ({dtype}) raised {type(e).__name__}: {e}")
        want = ops.paged_attention(*args, use_kernels=False)
        err = (got.float() - want.float()).abs().max().item()
        if not err <= tol:  # NaN fails too
            return fail(f"paged_attention split kernel + SDPA ({dtype}) differs from the torch "
                        f"reference: max abs error {err} > {tol}")
        single = kernels.paged_attention(*args, impl="single")
        torch.cuda.synchronize()
        err = (single.float() - want.float()).abs().max().item()
        if not err <= tol:
            return fail(f"paged_attention single-pass kernel ({dtype}) differs from the torch "
                        f"reference: max abs error {err} > {tol}")
        key = torch.randn(9, 2, 128, device="cuda").to(dtype)
        value = torch.randn_like(key)
        caches = [torch.zeros(8, 16, 2, 128, dtype=dtype, device="cuda") for _ in range(4)]
        slots = torch.tensor([3, -1, 17, 40, 41, 99, -1, 127, 64], device="cuda")
        ops.write_kv(key, value, caches[0], caches[1], slots, use_kernels=True)
        ops.write_kv(key, value, caches[2], caches[3], slots, use_kernels=False)
        torch.cuda.synchronize()
        if not (torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])):
            return fail(f"write_kv kernel ({dtype}) differs from the torch reference")
    print("preflight ok: CUDA, CuPy and every kernel compile, load and match the reference")
    return 0


if __name__ == "__main__":
    sys.exit(main())
