"""The commit log (io/commit_log.py): records of constant cost, checkpoints, resume from them.

Proves: appended records read back as the parts they name; a checkpoint every K records
removes the records it covers (the directory never holds more than K records); the state read
from a checkpoint plus later records equals the full replay of every record and the list of
entries appended; a part written but not logged (writer killed in between) is an orphan that
resume removes; a checkpoint interrupted (temporary file) or not yet cleaned up after is
ignored; a gap or a malformed file is refused in one line; a directory of the previous format
(`_manifest.json` rewritten per part) still resumes; the final `_manifest.json` lists what the
previous format listed, computed independently from the batches written; `flush` commits the
buffered rows at a position boundary; `--overwrite` removes log files; the handle's
`read_bytes` never follows a symlink.
"""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vbatch.errors import VBatchUsageError
from vbatch.io.commit_log import (
    CommitLog,
    checkpoint_name,
    committed_parts,
    read_log,
    record_name,
)
from vbatch.io.directory import OutputDirectory
from vbatch.io.fingerprint import job_fingerprint
from vbatch.io.manifest import load_resume_state, part_counts, write_manifest
from vbatch.io.output_dir import clear_output_dir
from vbatch.io.parts import ParquetPartWriter
from vbatch.io.positions import POSITION_COLUMN, IntervalSet
from vbatch.io.schema import SAMPLE_INDEX

FINGERPRINT = job_fingerprint(files=[], model={"source": "m"}, generation={"seed": 0},
                              vbatch_version="0")


def _entry(index: int) -> dict:
    """A part entry of 3 input rows at positions 10 * index ... (the file need not exist)."""
    return {"name": f"part-{index:05d}.parquet", "num_rows": 3,
            "positions": [[10 * index, 10 * index + 3]], "num_error_rows": index % 2,
            "num_prompt_tokens": 7 * index, "num_output_tokens": 5 * index}


def _log_names(path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.name.startswith(("_log", "_checkpoint")))


def test_records_are_appended_and_read_back(tmp_path):
    with OutputDirectory.open(tmp_path) as directory:
        log = CommitLog(directory, fingerprint=FINGERPRINT)
        for index in range(5):
            log.append(_entry(index))
        state = read_log(directory)
    assert _log_names(tmp_path) == [checkpoint_name(0), *map(record_name, range(1, 6))]
    assert state.version == 5 and state.fingerprint == FINGERPRINT and state.stale == []
    assert state.parts == [_entry(index) for index in range(5)]
    record = json.loads((tmp_path / record_name(3)).read_text())
    assert record == {"log_format": 1, "version": 3, "add": [_entry(2)]}


def test_a_checkpoint_every_k_records_replaces_them(tmp_path):
    with OutputDirectory.open(tmp_path) as directory:
        log = CommitLog(directory, fingerprint=FINGERPRINT, checkpoint_interval=3)
        for index in range(8):
            log.append(_entry(index))
            records = [n for n in _log_names(tmp_path) if n.startswith("_log")]
            assert len(records) < 3 and len(_log_names(tmp_path)) == len(records) + 1
    assert _log_names(tmp_path) == [checkpoint_name(6), record_name(7), record_name(8)]
    checkpoint = json.loads((tmp_path / checkpoint_name(6)).read_text())
    assert checkpoint["fingerprint"] == FINGERPRINT
    assert [{key: value for key, value in zip(checkpoint["part_columns"], row)
             if value is not None} for row in checkpoint["part_rows"]] == [
        _entry(index) for index in range(6)]
    assert (checkpoint["num_parts"], checkpoint["num_rows"], checkpoint["num_output_rows"]) == \
        (6, 18, 18)
    assert checkpoint["committed"] == IntervalSet(
        (10 * i, 10 * i + 3) for i in range(6)).to_list()


