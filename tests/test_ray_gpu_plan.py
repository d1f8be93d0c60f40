"""The Ray runner on a GPU cluster, with logical GPUs on this CPU machine.

Proves, on a two-raylet cluster whose head node has no GPU and whose worker declares 2 logical
GPUs: the plan is made from the cluster's resources, not the driver node's (`--dry-run` shows
2 replicas on cuda, each reserving 1 GPU; 3 replicas are refused in one line); and a real job
gives each replica actor a GPU of its own and passes the plan's device to its engine: the
engine, seeing no usable GPU in this CPU build of torch, refuses to start naming the
`CUDA_VISIBLE_DEVICES` Ray assigned, and the job fails with that one line (exit 2), where it
used to run every replica on CPU, silently.
"""
from __future__ import annotations

import json
import os
import subprocess

import pytest
from conftest import vbatch_command

pytest.importorskip("ray")


@pytest.fixture(scope="module")
def gpu_cluster():
    """A GPU-less head and a worker with 2 logical GPUs (2 CPUs)."""
    from ray.cluster_utils import Cluster  # noqa: PLC0415 (Ray is optional)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "num_gpus": 0, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=2, num_gpus=2)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        cluster.shutdown()


def _run(cluster, tiny_models, tmp_path, *extra: str) -> subprocess.CompletedProcess:
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"prompt": f"row {i}"}) + "\n" for i in range(4)))
    # The suite pins VBATCH_DEVICE=cpu, which would plan the cluster as CPU-only.
    env = {key: value for key, value in os.environ.items() if key != "VBATCH_DEVICE"}
    return subprocess.run(
        [*vbatch_command(), "run", str(source), "--model", str(tiny_models["llama-gqa-untied"]),
         "--output", str(tmp_path / "out"), "--runner", "ray", "--ray-address", cluster.address,
         "--max-tokens", "2", *extra],
        capture_output=True, text=True, timeout=300, env={**env, "HF_HUB_OFFLINE": "1"})


def test_plan_counts_the_clusters_gpus_not_the_driver_nodes(gpu_cluster, tiny_models,
                                                            tmp_path):
    result = _run(gpu_cluster, tiny_models, tmp_path, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "replicas      2" in result.stdout and "device        cuda" in result.stdout
    assert result.stdout.count("1 GPU(s) reserved by its Ray actor") == 2
    result = _run(gpu_cluster, tiny_models, tmp_path, "--dry-run", "--replicas", "3")
    assert result.returncode == 2
    assert "need 3 GPUs but the Ray cluster at" in result.stderr and "has 2" in result.stderr


def test_each_replica_actor_gets_a_gpu_and_the_plans_device(gpu_cluster, tiny_models,
                                                            tmp_path):
    result = _run(gpu_cluster, tiny_models, tmp_path, "--max-replica-restarts", "0")
    assert result.returncode == 2, result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("Error: a replica could not start: device cuda:0 was asked for, "
                            "but this process sees 0 CUDA GPU(s) (CUDA_VISIBLE_DEVICES='"), error
    assert "CUDA_VISIBLE_DEVICES='0'" in error or "CUDA_VISIBLE_DEVICES='1'" in error
    assert not (tmp_path / "out" / "_SUCCESS").exists()
