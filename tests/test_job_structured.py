"""Structured outputs in jobs: the `--choice/--regex/--json-schema/--grammar/--json-object`
flags (and YAML keys), the per-row `structured_outputs` column, and what jobs write.

Proves, without a model: each flag (and its YAML key) builds the engine's
`StructuredOutputsParams`; two kinds at once, a spec xgrammar cannot compile, a missing or
non-JSON schema file are usage errors (exit 2, one line) before the job starts; a schema file's
content (not its path) is in the fingerprint, so `--resume` refuses a changed schema or
`--choice`; per-row cells (JSON text, or Arrow structs whose fields other rows set) parse, a bad
cell is a `bad_structured_output` row error, and rows with one spec share one object.
End to end on a tiny random model: `--choice` on 50 rows, greedy and at temperature 1.0 (a
per-row temperature column), writes only the labels; `--json-schema` (nested objects, arrays,
enums, integer bounds, required keys) on 50 rows writes JSON that validates with `jsonschema`;
`--regex` outputs fullmatch; a per-row `structured_outputs` column overrides the job's regex
row by row, its bad cells become error rows and the other rows are fine.
"""
from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import jsonschema
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import PROMPTS, run_offline, vbatch_command

import vbatch.jobs
from vbatch.engine.sampling_params import SamplingParams
from vbatch.engine.structured_output import StructuredOutputsParams
from vbatch.errors import VBatchUsageError
from vbatch.io.fingerprint import job_fingerprint
from vbatch.io.manifest import load_resume_state
from vbatch.io.parts import ParquetPartWriter
from vbatch.jobs.cli import main
from vbatch.jobs.commit import generation_settings
from vbatch.jobs.config import JobConfig, load_job_config
from vbatch.jobs.row_errors import RowError
from vbatch.jobs.row_sampling import RowSampling

SCHEMA = {
    "type": "object",
    "properties": {
        "label": {"type": "string", "enum": ["cat", "dog", "bird"]},
        "score": {"type": "integer", "minimum": 0, "maximum": 9},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]},
                 "minItems": 1, "maxItems": 2},
        "owner": {"type": "object",
                  "properties": {"age": {"type": "integer", "minimum": 1, "maximum": 99},
                                 "kind": {"enum": ["x", "y"]}},
                  "required": ["age", "kind"], "additionalProperties": False},
    },
    "required": ["label", "score", "tags", "owner"],
    "additionalProperties": False,
}


# --- flags, YAML and checks (no model) --------------------------------------------------------

def _config(**values) -> JobConfig:
    return load_job_config({"input": "in.jsonl", **values}, None)


def test_each_flag_builds_the_engines_spec(tmp_path):
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(SCHEMA))
    grammar_file = tmp_path / "yes_no.ebnf"
    grammar_file.write_text('root ::= "yes" | "no"\n')
    cases = {
        "choice": ({"choice": ["yes", "no"]}, StructuredOutputsParams(choice=["yes", "no"])),
        "regex": ({"regex": "[0-9]+"}, StructuredOutputsParams(regex="[0-9]+")),
        "schema file": ({"json_schema": str(schema_file)}, StructuredOutputsParams(json=SCHEMA)),
        "inline schema": ({"json_schema": json.dumps(SCHEMA)},
                          StructuredOutputsParams(json=SCHEMA)),
        "grammar file": ({"grammar": str(grammar_file)},
                         StructuredOutputsParams(grammar='root ::= "yes" | "no"\n')),
        "inline grammar": ({"grammar": 'root ::= "a"'},
                           StructuredOutputsParams(grammar='root ::= "a"')),
        "json object": ({"json_object": True}, StructuredOutputsParams(json_object=True)),
    }
    for name, (values, expected) in cases.items():
        params = _config(**values).sampling_params()
        assert isinstance(params, SamplingParams)
        assert params.structured_outputs == expected, name
    assert _config().sampling_params().structured_outputs is None


