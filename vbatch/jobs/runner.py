"""`run_job`: the one job pipeline, from input files to a committed Parquet output directory.

Order of work, the same for every runner:

1. check the inputs and the output path; lock the output directory for the whole job (a
   second job on it is refused), hold it open (every write goes through that handle, so a
   path swapped after the checks cannot redirect them) and check it is writable; resolve the
   model once (all before any replica starts, so a bad flag fails in seconds and a GGUF is
   converted once);
2. fingerprint the job and, with `--resume`, read what earlier runs committed;
3. start the replica pool the plan asks for (`jobs/pool.py`: in this process, local
   processes, or Ray actors) and write every output batch it yields with our part writer (this
   process is the only writer; rows arrive as they finish, and buffered rows are committed
   as a part at least every `--commit-interval-s`), counting what is written and checking
   the error budget; on the Ray runner with an object-store output the replicas write the
   parts themselves and the pool yields only their part entries (jobs/ray_parts.py), which
   the part writer commits (opened before the replicas start, so their parts are not
   cleared by `--overwrite`), the tally counting each part once; part files nothing
   committed (a killed replica's) are removed at the end;
4. refuse to commit when the input rows written differ from the rows to compute (a row
   sampled n times is one input row, its n output rows written together);
5. `_run_summary.json`, `_manifest.json`, and `_SUCCESS` last.

Any failure leaves no `_SUCCESS` (and no temporary files). Bad rows become error rows; when
more of them than `--max-error-rate` allows, the rows so far are flushed to part files and
`TooManyRowErrors` is raised (no `_SUCCESS`).
"""
from __future__ import annotations

import dataclasses
import time
from datetime import datetime, timezone

from vbatch.engine.loader import resolve_model
from vbatch.errors import TooManyRowErrors
from vbatch.io.output_dir import SUMMARY_FILE, JobDirectory, locked_output_dir
from vbatch.jobs.commit import build_manifest, model_identity, open_writer, prepare_commit
from vbatch.jobs.config import JobConfig
from vbatch.jobs.job_inputs import JobInputs, check_job_inputs
from vbatch.jobs.output_tally import (
    OutputTally,
    count_ids,
    output_filesystem,
    output_part_files,
)
from vbatch.jobs.plan import JobPlan, local_resources, make_plan
from vbatch.jobs.pool import make_pool
from vbatch.jobs.progress import JobStats, ProgressReporter
from vbatch.jobs.ray_parts import WrittenParts
from vbatch.jobs.row_errors import ErrorBudget
from vbatch.jobs.run_summary import build_run_summary, merge_counters
from vbatch.storage.filesystem import parse_storage_options


def run_job(config: JobConfig, reporter: ProgressReporter) -> JobStats:
    """Run the job described by `config` (see module docstring); returns its statistics.

    Raises ValueError subclasses for anything the user can fix (bad input, bad model, output
    directory not empty), `TooManyRowErrors` past `--max-error-rate`, and other exceptions
    for internal failures.
    """
    started = time.perf_counter()
    started_at = datetime.now(timezone.utc)
    plan = make_plan(config, local_resources())
    job = check_job_inputs(config)
    config = job.config      # the input format resolved: what the replicas run
    # Locked, held open and probed before the model resolves, so a second job on the same
    # directory or an unwritable one fails in seconds; every write goes through `output`.
    with locked_output_dir(job.output_dir, root=config.output_root,
                           storage_options=parse_storage_options(config.storage_options)
                           ) as output:
        return _run_locked(config, reporter, plan, job, output, started=started,
                           started_at=started_at)


def _commit_on_time(part_writer, committed: tuple[float, int],
                    interval_s: float) -> tuple[float, int]:
    """Flush `part_writer`'s buffered rows as a part when `interval_s` passed since the last
    part (`committed`: when, and how many parts this run had by then); the new `committed`."""
    now, num_parts = time.monotonic(), len(part_writer.part_files)
    if num_parts != committed[1]:                   # a full part was just written
        return now, num_parts
    if now - committed[0] < interval_s:
        return committed
    part_writer.flush()
    return now, len(part_writer.part_files)


def _commit_written_parts(part_writer, tally: OutputTally, written: WrittenParts) -> None:
    """Commit each part a replica wrote, unless the tally refuses it (its positions are
    committed already: a retried block whose first attempt's part arrived too; its file stays
    an orphan, removed at the end)."""
    for report in written.reports:
        if tally.accept_part(report["entry"], report.get("first_error")):
            part_writer.commit_written_part(report["entry"])


