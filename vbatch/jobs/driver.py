"""The driver of a replicated job: replicas generate, this process alone writes.

`run_replicated` does what `run_job` does for one in-process engine, for a pool of replicas
(`local_runner.LocalReplicaPool`: processes on this node; `ray_runner.RayReplicaPool`: Ray Data
actors): check the inputs and output path and resolve the model once (before any replica
starts, so a bad flag fails in seconds and a GGUF is converted once), start the pool, write
every output batch it yields with our `ParquetPartWriter` (the pool never writes), check the
error budget, then `_run_summary.json`, `_manifest.json` and `_SUCCESS` last. The pool is a
context manager: leaving it, on success, error, Ctrl-C or SIGTERM, stops every replica and its
workers.

A pool offers `outputs(job, reporter)` (an iterator of output batches with the columns of
`job.out_schema`), `model_info` (the manifest's model entry), `counters()` (one
`ReplicaCounters` per replica once they are done), `replica_stats()` (per-replica dicts for the
summary) and `load_time_s`.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from vbatch.io.positions import POSITION_COLUMN, IntervalSet

from vbatch.jobs.config import JobConfig
from vbatch.jobs.plan import JobPlan
from vbatch.jobs.progress import JobStats, ProgressReporter


@dataclass(frozen=True)
class JobInputs:
    """The checked inputs of a job: files, the root of their row keys (None: the reader's
    default), the scan (schemas), the prompt column actually used, the output schema, the total
    row count when cheap to know, and the output directory (checked, not yet created)."""

    files: list[Path]
    root: Path | None
    scan: object
    prompt_column: str
    out_schema: pa.Schema
    total_rows: int | None
    output_dir: Path
    skip: object = None          # IntervalSet of positions committed earlier (--resume)


def check_job_inputs(config: JobConfig) -> JobInputs:
    """Resolve and scan the inputs and check the output path (no model, nothing written).
    Raises InputError / VBatchUsageError."""
    from vbatch.io import inputs, reader, writer
    from vbatch.io.schema import output_schema

    files = inputs.resolve_input_files(config.input)
    output_dir = Path(config.output) if config.output else writer.default_output_dir(config.input)
    writer.check_output_dir(output_dir, overwrite=config.overwrite, resume=config.resume,
                            root=config.output_root)
    scan = reader.scan_inputs(files, prompt_column=config.prompt_column,
                              id_column=config.id_column)
    prompt_column = reader.prompt_column_of(scan.schema, config.prompt_column)
    return JobInputs(files=files, root=inputs.input_root(config.input), scan=scan,
                     prompt_column=prompt_column, out_schema=output_schema(scan.schema),
                     total_rows=reader.count_rows(files), output_dir=output_dir)


class OutputTally:
    """What has been written so far, read from the output batches themselves: row, error-row
    and token counts (the `RowCounts` an `ErrorBudget` checks while the job runs), and the
    positions written. `accept` drops rows whose positions were already written, so a batch a
    restarted replica or a Ray task retry computes twice is still written once."""

    def __init__(self) -> None:
        self.num_rows = 0
        self.num_error_rows = 0
        self.num_prompt_tokens = 0
        self.num_output_tokens = 0
        self.num_duplicate_rows = 0
        self.first_error: str | None = None
        self.written = IntervalSet()

    def accept(self, batch: pa.RecordBatch, id_column: str) -> pa.RecordBatch:
        """`batch` without rows already written; counts what it returns."""
        from vbatch.io.schema import ERROR, NUM_GENERATED_TOKENS, NUM_PROMPT_TOKENS

        if POSITION_COLUMN in batch.schema.names:
            positions = batch.column(POSITION_COLUMN).to_numpy(zero_copy_only=False)
            seen = self.written.contains(positions)
            if seen.any():
                self.num_duplicate_rows += int(seen.sum())
                batch = batch.filter(pa.array(~seen))
                positions = positions[~seen]
            self.written.add_positions(positions)
        self.num_rows += batch.num_rows
        for name, attribute in ((NUM_PROMPT_TOKENS, "num_prompt_tokens"),
                                (NUM_GENERATED_TOKENS, "num_output_tokens")):
            if name in batch.schema.names and batch.num_rows:
                total = pc.sum(batch.column(name)).as_py() or 0
                setattr(self, attribute, getattr(self, attribute) + total)
        if ERROR not in batch.schema.names:
            return batch
        errors = batch.column(ERROR)
        num_errors = batch.num_rows - errors.null_count
        if num_errors and self.first_error is None:
            row = pc.index(pc.is_valid(errors), True).as_py()
            key = batch.column(id_column)[row].as_py()
            self.first_error = f"row {key}: {errors[row].as_py()}"
        self.num_error_rows += num_errors
        return batch


def run_replicated(config: JobConfig, plan: JobPlan, reporter: ProgressReporter) -> JobStats:
    """Run `config` on the replicas of `plan` (see module docstring); returns the statistics.
    Raises what `run_job` raises."""
    from vbatch.engine.loader import resolve_model
    from vbatch.errors import TooManyRowErrors
    from vbatch.io import writer
    from vbatch.jobs.row_errors import ErrorBudget
    from vbatch.jobs.run_summary import build_run_summary, merge_counters
    from vbatch.jobs.commit import model_identity, prepare_commit
    from vbatch.jobs.runner import build_manifest

    started = time.perf_counter()
    started_at = datetime.now(timezone.utc)
    job = check_job_inputs(config)
    resolved = resolve_model(config.model, allow_pickle=config.allow_pickle,
                             trust_remote_code=config.trust_remote_code)
    commit = prepare_commit(config, job.files, job.output_dir, model_identity(resolved))
    num_resumed = commit.resumed.num_committed_rows
    job = dataclasses.replace(job, skip=commit.skip, total_rows=None if job.total_rows is None
                              else job.total_rows - num_resumed)
    budget = ErrorBudget(config.max_error_rate, job.total_rows)
    tally = OutputTally()
    with _make_pool(config, plan) as pool:
        reporter.start(job.total_rows)
        part_writer = None
        try:
            for batch in pool.outputs(job, reporter):
                if part_writer is None:   # the first result: every replica loaded fine
                    part_writer = _open_writer(config, job, commit)
                batch = tally.accept(batch, config.id_column)
                part_writer.write(batch)
                budget.check_progress(tally)
            if part_writer is None:
                part_writer = _open_writer(config, job, commit)
            # Counts from what was written: exact even when a replica died and was restarted
            # (its own counters died with it).
            counters = dataclasses.replace(
                merge_counters(pool.counters()), num_rows=tally.num_rows,
                num_error_rows=tally.num_error_rows, num_prompt_tokens=tally.num_prompt_tokens,
                num_output_tokens=tally.num_output_tokens)
            budget.check_final(counters)
        except TooManyRowErrors:
            part_writer.close()           # keep the rows so far, error rows included
            raise
        except BaseException:
            if part_writer is not None:
                part_writer.abort()
            raise
        reporter.close()
        part_writer.close()
        if job.total_rows is not None and tally.num_rows != job.total_rows:
            raise RuntimeError(f"{job.total_rows} input rows to compute but {tally.num_rows} "
                               "were written; not committing")
        stats = JobStats(num_rows=counters.num_rows, num_prompt_tokens=counters.num_prompt_tokens,
                         num_output_tokens=counters.num_output_tokens,
                         wall_time_s=time.perf_counter() - started,
                         output_dir=str(job.output_dir), model=pool.model_info["source"],
                         dtype=pool.model_info["dtype"], load_time_s=pool.load_time_s,
                         num_part_files=len(part_writer.part_files),
                         num_error_rows=counters.num_error_rows, runner=plan.runner,
                         num_replicas=plan.num_replicas, num_resumed_rows=num_resumed)
        writer.write_json_file(job.output_dir, writer.SUMMARY_FILE, build_run_summary(
            config, plan, stats, started_at=started_at, replicas=pool.replica_stats()))
        part_writer.commit(build_manifest(config, pool.model_info, counters, job.files,
                                          num_resumed_rows=num_resumed))
    return stats


def _make_pool(config: JobConfig, plan: JobPlan):
    if plan.runner == "ray":
        from vbatch.jobs.ray_runner import RayReplicaPool
        return RayReplicaPool(config, plan)
    from vbatch.jobs.local_runner import LocalReplicaPool
    return LocalReplicaPool(config, plan)


def _open_writer(config: JobConfig, job: JobInputs, commit):
    from vbatch.jobs.commit import open_writer
    return open_writer(config, job.output_dir, job.out_schema, commit)