def test_yaml_keys_alike(tmp_path):
    config_file = tmp_path / "job.yaml"
    config_file.write_text("input: in.jsonl\nchoice: [positive, negative]\n")
    assert load_job_config({}, str(config_file)).sampling_params().structured_outputs == \
        StructuredOutputsParams(choice=["positive", "negative"])
    # a schema may be written in YAML itself, as a mapping
    config_file.write_text("input: in.jsonl\njson_schema:\n  type: object\n  properties:\n"
                           "    ok: {type: boolean}\n  required: [ok]\n")
    assert load_job_config({}, str(config_file)).sampling_params().structured_outputs == \
        StructuredOutputsParams(json={"type": "object", "properties": {"ok": {"type": "boolean"}},
                                      "required": ["ok"]})
    config_file.write_text("input: in.jsonl\njson-object: true\nregex: 'x+'\n")
    with pytest.raises(VBatchUsageError, match="--regex and --json-object exclude each other"):
        load_job_config({}, str(config_file))


@pytest.mark.parametrize(("values", "expected"), [
    ({"choice": ["a"], "regex": "b"},
     "--choice and --regex exclude each other: give at most one of --choice, --regex, "
     "--json-schema, --grammar, --json-object"),
    ({"regex": "("}, "--regex does not compile: structured_outputs regex is not usable: "),
    ({"grammar": "root ::= foo"}, "--grammar does not compile: "),
    ({"json_schema": '{"type": "objectx"}'}, "--json-schema does not compile: "),
    ({"json_schema": "[1, 2]"}, "--json-schema (inline JSON) must be a JSON object"),
    ({"json_schema": "missing.json"}, "--json-schema 'missing.json' is neither inline JSON nor"),
    ({"grammar": "missing.ebnf"}, "--grammar 'missing.ebnf' is neither EBNF text"),
    ({"choice": [""]}, "--choice strings must be non-empty"),
])
def test_bad_specs_are_one_line_usage_errors(values, expected):
    with pytest.raises(VBatchUsageError) as caught:
        _config(**values)
    assert str(caught.value).startswith(expected), str(caught.value)
    assert "\n" not in str(caught.value)


class _FakeRunner:
    """Stands in for `vbatch.jobs.runner`: records the configs that got as far as the job."""

    def __init__(self):
        self.configs: list[JobConfig] = []

    def run_job(self, config, reporter):
        self.configs.append(config)
        raise SystemExit(0)


@pytest.fixture
def fake_runner(monkeypatch):
    fake = _FakeRunner()
    module = types.ModuleType("vbatch.jobs.runner")
    module.run_job = fake.run_job
    monkeypatch.setitem(sys.modules, "vbatch.jobs.runner", module)
    monkeypatch.setattr(vbatch.jobs, "runner", module, raising=False)
    return fake


def _invoke(args: list[str]):
    try:
        runner = CliRunner(mix_stderr=False)
    except TypeError:
        runner = CliRunner()
    return runner.invoke(main, args, catch_exceptions=False)


def test_cli_flags_and_errors_exit_2_before_the_job(fake_runner, tmp_path):
    bad_schema = tmp_path / "bad.json"
    bad_schema.write_text("{not json")
    for args, message in [
        (["--choice", "a", "--json-object"], "--choice and --json-object exclude each other"),
        (["--regex", "[0-9"], "--regex does not compile"),
        (["--json-schema", str(bad_schema)], f"--json-schema file {bad_schema} is not valid JSON"),
    ]:
        result = _invoke(["run", "in.jsonl", *args])
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.exit_code == 2, result.stderr
        assert len(lines) == 1 and lines[0].startswith(f"Error: {message}"), lines
    assert fake_runner.configs == []               # refused before any job (or model) started
    _invoke(["run", "in.jsonl", "--choice", "yes", "--choice", "no"])
    assert fake_runner.configs[0].choice == ["yes", "no"]
    help_text = _invoke(["run", "-h"]).output
    for flag in ("--choice LABEL", "--regex PATTERN", "--json-schema FILE_OR_JSON",
                 "--grammar FILE_OR_EBNF", "--json-object", "--n INTEGER", "--logprobs K"):
        assert flag in help_text


