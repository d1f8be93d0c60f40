"""The `vbatch` CLI (with a fake runner) and the ProgressReporter output."""
from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
from click.testing import CliRunner

import vbatch.jobs
from vbatch.errors import InputError
from vbatch.jobs.cli import main
from vbatch.jobs.config import JobConfig
from vbatch.jobs.progress import JobStats, ProgressReporter, format_duration

REPO_ROOT = Path(__file__).resolve().parents[1]


def make_cli_runner() -> CliRunner:
    """A CliRunner with stdout and stderr kept apart (click 8.1 needs mix_stderr=False)."""
    try:
        return CliRunner(mix_stderr=False)
    except TypeError:
        return CliRunner()


def make_stats(**changes) -> JobStats:
    values = dict(num_rows=5000, num_prompt_tokens=120_000, num_output_tokens=300_000,
                  wall_time_s=105.0, output_dir="/tmp/out", model="tiny-llama",
                  dtype="bfloat16", load_time_s=5.0, num_part_files=3)
    values.update(changes)
    return JobStats(**values)


class FakeRunner:
    """Stands in for vbatch.jobs.runner: records the JobConfig, returns stats or raises."""

    def __init__(self):
        self.configs: list[JobConfig] = []
        self.error: BaseException | None = None

    def run_job(self, config, reporter):
        self.configs.append(config)
        if self.error is not None:
            raise self.error
        reporter.start(2)
        reporter.update(2, 10)
        reporter.close()
        return make_stats(model=config.model or "default", dtype=config.dtype)

    @property
    def config(self) -> JobConfig:
        assert len(self.configs) == 1
        return self.configs[0]


@pytest.fixture
def fake_runner(monkeypatch):
    """Replace `vbatch.jobs.runner` (real or not yet written) with a FakeRunner module."""
    fake = FakeRunner()
    module = types.ModuleType("vbatch.jobs.runner")
    module.run_job = fake.run_job
    monkeypatch.setitem(sys.modules, "vbatch.jobs.runner", module)
    monkeypatch.setattr(vbatch.jobs, "runner", module, raising=False)
    for name in list(os.environ):
        if name.startswith("VBATCH_"):
            monkeypatch.delenv(name)
    return fake


def invoke(args, env=None):
    return make_cli_runner().invoke(main, args, env=env, catch_exceptions=False)


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


# --- help and version ----------------------------------------------------------------------------

@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help(flag):
    result = invoke([flag])
    assert result.exit_code == 0
    assert "run" in result.output and "--version" in result.output


def test_run_help_lists_every_option():
    result = invoke(["run", "-h"])
    assert result.exit_code == 0
    for option in ["--model", "-m", "--output", "-o", "--overwrite", "--prompt-column",
                   "--id-column", "--chat / --no-chat", "--max-tokens", "--temperature",
                   "--top-p", "--top-k", "--min-p", "--seed", "--stop", "--ignore-eos",
                   "--dtype", "--max-model-len", "--max-num-seqs", "--max-num-batched-tokens",
                   "--kv-cache-memory-gb", "--rows-per-file", "--batch-size",
                   "--trust-remote-code", "--config", "--quiet", "-q", "VBATCH_MODEL",
                   "VBATCH_DTYPE"]:
        assert option in result.output, option


def test_version():
    result = invoke(["--version"])
    assert result.exit_code == 0
    assert result.output.startswith("vbatch, version ")


# --- precedence ----------------------------------------------------------------------------------

def test_flags_reach_the_job_config(fake_runner):
    result = invoke(["run", "data.jsonl", "-m", "my-model", "-o", "out", "--overwrite",
                     "--chat", "--max-tokens", "7", "--temperature", "0", "--top-p", "0.5",
                     "--top-k", "-1", "--min-p", "0.1", "--seed", "3", "--stop", "END",
                     "--stop", "\n\n", "--ignore-eos", "--dtype", "float32",
                     "--max-model-len", "512", "--max-num-seqs", "4",
                     "--max-num-batched-tokens", "1024", "--kv-cache-memory-gb", "0.5",
                     "--rows-per-file", "10", "--batch-size", "16", "--trust-remote-code",
                     "--prompt-column", "text", "--id-column", "key", "-q"])
    assert result.exit_code == 0, result.stderr
    assert fake_runner.config == JobConfig(
        input="data.jsonl", model="my-model", output="out", overwrite=True, chat=True,
        max_tokens=7, temperature=0.0, top_p=0.5, top_k=0, min_p=0.1, seed=3,
        stop=["END", "\n\n"], ignore_eos=True, dtype="float32", max_model_len=512,
        max_num_seqs=4, max_num_batched_tokens=1024, kv_cache_memory_gb=0.5,
        rows_per_file=10, batch_size=16, trust_remote_code=True, prompt_column="text",
        id_column="key")


