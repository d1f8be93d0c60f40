"""What a resumed job counts: the rows earlier runs committed are part of the job.

Proves: `--resume` does not bypass `--max-error-rate` (the issue's repro: 20 rows, 10 empty
prompts, `--max-error-rate 0.1` exits 3, and so does the same command with `--resume`); a
resume that completes reports the job's totals (earlier rows included) in `_manifest.json`,
`_run_summary.json` and the printed summary, with `resumed_rows` and `this_run`; a job killed
and resumed ends with the same counts as an uninterrupted run; each committed part records
its error-row and token counts, and a manifest without them (an earlier version) is counted
from the part files and recorded in the resumed run's commit log.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import run_offline, small_job_command

from vbatch.errors import TooManyRowErrors
from vbatch.io.commit_log import committed_parts
from vbatch.io.fingerprint import job_fingerprint
from vbatch.io.manifest import load_resume_state, write_manifest
from vbatch.io.parts import ParquetPartWriter
from vbatch.io.positions import POSITION_COLUMN
from vbatch.jobs.output_tally import OutputTally
from vbatch.jobs.row_errors import ErrorBudget

TOTALS = ("rows", "error_rows", "prompt_tokens", "output_tokens")


def _job_args(source: Path, model: Path, output: Path, *extra: str) -> list[str]:
    return small_job_command(source, model, output, *extra, max_tokens=8)


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return run_offline(args)


def _write_prompts(path: Path, num_rows: int, empty: set[int]) -> Path:
    path.write_text("".join(
        json.dumps({"id": f"r{i}", "prompt": "" if i in empty else f"row {i} says hello"}) + "\n"
        for i in range(num_rows)))
    return path


def _manifest(output: Path) -> dict:
    return json.loads((output / "_manifest.json").read_text())


def _totals(counts: dict) -> dict:
    return {key: counts[key] for key in TOTALS}


def test_resume_does_not_bypass_max_error_rate(tiny_models, tmp_path):
    source = _write_prompts(tmp_path / "in.jsonl", 20, empty=set(range(1, 20, 2)))
    output = tmp_path / "out"
    args = _job_args(source, tiny_models["llama-gqa-untied"], output, "--max-error-rate", "0.1")

    first = _run(args)
    assert first.returncode == 3, first.stderr
    assert not (output / "_SUCCESS").exists()
    committed = committed_parts(output)       # a failed job: its commit log
    num_committed = sum(part["num_rows"] for part in committed)
    num_committed_errors = sum(part["num_error_rows"] for part in committed)
    assert num_committed_errors > 2           # more than 0.1 of 20: the budget is spent

    resumed = _run(args + ["--resume"])
    assert resumed.returncode == 3, resumed.stderr
    lines = [line for line in resumed.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith(f"Error: {num_committed_errors} of 20 rows failed"), lines
    assert "committed by earlier runs" in lines[-1] and "Traceback" not in resumed.stderr
    assert not (output / "_SUCCESS").exists()

    completed = _run(_job_args(source, tiny_models["llama-gqa-untied"], output, "--resume"))
    assert completed.returncode == 0, completed.stderr
    counts = _manifest(output)["counts"]
    assert counts["rows"] == 20 and counts["error_rows"] == 10
    assert counts["resumed_rows"] == num_committed
    assert counts["this_run"]["rows"] == 20 - num_committed
    assert counts["this_run"]["error_rows"] == 10 - num_committed_errors
    assert counts["output_tokens"] == 10 * 8          # 10 generated rows, --ignore-eos
    summary = json.loads((output / "_run_summary.json").read_text())["counts"]
    assert _totals(summary) == _totals(counts)
    assert summary["resumed_rows"] == num_committed
    assert "20 (10 with errors)" in completed.stderr
    assert f"{num_committed} committed by an earlier run (resumed)" in completed.stderr
    assert pq.read_table(output).num_rows == 20


def test_resume_past_the_budget_fails_before_the_model_loads(tiny_models, tmp_path):
    """With a row count known up front (Parquet), earlier runs' errors alone decide: the
    resumed job fails before any replica starts (no progress line, one error line)."""
    source = tmp_path / "in.parquet"
    pq.write_table(pa.table({"prompt": ["" if i % 2 else f"row {i}" for i in range(20)]}),
                   source)
    output = tmp_path / "out"
    args = _job_args(source, tiny_models["llama-gqa-untied"], output, "--max-error-rate", "0.1")
    assert _run(args).returncode == 3
    resumed = _run(args + ["--resume"])
    assert resumed.returncode == 3, resumed.stderr
    lines = [line for line in resumed.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "committed by earlier runs" in lines[0], resumed.stderr
    assert not (output / "_SUCCESS").exists()


def test_killed_and_resumed_job_counts_like_an_uninterrupted_one(tiny_models, tmp_path):
    source = _write_prompts(tmp_path / "in.jsonl", 40, empty={3, 17, 18, 30})
    model = tiny_models["llama-gqa-untied"]
    full = tmp_path / "full"
    uninterrupted = _run(_job_args(source, model, full, "--max-tokens", "24"))
    assert uninterrupted.returncode == 0, uninterrupted.stderr
    expected = _manifest(full)["counts"]
    assert expected["error_rows"] == 4 and expected["resumed_rows"] == 0

    output = tmp_path / "out"
    args = _job_args(source, model, output, "--max-tokens", "24")
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 120
    while process.poll() is None:
        try:
            if len(committed_parts(output)) >= 2:
                break
        except (OSError, ValueError):
            pass
        assert time.monotonic() < deadline, "no part was committed"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    assert not (output / "_SUCCESS").exists(), "the job finished before it could be killed"

    resumed = _run(args + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr
    counts = _manifest(output)["counts"]
    assert _totals(counts) == _totals(expected)
    assert counts["resumed_rows"] > 0
    assert counts["resumed_rows"] + counts["this_run"]["rows"] == 40
    summary = json.loads((output / "_run_summary.json").read_text())["counts"]
    assert _totals(summary) == _totals(expected)
    parts = _manifest(output)["output"]["part_files"]
    assert sum(part["num_error_rows"] for part in parts) == 4
    assert sum(part["num_output_tokens"] for part in parts) == expected["output_tokens"]


def _output_batch(ids: list[str], errors: list[str | None], positions: list[int]):
    generated = [None if error else 5 for error in errors]
    return pa.record_batch({"id": ids, "error": pa.array(errors, pa.string()),
                            "num_prompt_tokens": pa.array([None if e else 3 for e in errors],
                                                          pa.int32()),
                            "num_generated_tokens": pa.array(generated, pa.int32()),
                            POSITION_COLUMN: positions})


def test_parts_record_their_counts_and_old_manifests_are_counted_from_the_files(tmp_path):
    fingerprint = job_fingerprint(files=[], model={"source": "m"}, generation={"seed": 0},
                                  vbatch_version="0")
    writer = ParquetPartWriter(tmp_path, rows_per_file=2, job_info={"fingerprint": fingerprint})
    writer.write(_output_batch(["a", "b", "c"], [None, "empty_prompt: x", "empty_prompt: y"],
                               [0, 1, 2]))
    writer.close()
    parts = committed_parts(tmp_path)
    assert [(p["num_rows"], p["num_error_rows"], p["num_prompt_tokens"], p["num_output_tokens"])
            for p in parts] == [(2, 1, 3, 5), (1, 1, 0, 0)]
    state = load_resume_state(tmp_path, fingerprint, force=False)
    assert (state.num_committed_rows, state.num_error_rows, state.num_prompt_tokens,
            state.num_output_tokens) == (3, 2, 3, 5)

    # as an earlier version left it: a running manifest without per-part counts, no log
    for name in tmp_path.glob("_*.json"):
        name.unlink()
    old_parts = [{key: value for key, value in part.items()
                  if key not in ("num_error_rows", "num_prompt_tokens", "num_output_tokens")}
                 for part in parts]
    write_manifest(tmp_path, {"fingerprint": fingerprint, "status": "running"}, old_parts)
    old = load_resume_state(tmp_path, fingerprint, force=False)
    assert (old.num_error_rows, old.num_prompt_tokens, old.num_output_tokens) == (2, 3, 5)
    assert old.parts == state.parts
    # the resumed run's log records them (the writer's starting checkpoint)
    ParquetPartWriter(tmp_path, existing_parts=old.parts,
                      job_info={"fingerprint": fingerprint}).abort()
    assert not (tmp_path / "_manifest.json").exists()
    assert committed_parts(tmp_path) == state.parts


def test_error_budget_counts_the_earlier_runs():
    budget = ErrorBudget(0.1, total_rows=20, earlier_rows=8, earlier_error_rows=4)
    with pytest.raises(TooManyRowErrors, match=r"4 of 20 rows failed \(20.0%\) \(4 committed "
                                               r"by earlier runs\), more than"):
        budget.check_start()
    within = ErrorBudget(0.25, total_rows=20, earlier_rows=8, earlier_error_rows=4)
    within.check_start()
    tally = OutputTally()
    tally.accept(_output_batch(["x", "y"], ["empty_prompt: z", None], [9, 10]), "id")
    within.check_progress(tally)                      # 5 of 20
    ErrorBudget(0.5, total_rows=20, earlier_rows=8, earlier_error_rows=4).check_final(tally)
    with pytest.raises(TooManyRowErrors, match=r"5 of 10 rows failed .* first in this run: "
                                               r"row x: empty_prompt: z"):
        ErrorBudget(0.4, total_rows=20, earlier_rows=8, earlier_error_rows=4).check_final(tally)
