"""`_run_summary.json`: what a finished job did, for people and dashboards.

The leading underscore makes Parquet readers (pyarrow, Spark, Ray) skip it when they read the output
directory, as they skip `_SUCCESS` and `_manifest.json`. Written into the output directory before
`_SUCCESS` (and after the part files) by every runner: counts and tokens (the job's totals, a
resumed job's earlier rows included, with `resumed_rows` and `this_run`; `rows` are input rows,
`output_rows` the output's rows, one per sample; `duplicate_ids` and `null_ids` over the whole
output, per input row; `prompt_prefills`: prompts the engines prefilled this run), timings, the
plan (runner,
replicas, tp, pp, executor, device groups), per-replica statistics (rows, tokens, node, state), the
job config and the versions of vbatch, Python, torch, transformers, pyarrow and Ray (when Ray ran
the job). `merge_counters` adds up the counters that replicas report.
"""
from __future__ import annotations

import dataclasses
import platform
import sys
from datetime import datetime, timezone
from typing import Any

import pyarrow
import torch
import transformers

import vbatch
from vbatch.jobs.config import JobConfig
from vbatch.jobs.plan import JobPlan
from vbatch.jobs.progress import JobStats


def merge_counters(counters: list[Any]) -> Any:
    """Sum replica counters (dataclass instances of one type): int fields add up, any other
    field keeps the first non-None value (e.g. the first error). Returns a new instance; raises
    ValueError for an empty list."""
    if not counters:
        raise ValueError("no replica counters to merge")
    merged = dataclasses.replace(counters[0])
    for other in counters[1:]:
        for field in dataclasses.fields(merged):
            mine, theirs = getattr(merged, field.name), getattr(other, field.name)
            if isinstance(mine, int) and not isinstance(mine, bool):
                setattr(merged, field.name, mine + theirs)
            elif mine is None:
                setattr(merged, field.name, theirs)
    return merged


def versions() -> dict[str, str]:
    """Versions of the software that ran the job (Ray only when it is already imported)."""
    found = {"vbatch": vbatch.__version__, "python": platform.python_version(),
             "torch": torch.__version__, "transformers": transformers.__version__,
             "pyarrow": pyarrow.__version__}
    ray = sys.modules.get("ray")
    if ray is not None and hasattr(ray, "__version__"):
        found["ray"] = ray.__version__
    return found


def build_run_summary(config: JobConfig, plan: JobPlan, stats: JobStats, *,
                      started_at: datetime, replicas: list[dict[str, Any]],
                      output_rows: int | None = None, this_run_output_rows: int | None = None,
                      prompt_prefills: int = 0, prefill_tokens: int = 0) -> dict[str, Any]:
    """The content of `_run_summary.json` (plain JSON types). `replicas`: one dict per replica
    (index, state, rows, tokens, and where it ran when known).

    `counts.rows` counts input rows; `output_rows` the rows of the output (one per sample: more
    than `rows` when rows are sampled n > 1 times; default `rows`), `this_run_output_rows`
    this run's. `prompt_prefills` (prompts prefilled from scratch, once per row whatever its n)
    and `prefill_tokens` are this run's, summed over the replicas' engines (a replica that
    died and was replaced loses its own)."""
    this_run = stats.this_run
    this_run["output_rows"] = (this_run["rows"] if this_run_output_rows is None
                               else this_run_output_rows)
    return {
        "started_at": started_at.isoformat(),
        "finished_at": datetime.now(timezone.utc).isoformat(),
        "counts": {"rows": stats.num_rows, "resumed_rows": stats.num_resumed_rows,
                   "output_rows": stats.num_rows if output_rows is None else output_rows,
                   "error_rows": stats.num_error_rows,
                   "prompt_tokens": stats.num_prompt_tokens,
                   "output_tokens": stats.num_output_tokens,
                   "part_files": stats.num_part_files, "this_run": this_run,
                   "duplicate_ids": stats.num_duplicate_ids, "null_ids": stats.num_null_ids,
                   "prompt_prefills": prompt_prefills, "prefill_tokens": prefill_tokens},
        "timings": {"wall_time_s": round(stats.wall_time_s, 3),
                    "load_time_s": round(stats.load_time_s, 3),
                    "generation_time_s": round(stats.generation_time_s, 3),
                    "output_tokens_per_s": round(stats.output_tokens_per_s, 2),
                    "total_tokens_per_s": round(stats.total_tokens_per_s, 2)},
        "plan": {"runner": plan.runner, "reason": plan.runner_reason,
                 "replicas": plan.num_replicas, "tp": plan.tp_size, "pp": plan.pp_size,
                 "executor": plan.executor, "device": plan.device,
                 "device_groups": [list(group) for group in plan.device_groups],
                 "ray_address": plan.ray_address},
        "replicas": replicas,
        "model": stats.model,
        "dtype": stats.dtype,
        "config": config.to_dict(),
        "versions": versions(),
    }
