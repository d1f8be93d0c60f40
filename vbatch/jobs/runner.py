"""`run_job`: one batch job from input files to a committed Parquet output directory.

Order of work: check the output path and scan the inputs once (before any model loads), load the
engine, stream batches through the replica, write part files atomically, then the manifest and
`_SUCCESS` last. Any failure leaves no `_SUCCESS` (and no temporary files). Bad rows become
error rows; when more of them than `--max-error-rate` allows, the rows so far are flushed to
part files and `TooManyRowErrors` is raised (no manifest, no `_SUCCESS`).

The plan (`jobs/plan.py`) decides where the job runs: one local replica runs here, in this
process (the fast path below); several replicas, or the Ray runner, go through
`jobs/driver.py`, which writes the same output from replica processes or Ray actors.
`build_replica`, `model_info` and `build_manifest` are shared by every runner.
"""
from __future__ import annotations

import dataclasses
import time
from datetime import datetime, timezone

from vbatch.jobs.config import JobConfig
from vbatch.jobs.progress import JobStats, ProgressReporter
from vbatch.jobs.run_summary import build_run_summary


def run_job(config: JobConfig, reporter: ProgressReporter) -> JobStats:
    """Run the job described by `config`; returns its statistics.

    Raises ValueError subclasses for anything the user can fix (bad input, bad model, output
    directory not empty), `TooManyRowErrors` past `--max-error-rate`, and other exceptions
    for internal failures.
    """
    from vbatch.io import reader, writer
    from vbatch.jobs.plan import local_resources, make_plan

    started = time.perf_counter()
    started_at = datetime.now(timezone.utc)
    plan = make_plan(config, local_resources())
    if plan.runner == "ray" or plan.num_replicas > 1:
        from vbatch.jobs.driver import run_replicated
        return run_replicated(config, plan, reporter)
    from vbatch.jobs.driver import check_job_inputs
    job = check_job_inputs(config)
    files, output_dir, scan = job.files, job.output_dir, job.scan
    prompt_column, out_schema = job.prompt_column, job.out_schema

    from vbatch.engine.loader import resolve_model
    from vbatch.jobs.commit import model_identity, open_writer, prepare_commit
    resolved = resolve_model(config.model, allow_pickle=config.allow_pickle,
                             trust_remote_code=config.trust_remote_code)
    commit = prepare_commit(config, files, output_dir, model_identity(resolved))

    from vbatch.engine.llm_engine import LLMEngine
    from vbatch.errors import TooManyRowErrors
    from vbatch.jobs.row_errors import ErrorBudget
    engine = LLMEngine(config.engine_config())
    try:
        load_time = time.perf_counter() - started
        replica = build_replica(config, engine, prompt_column)
        total_rows = job.total_rows
        num_resumed = commit.resumed.num_committed_rows
        if total_rows is not None:
            total_rows -= num_resumed
        budget = ErrorBudget(config.max_error_rate, total_rows)
        reporter.start(total_rows)
        batches = reader.read_batches(files, batch_size=config.batch_size,
                                      prompt_column=config.prompt_column,
                                      id_column=config.id_column,
                                      root=job.root, scan=scan,
                                      with_positions=True, skip=commit.skip)
        with open_writer(config, output_dir, out_schema, commit) as part_writer:
            output_dir = part_writer.output_dir
            counters = replica.counters
            try:
                for out_batch in replica.process(batches, on_progress=reporter.update):
                    part_writer.write(out_batch)
                    budget.check_progress(counters)
                budget.check_final(counters)
            except TooManyRowErrors:
                part_writer.close()         # keep the rows so far, error rows included
                raise
            reporter.close()
            part_writer.close()
            stats = JobStats(num_rows=counters.num_rows,
                             num_prompt_tokens=counters.num_prompt_tokens,
                             num_output_tokens=counters.num_output_tokens,
                             wall_time_s=time.perf_counter() - started,
                             output_dir=str(output_dir), model=engine.resolved_model.source,
                             dtype=_dtype_name(engine), load_time_s=load_time,
                             num_part_files=len(part_writer.part_files),
                             num_error_rows=counters.num_error_rows,
                             num_resumed_rows=num_resumed)
            replicas = [{"index": 0, "state": "done", **dataclasses.asdict(counters)}]
            writer.write_json_file(output_dir, writer.SUMMARY_FILE, build_run_summary(
                config, plan, stats, started_at=started_at, replicas=replicas))
            part_writer.commit(build_manifest(config, model_info(engine), counters, files,
                                              num_resumed_rows=num_resumed))
    finally:
        engine.shutdown()       # no worker process outlives the job
    return stats


def build_replica(config: JobConfig, engine, prompt_column: str):
    """The `Replica` that drives `engine` for this job (every runner builds it here)."""
    from vbatch.jobs.replica import Replica, RowPrompts
    return Replica(engine, config.sampling_params(),
                   RowPrompts(prompt_column, config.id_column, config.chat,
                              on_long_prompt=config.on_long_prompt))


def model_info(engine) -> dict:
    """The manifest's `model` entry for a loaded engine: source, fingerprint, dtype."""
    return {"source": engine.resolved_model.source,
            "fingerprint": engine.resolved_model.fingerprint,
            "dtype": _dtype_name(engine)}


def _dtype_name(engine) -> str:
    name = str(engine.dtype).removeprefix("torch.")
    return f"{name} (auto)" if engine.config.dtype == "auto" else name


def build_manifest(config: JobConfig, model: dict, counters, files, *,
                   num_resumed_rows: int = 0) -> dict:
    """The `_manifest.json` content (the writer adds the fingerprint and the part list).
    `model`: `model_info()`; `counters`: this run's (merged) `ReplicaCounters`;
    `num_resumed_rows`: rows committed by earlier runs of a resumed job."""
    import torch
    import transformers

    import vbatch
    return {
        "vbatch_version": vbatch.__version__,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "finished_at": datetime.now(timezone.utc).isoformat(),
        "config": config.to_dict(),
        "model": dict(model),
        "input_files": [str(f) for f in files],
        "counts": {"rows": counters.num_rows, "resumed_rows": num_resumed_rows,
                   "error_rows": counters.num_error_rows,
                   "truncated_rows": counters.num_truncated_rows,
                   "prompt_tokens": counters.num_prompt_tokens,
                   "output_tokens": counters.num_output_tokens},
    }
