"""`--logprobs K` and `--prompt-logprobs K` in jobs: the output columns, their Arrow types and
their values.

Proves, without a model: `logprobs` / `cumulative_logprob` / `prompt_logprobs` are in the
output schema only when asked for, with the issue's types (written out here independently);
the column builder keeps null cells, null entries (a prompt's first token) and empty lists, and
takes the engine's own `TokenLogprob` objects; input columns with these names are refused.
End to end on a tiny random LLaMA (float32, `--n 2 --temperature 0.8 --logprobs 2
--prompt-logprobs 1`): the columns have the declared types; every generated and prompt token's
logprob, rank and top alternatives equal HF transformers' log-softmax of its own logits
(within 1e-4, ranks equal); logprob <= 0, rank >= 1, tops sorted most likely first, a rank-1
token's logprob is its top entry's; `cumulative_logprob` is the sum; an error row has them null.
"""
from __future__ import annotations

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import PROMPTS, run_offline, vbatch_command

from vbatch.engine.outputs import TokenLogprob, TopLogprob
from vbatch.errors import InputError
from vbatch.io.logprob_columns import LOGPROBS_TYPE, logprobs_array
from vbatch.io.schema import (
    CUMULATIVE_LOGPROB,
    LOGPROBS,
    OUTPUT_COLUMNS,
    PROMPT_LOGPROBS,
    SAMPLE_INDEX,
    OutputColumns,
    build_output_batch,
    output_schema,
)

#: The issue's type, spelled out: list<struct<token_id: int32, token: string, logprob: float32,
#: rank: int32, top_logprobs: list<struct<token_id: int32, token: string, logprob: float32>>>>.
EXPECTED_TYPE = pa.list_(pa.struct([
    ("token_id", pa.int32()), ("token", pa.string()), ("logprob", pa.float32()),
    ("rank", pa.int32()),
    ("top_logprobs", pa.list_(pa.struct([("token_id", pa.int32()), ("token", pa.string()),
                                         ("logprob", pa.float32())])))]))


def test_columns_are_there_only_when_asked_for():
    schema = pa.schema([("prompt", pa.string())])
    assert output_schema(schema).names == ["prompt", *OUTPUT_COLUMNS]
    both = OutputColumns.for_job(n=1, logprobs=0, prompt_logprobs=3, input_names=["prompt"])
    names = output_schema(schema, both).names
    assert names == ["prompt", "generated_text", "finish_reason", "num_prompt_tokens",
                     "num_generated_tokens", CUMULATIVE_LOGPROB, LOGPROBS, PROMPT_LOGPROBS,
                     "error"]
    only_prompt = OutputColumns.for_job(n=1, logprobs=None, prompt_logprobs=0,
                                        input_names=["prompt"])
    assert LOGPROBS not in output_schema(schema, only_prompt).names
    full = output_schema(schema, both)
    assert full.field(LOGPROBS).type.equals(EXPECTED_TYPE)
    assert full.field(PROMPT_LOGPROBS).type.equals(EXPECTED_TYPE)
    assert full.field(CUMULATIVE_LOGPROB).type == pa.float64()
    for name in (LOGPROBS, PROMPT_LOGPROBS, CUMULATIVE_LOGPROB):
        with pytest.raises(InputError, match=f"input column '{name}' has the name of a column"):
            output_schema(pa.schema([("prompt", pa.string()), (name, pa.string())]))


def test_the_column_builder_keeps_nulls_and_takes_the_engines_objects():
    entry = TokenLogprob(token_id=7, token="a", logprob=-0.5, rank=1,
                         top_logprobs=[TopLogprob(7, "a", -0.5), TopLogprob(3, "b", -1.25)])
    as_dict = {"token_id": 3, "token": "b", "logprob": -1.25, "rank": 2, "top_logprobs": []}
    array = logprobs_array([[None, entry], None, [], [as_dict]])
    assert array.type.equals(EXPECTED_TYPE)
    assert array.to_pylist() == [
        [None, {"token_id": 7, "token": "a", "logprob": -0.5, "rank": 1,
                "top_logprobs": [{"token_id": 7, "token": "a", "logprob": -0.5},
                                 {"token_id": 3, "token": "b", "logprob": -1.25}]}],
        None, [], [as_dict]]
    batch = pa.record_batch({"prompt": ["p", "q"]})
    columns = OutputColumns(logprobs=True, prompt_logprobs=True)
    generated = {"generated_text": "a", "finish_reason": "length", "num_prompt_tokens": 2,
                 "num_generated_tokens": 1, CUMULATIVE_LOGPROB: -0.5, LOGPROBS: [entry],
                 PROMPT_LOGPROBS: [None, entry]}
    out = build_output_batch(batch, [generated, {"error": "empty_prompt: e"}], columns)
    rows = out.to_pylist()
    assert rows[0][LOGPROBS][0]["top_logprobs"][1]["token"] == "b"
    assert rows[0][PROMPT_LOGPROBS][0] is None
    assert [rows[1][name] for name in (CUMULATIVE_LOGPROB, LOGPROBS, PROMPT_LOGPROBS)] == \
        [None, None, None]
    with pytest.raises(ValueError, match="an error row must not set 'logprobs'"):
        build_output_batch(batch.slice(0, 1), [{"error": "x: y", LOGPROBS: []}], columns)


