"""Engine configuration: what to load, in which dtype, and the scheduling/memory limits."""
from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_CPU_KV_CACHE_GB = 4.0
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9


@dataclass
class EngineConfig:
    """Everything one engine instance needs; `validate()` checks it before any work.

    max_num_batched_tokens: token budget of one step (None: max(8192, max_model_len)).
    kv_cache_memory_gb: the KV cache's fixed budget (None: 4 GiB on CPU, or 90% of free GPU
    memory after the weights on CUDA); the cache never grows past it.
    enable_prefix_caching: share the KV blocks of identical prompt prefixes between requests.
    block_size: tokens per KV-cache block (None: 16 on GPUs, 8 on CPUs, where attention gathers
    whole blocks and smaller blocks waste less padding; measured in benchmarks/RESULTS.md).
    """

    model: str | None = None
    dtype: str = "auto"
    seed: int = 0
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    kv_cache_memory_gb: float | None = None
    block_size: int | None = None
    enable_prefix_caching: bool = True
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    distributed_executor_backend: str | None = None
    device: str | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False

    def validate(self) -> None:
        """Raise ValueError with an actionable message for an impossible setting."""
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be auto, {', '.join(DTYPES)}; got {self.dtype!r}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")
        if self.kv_cache_memory_gb is not None and self.kv_cache_memory_gb <= 0:
            raise ValueError("kv_cache_memory_gb must be > 0")
        if self.block_size is not None and self.block_size < 1:
            raise ValueError("block_size must be >= 1")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.pipeline_parallel_size < 1:
            raise ValueError("pipeline_parallel_size must be >= 1, got "
                             f"{self.pipeline_parallel_size}")
        if self.distributed_executor_backend not in (None, "uni", "mp", "ray"):
            raise ValueError("distributed_executor_backend must be 'mp', 'ray' or 'uni'; got "
                             f"{self.distributed_executor_backend!r}")


def resolve_block_size(block_size: int | None, device: torch.device) -> int:
    """The KV block size: as given, else 16 on GPUs and 8 on CPUs."""
    if block_size is not None:
        return block_size
    return 16 if device.type == "cuda" else 8


def resolve_device(device: str | None) -> torch.device:
    """`None` -> cuda if available, else cpu."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    if resolved.type == "cuda" and resolved.index is None:
        resolved = torch.device("cuda", 0)   # set_device and mem_get_info need an index
    return resolved


def cpu_has_fast_bf16() -> bool:
    """True on CPUs whose matmuls run natively in bfloat16 (AMX or AVX512-BF16)."""
    cpu = torch.cpu
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto`: bfloat16 on GPUs that support it and on CPUs with AMX / AVX512-BF16, else float32.

    Explicit names are honoured as given (float32 is the reference-exact setting).
    """
    if dtype != "auto":
        return DTYPES[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def check_parallel_sizes(*, num_heads: int, num_kv_heads: int, num_layers: int, tp_size: int,
                         pp_size: int) -> None:
    """tp must split the attention heads, and the KV heads or be a multiple of them (KV heads
    are then replicated); pp at most one stage per layer. Raises ValueError naming the valid
    tensor-parallel sizes."""
    valid = [t for t in range(1, num_heads + 1)
             if num_heads % t == 0 and (num_kv_heads % t == 0 or t % num_kv_heads == 0)]
    if tp_size not in valid:
        raise ValueError(f"tensor_parallel_size={tp_size} does not divide this model's "
                         f"{num_heads} attention heads ({num_kv_heads} KV heads); valid sizes: "
                         f"{', '.join(map(str, valid))}")
    if pp_size > num_layers:
        raise ValueError(f"pipeline_parallel_size={pp_size} exceeds this model's {num_layers} "
                         "layers; use at most one stage per layer")
