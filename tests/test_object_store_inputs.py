"""INPUT in an object store: every format read from S3 (moto's server) gives exactly the rows of
the same files read from a local directory (row keys, prompts, passthrough columns, types);
globs, prefixes, hidden keys and `save_to_disk` folders follow the local rules; missing
objects and buckets, corrupt objects and bad quoting are one-line errors naming the URI; a
`vbatch run s3://...` job writes the rows of the same job on the local copy, takes its endpoint
from `--storage-options`, and `--resume` refuses when an input object changed.
"""
from __future__ import annotations

import json
import os
import subprocess

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import small_job_command
from vbatch.errors import InputError
from vbatch.io import formats
from vbatch.io.fingerprint import file_identity, fingerprint_differences
from vbatch.io.formats import count_rows, detect_input_format
from vbatch.io.input_file import RemoteFile
from vbatch.io.inputs import input_root, resolve_input_files
from vbatch.io.openai_batch import CUSTOM_ID, OPENAI
from vbatch.io.reader import read_batches, scan_inputs

MULTI_LINE = 'line one\nline "two", with a comma'


def _rows(start: int, count: int) -> list[dict]:
    return [{"prompt": f"prompt {i}" if i % 3 else MULTI_LINE + f" {i}", "zip": f"0{2134 + i}",
             "score": i * 1.5, "tags": [f"t{i}", "x"]} for i in range(start, start + count)]


def _write(path, rows: list[dict], fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif fmt == "openai":
        path.write_text("".join(json.dumps({
            "custom_id": f"{path.stem}-{i}", "method": "POST", "url": "/v1/completions",
            "body": {"model": "m", "prompt": row["prompt"], "max_tokens": 2}}) + "\n"
            for i, row in enumerate(rows)))
    elif fmt == "csv":
        table = pa.table({"prompt": [r["prompt"] for r in rows], "zip": [r["zip"] for r in rows],
                          "score": [r["score"] for r in rows]})
        import pyarrow.csv as pa_csv  # noqa: PLC0415 (only this format)
        pa_csv.write_csv(table, path)
    elif fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=3)
    else:
        with pa.ipc.new_stream(path, pa.Table.from_pylist(rows).schema) as writer:
            writer.write_table(pa.Table.from_pylist(rows), max_chunksize=4)


SUFFIX = {"jsonl": "jsonl", "openai": "jsonl", "csv": "csv", "parquet": "parquet",
          "arrow": "arrow"}


def _dataset(tmp_path, fmt: str):
    """A local input directory of `fmt` files, nested and with keys every reader skips."""
    root = tmp_path / "data"
    suffix = SUFFIX[fmt]
    _write(root / f"a.{suffix}", _rows(0, 7), fmt)
    _write(root / "nested" / f"b.{suffix}", _rows(7, 5), fmt)
    _write(root / "_tmp" / f"skipped.{suffix}", _rows(50, 2), fmt)
    _write(root / f".hidden.{suffix}", _rows(60, 2), fmt)
    _write(root / "old.vbatch" / f"part.{suffix}", _rows(70, 2), fmt)
    (root / "_SUCCESS").write_text("")
    (root / "notes.txt").write_text("not an input")
    return root


def _read(input: str, storage_options: dict | None = None, **scan_options) -> pa.Table:
    """INPUT's rows as a job reads them (format detected, scanned, keyed, positions)."""
    files = resolve_input_files(input, storage_options)
    input_format = detect_input_format(files, "auto")
    id_column = CUSTOM_ID if input_format == OPENAI else "id"
    scan = scan_inputs(files, id_column=id_column, input_format=input_format, **scan_options)
    batches = list(read_batches(files, batch_size=4, id_column=id_column, scan=scan,
                                root=input_root(input, storage_options), with_positions=True))
    assert count_rows(files) in (None, sum(batch.num_rows for batch in batches))
    return pa.Table.from_batches(batches, schema=batches[0].schema)


