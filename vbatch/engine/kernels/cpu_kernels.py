"""Native CPU kernels (cpu_attention.c, cpu_ops.c, cpu_logprobs.c, cpu_int8.c): built with the
system C compiler on first use, cached, and called through ctypes.

Why C: on CPU, paged attention in PyTorch ops must first gather every sequence's cached blocks
into a padded tensor (an `index_select` per layer and step that copies all of the batch's keys
and values) and write new keys/values with advanced indexing; both cost more than the attention
arithmetic itself. The kernel reads the blocks in place through the block table instead. The
LLaMA layer's elementwise chains (residual add + RMSNorm, SiLU-and-multiply, rotary embedding)
are each one pass over memory instead of 4-8 PyTorch ops with their temporaries; so are the
activation quantization and int32 rescaling around `--quantization int8`'s int8 GEMM.

The library is compiled with `$CC` (default `cc`) using `-O3 -march=native -fopenmp`, into
`<vbatch cache>/kernels/<key>/`, where the key hashes the source, the flags, the compiler's
version and this CPU's model and flags (a cache shared by different machines never hands one a
library built for another). It links OpenMP by soname, so inside a process that imported torch
it runs on torch's own OpenMP runtime. When no compiler is available, or `VBATCH_CPU_KERNELS=0`,
`cpu_kernels()` returns None and attention runs on PyTorch ops (same results up to float
rounding).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from vbatch.engine.loader.resolve import cache_root_dir
from vbatch.env import CPU_KERNELS

logger = logging.getLogger(__name__)

KERNEL_DIR = Path(__file__).parent
SOURCES = ("cpu_attention.c", "cpu_ops.c", "cpu_logprobs.c", "cpu_int8.c")
HEADERS = ("cpu_vec.h",)
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fPIC", "-shared")
LIBRARY_NAME = "libvbatch_cpu.so"
HEAD_DIM_MULTIPLE = 16  # VEC in cpu_attention.c

_i64, _ptr, _f32, _int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int
_ATTENTION_ARGS = [_ptr, _i64, _ptr, _i64, _ptr, _ptr, _ptr, _i64, _ptr, _ptr,
                   _i64, _i64, _i64, _i64, _i64, _i64, _i64, _f32, _i64, _f32, _int]
_WRITE_ARGS = [_ptr, _ptr, _ptr, _i64, _ptr, _i64, _ptr, _i64, _i64, _i64, _i64, _i64]
_RMS_NORM_ARGS = [_ptr, _i64, _ptr, _i64, _ptr, _i64, _ptr, _i64, _i64, _f32, _int]
_SILU_ARGS = [_ptr, _i64, _ptr, _i64, _i64, _i64, _int]
_ROTARY_ARGS = [_ptr, _i64, _ptr, _ptr, _ptr, _i64, _i64, _i64, _int]
_LOGPROB_STATS_ARGS = [_ptr, _i64, _i64, _i64, _i64, _ptr, _ptr, _ptr, _ptr, _int]
_QUANTIZE_ROWS_ARGS = [_ptr, _ptr, _ptr, _i64, _i64, _i64, _int]
_DEQUANT_INT32_ARGS = [_ptr, _i64, _ptr, _i64, _i64, _ptr, _ptr, _ptr, _int]
_DTYPE_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}


def _cpu_identity() -> str:
    """This CPU's model name and feature flags (what -march=native compiles for)."""
    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "flags", "Features", "CPU part") and key not in fields:
                fields[key] = value.strip()
    except OSError:
        pass
    return f"{platform.machine()}|{sorted(fields.items())}"


def _compiler_version(compiler: str) -> str:
    result = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30)
    return result.stdout.splitlines()[0] if result.stdout else ""


