"""`vbatch serve`: the OpenAI-compatible server's command line.

    vbatch serve --model M [--tp T] [--pp P] [--distributed-executor-backend mp|ray]
                 [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--served-model-name NAME]
                 [engine flags: --dtype, --max-model-len, --max-num-seqs, --seed, ...]

The engine flags are the engine options' own declarations (as `vbatch run` offers them),
spelled with vLLM's names too (`--tensor-parallel-size`, `--pipeline-parallel-size`, ...), so
`python -m vbatch.entrypoints.openai.api_server` takes vLLM's command line. The server binds
127.0.0.1 unless `--host` says otherwise; pickle checkpoints and remote code stay refused
unless `--allow-pickle` / `--trust-remote-code`. Exit code 2 for a usage error (one line).
Importing this module stays light (no torch, no FastAPI): the server loads in the command.
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Any

import click

from vbatch.engine.config import EngineConfig
from vbatch.env import API_KEY
from vbatch.errors import one_line
from vbatch.jobs.cli import EXIT_USAGE_ERROR, click_parameter
from vbatch.jobs.config import JOB_OPTIONS

ENGINE_FIELDS = frozenset(field.name for field in dataclasses.fields(EngineConfig))


@click.command("serve", context_settings={"help_option_names": ["-h", "--help"],
                                          "max_content_width": 100})
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to listen on (0.0.0.0: every interface; only on purpose).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535),
              help="TCP port to listen on.")
@click.option("--api-key", envvar=API_KEY.name, show_envvar=True, default=None,
              help="Require 'Authorization: Bearer KEY' on every /v1 route (and /tokenize, "
                   "/detokenize).")
@click.option("--served-model-name", "served_model_names", multiple=True, metavar="NAME",
              help="Model name(s) clients use (repeatable; the first is reported in "
                   "responses). Default: the --model value.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]),
              help="uvicorn's log level.")
@click.pass_context
def serve_command(ctx: click.Context, **params: Any) -> None:
    """Serve a model over an OpenAI-compatible HTTP API (/v1/completions,
    /v1/chat/completions, /v1/models, /tokenize, /detokenize, /health, /metrics)."""
    from vbatch.entrypoints.openai.server import ServerSettings, run_server  # noqa: PLC0415 - start-up: FastAPI and torch load only when serving

    settings = ServerSettings(host=params.pop("host"), port=params.pop("port"),
                              api_key=params.pop("api_key"),
                              served_model_names=list(params.pop("served_model_names")),
                              log_level=params.pop("log_level"))
    explicit = {name: value for name, value in params.items()
                if ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT}
    try:
        config = EngineConfig(**explicit)
        config.validate()
        settings.validate()
    except ValueError as error:
        click.echo(f"Error: {one_line(error)}", err=True)
        sys.exit(EXIT_USAGE_ERROR)
    run_server(config, settings)


serve_command.params = [*serve_command.params,
                        *[click_parameter(d) for d in JOB_OPTIONS if d.name in ENGINE_FIELDS]]
