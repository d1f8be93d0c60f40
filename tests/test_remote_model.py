"""`--model s3://...`: the checkpoint is fetched once per node into the content-addressed cache.

Proves, against a real S3 server (moto): a URI resolves to a local copy equal byte for byte to
the uploaded checkpoint, fetched once (a second resolve downloads nothing and gives the same
path); a rewritten remote object gives a new cache entry and fingerprint; two processes racing
produce exactly one download and one complete entry; a failed or SIGKILLed download leaves no
complete entry and the next resolve succeeds; a `.gguf` object is fetched and converted; user
errors are one line naming the URI; and a `vbatch run` job with `--model s3://...` and two
local replicas writes the same rows as the job on the local path, with one download in all.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import s3fs
from conftest import run_offline, small_job_command, write_prompt_jsonl

from vbatch.engine.loader import resolve_model
from vbatch.errors import VBatchUsageError
from vbatch.storage.model_cache import COMPLETE_MARKER

FETCHED = "vbatch: fetched "


def _upload_model(s3_bucket, model_dir: Path, prefix: str = "models/tiny") -> str:
    s3_bucket.upload_dir(model_dir, prefix)
    return s3_bucket.uri(prefix + "/")


def _tree(root: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every file under `root` except the cache's marker."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != COMPLETE_MARKER}


def _entries(cache: Path) -> list[Path]:
    """Everything in the cache's remote/ directory but lock files: entries and temp dirs."""
    remote = cache / "remote"
    return sorted(p for p in remote.iterdir() if not p.name.startswith(".lock-"))


def test_fetched_once_equal_to_the_upload_and_a_changed_object_gives_a_new_entry(
        s3_bucket, tiny_models, tmp_path, capfd):
    original = tiny_models["llama-gqa-untied"]
    uri = _upload_model(s3_bucket, original)
    cache = tmp_path / "cache"

    first = resolve_model(uri, cache_dir=str(cache))
    assert first.source == uri and first.format == "safetensors"
    assert first.path.parent == cache / "remote"
    assert _tree(first.path) == _tree(original)       # every file, tokenizer and config too
    assert capfd.readouterr().err.count(FETCHED) == 1

    again = resolve_model(uri, cache_dir=str(cache))
    assert (again.path, again.fingerprint) == (first.path, first.fingerprint)
    assert FETCHED not in capfd.readouterr().err
    assert _entries(cache) == [first.path]

    config = json.loads((original / "config.json").read_text())
    config["vbatch_test_revision"] = 2
    changed_bytes = json.dumps(config).encode()
    s3_bucket.put("models/tiny/config.json", changed_bytes)
    changed = resolve_model(uri, cache_dir=str(cache))
    assert changed.fingerprint != first.fingerprint and changed.path != first.path
    assert (changed.path / "config.json").read_bytes() == changed_bytes
    assert (first.path / "config.json").read_bytes() == (original / "config.json").read_bytes()
    assert capfd.readouterr().err.count(FETCHED) == 1


_RACER = """
import sys, time
from pathlib import Path
from vbatch.engine.loader import resolve_model
from vbatch.storage import model_cache
verify = model_cache._verify
def slow_verify(*args):      # widen the window in which a second downloader could start
    time.sleep(1.0)
    return verify(*args)
model_cache._verify = slow_verify
uri, cache, go = sys.argv[1:]
Path(cache + ".ready." + str(__import__("os").getpid())).touch()
while not Path(go).exists():
    time.sleep(0.01)
print(resolve_model(uri, cache_dir=cache).path)
"""


