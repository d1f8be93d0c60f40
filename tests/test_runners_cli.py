"""The runner flags through the installed `vbatch` command.

Proves: without an importable Ray (a `ray` package that raises ImportError on PYTHONPATH) the
default run with `--replicas 2` uses the local runner and succeeds, and `--runner ray` is refused
with the install hint; `--dry-run` prints the plan and writes nothing (without loading the model:
the model directory holds only a config.json); `hf://NAME:SPLIT` inputs are found; SIGTERM and
Ctrl-C stop a 2-replica job with no replica or worker process left.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

PROMPTS = ["The quick brown fox", "Paris is", "def add(a, b):", "Once upon a time"]


def _command():
    exe = shutil.which("vbatch")
    return [exe] if exe else [sys.executable, "-m", "vbatch"]


def _vbatch(*args, env_extra=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(_command() + list(args), capture_output=True, text=True, env=env,
                          timeout=300)


def _write_jsonl(path, n):
    path.write_text("".join(json.dumps({"prompt": f"{PROMPTS[i % 4]} {i}"}) + "\n"
                            for i in range(n)))
    return path


def test_without_ray_two_replicas_run_locally(tmp_path, tiny_models):
    fake = tmp_path / "fake" / "ray"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('ray is not installed (test double)')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path / "fake"),
                                          os.environ.get("PYTHONPATH", "")])}
    source = _write_jsonl(tmp_path / "in.jsonl", 12)
    model = str(tiny_models["gpt2"])
    result = _vbatch("run", str(source), "--model", model, "--replicas", "2", "--max-tokens", "4",
                     "--temperature", "0", "--batch-size", "2", env_extra=env)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "in.vbatch"
    summary = json.loads((out / "_run_summary.json").read_text())
    assert summary["plan"]["runner"] == "local" and summary["plan"]["replicas"] == 2
    assert "ray" not in summary["versions"]
    ids = pq.read_table(out).column("id").to_pylist()
    assert sorted(ids) == sorted(f"in.jsonl:{i}" for i in range(12))
    assert "2 (local runner)" in result.stderr

    refused = _vbatch("run", str(source), "--model", model, "--runner", "ray",
                      "--output", str(tmp_path / "never"), env_extra=env)
    assert refused.returncode == 2
    assert "vbatch[ray]" in refused.stderr and "Traceback" not in refused.stderr
    assert not (tmp_path / "never").exists()


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, tiny_models):
    model = tmp_path / "six-heads"          # config.json only: a real run could not load it
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_attention_heads": 6,
        "num_key_value_heads": 3, "num_hidden_layers": 4, "hidden_size": 48}))
    source = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": p} for p in PROMPTS * 5]), source)
    result = _vbatch("run", str(source), "--model", str(model), "--dry-run", "--replicas", "2",
                     "--tp", "3", "--runner", "local")
    assert result.returncode == 0, result.stderr
    plan = result.stdout
    for needle in ("runner        local", "replicas      2", "tp x pp       3 x 1",
                   "executor      mp", "replica 0", "replica 1", "1 file(s), 20 rows",
                   str(source), "tp 3 and pp 1 fit"):
        assert needle in plan, plan
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.parquet", "six-heads"]

    bad = _vbatch("run", str(source), "--model", str(tiny_models["gpt2"]), "--dry-run",
                  "--tp", "3")
    assert bad.returncode == 2 and "valid sizes: 1, 2, 4" in bad.stderr
    assert not (tmp_path / "in.vbatch").exists()


def test_hf_uri_input_from_the_local_cache(tmp_path):
    data = tmp_path / "my_dataset"
    data.mkdir()
    _write_jsonl(data / "train.jsonl", 9)
    env = {"HF_DATASETS_CACHE": str(tmp_path / "hf-cache"), "HF_DATASETS_OFFLINE": "1"}
    result = _vbatch("run", f"hf://{data}:train", "--dry-run", "--runner", "local",
                     env_extra=env)
    assert result.returncode == 0, result.stderr
    assert "1 file(s), 9 rows" in result.stdout and ".arrow" in result.stdout
    assert "my_dataset-train.vbatch" in result.stdout
    missing = _vbatch("run", f"hf://{data}:test", "--dry-run", env_extra=env)
    assert missing.returncode == 2 and "test" in missing.stderr


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as handle:
            return [int(p) for p in handle.read().split()]
    except OSError:
        return []


def _spawned(pid: int) -> list[int]:
    """Children of `pid` started by multiprocessing's spawn (replicas, or a replica's workers)."""
    found = []
    for child in _children(pid):
        try:
            with open(f"/proc/{child}/cmdline", "rb") as handle:
                if b"spawn_main" in handle.read():
                    found.append(child)
        except OSError:
            pass
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="needs Linux /proc")
@pytest.mark.parametrize("signame, exit_code, tp", [("SIGTERM", 143, "2"), ("SIGINT", 130, "1")])
def test_signal_stops_every_replica_and_worker(tmp_path, tiny_models, signame, exit_code, tp):
    source = _write_jsonl(tmp_path / "in.jsonl", 3000)
    process = subprocess.Popen(
        _command() + ["run", str(source), "--model", str(tiny_models["gpt2"]), "--replicas", "2",
                      "--tp", tp, "--max-tokens", "64", "--ignore-eos", "--batch-size", "16",
                      "--output", str(tmp_path / "out")],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 120
    replicas, workers = [], []
    while time.monotonic() < deadline and (len(replicas) < 2 or len(workers) < 2 * (tp == "2")):
        replicas = _spawned(process.pid)
        workers = [w for r in replicas for w in _spawned(r)]
        time.sleep(0.2)
    assert len(replicas) >= 2, "replicas did not start"
    while time.monotonic() < deadline and not (tmp_path / "out").exists():
        time.sleep(0.2)                             # output appears with the first result
    process.send_signal(getattr(signal, signame))
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == exit_code, stderr
    assert "Traceback" not in stderr
    assert not (tmp_path / "out" / "_SUCCESS").exists()
    time.sleep(1)
    assert not [pid for pid in replicas + workers if _alive(pid)]
