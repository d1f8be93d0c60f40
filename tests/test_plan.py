"""The job plan: replicas, runner choice, executor and device groups from given resources
(no devices, no Ray needed: `ray_available` is passed in)."""
from __future__ import annotations

import pytest

from vbatch.errors import VBatchUsageError
from vbatch.jobs.config import JobConfig
from vbatch.jobs.plan import Resources, format_plan, make_plan

CPU = Resources(num_cpus=2)
EIGHT_GPUS = Resources(num_cpus=64, gpu_ids=tuple("01234567"))


def _plan(resources, *, ray=True, **fields):
    calls = []

    def ray_available():
        calls.append(1)
        return ray
    plan = make_plan(JobConfig(input="x.jsonl", **fields).validate(), resources,
                     ray_available=ray_available)
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
