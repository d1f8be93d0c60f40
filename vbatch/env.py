"""The `VBATCH_*` environment variables that no flag declares, each declared once here.

Variables that set a job option (`VBATCH_MODEL`, `VBATCH_MAX_NUM_SEQS`, ...) are declared with
that option (`vbatch.options`) and go through click and the option's checks. The ones below
tune the machinery instead. Each is one `EnvVar` (name, what it allows, help); vbatch reads it
only through `EnvVar.read()`, which raises `VBatchUsageError` naming the variable and the
allowed values (`VBATCH_NUM_THREADS must be an integer in [1, 1024], got '100000'`).
`check_environment()` reads them all: `vbatch run` calls it before anything starts, so a bad
value is exit code 2 in the driver, never a crash in a replica or worker (which inherit the
environment).

`vbatch.parallel` may not import this module (layering): it keeps its own one-line reads of
`VBATCH_PACK_WEIGHTS` and `VBATCH_PP_LAYER_PARTITION`, parsed as declared here
(`FALSE_WORDS`, comma-separated counts), and the declarations below are what checks them.

This module imports only `vbatch.errors` and `vbatch.options` (neither imports vbatch), so the
engine and the CLI can both use it without loading torch.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vbatch.errors import VBatchUsageError
from vbatch.options import in_range

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")

#: Upper bound of VBATCH_NUM_THREADS. Fixed rather than a multiple of this machine's cores: the
#: variable also reaches Ray workers on other nodes. It is above the hardware threads of any
#: current server (2 sockets x 192 cores x 2 = 768) and far below where OpenMP thread creation
#: crashes the process (torch.set_num_threads(100000) segfaults).
MAX_NUM_THREADS = 1024
DEFAULT_CACHE_DIR = "~/.cache/vbatch"


def _parse_bool(text: str) -> bool:
    word = text.lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ValueError(text)


def _parse_num_threads(text: str) -> int:
    value = int(text)                      # ValueError for "abc", "1.5"
    if in_range(1, MAX_NUM_THREADS)(value) is not None:
        raise ValueError(text)
    return value


def _parse_layer_counts(text: str) -> tuple[int, ...]:
    counts = tuple(int(part) for part in text.split(","))
    if min(counts) < 1:
        raise ValueError(text)
    return counts


def _parse_device(text: str) -> str:
    kind, _, index = text.lower().partition(":")
    if kind not in ("cpu", "cuda") or (index and (kind == "cpu" or not index.isdigit())):
        raise ValueError(text)
    return text.lower()


def _parse_directory(text: str) -> Path:
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(text)
    return path


@dataclass(frozen=True, slots=True)
class EnvVar:
    """One environment variable: `name`, `allowed` (the allowed values, in words, for the
    error message), `parse` (text -> value; raises ValueError for a bad value), `default` (the
    value when the variable is unset or blank) and `help`."""

    name: str
    allowed: str
    parse: Callable[[str], Any]
    default: Any
    help: str

    def read(self, environ: Mapping[str, str] | None = None) -> Any:
        """The variable's value in `environ` (default: `os.environ`), parsed; `default` when it
        is unset or blank. Raises `VBatchUsageError` naming the variable, the allowed values and
        what it holds."""
        raw = (os.environ if environ is None else environ).get(self.name)
        if raw is None or not raw.strip():
            return self.default
        try:
            return self.parse(raw.strip())
        except ValueError:
            raise VBatchUsageError(f"{self.name} must be {self.allowed}, got {raw!r}") from None


_BOOLEAN = f"one of {', '.join(TRUE_WORDS + FALSE_WORDS)}"

NUM_THREADS = EnvVar(
    "VBATCH_NUM_THREADS", f"an integer in [1, {MAX_NUM_THREADS}]", _parse_num_threads, None,
    "CPU threads per engine rank (torch.set_num_threads). Default: torch's; the local runner "
    "splits this node's cores between its replicas and ranks.")
CPU_KERNELS = EnvVar(
    "VBATCH_CPU_KERNELS", _BOOLEAN, _parse_bool, True,
    "Use the native C kernels for CPU attention and norms (0: PyTorch ops only).")
TRITON_ATTENTION = EnvVar(
    "VBATCH_TRITON_ATTENTION", _BOOLEAN, _parse_bool, True,
    "On CUDA, attend straight from the paged KV cache with vbatch's Triton kernel (0: gather "
    "the blocks and use PyTorch's scaled_dot_product_attention).")
PACK_WEIGHTS = EnvVar(
    "VBATCH_PACK_WEIGHTS", _BOOLEAN, _parse_bool, True,
    "Pre-pack bfloat16 linear weights into oneDNN's layout on CPU (0: plain F.linear).")
PP_LAYER_PARTITION = EnvVar(
    "VBATCH_PP_LAYER_PARTITION", "comma-separated positive layer counts, one per pipeline "
    "stage (e.g. 16,14)", _parse_layer_counts, None,
    "Layers per pipeline stage (pp > 1); the counts must sum to the model's layers.")
DEBUG = EnvVar(
    "VBATCH_DEBUG", _BOOLEAN, _parse_bool, False,
    "Print the traceback of an internal error.")
CACHE_DIR = EnvVar(
    "VBATCH_CACHE_DIR", "a directory (created when missing)", _parse_directory, None,
    f"Where converted GGUF models and built kernels go. Default: {DEFAULT_CACHE_DIR}.")
DEVICE = EnvVar(
    "VBATCH_DEVICE", "cpu, cuda or cuda:N", _parse_device, None,
    "The torch device when none is given (`device=` / the job's plan): `cpu` keeps a job, its "
    "replicas and workers off the GPUs of a GPU host (the CPU test suite sets it). Default: "
    "cuda when available, else cpu.")
API_KEY = EnvVar(
    "VBATCH_API_KEY", "any text", str, None,
    "`vbatch serve`: the API key clients must send (as --api-key; the flag wins).")

#: Every variable declared here, in the order `check_environment` checks them.
ENV_VARS: tuple[EnvVar, ...] = (NUM_THREADS, CPU_KERNELS, TRITON_ATTENTION, PACK_WEIGHTS,
                                PP_LAYER_PARTITION, DEBUG, CACHE_DIR, DEVICE, API_KEY)


def check_environment(environ: Mapping[str, str] | None = None) -> None:
    """Read every declared variable; raise `VBatchUsageError` for the first bad one."""
    for variable in ENV_VARS:
        variable.read(environ)
