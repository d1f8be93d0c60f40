"""`--output s3://bucket/prefix/`: a job's output on an object store, with local-disk guarantees.

Proves, against moto's real S3 server (tests/s3_server.py): the `ObjectStoreDirectory` handle
keeps the `OutputDirectory` contract (listing, reads, removals, an upload whose content fails
leaves no object and an existing one unchanged, the write probe leaves nothing; a missing
bucket or an unreachable endpoint is one line naming the URI); the lock object refuses a second
job with the local refusal, is created conditionally (If-None-Match), taken over when its
holder died on this machine and kept when the holder runs elsewhere; a prefix holding a job or
foreign objects is refused as a local directory is, and `--output-root` takes a prefix. Real
`vbatch run` jobs into the bucket write every row exactly once with the same texts as the same
job on a local disk (the Ray runner's S3 jobs: tests/test_ray_distributed_io.py), leave
`_SUCCESS`, `_manifest.json` and no lock; a job SIGKILLed after committing parts resumes
with `--resume` to exactly once, its committed parts untouched (same ETags); and a bucket that
starts refusing writes mid-job (a deny policy, which moto enforces) ends the job with exit code
1, one line naming the object, and no `_SUCCESS`.
"""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
from conftest import run_offline, small_job_command, write_prompt_jsonl

from vbatch.errors import VBatchUsageError
from vbatch.io.object_store_dir import ObjectStoreDirectory, ObjectStoreError
from vbatch.io.output_dir import (
    check_output_dir,
    default_output_dir,
    locked_output_dir,
    output_path,
)
from vbatch.io.output_lock import LOCK_FILE, ObjectStoreLock, _machine

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
NUM_ROWS = 40


def _job(source, model, output, *extra: str) -> list[str]:
    return small_job_command(source, model, output, "-q", *extra, max_tokens=48)


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=300,
                          env={**ENV, **_s3_env()})