def test_checkpoint_plus_later_records_equals_the_full_replay(tmp_path):
    replayed, checkpointed = tmp_path / "replayed", tmp_path / "checkpointed"
    entries = [_entry(index) for index in range(23)]
    states = []
    for path, interval in ((replayed, 1000), (checkpointed, 4)):
        with OutputDirectory.open(path) as directory:
            log = CommitLog(directory, fingerprint=FINGERPRINT, checkpoint_interval=interval)
            for entry in entries:
                log.append(entry)
            states.append(read_log(directory))
    assert len(_log_names(replayed)) == 24 and len(_log_names(checkpointed)) == 4
    assert states[0].parts == states[1].parts == entries
    assert states[0].version == states[1].version == 23


def _batch(ids: list[str], positions: list[int], errors=None) -> pa.RecordBatch:
    """Output rows; rows of the same position are its samples 0, 1, ..."""
    errors = errors or [None] * len(ids)
    samples = [positions[:i].count(position) for i, position in enumerate(positions)]
    return pa.record_batch({"id": ids, "error": pa.array(errors, pa.string()),
                            "num_generated_tokens": pa.array([None if e else 4 for e in errors],
                                                             pa.int32()),
                            SAMPLE_INDEX: pa.array(samples, pa.int32()),
                            POSITION_COLUMN: pa.array(positions, pa.int64())})


def test_a_part_killed_before_its_record_is_an_orphan_resume_removes(tmp_path, monkeypatch):
    writer = ParquetPartWriter(tmp_path, rows_per_file=2, job_info={"fingerprint": FINGERPRINT})
    writer.write(_batch(["a", "b"], [0, 1]))

    def killed(self, part):   # the process dies between the part's rename and its record
        raise KeyboardInterrupt

    monkeypatch.setattr(CommitLog, "append", killed)
    with pytest.raises(KeyboardInterrupt):
        writer.write(_batch(["c", "d"], [2, 3]))
    monkeypatch.undo()
    assert (tmp_path / "part-00001.parquet").exists()           # written, never logged
    (tmp_path / f".{record_name(2)}.tmp").write_bytes(b'{"log_form')   # a torn record write
    state = load_resume_state(tmp_path, FINGERPRINT, force=False)
    assert state.committed == IntervalSet([(0, 2)]) and len(state.parts) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        checkpoint_name(0), record_name(1), "part-00000.parquet"]
    resumed = ParquetPartWriter(tmp_path, rows_per_file=2, existing_parts=state.parts,
                                job_info={"fingerprint": FINGERPRINT})
    resumed.write(_batch(["c", "d"], [2, 3]))
    resumed.commit({"counts": {}})
    assert pq.read_table(tmp_path).column("id").to_pylist() == ["a", "b", "c", "d"]


class _CrashBeforeCleanup:
    """A directory handle whose removals are lost (the writer died after writing a
    checkpoint, before removing what it covers)."""

    def __init__(self, directory: OutputDirectory) -> None:
        self._directory = directory

    def remove(self, name: str) -> None:
        pass

    def __getattr__(self, name):
        return getattr(self._directory, name)


def test_an_interrupted_checkpoint_and_its_leftovers_are_ignored(tmp_path):
    with OutputDirectory.open(tmp_path) as directory:
        log = CommitLog(_CrashBeforeCleanup(directory), fingerprint=FINGERPRINT,
                        checkpoint_interval=3)
        for index in range(4):
            log.append(_entry(index))
        for index in range(4):
            (tmp_path / _entry(index)["name"]).write_bytes(b"")
        # a checkpoint torn by a kill: only its temporary name exists
        (tmp_path / f".{checkpoint_name(4)}.tmp").write_bytes(b'{"log_format":1,"vers')
        assert _log_names(tmp_path) == sorted([checkpoint_name(0), checkpoint_name(3),
                                               *map(record_name, range(1, 5))])
        state = read_log(directory)
        assert state.parts == [_entry(index) for index in range(4)]
        assert sorted(state.stale) == [checkpoint_name(0), *map(record_name, range(1, 4))]
        resumed = load_resume_state(directory, FINGERPRINT, force=False)
    assert resumed.parts == state.parts
    assert _log_names(tmp_path) == [checkpoint_name(3), record_name(4)]
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_gap_or_a_malformed_log_file_is_refused(tmp_path):
    with OutputDirectory.open(tmp_path) as directory:
        log = CommitLog(directory, fingerprint=FINGERPRINT)
        for index in range(3):
            log.append(_entry(index))
        (tmp_path / record_name(2)).unlink()
        with pytest.raises(VBatchUsageError, match=f"misses {record_name(2)}"):
            read_log(directory)
        (tmp_path / record_name(2)).write_text('{"log_format": 1, "version": 2, "add": '
                                               '[{"name": "../../x", "num_rows": 0}]}')
        with pytest.raises(VBatchUsageError, match=r"not a vbatch commit log file: "
                                                   r"add\[0\]\.name: '\.\./\.\./x' is not a part"):
            read_log(directory)
        (tmp_path / record_name(2)).write_text(json.dumps(
            {"log_format": 1, "version": 2, "add": [_entry(0)]}))
        with pytest.raises(VBatchUsageError, match=r"parts\[1\]: part-00000.parquet is listed"):
            read_log(directory)
        (tmp_path / record_name(2)).write_text("{")
        with pytest.raises(VBatchUsageError, match="is unreadable"):
            read_log(directory)


