"""Job options derive from their declarations: a declared option is a flag, a YAML key and a
fingerprint entry, and reaches the engine. Shown end to end with `--include-stop-str-in-output`
(declared on `SamplingParams` only)."""
from __future__ import annotations

import json

import pyarrow.parquet as pq

from vbatch.jobs.cli import main
from vbatch.jobs.commit import generation_settings
from vbatch.jobs.config import FINGERPRINT_FIELDS, JobConfig, load_job_config


def run_job(tmp_path, name, *flags):
    from click.testing import CliRunner
    result = CliRunner().invoke(main, ["run", str(tmp_path / "in.jsonl"), "-o",
                                       str(tmp_path / name), "-q", *flags],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return {row["id"]: row for row in pq.read_table(tmp_path / name).to_pylist()}


def test_include_stop_str_in_output_end_to_end(tmp_path, tiny_models):
    (tmp_path / "in.jsonl").write_text(
        "".join(json.dumps({"id": f"r{i}", "prompt": p}) + "\n"
                for i, p in enumerate(["Paris is", "The quick brown fox"])))
    common = ["--model", str(tiny_models["llama-gqa-tied"]), "--dtype", "float32",
              "--temperature", "0", "--max-tokens", "24", "--ignore-eos"]
    full = run_job(tmp_path, "full", *common)
    stop = full["r0"]["generated_text"][4:7]
    assert stop.strip()
    cut = run_job(tmp_path, "cut", *common, "--stop", stop)
    kept = run_job(tmp_path, "kept", *common, "--stop", stop, "--include-stop-str-in-output")
    text = full["r0"]["generated_text"]
    assert cut["r0"]["generated_text"] == text[: text.index(stop)]
    assert kept["r0"]["generated_text"] == text[: text.index(stop) + len(stop)]
    assert cut["r0"]["finish_reason"] == kept["r0"]["finish_reason"] == "stop"


def test_declared_option_is_a_yaml_key_and_in_the_fingerprint(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("input: x.jsonl\ninclude-stop-str-in-output: true\n")
    config = load_job_config({}, str(path))
    assert config.include_stop_str_in_output is True
    assert config.sampling_params().include_stop_str_in_output is True
    assert "include_stop_str_in_output" in FINGERPRINT_FIELDS
    assert generation_settings(config)["include_stop_str_in_output"] is True
    assert JobConfig(input="x").include_stop_str_in_output is False


def test_options_not_offered_to_jobs_stay_out():
    names = set(JobConfig.__dataclass_fields__)
    # structured_outputs is offered as the job's own --choice/--regex/... flags instead
    assert {"structured_outputs", "block_size", "device", "stop_token_ids"}.isdisjoint(names)
    assert {"tensor_parallel_size", "max_tokens", "runner", "input", "n", "choice"} <= names