def build_library(cache_root: Path, compiler: str, extra_flags: tuple[str, ...] = ()) -> Path:
    """Compile the kernel sources into the cache (once per source/compiler/CPU) and return the
    library's path. The build goes to a temporary file renamed into place, so concurrent
    processes (replicas, TP ranks) never load a half-written library. `extra_flags` (tests)
    go after the standard ones, e.g. to build the portable path of a CPU without AVX-512."""
    flags = (*CFLAGS, *extra_flags)
    texts = [(KERNEL_DIR / name).read_text() for name in SOURCES + HEADERS]
    key = hashlib.sha256("\0".join([*texts, " ".join(flags), _compiler_version(compiler),
                                    _cpu_identity()]).encode())
    target = cache_root / "kernels" / key.hexdigest()[:16] / LIBRARY_NAME
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        sources = [str(KERNEL_DIR / name) for name in SOURCES]
        result = subprocess.run([compiler, *flags, *sources, "-o", tmp, "-lm"],
                                capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


class CpuKernels:
    """Typed entry points of the compiled library, taking torch tensors."""

    def __init__(self, path: Path):
        self.path = path
        lib = ctypes.CDLL(str(path))
        self._attention = _typed(lib, "vbatch_paged_attention", _ATTENTION_ARGS)
        self._write = lib.vbatch_write_kv_cache
        self._write.argtypes, self._write.restype = _WRITE_ARGS, None
        self._rms_norm = _typed(lib, "vbatch_rms_norm", _RMS_NORM_ARGS)
        self._silu_and_mul = _typed(lib, "vbatch_silu_and_mul", _SILU_ARGS)
        self._rotary = _typed(lib, "vbatch_rotary", _ROTARY_ARGS)
        self._logprob_stats = _typed(lib, "vbatch_logprob_stats", _LOGPROB_STATS_ARGS)
        self._quantize_rows = _typed(lib, "vbatch_quantize_rows", _QUANTIZE_ROWS_ARGS)
        self._dequant_int32 = _typed(lib, "vbatch_dequant_int32", _DEQUANT_INT32_ARGS)

    @staticmethod
    def supports(dtype: torch.dtype, head_dim: int | None = None) -> bool:
        """Whether the kernels handle this dtype (and, for attention, this head size)."""
        return dtype in _DTYPE_SUFFIX and (head_dim is None or head_dim % HEAD_DIM_MULTIPLE == 0)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> torch.Tensor:
        """RMSNorm of x [T, hidden] -> new [T, hidden]. With `residual`, first
        residual <- x + residual in place, and the norm is of the sum (see cpu_ops.c)."""
        hidden = x.shape[1]
        _check_rows(x, hidden, x.dtype)
        _check_dtype(x.dtype)
        if residual is not None:
            _check_rows(residual, hidden, x.dtype)
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        self._rms_norm[x.dtype](
            out.data_ptr(), out.stride(0), x.data_ptr(), x.stride(0),
            None if residual is None else residual.data_ptr(),
            0 if residual is None else residual.stride(0), weight.contiguous().data_ptr(),
            x.shape[0], hidden, eps, torch.get_num_threads())
        return out

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, 2w] = [gate | up] -> silu(gate) * up, [T, w]."""
        _check_dtype(x.dtype)
        width = x.shape[1] // 2
        _check_rows(x, 2 * width, x.dtype)
        out = torch.empty((x.shape[0], width), dtype=x.dtype)
        self._silu_and_mul[x.dtype](out.data_ptr(), out.stride(0), x.data_ptr(), x.stride(0),
                                    x.shape[0], width, torch.get_num_threads())
        return out

    def rotary_(self, x: torch.Tensor, num_heads: int, head_dim: int, positions: torch.Tensor,
                cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Rotate the first `num_heads` heads of each row of x [T, >= num_heads*head_dim] in
        place (NeoX rotate-half), token t by the tables' row positions[t]."""
        _check_dtype(x.dtype)
        if x.stride(1) != 1 or x.shape[1] < num_heads * head_dim or x.device.type != "cpu":
            raise ValueError(f"rotary_: expected CPU rows of >= {num_heads * head_dim} "
                             f"contiguous elements, got {tuple(x.shape)} {x.stride()}")
        if cos.dtype != x.dtype or sin.dtype != x.dtype or not (cos.is_contiguous()
                                                                and sin.is_contiguous()):
            raise ValueError("rotary_: cos/sin tables must be contiguous, in the input's dtype")
        positions = positions.contiguous()
        self._rotary[x.dtype](x.data_ptr(), x.stride(0), positions.data_ptr(), cos.data_ptr(),
                              sin.data_ptr(), x.shape[0], num_heads, head_dim,
                              torch.get_num_threads())

    def logprob_stats(self, logits: torch.Tensor, num_top: int
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per row of logits [R, V]: (max [R], log_sum [R], top_ids [R, k], top_values [R, k]),
        log_sum = log(sum exp(x - max)), the k = `num_top` (<= V) largest raw values largest
        first, lower index first among ties (see cpu_logprobs.c)."""
        _check_dtype(logits.dtype)
        rows, vocab = logits.shape
        _check_rows(logits, vocab, logits.dtype)
        if not 1 <= num_top <= vocab:
            raise ValueError(f"logprob_stats: num_top must be in [1, {vocab}], got {num_top}")
        maxima, log_sums = torch.empty(rows), torch.empty(rows)
        top_ids = torch.empty((rows, num_top), dtype=torch.int64)
        top_values = torch.empty((rows, num_top))
        self._logprob_stats[logits.dtype](
            logits.data_ptr(), logits.stride(0), rows, vocab, num_top, maxima.data_ptr(),
            log_sums.data_ptr(), top_ids.data_ptr(), top_values.data_ptr(),
            torch.get_num_threads())
        return maxima, log_sums, top_ids, top_values

    def quantize_rows(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Symmetric int8 of each row of x [R, C] (float32 or bfloat16, contiguous rows):
        (q int8 [R, C], scale float32 [R]), bit-equal to int8_linear.quantize_per_row (whose
        scale is [R, 1]); see cpu_int8.c."""
        _check_dtype(x.dtype)
        if x.dim() != 2:
            raise ValueError(f"quantize_rows: expected a 2-D tensor, got {tuple(x.shape)}")
        rows, cols = x.shape
        _check_rows(x, cols, x.dtype)
        q = torch.empty((rows, cols), dtype=torch.int8)
        scales = torch.empty(rows)
        self._quantize_rows[x.dtype](q.data_ptr(), scales.data_ptr(), x.data_ptr(), x.stride(0),
                                     rows, cols, torch.get_num_threads())
        return q, scales

    def dequant_int32(self, acc: torch.Tensor, x_scales: torch.Tensor, w_scales: torch.Tensor,
                      bias: torch.Tensor | None = None, *,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """acc int32 [M, N] (contiguous) -> ((float32(acc) * x_scales[m]) * w_scales[n]
        (+ bias[n])) in `dtype` (float32 or bfloat16), [M, N]; the scales and bias are
        contiguous float32 [M], [N], [N]. Bit-equal to acc.float().mul_(x_scales[:, None])
        .mul_(w_scales).add_(bias).to(dtype); see cpu_int8.c."""
        _check_dtype(dtype)
        if acc.dtype != torch.int32 or acc.dim() != 2 or not acc.is_contiguous() \
                or acc.device.type != "cpu":
            raise ValueError(f"dequant_int32: expected a contiguous CPU int32 [M, N] "
                             f"accumulator, got {acc.dtype} {tuple(acc.shape)} on {acc.device}")
        rows, cols = acc.shape
        _check_vector(x_scales, rows, "x_scales")
        _check_vector(w_scales, cols, "w_scales")
        if bias is not None:
            _check_vector(bias, cols, "bias")
        out = torch.empty((rows, cols), dtype=dtype)
        self._dequant_int32[dtype](out.data_ptr(), out.stride(0), acc.data_ptr(), rows, cols,
                                   x_scales.data_ptr(), w_scales.data_ptr(),
                                   None if bias is None else bias.data_ptr(),
                                   torch.get_num_threads())
        return out

    def write_kv_cache(self, kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       slot_mapping: torch.Tensor) -> None:
        """kv_cache [2, Hkv, blocks, block, d]: slot slot_mapping[t] of every KV head <- k[t],
        v[t] ([T, Hkv*d], rows may be strided, each row contiguous)."""
        _, num_kv_heads, num_blocks, block_size, head_dim = kv_cache.shape
        _check_rows(k, num_kv_heads * head_dim, kv_cache.dtype)
        _check_rows(v, num_kv_heads * head_dim, kv_cache.dtype)
        slots = slot_mapping.contiguous()
        self._write(kv_cache[0].data_ptr(), kv_cache[1].data_ptr(), k.data_ptr(), k.stride(0),
                    v.data_ptr(), v.stride(0), slots.data_ptr(), k.shape[0], num_kv_heads,
                    head_dim, num_blocks * block_size, kv_cache.element_size())

    def paged_attention(self, q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                        token_seq: torch.Tensor, token_context: torch.Tensor, max_context: int,
                        num_heads: int, scale: float, *, window: int = 0,
                        softcap: float = 0.0) -> torch.Tensor:
        """q [T, H*d] -> out [T, H*d]: softmax(cap(scale q K^T)) V, where token t with
        n = token_context[t] attends to cached positions max(0, n - window)..n-1 of sequence
        token_seq[t] (whose blocks are block_tables[token_seq[t]]); window 0 means all of
        0..n-1. cap(s) = softcap * tanh(s / softcap), or s when softcap is 0."""
        _, num_kv_heads, num_blocks, block_size, head_dim = kv_cache.shape
        _check_rows(q, num_heads * head_dim, kv_cache.dtype)
        if block_tables.dtype != torch.int64 or not block_tables.is_contiguous():
            raise ValueError("block_tables must be a contiguous int64 tensor")
        if window < 0 or softcap < 0:
            raise ValueError(f"paged_attention: window ({window}) and softcap ({softcap}) must "
                             "be >= 0 (0 = no window / no soft-capping)")
        out = torch.empty((q.shape[0], num_heads * head_dim), dtype=q.dtype)
        seq, context = token_seq.contiguous(), token_context.contiguous()
        self._attention[q.dtype](
            out.data_ptr(), out.stride(0), q.data_ptr(), q.stride(0), kv_cache[0].data_ptr(),
            kv_cache[1].data_ptr(), block_tables.data_ptr(), block_tables.stride(0),
            seq.data_ptr(), context.data_ptr(), q.shape[0], num_heads, num_kv_heads, head_dim,
            num_blocks, block_size, max_context, scale, window, softcap,
            torch.get_num_threads())
        return out


def _typed(lib, name: str, argtypes: list) -> dict[torch.dtype, object]:
    """The float32 and bfloat16 variants of a kernel, by dtype."""
    functions = {}
    for dtype, suffix in _DTYPE_SUFFIX.items():
        fn = getattr(lib, f"{name}_{suffix}")
        fn.argtypes, fn.restype = argtypes, None
        functions[dtype] = fn
    return functions


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in _DTYPE_SUFFIX:
        raise ValueError(f"native CPU kernels support float32 and bfloat16, not {dtype}")


def _check_rows(x: torch.Tensor, row_size: int, dtype: torch.dtype) -> None:
    if x.device.type != "cpu" or x.dtype != dtype or x.dim() != 2 or x.shape[1] != row_size \
            or x.stride(1) != 1:
        raise ValueError(f"expected a CPU {dtype} tensor [T, {row_size}] with contiguous rows, "
                         f"got {x.dtype} {tuple(x.shape)} strides {x.stride()} on {x.device}")


def _check_vector(v: torch.Tensor, size: int, what: str) -> None:
    if v.device.type != "cpu" or v.dtype != torch.float32 or v.numel() != size \
            or not v.is_contiguous():
        raise ValueError(f"dequant_int32: {what} must be a contiguous CPU float32 tensor of "
                         f"{size} elements, got {v.dtype} {tuple(v.shape)} on {v.device}")


@functools.cache
def cpu_kernels() -> CpuKernels | None:
    """The compiled kernels of this process, or None (PyTorch fallback) when disabled with
    VBATCH_CPU_KERNELS=0 or when they cannot be built here (logged once, with the reason)."""
    if not CPU_KERNELS.read():
        return None
    compiler = os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        logger.warning("no C compiler (%s) found: CPU attention runs on PyTorch ops (slower); "
                       "install gcc to enable the native kernels", compiler)
        return None
    try:
        return CpuKernels(build_library(cache_root_dir(), compiler))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        logger.warning("could not build the native CPU kernels (%s): CPU attention runs on "
                       "PyTorch ops (slower)", exc)
        return None


def cpu_kernels_for(device: torch.device, dtype: torch.dtype,
                    head_dim: int | None = None) -> CpuKernels | None:
    """The native kernels for tensors of `dtype` on `device` (for attention, with `head_dim`),
    or None where PyTorch ops must run (GPUs, float16, odd head sizes, no compiler)."""
    if torch.device(device).type != "cpu" or not CpuKernels.supports(dtype, head_dim):
        return None
    return cpu_kernels()
