"""OpenAI batch files: `vbatch run requests.jsonl [--output-format openai]`.

Proves, without a model: each line is read on its own (bodies of different shapes never meet
in one Arrow type; invalid JSON, a non-object line, a non-string custom_id or an unknown line
key is that line's `line_error`); files are detected from their first line (`auto`), forced
with `--input-format`, and a mix of batch and row files is refused; duplicate custom_ids and
`--output-format openai` over row files are usage errors before any model loads.
With a tiny model, one mixed file (chat and completions, n=2, logprobs, a json_schema
response_format, token ids, a bad url, an unknown body field, an invalid JSON line,
a wrong model, a method other than POST, several prompts in one line) through
`--output-format openai`: one output line per input line, every custom_id once, every
success body validates as the `openai` package's `ChatCompletion` / `Completion` with usage,
n=2 is one line with 2 choices, error lines carry status 400/404 and an error code, and greedy
text equals the same prompts run as a normal job. A job killed (SIGKILL) after some JSON lines
parts were committed resumes with `--resume` to every custom_id exactly once.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pyarrow.parquet as pq
import pytest
from conftest import run_offline, vbatch_command

from vbatch.errors import InputError, VBatchUsageError
from vbatch.io.commit_log import committed_parts
from vbatch.io.formats import detect_input_format
from vbatch.io.openai_batch import LINE_ERROR, openai_batch_batches
from vbatch.jobs.config import load_job_config
from vbatch.jobs.job_inputs import check_job_inputs

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MESSAGES = [{"role": "user", "content": "Paris is the capital of"}]
PROMPT = "The quick brown fox"


def _line(custom_id: str, url: str, body: object, method: str = "POST") -> dict:
    return {"custom_id": custom_id, "method": method, "url": url, "body": body}


def _write(path, lines: list, raw: str = ""):
    path.write_text("".join(json.dumps(line) + "\n" for line in lines) + raw)
    return path


def test_lines_are_read_one_by_one(tmp_path):
    path = _write(tmp_path / "b.jsonl", [
        _line("a", CHAT, {"messages": MESSAGES, "response_format": {"type": "json_object"}}),
        _line("b", COMPLETIONS, {"prompt": [1, 2], "stop": "x"}),
        {"custom_id": 3, "url": CHAT, "body": {}},
        {**_line("d", CHAT, {}), "extra": 1},
    ], raw='[1, 2]\n\n{"custom_id": "e", broken\n')
    rows = [row for batch in openai_batch_batches(path, 2) for row in batch.to_pylist()]
    assert [row["custom_id"] for row in rows] == ["a", "b", None, "d", None, None]
    assert json.loads(rows[1]["body"]) == {"prompt": [1, 2], "stop": "x"}
    errors = [row[LINE_ERROR] for row in rows]
    assert errors[:2] == [None, None]
    assert "custom_id must be a string" in errors[2]
    assert "unknown key 'extra'" in errors[3]
    assert "not a request object" in errors[4] and "not valid JSON" in errors[5]
    assert detect_input_format([path], "auto") == "openai"
    rows_file = _write(tmp_path / "rows.jsonl", [{"prompt": "hi"}])
    assert detect_input_format([rows_file], "auto") == "rows"
    assert detect_input_format([path], "rows") == "rows"
    with pytest.raises(InputError, match="is an OpenAI batch file but"):
        detect_input_format([path, rows_file], "auto")


def test_usage_errors_before_the_model_loads(tmp_path):
    batch = _write(tmp_path / "dup.jsonl", [_line("x", CHAT, {"messages": MESSAGES})] * 2)
    config = load_job_config({"input": str(batch), "output": str(tmp_path / "o")}, None)
    with pytest.raises(VBatchUsageError, match="custom_id 'x' appears more than once"):
        check_job_inputs(config)
    rows = _write(tmp_path / "rows.jsonl", [{"prompt": "hi"}])
    config = load_job_config({"input": str(rows), "output": str(tmp_path / "o"),
                              "output_format": "openai"}, None)
    with pytest.raises(VBatchUsageError, match="needs OpenAI batch files as input"):
        check_job_inputs(config)


# --- with a tiny model ---------------------------------------------------------------------

GREEDY = {"temperature": 0, "max_tokens": 6, "ignore_eos": True}
YES_NO = {"type": "string", "enum": ["yes", "no"]}


def _mixed_lines(model: str) -> tuple[list[dict], str]:
    lines = [
        _line("chat", CHAT, {"messages": MESSAGES, **GREEDY}),
        _line("chat-model", CHAT, {"model": model, "messages": MESSAGES, **GREEDY}),
        _line("cmpl", COMPLETIONS, {"prompt": PROMPT, **GREEDY, "logprobs": 2}),
        _line("n2", CHAT, {"messages": MESSAGES, "n": 2, "temperature": 1.0, "seed": 7,
                           "max_completion_tokens": 5, "logprobs": True, "top_logprobs": 2}),
        _line("json", CHAT, {"messages": MESSAGES, "max_tokens": 16, "temperature": 0,
                             "response_format": {"type": "json_schema", "json_schema": {
                                 "name": "answer", "schema": YES_NO}}}),
        _line("tokens", COMPLETIONS, {"prompt": [5, 6, 7], "max_tokens": 3, "logprobs": 1}),
        _line("bad-url", "/v1/embeddings", {"input": "x"}),
        _line("unknown-field", COMPLETIONS, {"prompt": "x", "frobnicate": 1}),
        _line("wrong-model", COMPLETIONS, {"prompt": "x", "model": "gpt-4o"}),
        _line("get", COMPLETIONS, {"prompt": "x"}, method="GET"),
        _line("two-prompts", COMPLETIONS, {"prompt": ["a", "b"]}),
    ]
    return lines, '{"custom_id": "broken", "url": \n'


def _job(source, model, output, *extra: str) -> list[str]:
    return [*vbatch_command(), "run", str(source), "--model", str(model), "--output",
            str(output), "--dtype", "float32", *extra]


def _output_lines(output) -> list[dict]:
    manifest = json.loads((output / "_manifest.json").read_text())
    names = [part["name"] for part in manifest["output"]["part_files"]]
    assert sorted(path.name for path in output.glob("part-*")) == sorted(names)
    return [json.loads(line) for name in names
            for line in (output / name).read_text().splitlines()]


def _validate(line: dict):
    """The body of a success line as the openai package's type."""
    from openai.types import Completion
    from openai.types.chat import ChatCompletion
    assert line["error"] is None and line["response"]["status_code"] == 200
    body = line["response"]["body"]
    kind = ChatCompletion if body["object"] == "chat.completion" else Completion
    parsed = kind.model_validate(body)
    assert parsed.usage.total_tokens == parsed.usage.prompt_tokens + \
        parsed.usage.completion_tokens > 0
    return parsed