def test_a_log_of_a_different_job_is_refused(tmp_path):
    ParquetPartWriter(tmp_path, job_info={"fingerprint": FINGERPRINT}).abort()
    other = {**FINGERPRINT, "generation": {"seed": 1}}
    with pytest.raises(VBatchUsageError, match="seed 0 -> 1"):
        load_resume_state(tmp_path, other, force=False)
    assert load_resume_state(tmp_path, other, force=True).parts == []


def _expected_parts(batches: list[pa.RecordBatch], rows_per_file: int) -> list[dict]:
    """The part entries the previous format listed, computed from the batches (each of
    `rows_per_file` rows here, one row per position)."""
    table = pa.Table.from_batches(batches)
    parts = []
    for index, start in enumerate(range(0, table.num_rows, rows_per_file)):
        rows = table.slice(start, rows_per_file)
        positions = rows.column(POSITION_COLUMN).to_pylist()
        parts.append({"name": f"part-{index:05d}.parquet", "num_rows": rows.num_rows,
                      "positions": IntervalSet.from_positions(positions).to_list(),
                      **part_counts(rows.drop_columns([POSITION_COLUMN]))})
    return parts


def test_the_final_manifest_lists_what_the_previous_format_did(tmp_path):
    batches = [_batch([f"r{i}", f"r{i + 1}"], [5 * i, 5 * i + 1],
                      errors=[None, "empty_prompt: x" if i % 3 else None]) for i in range(7)]
    writer = ParquetPartWriter(tmp_path, rows_per_file=2, job_info={"fingerprint": FINGERPRINT},
                               checkpoint_interval=3)
    for batch in batches:
        writer.write(batch)
    expected = _expected_parts(batches, 2)
    assert committed_parts(tmp_path) == expected           # what the running job's log says
    assert not (tmp_path / "_manifest.json").exists()      # not written while it runs
    writer.commit({"counts": {}})
    manifest = json.loads((tmp_path / "_manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["fingerprint"] == FINGERPRINT
    assert manifest["output"] == {"num_rows": 14, "part_files": expected}
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "_SUCCESS", "_manifest.json", *(part["name"] for part in expected)]
    state = load_resume_state(tmp_path, FINGERPRINT, force=False)
    assert state.was_complete and state.parts == expected


def test_a_complete_manifest_wins_over_a_log_left_behind(tmp_path):
    writer = ParquetPartWriter(tmp_path, rows_per_file=1, job_info={"fingerprint": FINGERPRINT})
    writer.write(_batch(["a", "b", "c"], [0, 1, 2]))
    first_records = {name: (tmp_path / name).read_bytes() for name in _log_names(tmp_path)}
    writer.commit({"counts": {}})
    # killed while removing the log, before `_SUCCESS`: part of the log is still there
    (tmp_path / "_SUCCESS").unlink()
    (tmp_path / checkpoint_name(0)).write_bytes(first_records[checkpoint_name(0)])
    (tmp_path / record_name(1)).write_bytes(first_records[record_name(1)])
    state = load_resume_state(tmp_path, FINGERPRINT, force=False)
    assert state.committed == IntervalSet([(0, 3)]) and not state.was_complete
    assert _log_names(tmp_path) == []
    assert len(list(tmp_path.glob("part-*.parquet"))) == 3


def test_a_directory_of_the_previous_format_still_resumes(tmp_path):
    batches = [_batch(["a", "b"], [0, 1]), _batch(["c", "d"], [2, 3])]
    expected = _expected_parts(batches, 2)
    for part, batch in zip(expected, batches):
        pq.write_table(pa.Table.from_batches([batch]).drop_columns([POSITION_COLUMN]),
                       tmp_path / part["name"])
    (tmp_path / "part-00002.parquet").write_bytes(b"renamed, never listed")
    write_manifest(tmp_path, {"fingerprint": FINGERPRINT, "status": "running"}, expected)
    state = load_resume_state(tmp_path, FINGERPRINT, force=False)
    assert state.parts == expected and state.committed == IntervalSet([(0, 4)])
    assert not (tmp_path / "part-00002.parquet").exists()
    resumed = ParquetPartWriter(tmp_path, rows_per_file=2, existing_parts=state.parts,
                                job_info={"fingerprint": FINGERPRINT})
    assert not (tmp_path / "_manifest.json").exists()      # the log holds it now
    assert committed_parts(tmp_path) == expected
    resumed.write(_batch(["e"], [4]))
    resumed.commit({"counts": {}})
    manifest = json.loads((tmp_path / "_manifest.json").read_text())
    assert [p["name"] for p in manifest["output"]["part_files"]] == [
        "part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert pq.read_table(tmp_path).column("id").to_pylist() == ["a", "b", "c", "d", "e"]


def test_flush_commits_the_buffered_rows_without_splitting_a_position(tmp_path):
    writer = ParquetPartWriter(tmp_path, rows_per_file=10, job_info={"fingerprint": FINGERPRINT})
    writer.flush()                                           # nothing buffered: no part
    assert committed_parts(tmp_path) == []
    writer.write(_batch(["a0", "a1", "a2", "b0"], [7, 7, 7, 8]))    # 3 samples of row 7
    writer.flush()
    parts = committed_parts(tmp_path)
    assert [(p["num_rows"], p["num_output_rows"], p["positions"]) for p in parts] == [
        (2, 4, [[7, 9]])]
    writer.flush()
    assert len(committed_parts(tmp_path)) == 1
    writer.write(_batch(["c"], [9]))
    writer.commit({"counts": {}})
    assert [p["positions"] for p in json.loads((tmp_path / "_manifest.json").read_text())
            ["output"]["part_files"]] == [[[7, 9]], [[9, 10]]]


def test_overwrite_removes_the_log(tmp_path):
    writer = ParquetPartWriter(tmp_path, rows_per_file=1, job_info={"fingerprint": FINGERPRINT})
    writer.write(_batch(["a"], [0]))
    (tmp_path / f".{record_name(2)}.tmp").write_bytes(b"")
    with OutputDirectory.open(tmp_path) as directory:
        with pytest.raises(VBatchUsageError, match="not empty"):
            clear_output_dir(directory, overwrite=False)
        clear_output_dir(directory, overwrite=True)
    assert list(tmp_path.iterdir()) == []


def test_read_bytes_reads_relative_to_the_handle_and_never_follows_a_symlink(tmp_path):
    (tmp_path / "secret").write_bytes(b"not the job's")
    job = tmp_path / "job"
    job.mkdir()
    (job / "_manifest.json").symlink_to(tmp_path / "secret")
    (job / "_SUCCESS").write_bytes(b"ok")
    with OutputDirectory.open(job) as directory:
        assert directory.read_bytes("_SUCCESS") == b"ok"
        with pytest.raises(OSError):
            directory.read_bytes("_manifest.json")
        with pytest.raises(FileNotFoundError):
            directory.read_bytes(record_name(0))
