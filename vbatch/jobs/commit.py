"""How a job commits its output: fingerprint, resume, the part writer and the final manifest.

`prepare_commit` runs before any model loads: it fingerprints the job (io/manifest.py) and,
with `--resume`, reads what an earlier run committed (refusing a different job unless
`--force`). `open_writer` creates the part writer that records every committed part, with the
positions of its rows, in the commit log as it goes (one small record per part,
io/commit_log.py), so a job killed at any point can be resumed. The readers then skip
`commit.skip` (the committed positions). `build_manifest` is the finished job's manifest
content.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import torch
import transformers

import vbatch
from vbatch.io.directory import OutputDirectory
from vbatch.io.fingerprint import job_fingerprint
from vbatch.io.manifest import FINGERPRINT_KEY, ResumeState, load_resume_state
from vbatch.io.output_dir import clear_output_dir
from vbatch.io.parts import ParquetPartWriter
from vbatch.io.positions import IntervalSet
from vbatch.jobs.config import FINGERPRINT_FIELDS, JobConfig
from vbatch.jobs.openai_output import PART_SUFFIX, write_output_lines
from vbatch.jobs.replica import ReplicaCounters


@dataclass
class JobCommit:
    """The fingerprint of this job and what earlier runs already committed."""

    fingerprint: dict
    resumed: ResumeState = field(default_factory=ResumeState)

    @property
    def skip(self) -> IntervalSet | None:
        """Committed row positions, or None when there are none."""
        return self.resumed.committed if len(self.resumed.committed) else None


def generation_settings(config: JobConfig) -> dict:
    """The settings of `config` that are part of the job fingerprint (the options declared
    with `fingerprint=True`)."""
    values = config.to_dict()
    return {name: values[name] for name in FINGERPRINT_FIELDS}


def prepare_commit(config: JobConfig, files: list[Path], output: OutputDirectory,
                   model_identity: dict) -> JobCommit:
    """Fingerprint the job; with `config.resume`, load what the job's locked directory `output`
    already holds (through the handle: its path is never used).
    `model_identity`: the resolved model's source and fingerprint. Raises VBatchUsageError."""
    fingerprint = job_fingerprint(files=files, model=model_identity,
                                  generation=generation_settings(config),
                                  vbatch_version=vbatch.__version__)
    if not config.resume:
        return JobCommit(fingerprint)
    return JobCommit(fingerprint, load_resume_state(output, fingerprint, force=config.force))


def model_identity(resolved_model) -> dict:
    """The fingerprint's model entry for a `resolve_model` result."""
    return {"source": resolved_model.source, "fingerprint": resolved_model.fingerprint}


def open_writer(config: JobConfig, output: OutputDirectory, schema: pa.Schema,
                commit: JobCommit) -> ParquetPartWriter:
    """The `ParquetPartWriter` of this job, writing through the job's locked directory handle
    `output`: a fresh (or overwritten) directory, or the resumed one with its committed parts
    kept. Either way `_SUCCESS` is gone and the commit log has started (its checkpoint holds
    the fingerprint and the committed parts) before any part is written (see
    `ParquetPartWriter`). With `--output-format openai` its parts are OpenAI batch
    output JSON lines (jobs/openai_output.py), committed the same way."""
    if not config.resume:
        clear_output_dir(output, overwrite=config.overwrite)
    part_format = {}
    if config.output_format == "openai":
        part_format = {"write_part": write_output_lines, "suffix": PART_SUFFIX}
    return ParquetPartWriter(output, rows_per_file=config.rows_per_file, schema=schema,
                             existing_parts=commit.resumed.parts,
                             job_info={FINGERPRINT_KEY: commit.fingerprint}, **part_format)


def build_manifest(config: JobConfig, model: dict, counters: ReplicaCounters, files, *,
                   resumed: ResumeState | None = None) -> dict:
    """The `_manifest.json` content (the writer adds the fingerprint and the part list).
    `model`: the pool's `model_info`; `counters`: this run's merged `ReplicaCounters`;
    `resumed`: what earlier runs of a resumed job committed.

    `counts` are the job's totals (earlier runs' committed rows included), with
    `resumed_rows` (committed by earlier runs) and `this_run` (what this run computed);
    `rows` are input rows and `output_rows` the output's rows (one per sample);
    `truncated_rows` and `prompt_prefills` are known for this run only (the part files do not
    record them)."""
    resumed = resumed or ResumeState()
    this_run = {"rows": counters.num_rows, "output_rows": counters.num_output_rows,
                "error_rows": counters.num_error_rows,
                "truncated_rows": counters.num_truncated_rows,
                "prompt_tokens": counters.num_prompt_tokens,
                "output_tokens": counters.num_output_tokens,
                "prompt_prefills": counters.num_prompt_prefills}
    return {
        "vbatch_version": vbatch.__version__,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "finished_at": datetime.now(timezone.utc).isoformat(),
        "config": config.to_dict(),
        "model": dict(model),
        "input_files": [str(f) for f in files],
        "counts": {"rows": resumed.num_committed_rows + counters.num_rows,
                   "resumed_rows": resumed.num_committed_rows,
                   "output_rows": resumed.num_output_rows + counters.num_output_rows,
                   "error_rows": resumed.num_error_rows + counters.num_error_rows,
                   "truncated_rows": counters.num_truncated_rows,
                   "prompt_tokens": resumed.num_prompt_tokens + counters.num_prompt_tokens,
                   "output_tokens": resumed.num_output_tokens + counters.num_output_tokens,
                   "this_run": this_run},
    }
