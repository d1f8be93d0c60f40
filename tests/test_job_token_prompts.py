"""Token-id prompts (`prompt_token_ids`) and per-row `stop` / `logprobs` / `prompt_logprobs` /
`ignore_eos` columns.

Proves, without a model: a `prompt_token_ids` column is found when it is the only prompt-like
column (a `prompt` column wins; `--prompt-column prompt_token_ids` names it), other types are
refused before the model loads, `--chat` with token ids is a usage error; bad cells (text, a
float, an id outside the vocabulary, empty) are error rows with a code; a JSON lines file that
mixes lists and text in `prompt_token_ids` / `stop` is read, not refused; per-row cells convert
(stop as a string or list, ignore_eos as a boolean or its text) and bad ones are `bad_sampling`
rows; integer `logprobs` / `prompt_logprobs` input columns are requests, replaced in the output
by the logprob columns, which then exist for the whole job (null where a row did not ask).
With a tiny model, `vbatch run` in-process and with 2 local replicas: a token-id prompt
generates exactly what its text prompt generates; per-row max_tokens, stop, ignore_eos and
prompt_logprobs take effect row by row; both runners write the same rows.
"""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import run_offline, vbatch_command

from vbatch.engine.sampling_params import SamplingParams
from vbatch.errors import InputError, VBatchUsageError
from vbatch.io import reader
from vbatch.io.mixed_text import python_values
from vbatch.io.schema import PROMPT_LOGPROBS, OutputColumns, check_input_schema, output_schema
from vbatch.jobs.row_errors import RowError
from vbatch.jobs.row_prompts import RowPrompts
from vbatch.jobs.row_sampling import RowSampling
from vbatch.jobs.row_token_ids import token_ids_cell


def test_the_token_column_is_found_and_checked():
    tokens = pa.list_(pa.int64())
    schema = pa.schema([("id", pa.string()), ("prompt_token_ids", tokens)])
    assert check_input_schema(schema, prompt_column="prompt", file="f") == "prompt_token_ids"
    assert check_input_schema(schema, prompt_column="prompt_token_ids",
                              file="f") == "prompt_token_ids"
    both = schema.append(pa.field("prompt", pa.string()))
    assert check_input_schema(both, prompt_column="prompt", file="f") == "prompt"
    chat = schema.append(pa.field("messages", pa.list_(pa.struct([("role", pa.string()),
                                                                   ("content", pa.string())]))))
    assert check_input_schema(chat, prompt_column="prompt", file="f") == "messages"
    assert check_input_schema(chat, prompt_column="prompt_token_ids",
                              file="f") == "prompt_token_ids"
    with pytest.raises(InputError, match="must be a list of token ids"):
        check_input_schema(pa.schema([("prompt_token_ids", pa.list_(pa.string()))]),
                           prompt_column="prompt", file="f")
    with pytest.raises(VBatchUsageError, match="--chat needs text prompts"):
        RowPrompts("prompt_token_ids", "id", chat=True)


def test_bad_token_cells_are_row_errors():
    assert token_ids_cell([1, 2.0, 3], 10) == [1, 2, 3]
    assert token_ids_cell("[4, 5]", 10) == [4, 5]
    codes = {repr(cell): token_ids_cell(cell, 10) for cell in
             (None, [], "hello", [1, 2.5], [1, 10], [-1], [True], {"a": 1})}
    assert {key: error.code for key, error in codes.items()} == {
        "None": "empty_prompt", "[]": "empty_prompt", "'hello'": "bad_token_ids",
        "[1, 2.5]": "bad_token_ids", "[1, 10]": "bad_token_ids", "[-1]": "bad_token_ids",
        "[True]": "bad_token_ids", "{'a': 1}": "bad_token_ids"}
    assert "outside the vocabulary (0..9)" in codes["[1, 10]"].message


