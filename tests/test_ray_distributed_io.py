"""Distributed reads and writes on the Ray runner (object-store inputs and outputs).

Proves, on a two-raylet local Ray cluster (one CPU each, so the two replica actors run on
different nodes) against moto's S3 server: a `--runner ray --replicas 2` job from an S3 prefix
(a Parquet file of several row groups and a JSON lines file) to an S3 output has its replicas
write the part files themselves (replica-named parts, the driver receiving only part entries),
and the output read back from the bucket holds every row exactly once with the texts and row
keys of the same job on the local runner; a Parquet file of several row groups is read as
several read tasks giving exactly the rows, keys and positions of a whole-file read (resume's
skip included); a replica actor killed mid-job and an orphan part (what a replica killed
between writing a part and returning its block leaves) end with every row once and no part
file the manifest does not name; a driver SIGKILLed mid-job is resumed with `--resume` to
exactly once. One cluster and one reference run serve the whole module.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import run_offline, small_job_command
from test_replica_restarts import _oldest_descendant_matching

from vbatch.io.commit_log import committed_parts
from vbatch.io.object_store_dir import ObjectStoreDirectory
from vbatch.io.output_dir import PART_FILE_PATTERN
from vbatch.io.positions import POSITION_COLUMN, IntervalSet

pytest.importorskip("ray")

NUM_PARQUET_ROWS = 24          # 6 row groups of 4 rows
NUM_JSONL_ROWS = 8
NUM_ROWS = NUM_PARQUET_ROWS + NUM_JSONL_ROWS
REPLICA_PART = PART_FILE_PATTERN.pattern.replace(r"(?:\d{5,}|", "(?:")  # only replicas' names


def _parquet_bytes() -> bytes:
    table = pa.table({"prompt": [f"parquet row {i} says" for i in range(NUM_PARQUET_ROWS)]})
    sink = io.BytesIO()
    pq.write_table(table, sink, row_group_size=4)
    return sink.getvalue()


def _jsonl_bytes() -> bytes:
    return "".join(json.dumps({"prompt": f"json row {i} says"}) + "\n"
                   for i in range(NUM_JSONL_ROWS)).encode()


@pytest.fixture(scope="module")
def bucket(s3_server):
    """One bucket for the module, holding the inputs under in/."""
    client = s3_server.client()
    name = f"vbatch-ray-io-{os.getpid()}"
    client.create_bucket(Bucket=name)
    client.put_object(Bucket=name, Key="in/a.parquet", Body=_parquet_bytes())
    client.put_object(Bucket=name, Key="in/b.jsonl", Body=_jsonl_bytes())
    return name, client


@pytest.fixture(scope="module")
def cluster(s3_server, two_node_cluster):
    """The two-raylet cluster, started after the S3 server set the AWS_* variables (its
    workers inherit them)."""
    return two_node_cluster[1]


def _job(bucket_name: str, model, output: str, *extra: str) -> list[str]:
    return small_job_command(f"s3://{bucket_name}/in/", model, output, "-q", *extra,
                             max_tokens=24)


def _ray_env(cluster) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": cluster.address}


def _read_back(client, bucket_name: str, prefix: str) -> tuple[list[dict], list[str]]:
    """The output rows read from the bucket (every part file), and the part file names."""
    keys = [item["Key"] for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=bucket_name, Prefix=prefix) for item in page.get("Contents", [])]
    names = sorted(key.rsplit("/", 1)[1] for key in keys)
    parts = [name for name in names if PART_FILE_PATTERN.fullmatch(name)]
    tables = [pq.read_table(io.BytesIO(client.get_object(Bucket=bucket_name,
                                                         Key=f"{prefix}{name}")["Body"].read()))
              for name in parts]
    return pa.concat_tables(tables).to_pylist() if tables else [], names


def _texts(rows: list[dict]) -> dict[str, str]:
    ids = [row["id"] for row in rows]
    assert len(ids) == len(set(ids)), "a row was written twice"
    return {row["id"]: row["generated_text"] for row in rows}


def _manifest_parts(client, bucket_name: str, prefix: str) -> set[str]:
    manifest = json.loads(client.get_object(Bucket=bucket_name,
                                            Key=f"{prefix}_manifest.json")["Body"].read())
    return {part["name"] for part in manifest["output"]["part_files"]}


@pytest.fixture(scope="module")
def reference(bucket, tiny_models, tmp_path_factory) -> dict[str, str]:
    """The same job on the local runner, written to a local directory."""
    output = tmp_path_factory.mktemp("reference") / "out"
    result = run_offline(_job(bucket[0], tiny_models["llama-gqa-untied"], str(output)))
    assert result.returncode == 0, result.stderr
    texts = _texts(pq.read_table(output).to_pylist())
    assert len(texts) == NUM_ROWS
    return texts


def test_row_group_ranges_read_the_rows_of_a_whole_file_read(bucket, tmp_path):
    from ray import cloudpickle  # noqa: PLC0415 (Ray is optional)

    from vbatch.jobs.config import JobConfig  # noqa: PLC0415
    from vbatch.jobs.job_inputs import check_job_inputs  # noqa: PLC0415
    from vbatch.jobs.ray_runner import InputDatasource  # noqa: PLC0415
    config = JobConfig(input=f"s3://{bucket[0]}/in/", output=str(tmp_path / "out"),
                       batch_size=8)
    job = check_job_inputs(config)
    expected = pa.Table.from_batches(list(job.batches(job.config)))
    source = InputDatasource(job.config, job)
    assert source.supports_distributed_reads           # every file is in the object store
    tasks = source.get_read_tasks(1)
    assert len(tasks) == NUM_PARQUET_ROWS // 8 + 1     # 3 ranges of 2 row groups + the JSONL
    tables = [table for task in tasks for table in cloudpickle.loads(cloudpickle.dumps(task))()]
    assert pa.concat_tables(tables).equals(expected) and expected.num_rows == NUM_ROWS
    # resume's skip of committed positions applies inside each range
    skip = IntervalSet([(2, 11)])
    skipped = dataclasses.replace(job, skip=skip)
    expected = pa.Table.from_batches(list(skipped.batches(skipped.config)))
    tasks = InputDatasource(job.config, skipped).get_read_tasks(1)
    got = pa.concat_tables([table for task in tasks for table in task()])
    assert got.equals(expected) and got.num_rows == NUM_ROWS - 9
    assert not any(2 <= p < 11 for p in got.column(POSITION_COLUMN).to_pylist())

    source.files = [*source.files, Path("local.parquet")]
    assert not source.supports_distributed_reads         # a local file: the driver's node


def _output_block(positions: list[int], samples: int = 1) -> pa.Table:
    """Output rows as a replica returns them: `samples` adjacent rows per position."""
    rows = [{"id": f"k{p}", "generated_text": f"text {p}.{s}", "sample_index": s,
             "num_prompt_tokens": 3, "num_generated_tokens": 2,
             "error": "empty_prompt: no prompt" if p == 5 else None, POSITION_COLUMN: p}
            for p in positions for s in range(samples)]
    return pa.Table.from_pylist(rows)


def test_replica_parts_are_committed_once_and_orphans_removed(s3_bucket):
    from vbatch.io.parts import ParquetPartWriter  # noqa: PLC0415
    from vbatch.jobs.config import JobConfig  # noqa: PLC0415
    from vbatch.jobs.output_tally import OutputTally  # noqa: PLC0415
    from vbatch.jobs.ray_parts import ReplicaPartWriter, parse_reports  # noqa: PLC0415
    config = JobConfig(input="x", output=s3_bucket.uri("out/"), rows_per_file=5)
    block = _output_block(list(range(8)), samples=2)          # 16 output rows, 8 positions
    out_schema = block.schema.remove(block.schema.get_field_index(POSITION_COLUMN))
    first = ReplicaPartWriter(config, s3_bucket.uri("out"), out_schema, replica_index=0)
    reports = parse_reports(first.write_block(block))
    # parts of at most 5 rows never split a position's 2 samples: 4 + 4 + 4 + 4 rows
    assert [r["entry"]["num_output_rows"] for r in reports] == [4, 4, 4, 4]
    assert [r["entry"]["positions"] for r in reports] == [[[0, 2]], [[2, 4]], [[4, 6]],
                                                         [[6, 8]]]
    assert reports[0]["first_error"] == "row k5: empty_prompt: no prompt"
    assert reports[2]["entry"]["num_error_rows"] == 2 and reports[2]["entry"]["num_rows"] == 2
    # a retried attempt of the same block (another replica, new token): its parts overlap
    retry = ReplicaPartWriter(config, s3_bucket.uri("out"), out_schema, replica_index=1)
    retried = parse_reports(retry.write_block(_output_block([6, 7, 8], samples=2)))
    with ObjectStoreDirectory.open(s3_bucket.uri("out/")) as directory:
        job_writer = ParquetPartWriter(directory, rows_per_file=5, schema=out_schema,
                                       job_info={"fingerprint": {"job": 1}})
        tally = OutputTally(committed_before=IntervalSet([(100, 104)]))
        accepted = []
        for report in reports + retried:
            if tally.accept_part(report["entry"], report["first_error"]):
                job_writer.commit_written_part(report["entry"])
                accepted.append(report["entry"]["name"])
        # the retry's part of positions 6, 7 overlaps; its part of position 8 is new
        assert accepted == [r["entry"]["name"] for r in reports] + [retried[1]["entry"]["name"]]
        assert tally.num_rows == 9 and tally.num_output_rows == 18
        assert tally.num_error_rows == 2 and tally.num_prompt_tokens == 9 * 3
        assert tally.first_error == "row k5: empty_prompt: no prompt"
        assert not tally.accept_part({"name": "part-r2-00000000-00000.parquet", "num_rows": 1,
                                      "positions": [[103, 104]]})        # an earlier run's
        assert [e["name"] for e in committed_parts(directory)] == accepted
        job_writer.close()
        removed = job_writer.remove_uncommitted_parts()
        assert removed == [retried[0]["entry"]["name"]]
        job_writer.commit({})
    rows, names = _read_back(s3_bucket.client, s3_bucket.name, "out/")
    assert sorted((r["id"], r["sample_index"]) for r in rows) == sorted(
        (f"k{p}", s) for p in range(9) for s in range(2))
    assert {n for n in names if PART_FILE_PATTERN.fullmatch(n)} == set(accepted)

    openai = ReplicaPartWriter(JobConfig(input="x", output="y", output_format="openai"),
                               s3_bucket.uri("openai"), None, replica_index=3)
    batch = pa.Table.from_pylist([{"custom_id": "a", "response": '{"ok": 1}', "error": None,
                                   POSITION_COLUMN: 0}])
    [report] = parse_reports(openai.write_block(batch))
    assert report["entry"]["name"].endswith(".jsonl")
    line = json.loads(s3_bucket.get(f"openai/{report['entry']['name']}"))
    assert line["custom_id"] == "a" and line["response"]["body"] == {"ok": 1}


@pytest.mark.slow
def test_replicas_write_their_parts_to_s3_exactly_once(bucket, cluster, tiny_models, reference):
    name, client = bucket
    result = subprocess.run(_job(name, tiny_models["llama-gqa-untied"], f"s3://{name}/out/",
                                 "--runner", "ray", "--replicas", "2"),
                            capture_output=True, text=True, timeout=300, env=_ray_env(cluster))
    assert result.returncode == 0, result.stderr
    rows, names = _read_back(client, name, "out/")
    assert _texts(rows) == reference                     # every row once, the same texts
    parts = [n for n in names if PART_FILE_PATTERN.fullmatch(n)]
    assert parts and all(re.fullmatch(REPLICA_PART, n) for n in parts)   # written by replicas
    assert set(parts) == _manifest_parts(client, name, "out/")          # no orphan left
    summary = json.loads(client.get_object(Bucket=name, Key="out/_run_summary.json")["Body"]
                         .read())
    assert summary["transfer"]["parts_written_by"] == "replicas"
    # the driver received only part entries (flat in the rows: benchmarks/ray_driver_bytes.py)
    assert summary["transfer"]["driver_received_bytes"] < pa.Table.from_pylist(rows).nbytes
    assert len({replica["node_id"] for replica in summary["replicas"]}) == 2
    assert summary["counts"]["rows"] == NUM_ROWS and "_SUCCESS" in names


def _replica_actor_pid() -> int | None:
    """The oldest process of this test's Ray cluster running a replica actor."""
    return _oldest_descendant_matching(os.getpid(), "MapBatches(ReplicaActor)")


