"""A rank on a node that does not see the engine's model directory resolves `--model` itself.

(A Ray rank on another node: its object-store model is fetched into that node's cache, its GGUF
converted there.) The rank built from the source has the same weights as the engine's own, and
a source that resolves to another checkpoint is refused.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from vbatch import LLM
from vbatch.engine.worker import Worker


def test_rank_without_the_model_dir_resolves_the_source(tiny_models, tmp_path):
    llm = LLM(str(tiny_models["llama-gqa-untied"]), dtype="float32", kv_cache_memory_gb=0.01)
    worker = llm.llm_engine.executor.worker
    elsewhere = dataclasses.replace(worker.spec, model_dir=str(tmp_path / "not-on-this-node"))
    rank = Worker(elsewhere)
    ours = dict(worker.model_runner.model.named_parameters())
    theirs = dict(rank.model_runner.model.named_parameters())
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)
    other = dataclasses.replace(elsewhere, model_source=str(tiny_models["llama-gqa-tied"]))
    with pytest.raises(ValueError, match="different checkpoint"):
        Worker(other)
