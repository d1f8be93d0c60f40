"""The `ray` executor across nodes: a two-node local Ray cluster (two raylets on this machine,
one CPU each, so a 2-bundle PACK placement group must span both nodes).

Proves: an engine with tp=2 over the ray executor puts its two rank actors on different Ray
nodes and gives greedy tokens identical to tp=1; a `vbatch run --pp 2
--distributed-executor-backend ray` job pointed at the cluster by RAY_ADDRESS runs one pipeline
stage on each node and writes the same text as tp=1; both remove their placement group.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pyarrow.parquet as pq

from vbatch import LLM, SamplingParams

PROMPTS = ["The quick brown fox", "Paris is", "def add(a, b):\n    return a", "Once"]
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


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


def _vbatch(*args, env_extra):
    exe = shutil.which("vbatch")
    command = [exe] if exe else [sys.executable, "-m", "vbatch"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **env_extra}
    return subprocess.run(command + list(args), capture_output=True, text=True, env=env,
                          timeout=300)


def test_pp2_cli_job_one_stage_per_node(tmp_path, tiny_models, two_node_cluster):
    ray, cluster = two_node_cluster
    model = str(tiny_models["llama-gqa-untied"])
    rows = [{"id": f"r{i}", "prompt": PROMPTS[i % len(PROMPTS)]} for i in range(6)]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    before = set(_groups())
    result = _vbatch("run", str(source), "--model", model, "--max-tokens", "8",
                     "--temperature", "0", "--dtype", "float32", "--kv-cache-memory-gb", "0.01",
                     "--pp", "2", "--distributed-executor-backend", "ray", "--runner", "local",
                     "--output", str(tmp_path / "out"),
                     env_extra={"RAY_ADDRESS": cluster.address})
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "_SUCCESS").is_file()
    parts = sorted(str(part) for part in (tmp_path / "out").glob("part-*.parquet"))
    got = {r["id"]: r["generated_text"] for r in pq.read_table(parts).to_pylist()}
    reference = LLM(model, dtype="float32", kv_cache_memory_gb=0.01)
    params = SamplingParams(temperature=0, max_tokens=8)
    expected = {row["id"]: out.outputs[0].text for row, out in
                zip(rows, reference.generate([row["prompt"] for row in rows], params))}
    assert got == expected
    # The job's placement group: stage 0 (rank 0) and stage 1 (rank 1) on different nodes,
    # removed when the job ended.
    new = [g for key, g in _groups().items() if key not in before]
    assert len(new) == 1 and new[0]["state"] == "REMOVED"
    nodes = new[0]["bundles_to_node_id"]
    assert nodes[0] != nodes[1]
    assert set(nodes.values()) == {node["NodeID"] for node in ray.nodes() if node["Alive"]}
