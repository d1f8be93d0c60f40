"""The installed `vbatch` console script end to end, on small real files and a tiny model.

Proves: Parquet, JSONL and CSV inputs give every input row exactly once in the output, with
passthrough columns intact, `_SUCCESS` and the manifest present; the generation columns are
filled; bad flags and inputs exit with code 2 and a one-line message without a traceback.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest

PROMPTS = ["The quick brown fox", "Paris is", "def add(a, b):", "Once upon a time",
           "Batch inference turns", "Berlin is the capital"]


def _vbatch(*args, cwd=None, env_extra=None):
    exe = shutil.which("vbatch")
    command = [exe] if exe else [sys.executable, "-m", "vbatch"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run(command + list(args), capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


def _rows(n):
    return [{"prompt": PROMPTS[i % len(PROMPTS)], "category": f"c{i % 3}", "score": i * 0.5,
             "ordinal": i} for i in range(n)]


def _write(path, rows):
    table = pa.Table.from_pylist(rows)
    if path.suffix == ".parquet":
        pq.write_table(table, path)
    elif path.suffix == ".csv":
        pa_csv.write_csv(table, path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl", ".csv"])
def test_every_row_exactly_once_with_passthrough(tmp_path, tiny_models, suffix):
    rows = _rows(23)
    source = tmp_path / f"prompts{suffix}"
    _write(source, rows)
    result = _vbatch("run", str(source), "--model", str(tiny_models["llama-gqa-tied"]),
                     "--max-tokens", "6", "--temperature", "0.7", "--seed", "3",
                     "--max-num-seqs", "4", "--rows-per-file", "10", "--dtype", "float32",
                     *(["--csv-infer-types"] if suffix == ".csv" else []))
    assert result.returncode == 0, result.stderr
    out_dir = tmp_path / "prompts.vbatch"
    assert (out_dir / "_SUCCESS").is_file()
    manifest = json.loads((out_dir / "_manifest.json").read_text())
    assert manifest["counts"]["rows"] == 23
    parts = sorted(out_dir.glob("part-*.parquet"))
    assert len(parts) == 3                                  # 10 + 10 + 3 rows
    table = pq.read_table(parts)
    assert table.num_rows == 23
    ids = table.column("id").to_pylist()
    assert sorted(ids) == sorted(f"prompts{suffix}:{i}" for i in range(23))
    by_ordinal = {r["ordinal"]: r for r in table.to_pylist()}
    for original in rows:
        got = by_ordinal[original["ordinal"]]
        assert {k: got[k] for k in original} == original
        assert got["finish_reason"] in ("stop", "length")
        assert 1 <= got["num_generated_tokens"] <= 6
        assert got["num_prompt_tokens"] > 0
        assert isinstance(got["generated_text"], str)
    assert "rows" in result.stderr and "output tok/s" in result.stderr


def test_chat_flag_and_yaml_config(tmp_path, tiny_models):
    source = tmp_path / "in.jsonl"
    _write(source, [{"id": f"r{i}", "prompt": p} for i, p in enumerate(PROMPTS)])
    config = tmp_path / "job.yaml"
    config.write_text(f"model: {tiny_models['gpt2']}\nmax_tokens: 3\ntemperature: 0\n"
                      f"chat: true\noutput: {tmp_path / 'out'}\n")
    result = _vbatch("run", str(source), "--config", str(config), "--max-tokens", "5")
    assert result.returncode == 0, result.stderr
    table = pq.read_table(tmp_path / "out")
    assert sorted(table.column("id").to_pylist()) == [f"r{i}" for i in range(len(PROMPTS))]
    assert set(table.column("num_generated_tokens").to_pylist()) <= set(range(1, 6))
    assert max(table.column("num_generated_tokens").to_pylist()) == 5   # flag beat YAML
    # The chat template wraps each prompt: more prompt tokens than the raw text has.
    raw = _vbatch("run", str(source), "--model", str(tiny_models["gpt2"]), "--max-tokens", "1",
                  "--output", str(tmp_path / "raw"))
    assert raw.returncode == 0, raw.stderr
    raw_tokens = sum(pq.read_table(tmp_path / "raw").column("num_prompt_tokens").to_pylist())
    assert sum(table.column("num_prompt_tokens").to_pylist()) > raw_tokens


def test_existing_output_refused_without_overwrite(tmp_path, tiny_models):
    source = tmp_path / "in.jsonl"
    _write(source, _rows(3))
    args = ["run", str(source), "--model", str(tiny_models["gpt2"]), "--max-tokens", "2"]
    assert _vbatch(*args).returncode == 0
    again = _vbatch(*args)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    assert _vbatch(*args, "--overwrite").returncode == 0


@pytest.mark.parametrize("args, needle", [
    (["--model", "no-such-model-xyz"], "unknown model"),
    (["--max-tokens", "0"], "max-tokens"),
    (["--input-missing"], "no such file"),
])
def test_bad_flags_exit_2_with_one_line(tmp_path, tiny_models, args, needle):
    source = tmp_path / "in.jsonl"
    _write(source, _rows(2))
    if args == ["--input-missing"]:
        result = _vbatch("run", str(tmp_path / "missing.parquet"))
    else:
        result = _vbatch("run", str(source), *args)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert needle in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "in.vbatch" / "_SUCCESS").exists()


def test_messages_column_is_chat_templated(tmp_path, tiny_models):
    """A `messages` column (list of role/content) is always chat-templated, no --chat needed."""
    from transformers import AutoTokenizer

    conversations = [[{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": p}] for p in PROMPTS[:3]]
    source = tmp_path / "chat.jsonl"
    source.write_text("".join(json.dumps({"id": f"m{i}", "messages": c}) + "\n"
                              for i, c in enumerate(conversations)))
    model = tiny_models["llama-gqa-tied"]
    result = _vbatch("run", str(source), "--model", str(model), "--max-tokens", "3",
                     "--temperature", "0", "--output", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    rows = {r["id"]: r for r in pq.read_table(tmp_path / "out").to_pylist()}
    tokenizer = AutoTokenizer.from_pretrained(model)
    for i, conversation in enumerate(conversations):
        text = tokenizer.apply_chat_template(conversation, tokenize=False,
                                             add_generation_prompt=True)
        expected = len(tokenizer.encode(text, add_special_tokens=False))
        assert rows[f"m{i}"]["num_prompt_tokens"] == expected
        assert rows[f"m{i}"]["messages"] == conversation


def test_bad_tp_exits_2_listing_the_valid_sizes(tmp_path, tiny_models):
    """(A tp CLI job equal to tp=1: test_smollm2's tp=3 CLI test, on the real model.)"""
    source = tmp_path / "in.jsonl"
    _write(source, _rows(6))
    model = str(tiny_models["llama-gqa-untied"])
    bad = _vbatch("run", str(source), "--model", model, "-tp", "3",
                  "--output", str(tmp_path / "bad"))
    assert bad.returncode == 2 and "valid sizes: 1, 2, 4" in bad.stderr
    assert len([line for line in bad.stderr.splitlines() if line.strip()]) == 1


def _children(pid: int) -> list[int]:
    path = f"/proc/{pid}/task/{pid}/children"
    try:
        with open(path) as handle:
            return [int(p) for p in handle.read().split()]
    except OSError:
        return []


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="needs Linux /proc")
@pytest.mark.parametrize("signame, exit_code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_signal_stops_the_job_and_its_workers(tmp_path, tiny_models, signame, exit_code):
    """SIGTERM or Ctrl-C mid-job: clean exit code, no traceback, no _SUCCESS, no live worker."""
    import signal
    import time

    source = tmp_path / "in.jsonl"
    _write(source, _rows(3000))
    exe = shutil.which("vbatch")
    command = [exe] if exe else [sys.executable, "-m", "vbatch"]
    process = subprocess.Popen(
        command + ["run", str(source), "--model", str(tiny_models["gpt2"]), "--tp", "2",
                   "--max-tokens", "64", "--ignore-eos", "--output", str(tmp_path / "out")],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 120
    workers: list[int] = []
    while time.monotonic() < deadline and len(workers) < 2:
        workers = [c for c in _children(process.pid)
                   if b"spawn_main" in open(f"/proc/{c}/cmdline", "rb").read()]
        time.sleep(0.2)
    assert len(workers) == 2, "workers did not start"
    time.sleep(3)                                     # let generation begin
    process.send_signal(getattr(signal, signame))
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == exit_code, stderr
    assert "Traceback" not in stderr
    assert not (tmp_path / "out" / "_SUCCESS").exists()
    time.sleep(1)
    assert not any(os.path.exists(f"/proc/{w}") and
                   open(f"/proc/{w}/stat").read().split()[2] != "Z" for w in workers)
