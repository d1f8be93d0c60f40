"""What an `EngineConfig` resolves to on this machine: device, dtype and KV block size.

Kept apart from `engine/config.py` so that reading the declarations (the CLI does, for its
flags) never imports torch.
"""
from __future__ import annotations

import os

import torch

from vbatch.env import DEVICE

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_block_size(block_size: int | None, device: torch.device) -> int:
    """The KV block size: as given, else 16 on GPUs and 8 on CPUs."""
    if block_size is not None:
        return block_size
    return 16 if device.type == "cuda" else 8


def resolve_device(device: str | None) -> torch.device:
    """`None` -> `$VBATCH_DEVICE` if set, else cuda if available, else cpu."""
    if device is None:
        device = DEVICE.read() or ("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and resolved.index is None:
        resolved = torch.device("cuda", 0)   # set_device and mem_get_info need an index
    return resolved


def check_device_visible(device: torch.device, hint: str = "") -> None:
    """ValueError (ending with `hint`) unless this process can use `device`: a cuda device
    needs a GPU it sees, so a replica planned on GPUs neither quietly runs on CPU nor fails
    deep inside torch."""
    if device.type == "cuda" and torch.cuda.device_count() <= (device.index or 0):
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise ValueError(f"device {device} was asked for, but this process sees "
                         f"{torch.cuda.device_count()} CUDA GPU(s) (CUDA_VISIBLE_DEVICES="
                         f"{visible!r}, torch {torch.__version__}){hint}")


def cpu_has_fast_bf16() -> bool:
    """True on CPUs whose matmuls run natively in bfloat16 (AMX or AVX512-BF16)."""
    cpu = torch.cpu
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks)


def cuda_has_native_bf16(device: torch.device) -> bool:
    """True on GPUs of compute capability 8.0 or later (Ampere on): older ones (V100, T4)
    only emulate bfloat16, which `torch.cuda.is_bf16_supported()` also counts."""
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 8


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto`: bfloat16 on GPUs of compute capability >= 8.0 (float16 on older ones) and on CPUs
    with AMX / AVX512-BF16, else float32.

    Explicit names are honoured as given (float32 is the reference-exact setting). Raises
    ValueError for `auto` on cuda in a process that sees no GPU (the ray executor's engine on
    a GPU-less node: its ranks' GPUs decide, and it cannot query them).
    """
    if dtype != "auto":
        return DTYPES[dtype]
    if device.type == "cuda":
        if torch.cuda.device_count() == 0:
            check_device_visible(device, hint="; an engine whose ranks are Ray actors on "
                                 "GPU nodes needs an explicit --dtype (bfloat16, or float16 "
                                 "below compute capability 8.0)")
        return torch.bfloat16 if cuda_has_native_bf16(device) else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
