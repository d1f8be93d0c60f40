"""Commits on time as well as size: finished rows reach the writer as they finish.

Proves (tiny model on CPU, one input of 960 rows whose per-row max_tokens vary, so rows finish
out of input order): an in-process job with the default --batch-size (all rows in one input
batch) commits 40-row parts while it runs, so a SIGKILL halfway keeps them and --resume ends
with every row exactly once and the texts of an uninterrupted run; --commit-interval-s 1 with
a huge --rows-per-file commits while running too; a local-runner replica killed mid-job gets
only the rows it had not returned recomputed (the final replicas' computed rows leave out those
committed from the dead one's batch before the kill); --preserve-order writes rows in input
order with the pool buffering them (in-process and local runner).
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
from conftest import run_offline, vbatch_command
from test_replica_restarts import _replica_pids

from vbatch.io.commit_log import committed_parts

NUM_ROWS = 960


def _args(source: Path, model: Path, output: Path, *extra: str) -> list[str]:
    return [*vbatch_command(), "run", str(source), "--model", str(model), "--output", str(output),
            "--ignore-eos", "--temperature", "0", "--dtype", "float32", "--max-num-seqs", "8",
            *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1"}


def _parts(output: Path) -> list[Path]:
    return sorted(output.glob("part-*.parquet"))


def _rows(output: Path) -> list[dict]:
    """Every output row, parts in name (commit) order."""
    return pa.concat_tables([pq.read_table(path) for path in _parts(output)]).to_pylist()


def _texts(output: Path) -> dict[str, str]:
    rows = _rows(output)
    ids = [row["id"] for row in rows]
    assert len(ids) == len(set(ids)), "a row was written twice"
    return {row["id"]: row["generated_text"] for row in rows}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("commit-on-time") / "prompts.jsonl"
    path.write_text("".join(
        json.dumps({"id": f"r{i:03d}", "prompt": f"row {i} says hello", "max_tokens": 1 + i % 7})
        + "\n" for i in range(NUM_ROWS)))
    return path


@pytest.fixture(scope="module")
def expected(source, tiny_models, tmp_path_factory) -> dict[str, str]:
    output = tmp_path_factory.mktemp("reference") / "out"
    result = run_offline(_args(source, tiny_models["llama-gqa-untied"], output))
    assert result.returncode == 0, result.stderr
    texts = _texts(output)
    assert len(texts) == NUM_ROWS
    return texts


def _committed(output: Path) -> int:
    """The commit log's newest version: how many parts it names (one record per part; a part
    file exists a moment before its record, so counting part files races the commit)."""
    names = [*output.glob("_log.*.json"), *output.glob("_checkpoint.*.json")]
    return max((int(name.name.split(".")[1]) for name in names), default=0)


def _kill_when(args: list[str], output: Path, num_parts: int) -> int:
    """Run `args`; SIGKILL its process group once `num_parts` parts are committed; the rows
    committed when it died."""
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, start_new_session=True, env=_env())
    try:
        while _committed(output) < num_parts:
            assert process.poll() is None, f"no {num_parts} commits while it ran: " \
                                           f"{process.communicate()[1][-2000:]}"
            time.sleep(0.02)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    assert not (output / "_SUCCESS").exists()
    return sum(part["num_rows"] for part in committed_parts(output))


def _resume_exactly_once(args: list[str], output: Path, expected: dict[str, str]) -> dict:
    resumed = run_offline(args + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr
    manifest = json.loads((output / "_manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["counts"]["rows"] == NUM_ROWS
    assert _texts(output) == expected
    return manifest["counts"]


def test_killed_job_keeps_the_parts_it_committed_while_running(source, tiny_models, expected,
                                                              tmp_path):
    output = tmp_path / "out"
    args = _args(source, tiny_models["llama-gqa-untied"], output, "--rows-per-file", "40")
    committed = _kill_when(args, output, num_parts=3)   # of 24: all 960 rows one input batch
    counts = _resume_exactly_once(args, output, expected)
    # 3 parts of 40 rows (or fewer, had one been committed on time): kept whole
    assert counts["resumed_rows"] == committed >= 3 and counts["this_run"]["rows"] < NUM_ROWS


def test_commit_interval_commits_before_rows_per_file(source, tiny_models, expected, tmp_path):
    output = tmp_path / "out"
    args = _args(source, tiny_models["llama-gqa-untied"], output, "--rows-per-file", "100000",
                 "--commit-interval-s", "1")
    committed = _kill_when(args, output, num_parts=1)
    counts = _resume_exactly_once(args, output, expected)
    assert 0 < counts["resumed_rows"] == committed < NUM_ROWS


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds replica processes in /proc")
def test_restarted_replica_recomputes_only_rows_not_returned(source, tiny_models, expected,
                                                            tmp_path):
    output = tmp_path / "out"
    # Two input batches of 480 rows: replica i gets batch i (rows r[480 i, 480 i + 480)).
    args = _args(source, tiny_models["llama-gqa-untied"], output, "--replicas", "2",
                 "--runner", "local", "--batch-size", "480", "--rows-per-file", "20")
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, env=_env())
    # Kill once both replicas have returned rows, so whichever dies had returned some.
    committed_before_kill: set[str] = set()
    while len({int(key[1:]) // 480 for key in committed_before_kill}) < 2:
        assert process.poll() is None, process.communicate()[1][-2000:]
        time.sleep(0.02)
        committed_before_kill = {row["id"] for path in _parts(output)
                                 for row in pq.read_table(path, columns=["id"]).to_pylist()}
    victims = _replica_pids(process.pid)
    assert len(victims) == 2
    os.kill(victims[0], signal.SIGKILL)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    assert _texts(output) == expected                       # every row exactly once
    summary = json.loads((output / "_run_summary.json").read_text())
    killed = [entry["index"] for entry in summary["replicas"] if entry["restarts"] == 1]
    assert len(killed) == 1
    batch = range(480 * killed[0], 480 * killed[0] + 480)
    returned_by_dead = {key for key in committed_before_kill if int(key[1:]) in batch}
    assert returned_by_dead, "the killed replica had returned nothing yet"
    # The final processes computed every row but those the dead one returned (and perhaps
    # some more it returned between the snapshot and the kill): none of those again.
    computed = sum(entry["num_rows"] for entry in summary["replicas"])
    assert computed <= NUM_ROWS - len(returned_by_dead)


@pytest.mark.parametrize("replica_args", [(), ("--replicas", "2", "--runner", "local")],
                         ids=["in-process", "local-2-replicas"])
def test_preserve_order_writes_input_order(replica_args, source, tiny_models, expected,
                                           tmp_path):
    output = tmp_path / "out"
    args = _args(source, tiny_models["llama-gqa-untied"], output, "--preserve-order",
                 "--batch-size", "96", "--rows-per-file", "50", *replica_args)
    result = run_offline(args)
    assert result.returncode == 0, result.stderr
    rows = _rows(output)
    assert [row["id"] for row in rows] == sorted(expected)
    assert {row["id"]: row["generated_text"] for row in rows} == expected