def test_flag_beats_yaml_beats_default(fake_runner, tmp_path):
    config_path = tmp_path / "job.yaml"
    config_path.write_text("input: from_yaml.parquet\nmodel: yaml-model\nmax_tokens: 64\n"
                           "temperature: 0.5\nchat: true\ndtype: float16\n")
    result = invoke(["run", "--config", str(config_path), "--max-tokens", "8"])
    assert result.exit_code == 0, result.stderr
    config = fake_runner.config
    assert config.input == "from_yaml.parquet"
    assert config.max_tokens == 8                      # flag
    assert (config.model, config.temperature) == ("yaml-model", 0.5)   # YAML
    assert config.chat is True and config.dtype == "float16"  # click defaults do not override
    assert config.top_p == 1.0 and config.max_num_seqs == 256  # defaults


def test_env_var_beats_yaml_and_flag_beats_env(fake_runner, tmp_path):
    config_path = tmp_path / "job.yaml"
    config_path.write_text("model: yaml-model\ndtype: float16\n")
    env = {"VBATCH_MODEL": "env-model", "VBATCH_DTYPE": "bfloat16"}
    assert invoke(["run", "in.jsonl", "--config", str(config_path)], env=env).exit_code == 0
    assert invoke(["run", "in.jsonl", "--config", str(config_path), "-m", "flag-model"],
                  env=env).exit_code == 0
    first, second = fake_runner.configs
    assert (first.model, first.dtype) == ("env-model", "bfloat16")
    assert (second.model, second.dtype) == ("flag-model", "bfloat16")


def test_success_prints_summary_on_stderr(fake_runner):
    result = invoke(["run", "in.jsonl", "-m", "tiny"])
    assert result.exit_code == 0
    assert result.stdout == ""
    assert "job finished" in result.stderr and "tiny" in result.stderr


# --- errors --------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--max-tokens", "0"], "--max-tokens"),
        (["--top-p", "2"], "--top-p"),
        (["--temperature", "-1"], "--temperature"),
        (["--kv-cache-memory-gb", "0"], "--kv-cache-memory-gb"),
    ],
)
def test_bad_values_exit_2_with_one_line(fake_runner, args, expected):
    result = invoke(["run", "in.jsonl", *args])
    assert result.exit_code == 2
    lines = error_lines(result)
    assert len(lines) == 1 and lines[0].startswith("Error: ") and expected in lines[0]
    assert fake_runner.configs == []


def test_bad_dtype_is_a_click_usage_error(fake_runner):
    result = invoke(["run", "in.jsonl", "--dtype", "float8"])
    assert result.exit_code == 2
    assert "Error:" in result.stderr and "dtype" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_input_and_bad_yaml_exit_2(fake_runner, tmp_path):
    assert invoke(["run"]).exit_code == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_tokenz: 3\n")
    result = invoke(["run", "in.jsonl", "--config", str(bad)])
    assert result.exit_code == 2
    assert error_lines(result) == [error_lines(result)[0]]
    assert "max_tokenz" in result.stderr and str(bad) in result.stderr


@pytest.mark.parametrize("error", [ValueError("bad\nthing"), InputError("no column 'prompt'")])
def test_value_error_from_run_job_exits_2_one_line(fake_runner, error):
    fake_runner.error = error
    result = invoke(["run", "in.jsonl"])
    assert result.exit_code == 2
    lines = error_lines(result)
    assert lines == [f"Error: {' '.join(str(error).split(chr(10)))}"]


def test_other_error_from_run_job_exits_1_one_line(fake_runner):
    fake_runner.error = RuntimeError("boom")
    result = invoke(["run", "in.jsonl"])
    assert result.exit_code == 1
    assert error_lines(result) == [
        "Error: internal error: RuntimeError: boom (set VBATCH_DEBUG=1 for the traceback)"]


def test_debug_env_prints_traceback(fake_runner):
    fake_runner.error = RuntimeError("boom")
    result = invoke(["run", "in.jsonl"], env={"VBATCH_DEBUG": "1"})
    assert result.exit_code == 1
    assert "Traceback" in result.stderr
    assert error_lines(result)[-1] == "Error: internal error: RuntimeError: boom"


def test_keyboard_interrupt_exits_130(fake_runner):
    fake_runner.error = KeyboardInterrupt()
    result = invoke(["run", "in.jsonl"])
    assert result.exit_code == 130
    assert error_lines(result) == ["Aborted."]


# --- installed console script --------------------------------------------------------------------