def test_the_fingerprint_holds_the_spec_so_resume_refuses_a_change(tmp_path):
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(SCHEMA))
    by_file = generation_settings(_config(json_schema=str(schema_file)))
    assert json.loads(by_file["json_schema"]) == SCHEMA      # the content, not the path
    assert by_file == generation_settings(_config(json_schema=json.dumps(SCHEMA)))
    schema_file.write_text(json.dumps({**SCHEMA, "required": ["label"]}))
    assert generation_settings(_config(json_schema=str(schema_file))) != by_file

    def fingerprint(**values):
        return job_fingerprint(files=[], model={"source": "m"}, vbatch_version="0",
                               generation=generation_settings(_config(**values)))
    output = tmp_path / "out"
    writer = ParquetPartWriter(output, job_info={"fingerprint": fingerprint(choice=["a", "b"])})
    writer.commit({"counts": {}})
    load_resume_state(output, fingerprint(choice=["a", "b"]), force=False)   # same job
    with pytest.raises(VBatchUsageError, match=r"choice \['a', 'b'\] -> \['a', 'c'\]"):
        load_resume_state(output, fingerprint(choice=["a", "c"]), force=False)
    with pytest.raises(VBatchUsageError, match="regex None -> 'a'"):
        load_resume_state(output, fingerprint(regex="a"), force=False)


def test_per_row_cells_parse_and_bad_cells_are_row_errors():
    base = SamplingParams(structured_outputs=StructuredOutputsParams(regex="x+"))
    # JSON-text cells, and structs: Arrow gives every row every field some row has
    text_cells = [None, '{"choice": ["a", "b"]}', '{"choice": ["a", "b"]}', "not json",
                  '{"regex": "("}', '{"json": {"type": "object", "default": null}}', "[1]"]
    struct_cells = [{"choice": ["a"]},
                    {"json": {"type": "object", "properties": {"n": {"type": "integer"}}}},
                    {"json": {"type": "integer", "minimum": 2}},
                    {"foo": "x"}, {}, {"choice": ["a"], "regex": "b"}]
    sampling = RowSampling(base)
    got = sampling.for_batch(pa.record_batch({"structured_outputs": text_cells}))
    assert got[0] is base                                              # null: the job's
    assert got[1].structured_outputs == StructuredOutputsParams(choice=["a", "b"])
    assert got[1].structured_outputs is got[2].structured_outputs     # parsed once, shared
    assert got[5].structured_outputs.json == {"type": "object", "default": None}  # text keeps null
    errors = {i: str(got[i]) for i in (3, 4, 6)}
    assert all(isinstance(got[i], RowError) for i in errors)
    assert errors[3].startswith("bad_structured_output: structured_outputs text is not valid JSON")
    assert errors[4].startswith("bad_structured_output: structured_outputs regex is not usable")
    assert errors[6].startswith("bad_structured_output: structured_outputs must be an object")
    struct = pa.array(struct_cells)
    assert pa.types.is_struct(struct.type)
    got = RowSampling(base).for_batch(pa.record_batch({"structured_outputs": struct}))
    assert got[0].structured_outputs == StructuredOutputsParams(choice=["a"])
    assert got[1].structured_outputs.json == {"type": "object",
                                              "properties": {"n": {"type": "integer"}}}
    assert got[2].structured_outputs.json == {"type": "integer", "minimum": 2}
    assert [str(got[i]).split(":")[0] for i in (3, 4, 5)] == ["bad_structured_output"] * 3
    assert "unknown key(s) foo" in str(got[3])
    assert "exactly one" in str(got[4]) and "exactly one" in str(got[5])


def test_a_spec_the_engine_cannot_compile_is_a_bad_structured_output_row():
    from vbatch.engine.structured_output import StructuredOutputError
    from vbatch.jobs.replica import _refusal

    refused = _refusal(StructuredOutputError("structured_outputs json does not compile: x"))
    assert str(refused) == "bad_structured_output: structured_outputs json does not compile: x"
    assert str(_refusal(ValueError("no room"))) == "rejected: no room"


# --- end to end ----------------------------------------------------------------------------------

NUM_ROWS = 50
LABELS = ["positive", "negative", "neutral"]


def _job(source: Path, model: Path, output: Path, *extra: str) -> list[str]:
    return [*vbatch_command(), "run", str(source), "--model", str(model), "--output", str(output),
            "--dtype", "float32", "--seed", "1", *extra]


def _write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _prompt(i: int) -> str:
    return f"{PROMPTS[i % len(PROMPTS)]} {i}"


