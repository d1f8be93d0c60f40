"""Tests for vbatch.io.writer (part files, atomic commit, output directories) and the output
schema in vbatch.io.schema."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vbatch.errors import InputError, VBatchUsageError
from vbatch.io import atomic as atomic_module
from vbatch.io import output_dir as output_dir_module
from vbatch.io import parts as parts_module
from vbatch.io.inputs import input_root, resolve_input_files
from vbatch.io.output_dir import (
    MANIFEST_FILE,
    SUCCESS_FILE,
    default_output_dir,
    prepare_output_dir,
)
from vbatch.io.parts import ParquetPartWriter
from vbatch.io.reader import read_batches, scan_inputs
from vbatch.io.schema import OUTPUT_COLUMNS, build_output_batch, output_schema


def rows_batch(start: int, num_rows: int) -> pa.RecordBatch:
    ids = [f"k{i}" for i in range(start, start + num_rows)]
    return pa.record_batch({"id": ids, "value": list(range(start, start + num_rows))})


def usage_error(call, *args, **kwargs) -> str:
    with pytest.raises(VBatchUsageError) as caught:
        call(*args, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    return message


def names_in(directory: Path) -> list[str]:
    return sorted(entry.name for entry in directory.iterdir())


# --- prepare_output_dir / default_output_dir --------------------------------------------------


def test_prepare_creates_nested_and_accepts_empty_dirs(tmp_path):
    created = prepare_output_dir(tmp_path / "a" / "b", overwrite=False)
    assert created == tmp_path / "a" / "b" and created.is_dir()
    assert prepare_output_dir(created, overwrite=False) == created


def test_prepare_refuses_non_empty_dir_without_overwrite(tmp_path):
    (tmp_path / "part-00000.parquet").write_bytes(b"old")
    message = usage_error(prepare_output_dir, tmp_path, overwrite=False)
    assert message == (f"output directory {tmp_path} is not empty; pass --resume to continue "
                       "the job that wrote it or --overwrite to replace it")
    assert names_in(tmp_path) == ["part-00000.parquet"]


def test_overwrite_removes_only_what_vbatch_wrote(tmp_path):
    for name in ["part-00000.parquet", "part-00001.parquet", SUCCESS_FILE, MANIFEST_FILE,
                 ".part-00002.parquet.tmp"]:
        (tmp_path / name).write_bytes(b"old")
    prepare_output_dir(tmp_path, overwrite=True)
    assert names_in(tmp_path) == []


@pytest.mark.parametrize("foreign", ["notes.txt", "part-1.csv", ".notes.tmp", "subdir"])
def test_overwrite_refuses_and_keeps_everything_when_user_files_exist(tmp_path, foreign):
    (tmp_path / "part-00000.parquet").write_bytes(b"old")
    (tmp_path / SUCCESS_FILE).write_bytes(b"")
    if foreign == "subdir":
        (tmp_path / foreign).mkdir()
    else:
        (tmp_path / foreign).write_text("precious")
    message = usage_error(prepare_output_dir, tmp_path, overwrite=True)
    assert foreign in message and "did not write" in message
    assert sorted(names_in(tmp_path)) == sorted([SUCCESS_FILE, "part-00000.parquet", foreign])


def test_prepare_refuses_a_file_path(tmp_path):
    path = tmp_path / "out"
    path.write_text("x")
    for overwrite in (False, True):
        assert "is a file" in usage_error(prepare_output_dir, path, overwrite=overwrite)


def test_default_output_dir(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    assert default_output_dir("data/x.jsonl") == Path("data/x.vbatch")
    assert default_output_dir("x.parquet") == Path("x.vbatch")
    assert default_output_dir("data") == Path("data.vbatch")
    assert default_output_dir("data/") == Path("data.vbatch")
    assert default_output_dir("data/*.parquet") == Path("data.vbatch")
    assert default_output_dir("data/**/*.parquet") == Path("data.vbatch")
    assert default_output_dir(".") == tmp_path.parent / f"{tmp_path.name}.vbatch"


# --- ParquetPartWriter -----------------------------------------------------------------------


def test_rows_per_file_is_respected_and_every_row_written_once(tmp_path):
    with ParquetPartWriter(tmp_path, rows_per_file=10) as part_writer:
        for start in range(0, 25, 7):
            part_writer.write(rows_batch(start, min(7, 25 - start)))
        assert part_writer.num_rows_written == 20  # two full parts; 5 rows still buffered
        part_writer.commit({"job": "test"})
    assert [p.name for p in part_writer.part_files] == [
        "part-00000.parquet", "part-00001.parquet", "part-00002.parquet"
    ]
    assert [pq.read_metadata(p).num_rows for p in part_writer.part_files] == [10, 10, 5]
    table = pq.read_table(tmp_path)  # `_`-prefixed files are ignored by Parquet readers
    assert sorted(table.column("id").to_pylist()) == sorted(f"k{i}" for i in range(25))
    parts = ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert names_in(tmp_path) == sorted([MANIFEST_FILE, SUCCESS_FILE, *parts])
    manifest = json.loads((tmp_path / MANIFEST_FILE).read_text())
    assert manifest["job"] == "test"
    assert manifest["output"]["num_rows"] == 25
    assert [part["num_rows"] for part in manifest["output"]["part_files"]] == [10, 10, 5]


def test_files_appear_atomically_and_success_is_last(tmp_path, monkeypatch):
    replaced: list[tuple[str, str]] = []
    real_replace = os.replace

    def recording_replace(source, target, **dir_fds):   # names relative to the directory fd
        replaced.append((Path(source).name, Path(target).name))
        assert not (tmp_path / SUCCESS_FILE).exists()
        real_replace(source, target, **dir_fds)

    monkeypatch.setattr(atomic_module.os, "replace", recording_replace)
    part_writer = ParquetPartWriter(tmp_path, rows_per_file=3)
    part_writer.write(pa.Table.from_batches([rows_batch(0, 4)]))
    part_writer.commit({})
    assert [target for _, target in replaced] == [
        "part-00000.parquet", "part-00001.parquet", MANIFEST_FILE, SUCCESS_FILE
    ]
    assert all(source.startswith(".") and source.endswith(".tmp") for source, _ in replaced)
    assert not any(name.endswith(".tmp") for name in names_in(tmp_path))


def test_exception_aborts_without_success_or_temp_files(tmp_path):
    with pytest.raises(RuntimeError, match="replica died"):
        with ParquetPartWriter(tmp_path, rows_per_file=2) as part_writer:
            part_writer.write(rows_batch(0, 3))
            raise RuntimeError("replica died")
    assert names_in(tmp_path) == ["part-00000.parquet"]  # the complete part stays, no _SUCCESS
    with pytest.raises(ValueError, match="closed"):
        part_writer.write(rows_batch(3, 1))


def test_failed_part_write_leaves_no_temp_file(tmp_path, monkeypatch):
    def failing_write_table(table, where, **kwargs):
        where.write(b"half a file")          # a file object of the temporary name
        raise OSError("disk full")

    monkeypatch.setattr(parts_module.pq, "write_table", failing_write_table)
    part_writer = ParquetPartWriter(tmp_path, rows_per_file=2)
    with pytest.raises(OSError, match="disk full"):
        part_writer.write(rows_batch(0, 2))
    part_writer.abort()
    assert names_in(tmp_path) == []


def test_empty_output_still_has_the_schema(tmp_path):
    schema = pa.schema([("id", pa.string()), ("value", pa.int64())])
    part_writer = ParquetPartWriter(tmp_path, schema=schema)
    part_writer.commit({})
    table = pq.read_table(tmp_path / "part-00000.parquet")
    assert table.num_rows == 0 and table.schema.equals(schema)
    assert (tmp_path / SUCCESS_FILE).exists()


def test_batches_are_cast_to_the_writer_schema_or_refused(tmp_path):
    schema = pa.schema([("id", pa.string()), ("value", pa.float64())])
    part_writer = ParquetPartWriter(tmp_path, schema=schema)
    part_writer.write(rows_batch(0, 2))  # int64 values -> float64
    with pytest.raises(ValueError, match="do not match"):
        part_writer.write(pa.record_batch({"other": [1]}))
    part_writer.commit({})
    assert pq.read_table(tmp_path).schema.field("value").type == pa.float64()
    with pytest.raises(ValueError):
        part_writer.commit({})


def test_rows_per_file_must_be_positive(tmp_path):
    with pytest.raises(ValueError):
        ParquetPartWriter(tmp_path, rows_per_file=0)


# --- output schema and the whole io path ----------------------------------------------------

RESULT = {"generated_text": "out", "finish_reason": "stop", "num_prompt_tokens": 3,
          "num_generated_tokens": 5}


def test_build_output_batch_appends_generation_columns():
    batch = pa.record_batch({"id": ["a", "b"], "prompt": ["p", "q"]})
    results = [RESULT, {**RESULT, "finish_reason": "length", "generated_text": "x"}]
    output = build_output_batch(batch, results)
    assert output.schema.names == ["id", "prompt", *OUTPUT_COLUMNS]
    assert output.schema.field("num_prompt_tokens").type == pa.int32()
    assert output.schema.equals(output_schema(batch.schema))
    assert output.column("finish_reason").to_pylist() == ["stop", "length"]
    assert output.column("generated_text").to_pylist() == ["out", "x"]


def test_build_output_batch_rejects_clashes_and_bad_results():
    clashing = pa.record_batch({"prompt": ["p"], "generated_text": ["old"]})
    with pytest.raises(InputError, match="rename it"):
        build_output_batch(clashing, [RESULT])
    batch = pa.record_batch({"prompt": ["p"]})
    with pytest.raises(ValueError, match="1 rows"):
        build_output_batch(batch, [RESULT, RESULT])
    with pytest.raises(ValueError, match="finish_reason"):
        build_output_batch(batch, [{**RESULT, "finish_reason": "eos"}])


def test_read_generate_write_round_trip(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.jsonl").write_text("".join(f'{{"prompt": "p{i}", "n": {i}}}\n' for i in range(13)))
    (data / "b.csv").write_text("prompt,n\nq,x\n")
    files = resolve_input_files(str(data))
    output_dir = prepare_output_dir(default_output_dir(str(data)), overwrite=False)
    with ParquetPartWriter(output_dir, rows_per_file=5) as part_writer:
        scan = scan_inputs(files, allow_type_promotion=True)    # int n and CSV text n
        for batch in read_batches(files, batch_size=4, root=input_root(str(data)), scan=scan):
            part_writer.write(build_output_batch(batch, [RESULT] * batch.num_rows))
        part_writer.commit({"input": str(data)})
    table = pq.read_table(output_dir)
    assert table.num_rows == 14 and table.schema.field("n").type == pa.string()
    assert sorted(table.column("id").to_pylist()) == sorted(
        [f"a.jsonl:{i}" for i in range(13)] + ["b.csv:0"]
    )
    assert resolve_input_files(str(data)) == files  # the output dir is not read back as input


def test_output_root_refuses_paths_that_escape_it(tmp_path):
    check_output_dir = output_dir_module.check_output_dir
    root = tmp_path / "jobs"
    root.mkdir()
    (root / "link").symlink_to(tmp_path)               # a symlink out of the root
    assert check_output_dir(root / "a" / "out", overwrite=False, root=root) == root / "a" / "out"
    for escaping in (root / ".." / "out", root / "link" / "out", tmp_path / "elsewhere"):
        with pytest.raises(VBatchUsageError, match="outside the output root"):
            check_output_dir(escaping, overwrite=False, root=root)
    assert check_output_dir(tmp_path / "elsewhere", overwrite=False) == tmp_path / "elsewhere"
