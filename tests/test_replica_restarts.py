"""Replica failure: a replica killed mid-job is restarted and its rows retried; a replica that
cannot start ends the job after --max-replica-restarts, never a loop.

Proves (local runner, 2 replicas, tiny model on CPU): SIGKILL of one replica process after the
first part is committed still gives exit 0, every input row exactly once, no error rows, and
the same texts as an uninterrupted run; a model whose weights are corrupt fails the job with a
clear message naming the replica and the restart budget.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import vbatch_command

NUM_ROWS = 32


def _args(source: Path, model: Path, output: Path, *extra: str) -> list[str]:
    return [*vbatch_command(), "run", str(source), "--model", str(model), "--output", str(output),
            "--replicas", "2", "--runner", "local", "--rows-per-file", "4", "--batch-size", "4",
            "--max-num-seqs", "2", "--max-tokens", "48", "--ignore-eos", "--temperature", "0",
            "--dtype", "float32", *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1"}


def _replica_pids(driver_pid: int) -> list[int]:
    """The driver's spawned children (replica processes), not its resource tracker."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == driver_pid and "spawn_main" in cmdline:
            pids.append(int(entry.name))
    return sorted(pids)


def _oldest_descendant_matching(root_pid: int, needle: str) -> int | None:
    """The oldest process under `root_pid` (at any depth) whose command line contains `needle`
    (what `pkill -o -f` would pick, but only in this job's process tree: under pytest-xdist
    another worker's Ray job has replica actors of the same name)."""
    parents, started, cmdlines = {}, {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdlines[int(entry.name)] = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        parents[int(entry.name)] = int(fields[1])
        started[int(entry.name)] = int(fields[19])
    tree, frontier = set(), {root_pid}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - tree
        tree |= frontier
    matching = [pid for pid in tree if needle in cmdlines.get(pid, "")]
    return min(matching, key=lambda pid: started[pid]) if matching else None


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("restarts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"row {i} counts to ten"}) + "\n"
                            for i in range(NUM_ROWS)))
    return path


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds replica processes in /proc")
def test_killed_replica_is_restarted_and_rows_are_written_once(source, tiny_models, tmp_path):
    model = tiny_models["llama-gqa-untied"]
    reference = tmp_path / "reference"
    one = subprocess.run([*vbatch_command(), "run", str(source), "--model", str(model), "--output",
                          str(reference), "--max-tokens", "48", "--ignore-eos",
                          "--temperature", "0", "--dtype", "float32"],
                         capture_output=True, text=True, env=_env(), timeout=300)
    assert one.returncode == 0, one.stderr
    expected = {r["id"]: r["generated_text"] for r in pq.read_table(reference).to_pylist()}

    output = tmp_path / "out"
    process = subprocess.Popen(_args(source, model, output), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=_env())
    deadline = time.monotonic() + 180
    while not list(output.glob("part-*.parquet")):
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline, "no part was written"
        time.sleep(0.05)
    victims = _replica_pids(process.pid)
    assert len(victims) == 2
    os.kill(victims[0], signal.SIGKILL)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    rows = pq.read_table(output).to_pylist()
    assert sorted(r["id"] for r in rows) == sorted(expected)        # each row exactly once
    assert all(r["error"] is None for r in rows)
    assert {r["id"]: r["generated_text"] for r in rows} == expected
    summary = json.loads((output / "_run_summary.json").read_text())
    assert sum(r.get("restarts", 0) for r in summary["replicas"]) == 1
    assert not _replica_pids(process.pid)


def test_replica_that_cannot_start_fails_the_job_after_its_restarts(source, tiny_models,
                                                                     tmp_path):
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_models["llama-gqa-untied"], broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])        # a corrupt checkpoint
    output = tmp_path / "out"
    started = time.monotonic()
    result = subprocess.run(_args(source, broken, output, "--max-replica-restarts", "1"),
                            capture_output=True, text=True, env=_env(), timeout=300)
    assert result.returncode != 0
    assert "restarted 1 times" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not (output / "_SUCCESS").exists()
    assert time.monotonic() - started < 240


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds replica actors in /proc")
def test_killed_ray_replica_actor_is_restarted_and_rows_are_written_once(source, tiny_models,
                                                                          tmp_path):
    pytest.importorskip("ray")
    model = tiny_models["llama-gqa-untied"]
    reference = tmp_path / "reference"
    one = subprocess.run(_args(source, model, reference, "--replicas", "1"),
                         capture_output=True, text=True, env=_env(), timeout=300)
    assert one.returncode == 0, one.stderr
    expected = {r["id"]: r["generated_text"] for r in pq.read_table(reference).to_pylist()}

    output = tmp_path / "out"
    args = [a if a != "local" else "ray" for a in _args(source, model, output)]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=_env())
    deadline = time.monotonic() + 240
    while not list(output.glob("part-*.parquet")):
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline, "no part was written"
        time.sleep(0.05)
    victim = _oldest_descendant_matching(process.pid, "MapBatches(ReplicaActor)")
    assert victim is not None, "no replica actor process found"
    os.kill(victim, signal.SIGKILL)
    assert not (output / "_SUCCESS").exists()
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    rows = pq.read_table(output).to_pylist()
    assert sorted(r["id"] for r in rows) == sorted(expected)        # each row exactly once
    assert {r["id"]: r["generated_text"] for r in rows} == expected