@pytest.mark.parametrize("block_size", [formats.BLOCK_SIZE, 64], ids=["one-block", "64-bytes"])
@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "csv", "arrow", "openai"])
def test_every_format_reads_the_same_rows_from_s3(s3_bucket, tmp_path, monkeypatch, fmt,
                                                  block_size):
    if block_size != formats.BLOCK_SIZE and fmt in ("parquet", "arrow"):
        pytest.skip("the block size only splits text formats")
    monkeypatch.setattr(formats, "BLOCK_SIZE", block_size)  # 64: text read in many pieces
    local = _dataset(tmp_path, fmt)
    s3_bucket.upload_dir(local, "in")
    expected = _read(str(local))
    assert expected.num_rows == 12
    remote = _read(s3_bucket.uri("in/"))
    assert remote.equals(expected, check_metadata=True)
    if fmt != "openai":
        keys = remote.column("id").to_pylist()
        assert keys[0] == "a." + SUFFIX[fmt] + ":0" and keys[-1] == f"nested/b.{SUFFIX[fmt]}:4"
        assert MULTI_LINE + " 0" in remote.column("prompt").to_pylist()
    # one object: keys relative to its folder, as for a local file
    one = f"nested/b.{SUFFIX[fmt]}"
    assert _read(s3_bucket.uri(f"in/{one}")).equals(_read(str(local / one)))
    if fmt == "csv":   # inferred types too
        assert _read(s3_bucket.uri("in/"), csv_infer_types=True).equals(
            _read(str(local), csv_infer_types=True))


def test_globs_prefixes_and_file_uris_list_like_local_paths(s3_bucket, tmp_path):
    local = _dataset(tmp_path, "jsonl")
    _write(local / "nested" / "deeper" / "c.parquet", _rows(20, 2), "parquet")
    s3_bucket.upload_dir(local, "in")
    s3_bucket.put("in/nested/.dot.parquet", b"hidden")
    for pattern in ("*.jsonl", "**/*.jsonl", "nested/*", "nes*"):
        files = resolve_input_files(s3_bucket.uri(f"in/{pattern}"))
        assert all(isinstance(file, RemoteFile) for file in files)
        expected = [path.relative_to(local).as_posix()
                    for path in resolve_input_files(str(local / pattern))]
        assert [file.uri.removeprefix(s3_bucket.uri("in/")) for file in files] == expected
        local_root = input_root(str(local / pattern)).relative_to(local).as_posix()
        assert input_root(s3_bucket.uri(f"in/{pattern}")) == \
            s3_bucket.uri("in" if local_root == "." else f"in/{local_root}")
    assert len(resolve_input_files(s3_bucket.uri("in"))) == 3   # a.jsonl, b.jsonl, c.parquet
    assert _read(f"file://{local}/nested/b.jsonl").equals(_read(str(local / "nested/b.jsonl")))


def test_a_save_to_disk_folder_in_s3_reads_its_arrow_files(s3_bucket, tmp_path):
    datasets = pytest.importorskip("datasets")
    local = tmp_path / "saved"
    datasets.Dataset.from_list(_rows(0, 9)).save_to_disk(str(local), num_shards=2)
    s3_bucket.upload_dir(local, "ds")
    files = resolve_input_files(s3_bucket.uri("ds/"))
    assert [file.name for file in files] == [path.name for path in resolve_input_files(str(local))]
    assert _read(s3_bucket.uri("ds/")).equals(_read(str(local)))


def _error(input: str) -> str:
    with pytest.raises(InputError) as caught:
        _read(input)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_missing_corrupt_and_badly_quoted_objects_are_one_line_errors(s3_bucket):
    s3_bucket.put("in/broken.parquet", b"PAR1 not really parquet")
    s3_bucket.put("bad/quotes.csv", b'prompt,x\n"ok",1\n"open,2\nnext,3\n')
    s3_bucket.put("notes/readme.txt", b"x")
    assert "no such object" in _error(s3_bucket.uri("in/nope.jsonl"))
    assert "no such object" in _error(f"s3://{s3_bucket.name}-missing/in/")
    assert "no objects match" in _error(s3_bucket.uri("in/*.csv"))
    assert "holds no" in _error(s3_bucket.uri("notes/"))
    assert "unsupported file type '.txt'" in _error(s3_bucket.uri("notes/readme.txt"))
    assert _error(s3_bucket.uri("in/")).startswith(s3_bucket.uri("in/broken.parquet: "))
    assert _error(s3_bucket.uri("bad/")) == (f"{s3_bucket.uri('bad/quotes.csv')}: line 3: a "
                                             "quoted field that starts here is never closed")


def test_an_object_identity_changes_when_the_object_is_rewritten(s3_bucket):
    s3_bucket.put("in/a.jsonl", b'{"prompt": "a"}\n')
    [before] = resolve_input_files(s3_bucket.uri("in/"))
    s3_bucket.put("in/a.jsonl", b'{"prompt": "b"}\n')     # same size, new content
    [after] = resolve_input_files(s3_bucket.uri("in/"))
    assert file_identity(before)["path"] == s3_bucket.uri("in/a.jsonl")
    assert file_identity(before)["etag"] != file_identity(after)["etag"]
    difference = fingerprint_differences({"input_files": [file_identity(before)]},
                                         {"input_files": [file_identity(after)]})
    assert difference == [f"input file {s3_bucket.uri('in/a.jsonl')} changed (size or "
                          "modification time, ETag)"]
    # the same identity whether the object came from a listing or alone
    [alone] = resolve_input_files(s3_bucket.uri("in/a.jsonl"))
    assert file_identity(alone) == file_identity(after)