def test_concurrent_processes_share_one_download(s3_bucket, tiny_models, tmp_path):
    uri = _upload_model(s3_bucket, tiny_models["llama-gqa-untied"])
    cache, go = tmp_path / "cache", tmp_path / "go"
    racers = [subprocess.Popen([sys.executable, "-c", _RACER, uri, str(cache), str(go)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for _ in range(2)]
    while len(list(tmp_path.glob("cache.ready.*"))) < 2 and all(r.poll() is None
                                                                for r in racers):
        time.sleep(0.01)
    go.touch()          # both are imported and waiting: let them race
    results = [racer.communicate(timeout=120) for racer in racers]
    assert all(racer.returncode == 0 for racer in racers), results
    paths = {out.strip() for out, _ in results}
    assert len(paths) == 1
    assert sum(err.count(FETCHED) for _, err in results) == 1
    assert _entries(cache) == [Path(paths.pop())]
    assert (_entries(cache)[0] / COMPLETE_MARKER).is_file()


def test_failed_download_leaves_no_entry_and_the_next_call_succeeds(
        s3_bucket, tiny_models, tmp_path, monkeypatch, capfd):
    original = tiny_models["llama-gqa-untied"]
    uri = _upload_model(s3_bucket, original)
    cache = tmp_path / "cache"
    real_get_file = s3fs.S3FileSystem._get_file

    async def broken_get_file(self, rpath, lpath, **kwargs):
        if rpath.endswith(".safetensors"):
            Path(lpath).write_bytes(b"half a shard")
            raise ConnectionResetError("connection reset by peer")
        return await real_get_file(self, rpath, lpath, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_get_file", broken_get_file)
    with pytest.raises(VBatchUsageError) as failure:
        resolve_model(uri, cache_dir=str(cache))
    message = str(failure.value)
    assert "\n" not in message and uri in message and "connection reset" in message
    assert _entries(cache) == []       # no entry, no temporary directory
    monkeypatch.setattr(s3fs.S3FileSystem, "_get_file", real_get_file)

    resolved = resolve_model(uri, cache_dir=str(cache))
    assert _tree(resolved.path) == _tree(original)
    assert capfd.readouterr().err.count(FETCHED) == 1


_KILLED = """
import asyncio, sys
from pathlib import Path
import s3fs
from vbatch.engine.loader import resolve_model
real = s3fs.S3FileSystem._get_file
async def hanging(self, rpath, lpath, **kwargs):
    if rpath.endswith(".safetensors"):
        Path(lpath).write_bytes(b"half a shard")
        await asyncio.sleep(600)
    return await real(self, rpath, lpath, **kwargs)
s3fs.S3FileSystem._get_file = hanging
resolve_model(sys.argv[1], cache_dir=sys.argv[2])
"""


def test_killed_download_leaves_nothing_a_later_run_uses(s3_bucket, tiny_models, tmp_path):
    original = tiny_models["llama-gqa-untied"]
    uri = _upload_model(s3_bucket, original)
    cache = tmp_path / "cache"
    victim = subprocess.Popen([sys.executable, "-c", _KILLED, uri, str(cache)],
                              stderr=subprocess.PIPE, text=True)
    try:
        while not list(cache.glob("remote/.tmp-*/*.safetensors")):
            assert victim.poll() is None, victim.stderr.read()
            time.sleep(0.02)
    finally:
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
    assert [p.name.startswith(".tmp-") for p in _entries(cache)] == [True]   # half a download

    resolved = resolve_model(uri, cache_dir=str(cache))   # the dead holder's lock is free
    assert _tree(resolved.path) == _tree(original)
    assert _entries(cache) == [resolved.path]              # the leftover is gone


def test_gguf_object_is_fetched_and_converted(s3_bucket, tmp_path):
    from test_loader import _tiny_gguf_model, write_tiny_gguf
    write_tiny_gguf(tmp_path / "tiny.gguf", _tiny_gguf_model(False))
    s3_bucket.put("gguf/tiny.gguf", (tmp_path / "tiny.gguf").read_bytes())
    uri = s3_bucket.uri("gguf/tiny.gguf")
    remote = resolve_model(uri, cache_dir=str(tmp_path / "cache"))
    local = resolve_model(str(tmp_path / "tiny.gguf"), cache_dir=str(tmp_path / "cache"))
    assert (remote.source, remote.format) == (uri, "gguf")
    assert remote.path != local.path
    assert _tree(remote.path).keys() == _tree(local.path).keys()
    assert ((remote.path / "model.safetensors").read_bytes()
            == (local.path / "model.safetensors").read_bytes())


def test_user_errors_are_one_line_naming_the_uri(s3_bucket, tmp_path, monkeypatch):
    s3_bucket.put("notamodel/README.md", b"hello")
    s3_bucket.put("pickled/config.json", b"{}")
    s3_bucket.put("pickled/pytorch_model.bin", b"x")
    cases = {
        "s3://vbatch-no-such-bucket-anywhere/m/": "bucket does not exist",
        s3_bucket.uri("empty/"): "no objects under",
        s3_bucket.uri("notamodel/"): "no config.json",
        s3_bucket.uri("pickled/"): "--allow-pickle",
        s3_bucket.uri("missing.gguf"): "does not exist",
    }
    for uri, expected in cases.items():
        with pytest.raises(VBatchUsageError) as failure:
            resolve_model(uri, cache_dir=str(tmp_path / "cache"))
        message = str(failure.value)
        assert "\n" not in message and uri.rstrip("/") in message and expected in message, message

    async def denied(self, *args, **kwargs):
        raise PermissionError("Access Denied")

    monkeypatch.setattr(s3fs.S3FileSystem, "_lsdir", denied)   # what s3fs raises for 403
    with pytest.raises(VBatchUsageError, match="access denied to s3://.*credentials"):
        resolve_model(s3_bucket.uri("notamodel/"), cache_dir=str(tmp_path / "cache"))


def test_job_on_an_s3_model_with_two_replicas_matches_the_local_model(
        s3_bucket, tiny_models, tmp_path, monkeypatch):
    model = tiny_models["llama-gqa-untied"]
    uri = _upload_model(s3_bucket, model)
    source = write_prompt_jsonl(tmp_path / "prompts.jsonl", 8)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("VBATCH_CACHE_DIR", str(tmp_path / "cache"))

    local = run_offline(small_job_command(source, model, tmp_path / "local", max_tokens=6))
    assert local.returncode == 0, local.stderr
    remote = run_offline(small_job_command(source, uri, tmp_path / "remote", "--replicas", "2",
                                           "--runner", "local", max_tokens=6))
    assert remote.returncode == 0, remote.stderr
    assert remote.stderr.count(FETCHED) == 1, remote.stderr   # driver + 2 replicas: one fetch

    def texts(output: Path) -> dict[str, str]:
        return {row["id"]: row["generated_text"] for row in pq.read_table(output).to_pylist()}

    assert texts(tmp_path / "remote") == texts(tmp_path / "local")
    assert len(texts(tmp_path / "local")) == 8
    assert len(_entries(tmp_path / "cache")) == 1
