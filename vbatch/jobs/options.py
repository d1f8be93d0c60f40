"""The options that belong to a job itself: its input and output, rows, errors and runner.

Each field is declared once with `vbatch.options.option`; the engine's options are declared on
`EngineConfig` and the sampling ones on `SamplingParams`. `jobs/config.py` joins the three into
the flat `JobConfig` that the CLI, YAML files and the fingerprint derive from.
"""
from __future__ import annotations

from dataclasses import dataclass

from vbatch.options import (
    INT64_MAX,
    at_least,
    greater_than,
    in_range,
    non_empty_strings,
    not_blank,
    option,
)

RUNNER_CHOICES = ("auto", "ray", "local")
#: Each replica is a process or a Ray actor with its own engine; far more than any cluster runs.
MAX_REPLICAS = 4096
ON_LONG_PROMPT_CHOICES = ("error", "truncate")
#: rows: every row a prompt; openai: OpenAI batch files (one request a line); auto: openai when
#: every input file is a JSON lines file whose lines hold custom_id, url and body.
INPUT_FORMAT_CHOICES = ("auto", "rows", "openai")
#: parquet: Parquet part files (input columns + generation columns); openai: OpenAI batch
#: output JSON lines part files (one line per request).
OUTPUT_FORMAT_CHOICES = ("parquet", "openai")


def _not_empty_if_given(hint: str = ""):
    def check(value: str) -> str | None:
        if isinstance(value, str) and value.strip():
            return None
        return f"must not be empty{hint}"
    return check


