"""`vbatch run --dry-run`: check a job and describe its plan without loading a model or writing.

What is checked is what a real run checks before its model loads: the flags, the input files and
their schemas (first block of each text file), the output path, and the plan itself (devices,
runner). The model is not loaded: when `--model` is a local directory or a hub id in the local
cache, only its `config.json` is read, to check that tp divides the attention heads and pp the
layers. Raises the same `ValueError`s a real run would (exit code 2).
"""
from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import try_to_load_from_cache

from vbatch.engine.config import check_parallel_sizes
from vbatch.errors import VBatchUsageError
from vbatch.io import inputs, reader
from vbatch.io.formats import count_rows
from vbatch.io.output_dir import check_output_dir
from vbatch.jobs.config import JobConfig
from vbatch.jobs.job_inputs import output_dir_of, resolve_input_format
from vbatch.jobs.plan import format_plan, local_resources, make_plan
from vbatch.storage.filesystem import parse_storage_options

MAX_FILES_SHOWN = 10


def describe_job(config: JobConfig) -> str:
    """Validate `config` as far as possible without a model and return the plan as text."""
    storage_options = parse_storage_options(config.storage_options)
    files = inputs.resolve_input_files(config.input, storage_options)
    config = resolve_input_format(config, files)
    output_dir = output_dir_of(config)
    check_output_dir(output_dir, overwrite=config.overwrite, resume=config.resume,
                     root=config.output_root, storage_options=storage_options)
    reader.validate_inputs(files, config.prompt_column, id_column=config.id_column,
                           csv_infer_types=config.csv_infer_types,
                           allow_type_promotion=config.allow_type_promotion,
                           input_format=config.input_format)
    num_rows = count_rows(files)
    plan = make_plan(config, local_resources())
    model_note = check_model_shape(config)
    lines = ["vbatch dry run (no model loaded, nothing written)"]
    lines += [f"  {line}" for line in format_plan(plan)]
    lines.append(f"  model         {config.model or 'default (SmolLM2-135M-Instruct)'}"
                 f" ({model_note})")
    rows = f"{num_rows:,} rows" if num_rows is not None else "row count unknown until read"
    kind = ", OpenAI batch requests" if config.input_format == "openai" else ""
    lines.append(f"  input         {len(files)} file(s), {rows}{kind}")
    lines += [f"    {file}" for file in files[:MAX_FILES_SHOWN]]
    if len(files) > MAX_FILES_SHOWN:
        lines.append(f"    ... and {len(files) - MAX_FILES_SHOWN} more")
    lines.append(f"  output        {output_dir} (rows per file {config.rows_per_file:,}"
                 f"{', input order' if config.preserve_order else ''})")
    return "\n".join(lines)


def check_model_shape(config: JobConfig) -> str:
    """Check tp and pp against the model's `config.json` when it can be read without loading or
    converting anything; return a short note of what was checked. Raises VBatchUsageError."""
    path = _local_config_json(config.model)
    if path is None:
        return "config not inspected: not a local model directory"
    hf_config = json.loads(path.read_text())
    heads = hf_config.get("num_attention_heads") or hf_config.get("n_head")
    layers = hf_config.get("num_hidden_layers") or hf_config.get("n_layer")
    if not heads or not layers:
        return f"config.json at {path} names no head or layer count"
    kv_heads = hf_config.get("num_key_value_heads") or heads
    tp, pp = config.tensor_parallel_size, config.pipeline_parallel_size
    try:
        check_parallel_sizes(num_heads=heads, num_kv_heads=kv_heads, num_layers=layers,
                             tp_size=tp, pp_size=pp)
    except ValueError as error:
        raise VBatchUsageError(str(error)) from None
    return f"{heads} heads, {kv_heads} KV heads, {layers} layers: tp {tp} and pp {pp} fit"


def _local_config_json(model: str | None) -> Path | None:
    if not model:
        return None
    directory = Path(model).expanduser()
    if directory.is_dir():
        candidate = directory / "config.json"
        return candidate if candidate.is_file() else None
    if "/" in model and not model.startswith((".", "/", "~")):
        cached = try_to_load_from_cache(model, "config.json")
        return Path(cached) if isinstance(cached, str) else None
    return None
