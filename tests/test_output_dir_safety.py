"""The output directory is the job's alone, and only the one that was checked is written.

Proves, with real `vbatch run` processes: a second job (also `--overwrite`, also two `--resume`
runs) on a directory another job is writing is refused at once with exit code 2 naming the
holder's pid, and the first job ends with only its own rows; the lock of a SIGKILLed holder is
taken over; `--dry-run` takes no lock; a forced resume that appends removes `_SUCCESS` before
its first part, so a kill leaves an unfinished (running) job; an output directory swapped for
a symlink out of `--output-root` while the job starts is never written through; an
unwritable output directory is refused before the model loads.

A job is held still with SIGSTOP once its lock exists (the lock is taken before the model
loads), so nothing here depends on how fast the job runs.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import vbatch_command

from vbatch.errors import VBatchUsageError
from vbatch.io.commit_log import checkpoint_name, committed_parts
from vbatch.io.output_dir import locked_output_dir
from vbatch.io.output_lock import LOCK_FILE
from vbatch.io.parts import ParquetPartWriter
from vbatch.jobs import runner
from vbatch.jobs.cli import main

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def _write_prompts(path: Path, prefix: str, count: int, *, start: int = 0) -> Path:
    with path.open("a") as file:
        for i in range(start, start + count):
            file.write(json.dumps({"id": f"{prefix}{i}", "prompt": f"row {i} says hello"}) + "\n")
    return path


def _args(source: Path, model: Path, output: Path, *extra: str) -> list[str]:
    return [*vbatch_command(), "run", str(source), "--model", str(model), "--output",
            str(output), "--rows-per-file", "2", "--batch-size", "2", "--max-num-seqs", "2",
            "--max-tokens", "8", "--ignore-eos", "--temperature", "0", "--dtype", "float32",
            "-q", *extra]


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=300, env=ENV)


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=ENV)


def _wait_for_lock(output: Path, process: subprocess.Popen) -> dict:
    """The holder line of `output`'s lock once `process` has written it."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, f"exited {process.returncode} without locking {output}"
        try:
            holder = json.loads((output / LOCK_FILE).read_text())
            if holder.get("pid") == process.pid:
                return holder
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    raise AssertionError(f"{output} was never locked")


def _finish(process: subprocess.Popen) -> str:
    os.killpg(process.pid, signal.SIGCONT)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    return stderr


def _ids(output: Path) -> list[str]:
    return sorted(pq.read_table(output).column("id").to_pylist())


def _manifest(output: Path) -> dict:
    return json.loads((output / "_manifest.json").read_text())


@pytest.mark.parametrize("mode", ["overwrite", "resume"])
def test_second_job_on_a_directory_in_use_is_refused(mode, tiny_models, tmp_path):
    model = tiny_models["llama-gqa-untied"]
    output = tmp_path / "out"
    first_input = _write_prompts(tmp_path / "a.jsonl", "a", 4)
    second_input = first_input if mode == "resume" else _write_prompts(tmp_path / "b.jsonl",
                                                                       "b", 4)
    extra = ("--resume",) if mode == "resume" else ()
    first = _start(_args(first_input, model, output, *extra))
    try:
        holder = _wait_for_lock(output, first)
        os.killpg(first.pid, signal.SIGSTOP)          # holds the lock, writes nothing
        second = _run(_args(second_input, model, output, f"--{mode}"))
    finally:
        stderr = _finish(first)
    assert second.returncode == 2, second.stderr
    message = second.stderr.strip()
    assert "\n" not in message and "Traceback" not in message
    assert f"output directory {output} is in use by another vbatch job" in message
    assert f"pid {first.pid} on host {holder['host']}, started {holder['started_at']}" in message
    assert "Traceback" not in stderr
    assert _ids(output) == [f"a{i}" for i in range(4)]        # the first job's rows, once
    assert _manifest(output)["status"] == "complete"
    assert not (output / LOCK_FILE).exists()                   # released at the end