# --- end to end, against HF transformers ----------------------------------------------------------

K, PROMPT_K = 2, 1


@pytest.fixture(scope="module")
def logprob_job(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("logprobs")
    rows = [{"id": f"r{i}", "prompt": f"{PROMPTS[i % len(PROMPTS)]} {i}"} for i in range(6)]
    rows.append({"id": "empty", "prompt": ""})
    source = root / "in.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    output = root / "out"
    model = tiny_models["llama-gqa-untied"]
    result = run_offline([*vbatch_command(), "run", str(source), "--model", str(model),
                          "--output", str(output), "--dtype", "float32", "--n", "2",
                          "--temperature", "0.8", "--seed", "1", "--max-tokens", "6",
                          "--logprobs", str(K), "--prompt-logprobs", str(PROMPT_K)])
    assert result.returncode == 0, result.stderr
    return model, pq.read_table(output)


def test_the_columns_have_the_declared_types(logprob_job):
    _, table = logprob_job
    assert table.schema.field(LOGPROBS).type.equals(EXPECTED_TYPE)
    assert table.schema.field(PROMPT_LOGPROBS).type.equals(EXPECTED_TYPE)
    assert table.schema.field(CUMULATIVE_LOGPROB).type == pa.float64()
    assert table.schema.field(SAMPLE_INDEX).type == pa.int32()
    assert LOGPROBS_TYPE.equals(EXPECTED_TYPE)


def _check_entry(entry: dict, top_k: int) -> None:
    assert entry["logprob"] <= 0 and entry["rank"] >= 1
    tops = [top["logprob"] for top in entry["top_logprobs"]]
    assert len(tops) == top_k
    assert tops == sorted(tops, reverse=True)
    assert entry["logprob"] <= tops[0] + 1e-6
    if entry["rank"] == 1:
        assert entry["logprob"] == pytest.approx(tops[0], abs=1e-6)
        assert entry["top_logprobs"][0]["token_id"] == entry["token_id"]


def test_values_are_sane_and_equal_hf_log_softmax(logprob_job):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, table = logprob_job
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    rows = table.to_pylist()
    error_rows = [row for row in rows if row["error"] is not None]
    assert [row["id"] for row in error_rows] == ["empty"]
    assert all(error_rows[0][name] is None
               for name in (LOGPROBS, PROMPT_LOGPROBS, CUMULATIVE_LOGPROB, SAMPLE_INDEX))
    generated = [row for row in rows if row["error"] is None]
    assert len(generated) == 12
    for row in generated:
        logprobs, prompt_logprobs = row[LOGPROBS], row[PROMPT_LOGPROBS]
        assert len(logprobs) == row["num_generated_tokens"]
        assert len(prompt_logprobs) == row["num_prompt_tokens"] and prompt_logprobs[0] is None
        prompt_ids = tokenizer(row["prompt"])["input_ids"]
        assert [entry["token_id"] for entry in prompt_logprobs[1:]] == prompt_ids[1:]
        assert row[CUMULATIVE_LOGPROB] == pytest.approx(
            math.fsum(entry["logprob"] for entry in logprobs), abs=1e-4)
        for entry in logprobs:
            _check_entry(entry, K)
        for entry in prompt_logprobs[1:]:
            _check_entry(entry, PROMPT_K)
        # HF's log-softmax of its own logits at every position (raw logits: no temperature)
        ids = prompt_ids + [entry["token_id"] for entry in logprobs]
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0].float()
        expected = torch.log_softmax(logits, dim=-1)
        for position, entry in enumerate(prompt_logprobs[1:] + logprobs, start=1):
            reference = expected[position - 1]
            token = ids[position]
            assert entry["token_id"] == token
            assert entry["logprob"] == pytest.approx(reference[token].item(), abs=1e-4)
            assert entry["rank"] == int((reference >= reference[token]).sum())
            top_k = len(entry["top_logprobs"])
            values, indices = reference.topk(top_k)
            assert [top["token_id"] for top in entry["top_logprobs"]] == indices.tolist()
            assert [top["logprob"] for top in entry["top_logprobs"]] == pytest.approx(
                values.tolist(), abs=1e-4)
            assert isinstance(entry["token"], str)
    # the two samples of a row share the prompt's logprobs
    by_id: dict[str, list[dict]] = {}
    for row in generated:
        by_id.setdefault(row["id"], []).append(row)
    for samples in by_id.values():
        assert [s[SAMPLE_INDEX] for s in samples] == [0, 1]
        assert samples[0][PROMPT_LOGPROBS] == samples[1][PROMPT_LOGPROBS]
