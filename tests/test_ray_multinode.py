"""The `ray` executor across nodes: a two-node local Ray cluster (two raylets on this machine,
one CPU each, so a 2-bundle PACK placement group must span both nodes).

Proves: an engine with world size 2 puts its two ranks on different Ray nodes and gives greedy
tokens identical to tp=1, and that the placement group is removed afterwards.
"""
from __future__ import annotations

import pytest

from vbatch import LLM, SamplingParams

PROMPTS = ["The quick brown fox", "Paris is", "def add(a, b):\n    return a", "Once"]
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def two_node_cluster():
    """(ray, cluster): a head and a worker raylet with one CPU each; this process connected."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, log_to_driver=False, logging_level="warning")
        cluster.wait_for_nodes()
        yield ray, cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def _tokens(llm):
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]


def _groups() -> dict[str, dict]:
    """Every placement group the cluster has seen (removed ones stay, state REMOVED)."""
    from ray.util.placement_group import placement_group_table
    return placement_group_table()


def test_tp2_ranks_on_two_nodes_match_tp1(tiny_models, two_node_cluster):
    ray, _ = two_node_cluster
    path = str(tiny_models["llama-gqa-untied"])
    expected = _tokens(LLM(path, dtype="float32", kv_cache_memory_gb=0.01))
    before = set(_groups())
    llm = LLM(path, dtype="float32", kv_cache_memory_gb=0.01, tensor_parallel_size=2,
              distributed_executor_backend="ray")
    try:
        node_ids = llm.llm_engine.executor.node_ids
        assert len(set(node_ids)) == 2
        assert set(node_ids) == {node["NodeID"] for node in ray.nodes() if node["Alive"]}
        assert _tokens(llm) == expected
    finally:
        llm.llm_engine.shutdown()
    new = [g for key, g in _groups().items() if key not in before]
    assert len(new) == 1 and new[0]["state"] == "REMOVED"
    assert set(new[0]["bundles_to_node_id"].values()) == set(node_ids)
