"""Exactly-once, resumable jobs: the commit protocol and `--resume`.

Proves: a job whose whole process group is SIGKILLed after some parts are committed resumes
with `--resume`, computes only the rest (and says how many it skipped), and ends with every
input row exactly once and the same texts as an uninterrupted run, for the in-process path and
the local runner with 2 replicas; a resume of a different job is refused naming the difference
(unless --force); part files the manifest does not list are dropped on resume.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import run_offline, small_job_command

from vbatch.io.commit_log import checkpoint_name, committed_parts, record_name
from vbatch.io.fingerprint import job_fingerprint
from vbatch.io.manifest import ResumeState, load_resume_state
from vbatch.io.parts import ParquetPartWriter
from vbatch.io.positions import IntervalSet

NUM_ROWS = 40


def _job_args(source: Path, model: Path, output: Path, *extra: str) -> list[str]:
    return small_job_command(source, model, output, *extra, max_tokens=48)


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return run_offline(args)


def _num_committed_parts(output: Path) -> int:
    return len(committed_parts(output))


def _texts(output: Path) -> dict[str, str]:
    rows = pq.read_table(output).to_pylist()
    ids = [row["id"] for row in rows]
    assert len(ids) == len(set(ids)), "a row was written twice"
    return {row["id"]: row["generated_text"] for row in rows}


@pytest.fixture(scope="module")
def job_input(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    source = root / "prompts.jsonl"
    source.write_text("".join(json.dumps({"prompt": f"row {i} says hello"}) + "\n"
                              for i in range(NUM_ROWS)))
    return source


@pytest.fixture(scope="module")
def uninterrupted(job_input, tiny_models, tmp_path_factory):
    output = tmp_path_factory.mktemp("full") / "out"
    result = _run(_job_args(job_input, tiny_models["llama-gqa-untied"], output))
    assert result.returncode == 0, result.stderr
    texts = _texts(output)
    assert len(texts) == NUM_ROWS
    return texts


@pytest.mark.parametrize("replica_args", [(), ("--replicas", "2", "--runner", "local")],
                         ids=["in-process", "local-2-replicas"])
def test_killed_job_resumes_exactly_once(replica_args, job_input, tiny_models, uninterrupted,
                                         tmp_path):
    output = tmp_path / "out"
    args = _job_args(job_input, tiny_models["llama-gqa-untied"], output, *replica_args)
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 120
    while _num_committed_parts(output) < 2 and process.poll() is None:
        assert time.monotonic() < deadline, "no part was committed"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)       # the driver and every replica/worker
    process.wait(timeout=30)
    assert not (output / "_SUCCESS").exists(), "the job finished before it could be killed"
    committed_rows = sum(part["num_rows"] for part in committed_parts(output))

    resumed = _run(args + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert "committed by an earlier run (resumed)" in resumed.stderr + resumed.stdout
    manifest = json.loads((output / "_manifest.json").read_text())
    assert manifest["status"] == "complete"
    # what the killed run committed is kept, whole (parts of 4 rows, or fewer when the job
    # outlasts --commit-interval-s, as on a loaded machine)
    assert manifest["counts"]["resumed_rows"] == committed_rows >= 2
    # counts are the job's totals; what this run computed is counts["this_run"]
    assert manifest["counts"]["rows"] == NUM_ROWS
    assert manifest["counts"]["this_run"]["rows"] + manifest["counts"]["resumed_rows"] == NUM_ROWS
    assert manifest["counts"]["this_run"]["rows"] < NUM_ROWS
    assert _texts(output) == uninterrupted
    assert (output / "_SUCCESS").exists()


def test_resume_of_a_different_job_is_refused(job_input, tiny_models, tmp_path):
    model = tiny_models["llama-gqa-untied"]
    output = tmp_path / "out"
    args = _job_args(job_input, model, output, "--max-tokens", "4")
    assert _run(args).returncode == 0
    refused = _run(args + ["--resume", "--temperature", "0.5"])
    assert refused.returncode == 2
    assert "temperature 0.0 -> 0.5" in refused.stderr and "Traceback" not in refused.stderr
    forced = _run(args + ["--resume", "--force", "--temperature", "0.5"])
    assert forced.returncode == 0, forced.stderr
    assert len(_texts(output)) == NUM_ROWS          # complete already: nothing recomputed
    both = _run(args + ["--resume", "--overwrite"])
    assert both.returncode == 2 and "exclude each other" in both.stderr
    not_empty = _run(args)
    assert not_empty.returncode == 2 and "--resume" in not_empty.stderr


def test_uncommitted_parts_are_dropped_on_resume(tmp_path):
    import pyarrow as pa

    from vbatch.io.positions import POSITION_COLUMN
    fingerprint = job_fingerprint(files=[], model={"source": "m"}, generation={"seed": 0},
                                  vbatch_version="0")
    writer = ParquetPartWriter(tmp_path, rows_per_file=2, job_info={"fingerprint": fingerprint})
    writer.write(pa.record_batch({"id": ["a", "b", "c"], POSITION_COLUMN: [0, 1, 5]}))
    # killed here: part 0 is committed (logged); a part renamed but not yet logged is an orphan
    (tmp_path / "part-00001.parquet").write_bytes(b"half a job")
    (tmp_path / ".part-00002.parquet.tmp").write_bytes(b"")
    state = load_resume_state(tmp_path, fingerprint, force=False)
    assert isinstance(state, ResumeState)
    assert state.committed == IntervalSet([(0, 2)])
    assert state.num_committed_rows == 2 and not state.was_complete
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        checkpoint_name(0), record_name(1), "part-00000.parquet"]
    resumed = ParquetPartWriter(tmp_path, rows_per_file=2, existing_parts=state.parts,
                                job_info={"fingerprint": fingerprint})
    resumed.write(pa.record_batch({"id": ["c"], POSITION_COLUMN: [5]}))
    resumed.commit({"counts": {}})
    manifest = json.loads((tmp_path / "_manifest.json").read_text())
    assert [p["name"] for p in manifest["output"]["part_files"]] == ["part-00000.parquet",
                                                                    "part-00001.parquet"]
    assert [p["positions"] for p in manifest["output"]["part_files"]] == [[[0, 2]], [[5, 6]]]
    assert pq.read_table(tmp_path).column("id").to_pylist() == ["a", "b", "c"]


def test_ctrl_c_stops_within_10s_and_resume_completes(job_input, tiny_models, uninterrupted,
                                                      tmp_path):
    output = tmp_path / "out"
    args = _job_args(job_input, tiny_models["llama-gqa-untied"], output, "--replicas", "2",
                     "--runner", "local")
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, start_new_session=True,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 120
    while _num_committed_parts(output) < 1 and process.poll() is None:
        assert time.monotonic() < deadline, "no part was committed"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGINT)         # Ctrl-C reaches the whole foreground group
    interrupted = time.monotonic()
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert time.monotonic() - interrupted < 10
    assert "Traceback" not in stderr
    for _ in range(50):       # multiprocessing's resource tracker leaves just after its users
        leftover = subprocess.run(["pgrep", "-a", "-s", str(process.pid)], capture_output=True,
                                  text=True).stdout.strip()
        if not leftover:
            break
        time.sleep(0.1)
    assert leftover == "", f"outlived the job: {leftover}"
    resumed = _run(args + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert _texts(output) == uninterrupted