def _wait_for_a_committed_part(directory: ObjectStoreDirectory, process) -> list[dict]:
    deadline = time.monotonic() + 300
    while not (parts := committed_parts(directory)):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no part was committed"
        time.sleep(0.1)
    return parts


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds replica actors in /proc")
def test_killed_replica_and_orphan_part_leave_every_row_once(bucket, cluster, tiny_models,
                                                             reference):
    name, client = bucket
    output = f"s3://{name}/killed/"
    process = subprocess.Popen(_job(name, tiny_models["llama-gqa-untied"], output, "--runner",
                                    "ray", "--replicas", "2"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=_ray_env(cluster))
    with ObjectStoreDirectory.open(output) as directory:
        [first, *_] = _wait_for_a_committed_part(directory, process)
        # What a replica killed after writing a part but before returning its block leaves:
        # the same rows under another attempt's name, never committed.
        orphan = "part-r7-0badf00d-00000.parquet"
        client.put_object(Bucket=name, Key=f"killed/{orphan}",
                          Body=directory.read_bytes(first["name"]))
        victim = _replica_actor_pid()
        assert victim is not None, "no replica actor process found"
        os.kill(victim, signal.SIGKILL)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    rows, names = _read_back(client, name, "killed/")
    assert _texts(rows) == reference                     # no duplicate, no loss
    assert orphan not in names
    assert {n for n in names if PART_FILE_PATTERN.fullmatch(n)} == \
        _manifest_parts(client, name, "killed/")


@pytest.mark.slow
def test_killed_driver_resumes_to_exactly_once(bucket, cluster, tiny_models, reference):
    name, client = bucket
    output = f"s3://{name}/resumed/"
    args = _job(name, tiny_models["llama-gqa-untied"], output, "--runner", "ray", "--replicas",
                "2")
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, env=_ray_env(cluster))
    with ObjectStoreDirectory.open(output) as directory:
        _wait_for_a_committed_part(directory, process)
    process.kill()                                        # the driver, SIGKILL
    process.wait(timeout=30)
    _, names = _read_back(client, name, "resumed/")
    assert "_SUCCESS" not in names, "the job finished before it could be killed"
    resumed = subprocess.run(args + ["--resume"], capture_output=True, text=True, timeout=300,
                             env=_ray_env(cluster))
    assert resumed.returncode == 0, resumed.stderr
    rows, names = _read_back(client, name, "resumed/")
    assert _texts(rows) == reference
    assert {n for n in names if PART_FILE_PATTERN.fullmatch(n)} == \
        _manifest_parts(client, name, "resumed/")
    manifest = json.loads(client.get_object(Bucket=name, Key="resumed/_manifest.json")["Body"]
                          .read())
    assert manifest["counts"]["resumed_rows"] > 0
    assert manifest["counts"]["rows"] == NUM_ROWS
