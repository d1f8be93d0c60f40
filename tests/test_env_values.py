"""Values from the environment and out-of-range numbers: every `VBATCH_*` variable is checked
like a flag, before anything starts (exit code 2, one line naming the variable), and integer
options are bounded to what fits in 64 bits."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import vbatch.jobs
from vbatch import LLM, SamplingParams
from vbatch.env import ENV_VARS, FALSE_WORDS, MAX_NUM_THREADS, PACK_WEIGHTS, TRUE_WORDS
from vbatch.jobs.cli import main
from vbatch.jobs.config import JOB_OPTIONS
from vbatch.jobs.local_runner import LocalReplicaPool
from vbatch.jobs.progress import JobStats
from vbatch.parallel.cpu_packed import can_pack
from vbatch.parallel.pipeline import layer_partition

PACKAGE = Path(vbatch.__file__).resolve().parent
BOOLEAN = "one of 1, true, yes, on, 0, false, no, off"
THREADS = f"an integer in [1, {MAX_NUM_THREADS}]"
LAYER_COUNTS = "comma-separated positive layer counts, one per pipeline stage (e.g. 16,14)"


@pytest.fixture
def started_jobs(monkeypatch):
    """Stand-in for `vbatch.jobs.runner`: records the configs of the jobs that started; no
    VBATCH_* variable of this process leaks into the test."""
    started = []

    def run_job(config, reporter):
        started.append(config)
        return JobStats(num_rows=1, num_prompt_tokens=1, num_output_tokens=1, wall_time_s=1.0,
                        output_dir="out", model="tiny", dtype="float32", load_time_s=0.0,
                        num_part_files=1)

    module = types.ModuleType("vbatch.jobs.runner")
    module.run_job = run_job
    monkeypatch.setitem(sys.modules, "vbatch.jobs.runner", module)
    monkeypatch.setattr(vbatch.jobs, "runner", module, raising=False)
    for name in list(os.environ):
        if name.startswith("VBATCH_"):
            monkeypatch.delenv(name)
    return started


def invoke(args, env):
    return CliRunner().invoke(main, ["run", "in.jsonl", *args], env=env, catch_exceptions=False)


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def _a_file(tmp_path: Path) -> str:
    path = tmp_path / "not-a-dir"
    path.write_text("x")
    return str(path)


@pytest.mark.parametrize(("name", "value", "allowed"), [
    ("VBATCH_NUM_THREADS", "100000", THREADS),
    ("VBATCH_NUM_THREADS", "-1", THREADS),
    ("VBATCH_NUM_THREADS", "0", THREADS),
    ("VBATCH_NUM_THREADS", "abc", THREADS),
    ("VBATCH_NUM_THREADS", "1.5", THREADS),
    ("VBATCH_CPU_KERNELS", "maybe", BOOLEAN),
    ("VBATCH_PACK_WEIGHTS", "2", BOOLEAN),
    ("VBATCH_DEBUG", "verbose", BOOLEAN),
    ("VBATCH_PP_LAYER_PARTITION", "a,b", LAYER_COUNTS),
    ("VBATCH_PP_LAYER_PARTITION", "2,0", LAYER_COUNTS),
    ("VBATCH_PP_LAYER_PARTITION", "1,,2", LAYER_COUNTS),
    ("VBATCH_CACHE_DIR", _a_file, "a directory (created when missing)"),
])
def test_bad_env_value_exits_2_naming_the_variable(started_jobs, tmp_path, name, value, allowed):
    value = value(tmp_path) if callable(value) else value
    result = invoke([], env={name: value})
    assert result.exit_code == 2
    assert error_lines(result) == [
        f"Error: {name} must be {allowed}, got {value!r}"]
    assert started_jobs == []                   # refused before the job (and any model) started


@pytest.mark.parametrize("env", [
    {"VBATCH_NUM_THREADS": "1"}, {"VBATCH_NUM_THREADS": str(MAX_NUM_THREADS)},
    {"VBATCH_NUM_THREADS": " 2 "}, {"VBATCH_NUM_THREADS": ""},
    {"VBATCH_CPU_KERNELS": "off", "VBATCH_PACK_WEIGHTS": "TRUE", "VBATCH_DEBUG": "no"},
    {"VBATCH_PP_LAYER_PARTITION": "2,1"}, {"VBATCH_PP_LAYER_PARTITION": "  "},
    {"VBATCH_CACHE_DIR": "{tmp}/made-later"},
])
def test_good_env_values_start_the_job(started_jobs, tmp_path, env):
    env = {name: value.format(tmp=tmp_path) for name, value in env.items()}
    result = invoke([], env=env)
    assert result.exit_code == 0, result.stderr
    assert len(started_jobs) == 1


@pytest.mark.parametrize(("name", "value", "expected"), [
    ("VBATCH_MAX_NUM_SEQS", "abc", "'VBATCH_MAX_NUM_SEQS'"),
    ("VBATCH_MAX_NUM_SEQS", "0", "--max-num-seqs must be >= 1, got 0"),
    ("VBATCH_MAX_NUM_SEQS", "99999999999999999999999",
     "--max-num-seqs must be <= 9223372036854775807, got 99999999999999999999999"),
    ("VBATCH_MAX_NUM_BATCHED_TOKENS", "-3", "--max-num-batched-tokens must be >= 1, got -3"),
    ("VBATCH_KV_CACHE_MEMORY_GB", "nan", "--kv-cache-memory-gb must be > 0, got nan"),
    ("VBATCH_MAX_ERROR_RATE", "2", "--max-error-rate must be in [0, 1], got 2.0"),
    ("VBATCH_DTYPE", "float8", "'VBATCH_DTYPE'"),
    ("VBATCH_ON_LONG_PROMPT", "drop", "'VBATCH_ON_LONG_PROMPT'"),
    ("VBATCH_MODEL", " ", "--model must not be empty"),
])
def test_env_vars_of_flags_are_checked_like_the_flag(started_jobs, name, value, expected):
    result = invoke([], env={name: value})
    assert result.exit_code == 2
    assert expected in result.stderr
    assert started_jobs == []


def test_every_vbatch_variable_in_the_code_is_declared():
    """A new VBATCH_* read must get a declaration (vbatch/env.py, or an option's `env`)."""
    declared = {spec.name for spec in ENV_VARS} | {d.spec.env for d in JOB_OPTIONS}
    used = set()
    for source in PACKAGE.rglob("*.py"):
        used |= set(re.findall(r"VBATCH_[A-Z0-9_]*[A-Z0-9]", source.read_text()))
    assert used and used <= declared, sorted(used - declared)


@pytest.mark.parametrize(("seed", "top_k"), [("99999999999999999999999", "5"),
                                             ("1", "99999999999999999999999")])
def test_seed_and_top_k_above_64_bits_exit_2_naming_the_flag(started_jobs, seed, top_k):
    result = invoke(["--seed", seed, "--top-k", top_k], env={})
    flag, bound = ("--seed", 2**64 - 1) if len(seed) > 5 else ("--top-k", 2**63 - 1)
    assert result.exit_code == 2
    assert error_lines(result) == [
        f"Error: {flag} must be <= {bound}, got 99999999999999999999999"]
    assert started_jobs == []


# --- the parallel/ reads (which may not import vbatch.env) agree with the declarations --------

@pytest.mark.parametrize("word", [*TRUE_WORDS, *FALSE_WORDS, "Off", " NO ", ""])
def test_pack_weights_read_agrees_with_its_declaration(monkeypatch, word):
    weight = torch.zeros(4, 4, dtype=torch.bfloat16)
    monkeypatch.delenv("VBATCH_PACK_WEIGHTS", raising=False)
    packable = can_pack(weight)
    monkeypatch.setenv("VBATCH_PACK_WEIGHTS", word)
    assert can_pack(weight) == (packable and PACK_WEIGHTS.read())


def test_blank_layer_partition_means_the_even_split(monkeypatch):
    monkeypatch.setenv("VBATCH_PP_LAYER_PARTITION", "  ")
    assert layer_partition(3, 2) == [2, 1]


def test_blank_num_threads_still_splits_the_cores_between_replicas(monkeypatch):
    monkeypatch.setenv("VBATCH_NUM_THREADS", " ")
    plan = types.SimpleNamespace(device_groups=[(), ()], num_replicas=2, world_size=1)
    env = LocalReplicaPool._replica_env(types.SimpleNamespace(plan=plan), 0)
    assert env == {"VBATCH_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // 2))}


# --- real engines and jobs ---------------------------------------------------------------------

@pytest.mark.parametrize(("name", "value"), [("VBATCH_NUM_THREADS", "100000"),
                                           ("VBATCH_PACK_WEIGHTS", "2")])
def test_api_refuses_a_bad_value_naming_it(monkeypatch, tiny_models, name, value):
    """The Python API checks the environment like `vbatch run` (100000 threads used to crash
    the process; parallel/ cannot check VBATCH_PACK_WEIGHTS itself)."""
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=rf"^{name} must be .*, got '{value}'$"):
        LLM(str(tiny_models["gpt2"]), dtype="float32", kv_cache_memory_gb=0.01)


def test_largest_seed_and_top_k_work_in_the_engine(tiny_models):
    llm = LLM(str(tiny_models["gpt2"]), dtype="float32", kv_cache_memory_gb=0.01,
              seed=2**64 - 1)
    params = SamplingParams(temperature=1.0, top_k=2**63 - 1, seed=2**64 - 1, max_tokens=3,
                            ignore_eos=True)
    [output] = llm.generate(["hello"], params)
    assert len(output.outputs[0].token_ids) == 3


def _vbatch(*args, env):
    exe = shutil.which("vbatch")
    command = [exe] if exe else [sys.executable, "-m", "vbatch"]
    return subprocess.run(command + list(args), capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **env})