def _s3_env() -> dict[str, str]:
    return {name: os.environ[name] for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                                                "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}


def _texts_of_rows(rows: list[dict]) -> dict[str, str]:
    ids = [row["id"] for row in rows]
    assert len(ids) == len(set(ids)), "a row was written twice"
    return {row["id"]: row["generated_text"] for row in rows}


def _bucket_texts(bucket, prefix: str) -> dict[str, str]:
    """Every row of the part files under `prefix`, read back from the bucket with pyarrow."""
    parts = [key for key in bucket.keys(prefix) if key.rsplit("/", 1)[-1].startswith("part-")]
    rows = [row for key in parts for row in pq.read_table(io.BytesIO(bucket.get(key))).to_pylist()]
    return _texts_of_rows(rows)


def _etags(bucket, prefix: str) -> dict[str, str]:
    pages = bucket.client.get_paginator("list_objects_v2").paginate(Bucket=bucket.name,
                                                                     Prefix=prefix)
    return {item["Key"]: item["ETag"] for page in pages for item in page.get("Contents", [])
            if item["Key"].rsplit("/", 1)[-1].startswith("part-")}


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    message = result.stderr.strip()
    assert message and "\n" not in message and "Traceback" not in message, result.stderr
    return message


@pytest.fixture(scope="module")
def job_input(tmp_path_factory):
    return write_prompt_jsonl(tmp_path_factory.mktemp("s3-out") / "prompts.jsonl", NUM_ROWS)


@pytest.fixture(scope="module")
def local_texts(job_input, tiny_models, tmp_path_factory):
    """The texts of the same job written to a local directory: what every S3 run must match."""
    output = tmp_path_factory.mktemp("local") / "out"
    result = run_offline(_job(job_input, tiny_models["llama-gqa-untied"], output))
    assert result.returncode == 0, result.stderr
    texts = _texts_of_rows(pq.read_table(output).to_pylist())
    assert len(texts) == NUM_ROWS
    return texts


# --- the handle --------------------------------------------------------------------------------

def test_handle_keeps_the_output_directory_contract(s3_bucket):
    directory = ObjectStoreDirectory.open(s3_bucket.uri("out/"))
    assert str(directory.path) == s3_bucket.uri("out")
    assert str(directory.path / "part-00000.parquet") == s3_bucket.uri("out/part-00000.parquet")
    assert directory.names() == []                           # a prefix without objects
    assert directory.write_text("_SUCCESS", "") == directory.path / "_SUCCESS"
    directory.write_json("_manifest.json", {"status": "running"})
    directory.write_atomically("part-00000.parquet", lambda file: file.write(b"PAR1 rows"))
    s3_bucket.put("out/sub/user.txt", b"not ours")            # a "subdirectory"
    s3_bucket.put("outside.txt", b"not below the prefix")
    assert directory.names() == ["_SUCCESS", "_manifest.json", "part-00000.parquet", "sub"]
    assert directory.is_regular_file("part-00000.parquet")
    assert not directory.is_regular_file("sub") and directory.exists("sub")
    assert directory.read_bytes("part-00000.parquet") == b"PAR1 rows"
    assert json.loads(s3_bucket.get("out/_manifest.json")) == {"status": "running"}
    with pytest.raises(FileNotFoundError):
        directory.read_bytes("missing")
    assert not directory.exists("missing") and not directory.is_regular_file("missing")

    def fails_halfway(file):
        file.write(b"half a part")
        raise RuntimeError("encoder failed")

    with pytest.raises(RuntimeError, match="encoder failed"):
        directory.write_atomically("part-00001.parquet", fails_halfway)
    with pytest.raises(RuntimeError):
        directory.write_atomically("part-00000.parquet", fails_halfway)
    assert "out/part-00001.parquet" not in s3_bucket.keys("out/")     # nothing appeared
    assert s3_bucket.get("out/part-00000.parquet") == b"PAR1 rows"     # old content kept

    directory.check_writable(".vbatch.write-probe")
    directory.remove("_SUCCESS")
    directory.remove("_SUCCESS")                               # a missing name is fine
    directory.remove("sub")                                    # never a subdirectory's objects
    assert s3_bucket.keys("out/") == ["out/_manifest.json", "out/part-00000.parquet",
                                      "out/sub/user.txt"]
    directory.check_path_unchanged()
    directory.remove_if_unused()
    assert directory.is_open
    directory.close()
    assert not directory.is_open


def test_unreachable_store_and_missing_bucket_are_one_line_errors(s3_bucket):
    with pytest.raises(VBatchUsageError) as missing:
        ObjectStoreDirectory.open("s3://vbatch-no-such-bucket/out/")
    assert str(missing.value) == ("cannot open output directory s3://vbatch-no-such-bucket/out: "
                                  "no such bucket vbatch-no-such-bucket")
    options = {"endpoint_url": "http://127.0.0.1:9",
               "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2}}
    with pytest.raises(VBatchUsageError) as unreachable:
        check_output_dir(s3_bucket.uri("out/"), overwrite=False, storage_options=options)
    message = str(unreachable.value)
    assert message.startswith(f"cannot open output directory {s3_bucket.uri('out')}: ")
    assert "Could not connect" in message and "\n" not in message
    directory = ObjectStoreDirectory.open(s3_bucket.uri("out/"))
    s3_bucket.client.delete_bucket(Bucket=s3_bucket.name)     # gone while the job runs
    with pytest.raises(ObjectStoreError) as gone:
        directory.write_text("_SUCCESS", "")
    assert str(gone.value).startswith(f"cannot write {s3_bucket.uri('out/_SUCCESS')}: ")
    s3_bucket.client.create_bucket(Bucket=s3_bucket.name)


def test_object_store_paths_are_checked_like_local_directories(s3_bucket):
    out = s3_bucket.uri("out/")
    assert check_output_dir(out, overwrite=False) == s3_bucket.uri("out")
    s3_bucket.put("out/part-00000.parquet", b"x")
    with pytest.raises(VBatchUsageError, match="is not empty; pass --resume"):
        check_output_dir(out, overwrite=False)
    assert check_output_dir(out, overwrite=True) == s3_bucket.uri("out")
    s3_bucket.put("out/notes.txt", b"the user's")
    with pytest.raises(VBatchUsageError, match=r"holds files vbatch did not write \(notes.txt\)"):
        check_output_dir(out, overwrite=True)
    with pytest.raises(VBatchUsageError, match="'..' are not allowed"):
        check_output_dir(s3_bucket.uri("jobs/../out/"), overwrite=False)
    # --output-root: a prefix (at a "/" boundary); a local root refuses a URI and vice versa
    root = s3_bucket.uri("jobs/")
    assert check_output_dir(s3_bucket.uri("jobs/a/"), overwrite=False, root=root)
    for outside, other_root in [(s3_bucket.uri("jobsx/a/"), root), (s3_bucket.uri("a/"), root),
                                ("s3://another-bucket/jobs/a/", root),
                                (s3_bucket.uri("jobs/a/"), "/tmp")]:
        with pytest.raises(VBatchUsageError, match="outside the output root"):
            check_output_dir(outside, overwrite=False, root=other_root)
    with pytest.raises(VBatchUsageError, match="outside the output root"):
        check_output_dir("/tmp/local-out", overwrite=False, root=root)


def test_output_uris_map_to_paths_and_remote_inputs_need_an_output(tmp_path):
    assert output_path(f"file://{tmp_path}/out") == tmp_path / "out"
    assert check_output_dir(f"file://{tmp_path}/out", overwrite=False) == tmp_path / "out"
    assert output_path("s3a://bucket/out/") == "s3a://bucket/out"
    with pytest.raises(VBatchUsageError, match="unsupported URI scheme ftp://"):
        output_path("ftp://host/out")
    with pytest.raises(VBatchUsageError, match="is in an object store: pass --output"):
        default_output_dir("s3://bucket/in/prompts.jsonl")
    assert default_output_dir(f"file://{tmp_path}/x.jsonl") == tmp_path / "x.vbatch"


# --- the lock object ---------------------------------------------------------------------------

def test_lock_object_refuses_a_second_job_and_is_released(s3_bucket):
    out = s3_bucket.uri("out/")
    with locked_output_dir(out) as directory:
        holder = json.loads(s3_bucket.get(f"out/{LOCK_FILE}"))
        assert holder["pid"] == os.getpid() and holder["host"] == _machine()["host"]
        with pytest.raises(VBatchUsageError) as refused:
            with locked_output_dir(out):
                pass
        assert (f"output directory {s3_bucket.uri('out')} is in use by another vbatch job (pid "
                f"{os.getpid()} on host {holder['host']}, started {holder['started_at']}); wait "
                "for it to finish or choose another --output") in str(refused.value)
        # created only if absent: the store's If-None-Match refuses a racing second create
        assert not directory.create_exclusive(LOCK_FILE, b"{}")
        assert json.loads(s3_bucket.get(f"out/{LOCK_FILE}"))["token"] == holder["token"]
    assert s3_bucket.keys("out/") == []           # lock released, probe gone, nothing else


def test_lock_of_a_dead_local_holder_is_taken_over_one_elsewhere_is_kept(s3_bucket):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = {"pid": dead.pid, "started_at": "2026-01-01T00:00:00+00:00", "token": "old",
             **_machine()}
    s3_bucket.put(f"out/{LOCK_FILE}", json.dumps(stale).encode())
    with locked_output_dir(s3_bucket.uri("out/")):
        assert json.loads(s3_bucket.get(f"out/{LOCK_FILE}"))["pid"] == os.getpid()
    elsewhere = {**stale, "host": "another-machine"}
    s3_bucket.put(f"out/{LOCK_FILE}", json.dumps(elsewhere).encode())
    with pytest.raises(VBatchUsageError, match=f"pid {dead.pid} on host another-machine.*delete "
                                               f"{s3_bucket.uri('out')}/{LOCK_FILE} if none runs"):
        ObjectStoreLock.acquire(ObjectStoreDirectory.open(s3_bucket.uri("out/")))
    assert json.loads(s3_bucket.get(f"out/{LOCK_FILE}")) == elsewhere      # untouched


# --- real jobs ---------------------------------------------------------------------------------

def test_job_writes_every_row_once_to_s3(job_input, tiny_models, local_texts, s3_bucket):
    result = _run(_job(job_input, tiny_models["llama-gqa-untied"], s3_bucket.uri("out/")))
    assert result.returncode == 0, result.stderr
    keys = s3_bucket.keys("out/")
    assert {"out/_SUCCESS", "out/_manifest.json"} <= set(keys)
    assert f"out/{LOCK_FILE}" not in keys
    assert _bucket_texts(s3_bucket, "out/") == local_texts
    manifest = json.loads(s3_bucket.get("out/_manifest.json"))
    assert manifest["status"] == "complete" and manifest["counts"]["rows"] == NUM_ROWS
    again = _run(_job(job_input, tiny_models["llama-gqa-untied"], s3_bucket.uri("out/")))
    assert again.returncode == 2
    assert "is not empty; pass --resume" in _one_line_error(again)


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**ENV, **_s3_env()})


