"""One executor decision: the plan (`vbatch run --dry-run`) names the executor the engine uses.

Proves: `executor/backend.py` is the rule (unknown names, `uni` for several ranks, and too few
GPUs for `mp` are one-line ValueErrors); for a table of tp / pp / GPUs / replicas / requested
backend / placement group / Ray installed, `make_plan(...).executor` equals what the engine's
own decision path (`factory.choose_backend`, which `LLMEngine` calls) picks in the process where
that replica's engine runs; and end to end on CPU, the dry run's `executor` line is the
`executor_backend` of the engine built for the same config.
"""
from __future__ import annotations

import json
import re

import pytest
import torch
from click.testing import CliRunner

from vbatch.engine.config import EngineConfig
from vbatch.engine.executor import backend, factory
from vbatch.engine.platform import resolve_device
from vbatch.errors import VBatchUsageError
from vbatch.jobs.cli import main
from vbatch.jobs.config import JobConfig
from vbatch.jobs.plan import Resources, make_plan


# ---- the rule itself ------------------------------------------------------------------------
def _rule(requested, world, *, device="cpu", gpus=0, in_group=False, ray=True):
    return backend.choose_backend(requested, world_size=world, device_type=device,
                                  num_visible_gpus=gpus, in_placement_group=in_group,
                                  ray_available=lambda: ray)


def test_backends_are_the_one_list_of_names():
    assert backend.BACKENDS == ("uni", "mp", "ray")


@pytest.mark.parametrize("requested, world, kwargs, expected", [
    (None, 1, {}, "uni"),
    (None, 4, {}, "mp"),                                         # CPU: always processes
    (None, 2, {"in_group": True}, "ray"),
    (None, 1, {"in_group": True}, "uni"),
    (None, 2, {"device": "cuda", "gpus": 2}, "mp"),
    (None, 4, {"device": "cuda", "gpus": 2}, "ray"),             # more GPUs than this node
    ("mp", 2, {"in_group": True}, "mp"),
    ("ray", 4, {"device": "cuda", "gpus": 0, "ray": False}, "ray"),   # ray_cluster says why
    ("uni", 1, {"device": "cuda", "gpus": 0}, "uni"),            # one rank: torch's business
])
def test_rule_table(requested, world, kwargs, expected):
    assert _rule(requested, world, **kwargs) == expected


@pytest.mark.parametrize("requested, world, kwargs, message", [
    ("dask", 2, {}, "must be one of uni, mp, ray; got 'dask'"),
    ("uni", 2, {}, "'uni' runs a single rank"),
    ("mp", 4, {"device": "cuda", "gpus": 2}, "needs 4 GPUs; 2 visible on this node"),
    (None, 4, {"device": "cuda", "gpus": 2, "ray": False}, "needs 4 GPUs; 2 visible"),
])
def test_rule_refusals_are_one_line_value_errors(requested, world, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        _rule(requested, world, **kwargs)
    assert "\n" not in str(info.value)


def test_ray_availability_is_asked_only_when_it_matters():
    calls = []

    def ray_available():
        calls.append(1)
        return True
    for world, device, gpus in [(1, "cuda", 0), (2, "cpu", 0), (2, "cuda", 2)]:
        backend.choose_backend(None, world_size=world, device_type=device,
                               num_visible_gpus=gpus, in_placement_group=False,
                               ray_available=ray_available)
    assert calls == []


# ---- plan == engine -------------------------------------------------------------------------
def _engine_view(plan, num_gpus: int, in_group: bool) -> tuple[int, bool]:
    """(visible CUDA GPUs, in a placement group) of the process that runs replica 0's engine:
    this process (fast path), a replica process pinned to its device group, or a Ray Data
    actor that reserved tp x pp GPUs."""
    if plan.runner == "local" and plan.num_replicas == 1:
        return num_gpus, in_group
    if plan.runner == "local":
        return len(plan.device_groups[0]), False
    return (plan.world_size if num_gpus else 0), False


def _engine_decision(monkeypatch, requested, world, *, visible, in_group, ray) -> str:
    """What `LLMEngine` decides in a process that sees `visible` GPUs: its own device
    resolution and its own `factory.choose_backend` call, under patched torch.cuda / Ray."""
    with monkeypatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: visible > 0)
        patch.setattr(torch.cuda, "device_count", lambda: visible)
        patch.setattr(backend, "in_ray_placement_group", lambda: in_group)
        patch.setattr(backend, "ray_is_available", lambda: ray)
        patch.delenv("VBATCH_DEVICE", raising=False)     # a GPU host's default, not the suite's
        device = resolve_device(None)                 # the engine's default (JobConfig's)
        return factory.choose_backend(requested, world_size=world, device=device)