_HOLD_LOCK = """
import sys, time
from vbatch.io.output_dir import locked_output_dir
with locked_output_dir(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_lock_of_a_killed_holder_is_taken_over_and_dry_run_takes_none(tiny_models, tmp_path):
    output = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(output)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(VBatchUsageError, match=f"in use by another vbatch job \\(pid "
                                                   f"{holder.pid} on host "):
            with locked_output_dir(output):
                pass
        source = _write_prompts(tmp_path / "in.jsonl", "a", 2)
        dry = CliRunner().invoke(main, ["run", str(source), "--output", str(output),
                                        "--dry-run"])
        assert dry.exit_code == 0, dry.output
    finally:
        holder.kill()                                  # SIGKILL: no cleanup ran
        holder.wait(timeout=30)
    assert json.loads((output / LOCK_FILE).read_text())["pid"] == holder.pid   # stale file
    with locked_output_dir(output) as directory:       # the kernel dropped the dead one's lock
        assert json.loads((output / LOCK_FILE).read_text())["pid"] == os.getpid()
        assert directory.path == output
    assert not (output / LOCK_FILE).exists()


def test_writer_of_a_job_marks_the_directory_unfinished_first(tmp_path):
    (tmp_path / "_SUCCESS").write_text("")
    (tmp_path / "_manifest.json").write_text(json.dumps({"status": "complete"}))
    ParquetPartWriter(tmp_path, existing_parts=[], job_info={"fingerprint": {}}).abort()
    assert not (tmp_path / "_SUCCESS").exists()
    # the commit log (fingerprint, no part yet) replaced the finished job's manifest
    assert sorted(p.name for p in tmp_path.iterdir()) == [checkpoint_name(0)]
    assert committed_parts(tmp_path) == []


def test_forced_resume_that_appends_removes_success_before_its_first_part(tiny_models,
                                                                         tmp_path):
    model = tiny_models["llama-gqa-untied"]
    output = tmp_path / "out"
    source = _write_prompts(tmp_path / "in.jsonl", "a", 4)
    assert _run(_args(source, model, output)).returncode == 0
    old_parts = len(_manifest(output)["output"]["part_files"])
    assert committed_parts(output) == []              # finished: the log made way for the manifest
    _write_prompts(source, "a", 20, start=4)                  # more input: a different job
    process = _start(_args(source, model, output, "--resume", "--force", "--max-tokens", "16"))
    deadline = time.monotonic() + 120
    while process.poll() is None:
        assert time.monotonic() < deadline, "no new part was committed"
        try:
            if len(committed_parts(output)) > old_parts:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, "the job finished before it could be killed"
    assert len(committed_parts(output)) > old_parts
    assert not (output / "_SUCCESS").exists()
    assert not (output / "_manifest.json").exists()   # the finished run's: replaced by the log


@pytest.mark.parametrize("extra", [(), ("--resume",)], ids=["new-job", "resume"])
def test_output_dir_swapped_for_a_symlink_while_starting_is_not_followed(extra, tiny_models,
                                                                       tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    output, moved = root / "out", root / "moved"
    source = _write_prompts(tmp_path / "in.jsonl", "a", 4)
    process = _start(_args(source, tiny_models["llama-gqa-untied"], output, "--output-root",
                           str(root), *extra))
    _wait_for_lock(output, process)
    os.killpg(process.pid, signal.SIGSTOP)       # checked and locked; the model not yet loaded
    output.rename(moved)
    output.symlink_to(outside, target_is_directory=True)
    os.killpg(process.pid, signal.SIGCONT)
    _, stderr = process.communicate(timeout=300)
    assert sorted(outside.iterdir()) == [], "wrote outside the output root"
    if process.returncode == 0:                  # went on in the directory it checked
        assert (moved / "_SUCCESS").exists() and _ids(moved) == [f"a{i}" for i in range(4)]
    else:
        assert process.returncode == 2, stderr
        assert f"output directory {output} was moved or replaced" in stderr
    assert extra or process.returncode == 0      # a new job needs no path after the check
    assert not (moved / LOCK_FILE).exists()


@pytest.mark.parametrize("exists", [True, False], ids=["existing", "missing"])
def test_unwritable_output_dir_is_refused_before_the_model_loads(exists, tiny_models, tmp_path,
                                                                monkeypatch):
    # Tests run as root, where permission bits do not stop writes: the filesystem refusal is
    # simulated at os.open/os.mkdir for the one directory.
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    output = read_only / "out"
    if exists:
        output.mkdir()
    denied = output if exists else read_only
    real_open, real_mkdir = os.open, os.mkdir

    def _where(path, dir_fd) -> Path:
        base = os.path.realpath(f"/proc/self/fd/{dir_fd}") if dir_fd is not None else "."
        return Path(os.path.abspath(os.path.join(base, path)))

    def guarded_open(path, flags, mode=0o777, *, dir_fd=None):
        if flags & os.O_CREAT and _where(path, dir_fd).parent == denied:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, mode, dir_fd=dir_fd)

    def guarded_mkdir(path, mode=0o777, *, dir_fd=None):
        if _where(path, dir_fd).parent == denied:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_mkdir(path, mode, dir_fd=dir_fd)

    def no_model(*args, **kwargs):
        raise AssertionError("the model was resolved before the output directory was checked")

    monkeypatch.setattr(os, "open", guarded_open)
    monkeypatch.setattr(os, "mkdir", guarded_mkdir)
    monkeypatch.setattr(runner, "resolve_model", no_model)
    source = _write_prompts(tmp_path / "in.jsonl", "a", 2)
    result = CliRunner().invoke(main, ["run", str(source), "--model",
                                       str(tiny_models["gpt2"]), "--output", str(output)])
    assert result.exit_code == 2, result.output
    expected = (f"output directory {output} is not writable: Permission denied" if exists
                else f"cannot create output directory {output}: Permission denied")
    assert result.stderr.strip() == f"Error: {expected}"


def test_job_failing_after_the_lock_leaves_no_directory_behind(tmp_path):
    output = tmp_path / "out"
    source = _write_prompts(tmp_path / "in.jsonl", "a", 2)
    result = CliRunner().invoke(main, ["run", str(source), "--model",
                                       str(tmp_path / "no-such-model"), "--output", str(output)])
    assert result.exit_code == 2, result.output
    assert not output.exists()            # created for the lock, removed again: still empty