def test_installed_console_script_and_python_m():
    """`vbatch --help` via the console script, `python -m vbatch --version`, no torch import."""
    script = shutil.which("vbatch") or shutil.which("vbatch", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("console script not installed: pip install --no-deps -e .")
    help_run = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=60)
    assert help_run.returncode == 0, help_run.stderr
    assert "Usage: vbatch" in help_run.stdout
    version_run = subprocess.run([sys.executable, "-m", "vbatch", "--version"], cwd=REPO_ROOT,
                                 capture_output=True, text=True, timeout=60)
    assert version_run.returncode == 0, version_run.stderr
    assert version_run.stdout.startswith("vbatch, version ")
    probe = subprocess.run(
        [sys.executable, "-c", "import sys, vbatch.jobs.cli; print('torch' in sys.modules)"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip() == "False"


def test_help_lists_eval_and_serve_without_importing_them():
    """`vbatch --help` names the lazily imported commands with their help, loading neither
    lm-eval, the server nor torch."""
    code = ("import sys; from click.testing import CliRunner; from vbatch.jobs.cli import main; "
            "out = CliRunner().invoke(main, ['--help']).output; print(out); "
            "print(sorted(m for m in ('torch', 'lm_eval', 'fastapi') if m in sys.modules))")
    probe = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                           text=True, timeout=60)
    assert probe.returncode == 0, probe.stderr
    assert "eval   Run lm-evaluation-harness" in probe.stdout
    assert "serve  Serve a model over an OpenAI-compatible HTTP API" in probe.stdout
    assert probe.stdout.strip().endswith("[]")


# --- progress ------------------------------------------------------------------------------------

class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_plain_progress_lines_when_not_a_terminal():
    stream, clock = io.StringIO(), FakeClock()
    reporter = ProgressReporter(interval_s=0, stream=stream, is_tty=False, clock=clock)
    reporter.start(5000)
    clock.now += 70
    reporter.update(1200, 241_920)
    assert stream.getvalue() == (
        "[vbatch] 1200/5000 rows (24.0%), 3456 out tok/s, elapsed 0:01:10, eta 0:03:42\n")


def test_plain_progress_respects_interval_and_close_prints_last_line():
    stream, clock = io.StringIO(), FakeClock()
    reporter = ProgressReporter(interval_s=10, stream=stream, is_tty=False, clock=clock)
    reporter.start(None)
    clock.now += 5
    reporter.update(10, 100)
    assert stream.getvalue() == ""
    clock.now += 5
    reporter.update(10, 100)
    assert stream.getvalue() == "[vbatch] 20 rows, 20 out tok/s, elapsed 0:00:10\n"
    reporter.close()
    reporter.close()
    assert len(stream.getvalue().splitlines()) == 1  # nothing new since the last line
    clock.now += 1
    reporter.update(1, 1)
    reporter.close()
    assert stream.getvalue().splitlines()[-1].startswith("[vbatch] 21 rows")


def test_default_stream_is_stderr(capsys):
    reporter = ProgressReporter(interval_s=0, is_tty=False)
    reporter.start(2)
    reporter.update(1, 5)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("[vbatch] 1/2 rows (50.0%)")


def test_quiet_hides_progress_but_not_summary():
    stream = io.StringIO()
    reporter = ProgressReporter(quiet=True, interval_s=0, stream=stream, is_tty=False)
    reporter.start(10)
    reporter.update(10, 100)
    reporter.close()
    assert stream.getvalue() == ""
    reporter.summary(make_stats())
    assert "job finished" in stream.getvalue()


def test_terminal_progress_uses_a_bar():
    stream = io.StringIO()
    reporter = ProgressReporter(stream=stream, is_tty=True)
    reporter.start(4)
    reporter.update(3, 30)
    reporter.close()
    assert "3/4" in stream.getvalue() and "out tok/s" in stream.getvalue()


def test_summary_content():
    stream = io.StringIO()
    ProgressReporter(stream=stream, is_tty=False).summary(make_stats())
    text = stream.getvalue()
    for expected in ["rows           5,000", "prompt tokens  120,000", "output tokens  300,000",
                     "output tok/s   3,000.0", "total tok/s    4,200.0",
                     "wall time      0:01:45 (model load 0:00:05)", "model          tiny-llama",
                     "dtype          bfloat16", "output         /tmp/out (3 part files)"]:
        assert expected in text, expected


def test_job_stats_rates():
    stats = make_stats(wall_time_s=12.0, load_time_s=2.0, num_prompt_tokens=50,
                       num_output_tokens=150)
    assert stats.output_tokens_per_s == 15.0
    assert stats.total_tokens_per_s == 20.0
    assert make_stats(wall_time_s=0.0, load_time_s=0.0).output_tokens_per_s == 0.0


def test_format_duration():
    assert format_duration(0) == "0:00:00"
    assert format_duration(3725.4) == "1:02:05"
    assert format_duration(90_000) == "25:00:00"
