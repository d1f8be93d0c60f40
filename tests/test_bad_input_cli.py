"""Job-level bad input through the installed `vbatch` command: exit code 2, one line on stderr
naming the file (and the line where known), no traceback, no `_SUCCESS`.

Problems that the input scan can see are refused before the model loads, so the output
directory is never even created; a corrupt Parquet data page (behind a valid footer) is only
found while reading, and still ends the job with code 2 and no `_SUCCESS`.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest


def _vbatch(*args):
    exe = shutil.which("vbatch")
    command = [exe] if exe else [sys.executable, "-m", "vbatch"]
    return subprocess.run(command + list(args), capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def _parquet_bytes(tmp_path, rows=2000):
    path = tmp_path / "source.parquet"
    prompts = [f"prompt number {i} " * 5 for i in range(rows)]
    pq.write_table(pa.table({"prompt": prompts}), path, compression="zstd", row_group_size=500)
    return path.read_bytes()


def _truncated_jsonl(tmp_path):
    path = tmp_path / "cut.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "c')
    return path, ["cut.jsonl", "line 3"]


def _invalid_jsonl(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b",, "x": 1}\n{"prompt": "c"}\n')
    return path, ["bad.jsonl", "line 2"]


def _truncated_parquet(tmp_path):
    path = tmp_path / "half.parquet"
    data = _parquet_bytes(tmp_path)
    path.write_bytes(data[: len(data) // 2])
    return path, ["half.parquet"]


def _garbage_parquet(tmp_path):
    path = tmp_path / "garbage.parquet"
    path.write_bytes(b"PAR1" + b"\x00" * 64 + b"PAR1")
    return path, ["garbage.parquet"]


def _missing_prompt_column(tmp_path):
    path = tmp_path / "nocol.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n')
    return path, ["nocol.jsonl", "no column 'prompt'", "--prompt-column"]


def _missing_file(tmp_path):
    return tmp_path / "missing.jsonl", ["missing.jsonl", "no such file"]


def _csv_unclosed_quote(tmp_path):
    path = tmp_path / "open.csv"
    path.write_text('id,prompt\n1,"hello\n2,world\n3,again\n')
    return path, ["open.csv", "line 2", "never closed"]


def _csv_text_after_quote(tmp_path):
    path = tmp_path / "glued.csv"
    path.write_text('id,prompt\n1,fine\n2,"hel"lo"\n')
    return path, ["glued.csv", "line 3", "closing quote"]


@pytest.mark.parametrize("make_input", [
    _truncated_jsonl, _invalid_jsonl, _truncated_parquet, _garbage_parquet,
    _missing_prompt_column, _missing_file, _csv_unclosed_quote, _csv_text_after_quote,
])
def test_bad_input_is_refused_before_the_model_loads(tmp_path, tiny_models, make_input):
    source, needles = make_input(tmp_path)
    out = tmp_path / "out"
    result = _vbatch("run", str(source), "--model", str(tiny_models["gpt2"]), "--max-tokens",
                     "2", "--output", str(out))
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert not out.exists()          # refused before the model loaded and the output was made


def test_output_path_that_is_a_file(tmp_path, tiny_models):
    source = tmp_path / "in.jsonl"
    source.write_text('{"prompt": "a"}\n')
    target = tmp_path / "taken"
    target.write_text("not a directory")
    result = _vbatch("run", str(source), "--model", str(tiny_models["gpt2"]), "--output",
                     str(target))
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"Error: output path {target} is a file, not a directory"]
    assert target.read_text() == "not a directory"


def test_corrupt_parquet_page_found_mid_job(tmp_path, tiny_models):
    data = bytearray(_parquet_bytes(tmp_path))
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(b ^ 0x5A for b in data[middle:middle + 64])
    source = tmp_path / "flipped.parquet"
    source.write_bytes(bytes(data))
    out = tmp_path / "out"
    result = _vbatch("run", str(source), "--model", str(tiny_models["gpt2"]), "--max-tokens",
                     "1", "--output", str(out), "--batch-size", "100", "-q")
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "flipped.parquet" in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (out / "_SUCCESS").exists()