def _wait_for_parts(bucket, prefix: str, process: subprocess.Popen, count: int) -> None:
    deadline = time.monotonic() + 120
    while len(_etags(bucket, prefix)) < count and process.poll() is None:
        assert time.monotonic() < deadline, "no part was written"
        time.sleep(0.05)
    assert process.poll() is None, "the job finished before it could be stopped"


def test_killed_job_on_s3_resumes_exactly_once(job_input, tiny_models, local_texts, s3_bucket):
    args = _job(job_input, tiny_models["llama-gqa-untied"], s3_bucket.uri("out/"))
    process = _start(args)
    _wait_for_parts(s3_bucket, "out/", process, 2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    before = _etags(s3_bucket, "out/")
    assert "out/_SUCCESS" not in s3_bucket.keys("out/")
    assert f"out/{LOCK_FILE}" in s3_bucket.keys("out/")      # nothing released it

    resumed = _run(args + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr
    manifest = json.loads(s3_bucket.get("out/_manifest.json"))
    assert manifest["status"] == "complete" and 0 < manifest["counts"]["resumed_rows"] < NUM_ROWS
    assert _bucket_texts(s3_bucket, "out/") == local_texts
    after = _etags(s3_bucket, "out/")
    kept = {key for key in before if key in after}
    assert kept and all(after[key] == before[key] for key in kept)    # committed: untouched
    assert "out/_SUCCESS" in s3_bucket.keys("out/")


def test_bucket_refusing_writes_mid_job_fails_it_cleanly(job_input, tiny_models, s3_bucket):
    process = _start(_job(job_input, tiny_models["llama-gqa-untied"], s3_bucket.uri("out/")))
    try:
        _wait_for_parts(s3_bucket, "out/", process, 1)
        os.killpg(process.pid, signal.SIGSTOP)          # hold it while the policy changes
        s3_bucket.client.put_bucket_policy(Bucket=s3_bucket.name, Policy=json.dumps({
            "Version": "2012-10-17", "Statement": [{
                "Effect": "Deny", "Principal": "*", "Action": "s3:PutObject",
                "Resource": f"arn:aws:s3:::{s3_bucket.name}/*"}]}))
        os.killpg(process.pid, signal.SIGCONT)
        stderr = process.communicate(timeout=120)[1]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        s3_bucket.client.delete_bucket_policy(Bucket=s3_bucket.name)
    assert process.returncode == 1, stderr
    message = stderr.strip()
    assert "\n" not in message and "Traceback" not in message, stderr
    assert message.startswith(f"Error: cannot write {s3_bucket.uri('out/')}")
    assert "internal error" not in message
    assert "Forbidden" in message
    assert "out/_SUCCESS" not in s3_bucket.keys("out/")
