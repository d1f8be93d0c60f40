"""The job plan: replicas, runner choice, executor and device groups from given resources
(no devices, no Ray needed: `ray_available` is passed in)."""
from __future__ import annotations

import pytest

from vbatch.errors import VBatchUsageError
from vbatch.jobs.config import JobConfig
from vbatch.jobs.plan import Resources, format_plan, make_plan

CPU = Resources(num_cpus=2)
EIGHT_GPUS = Resources(num_cpus=64, gpu_ids=tuple("01234567"))


def _plan(resources, *, ray=True, cluster=CPU, **fields):
    """The plan on this node's `resources`; a cluster address, if any, has `cluster`'s."""
    calls = []

    def ray_available():
        calls.append(1)
        return ray

    def cluster_resources(address):
        assert address == fields["ray_address"]
        return cluster
    plan = make_plan(JobConfig(input="x.jsonl", **fields).validate(), resources,
                     ray_available=ray_available, cluster_resources=cluster_resources)
    return plan, len(calls)


def test_defaults_one_replica_on_cpu_and_as_many_as_fit_on_gpus():
    plan, ray_checks = _plan(CPU)
    assert (plan.runner, plan.num_replicas, plan.executor, plan.device) == \
        ("local", 1, "uni", "cpu")
    assert ray_checks == 0                       # nothing needed Ray: not even imported
    plan, _ = _plan(EIGHT_GPUS, tensor_parallel_size=2, pipeline_parallel_size=1)
    assert plan.num_replicas == 4 and plan.executor == "mp"
    assert plan.device_groups == (("0", "1"), ("2", "3"), ("4", "5"), ("6", "7"))
    plan, _ = _plan(Resources(num_cpus=8, gpu_ids=("3", "5", "6")), tensor_parallel_size=1,
                    replicas=2)
    assert plan.device_groups == (("3",), ("5",))      # CUDA_VISIBLE_DEVICES ids, in order


def test_auto_runner_rule():
    plan, _ = _plan(CPU, replicas=2)
    assert plan.runner == "local"
    plan, _ = _plan(CPU, ray_address="head:6379")
    assert plan.runner == "ray" and plan.ray_address == "head:6379"
    plan, _ = _plan(CPU, ray_address="head:6379", ray=False)
    assert plan.runner == "local" and "not installed" in plan.runner_reason
    plan, _ = _plan(EIGHT_GPUS, replicas=3, tensor_parallel_size=4)
    assert plan.runner == "ray" and "needs 12 GPUs" in plan.runner_reason
    assert plan.device_groups == ((), (), ())          # Ray places the replicas


def test_impossible_plans_are_usage_errors():
    with pytest.raises(VBatchUsageError, match="need 12 GPUs but this node has 8"):
        _plan(EIGHT_GPUS, runner="local", replicas=3, tensor_parallel_size=4)
    with pytest.raises(VBatchUsageError, match=r"vbatch\[ray\]"):
        _plan(CPU, runner="ray", ray=False)
    with pytest.raises(VBatchUsageError, match="--runner"):
        JobConfig(input="x", runner="spark").validate()
    with pytest.raises(VBatchUsageError, match="--replicas must be >= 1"):
        JobConfig(input="x", replicas=0).validate()


def test_format_plan_names_every_replica_group():
    plan, _ = _plan(EIGHT_GPUS, replicas=2, tensor_parallel_size=2, pipeline_parallel_size=2)
    text = "\n".join(format_plan(plan))
    assert "tp x pp       2 x 2 = 4 rank(s) per replica" in text
    assert "replica 0     GPUs 0,1,2,3" in text and "replica 1     GPUs 4,5,6,7" in text
    plan, _ = _plan(CPU, runner="ray", replicas=2, tensor_parallel_size=2,
                    distributed_executor_backend="ray")
    assert "placement group of 2 bundle(s)" in "\n".join(format_plan(plan))


def test_a_ray_cluster_is_planned_from_its_own_gpus_not_the_driver_node():
    """A GPU-less head node: the plan counts the workers' GPUs, per node."""
    cluster = Resources(num_cpus=40, gpus_per_node=(0, 4, 4, 1))
    plan, _ = _plan(CPU, cluster=cluster, ray_address="head:6379")
    assert (plan.runner, plan.num_replicas, plan.device, plan.executor) == \
        ("ray", 9, "cuda", "uni")
    assert "1 GPU(s) reserved by its Ray actor" in "\n".join(format_plan(plan))
    # whole replicas per node when one fits on a node: 2 + 2 + 0, not 9 // 2
    plan, _ = _plan(CPU, cluster=cluster, ray_address="head:6379", tensor_parallel_size=2)
    assert (plan.num_replicas, plan.executor) == (4, "mp")
    # larger than any node: its ranks become Ray actors (vLLM's rule), or mp is refused
    plan, _ = _plan(CPU, cluster=cluster, ray_address="head:6379", tensor_parallel_size=8)
    assert (plan.num_replicas, plan.executor) == (1, "ray")
    with pytest.raises(VBatchUsageError, match="needs 8 GPUs; 4 visible"):
        _plan(CPU, cluster=cluster, ray_address="head:6379", tensor_parallel_size=8,
              distributed_executor_backend="mp")
    with pytest.raises(VBatchUsageError, match="need 12 GPUs but the Ray cluster at head:6379 "
                                               "has 9"):
        _plan(CPU, cluster=cluster, ray_address="head:6379", tensor_parallel_size=4,
              replicas=3)
    # a CPU-only cluster plans CPU replicas whatever the driver node has
    plan, _ = _plan(EIGHT_GPUS, cluster=Resources(num_cpus=8, gpus_per_node=(0, 0)),
                    ray_address="head:6379")
    assert (plan.num_replicas, plan.device) == (1, "cpu")
