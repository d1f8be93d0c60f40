"""How a job commits its output, shared by every runner: fingerprint, resume, the writer.

`prepare_commit` runs before any model loads: it fingerprints the job (io/job_state.py) and,
with `--resume`, reads what an earlier run committed (refusing a different job unless
`--force`). `open_writer` creates the part writer that records every committed part, with the
positions of its rows, in `_manifest.json` as it goes, so a job killed at any point can be
resumed. The readers then skip `commit.skip` (the committed positions).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from vbatch.io.job_state import FINGERPRINT_KEY, ResumeState
from vbatch.jobs.config import JobConfig

# Settings that change how or where a job runs, not which rows exist or what they generate;
# every other JobConfig field is part of the fingerprint (a new field is covered by default).
NOT_IN_FINGERPRINT = frozenset({
    "input", "output", "overwrite", "resume", "force", "max_replica_restarts", "rows_per_file",
    "batch_size", "max_num_seqs", "max_num_batched_tokens", "kv_cache_memory_gb",
    "enable_prefix_caching", "tensor_parallel_size", "pipeline_parallel_size",
    "distributed_executor_backend", "runner", "ray_address", "replicas", "preserve_order",
    "max_error_rate", "trust_remote_code", "allow_pickle", "model"})


@dataclass
class JobCommit:
    """The fingerprint of this job and what earlier runs already committed."""

    fingerprint: dict
    resumed: ResumeState = field(default_factory=ResumeState)

    @property
    def skip(self):
        """Committed row positions (an IntervalSet), or None when there are none."""
        return self.resumed.committed if len(self.resumed.committed) else None


def generation_settings(config: JobConfig) -> dict:
    """The settings of `config` that are part of the job fingerprint."""
    return {name: value for name, value in config.to_dict().items()
            if name not in NOT_IN_FINGERPRINT}


def prepare_commit(config: JobConfig, files: list[Path], output_dir: Path,
                   model_identity: dict) -> JobCommit:
    """Fingerprint the job; with `config.resume`, load what `output_dir` already holds.
    `model_identity`: the resolved model's source and fingerprint. Raises VBatchUsageError."""
    import vbatch
    from vbatch.io.job_state import job_fingerprint, load_resume_state

    fingerprint = job_fingerprint(files=files, model=model_identity,
                                  generation=generation_settings(config),
                                  vbatch_version=vbatch.__version__)
    if not config.resume:
        return JobCommit(fingerprint)
    return JobCommit(fingerprint, load_resume_state(output_dir, fingerprint, force=config.force))


def model_identity(resolved_model) -> dict:
    """The fingerprint's model entry for a `resolve_model` result."""
    return {"source": resolved_model.source, "fingerprint": resolved_model.fingerprint}


def open_writer(config: JobConfig, output_dir: Path, schema, commit: JobCommit):
    """The `ParquetPartWriter` of this job: a fresh (or overwritten) directory, or the resumed
    one with its committed parts kept."""
    from vbatch.io import writer

    if config.resume:
        output_dir.mkdir(parents=True, exist_ok=True)
    else:
        output_dir = writer.prepare_output_dir(output_dir, overwrite=config.overwrite)
    return writer.ParquetPartWriter(output_dir, rows_per_file=config.rows_per_file,
                                    schema=schema, existing_parts=commit.resumed.parts,
                                    job_info={FINGERPRINT_KEY: commit.fingerprint})
