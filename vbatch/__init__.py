"""vbatch: batch (offline) LLM inference jobs on our own paged-KV engine.

`from vbatch import LLM, SamplingParams` gives the Python API (vLLM's names); the `vbatch`
command runs whole dataset jobs. Heavy modules (torch, transformers) load on first use.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "LLM": "vbatch.engine.llm",
    "SamplingParams": "vbatch.engine.sampling_params",
    "RequestOutput": "vbatch.engine.outputs",
    "CompletionOutput": "vbatch.engine.outputs",
    "Logprob": "vbatch.engine.outputs",
    "TokenLogprob": "vbatch.engine.outputs",
    "StructuredOutputsParams": "vbatch.engine.structured_output",
    "LLMEngine": "vbatch.engine.llm_engine",
    "EngineConfig": "vbatch.engine.config",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vbatch' has no attribute {name!r}")
