"""Per-row errors: a bad row is written with `error` set and null generation columns, the other
rows generate exactly as they would without it; `--on-long-prompt truncate`; per-row sampling
columns; `--max-error-rate` -> exit code 3 without `_SUCCESS`.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vbatch.engine.sampling_params import SamplingParams
from vbatch.errors import TooManyRowErrors, VBatchUsageError
from vbatch.io.schema import OUTPUT_COLUMNS, build_output_batch
from vbatch.jobs.config import JobConfig, load_job_config
from vbatch.jobs.row_errors import ErrorBudget, RowError
from vbatch.jobs.row_prompts import PromptEncoder, RowPrompts
from vbatch.jobs.row_sampling import RowSampling

GOOD = ["The quick brown fox", "Paris is", "def add(a, b):", "Once upon a time",
        "Batch inference turns", "Berlin is the capital", "Numbers 0123", "The lazy dog"]
LONG = "The quick brown fox jumps over the lazy dog. " * 20          # ~220 tokens
MAX_MODEL_LEN = 64
PARAMS = SamplingParams(temperature=0.8, seed=3, max_tokens=6)
GEN_COLUMNS = [name for name in OUTPUT_COLUMNS if name != "error"]


# --- units: no model ------------------------------------------------------------------------

def test_row_error_text_is_one_short_line():
    assert str(RowError("empty_prompt", "the prompt\nis empty")) == \
        "empty_prompt: the prompt is empty"
    assert len(str(RowError("tokenize", "x" * 1000))) < 320
    with pytest.raises(ValueError, match="unknown row error code"):
        RowError("oops", "message")


def test_row_sampling_overrides_and_rejects_bad_values():
    sampling = RowSampling(PARAMS)
    batch = pa.RecordBatch.from_pylist([
        {"temperature": None, "top_k": None, "max_tokens": None, "seed": None},
        {"temperature": 0.0, "top_k": -1, "max_tokens": 9.0, "seed": 11},
        {"temperature": -1.0, "top_k": None, "max_tokens": None, "seed": None},
        {"temperature": math.nan, "top_k": None, "max_tokens": None, "seed": None},
        {"temperature": None, "top_k": None, "max_tokens": 2.5, "seed": None},
        {"temperature": None, "top_k": None, "max_tokens": 0.0, "seed": None},
        {"temperature": None, "top_k": None, "max_tokens": None, "seed": -4},
    ])
    same, greedy, negative, nan, fraction, zero, bad_seed = sampling.for_batch(batch)
    assert same is PARAMS
    assert (greedy.temperature, greedy.top_k, greedy.max_tokens, greedy.seed) == (0, 0, 9, 11)
    assert greedy.top_p == PARAMS.top_p
    assert str(negative) == "bad_sampling: temperature must be >= 0, got -1.0"
    assert str(nan).startswith("bad_sampling: temperature must be a finite number")
    assert str(fraction).startswith("bad_sampling: max_tokens must be an integer")
    assert str(zero) == "bad_sampling: max_tokens must be >= 1, got 0"
    assert str(bad_seed).startswith("bad_sampling: seed must be an integer >= 0")
    text = pa.RecordBatch.from_pylist([{"top_p": "0.5"}, {"top_p": "hot"}, {"top_p": "0"}])
    half, word, zero_p = sampling.for_batch(text)     # CSV columns may hold numbers as text
    assert half.top_p == 0.5
    assert str(word) == "bad_sampling: top_p must be a number, got 'hot'"
    assert str(zero_p).startswith("bad_sampling: top_p must be in (0, 1]")
    plain = pa.RecordBatch.from_pylist([{"prompt": "x"}])
    assert sampling.for_batch(plain) == [PARAMS]


def test_error_budget():
    def counts(rows, errors):
        return SimpleNamespace(num_rows=rows, num_error_rows=errors, first_error="row r1: x")

    ErrorBudget(None, 10).check_final(counts(10, 10))
    ErrorBudget(0.1).check_final(counts(10, 1))                # 10% is not more than 10%
    with pytest.raises(TooManyRowErrors, match=r"3 of 10 rows failed \(30.0%\), more than "
                                               r"--max-error-rate 0.1; first: row r1: x"):
        ErrorBudget(0.1).check_final(counts(10, 3))
    ErrorBudget(0.1, total_rows=100).check_progress(counts(20, 10))
    with pytest.raises(TooManyRowErrors, match="11 of 100 rows"):
        ErrorBudget(0.1, total_rows=100).check_progress(counts(20, 11))  # failure is certain
    ErrorBudget(0.1, total_rows=None).check_progress(counts(20, 20))     # total unknown
    with pytest.raises(TooManyRowErrors):
        ErrorBudget(0.0).check_final(counts(10, 1))
    assert not issubclass(TooManyRowErrors, ValueError)                 # exit 3, not 2


def test_output_batch_with_error_rows():
    batch = pa.RecordBatch.from_pylist([{"id": "a", "prompt": "x"}, {"id": "b", "prompt": ""}])
    good = {"generated_text": "y", "finish_reason": "stop", "num_prompt_tokens": 2,
            "num_generated_tokens": 1}
    out = build_output_batch(batch, [good, {"error": "empty_prompt: the prompt is empty"}])
    assert out.schema.field("error").type == pa.string()
    rows = out.to_pylist()
    assert rows[0]["error"] is None and rows[0]["generated_text"] == "y"
    assert rows[1]["error"] == "empty_prompt: the prompt is empty"
    assert all(rows[1][name] is None for name in GEN_COLUMNS)
    with pytest.raises(ValueError, match="must not set 'generated_text'"):
        build_output_batch(batch, [good, {"error": "x: y", "generated_text": "z"}])
    with pytest.raises(ValueError, match="non-empty string"):
        build_output_batch(batch, [good, {"error": ""}])


def test_job_config_fields_yaml_and_env(tmp_path):
    assert JobConfig(input="x").validate().max_error_rate is None
    for bad in ({"max_error_rate": 1.5}, {"max_error_rate": -0.1},
                {"max_error_rate": math.nan}, {"on_long_prompt": "drop"}):
        with pytest.raises(VBatchUsageError, match="on-long-prompt|max-error-rate"):
            JobConfig(input="x", **bad).validate()
    config_file = tmp_path / "job.yaml"
    config_file.write_text("input: in.jsonl\non-long-prompt: truncate\nmax_error_rate: 0.25\n")
    config = load_job_config({}, str(config_file))
    assert (config.on_long_prompt, config.max_error_rate) == ("truncate", 0.25)


def test_flags_and_env_vars_reach_the_config_and_exit_code_3(monkeypatch):
    """--on-long-prompt / --max-error-rate and their VBATCH_* variables reach JobConfig; a
    TooManyRowErrors from the job is exit code 3 with one line (runner faked: no model)."""
    import types

    from click.testing import CliRunner

    import vbatch.jobs
    from vbatch.jobs.cli import main

    seen = []

    def run_job(config, reporter):
        seen.append(config)
        raise TooManyRowErrors("3 of 10 rows failed (30.0%), more than --max-error-rate 0.1")

    fake = types.ModuleType("vbatch.jobs.runner")
    fake.run_job = run_job
    monkeypatch.setitem(sys.modules, "vbatch.jobs.runner", fake)
    monkeypatch.setattr(vbatch.jobs, "runner", fake, raising=False)
    for name in [name for name in os.environ if name.startswith("VBATCH_")]:
        monkeypatch.delenv(name)
    invoke = CliRunner().invoke
    result = invoke(main, ["run", "in.jsonl", "--on-long-prompt", "truncate",
                           "--max-error-rate", "0.1"], catch_exceptions=False)
    assert result.exit_code == 3
    assert result.output.strip().splitlines() == [
        "Error: 3 of 10 rows failed (30.0%), more than --max-error-rate 0.1"]
    assert (seen[-1].on_long_prompt, seen[-1].max_error_rate) == ("truncate", 0.1)
    invoke(main, ["run", "in.jsonl"], catch_exceptions=False,
           env={"VBATCH_ON_LONG_PROMPT": "truncate", "VBATCH_MAX_ERROR_RATE": "0.5"})
    assert (seen[-1].on_long_prompt, seen[-1].max_error_rate) == ("truncate", 0.5)
    invoke(main, ["run", "in.jsonl"], catch_exceptions=False)
    assert (seen[-1].on_long_prompt, seen[-1].max_error_rate) == ("error", None)
    bad = invoke(main, ["run", "in.jsonl", "--max-error-rate", "2"], catch_exceptions=False)
    assert bad.exit_code == 2 and "--max-error-rate must be in [0, 1]" in bad.output


def test_chat_without_a_template_fails_the_job_not_every_row():
    engine = SimpleNamespace(tokenizer=SimpleNamespace(chat_template=None), max_model_len=64)
    PromptEncoder(engine, RowPrompts("prompt", "id", chat=False))
    with pytest.raises(VBatchUsageError, match="--chat was given but the model's tokenizer "
                                               "has no chat template"):
        PromptEncoder(engine, RowPrompts("prompt", "id", chat=True))
    with pytest.raises(VBatchUsageError, match="messages column"):
        PromptEncoder(engine, RowPrompts("messages", "id", chat=False))


def test_tokenizer_failure_isolates_the_row():
    def encode_many(texts):
        raise RuntimeError("batch failed")

    def encode_one(text):
        if text == "bad":
            raise RuntimeError("cannot tokenize")
        return [len(text)]

    results = PromptEncoder._tokenize(["ab", "bad", RowError("empty_prompt", "e"), "abcd"],
                                      encode_many, encode_one)
    assert results[0] == [2] and results[3] == [4]
    assert str(results[1]) == "tokenize: RuntimeError: cannot tokenize"
    assert str(results[2]) == "empty_prompt: e"


# --- the replica with a tiny model ----------------------------------------------------------

@pytest.fixture(scope="module")
def engine(tiny_models):
    from vbatch.engine.config import EngineConfig
    from vbatch.engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineConfig(model=str(tiny_models["llama-gqa-tied"]), dtype="float32",
                                    max_model_len=MAX_MODEL_LEN, kv_cache_memory_gb=0.02,
                                    max_num_seqs=4))
    yield engine
    engine.shutdown()


def _run(engine, rows, *, batch_size=4, params=PARAMS, prompts=None):
    """Run rows through a fresh Replica; return (rows by id, counters, progress totals)."""
    from vbatch.jobs.replica import Replica

    names = list(dict.fromkeys(name for row in rows for name in row))
    table = pa.Table.from_pylist([{name: row.get(name) for name in names} for row in rows])
    replica = Replica(engine, params, prompts or RowPrompts("prompt", "id", chat=False),
                      max_in_flight=3)
    progress = [0, 0, 0]

    def on_progress(*increments):
        for index, value in enumerate(increments):
            progress[index] += value

    outputs = list(replica.process(table.to_batches(max_chunksize=batch_size), on_progress))
    by_id = {row["id"]: row for batch in outputs for row in batch.to_pylist()}
    assert sum(batch.num_rows for batch in outputs) == len(rows) == len(by_id)
    return by_id, replica.counters, progress


def test_bad_rows_are_error_rows_and_good_rows_are_unchanged(engine):
    good = [{"id": f"g{i}", "prompt": text} for i, text in enumerate(GOOD)]
    bad = [{"id": "null", "prompt": None}, {"id": "empty", "prompt": ""},
           {"id": "blank", "prompt": "  \n\t"}, {"id": "long", "prompt": LONG},
           {"id": "hot", "prompt": "Paris is", "temperature": -1.0}]
    # g0, g1 | all five bad rows (one batch of errors only) | the rest interleaved
    mixed = good[:2] + bad[:4] + bad[4:] + good[2:4] + [good[4]] + good[5:]
    expected, _, _ = _run(engine, good)
    got, counters, progress = _run(engine, mixed)
    for row in good:
        assert got[row["id"]]["error"] is None
        assert got[row["id"]]["generated_text"] == expected[row["id"]]["generated_text"]
        assert got[row["id"]]["num_generated_tokens"] >= 1
    codes = {key: got[key]["error"].split(":")[0] for key in ("null", "empty", "blank", "long",
                                                               "hot")}
    assert codes == {"null": "empty_prompt", "empty": "empty_prompt", "blank": "empty_prompt",
                     "long": "prompt_too_long", "hot": "bad_sampling"}
    assert got["long"]["error"].startswith(
        f"prompt_too_long: 220 prompt tokens >= max_model_len {MAX_MODEL_LEN}")
    assert got["hot"]["error"] == "bad_sampling: temperature must be >= 0, got -1.0"
    for key in codes:
        assert all(got[key][name] is None for name in GEN_COLUMNS), got[key]
        assert got[key]["prompt"] == next(r["prompt"] for r in bad if r["id"] == key)
    assert (counters.num_rows, counters.num_error_rows) == (len(mixed), len(bad))
    assert counters.first_error == "row null: empty_prompt: the prompt is empty or null"
    assert progress[0] == len(mixed) and progress[2] == len(bad)
    assert progress[1] == counters.num_output_tokens == sum(
        expected[r["id"]]["num_generated_tokens"] for r in good)


def test_truncate_keeps_the_last_tokens_and_leaves_room(engine):
    from vbatch.jobs.replica import Replica

    rows = [{"id": "g0", "prompt": GOOD[0], "max_tokens": None},
            {"id": "long", "prompt": LONG, "max_tokens": None},
            {"id": "long20", "prompt": LONG, "max_tokens": 20}]
    truncate = RowPrompts("prompt", "id", chat=False, on_long_prompt="truncate")
    got, counters, _ = _run(engine, rows, prompts=truncate)
    assert all(row["error"] is None for row in got.values())
    assert got["long"]["num_prompt_tokens"] == MAX_MODEL_LEN - PARAMS.max_tokens
    assert got["long20"]["num_prompt_tokens"] == MAX_MODEL_LEN - 20
    assert got["long"]["num_generated_tokens"] >= 1
    assert counters.num_truncated_rows == 2 and counters.num_error_rows == 0
    encoder = Replica(engine, PARAMS, truncate).encoder
    full = engine.encode_prompt(prompt=LONG)
    assert encoder.fit(full, 6) == full[-(MAX_MODEL_LEN - 6):]
    assert encoder.fit(full, 500) == full[-1:]             # at least one prompt token
    assert encoder.fit(full, None) == full[-(MAX_MODEL_LEN - 1):]
    short = engine.encode_prompt(prompt=GOOD[0])
    assert encoder.fit(short, 500) == short                 # only prompts with no room are cut


def test_per_row_sampling_columns_override_the_job(engine):
    rows = [{"id": "g0", "prompt": GOOD[0], "temperature": 0.0, "max_tokens": 3},
            {"id": "g1", "prompt": GOOD[1], "temperature": None, "max_tokens": None}]
    got, _, _ = _run(engine, rows)
    greedy, _, _ = _run(engine, [{"id": "g0", "prompt": GOOD[0]}],
                        params=SamplingParams(temperature=0, max_tokens=3, seed=3))
    sampled, _, _ = _run(engine, [{"id": "g1", "prompt": GOOD[1]}])
    assert got["g0"]["generated_text"] == greedy["g0"]["generated_text"]
    assert got["g0"]["num_generated_tokens"] <= 3
    assert got["g1"]["generated_text"] == sampled["g1"]["generated_text"]


RAISING_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role: ' + message['role']) }}{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def strict_template_model(tiny_models, tmp_path_factory):
    """The tiny llama with a chat template that raises on an unknown role."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("strict-template") / "model"
    shutil.copytree(tiny_models["llama-gqa-tied"], path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = RAISING_TEMPLATE
    tokenizer.save_pretrained(path)
    return path


def test_messages_rows_that_break_the_chat_template(strict_template_model):
    from vbatch.engine.config import EngineConfig
    from vbatch.engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineConfig(model=str(strict_template_model), dtype="float32",
                                    max_model_len=MAX_MODEL_LEN, kv_cache_memory_gb=0.02))
    try:
        hello = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
        rows = [{"id": "ok", "messages": hello},
                {"id": "robot", "messages": [{"role": "robot", "content": "beep"}]},
                {"id": "empty", "messages": []}, {"id": "null", "messages": None},
                {"id": "nocontent", "messages": [{"role": "user", "content": None}]},
                {"id": "ok2", "messages": hello[1:]}]
        got, counters, _ = _run(engine, rows, prompts=RowPrompts("messages", "id", chat=False))
    finally:
        engine.shutdown()
    assert got["robot"]["error"] == "chat_template: TemplateError: unknown role: robot"
    assert got["empty"]["error"] == got["null"]["error"] == \
        "empty_prompt: the messages list is empty or null"
    assert got["nocontent"]["error"] == \
        "bad_messages: turn 1: content must be a string, got None"
    for key, conversation in (("ok", hello), ("ok2", hello[1:])):
        assert got[key]["error"] is None and got[key]["generated_text"] is not None
        assert got[key]["num_prompt_tokens"] == len(engine.encode_prompt(messages=conversation))
    assert counters.num_error_rows == 4


