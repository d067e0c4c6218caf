"""A weight-only 4-bit matmul for the CPU whose cost is flat in the number of rows (1..8): each
weight byte is read once for all rows of a verify window. C++ (q4_cpu.cpp), built on first use
with `torch.utils.cpp_extension.load` and cached under ~/.cache/specdec/ext (or
$TORCH_EXTENSIONS_DIR); the AVX512-VNNI path (and an AVX2 one for CPUs without VNNI) does
llama.cpp-style Q4 x Q8 dot products.

Glossary:
- codes [N, K]: 4-bit weight codes 0..15; the weight is codes * scale + zero_eff per group of 32
  inputs (asymmetric; zero_eff is the weight at code 0).
- q, dx, xsum: the activations quantized to int8 per row and group of 32 (q = round(x / dx),
  dx = max|x| / 127) and the float sum of x over each group.
- packed [N/16, K/32, 4, 64] uint8 and scale_zero [N/16, K/32, 2, 16] bfloat16: the kernel's layout
  (see q4_cpu.cpp). `FORMAT_VERSION` names it; a cache of packed tensors keys on it.

`q4_reference` is the plain torch version of the same arithmetic (float64, exact integer group
sums); tests compare the kernel against it. Where no compiler or neither AVX512-VNNI nor AVX2 is
present, `load_kernel()` returns None and Int4Linear keeps torch's own int4 kernel.
Set SPECDEC_Q4_KERNEL=torch to force torch's kernel (for before/after measurements).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import mmap
import os
from pathlib import Path

import torch
from torch import Tensor

FORMAT_VERSION = 1
ISAS = ("avx512vnni", "avx2", "scalar")  # the kernel's inner loops, best first
_ISA_CODES = {"scalar": 0, "avx2": 1, "avx512vnni": 2}  # as q4_cpu.cpp's enum Isa
GROUP_SIZE = 32
TILE_COLUMNS = 16
HUGEPAGE_BYTES = 2 << 20  # x86-64 transparent huge page

# Which threads split a call's tiles. NOTE: measured on the quiet 2-core dev VM, a 1.5B int4
# decode (4 code prompts x 64 tokens, offline): with OpenMP's default wait policy (workers
# spin after each op) the static at::parallel_for split ran 17.3-18.6 tok/s against 14.7 for
# the kernel's own helper threads (TilePool), whose helper competes for the cores with the
# spinning OpenMP worker. With OMP_WAIT_POLICY=passive (a machine shared with other jobs:
# spinning then costs 2-3x) OpenMP workers sleep, and TilePool's barrier-free split, which a
# late helper cannot hold up, was the faster: 13.0 against 11.9 tok/s with one busy process
# beside it. So the split follows the policy the process runs under.
DYNAMIC_SPLIT = os.environ.get("OMP_WAIT_POLICY", "").strip().lower() == "passive"

_SOURCES = (Path(__file__).with_name("q4_cpu.cpp"),  # the matmul and the module
            Path(__file__).with_name("decoder_cpu.cpp"))  # the decoder stack around it
_log = logging.getLogger(__name__)


def q4_fits(out_features: int, in_features: int) -> bool:
    return out_features % TILE_COLUMNS == 0 and in_features % GROUP_SIZE == 0


def q4_pack(codes: Tensor, scales: Tensor, zero_eff: Tensor) -> tuple[Tensor, Tensor]:
    """codes [N, K] (0..15), scales and zero_eff [N, K/32] -> (packed [N/16, K/32, 4, 64] uint8,
    scale_zero [N/16, K/32, 2, 16] bfloat16), the kernel's layout."""
    n, k = codes.shape
    if not q4_fits(n, k):
        raise ValueError(f"q4 needs out_features % {TILE_COLUMNS} == 0 and in_features % "
                         f"{GROUP_SIZE} == 0, got {n}x{k}")
    tiles, groups = n // TILE_COLUMNS, k // GROUP_SIZE
    # [tiles, 16 cols, groups, 8 steps, 4 inputs] -> [tiles, groups, 8 steps, 16 cols, 4 inputs]
    c = codes.to(torch.uint8).reshape(tiles, TILE_COLUMNS, groups, 8, 4).permute(0, 2, 3, 1, 4)
    c = c.reshape(tiles, groups, 4, 2, 64)  # step s = 2 * chunk + parity
    packed = (c[:, :, :, 0] | (c[:, :, :, 1] << 4)).contiguous()  # [tiles, groups, 4, 64]
    sz = torch.stack([scales, zero_eff], dim=0).to(torch.bfloat16)  # [2, N, groups]
    sz = sz.reshape(2, tiles, TILE_COLUMNS, groups).permute(1, 3, 0, 2).contiguous()
    return packed, sz  # sz: [tiles, groups, 2, 16]


