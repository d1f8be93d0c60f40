"""How a Ray job ends when it is stopped or cannot reach its cluster.

Proves, through the installed `vbatch` command: a generating `--runner ray
--distributed-executor-backend ray --tp 2` job on its private Ray listens on loopback only (the
listening TCP sockets of its whole tree sampled while it runs: GCS, raylet, workers, agents,
replica actors and their rank actors), and SIGTERM to it exits 143 with one "Terminated." line
(no traceback, no stack dump from Ray's C++ signal handler), nothing promoted to `_SUCCESS`, and
every process of the job's tree gone shortly after; a SIGTERM
that lands while `ray.init` runs (Ray's own handler then raises SystemExit(15)) still reaches the
caller's handler, which is back in place afterwards; a `RAY_ADDRESS` whose host does not resolve
and a `--ray-address` where nothing listens fail within seconds (exit 2, one line naming the
address) instead of ray.init retrying for minutes.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import vbatch_command, write_prompt_jsonl
from test_listening_sockets import _assert_loopback_only, _listeners

from vbatch.engine.executor import ray_cluster

psutil = pytest.importorskip("psutil")



def _env(**extra):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **extra}
    if "RAY_ADDRESS" not in extra:
        env.pop("RAY_ADDRESS", None)
    return env


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.slow
def test_ray_job_listens_on_loopback_only_and_sigterm_stops_it_with_143(tiny_models, tmp_path):
    pytest.importorskip("ray")
    source = write_prompt_jsonl(tmp_path / "in.jsonl", 2000)
    out = tmp_path / "out"
    stderr_path = tmp_path / "stderr.txt"
    with open(stderr_path, "w") as stderr:
        process = subprocess.Popen(
            vbatch_command() + ["run", str(source), "--model", str(tiny_models["gpt2"]),
                                "--runner", "ray", "--tp", "2",
                                "--distributed-executor-backend", "ray",
                                "--max-tokens", "32", "--ignore-eos",
                                "--batch-size", "16", "--rows-per-file", "16",
                                "--output", str(out)],
            stdout=subprocess.DEVNULL, stderr=stderr, env=_env(), start_new_session=True)
    root = psutil.Process(process.pid)
    tree: set[int] = set()
    listeners: set = set()
    try:
        deadline = time.monotonic() + 240
        while (process.poll() is None and time.monotonic() < deadline
               and not list(out.glob("part-*.parquet"))):
            try:
                tree |= {child.pid for child in root.children(recursive=True)}
            except psutil.NoSuchProcess:
                break
            listeners |= _listeners(root)
            time.sleep(0.1)
        assert process.poll() is None, stderr_path.read_text()
        assert list(out.glob("part-*.parquet")), "the job wrote no part in time"
        _assert_loopback_only(listeners, must_include="gcs_server")
        assert any("raylet" in name for *_, name in listeners), listeners
        assert any("RankActor" in name for *_, name in listeners), listeners
        tree |= {child.pid for child in root.children(recursive=True)}
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)
        stderr = stderr_path.read_text()
        assert process.returncode == 143, stderr
        assert stderr.count("Terminated.") == 1, stderr
        assert "Traceback" not in stderr, stderr
        assert "SIGTERM received" not in stderr, stderr       # Ray's C++ stack dump
        assert not (out / "_SUCCESS").exists()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and [pid for pid in tree if _alive(pid)]:
            time.sleep(0.2)
        leftovers = [(pid, psutil.Process(pid).name()) for pid in tree if _alive(pid)]
        assert not leftovers, f"processes left after SIGTERM: {leftovers}"
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_sigterm_during_ray_init_reaches_the_callers_handler():
    class Stop(BaseException):
        pass

    def callers_handler(signum, frame):
        raise Stop()

    def rays_handler(signum, frame):             # what ray.init installs while it starts
        sys.exit(signum)

    previous = signal.signal(signal.SIGTERM, callers_handler)
    try:
        with pytest.raises(Stop), ray_cluster._keeping_sigterm_handler():
            signal.signal(signal.SIGTERM, rays_handler)
            signal.raise_signal(signal.SIGTERM)
        assert signal.getsignal(signal.SIGTERM) is callers_handler
        with ray_cluster._keeping_sigterm_handler():
            signal.signal(signal.SIGTERM, rays_handler)
        assert signal.getsignal(signal.SIGTERM) is callers_handler
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize("address, how", [("garbage:1", "env"), ("127.0.0.1:1", "flag")])
def test_unreachable_ray_address_fails_fast_naming_it(tiny_models, tmp_path, address, how):
    pytest.importorskip("ray")
    source = write_prompt_jsonl(tmp_path / "in.jsonl", 4)
    args = ["run", str(source), "--model", str(tiny_models["gpt2"]), "--max-tokens", "4",
            "--output", str(tmp_path / "out")]
    if how == "flag":
        args += ["--ray-address", address]
    env = _env(RAY_ADDRESS=address) if how == "env" else _env()
    started = time.monotonic()
    result = subprocess.run(vbatch_command() + args, capture_output=True, text=True, env=env,
                            timeout=120)
    elapsed = time.monotonic() - started
    assert result.returncode == 2, result.stderr
    assert elapsed < 60, f"took {elapsed:.0f} s"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and address in lines[0], result.stderr
    assert not (tmp_path / "out" / "_SUCCESS").exists()


@pytest.mark.parametrize("address, expected", [
    ("nohost", "is not HOST:PORT"), ("ray://garbage:10001", "does not resolve"),
    ("127.0.0.1:1", "nothing answers at 127.0.0.1:1")])
def test_cluster_address_check_names_the_problem(address, expected):
    with pytest.raises(ValueError, match=expected) as caught:
        ray_cluster.check_cluster_address(address, timeout_s=5)
    assert repr(address) in str(caught.value)