def test_choice_labels_only_greedy_and_at_temperature_one(tiny_models, tmp_path):
    rows = [{"prompt": _prompt(i), "temperature": 0.0 if i % 2 else 1.0}
            for i in range(NUM_ROWS)]
    source = _write_rows(tmp_path / "in.jsonl", rows)
    output = tmp_path / "out"
    labels = [arg for label in LABELS for arg in ("--choice", label)]
    result = run_offline(_job(source, tiny_models["llama-gqa-untied"], output, *labels,
                              "--max-tokens", "16"))
    assert result.returncode == 0, result.stderr
    written = pq.read_table(output).to_pylist()
    assert len(written) == NUM_ROWS
    assert all(row["generated_text"] in LABELS for row in written), written
    assert all(row["finish_reason"] == "stop" for row in written)
    sampled = {row["generated_text"] for row in written if row["temperature"] == 1.0}
    assert len(sampled) > 1                                # temperature 1 does sample


def test_json_schema_outputs_validate(tiny_models, tmp_path):
    source = _write_rows(tmp_path / "in.jsonl",
                         [{"prompt": _prompt(i)} for i in range(NUM_ROWS)])
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(SCHEMA))
    output = tmp_path / "out"
    # A random model favours whitespace (JSON allows any amount between tokens): compact JSON.
    result = run_offline(_job(source, tiny_models["llama-gqa-untied"], output,
                              "--json-schema", str(schema_file), "--temperature", "1.0",
                              "--disable-any-whitespace", "--max-tokens", "160"))
    assert result.returncode == 0, result.stderr
    written = pq.read_table(output).to_pylist()
    assert len(written) == NUM_ROWS
    for row in written:
        assert row["finish_reason"] == "stop", row
        jsonschema.validate(json.loads(row["generated_text"]), SCHEMA)


def test_regex_and_a_per_row_column_with_bad_cells(tiny_models, tmp_path):
    pattern = "(yes|no), [0-9]{1,3}"
    good_cells = {
        "null": None,
        "choice": {"choice": ["red", "green"]},
        "integer": {"json": {"type": "integer", "minimum": 3, "maximum": 7}},
        "digits": {"regex": "[0-9]{2}"},
        "grammar": {"grammar": 'root ::= "x" | "y" "z"'},
    }
    bad_cells = {
        "bad_regex": {"regex": "("},
        "empty_choice": {"choice": []},
        "undefined_rule": {"grammar": "root ::= foo"},
        "unknown_key": {"foo": "bar"},
        "nothing": {},
        "two_kinds": {"choice": ["a"], "regex": "b"},
    }
    rows = []
    for i in range(24):
        kind = list(good_cells)[i % len(good_cells)]
        rows.append({"id": f"{kind}-{i}", "prompt": _prompt(i), "structured_outputs":
                     good_cells[kind]})
    rows += [{"id": kind, "prompt": _prompt(i), "structured_outputs": cell}
             for i, (kind, cell) in enumerate(bad_cells.items())]
    source = _write_rows(tmp_path / "in.jsonl", rows)
    output = tmp_path / "out"
    result = run_offline(_job(source, tiny_models["llama-gqa-untied"], output, "--regex",
                              pattern, "--temperature", "1.0", "--max-tokens", "16"))
    assert result.returncode == 0, result.stderr
    written = {row["id"]: row for row in pq.read_table(output).to_pylist()}
    assert len(written) == len(rows)
    for key, row in written.items():
        kind = key.split("-")[0]
        if kind in bad_cells:
            assert row["error"].startswith("bad_structured_output: "), row
            assert row["generated_text"] is None
            continue
        assert row["error"] is None and row["finish_reason"] == "stop", row
        text = row["generated_text"]
        if kind == "null":
            assert re.fullmatch(pattern, text), text
        elif kind == "choice":
            assert text in ("red", "green")
        elif kind == "integer":
            assert 3 <= json.loads(text) <= 7
        elif kind == "digits":
            assert re.fullmatch("[0-9]{2}", text)
        else:
            assert text in ("x", "yz")
    assert "unknown key(s) foo" in written["unknown_key"]["error"]
    # the column passes through like any input column
    assert written["choice-1"]["structured_outputs"]["choice"] == ["red", "green"]
    summary = json.loads((output / "_run_summary.json").read_text())["counts"]
    assert summary["error_rows"] == len(bad_cells)
