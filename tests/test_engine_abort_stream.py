"""LLMEngine.abort_request and streamed (stream=True) requests.

Aborting removes a request wherever it is (waiting, running, forked samples, a pipeline step in
flight) and frees its KV blocks, without changing what the other requests generate; a streamed
request yields cumulative snapshots that only grow and end in exactly the non-streamed output.
"""
from __future__ import annotations

import pytest

from vbatch import LLM, SamplingParams

PROMPTS = [f"Row {i}: the quick brown fox jumps" for i in range(6)]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_models):
    engine = LLM(str(tiny_models["llama-gqa-untied"]), dtype="float32", max_num_seqs=3,
                 kv_cache_memory_gb=0.01, block_size=8)
    yield engine
    engine.llm_engine.shutdown()


def _drain(engine) -> list:
    outputs = []
    while engine.has_unfinished_requests():
        outputs.extend(engine.step())
    return outputs


def _texts(outputs) -> dict[str, list[str]]:
    return {o.request_id: [c.text for c in o.outputs] for o in outputs if o.finished}


def test_abort_waiting_running_and_forked_requests_frees_blocks(llm):
    engine = llm.llm_engine
    idle = engine.num_free_kv_blocks
    expected = _texts(llm.generate(PROMPTS, GREEDY))
    sampled = SamplingParams(n=3, temperature=0.9, seed=3, max_tokens=12, ignore_eos=True)
    for index, prompt in enumerate(PROMPTS):
        engine.add_request(str(index), engine.encode_prompt(prompt=prompt), GREEDY)
    engine.add_request("forked", engine.encode_prompt(prompt=PROMPTS[0]), sampled)
    for _ in range(3):
        engine.step()
    running = {s.request_id for s in engine.scheduler.running}
    waiting = {s.request_id for s in engine.scheduler.waiting}
    assert "0" in running and "5" in waiting and engine.num_free_kv_blocks < idle
    assert engine.abort_request("0") and engine.abort_request("5")
    assert not engine.abort_request("5") and not engine.abort_request("never-added")
    outputs = _drain(engine)
    assert engine.num_free_kv_blocks == idle
    texts = _texts(outputs)
    assert set(texts) == {"1", "2", "3", "4", "forked"}
    assert all(texts[key] == expected[key] for key in ("1", "2", "3", "4"))
    # the forked samples: abort one mid-flight, after its samples were forked
    engine.add_request("forked-again", engine.encode_prompt(prompt=PROMPTS[0]), sampled)
    engine.step()
    engine.step()
    assert sum(s.request_id == "forked-again" for s in engine.scheduler.running) == 3
    assert engine.abort_request("forked-again")
    assert not engine.has_unfinished_requests() and engine.num_free_kv_blocks == idle


def test_streamed_snapshots_grow_and_end_in_the_batch_output(llm):
    engine = llm.llm_engine
    params = SamplingParams(n=2, temperature=0.8, seed=5, max_tokens=10, stop=["ab", "xyz"],
                            logprobs=1)
    prompt_ids = engine.encode_prompt(prompt=PROMPTS[1])
    [expected] = llm.generate([{"prompt_token_ids": prompt_ids}], params)
    engine.add_request("streamed", prompt_ids, params, stream=True, row_key="0")  # as generate
    engine.add_request("plain", engine.encode_prompt(prompt=PROMPTS[2]), GREEDY)
    outputs = _drain(engine)
    snapshots = [o for o in outputs if o.request_id == "streamed"]
    assert [o.finished for o in outputs if o.request_id == "plain"] == [True]
    assert len(snapshots) >= 9 and snapshots[-1].finished
    assert not any(o.finished for o in snapshots[:-1])
    for earlier, later in zip(snapshots, snapshots[1:]):
        for before, after in zip(earlier.outputs, later.outputs):
            assert after.text.startswith(before.text)
            assert after.token_ids[:len(before.token_ids)] == before.token_ids
            assert len(after.token_logprobs) == len(after.token_ids)
    final = snapshots[-1]
    assert [c.text for c in final.outputs] == [c.text for c in expected.outputs]
    assert [c.token_ids for c in final.outputs] == [c.token_ids for c in expected.outputs]
    assert snapshots[0].outputs[0].finish_reason is None


def test_abort_during_pipeline_steps_in_flight(tiny_models):
    llm = LLM(str(tiny_models["llama-gqa-untied"]), dtype="float32", pipeline_parallel_size=2,
              kv_cache_memory_gb=0.01, block_size=8)
    engine = llm.llm_engine
    try:
        idle = engine.num_free_kv_blocks
        for index, prompt in enumerate(PROMPTS[:4]):
            engine.add_request(str(index), engine.encode_prompt(prompt=prompt), GREEDY)
        engine.step()       # both virtual engines start a step; the first one's is collected
        [in_flight] = [ve.in_flight for ve in engine.virtual_engines if ve.in_flight]
        assert in_flight[0].seqs
        for index in range(4):
            assert engine.abort_request(str(index))
        assert engine.num_free_kv_blocks == idle
        assert _drain(engine) == []
        # the engine still serves after dropping the in-flight results
        [output] = llm.generate([PROMPTS[0]], GREEDY)
        assert len(output.outputs[0].token_ids) == 12
        assert engine.num_free_kv_blocks == idle
    finally:
        engine.shutdown()
