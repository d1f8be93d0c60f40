"""The `ray` executor (one Ray actor per rank) and the backend rule (executor/backend.py, as
executor/factory.py applies it to this process).

Proves: tp=2 and pp=2 over Ray actors give greedy tokens identical to a single rank; a rank actor
killed mid-generation fails the engine within seconds naming the rank, and leaves no actor process
or placement group behind; a rank that raises while loading is named too; an engine started inside a
caller's placement group (a Ray Data replica, say) picks `ray` and runs in that group's bundles; a
cluster too small for the ranks is a clear error; without Ray installed, `ray` is a one-line
ValueError. The backend rule tests need no Ray.
"""
from __future__ import annotations

import os
import signal
import sys
import time
import types

import pytest
import torch

from vbatch import LLM, SamplingParams
from vbatch.engine.executor import backend, factory
from vbatch.engine.executor.base import WorkerError

PROMPTS = ["The quick brown fox", "Paris is", "def add(a, b):\n    return a", "Once"]
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
NUM_CPUS = 4


@pytest.fixture(scope="module")
def ray_instance():
    """One private Ray instance for the module (ray.init is slow on small machines)."""
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=NUM_CPUS, include_dashboard=False, log_to_driver=False,
             logging_level="warning")
    yield ray
    ray.shutdown()


def _llm(path, tp, backend=None, pp=1):
    return LLM(str(path), dtype="float32", kv_cache_memory_gb=0.01, tensor_parallel_size=tp,
               pipeline_parallel_size=pp, distributed_executor_backend=backend)


def _tokens(llm):
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]


def _wait_until(predicate, timeout_s=15.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return predicate()


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _all_cpus_free(ray) -> bool:
    return ray.available_resources().get("CPU", 0) == NUM_CPUS


@pytest.mark.parametrize("kind, tp, pp", [("llama-gqa-untied", 2, 1), ("llama-gqa-untied", 2, 2)])
def test_ray_matches_single_rank(tiny_models, ray_instance, kind, tp, pp):
    """tp=2, and tp=2 x pp=2 (several steps in flight: each actor must run its calls in
    order). Models and tp=4 (KV heads replicated) run on the mp executor in
    test_tensor_parallel / test_pipeline_parallel: the executor does not change the math."""
    path = tiny_models[kind]
    expected = _tokens(_llm(path, 1))
    llm = _llm(path, tp, "ray", pp=pp)
    executor = llm.llm_engine.executor
    try:
        assert type(executor).__name__ == "RayExecutor"
        assert len(set(executor.pids)) == tp * pp and os.getpid() not in executor.pids
        assert _tokens(llm) == expected
    finally:
        llm.llm_engine.shutdown()
        llm.llm_engine.shutdown()                          # idempotent
    assert _wait_until(lambda: all(_pid_gone(pid) for pid in executor.pids))
    assert _wait_until(lambda: _all_cpus_free(ray_instance))     # placement group removed


def test_killed_actor_fails_fast_naming_rank_without_leftovers(tiny_models, ray_instance):
    llm = _llm(tiny_models["llama-gqa-untied"], 2, "ray")
    engine = llm.llm_engine
    executor = engine.executor
    actors, pids = list(executor.actors), list(executor.pids)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(str(i), engine.encode_prompt(prompt),
                           SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
    for _ in range(3):                                     # mid-generation
        engine.step()
    os.kill(pids[1], signal.SIGKILL)
    started = time.monotonic()
    with pytest.raises(WorkerError, match=r"worker rank 1 died"):
        while engine.has_unfinished_requests():
            engine.step()
    assert time.monotonic() - started < 30
    assert executor.actors == []
    assert _wait_until(lambda: all(_pid_gone(pid) for pid in pids))
    for actor in actors:
        with pytest.raises(ray_instance.exceptions.RayActorError):
            ray_instance.get(actor.pid.remote(), timeout=30)
    assert _wait_until(lambda: _all_cpus_free(ray_instance))
    with pytest.raises(WorkerError, match="shut down after an earlier failure"):
        engine.step() if engine.has_unfinished_requests() else executor.submit("pid")
    engine.shutdown()


def test_rank_that_raises_is_named(tiny_models, ray_instance, tmp_path):
    from vbatch.engine.executor.ray_executor import RayExecutor
    llm = _llm(tiny_models["gpt2"], 1)
    spec = llm.llm_engine.executor.worker.spec
    spec.model_dir = spec.model_source = str(tmp_path / "missing")   # every rank fails
    with pytest.raises(WorkerError, match=r"worker rank \d failed: \w+"):
        RayExecutor(spec, tp_size=2, pp_size=1)
    assert _wait_until(lambda: _all_cpus_free(ray_instance))


def test_cluster_too_small_is_a_clear_error(tiny_models, ray_instance):
    from vbatch.engine.executor.ray_executor import RayExecutor
    spec = _llm(tiny_models["gpt2"], 1).llm_engine.executor.worker.spec
    with pytest.raises(ValueError, match=r"needs 8 bundles of \{'CPU': 1\}.*cluster has 4 CPU"):
        RayExecutor(spec, tp_size=4, pp_size=2, placement_timeout_s=1)
    assert _wait_until(lambda: _all_cpus_free(ray_instance))


def _generate_in_placement_group(model_dir: str):
    """Runs inside a Ray actor in the caller's placement group: no backend asked for."""
    llm = _llm(model_dir, 2)
    executor = llm.llm_engine.executor
    try:
        return type(executor).__name__, executor._placement.owned, _tokens(llm)
    finally:
        llm.llm_engine.shutdown()


def test_engine_inside_a_placement_group_uses_its_bundles(tiny_models, ray_instance):
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
    ray = ray_instance
    path = tiny_models["gpt2"]
    expected = _tokens(_llm(path, 1))
    group = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="PACK")
    assert group.wait(60)
    try:
        strategy = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=0)
        task = ray.remote(_generate_in_placement_group).options(
            num_cpus=0, scheduling_strategy=strategy,
            runtime_env={"env_vars": {"PYTHONPATH": os.path.dirname(__file__)}})
        name, owned, tokens = ray.get(task.remote(str(path)), timeout=240)
    finally:
        remove_placement_group(group)
    assert (name, owned) == ("RayExecutor", False)         # the caller's bundles, not a new PG
    assert tokens == expected