def test_mixed_json_cells_are_read(tmp_path):
    path = tmp_path / "mixed.jsonl"
    rows = [{"prompt_token_ids": [1, 2], "stop": ["a", "b"]},
            {"prompt_token_ids": "x", "stop": "c"}, {"prompt_token_ids": [3]}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    batch = next(reader.read_batches([path]))
    assert reader.prompt_column_of(batch.schema) == "prompt_token_ids"
    assert python_values(batch.column("prompt_token_ids")) == [[1, 2], "x", [3]]
    params = RowSampling(SamplingParams(stop=["z"])).for_batch(batch)
    assert [p.stop_strings for p in params] == [("a", "b"), ("c",), ("z",)]


def test_per_row_cells_convert_and_bad_cells_are_bad_sampling():
    batch = pa.record_batch({
        "stop": [["x", "y"], None, [], None, None, None],
        "ignore_eos": pa.array([None, True, None, None, None, None], pa.bool_()),
        "logprobs": pa.array([None, None, 2, 21, None, None], pa.int64()),
        "prompt_logprobs": pa.array([None, None, None, None, 0, -1], pa.int64())})
    params = RowSampling(SamplingParams(stop="s")).for_batch(batch)
    assert params[0].stop_strings == ("x", "y") and params[0].logprobs is None
    assert params[1].ignore_eos and params[1].stop_strings == ("s",)
    assert params[2].stop_strings == () and params[2].logprobs == 2
    assert isinstance(params[3], RowError) and params[3].code == "bad_sampling"
    assert "logprobs must be <= 20, got 21" in params[3].message
    assert params[4].prompt_logprobs == 0
    assert isinstance(params[5], RowError) and "prompt_logprobs" in params[5].message
    text = RowSampling(SamplingParams()).for_batch(pa.record_batch({
        "ignore_eos": ["true", "0", "maybe"], "stop": ["x", None, None]}))
    assert text[0].ignore_eos and text[0].stop_strings == ("x",) and not text[1].ignore_eos
    assert isinstance(text[2], RowError) and "ignore_eos must be true or false" in str(text[2])


def test_request_columns_are_replaced_by_the_logprob_columns():
    schema = pa.schema([("prompt", pa.string()), ("prompt_logprobs", pa.int64())])
    assert check_input_schema(schema, prompt_column="prompt", file="f") == "prompt"
    columns = OutputColumns.for_job(n=1, logprobs=None, prompt_logprobs=None,
                                    input_names=schema.names)
    assert columns == OutputColumns(prompt_logprobs=True)
    names = output_schema(schema, columns).names
    assert names.count(PROMPT_LOGPROBS) == 1 and names[0] == "prompt"
    with pytest.raises(InputError, match="input column 'prompt_logprobs' has the name"):
        check_input_schema(schema.set(1, pa.field("prompt_logprobs", pa.string())),
                           prompt_column="prompt", file="f")


# --- with a tiny model ---------------------------------------------------------------------

TEXTS = ["The quick brown fox", "Paris is", "def add(a, b):", "Once upon a time"]


@pytest.fixture(scope="module")
def token_job(tiny_models, tmp_path_factory):
    """A JSON lines job of token-id prompts (the tokens of TEXTS) with per-row columns, and a
    text job of the same prompts: (root, model, token input, text rows by prompt)."""
    from transformers import AutoTokenizer
    model = tiny_models["llama-gqa-untied"]
    tokenizer = AutoTokenizer.from_pretrained(model)
    root = tmp_path_factory.mktemp("tokens")
    rows = [{"prompt_token_ids": tokenizer.encode(text), "max_tokens": 3 + i}
            for i, text in enumerate(TEXTS)]
    rows[1].update(prompt_logprobs=1, ignore_eos=True)
    rows.append({"prompt_token_ids": [1, 10**6]})
    source = root / "tokens.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    texts = root / "texts.jsonl"
    texts.write_text("".join(json.dumps({"prompt": text, "max_tokens": 3 + i}) + "\n"
                             for i, text in enumerate(TEXTS)))
    result = run_offline(_job(texts, model, root / "text-out"))
    assert result.returncode == 0, result.stderr
    by_text = {row["prompt"]: row for row in pq.read_table(root / "text-out").to_pylist()}
    return root, model, source, by_text


def _job(source, model, output, *extra: str) -> list[str]:
    return [*vbatch_command(), "run", str(source), "--model", str(model), "--output",
            str(output), "--dtype", "float32", "--temperature", "0", "--batch-size", "2",
            *extra]


# Over 2 local replicas, token-id prompts run in tests/test_lm_eval.py (data_parallel_size=2
# is a job of prompt_token_ids rows whose metrics must equal HF's).
@pytest.mark.parametrize("extra", [()], ids=["in-process"])
def test_token_prompts_generate_as_their_text(token_job, extra):
    root, model, source, by_text = token_job
    output = root / f"out-{len(extra)}"
    result = run_offline(_job(source, model, output, *extra))
    assert result.returncode == 0, result.stderr
    rows = sorted(pq.read_table(output).to_pylist(), key=lambda row: row["id"])
    assert len(rows) == len(TEXTS) + 1
    for i, (row, text) in enumerate(zip(rows, TEXTS)):
        expected = by_text[text]
        assert row["error"] is None
        assert row["num_prompt_tokens"] == expected["num_prompt_tokens"]
        assert row["num_generated_tokens"] <= 3 + i
        if i != 1:      # row 1 ignores EOS: it may generate past the text row's EOS
            assert row["generated_text"] == expected["generated_text"]
        assert (row[PROMPT_LOGPROBS] is not None) == (i == 1)
    assert rows[1]["num_generated_tokens"] == 4          # ignore_eos: exactly max_tokens
    assert len(rows[1][PROMPT_LOGPROBS]) == rows[1]["num_prompt_tokens"]
    assert rows[1][PROMPT_LOGPROBS][0] is None
    assert rows[-1]["error"].startswith("bad_token_ids: prompt_token_ids[1] = 1000000")


def test_per_row_stop_cuts_its_row_only(token_job, tmp_path):
    root, model, _, by_text = token_job
    generated = by_text[TEXTS[3]]["generated_text"]
    assert len(generated) >= 2, "the tiny model generated too little to test a stop string"
    stop = generated[1:]
    source = tmp_path / "stop.jsonl"
    source.write_text(json.dumps({"prompt": TEXTS[3], "max_tokens": 6, "stop": stop}) + "\n"
                      + json.dumps({"prompt": TEXTS[3], "max_tokens": 6}) + "\n")
    result = run_offline(_job(source, model, tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    stopped, free = sorted(pq.read_table(tmp_path / "out").to_pylist(),
                           key=lambda row: row["id"])
    assert stopped["generated_text"] == generated[:1]
    assert stopped["finish_reason"] == "stop"
    assert free["generated_text"].startswith(generated)