@dataclass
class JobOptions:
    """The job's own options. `fingerprint=False` marks settings that change how or where a job
    runs, not which rows exist or what they generate (a resumed job may change them)."""

    input: str = option(
        cli_argument=True, metavar="INPUT", fingerprint=False,
        checks=_not_empty_if_given(": pass it as `vbatch run INPUT` or set `input:` in the "
                                   "--config file"),
        help="A file, directory or glob of Parquet/JSONL/CSV/Arrow files, or hf://NAME[:SPLIT].")
    output: str | None = option(
        None, flags=("-o",), metavar="DIR", fingerprint=False, checks=_not_empty_if_given(),
        help="Output directory for the Parquet part files, manifest and _SUCCESS. "
             "Default: <input stem>.vbatch/ next to the input.")
    overwrite: bool = option(
        False, fingerprint=False,
        help="Replace an existing output directory instead of failing.")
    output_root: str | None = option(
        None, metavar="DIR", env="VBATCH_OUTPUT_ROOT",
        help="Refuse any output directory that does not resolve inside DIR (symlinks and .. "
             "followed); for shared job servers.")
    resume: bool = option(
        False, fingerprint=False,
        help="Continue a killed job in its output directory: committed rows are kept and "
             "skipped, only the rest is computed.")
    force: bool = option(
        False, fingerprint=False,
        help="With --resume: resume even if the inputs, model or generation settings differ "
             "from the run that wrote the directory.")
    max_replica_restarts: int = option(
        3, checks=at_least(0, INT64_MAX), fingerprint=False,
        help="Restart a replica that dies at most this many times (its unfinished rows are "
             "retried) before the job fails.")
    input_format: str = option(
        "auto", choices=INPUT_FORMAT_CHOICES,
        help="rows: each input row is a prompt; openai: OpenAI batch files, one request "
             '{"custom_id", "method", "url", "body"} a line (custom_id is the row id); auto: '
             "openai when the JSON lines have custom_id, url and body, else rows.")
    output_format: str = option(
        "parquet", choices=OUTPUT_FORMAT_CHOICES,
        help="parquet: Parquet part files; openai: OpenAI batch output JSON lines part files "
             "(part-*.jsonl, one line per request; needs OpenAI batch input).")
    prompt_column: str = option(
        "prompt", checks=not_blank("a non-empty column name"),
        help="Input column holding the prompt text. A `messages` column (list of role/content) "
             "is used, chat-templated, when this column is absent.")
    id_column: str = option(
        "id", checks=not_blank("a non-empty column name"),
        help="Input column holding the row key. If absent, a stable key '<file>:<row number>' "
             "is derived and written as `id`.")
    csv_infer_types: bool = option(
        False,
        help="Infer the types of CSV columns (numbers, booleans) instead of keeping every cell "
             "as text; text keeps codes such as zip 02134 intact.")
    allow_type_promotion: bool = option(
        False,
        help="Convert a column whose type differs between input files (or blocks of one text "
             "file) to one type (int64 + double -> double, int + text -> text) instead of "
             "refusing the job. Lossless differences (int32 + int64, missing values) are "
             "always combined.")
    chat: bool = option(False, negatable=True,
                        help="Apply the model's chat template to each prompt.")
    on_long_prompt: str = option(
        "error", choices=ON_LONG_PROMPT_CHOICES, env="VBATCH_ON_LONG_PROMPT",
        help="A prompt with no room to generate within max-model-len: error = write the row "
             "with `error` set; truncate = keep its last tokens, leaving room for max-tokens.")
    max_error_rate: float | None = option(
        None, checks=in_range(0, 1), metavar="R", env="VBATCH_MAX_ERROR_RATE", fingerprint=False,
        help="Fail the job (exit code 3, no _SUCCESS) when more than this fraction of rows "
             "(0..1) errored. Default: no limit; error rows are written and the job succeeds.")
    rows_per_file: int = option(10_000, checks=at_least(1, INT64_MAX), fingerprint=False,
                                help="Rows per output Parquet part file.")
    commit_interval_s: float = option(
        30.0, checks=greater_than(0), metavar="SECONDS", fingerprint=False,
        help="Commit the rows written so far as a part file at least this often, even before "
             "--rows-per-file rows are buffered, so a killed job loses at most this much work "
             "(--resume continues from there).")
    batch_size: int = option(1024, checks=at_least(1, INT64_MAX), fingerprint=False,
                             help="Rows read from the input per batch handed to the engine.")
    runner: str = option(
        "auto", choices=RUNNER_CHOICES, fingerprint=False,
        help="Where the replicas run. ray: Ray Data actors (a private local Ray when no cluster "
             "address is given); local: processes on this node; auto: ray when Ray is "
             "installed and a cluster address is set or the job needs more GPUs than this node "
             "has, else local.")
    ray_address: str | None = option(
        None, metavar="ADDRESS", env="RAY_ADDRESS", fingerprint=False,
        checks=_not_empty_if_given(" (leave it out to start a private local Ray)"),
        help="Address of a running Ray cluster (e.g. HEAD:6379 or ray://HEAD:10001).")
    replicas: int | None = option(
        None, flags=("--data-parallel-size", "-dp"), checks=at_least(1, MAX_REPLICAS),
        fingerprint=False,
        help="Engine replicas (each over its own tp x pp devices) working through the dataset. "
             "Default: as many as fit on this node's GPUs, 1 on CPU.")
    preserve_order: bool = option(
        False, fingerprint=False,
        help="Write output rows in input order (default: in completion order; the id column "
             "says which row is which).")
    # Structured outputs (at most one kind; `JobConfig.structured_outputs_params` builds the
    # engine's StructuredOutputsParams). A per-row `structured_outputs` column overrides it.
    choice: list[str] = option(
        default_factory=list, metavar="LABEL", checks=non_empty_strings,
        help="Constrain every output to exactly one of these labels (repeatable: --choice yes "
             "--choice no).")
    regex: str | None = option(
        None, metavar="PATTERN", checks=_not_empty_if_given(),
        help="Constrain every output to match this regular expression (in full).")
    json_schema: str | None = option(
        None, metavar="FILE_OR_JSON", checks=_not_empty_if_given(),
        help="Constrain every output to JSON valid under this JSON schema: a .json file or "
             "the schema as inline JSON text (in YAML also a mapping).")
    grammar: str | None = option(
        None, metavar="FILE_OR_EBNF", checks=_not_empty_if_given(),
        help="Constrain every output to this EBNF grammar (GBNF style, a `root ::= ...` "
             "rule): a file or the grammar text.")
    json_object: bool = option(
        False, help="Constrain every output to a JSON object (any keys).")
    disable_any_whitespace: bool = option(
        False, help="With --json-schema / --json-object: compact JSON, no free whitespace "
                    "between tokens (models that ramble in whitespace then still finish).")
