"""Dynamic W8A8 linear layers on CPU (`quantization="int8"`): int8 weights and activations.

Contract: `Int8Weight(w).linear(x, b)` ~= F.linear(x, w, b) for a CPU weight w of shape [N, K]
and activations x [..., K] in the model dtype (bfloat16, float16 or float32); the result has
x's dtype.

The math (symmetric, no zero points):

* weights, once at load, per output channel n:  s_w[n] = max_k |w[n, k]| / 127,
  W_q[n, k] = clamp(round(w[n, k] / s_w[n]), -127, 127)  (int8);
* activations, per call, per token (row) m:      s_x[m] = max_k |x[m, k]| / 127,
  X_q[m, k] = clamp(round(x[m, k] / s_x[m]), -127, 127)  (round half to even);
* C = X_q W_q^T accumulated exactly in int32 (|C| <= K * 127^2 < 2^31 for K < 133,000), by
  `torch._int_mm`, which runs oneDNN's int8 GEMM: oneDNN picks AMX-INT8 or AVX512-VNNI at run
  time from the CPU it finds;
* y[m, n] = float32(C[m, n]) * s_x[m] * s_w[n] (+ b[n]), cast to x's dtype.

Per call, the activation quantization (one pass over x for the row maxima, one writing the int8
values) and the rescaling (one pass over C, writing x's dtype) run in cpu_int8.c's native
kernels (cpu_kernels.py) for float32 and bfloat16 activations, bit-equal to the PyTorch ops of
`quantize_per_row` and of `linear`'s fallback, which run instead for float16, without a C
compiler, or with VBATCH_CPU_KERNELS=0 (tests/test_int8.py checks the equality).

The error per element is bounded by the two rounding errors: |y - x w^T| <=
sum_k (|x_k| s_w/2 + |w_k| s_x/2 + s_x s_w/4), see `error_bound`.

Tensor parallelism: every rank quantizes its own, already sharded weight. A column-parallel
shard holds whole output channels, so its scales and int8 rows equal the slice of the
unsharded ones (the shard's outputs are bit-equal to the matching tp=1 columns). A row-parallel
shard splits K: each rank takes its activation scales over its own K slice, so tp > 1 is close
to tp=1, not bit-equal (tests/test_int8.py measures it).

Measured on a 2-core AVX512-VNNI EPYC (no AMX), idle, 2 threads, SmolLM2-135M's layer shapes:
the int8 GEMM 530-860 GOP/s vs 240-430 GFLOP/s for oneDNN bf16 with pre-packed weights; with
quantization and rescaling counted, 1.3-1.6x per layer at 16-256 rows and about even at 1 row,
so there is no float fallback for small batches. No gain at the LM-head shape (K=576,
N=49152): the LM head (and MoE experts) stay in the model dtype. End to end on
benchmarks/throughput.py's workload, though, int8 was 0.85x bf16's generation tok/s (557 vs
657) with quantization and rescaling in PyTorch ops, before cpu_int8.c: not yet the speed-up
the layers promise (see benchmarks/int8.py). With cpu_int8.c, measured per layer on a
2-core AVX512-VNNI EPYC, loaded (load average ~8, so 1 thread; 2-thread timings were noise), bf16
activations, medians of interleaved samples, M = 1..256 rows at (N, K) = (1536, 576),
(576, 1536), (960, 576): `linear` 1.3-1.6x faster than with PyTorch ops, and 1.05-1.6x the
pre-packed bf16 linear (1.05-1.3x at 1-16 rows, 1.35-1.6x at 64-256). End to end
(benchmarks/int8.py, idle, 2 threads): 1.22x bf16's generation tok/s (796 vs 655); the
target is 1.6x.
"""
from __future__ import annotations

from pathlib import Path

import torch

QMAX = 127
_EPS = 1e-12  # all-zero rows/channels: scale eps, quantized values 0
_NATIVE_DTYPES = (torch.float32, torch.bfloat16)  # activations cpu_int8.c takes


def cpu_has_int8_dot() -> bool:
    """Whether this CPU has an int8 dot-product unit oneDNN uses (AVX512-VNNI, AVX-VNNI or
    AMX-INT8), from torch's own cpuinfo, else from /proc/cpuinfo's flags."""
    for probe in ("_is_vnni_supported", "_is_amx_tile_supported"):
        fn = getattr(torch.cpu, probe, None)
        if fn is not None and fn():
            return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))