# --- through the installed CLI --------------------------------------------------------------

def _parts(directory):
    return pq.read_table(sorted(directory.glob("part-*.parquet")))


def _vbatch(*args):
    exe = shutil.which("vbatch")
    command = [exe] if exe else [sys.executable, "-m", "vbatch"]
    return subprocess.run(command + list(args), capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_cli_error_rows_truncate_and_max_error_rate(tmp_path, tiny_models):
    rows = [{"id": f"r{i}", "prompt": GOOD[i % len(GOOD)]} for i in range(10)]
    rows[2]["prompt"], rows[5]["prompt"], rows[8]["prompt"] = None, "", LONG
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    common = ["run", str(source), "--model", str(tiny_models["llama-gqa-tied"]),
              "--max-tokens", "4", "--max-model-len", str(MAX_MODEL_LEN), "--seed", "1",
              "--kv-cache-memory-gb", "0.02", "--rows-per-file", "4"]

    result = _vbatch(*common, "--output", str(tmp_path / "errors"))
    assert result.returncode == 0, result.stderr
    out = {row["id"]: row for row in _parts(tmp_path / "errors").to_pylist()}
    assert sorted(out) == sorted(row["id"] for row in rows)
    assert {key for key, row in out.items() if row["error"]} == {"r2", "r5", "r8"}
    assert out["r8"]["error"].startswith("prompt_too_long:")
    assert all(out[key]["generated_text"] is None for key in ("r2", "r5", "r8"))
    manifest = json.loads((tmp_path / "errors" / "_manifest.json").read_text())
    assert manifest["counts"]["rows"] == 10 and manifest["counts"]["error_rows"] == 3
    assert "3 with errors" in result.stderr

    result = _vbatch(*common, "--on-long-prompt", "truncate", "--output", str(tmp_path / "cut"))
    assert result.returncode == 0, result.stderr
    out = {row["id"]: row for row in _parts(tmp_path / "cut").to_pylist()}
    assert out["r8"]["error"] is None and out["r8"]["num_generated_tokens"] >= 1
    assert out["r8"]["num_prompt_tokens"] == MAX_MODEL_LEN - 4

    result = _vbatch(*common, "--max-error-rate", "0.1", "-q", "--output", str(tmp_path / "fail"))
    assert result.returncode == 3, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: 3 of 10 rows failed (30.0%), more than "
                                "--max-error-rate 0.1; first: row r2: empty_prompt")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "fail" / "_SUCCESS").exists()
    assert _parts(tmp_path / "fail").num_rows == 10       # the rows so far stay, to inspect
