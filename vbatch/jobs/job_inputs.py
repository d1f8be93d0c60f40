"""A job's checked inputs: the files, their scan, the prompt column, the output directory.

`check_job_inputs` does everything that can fail on the user's data or paths before a model
loads (exit code 2 in seconds, not after a long load): resolve INPUT to files, decide the input
format (rows, or OpenAI batch files: their custom_id is the row id and must be unique), check
the output path, scan every file's schema. Every replica pool reads its batches through
`JobInputs.batches`, so rows, types, row keys and positions are the same on every runner.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from vbatch.errors import VBatchUsageError
from vbatch.io import inputs, reader
from vbatch.io.formats import count_rows, detect_input_format
from vbatch.io.input_file import InputFile
from vbatch.io.openai_batch import BODY, CUSTOM_ID, OPENAI, duplicate_custom_ids
from vbatch.io.output_dir import check_output_dir, default_output_dir, output_path
from vbatch.io.positions import IntervalSet
from vbatch.io.schema import OutputColumns, output_schema
from vbatch.jobs.config import JobConfig
from vbatch.jobs.row_prompts import RowPrompts
from vbatch.storage.filesystem import parse_storage_options


@dataclass(frozen=True)
class JobInputs:
    """The checked inputs of a job: files, the root of their row keys (None: the reader's
    default), the scan (schemas), the prompt column actually used, the output schema (its
    optional columns, `output_columns`, decided here once for the whole job), the
    number of rows to compute when cheap to know, the output directory (checked, not yet
    created) and the row positions an earlier run already committed (`--resume`). `config`:
    the job's config with its input format resolved (`auto` -> rows or openai; for OpenAI
    batch files the row id is `custom_id`): what every replica pool must run."""

    config: JobConfig
    files: list[InputFile]
    root: Path | str | None
    scan: reader.InputScan
    prompt_column: str
    out_schema: pa.Schema
    total_rows: int | None
    output_dir: Path | str
    skip: IntervalSet | None = None

    def batches(self, config: JobConfig) -> Iterator[pa.RecordBatch]:
        """The input rows still to compute, in batches of `config.batch_size`, with the hidden
        position column (io/positions.py)."""
        return reader.read_batches(self.files, batch_size=config.batch_size,
                                   prompt_column=config.prompt_column,
                                   id_column=config.id_column, root=self.root, scan=self.scan,
                                   with_positions=True, skip=self.skip)


def output_dir_of(config: JobConfig) -> Path | str:
    """The job's output directory: `--output` (a local Path, `file://` too, or an object-store
    URI kept as a str), else named after the input."""
    return output_path(config.output) if config.output else default_output_dir(config.input)


def output_columns(config: JobConfig, input_schema: pa.Schema) -> OutputColumns:
    """The optional output columns of the job `config` over inputs of `input_schema`: the
    rule every replica applies to its batches too (`Replica.output_columns`)."""
    return OutputColumns.for_job(n=config.n, logprobs=config.logprobs,
                                 prompt_logprobs=config.prompt_logprobs,
                                 input_names=input_schema.names,
                                 openai_requests=config.input_format == OPENAI)


def resolve_input_format(config: JobConfig, files: list[InputFile]) -> JobConfig:
    """`config` with `input_format` rows or openai (`auto` decided from `files`); OpenAI batch
    files get `custom_id` as their id column. Raises VBatchUsageError for `--output-format
    openai` over row files, InputError for files of both kinds."""
    input_format = detect_input_format(files, config.input_format)
    if config.output_format == OPENAI and input_format != OPENAI:
        raise VBatchUsageError("--output-format openai writes OpenAI batch output, one line "
                               "per request: it needs OpenAI batch files as input "
                               '(lines {"custom_id", "method", "url", "body"})')
    if input_format == OPENAI:
        return dataclasses.replace(config, input_format=OPENAI, id_column=CUSTOM_ID)
    return dataclasses.replace(config, input_format=input_format)


def check_job_inputs(config: JobConfig) -> JobInputs:
    """Resolve and scan the inputs and check the output path (no model, nothing written).
    Raises InputError / VBatchUsageError (duplicate custom_ids of OpenAI batch files too)."""
    storage_options = parse_storage_options(config.storage_options)
    files = inputs.resolve_input_files(config.input, storage_options)
    config = resolve_input_format(config, files)
    output_dir = output_dir_of(config)
    check_output_dir(output_dir, overwrite=config.overwrite, resume=config.resume,
                     root=config.output_root, storage_options=storage_options)
    scan = reader.scan_inputs(files, prompt_column=config.prompt_column,
                              id_column=config.id_column, csv_infer_types=config.csv_infer_types,
                              allow_type_promotion=config.allow_type_promotion,
                              input_format=config.input_format)
    if config.input_format == OPENAI:
        prompt_column = BODY
        duplicate = duplicate_custom_ids(files)
        if duplicate is not None:
            raise VBatchUsageError(
                f"custom_id {duplicate[0]!r} appears more than once in the input "
                f"({duplicate[1]} repeated custom_ids); each request needs its own custom_id")
    else:
        prompt_column = reader.prompt_column_of(scan.schema, config.prompt_column)
        # checked now, before any model loads (every replica builds the same)
        RowPrompts(prompt_column, config.id_column, config.chat, config.on_long_prompt)
    out_schema = output_schema(scan.schema, output_columns(config, scan.schema))
    return JobInputs(config=config, files=files,
                     root=inputs.input_root(config.input, storage_options), scan=scan,
                     prompt_column=prompt_column, out_schema=out_schema,
                     total_rows=count_rows(files), output_dir=output_dir)
