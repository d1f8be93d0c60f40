"""CUDA choices made by construction, checked on CPU with the CUDA calls stood in for.

`--dtype auto` picks bfloat16 only on GPUs of compute capability >= 8.0 (V100 / T4 only emulate
it, which `torch.cuda.is_bf16_supported()` counts); a rank selects its GPU before it joins the
NCCL group and binds the group to it.
"""
from __future__ import annotations

import pytest
import torch

from vbatch.engine.platform import resolve_dtype
from vbatch.parallel import state


@pytest.mark.parametrize("capability, expected", [((7, 0), torch.float16), ((7, 5), torch.float16),
                                                  ((8, 0), torch.bfloat16),
                                                  ((9, 0), torch.bfloat16)])
def test_auto_dtype_follows_compute_capability(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)   # emulation
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_dtype("auto", torch.device("cuda", 0)) == expected
    assert resolve_dtype("float32", torch.device("cuda", 0)) == torch.float32


def test_auto_dtype_without_a_visible_gpu_is_refused_not_guessed(monkeypatch):
    """The ray executor's engine on a GPU-less node cannot read its ranks' capability."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ValueError, match="sees 0 CUDA GPU.*explicit --dtype"):
        resolve_dtype("auto", torch.device("cuda", 0))
    assert resolve_dtype("bfloat16", torch.device("cuda", 0)) == torch.bfloat16


def test_rank_sets_its_gpu_before_joining_the_nccl_group(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set", device)))
    monkeypatch.setattr(state.dist, "init_process_group",
                        lambda **kwargs: calls.append(("init", kwargs)))
    monkeypatch.setattr(state.dist, "new_group", lambda ranks, timeout=None: tuple(ranks))
    device = torch.device("cuda", 1)
    ps = state.init_parallel_state(world_rank=1, tp_size=2, pp_size=1, init_method="tcp://x:1",
                                   device=device)
    assert calls[0] == ("set", device)
    assert calls[1][0] == "init" and calls[1][1]["backend"] == "nccl"
    assert calls[1][1]["device_id"] == device
    assert ps.tp.ranks == [0, 1] and ps.tp.rank_in_group == 1


def test_cpu_ranks_use_gloo_without_a_device(monkeypatch):
    seen = {}
    monkeypatch.setattr(state.dist, "init_process_group", lambda **kwargs: seen.update(kwargs))
    monkeypatch.setattr(state.dist, "new_group", lambda ranks, timeout=None: tuple(ranks))
    state.init_parallel_state(world_rank=0, tp_size=2, pp_size=1, init_method="tcp://x:1",
                              device=torch.device("cpu"))
    assert seen["backend"] == "gloo" and "device_id" not in seen


def test_vbatch_device_pins_cpu_on_a_gpu_host(monkeypatch):
    from vbatch.engine.platform import resolve_device
    from vbatch.errors import VBatchUsageError
    from vbatch.jobs.plan import local_resources

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("VBATCH_DEVICE", "cpu")
    assert resolve_device(None) == torch.device("cpu")
    assert local_resources().gpu_ids == ()
    assert resolve_device("cuda") == torch.device("cuda", 0)       # an explicit device wins
    monkeypatch.delenv("VBATCH_DEVICE")
    assert resolve_device(None) == torch.device("cuda", 0)
    assert len(local_resources().gpu_ids) == 4
    monkeypatch.setenv("VBATCH_DEVICE", "gpu")
    with pytest.raises(VBatchUsageError, match="VBATCH_DEVICE must be cpu, cuda or cuda:N"):
        resolve_device(None)


def test_co_located_ray_ranks_see_each_others_gpus():
    from vbatch.engine.executor.ray_executor import co_located_gpus

    nodes = ["a", "a", "b", "a", "b"]
    gpus = [["3"], ["1"], ["0"], ["10"], ["2"]]
    assert co_located_gpus(nodes, gpus) == [("1,3,10", 1), ("1,3,10", 0), ("0,2", 0),
                                            ("1,3,10", 2), ("0,2", 1)]
    assert co_located_gpus(["a", "a"], [[], []]) == [None, None]     # CPU ranks: unchanged