def test_failure_message_names_the_dead_rank_first():
    from vbatch.engine.executor.ray_executor import _describe
    assert _describe({1: ("failed", "ValueError: x")}) == "worker rank 1 failed: ValueError: x"
    assert _describe({0: ("failed", "RuntimeError: peer lost"), 1: ("died", "killed")}) == \
        "worker rank 1 died: killed; rank 0 then failed: RuntimeError: peer lost"


def test_missing_ray_is_a_one_line_value_error(tiny_models, monkeypatch):
    spec = _llm(tiny_models["gpt2"], 1).llm_engine.executor.worker.spec
    monkeypatch.setitem(sys.modules, "ray", None)          # `import ray` raises ImportError
    with pytest.raises(ValueError, match=r"pip install 'vbatch\[ray\]'") as info:
        factory.make_executor(spec, tp_size=2, pp_size=1, backend="ray")
    assert "\n" not in str(info.value)


# ---- the backend rule (no Ray needed) -------------------------------------------------------
CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


@pytest.mark.parametrize("requested", ["uni", "mp", "ray"])
def test_requested_backend_wins(requested, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)   # mp needs the 4 GPUs here
    assert factory.choose_backend(requested, world_size=1, device=CPU) == requested
    if requested != "uni":
        assert factory.choose_backend(requested, world_size=4, device=CUDA) == requested


def test_bad_requests_are_value_errors():
    with pytest.raises(ValueError, match="must be one of uni, mp, ray"):
        factory.choose_backend("dask", world_size=2, device=CPU)
    with pytest.raises(ValueError, match="single rank"):
        factory.choose_backend("uni", world_size=2, device=CPU)


def test_world_one_is_uni_and_cpu_is_mp():
    assert factory.choose_backend(None, world_size=1, device=CPU) == "uni"
    assert factory.choose_backend(None, world_size=1, device=CUDA) == "uni"
    assert factory.choose_backend(None, world_size=4, device=CPU) == "mp"


def _fake_ray(monkeypatch, *, initialized: bool, group):
    ray = types.ModuleType("ray")
    ray.is_initialized = lambda: initialized
    util = types.ModuleType("ray.util")
    util.get_current_placement_group = lambda: group
    ray.util = util
    monkeypatch.setitem(sys.modules, "ray", ray)
    monkeypatch.setitem(sys.modules, "ray.util", util)


def test_inside_a_placement_group_is_ray(monkeypatch):
    _fake_ray(monkeypatch, initialized=True, group=object())
    assert factory.choose_backend(None, world_size=2, device=CPU) == "ray"
    assert factory.choose_backend(None, world_size=1, device=CPU) == "uni"


@pytest.mark.parametrize("initialized, group", [(False, object()), (True, None)])
def test_outside_a_placement_group_is_not_ray(monkeypatch, initialized, group):
    _fake_ray(monkeypatch, initialized=initialized, group=group)
    assert factory.choose_backend(None, world_size=2, device=CPU) == "mp"


def test_not_enough_local_gpus_is_ray(monkeypatch):
    monkeypatch.setattr(backend, "in_ray_placement_group", lambda: False)
    monkeypatch.setattr(backend, "ray_is_available", lambda: True)   # else: too few GPUs
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert factory.choose_backend(None, world_size=2, device=CUDA) == "mp"
    assert factory.choose_backend(None, world_size=4, device=CUDA) == "ray"
