"""A single-node job listens on loopback only.

Proves, through the installed `vbatch` command, with the listening TCP sockets of the job's
whole process tree sampled while it runs: a `--tp 2` job (mp ranks: torch's rendezvous store,
gloo's pairs) opens no socket outside 127.0.0.0/8 and ::1, even where gloo would pick an external
interface (GLOO_SOCKET_IFNAME naming one, as on a host whose name resolves to its external
address). The same check of a `--runner ray --distributed-executor-backend ray --tp 2` job on
its private Ray is in tests/test_ray_exits.py (one job, then stopped with SIGTERM).
"""
from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import time

import pytest
from conftest import vbatch_command, write_prompt_jsonl

psutil = pytest.importorskip("psutil")



def _is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped                 # ::ffff:127.0.0.1 (a dual-stack socket)
    return address.is_loopback


def _external_interface() -> str | None:
    """A network interface with a non-loopback IPv4 address, if this machine has one."""
    for name, addresses in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and not _is_loopback(a.address) for a in addresses):
            return name
    return None


def _listeners(root: psutil.Process) -> set[tuple[str, int, int, str]]:
    """(address, port, pid, process name) of every listening TCP socket of `root` and its
    descendants."""
    found = set()
    try:
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return found
    for process in processes:
        try:
            name = process.name()
            for conn in process.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN:
                    found.add((conn.laddr.ip, conn.laddr.port, process.pid, name))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


def _run_and_watch(args, tmp_path, env_extra=None):
    """Run `vbatch run ...` to its end, sampling its process tree's listening sockets."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    env.pop("RAY_ADDRESS", None)
    stderr_path = tmp_path / "stderr.txt"
    with open(stderr_path, "w") as stderr:
        process = subprocess.Popen(vbatch_command() + ["run", *args], stdout=subprocess.DEVNULL,
                                   stderr=stderr, env=env, start_new_session=True)
    root = psutil.Process(process.pid)
    listeners: set = set()
    deadline = time.monotonic() + 300
    try:
        while process.poll() is None and time.monotonic() < deadline:
            listeners |= _listeners(root)
            time.sleep(0.1)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, 9)
        process.wait()
    return process.returncode, stderr_path.read_text(), listeners


def _job_args(tiny_models, tmp_path, *extra):
    source = write_prompt_jsonl(tmp_path / "in.jsonl", 24)
    return [str(source), "--model", str(tiny_models["gpt2"]), "--max-tokens", "32",
            "--ignore-eos", "--batch-size", "16", "--output", str(tmp_path / "out"), "-q",
            *extra]


def _assert_loopback_only(listeners, must_include: str):
    assert any(must_include in name for *_, name in listeners), \
        f"no listening socket of {must_include!r} seen (the watcher missed the job): {listeners}"
    exposed = sorted(entry for entry in listeners if not _is_loopback(entry[0]))
    assert not exposed, f"listening beyond loopback: {exposed}"


def test_tensor_parallel_job_listens_on_loopback_only(tiny_models, tmp_path):
    interface = _external_interface()
    env = {"GLOO_SOCKET_IFNAME": interface} if interface else {}
    rc, stderr, listeners = _run_and_watch(_job_args(tiny_models, tmp_path, "--tp", "2"),
                                           tmp_path, env)
    assert rc == 0, stderr
    _assert_loopback_only(listeners, must_include="python")
    rank_pids = {pid for _, _, pid, _ in listeners}
    assert len(rank_pids) >= 2, f"the two ranks' gloo sockets were not seen: {listeners}"
