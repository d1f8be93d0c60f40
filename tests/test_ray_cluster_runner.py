"""The Ray runner on a two-node Ray cluster (two raylets on this machine, one CPU each).

Proves: a job with 2 replicas puts one replica actor on each node (each reserves its one CPU),
both nodes generate rows (blocks take long enough to generate that one replica alone cannot
keep up with the reader), every row appears exactly once, and the output equals one in-process
replica's; the cluster this process connected to stays up after the job.
"""
from __future__ import annotations

import json

import pyarrow.parquet as pq

from vbatch.jobs.config import JobConfig
from vbatch.jobs.progress import ProgressReporter
from vbatch.jobs.runner import run_job


def test_two_replicas_one_per_node_both_work(tmp_path, tiny_models, two_node_cluster):
    ray, cluster = two_node_cluster
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"prompt": f"The quick brown fox {i}"}) + "\n"
                              for i in range(24)))

    def run(output, **overrides):
        config = JobConfig(input=str(source), model=str(tiny_models["gpt2"]),
                           output=str(output), max_tokens=24, ignore_eos=True,
                           temperature=0.0, dtype="float32", batch_size=2,
                           **overrides).validate()
        run_job(config, ProgressReporter(quiet=True))
        return {r["id"]: r for r in pq.read_table(output).to_pylist()}

    on_cluster = run(tmp_path / "cluster", runner="ray", replicas=2,
                     ray_address=cluster.address)
    summary = json.loads((tmp_path / "cluster" / "_run_summary.json").read_text())
    nodes = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
    replicas = summary["replicas"]
    assert len(nodes) == 2 and len(replicas) == 2
    assert {entry["node_id"] for entry in replicas} == nodes      # one replica per node
    assert all(entry["num_rows"] > 0 for entry in replicas)      # both did work
    assert sum(entry["num_rows"] for entry in replicas) == 24
    assert sorted(on_cluster) == sorted(f"in.jsonl:{i}" for i in range(24))
    assert ray.is_initialized()

    in_process = run(tmp_path / "local", runner="local", replicas=1)
    assert on_cluster == in_process
