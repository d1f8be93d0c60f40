"""Samples, logprobs and structured outputs through the Ray runner equal the local runner's.

Ray Data may cut and merge blocks as it likes; a row's n samples must still be written together,
once, with the same texts and logprobs as a local single-replica run of the same job.
"""
from __future__ import annotations

import pyarrow.parquet as pq
import pytest
from conftest import run_offline, small_job_command, write_prompt_jsonl

pytest.importorskip("ray")

NUM_ROWS = 12


def _rows(output):
    table = pq.read_table(output).to_pylist()
    return sorted(((r["id"], r["sample_index"], r["generated_text"], r["finish_reason"],
                    [e["logprob"] for e in r["logprobs"]]) for r in table),
                  key=lambda row: (row[0], row[1]))


@pytest.mark.slow
def test_ray_runner_writes_the_same_samples_as_the_local_runner(tiny_models, tmp_path):
    source = write_prompt_jsonl(tmp_path / "in.jsonl", NUM_ROWS)
    model = tiny_models["llama-gqa-untied"]
    features = ("--n", "3", "--temperature", "0.8", "--seed", "1", "--logprobs", "1",
                "--choice", "red", "--choice", "green", "--choice", "blue")
    local = tmp_path / "local"
    done = run_offline([*small_job_command(source, model, local, *features, max_tokens=8),
                        "--runner", "local"])
    assert done.returncode == 0, done.stderr
    on_ray = tmp_path / "ray"
    done = run_offline([*small_job_command(source, model, on_ray, *features, max_tokens=8),
                        "--runner", "ray", "--replicas", "2"])
    assert done.returncode == 0, done.stderr
    expected = _rows(local)
    assert len(expected) == 3 * NUM_ROWS
    assert {row[2] for row in expected} <= {"red", "green", "blue"}
    got = _rows(on_ray)
    assert [row[:4] for row in got] == [row[:4] for row in expected]
    for ours, theirs in zip(got, expected):
        assert ours[4] == pytest.approx(theirs[4], abs=1e-4)