PLAN_TABLE = [
    # tp, pp, GPUs, fields, in placement group, Ray installed
    (1, 1, 0, {}, False, True),
    (2, 1, 0, {}, False, True),
    (1, 2, 0, {}, False, False),
    (2, 1, 0, {}, True, True),                          # the CLI itself runs in a PG: ray
    (2, 1, 0, {"distributed_executor_backend": "mp"}, True, True),
    (2, 1, 0, {"distributed_executor_backend": "ray"}, False, True),
    (2, 2, 0, {"replicas": 2}, True, True),             # replica processes: never in a PG
    (2, 1, 0, {"runner": "ray", "replicas": 2}, False, True),
    (1, 1, 1, {}, True, True),
    (2, 1, 8, {}, False, True),                         # 4 replica processes of 2 GPUs
    (2, 1, 8, {"replicas": 1}, False, True),            # fast path: sees all 8
    (2, 1, 2, {"replicas": 1}, True, True),
    (2, 1, 2, {"distributed_executor_backend": "ray"}, False, True),
    (2, 2, 8, {"replicas": 2, "distributed_executor_backend": "mp"}, False, False),
    (4, 1, 2, {"runner": "ray"}, False, True),          # each actor reserves 4 GPUs
    (4, 1, 2, {}, False, True),                         # auto: Ray runner, needs 4 GPUs
    (4, 1, 2, {"runner": "ray", "distributed_executor_backend": "ray"}, False, True),
    (4, 1, 2, {"runner": "local", "distributed_executor_backend": "mp"}, False, True),
    (4, 1, 2, {"runner": "local"}, False, False),
]


@pytest.mark.parametrize("tp, pp, num_gpus, fields, in_group, ray", PLAN_TABLE)
def test_plan_executor_is_the_engines_choice(monkeypatch, tp, pp, num_gpus, fields, in_group,
                                             ray):
    requested = fields.get("distributed_executor_backend")
    config = JobConfig(input="x.jsonl", tensor_parallel_size=tp, pipeline_parallel_size=pp,
                       **fields).validate()
    resources = Resources(num_cpus=16, gpu_ids=tuple(str(i) for i in range(num_gpus)))
    with monkeypatch.context() as patch:
        patch.setattr(backend, "in_ray_placement_group", lambda: in_group)
        try:
            plan = make_plan(config, resources, ray_available=lambda: ray)
        except VBatchUsageError:
            plan = None
    if plan is None:             # the plan refuses: so does the engine where it would run
        with pytest.raises(ValueError):
            _engine_decision(monkeypatch, requested, tp * pp, visible=num_gpus,
                             in_group=in_group, ray=ray)
        return
    visible, engine_in_group = _engine_view(plan, num_gpus, in_group)
    assert plan.executor == _engine_decision(monkeypatch, requested, tp * pp, visible=visible,
                                             in_group=engine_in_group, ray=ray)


# ---- end to end on CPU: dry run line == engine.executor_backend -----------------------------
def _dry_run_executor(tmp_path, model, args) -> str:
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(3)))
    try:
        runner = CliRunner(mix_stderr=False)
    except TypeError:                      # click >= 8.2 keeps stderr apart by itself
        runner = CliRunner()
    result = runner.invoke(main, ["run", str(source), "--model", str(model), "--dry-run",
                                  "--runner", "local", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    found = re.search(r"^\s*executor\s+(\S+)\s*$", result.stdout, re.MULTILINE)
    assert found, result.stdout
    return found.group(1)


@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 1), (1, 2)])
def test_dry_run_names_the_engines_executor(tmp_path, tiny_models, tp, pp):
    from vbatch.engine.llm_engine import LLMEngine

    model = tiny_models["llama-gqa-untied"]
    planned = _dry_run_executor(tmp_path, model, ["--tp", str(tp), "--pp", str(pp)])
    engine = LLMEngine(EngineConfig(model=str(model), dtype="float32", kv_cache_memory_gb=0.01,
                                    tensor_parallel_size=tp, pipeline_parallel_size=pp))
    try:
        assert engine.executor_backend == planned
    finally:
        engine.shutdown()
