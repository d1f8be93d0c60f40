"""`vbatch eval`: lm-evaluation-harness with the vbatch model and vbatch's engine flags.

    vbatch eval --model smollm2 --dtype float32 --tp 2 --replicas 2 \\
        --tasks arc_easy --num_fewshot 5 --limit 100 --output_path results/

The engine flags are the job's own declarations (`vbatch run -h` documents them; `--replicas`
is lm-eval's data_parallel_size); every other argument is lm-eval's (`--tasks`,
`--num_fewshot`, `--limit`, `--batch_size`, `--output_path`, `--log_samples`,
`--include_path`, `--seed`, `--gen_kwargs`, `--apply_chat_template`, ...), passed to lm-eval's
`run` command unchanged, which prints its table and writes its usual `results_*.json` under
`--output_path`. Exit codes as `vbatch run`: 2 for a usage error (one line), 1 otherwise.
"""
from __future__ import annotations

import sys
from typing import Any

import click

from vbatch.errors import one_line
from vbatch.jobs.cli import EXIT_INTERNAL_ERROR, EXIT_USAGE_ERROR, click_parameter
from vbatch.jobs.config import JOB_OPTIONS

#: Job options that configure the evaluation's engine (job flag -> lm-eval model_args name).
ENGINE_OPTIONS = {
    "model": "pretrained", "tensor_parallel_size": "tensor_parallel_size",
    "pipeline_parallel_size": "pipeline_parallel_size",
    "distributed_executor_backend": "distributed_executor_backend", "dtype": "dtype",
    "max_model_len": "max_model_len", "max_num_seqs": "max_num_seqs",
    "max_num_batched_tokens": "max_num_batched_tokens",
    "kv_cache_memory_gb": "kv_cache_memory_gb", "block_size": "block_size",
    "enable_prefix_caching": "enable_prefix_caching", "trust_remote_code": "trust_remote_code",
    "replicas": "data_parallel_size",
}
_LM_EVAL_OWN = {"--model", "--model_args"}


def model_args_string(values: dict[str, Any]) -> str:
    """lm-eval's `k=v,k=v` model_args for the engine options given (None values left out)."""
    parts = []
    for name, arg in ENGINE_OPTIONS.items():
        value = values.get(name)
        if value is None:
            continue
        text = str(value)
        if "," in text:
            raise ValueError(f"--{name.replace('_', '-')} {text!r}: lm-eval's model_args "
                             f"cannot carry ','")
        parts.append(f"{arg}={text}")
    return ",".join(parts)


@click.command("eval", context_settings={"ignore_unknown_options": True,
                                         "allow_extra_args": True,
                                         "help_option_names": ["-h", "--help"]})
@click.pass_context
def eval_command(ctx: click.Context, **params: Any) -> None:
    """Run lm-evaluation-harness tasks on vbatch's engine (lm-eval's flags pass through)."""
    explicit = {name: value for name, value in params.items()
                if ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT}
    clash = sorted(a for a in ctx.args if a.split("=")[0] in _LM_EVAL_OWN)
    if clash:
        click.echo(f"Error: {clash[0]} is set by vbatch eval (use --model for the checkpoint "
                   f"and the engine flags for the rest)", err=True)
        sys.exit(EXIT_USAGE_ERROR)
    try:
        model_args = model_args_string({"model": params.get("model") or "smollm2", **explicit})
        from lm_eval._cli import HarnessCLI  # noqa: PLC0415 - start-up: lm-eval and torch load only here

        import vbatch.eval  # noqa: F401, PLC0415 - registers the "vbatch" model
        argv = ["lm-eval", "run", "--model", "vbatch", "--model_args", model_args, *ctx.args]
        saved, sys.argv = sys.argv, argv
        try:
            parser = HarnessCLI()
            parser.execute(parser.parse_args())
        finally:
            sys.argv = saved
    except ValueError as error:
        click.echo(f"Error: {one_line(error)}", err=True)
        sys.exit(EXIT_USAGE_ERROR)
    except (SystemExit, KeyboardInterrupt):
        raise
    except Exception as error:  # noqa: BLE001 - the CLI boundary turns every failure into one line
        click.echo(f"Error: internal error: {type(error).__name__}: {one_line(error)}", err=True)
        sys.exit(EXIT_INTERNAL_ERROR)


eval_command.params = [click_parameter(d) for d in JOB_OPTIONS if d.name in ENGINE_OPTIONS]