def test_a_mixed_batch_file_to_openai_output(tiny_models, tmp_path):
    model = tiny_models["llama-gqa-untied"]
    lines, broken = _mixed_lines(str(model))
    source = _write(tmp_path / "requests.jsonl", lines, raw=broken)
    result = run_offline(_job(source, model, tmp_path / "out", "--output-format", "openai"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "_SUCCESS").exists()
    out = _output_lines(tmp_path / "out")
    assert len(out) == len(lines) + 1
    by_id = {line["custom_id"]: line for line in out}
    assert len(by_id) == len(out) and set(by_id) == {line["custom_id"] for line in lines} | {None}
    parsed = {custom_id: _validate(by_id[custom_id])
              for custom_id in ("chat", "chat-model", "cmpl", "n2", "json", "tokens")}
    assert parsed["chat"].choices[0].message.content == \
        parsed["chat-model"].choices[0].message.content
    assert parsed["chat"].usage.completion_tokens == 6
    assert [choice.index for choice in parsed["n2"].choices] == [0, 1]
    assert all(len(choice.logprobs.content) == len(choice.logprobs.content[:5]) > 0
               for choice in parsed["n2"].choices)
    assert parsed["n2"].usage.completion_tokens == sum(
        len(choice.logprobs.content) for choice in parsed["n2"].choices)
    assert len(parsed["cmpl"].choices[0].logprobs.tokens) == 6
    assert parsed["json"].choices[0].finish_reason == "stop"
    assert json.loads(parsed["json"].choices[0].message.content) in YES_NO["enum"]
    assert parsed["tokens"].usage.prompt_tokens == 3
    assert len(parsed["tokens"].choices[0].logprobs.top_logprobs[0]) >= 1
    expected = {"bad-url": (400, "invalid_request"), "unknown-field": (400, "invalid_request"),
                "wrong-model": (404, "model_not_found"), "get": (400, "invalid_request"),
                "two-prompts": (400, "invalid_request"), None: (400, "invalid_json")}
    for custom_id, (status, code) in expected.items():
        line = by_id[custom_id]
        assert line["response"]["status_code"] == status, line
        assert line["error"]["code"] == code and line["error"]["message"]
        assert line["response"]["body"]["error"]["code"] == code
    assert "frobnicate" in by_id["unknown-field"]["error"]["message"]
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["counts"]["rows"] == len(out)
    assert manifest["counts"]["error_rows"] == len(expected)

    # the same prompts as a normal job: the same greedy text
    chat_rows = _write(tmp_path / "chat.jsonl", [{"messages": MESSAGES}])
    text_rows = _write(tmp_path / "text.jsonl", [{"prompt": PROMPT}])
    flags = ("--temperature", "0", "--max-tokens", "6", "--ignore-eos")
    for rows, custom_id, text_of in ((chat_rows, "chat", lambda c: c.message.content),
                                     (text_rows, "cmpl", lambda c: c.text)):
        output = tmp_path / f"normal-{custom_id}"
        result = run_offline(_job(rows, model, output, *flags))
        assert result.returncode == 0, result.stderr
        normal = pq.read_table(output).to_pylist()[0]
        assert text_of(parsed[custom_id].choices[0]) == normal["generated_text"]


def _num_committed_parts(output) -> int:
    try:
        return len(committed_parts(output))
    except (OSError, ValueError):
        return 0


def test_a_killed_openai_job_resumes_each_line_once(tiny_models, tmp_path):
    lines = [_line(f"r{i}", CHAT if i % 2 else COMPLETIONS,
                   {"temperature": 0, "max_tokens": 48, "ignore_eos": True,
                    **({"messages": [{"role": "user", "content": f"row {i}"}]} if i % 2
                       else {"prompt": f"row {i} says"})})
             for i in range(30)]
    source = _write(tmp_path / "requests.jsonl", lines)
    output = tmp_path / "out"
    args = _job(source, tiny_models["llama-gqa-untied"], output, "--output-format", "openai",
                "--rows-per-file", "2", "--batch-size", "2", "--max-num-seqs", "2")
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 120
    while _num_committed_parts(output) < 2 and process.poll() is None:
        assert time.monotonic() < deadline, "no part was committed"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    assert not (output / "_SUCCESS").exists(), "the job finished before it could be killed"
    committed_rows = sum(part["num_rows"] for part in committed_parts(output))

    resumed = run_offline(args + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr
    manifest = json.loads((output / "_manifest.json").read_text())
    assert manifest["status"] == "complete" and (output / "_SUCCESS").exists()
    # the killed run's committed parts are kept whole (2 lines each, or fewer when a part was
    # committed on time: --commit-interval-s)
    assert 2 <= manifest["counts"]["resumed_rows"] == committed_rows < len(lines)
    out = _output_lines(output)
    assert sorted(line["custom_id"] for line in out) == sorted(line["custom_id"]
                                                               for line in lines)
    for line in out:
        assert _validate(line).usage.completion_tokens == 48