def to_hugepages(t: Tensor) -> Tensor:
    """A copy of `t` (CPU, contiguous) in 2 MiB-aligned anonymous memory advised
    MADV_HUGEPAGE, for the packed weights: a 4-bit lm_head is 146 MB, 36k 4 KiB pages against
    ~3k DTLB entries, and the kernel streams it once per step. Where THP is "madvise" (or
    "always") the kernel backs the aligned 2 MiB spans with huge pages: same bytes, no extra
    memory (the range is not rounded up; the tail stays in 4 KiB pages). Tensors under 2 MiB,
    and hosts without MADV_HUGEPAGE or where madvise fails, keep `t` as it is."""
    nbytes = t.numel() * t.element_size()
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if (advice is None or nbytes < HUGEPAGE_BYTES or t.device.type != "cpu"
            or not t.is_contiguous()):
        return t
    # NOTE: over-map by one huge page to align the start; the untouched slack costs no memory.
    region = mmap.mmap(-1, nbytes + HUGEPAGE_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = torch.frombuffer(region, dtype=torch.uint8)  # keeps `region` alive
    offset = -base.data_ptr() % HUGEPAGE_BYTES
    try:
        region.madvise(advice, offset, -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE)
    except OSError as error:
        _log.debug("madvise(MADV_HUGEPAGE) failed (%s); keeping 4 KiB pages", error)
        return t
    out = base[offset:offset + nbytes].view(t.dtype).view(t.shape)
    out.copy_(t)
    return out


def quantize_activations(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """x [M, K] -> q [M, K] (int8 values, float32), dx [M, G], xsum [M, G]; as the kernel does."""
    m, k = x.shape
    groups = x.float().reshape(m, k // GROUP_SIZE, GROUP_SIZE)
    dx = groups.abs().amax(dim=-1) / 127.0  # [M, G]
    safe = torch.where(dx > 0, dx, torch.ones_like(dx))
    q = torch.where(dx[..., None] > 0, torch.round(groups / safe[..., None]),
                    torch.zeros_like(groups))
    return q.reshape(m, k), dx, groups.sum(dim=-1)


def q4_reference(x: Tensor, codes: Tensor, scales: Tensor, zero_eff: Tensor) -> Tensor:
    """The kernel's arithmetic in plain torch: x [M, K], codes [N, K], scales/zero_eff [N, G] ->
    y [M, N] float32. Group sums of codes * q are exact (float64 holds them)."""
    m, k = x.shape
    n = codes.shape[0]
    q, dx, xsum = quantize_activations(x)
    qg = q.double().reshape(m, k // GROUP_SIZE, GROUP_SIZE)  # [M, G, 32]
    cg = codes.double().reshape(n, k // GROUP_SIZE, GROUP_SIZE)  # [N, G, 32]
    int_sums = torch.einsum("mgi,ngi->mng", qg, cg)  # [M, N, G], exact integers
    s = scales.to(torch.bfloat16).double()  # the kernel reads bfloat16
    z = zero_eff.to(torch.bfloat16).double()
    y = (int_sums * s[None] * dx.double()[:, None]).sum(-1) + xsum.double() @ z.T
    return y.float()


def _extension_name() -> str:
    digest = hashlib.sha256(b"".join(source.read_bytes() for source in _SOURCES))
    digest.update(torch.__version__.encode())
    # NOTE: built with -march=native, so the build is only valid on this CPU model.
    try:
        digest.update(_cpu_model().encode())
    except OSError:
        pass
    return f"specdec_q4_cpu_{digest.hexdigest()[:12]}"


def _cpu_model() -> str:
    text = Path("/proc/cpuinfo").read_text()
    lines = [line for line in text.splitlines() if line.startswith(("model name", "flags"))]
    return "\n".join(lines[:2])


@contextlib.contextmanager
def _builder_lock(build_dir: Path):
    """Held while torch builds or loads the extension: an flock, which the kernel releases when
    its holder dies. torch's own lock is a file that a build killed midway (Ctrl-C, a timeout)
    leaves behind, and every later load then waits for it forever. Under this flock no other
    specdec process is building, so such a file is stale and goes."""
    with open(build_dir / "specdec-build.flock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # another start building right now: wait for it
        try:
            stale = build_dir / "lock"
            if stale.exists():
                _log.warning("q4 CPU kernel: removing %s, left by a build that did not finish",
                             stale)
                stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@functools.cache
def load_kernel(use_simd: bool = True):
    """The compiled extension module, or None (no compiler, no SIMD path with use_simd, or
    SPECDEC_Q4_KERNEL=torch). Built once per source/torch/CPU and cached on disk."""
    if os.environ.get("SPECDEC_Q4_KERNEL", "") == "torch":
        return None
    try:
        from torch.utils import cpp_extension

        name = _extension_name()
        root = os.environ.get("TORCH_EXTENSIONS_DIR") or str(
            Path.home() / ".cache" / "specdec" / "ext")
        build_dir = Path(root) / name
        build_dir.mkdir(parents=True, exist_ok=True)
        with _builder_lock(build_dir):
            module = cpp_extension.load(
                name=name, sources=[str(source) for source in _SOURCES],
                build_directory=str(build_dir),
                extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
                verbose=False)
    except Exception as error:  # no compiler, no ninja, a build error: keep torch's kernel
        _log.warning("q4 CPU kernel unavailable (%s); using torch's int4 kernel", error)
        return None
    if use_simd and module.q4_isas() == ["scalar"]:
        _log.warning("q4 CPU kernel built without AVX512-VNNI or AVX2; using torch's int4 kernel")
        return None
    return module


def q4_linear(kernel, x: Tensor, packed: Tensor, scale_zero: Tensor,
              use_simd: bool = True, isa: str | None = None,
              split_dynamic: bool | None = None) -> Tensor:
    """x [M, K] -> y [M, N] float32 with the compiled kernel: the best inner loop compiled in
    (use_simd=True), the plain C++ one (use_simd=False), or the one `isa` names (one of ISAS
    that `kernel.q4_isas()` lists; for tests and benchmarks). split_dynamic: the kernel's
    helper threads take blocks of tiles (True) or at::parallel_for splits them statically
    (False); None: DYNAMIC_SPLIT, from the process's OpenMP wait policy."""
    if split_dynamic is None:
        split_dynamic = DYNAMIC_SPLIT
    if isa is None:
        code = -1 if use_simd else _ISA_CODES["scalar"]
    elif isa not in _ISA_CODES:
        raise ValueError(f"isa must be one of {ISAS}, got {isa!r}")
    else:
        code = _ISA_CODES[isa]
    return kernel.q4_linear(x, packed, scale_zero, code, split_dynamic)
