"""Structured outputs through the engine: every output obeys its constraint.

A tiny random model would almost never produce a label or valid JSON by itself, so these
outputs can only be right if the grammar masks reach the sampler, for greedy and sampled rows,
for forked samples, through preemption, and with tp=3 / pp=2 (whose outputs equal tp=1's).
"""
from __future__ import annotations

import json
import re

import jsonschema
import pytest

from vbatch import LLM, SamplingParams
from vbatch.engine.structured_output import StructuredOutputError, StructuredOutputsParams

LABELS = ["positive", "negative", "neutral", "it's \"mixed\""]
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "mood": {"enum": ["happy", "sad"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 2},
        "address": {"type": "object", "properties": {"zip": {"type": "integer", "minimum": 10000,
                                                            "maximum": 99999}},
                    "required": ["zip"]},
    },
    "required": ["name", "age", "mood", "address"],
    "additionalProperties": False,
}
REGEX = r"(yes|no) \d{1,3}"
PROMPTS = [f"Row {i}: label the quick brown fox" for i in range(50)]


@pytest.fixture(scope="module")
def llm(tiny_models):
    engine = LLM(str(tiny_models["llama-gqa-untied"]), dtype="float32",
                 kv_cache_memory_gb=0.02, block_size=8)
    yield engine
    engine.llm_engine.shutdown()


def _completions(llm, constraint, temperature, **extra):
    params = SamplingParams(temperature=temperature, seed=7, max_tokens=120,
                            structured_outputs=constraint, **extra)
    return [c for o in llm.generate(PROMPTS, params) for c in o.outputs]


def _texts(llm, constraint, temperature, **extra):
    """The texts of rows that all ended with their grammar (finish_reason "stop")."""
    completions = _completions(llm, constraint, temperature, **extra)
    assert [c.finish_reason for c in completions] == ["stop"] * len(completions)
    return [c.text for c in completions]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_choice_rows_are_labels(llm, temperature):
    texts = _texts(llm, StructuredOutputsParams(choice=LABELS), temperature)
    assert len(texts) == 50 and set(texts) <= set(LABELS)
    if temperature:
        assert len(set(texts)) > 1


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_rows_validate(llm, temperature):
    # A random model left free whitespace fills max_tokens with it: compact JSON.
    constraint = StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True)
    for text in _texts(llm, constraint, temperature):
        jsonschema.validate(json.loads(text), SCHEMA)


def test_regex_and_json_object_rows(llm):
    assert all(re.fullmatch(REGEX, t) for t in _texts(llm, StructuredOutputsParams(regex=REGEX),
                                                     1.0))
    # Any object: a random model's keys may run to max_tokens ("length", cut off); every row
    # the grammar ended is an object.
    completions = _completions(llm, StructuredOutputsParams(json_object=True,
                                                            disable_any_whitespace=True), 1.0)
    ended = [c.text for c in completions if c.finish_reason == "stop"]
    assert len(ended) >= 10
    assert all(isinstance(json.loads(text), dict) for text in ended)


def test_constrained_samples_and_unconstrained_rows_in_one_batch(llm):
    """n=3 forked samples each follow the grammar with their own matcher; rows without a
    constraint in the same steps are unchanged by it."""
    choice = SamplingParams(n=3, temperature=1.0, seed=2, max_tokens=20,
                            structured_outputs=StructuredOutputsParams(choice=LABELS))
    free = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    mixed = llm.generate(PROMPTS[:20], [choice, free] * 10)
    alone = llm.generate(PROMPTS[1:20:2], free)
    for output in mixed[0::2]:
        assert len(output.outputs) == 3
        assert {c.text for c in output.outputs} <= set(LABELS)
        assert all(c.finish_reason == "stop" for c in output.outputs)
    assert [o.outputs[0].token_ids for o in mixed[1::2]] == [o.outputs[0].token_ids
                                                             for o in alone]


def test_grammar_follows_preemption(tiny_models, llm):
    """A KV cache so small that constrained rows are preempted and recomputed: the outputs
    still validate and equal those of a roomy cache."""
    constraint = StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True)
    roomy = _texts(llm, constraint, 1.0)
    block_bytes = 2 * 2 * 16 * 8 * 4 * 3        # k+v, kv heads, head dim, block, fp32, layers
    tight = LLM(str(tiny_models["llama-gqa-untied"]), dtype="float32", block_size=8,
                kv_cache_memory_gb=60 * block_bytes / (1 << 30), max_model_len=192)
    try:
        squeezed = _texts(tight, constraint, 1.0)
        assert tight.llm_engine.scheduler.num_preemptions > 0
    finally:
        tight.llm_engine.shutdown()
    assert squeezed == roomy


def test_bad_spec_is_refused_per_request(llm):
    bad = SamplingParams(structured_outputs=StructuredOutputsParams(regex="(unclosed"))
    with pytest.raises(StructuredOutputError):
        llm.llm_engine.add_request("bad", [1, 2, 3], bad)
    assert not llm.llm_engine.has_unfinished_requests()


@pytest.mark.slow
def test_constrained_outputs_equal_across_tp_and_pp(tmp_path_factory):
    from conftest import save_tp3_llama
    path = save_tp3_llama(tmp_path_factory.mktemp("tp3-structured"))
    params = [SamplingParams(temperature=1.0, seed=3, max_tokens=80, structured_outputs=c)
              for c in (StructuredOutputsParams(choice=LABELS),
                        StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True),
                        StructuredOutputsParams(regex=REGEX))] * 4

    def run(**sizes):
        engine = LLM(str(path), dtype="float32", kv_cache_memory_gb=0.01, **sizes)
        try:
            return [o.outputs[0].text for o in engine.generate(PROMPTS[:12], params)]
        finally:
            engine.llm_engine.shutdown()

    expected = run()
    assert run(tensor_parallel_size=3) == expected
    assert run(pipeline_parallel_size=2) == expected
