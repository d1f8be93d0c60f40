"""The `vbatch` command line: a Click group with `run` (and `eval`, imported when used).

Exit codes: 0 success; 2 for anything the user can fix (a click usage error, or any `ValueError`,
which includes `VBatchUsageError`/`InputError`, from config loading or from the job); 3 when more
rows errored than `--max-error-rate` allows (`TooManyRowErrors`); 1 for an internal error; 130
when interrupted. Errors print as ONE line on stderr; `VBATCH_DEBUG=1` adds
the traceback. Importing this module stays light (no torch): the runner is imported inside `run`.
"""
from __future__ import annotations

import importlib
import signal
import sys
import threading
import traceback
from typing import Any

import click

import vbatch
from vbatch.env import DEBUG, check_environment
from vbatch.errors import TooManyRowErrors, one_line
from vbatch.jobs.config import JOB_OPTIONS, load_job_config
from vbatch.jobs.progress import ProgressReporter
from vbatch.jobs.signals import redeliver_stop_signals
from vbatch.options import DeclaredOption, base_type

EXIT_OK = 0
EXIT_INTERNAL_ERROR = 1
EXIT_USAGE_ERROR = 2
EXIT_TOO_MANY_ROW_ERRORS = 3
EXIT_INTERRUPTED = 130

_EXPLICIT_SOURCES = (
    click.core.ParameterSource.COMMANDLINE,
    click.core.ParameterSource.ENVIRONMENT,
    click.core.ParameterSource.PROMPT,
)


def package_version() -> str:
    """The installed vbatch version, or `vbatch.__version__`, or "unknown" if neither exists."""
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415 - start-up: only --version needs it

    try:
        return version("vbatch")
    except PackageNotFoundError:
        return str(getattr(vbatch, "__version__", "unknown"))


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    click.echo(f"vbatch, version {package_version()}")
    ctx.exit(EXIT_OK)


def is_debug_enabled() -> bool:
    """True when `VBATCH_DEBUG` is set to a truthy value (1, true, yes, on); False for a bad
    value (this runs while an error is reported; `check_environment` reports the bad value)."""
    try:
        return DEBUG.read()
    except ValueError:
        return False


class _LazyGroup(click.Group):
    """A group whose other commands are imported only when run: they pull in heavy libraries
    (lm-eval, the server), and their modules import this one. `vbatch --help` lists them
    from `lazy_help` without importing them."""

    #: command name -> "module:attribute" of its click command
    lazy_commands = {"eval": "vbatch.eval.cli:eval_command",
                     "serve": "vbatch.entrypoints.openai.cli:serve_command"}
    #: their one-line help in `vbatch --help` (each command's own -h has the rest)
    lazy_help = {"eval": "Run lm-evaluation-harness tasks on vbatch's engine.",
                 "serve": "Serve a model over an OpenAI-compatible HTTP API."}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy_commands})

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        names = self.list_commands(ctx)
        limit = formatter.width - 6 - max(len(name) for name in names)   # as click's own
        rows = []
        for name in names:
            if name in self.commands:
                rows.append((name, self.commands[name].get_short_help_str(limit)))
            else:
                rows.append((name, self.lazy_help[name]))
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy_commands and name not in self.commands:
            module, _, attribute = self.lazy_commands[name].partition(":")
            self.add_command(getattr(importlib.import_module(module), attribute), name)
        return super().get_command(ctx, name)


@click.group(cls=_LazyGroup,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
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

    Run `vbatch run -h` for the options of a job, `vbatch eval -h` for lm-evaluation-harness,
    `vbatch serve -h` for the OpenAI-compatible server.
    """


def click_parameter(declared: DeclaredOption) -> click.Parameter:
    """The click argument/option of one declared job option (its type, default, spellings,
    env var and help all come from the declaration)."""
    spec, name = declared.spec, declared.name
    if spec.cli_argument:
        return click.Argument([name], required=False, metavar=f"[{spec.metavar}]")
    default = declared.job_default_value()
    kind = base_type(declared.type)
    names = [declared.flag, *spec.flags, name]
    if spec.negatable:
        names[0] = f"{declared.flag}/--no-{declared.flag[2:]}"
    settings: dict[str, Any] = {"help": spec.help, "metavar": spec.metavar}
    if kind is bool:
        settings.update(is_flag=True, show_default=spec.negatable)
    elif kind is list:
        settings.update(multiple=True, type=str)
        default = None
    elif spec.choices is not None:
        settings["type"] = click.Choice(spec.choices, case_sensitive=spec.case_sensitive)
    else:
        settings["type"] = {int: click.INT, float: click.FLOAT}.get(kind, click.STRING)
    if spec.env is not None:
        settings.update(envvar=spec.env, show_envvar=True)
    show_default = default is not None and default is not False
    settings.setdefault("show_default", show_default)
    return click.Option(names, default=default, **settings)


@main.command("run")
@click.option("--config", "config", metavar="JOB.YAML", type=click.Path(dir_okay=False),
              help="YAML file of job options (same names as the flags, e.g. max_tokens: 64). "
                   "Flags given on the command line override it.")
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


# INPUT first, then --config, every declared job option, --dry-run and --quiet.
_config_param, *_cli_only_params = run_command.params
run_command.params = [*[click_parameter(d) for d in JOB_OPTIONS if d.spec.cli_argument],
                      _config_param,
                      *[click_parameter(d) for d in JOB_OPTIONS if not d.spec.cli_argument],
                      *_cli_only_params]


def execute_job(cli_values: dict[str, Any], config_path: str | None, *, is_quiet: bool,
                is_dry_run: bool = False) -> int:
    """Load the config, run the job, print the summary or a one-line error; return the exit code.

    `cli_values` holds only explicitly set values (see `load_job_config`). `is_dry_run`: print
    the job's plan on stdout instead of running it (no model load, nothing written).
    """
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
        check_environment()     # before anything starts: replicas and workers inherit it
        config = load_job_config(cli_values, config_path)
        if is_dry_run:
            from vbatch.jobs.dry_run import describe_job  # noqa: PLC0415 - start-up: pulls in pyarrow, huggingface_hub
            click.echo(describe_job(config))
            return EXIT_OK
        from vbatch.jobs import runner  # noqa: PLC0415 - start-up: keeps `vbatch --help` free of torch

        stats = runner.run_job(config, reporter)
        reporter.summary(stats)
        return EXIT_OK
    except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
        raise
    except TooManyRowErrors as exc:
        reporter.close()
        _report_error(one_line(exc))
        return EXIT_TOO_MANY_ROW_ERRORS
    except ValueError as exc:
        reporter.close()
        _report_error(one_line(exc))
        return EXIT_USAGE_ERROR
    except Exception as exc:  # noqa: BLE001 - the CLI boundary turns every failure into one line
        reporter.close()
        detail = one_line(exc)
        hint = "" if is_debug_enabled() else " (set VBATCH_DEBUG=1 for the traceback)"
        # a storage failure (disk full, a bucket refusing writes) says what it is; anything
        # else is vbatch's own fault
        label = "" if isinstance(exc, OSError) else f"internal error: {type(exc).__name__}: "
        _report_error(f"{label}{detail}{hint}")
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