def _run_locked(config: JobConfig, reporter: ProgressReporter, plan: JobPlan, job: JobInputs,
                output: JobDirectory, *, started: float, started_at: datetime) -> JobStats:
    """`run_job` from the model on, writing only through the locked directory `output`."""
    resolved = resolve_model(config.model, allow_pickle=config.allow_pickle,
                             trust_remote_code=config.trust_remote_code,
                             storage_options=config.storage_options)
    commit = prepare_commit(config, job.files, output, model_identity(resolved))
    earlier = commit.resumed
    num_resumed = earlier.num_committed_rows
    # The budget covers the whole job: all input rows, earlier runs' committed rows included.
    budget = ErrorBudget(config.max_error_rate, job.total_rows, earlier_rows=num_resumed,
                         earlier_error_rows=earlier.num_error_rows)
    budget.check_start()
    job = dataclasses.replace(job, skip=commit.skip, total_rows=None if job.total_rows is None
                              else job.total_rows - num_resumed)
    tally = OutputTally(committed_before=commit.skip)
    with make_pool(config, plan, started=started) as pool:
        part_writer = None
        # Pools whose replicas write the parts (jobs/ray_parts.py) need the writer first.
        replicas_write = getattr(pool, "writes_parts", lambda job: False)(job)
        try:
            if replicas_write:
                part_writer = open_writer(config, output, job.out_schema, commit)
            committed = (time.monotonic(), 0)       # when, and parts written by then
            for batch in pool.outputs(job, reporter):
                if isinstance(batch, WrittenParts):
                    _commit_written_parts(part_writer, tally, batch)
                    budget.check_progress(tally)
                elif batch.num_rows:      # pools also yield empty batches while rows run
                    if part_writer is None:   # the first result: every replica loaded fine
                        part_writer = open_writer(config, output, job.out_schema, commit)
                    batch = tally.accept(batch, config.id_column)
                    part_writer.write(batch)
                    budget.check_progress(tally)
                if part_writer is not None:
                    committed = _commit_on_time(part_writer, committed,
                                                config.commit_interval_s)
            if part_writer is None:
                part_writer = open_writer(config, output, job.out_schema, commit)
            # Counts from what was written: exact even when a replica died and was restarted
            # (its own counters died with it).
            counters = dataclasses.replace(
                merge_counters(pool.counters()), num_rows=tally.num_rows,
                num_output_rows=tally.num_output_rows, num_error_rows=tally.num_error_rows,
                num_prompt_tokens=tally.num_prompt_tokens,
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
        if replicas_write:      # every replica is done: what no record names is an orphan
            part_writer.remove_uncommitted_parts()
        # Input rows (distinct positions), not output rows: a row sampled n times is one.
        if job.total_rows is not None and tally.num_rows != job.total_rows:
            raise RuntimeError(f"{job.total_rows} input rows to compute but {tally.num_rows} "
                               "were written; not committing")
        ids = count_ids(output_part_files(output), config.id_column,
                        filesystem=output_filesystem(output))
        id_warning = ids.warning(config.id_column)
        # The job's totals: this run's rows plus the rows earlier runs committed.
        stats = JobStats(num_rows=num_resumed + counters.num_rows,
                         num_prompt_tokens=earlier.num_prompt_tokens + counters.num_prompt_tokens,
                         num_output_tokens=earlier.num_output_tokens + counters.num_output_tokens,
                         wall_time_s=time.perf_counter() - started,
                         output_dir=str(part_writer.output_dir),
                         model=pool.model_info["source"], dtype=pool.model_info["dtype"],
                         load_time_s=pool.load_time_s,
                         num_part_files=len(earlier.parts) + len(part_writer.part_files),
                         num_error_rows=earlier.num_error_rows + counters.num_error_rows,
                         runner=plan.runner, num_replicas=plan.num_replicas,
                         num_resumed_rows=num_resumed,
                         num_resumed_error_rows=earlier.num_error_rows,
                         num_resumed_prompt_tokens=earlier.num_prompt_tokens,
                         num_resumed_output_tokens=earlier.num_output_tokens,
                         num_duplicate_ids=ids.duplicate_ids, num_null_ids=ids.null_ids,
                         warnings=() if id_warning is None else (id_warning,))
        summary = build_run_summary(
            config, plan, stats, started_at=started_at, replicas=pool.replica_stats(),
            output_rows=earlier.num_output_rows + counters.num_output_rows,
            this_run_output_rows=counters.num_output_rows,
            prompt_prefills=counters.num_prompt_prefills,
            prefill_tokens=counters.num_prefill_tokens)
        if hasattr(pool, "transfer_stats"):     # the Ray pool: what reached the driver
            summary["transfer"] = pool.transfer_stats()
        output.write_json(SUMMARY_FILE, summary)
        part_writer.commit(build_manifest(config, pool.model_info, counters, job.files,
                                          resumed=earlier))
    return stats