def test_the_ray_read_tasks_read_the_remote_rows_of_the_local_reader(s3_bucket, tmp_path):
    ray_runner = pytest.importorskip("vbatch.jobs.ray_runner")
    from ray import cloudpickle  # noqa: PLC0415 (Ray is optional)

    from vbatch.jobs.config import JobConfig  # noqa: PLC0415
    from vbatch.jobs.job_inputs import check_job_inputs  # noqa: PLC0415
    s3_bucket.upload_dir(_dataset(tmp_path, "parquet"), "in")
    config = JobConfig(input=s3_bucket.uri("in/"), output=str(tmp_path / "out"), batch_size=4)
    job = check_job_inputs(config)
    expected = pa.Table.from_batches(list(job.batches(job.config)))
    tasks = ray_runner.InputDatasource(job.config, job).get_read_tasks(1)
    tables = [table for task in tasks for table in cloudpickle.loads(cloudpickle.dumps(task))()]
    assert pa.concat_tables(tables).equals(expected) and expected.num_rows == 12


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=300,
                          env={**env, "HF_HUB_OFFLINE": "1"})


def _output_rows(directory) -> list[dict]:
    return sorted(pq.read_table(directory).to_pylist(), key=lambda row: row["id"])


def test_a_job_over_s3_writes_the_rows_of_the_same_job_over_a_local_copy(s3_bucket, tmp_path,
                                                                          tiny_models):
    local = tmp_path / "in"
    _write(local / "a.jsonl", _rows(0, 5), "jsonl")
    _write(local / "nested" / "b.parquet", _rows(5, 4), "parquet")
    s3_bucket.upload_dir(local, "in")
    model = tiny_models["llama-gqa-untied"]
    local_run = _run(small_job_command(local, model, tmp_path / "local.out", max_tokens=3),
                     dict(os.environ))
    assert local_run.returncode == 0, local_run.stderr
    # the endpoint only from --storage-options, not the environment
    env = {name: value for name, value in os.environ.items() if name != "AWS_ENDPOINT_URL"}
    options = json.dumps({"endpoint_url": s3_bucket.server.endpoint_url})
    job = small_job_command(s3_bucket.uri("in/"), model, tmp_path / "s3.out", "--storage-options",
                            options, max_tokens=3)
    remote_run = _run(job, env)
    assert remote_run.returncode == 0, remote_run.stderr
    rows = _output_rows(tmp_path / "s3.out")
    assert rows == _output_rows(tmp_path / "local.out") and len(rows) == 9
    assert {row["id"] for row in rows} == {*(f"a.jsonl:{i}" for i in range(5)),
                                           *(f"nested/b.parquet:{i}" for i in range(4))}
    manifest = json.loads((tmp_path / "s3.out" / "_manifest.json").read_text())
    assert s3_bucket.uri("in/a.jsonl") in json.dumps(manifest)

    s3_bucket.put("in/a.jsonl", (local / "a.jsonl").read_bytes().replace(b"prompt 1", b"prompt X"))
    refused = _run(job + ["--resume"], env)
    assert refused.returncode == 2, refused.stderr
    assert f"input file {s3_bucket.uri('in/a.jsonl')} changed" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_the_cli_refuses_a_missing_bucket_before_loading_a_model(s3_bucket, tmp_path):
    missing = f"s3://{s3_bucket.name}-missing/in/"
    refused = _run(small_job_command(missing, "no-such-model", tmp_path / "out", max_tokens=1),
                   dict(os.environ))
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        f"Error: {missing}: no such object, prefix or bucket"]


def test_a_dry_run_lists_the_objects_and_counts_their_rows(s3_bucket, tmp_path):
    from vbatch.jobs.config import JobConfig  # noqa: PLC0415
    from vbatch.jobs.dry_run import describe_job  # noqa: PLC0415
    s3_bucket.upload_dir(_dataset(tmp_path, "parquet"), "in")
    text = describe_job(JobConfig(input=s3_bucket.uri("in/"), output=str(tmp_path / "out")))
    assert "2 file(s), 12 rows" in text
    assert f"    {s3_bucket.uri('in/a.parquet')}" in text.splitlines()
    assert f"    {s3_bucket.uri('in/nested/b.parquet')}" in text.splitlines()
