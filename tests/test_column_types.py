"""Column types pass through unchanged, and odd prompt cells become row errors, not file errors.

Proves (issue 11, findings 12 and 13): a column whose type differs between files (or between
blocks of one text file) is refused before the model loads, naming the column, the files and
both types, unless the difference is lossless or `--allow-type-promotion` is given; CSV cells
stay text unless `--csv-infer-types`; invalid UTF-8 is reported on its real line; a numeric
prompt among strings in JSON lines is a `not_text` row, an all-`[]` messages column gives
`empty_prompt` rows, and a dictionary-encoded (pandas category) prompt column works.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import vbatch_command

from vbatch.errors import InputError
from vbatch.io import formats
from vbatch.io.reader import read_batches, scan_inputs


def _read(files: list[Path], **options) -> pa.Table:
    scan = scan_inputs(files, **options)
    return pa.Table.from_batches(list(read_batches(files, scan=scan)), schema=scan.schema)


def _refused(files: list[Path], **options) -> str:
    with pytest.raises(InputError) as caught:
        _read(files, **options)
    message = str(caught.value)
    assert "\n" not in message
    return message


def _vbatch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(vbatch_command() + list(args), capture_output=True, text=True,
                          timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def _job(source: Path, model: Path, *flags: str) -> subprocess.CompletedProcess:
    return _vbatch("run", str(source), "--model", str(model), "--max-tokens", "2",
                   "--temperature", "0", "--dtype", "float32", "--output",
                   str(source.parent / "out"), *flags)


def _output(source: Path) -> list[dict]:
    table = pq.read_table(sorted((source.parent / "out").glob("part-*.parquet")))
    return sorted(table.to_pylist(), key=lambda row: row["id"])


# --- 12: conflicts between files and blocks --------------------------------------------------


def test_int_in_one_file_and_string_in_another_is_refused(tmp_path):
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    pq.write_table(pa.table({"prompt": ["p"], "x": [1]}), a)
    pq.write_table(pa.table({"prompt": ["q"], "x": ["1"]}), b)
    message = _refused([a, b])
    assert "'x'" in message and "int64" in message and "string" in message
    assert str(a) in message and str(b) in message and "--allow-type-promotion" in message
    promoted = _read([a, b], allow_type_promotion=True)
    assert promoted.column("x").to_pylist() == ["1", "1"]


def test_big_int_and_doubles_are_refused_before_the_model_loads(tmp_path, tiny_models):
    data = tmp_path / "data"
    data.mkdir()
    pq.write_table(pa.table({"prompt": ["p"], "n": [2**62]}), data / "a.parquet")
    pq.write_table(pa.table({"prompt": ["q"], "n": [0.5]}), data / "b.parquet")
    result = _job(data, tiny_models["gpt2"])
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    assert "'n'" in line and "a.parquet" in line and "b.parquet" in line
    assert "int64" in line and "double" in line
    assert not (tmp_path / "out").exists()       # refused at the scan, before any model load


def test_lossless_differences_still_combine(tmp_path):
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    pq.write_table(pa.table({"prompt": ["p"], "n": pa.array([1], pa.int32()),
                             "s": pa.array(["x"], pa.large_string()),
                             "meta": [{"k": 1}], "empty": pa.nulls(1)}), a)
    pq.write_table(pa.table({"prompt": ["q"], "n": [2**40], "s": ["y"],
                             "meta": [{"k": 2, "extra": "e"}], "empty": [True]}), b)
    table = _read([a, b])
    assert table.schema.field("n").type == pa.int64()
    assert table.column("n").to_pylist() == [1, 2**40]
    assert table.column("s").to_pylist() == ["x", "y"]
    assert table.column("meta").to_pylist() == [{"k": 1, "extra": None}, {"k": 2, "extra": "e"}]
    assert table.column("empty").to_pylist() == [None, True]


def test_csv_cells_stay_text_unless_inference_is_asked_for(tmp_path):
    path = tmp_path / "zips.csv"
    path.write_text('prompt,zip,score,note\nhi,02134,1.50,\nho,00501,2,""\n')
    table = _read([path])
    assert table.column("zip").to_pylist() == ["02134", "00501"]
    assert table.column("score").to_pylist() == ["1.50", "2"]
    assert table.column("note").to_pylist() == [None, ""]   # empty cell: null; "": text
    inferred = _read([path], csv_infer_types=True)
    assert inferred.column("zip").to_pylist() == [2134, 501]
    assert inferred.column("score").to_pylist() == [1.5, 2.0]


def test_csv_blocks_that_disagree_are_refused_when_types_are_inferred(tmp_path, monkeypatch):
    monkeypatch.setattr(formats, "BLOCK_SIZE", 256)
    path = tmp_path / "big.csv"
    path.write_text("prompt,n\n" + "".join(f"p{i},{i}\n" for i in range(200)) + "last,unknown\n")
    assert _read([path]).column("n").to_pylist()[-1] == "unknown"      # text: no conflict
    message = _refused([path], csv_infer_types=True)
    assert str(path) in message and "'n'" in message and "int64" in message
    widened = _read([path], csv_infer_types=True, allow_type_promotion=True)
    assert widened.column("n").to_pylist()[-2:] == ["199", "unknown"]


def test_jsonl_chunks_that_disagree_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(formats, "BLOCK_SIZE", 256)
    path = tmp_path / "big.jsonl"
    rows = [{"prompt": f"p{i}", "x": i} for i in range(96)] + [{"prompt": "z", "x": "t"}] * 8
    # 32-byte lines: each 256-byte chunk is 8 whole lines, so the last chunk holds text only
    path.write_text("".join(json.dumps(row)[:-1].ljust(30) + "}\n" for row in rows))
    message = _refused([path])
    assert "'x'" in message and "int64" in message and "string" in message
    assert f"{path} (lines from 1)" in message and "--allow-type-promotion" in message
    assert _read([path], allow_type_promotion=True).column("x").to_pylist()[-1] == "t"


def test_json_date_strings_stay_strings(tmp_path):
    path = tmp_path / "dates.jsonl"
    path.write_text('{"prompt": "a", "day": "2024-01-31"}\n{"prompt": "b", "day": "2024-02-01"}\n')
    table = _read([path])
    assert table.schema.field("day").type == pa.string()
    assert table.column("day").to_pylist() == ["2024-01-31", "2024-02-01"]


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_invalid_utf8_is_reported_on_its_line(tmp_path, suffix):
    path = tmp_path / f"bad{suffix}"
    if suffix == ".jsonl":
        path.write_bytes(b'{"prompt": "ok"}\n' * 3000 + b'{"prompt": "\xff"}\n')
    else:   # header, then 3000 rows: the bad byte is on line 3002
        path.write_bytes(b"prompt\n" + b"ok\n" * 3000 + b"\xff\n")
    expected = 3001 if suffix == ".jsonl" else 3002
    with pytest.raises(InputError) as caught:
        scan_inputs([path])
    assert f"{path}: line {expected}: invalid UTF8" in str(caught.value)


# --- 13: odd prompt cells are row errors, dictionary prompts work ----------------------------


def test_numeric_prompt_among_strings_and_category_prompts(tmp_path, tiny_models):
    data = tmp_path / "data"
    data.mkdir()
    lines = [{"id": "j0", "prompt": "hello"}, {"id": "j1", "prompt": 7},
             {"id": "j2", "prompt": "world"}, {"id": "j3", "prompt": {"a": 1}}]
    (data / "a.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    frame = pd.DataFrame({"id": ["c0", "c1", "c2"],
                          "prompt": pd.Categorical(["Paris is", "Berlin is", "Paris is"])})
    frame.to_parquet(data / "b.parquet")
    assert pa.types.is_dictionary(pq.read_schema(data / "b.parquet").field("prompt").type)
    result = _job(data, tiny_models["gpt2"])
    assert result.returncode == 0, result.stderr
    rows = {row["id"]: row for row in _output(data)}
    assert [rows[key]["prompt"] for key in ("j0", "j1", "j2", "j3")] == \
        ["hello", "7", "world", '{"a": 1}']
    for key in ("j1", "j3"):
        assert rows[key]["error"].startswith("not_text:") and rows[key]["generated_text"] is None
    for key in ("j0", "j2", "c0", "c1", "c2"):
        assert rows[key]["error"] is None and rows[key]["num_generated_tokens"] >= 1
    assert [rows[key]["prompt"] for key in ("c0", "c1", "c2")] == \
        ["Paris is", "Berlin is", "Paris is"]


def test_all_empty_messages_give_empty_prompt_rows(tmp_path, tiny_models):
    source = tmp_path / "chat.jsonl"
    source.write_text('{"id": "a", "messages": []}\n{"id": "b", "messages": []}\n')
    result = _job(source, tiny_models["gpt2"])        # its tokenizer has a chat template
    assert result.returncode == 0, result.stderr
    rows = _output(source)
    assert [row["id"] for row in rows] == ["a", "b"]
    assert all(row["error"].startswith("empty_prompt:") for row in rows)