def _job(tmp_path, model, *flags):
    source = tmp_path / "in.jsonl"
    source.write_text('{"prompt": "hello"}\n{"prompt": "world"}\n')
    return ("run", str(source), "--model", str(model), "--dtype", "float32", "--max-tokens", "2",
            "--kv-cache-memory-gb", "0.01", "-o", str(tmp_path / "out"), "-q", *flags)


def test_huge_thread_count_is_exit_2_not_a_segfault(tmp_path, tiny_models):
    result = _vbatch(*_job(tmp_path, tiny_models["gpt2"]), env={"VBATCH_NUM_THREADS": "100000"})
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (f"Error: VBATCH_NUM_THREADS must be an integer in "
                                     f"[1, {MAX_NUM_THREADS}], got '100000'")
    assert not (tmp_path / "out").exists()


def test_good_thread_count_runs_the_job(tmp_path, tiny_models):
    result = _vbatch(*_job(tmp_path, tiny_models["gpt2"]), env={"VBATCH_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "_SUCCESS").exists()


def test_layer_partition_that_does_not_fit_the_model_is_exit_2(tmp_path, tiny_models):
    """Checked by the engine before its pipeline workers start (it was an internal error
    reported by a dead worker)."""
    result = _vbatch(*_job(tmp_path, tiny_models["gpt2"], "--pp", "2"),
                     env={"VBATCH_PP_LAYER_PARTITION": "1,1"})
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == ("Error: VBATCH_PP_LAYER_PARTITION='1,1' must give 2 "
                                     "positive layer counts summing to 3")
