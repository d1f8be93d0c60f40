"""`JobConfig`: everything one `vbatch run` job needs, merged from flags, env vars and a YAML file.

`JobConfig` is a flat dataclass derived from three declarations (`vbatch.options`): the job's
own options (`jobs/options.JobOptions`), the request options (`SamplingParams`) and the engine
options (`EngineConfig`), each field with the job's default. `engine_config()` and
`sampling_params()` hand the fields back to where they were declared. The CLI's flags
(`jobs/cli.py`), the YAML keys and the job fingerprint (`FINGERPRINT_FIELDS`) come from
the same declarations, so a new option is one field plus its use.

Precedence, highest first:

1. command-line flags the user actually typed;
2. environment variables of the options that declare one (`VBATCH_MODEL`, `VBATCH_DTYPE`, ...);
   click reports them as explicitly set, so they rank with flags and beat the YAML file;
3. the `--config job.yaml` file;
4. the declared defaults.

This module checks values only (`JobConfig.validate`); whether files and models exist is the
runner's business. The one exception is structured outputs: `validate` reads a `--json-schema`
or `--grammar` file into the option's value (so the fingerprint covers the schema itself, and
replicas never read the file again) and compiles the job's spec, so a spec that does not
compile is a usage error before any model loads.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from vbatch.engine.config import EngineConfig
from vbatch.engine.sampling_params import SamplingParams
from vbatch.engine.structured_output import StructuredOutputsParams
from vbatch.errors import VBatchUsageError
from vbatch.jobs.options import JobOptions
from vbatch.options import (
    DeclaredOption,
    convert_plain_value,
    declared_options,
    normalize_options,
    validate_options,
)

#: Where each job option goes, in the order the CLI lists them.
_DESTINATIONS = (("job", JobOptions), ("sampling", SamplingParams), ("engine", EngineConfig))
JOB_OPTIONS: tuple[DeclaredOption, ...] = tuple(
    declared for _, cls in _DESTINATIONS for declared in declared_options(cls)
    if declared.spec.in_job)
_FIELDS_OF = {destination: tuple(d.name for d in declared_options(cls) if d.spec.in_job)
              for destination, cls in _DESTINATIONS}
FIELD_NAMES: tuple[str, ...] = tuple(declared.name for declared in JOB_OPTIONS)
if len(set(FIELD_NAMES)) != len(FIELD_NAMES):  # two declarations offered under one name
    raise ImportError(f"vbatch.jobs.config: job option names collide: {FIELD_NAMES}")
#: The options whose values are part of the job fingerprint (`--resume` refuses a change).
FINGERPRINT_FIELDS: tuple[str, ...] = tuple(d.name for d in JOB_OPTIONS if d.spec.fingerprint)
_OPTION = {declared.name: declared for declared in JOB_OPTIONS}
#: The job options that each set the job's structured output (at most one may be given), and
#: the `StructuredOutputsParams` keyword each becomes.
STRUCTURED_OUTPUT_OPTIONS: dict[str, str] = {"choice": "choice", "regex": "regex",
                                             "json_schema": "json", "grammar": "grammar",
                                             "json_object": "json_object"}


def option_label(declared: DeclaredOption) -> str:
    """How messages name an option: its flag (`--max-tokens`), or `INPUT`."""
    return declared.spec.metavar if declared.spec.cli_argument else declared.flag


class _JobConfigMethods:
    """The behaviour of `JobConfig` (its fields come from the declarations)."""

    __slots__ = ()

    def __post_init__(self) -> None:
        normalize_options(self)

    def validate(self) -> JobConfig:
        """Check every value; raise `VBatchUsageError` with a one-line, actionable message
        naming the flag. Returns `self` (`config = load_job_config(...).validate()`)."""
        if self.resume and self.overwrite:
            raise VBatchUsageError("--resume and --overwrite exclude each other: resume keeps "
                                   "the committed rows, overwrite deletes them")
        if self.force and not self.resume:
            raise VBatchUsageError("--force only applies to --resume")
        try:
            validate_options(self, label=option_label)
        except ValueError as error:
            raise VBatchUsageError(str(error)) from None
        self._check_structured_outputs()
        return self

    def _structured_output_option(self) -> str | None:
        """The one structured-output option set (raises VBatchUsageError for two)."""
        given = [name for name in STRUCTURED_OUTPUT_OPTIONS if getattr(self, name)]
        if len(given) > 1:
            flags = ", ".join(_OPTION[name].flag for name in STRUCTURED_OUTPUT_OPTIONS)
            raise VBatchUsageError(
                f"{_OPTION[given[0]].flag} and {_OPTION[given[1]].flag} exclude each other: "
                f"give at most one of {flags}")
        return given[0] if given else None

    def _check_structured_outputs(self) -> None:
        """At most one kind; a file's content read into the option; the spec compiled."""
        name = self._structured_output_option()
        if name is None:
            return
        if name == "json_schema":
            self.json_schema = json.dumps(_json_schema(self.json_schema))
        elif name == "grammar":
            self.grammar = _grammar_text(self.grammar)
        params = self.structured_outputs_params()
        try:
            params.to_grammar()
        except ValueError as error:
            raise VBatchUsageError(f"{_OPTION[name].flag} does not compile: {error}") from None

    def structured_outputs_params(self) -> StructuredOutputsParams | None:
        """The job's `StructuredOutputsParams` (None without a structured-output option).
        Raises VBatchUsageError for a spec that is not well formed (an unreadable file, JSON
        that is not an object)."""
        name = self._structured_output_option()
        if name is None:
            return None
        value = getattr(self, name)
        if name == "choice":
            value = list(value)
        elif name == "json_schema":
            value = _json_schema(value)
        elif name == "grammar":
            value = _grammar_text(value)
        kind = STRUCTURED_OUTPUT_OPTIONS[name]
        compact = self.disable_any_whitespace and kind in ("json", "json_object")
        try:
            return StructuredOutputsParams(**{kind: value}, disable_any_whitespace=compact)
        except ValueError as error:
            raise VBatchUsageError(f"{_OPTION[name].flag}: {error}") from None

    def engine_config(self) -> EngineConfig:
        """The `EngineConfig` of the engine this job runs."""
        return EngineConfig(**self._values_for("engine"))

    def sampling_params(self) -> SamplingParams:
        """The `SamplingParams` applied to every row (the row key varies the random draws;
        the seed is the engine's, `seed`), with the job's structured output."""
        return SamplingParams(**self._values_for("sampling"),
                              structured_outputs=self.structured_outputs_params())

    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML/JSON-serializable dict of all fields (for manifests and logs)."""
        return dataclasses.asdict(self)

    def _values_for(self, destination: str) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _FIELDS_OF[destination]}


JobConfig = dataclasses.make_dataclass(
    "JobConfig", [(d.name, d.type, d.job_field()) for d in JOB_OPTIONS],
    bases=(_JobConfigMethods,), slots=True)
JobConfig.__module__ = __name__     # pickled into replica processes by this name
JobConfig.__doc__ = """One batch-inference job, as the user asked for it: one field per job
option (`JOB_OPTIONS`; the help text of each is its `--flag`'s). `model=None` means vbatch's
default model, `output=None` lets the runner pick a directory, `top_k=-1` is normalized to 0."""


def _json_schema(value: str) -> dict:
    """`--json-schema`'s value, inline JSON text or the path of a JSON file, as the schema
    object. Raises VBatchUsageError naming the flag."""
    try:
        schema = json.loads(value)
        where = "inline JSON"
    except ValueError:
        path = Path(value).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            reason = getattr(error, "strerror", None) or error
            raise VBatchUsageError(f"--json-schema {value!r} is neither inline JSON nor a "
                                   f"readable JSON file ({reason})") from None
        try:
            schema = json.loads(text)
        except ValueError as error:
            raise VBatchUsageError(f"--json-schema file {value} is not valid JSON: "
                                   f"{error}") from None
        where = f"file {value}"
    if not isinstance(schema, dict):
        raise VBatchUsageError(f"--json-schema ({where}) must be a JSON object (a JSON "
                               f"schema), got {type(schema).__name__}")
    return schema


def _grammar_text(value: str) -> str:
    """`--grammar`'s value: EBNF text (it holds a `::=` rule) or the path of a file of it.
    Raises VBatchUsageError naming the flag."""
    if "::=" in value:
        return value
    path = Path(value).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or error
        raise VBatchUsageError(f"--grammar {value!r} is neither EBNF text (no `::=` rule) nor "
                               f"a readable file ({reason})") from None
    if not text.strip():
        raise VBatchUsageError(f"--grammar file {value} is empty")
    return text


def read_yaml_config(config_path: str) -> dict[str, Any]:
    """Read a job YAML file into `{field_name: value}` with values type-checked.

    Keys may use underscores or dashes (`max_tokens` or `max-tokens`). Raises `VBatchUsageError`
    naming the file for an unreadable file, a file that is not UTF-8 text (binary, UTF-16),
    invalid YAML, a top level that is not a mapping, an unknown key (listing the valid ones) or
    a value of the wrong type.
    """
    import yaml  # noqa: PLC0415 - start-up: keeps `vbatch --help` fast

    try:
        with open(config_path, "rb") as config_file:
            data = config_file.read()
    except OSError as exc:
        raise VBatchUsageError(
            f"cannot read config file {config_path}: {exc.strerror or exc}"
        ) from exc
    text = _config_text(config_path, data)
    try:
        document = yaml.safe_load(text)
    except yaml.reader.ReaderError as exc:     # a control character: a binary file
        line, column = _line_column(text, exc.position)
        raise VBatchUsageError(
            f"config file {config_path} is not YAML text: character #x{exc.character:04x} at "
            f"line {line}, column {column} is not allowed (is it a binary file?)") from exc
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        raise VBatchUsageError(f"config file {config_path} is not valid YAML{where}") from exc
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise VBatchUsageError(
            f"config file {config_path} must be a mapping of option: value, "
            f"got a {type(document).__name__}"
        )
    values: dict[str, Any] = {}
    for raw_key, raw_value in document.items():
        name = str(raw_key).replace("-", "_")
        if name not in _OPTION:
            raise VBatchUsageError(
                f"unknown key {raw_key!r} in config file {config_path}; "
                f"valid keys: {', '.join(FIELD_NAMES)}"
            )
        if name in values:
            raise VBatchUsageError(f"key {raw_key!r} appears twice in config file {config_path}")
        try:
            if name == "json_schema" and isinstance(raw_value, dict):   # the schema itself
                raw_value = json.dumps(raw_value)
            values[name] = convert_plain_value(_OPTION[name], raw_value)
        except TypeError as exc:
            raise VBatchUsageError(
                f"config file {config_path}: {raw_key!r} must be {exc}, got {raw_value!r}"
            ) from exc
    return values


def _config_text(config_path: str, data: bytes) -> str:
    """`data` decoded as UTF-8 (a UTF-8 byte-order mark allowed), or `VBatchUsageError` naming
    the file and where the first undecodable byte is."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise VBatchUsageError(f"config file {config_path} is UTF-16 text; save it as UTF-8")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise VBatchUsageError(
            f"config file {config_path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at line "
            f"{line}, column {column}): save it as UTF-8, or is it a binary file?") from None


def _line_column(text: str, position: int) -> tuple[int, int]:
    """1-based line and column of character `position` of `text`."""
    line_start = text.rfind("\n", 0, position) + 1
    return text.count("\n", 0, position) + 1, position - line_start + 1


def load_job_config(cli_values: dict[str, Any], config_path: str | None) -> JobConfig:
    """Merge `cli_values` over the YAML file at `config_path` over the defaults; validate.

    `cli_values` must hold only the values the user set explicitly (flags or env vars; the CLI
    filters with `ctx.get_parameter_source`), keyed by field name. Keys outside the JobConfig
    fields are ignored. Tuples (click's `multiple=True`) become lists.
    Returns a validated `JobConfig`; raises `VBatchUsageError` on any problem.
    """
    merged: dict[str, Any] = read_yaml_config(config_path) if config_path else {}
    for name, value in cli_values.items():
        if name in _OPTION:
            merged[name] = list(value) if isinstance(value, tuple) else value
    if merged.get("input") is None:
        raise VBatchUsageError(
            "missing INPUT: pass it as `vbatch run INPUT` or set `input:` in the --config file"
        )
    return JobConfig(**merged).validate()
