"""One replica's engine and the `Replica` that drives it, built the same way by every pool."""
from __future__ import annotations

import dataclasses

from vbatch.engine.llm_engine import LLMEngine
from vbatch.jobs.config import JobConfig
from vbatch.jobs.openai_rows import OpenAIRows
from vbatch.jobs.replica import Replica
from vbatch.jobs.row_prompts import RowPrompts


def start_replica(config: JobConfig, prompt_column: str, device: str | None = None) -> Replica:
    """Load the engine of `config` and wrap it in the job's `Replica` (its engine is
    `replica.engine`; the caller shuts it down). `prompt_column`: the column the input scan
    found the prompts in (`--prompt-column`, or `messages`). `device`: the plan's ("cuda",
    "cpu"; None: the engine's default), so a replica planned on GPUs that sees none fails
    instead of running on CPU. A job over OpenAI batch files (`input_format` "openai")
    translates each line's body (jobs/openai_rows.py)."""
    engine = LLMEngine(dataclasses.replace(config.engine_config(), device=device))
    try:
        openai = None
        if config.input_format == "openai":
            openai = OpenAIRows(engine, served_model_names(config, engine))
        return Replica(engine, config.sampling_params(),
                       RowPrompts(prompt_column, config.id_column, config.chat,
                                  on_long_prompt=config.on_long_prompt), openai=openai)
    except BaseException:
        engine.shutdown()
        raise


def served_model_names(config: JobConfig, engine: LLMEngine) -> list[str]:
    """The names an OpenAI batch line's `model` may use: `--model` as given (the first: every
    response body's `model`), and the model it resolved to."""
    names = [config.model] if config.model else []
    return names + [engine.resolved_model.source]


def model_info(engine: LLMEngine) -> dict:
    """The manifest's `model` entry for a loaded engine: source, fingerprint, dtype."""
    return {"source": engine.resolved_model.source,
            "fingerprint": engine.resolved_model.fingerprint,
            "dtype": dtype_name(engine)}


def dtype_name(engine: LLMEngine) -> str:
    """`bfloat16`, or `bfloat16 (auto)` when the dtype was chosen by `--dtype auto`; with
    `--quantization int8`, `bfloat16 + int8 W8A8`."""
    name = str(engine.dtype).removeprefix("torch.")
    if engine.config.dtype == "auto":
        name += " (auto)"
    if engine.config.quantization:
        name += f" + {engine.config.quantization} W8A8"
    return name