def check_int8_supported(device: torch.device | str) -> None:
    """Raise ValueError naming `--quantization int8` where it cannot run fast: not on CPU, or
    a CPU without VNNI / AMX-INT8 (int8 there would be slower than the float path)."""
    device = torch.device(device)
    if device.type != "cpu":
        raise ValueError(f"--quantization int8 runs on CPU only, not on {device.type}; leave "
                         "the flag out on GPUs")
    if not hasattr(torch, "_int_mm"):
        raise ValueError("--quantization int8 needs torch._int_mm (PyTorch >= 2.2); upgrade "
                         "torch or leave the flag out")
    if not cpu_has_int8_dot():
        raise ValueError("--quantization int8 needs a CPU with AVX512-VNNI, AVX-VNNI or "
                         "AMX-INT8 (none found in /proc/cpuinfo); leave the flag out")


def quantize_per_row(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 of each row of a 2-D `t`: (q int8 [R, C], scale float32 [R, 1]) with
    t ~= q * scale, scale = max|row| / 127."""
    tf = t.float()
    scale = tf.abs().amax(dim=-1, keepdim=True).clamp_(min=_EPS).div_(QMAX)
    q = torch.round(tf / scale).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def error_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Upper bound [M, N] of |int8 result - x w^T| from the two roundings (each at most half
    a quantum), float32 rescaling excluded: sum_k |x| s_w/2 + |w| s_x/2 + s_x s_w/4."""
    x, w = x.double(), w.double()
    s_x = x.abs().amax(-1, keepdim=True) / QMAX
    s_w = w.abs().amax(-1, keepdim=True) / QMAX
    k = x.shape[-1]
    return (x.abs().sum(-1, keepdim=True) * s_w.T / 2 + s_x * w.abs().sum(-1)[None] / 2
            + k * s_x * s_w.T / 4)


class Int8Weight:
    """A linear weight [N, K] quantized per output channel; `linear(x, bias)` as in the module
    docstring. `packed` (the int8 weight) and `scale` are what it holds in memory. `kernels`:
    the native CPU kernels (engine/kernels/cpu_kernels.py `CpuKernels`, passed in by the model
    loader) for the activation quantization and rescaling, or None for PyTorch ops."""

    def __init__(self, weight: torch.Tensor, kernels=None):
        if weight.dim() != 2 or weight.device.type != "cpu":
            raise ValueError(f"int8 quantization takes a 2-D CPU weight, got shape "
                             f"{tuple(weight.shape)} on {weight.device}")
        q, scale = quantize_per_row(weight.detach())
        self.packed = q                  # [N, K] int8; _int_mm takes its transpose as a view
        self.scale = scale.reshape(-1)   # [N] float32
        self.out_features, self.in_features = q.shape
        # cpu_int8.c's quantization and rescaling (bit-equal to the PyTorch ops below), or
        # None: PyTorch ops (no C compiler, or VBATCH_CPU_KERNELS=0)
        self.kernels = kernels
        self._bias_cache: tuple[torch.Tensor, int, torch.Tensor] | None = None

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """y = (X_q W_q^T) * s_x * s_w (+ bias), in x's dtype, for x [..., K]."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] == 0:
            return x.new_empty((*lead, self.out_features))
        kernels = self.kernels
        if kernels is not None and x.dtype in _NATIVE_DTYPES and x.device.type == "cpu":
            if x2.stride(1) != 1:
                x2 = x2.contiguous()
            x_q, x_scale = kernels.quantize_rows(x2)
            acc = torch._int_mm(x_q, self.packed.t())
            y = kernels.dequant_int32(acc, x_scale, self.scale, self._float_bias(bias),
                                      dtype=x.dtype)
            return y.reshape(*lead, self.out_features)
        x_q, x_scale = quantize_per_row(x2)
        acc = torch._int_mm(x_q, self.packed.t())
        y = acc.float().mul_(x_scale).mul_(self.scale)
        if bias is not None:
            y.add_(bias.float())
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def _float_bias(self, bias: torch.Tensor | None) -> torch.Tensor | None:
        """`bias` as a contiguous float32 vector, converted once per bias tensor (and again
        only if it is modified in place: its version counter is part of the key)."""
        if bias is None:
            return None
        if bias.dtype == torch.float32 and bias.is_contiguous():
            return bias
        cached = self._bias_cache
        if cached is None or cached[0] is not bias or cached[1] != bias._version:
            cached = self._bias_cache = (bias, bias._version, bias.float().contiguous())
        return cached[2]

    def nbytes(self) -> int:
        """Bytes held: the int8 weight and the float32 scales."""
        return self.packed.numel() + self.scale.numel() * 4
