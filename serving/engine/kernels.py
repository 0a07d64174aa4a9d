"""The engine's C kernel (paged_attention.c): built at first use, loaded with ctypes.

The source is compiled with the machine's C compiler (`$CC`, else `cc`) for this very CPU
(-march=native) into a cache dir (`$CASCADE_KERNEL_DIR`, else ~/.cache/cascade/kernels), under a
name that hashes the source, the flags, the compiler and the CPU's feature flags, so a changed
file or a different machine gets its own build. No compiler, or a failed build, leaves the
engine on its torch path (`EngineConfig.attention="auto"`) or fails loudly when the kernel was
asked for (`attention="kernel"`).

Why not a torch C++ extension: that compiles against torch's headers and wants ninja; this file
builds in 0.7 s here with plain gcc, and the kernel needs nothing from torch but pointers.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import subprocess
import tempfile
from pathlib import Path

import torch

from cascade.cpu import cpu_flags

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("paged_attention.c")
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fopenmp", "-fPIC", "-shared"]


class KernelUnavailable(RuntimeError):
    """The C kernel could not be built or loaded here (the message says why)."""


def _build(compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    cpu = " ".join(sorted(cpu_flags()))
    key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(FLAGS), version, cpu]).encode())
    cache = Path(os.environ.get("CASCADE_KERNEL_DIR") or Path.home() / ".cache" / "cascade" / "kernels")
    lib = cache / f"paged_attention-{key.hexdigest()[:16]}.so"
    if lib.exists():
        return lib
    cache.mkdir(parents=True, exist_ok=True)
    # Built under a temporary name and renamed: two processes building at once both succeed.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
    os.close(fd)
    try:
        res = subprocess.run([compiler, *FLAGS, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True,
                             timeout=300)
        if res.returncode != 0:
            raise KernelUnavailable(f"{compiler} failed to build {SOURCE.name}:\n{res.stderr[-2000:]}")
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


@functools.cache
def load() -> ctypes.CDLL:
    """The built kernel library (built now if needed); KernelUnavailable says why not."""
    compiler = os.environ.get("CC", "cc")
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.SubprocessError) as e:  # no compiler, or a .so that does not load
        raise KernelUnavailable(f"cannot build or load {SOURCE.name} with {compiler!r}: {e}") from e
    # torch is imported first (this module imports it), so the kernel's OpenMP is torch's own
    # libgomp (same soname, already loaded): one thread pool, not two spinning against each other.
    args = [ctypes.c_void_p] * 6 + [ctypes.c_int64] + [ctypes.c_int] * 4 + [ctypes.c_float, ctypes.c_int]
    for name in ("paged_attention_bf16", "paged_attention_f32"):
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, ctypes.c_int
    return lib


def paged_attention_available() -> bool:
    try:
        load()
        return True
    except KernelUnavailable as e:
        log.warning("paged-attention kernel unavailable, attention stays in torch: %s", e)
        return False


def check_batch(n_rows: int, num_blocks: int, block_size: int, tables: torch.Tensor, seqs: torch.Tensor) -> None:
    """Every read and write the kernel will do stays inside q/out, the tables and the pool; a
    ValueError names the first sequence (row of `seqs`) that would not. The kernel itself trusts
    its indices, as a C loop must: this is what keeps a bad table from reading stray memory."""
    if seqs.numel():
        row, n, start, off = seqs.unbind(1)
        need = torch.div(start + n + block_size - 1, block_size, rounding_mode="floor")
        bad = (n < 1) | (start < 0) | (row < 0) | (row + n > n_rows) | (off < 0) | (off + need > tables.numel())
        if bad.any():
            i = int(bad.nonzero()[0])
            raise ValueError(f"seqs[{i}] = {seqs[i].tolist()} (first row, rows, position, table offset) does not fit "
                             f"{n_rows} query rows and {tables.numel()} table entries of blocks of {block_size}")
    if tables.numel() and (int(tables.min()) < 0 or int(tables.max()) >= num_blocks):
        raise ValueError(f"block ids {int(tables.min())}..{int(tables.max())} outside the pool's 0..{num_blocks - 1}")


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                    seqs: torch.Tensor, out: torch.Tensor | None = None, checked: bool = False) -> torch.Tensor:
    """Causal attention of query rows to K/V read through block tables, GQA heads grouped.

    q (N, H, D); k_cache/v_cache (num_blocks, K, block_size, D), same dtype (bf16 or fp32), CPU;
    tables int64: every sequence's block ids back to back; seqs int64 (S, 4): per sequence its
    first row in q, its number of rows, the position of its first row, the offset of its block
    table in `tables`. Row t of a sequence sees keys 0..position + t. Writes and returns out (N, H, D)
    (the rows of q that no sequence names are left as they were). `checked=True` skips
    `check_batch` (the runner checks a step's batch once, not once per layer).
    """
    N, H, D = q.shape
    _, K, bs, Dk = k_cache.shape
    if Dk != D or H % K or v_cache.shape != k_cache.shape:
        raise ValueError(f"shapes do not fit: q {tuple(q.shape)}, k {tuple(k_cache.shape)}, v {tuple(v_cache.shape)}")
    if not (q.dtype == k_cache.dtype == v_cache.dtype) or q.dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"dtypes: q {q.dtype}, k {k_cache.dtype}, v {v_cache.dtype}; need one of bf16/fp32")
    if seqs.dtype != torch.int64 or tables.dtype != torch.int64 or seqs.dim() != 2 or seqs.shape[1] != 4:
        raise ValueError("tables and seqs must be int64; seqs (S, 4)")
    if any(t.device.type != "cpu" for t in (q, k_cache, v_cache, tables, seqs)):
        raise ValueError("the paged-attention kernel runs on the CPU")
    q, seqs, tables = q.contiguous(), seqs.contiguous(), tables.contiguous()
    if not checked:
        check_batch(N, k_cache.shape[0], bs, tables, seqs)
    if out is None:
        out = torch.empty_like(q)
    if not (out.is_contiguous() and k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("out and the caches must be contiguous")
    lib = load()
    fn = lib.paged_attention_bf16 if q.dtype == torch.bfloat16 else lib.paged_attention_f32
    failed = fn(q.data_ptr(), out.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(),
                seqs.data_ptr(), seqs.shape[0], H, K, D, bs, D ** -0.5, torch.get_num_threads())
    if failed:
        raise MemoryError("paged-attention kernel: scratch allocation failed")
    return out
