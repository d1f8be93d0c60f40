"""A `_manifest.json` that is valid JSON of the wrong shape is refused by `--resume`.

Proves: through the `vbatch` CLI (the click command in-process for the whole table, the
installed command for one), each bad shape in the table (not an object, a
part without a name, bad positions, a non-integer row count, a part listed twice, a part name
that is a path, rows in two parts, a malformed fingerprint) exits with code 2 and one stderr
line naming the manifest and the bad field, without a traceback and before anything in the
directory is touched; a manifest with fields vbatch does not read still validates.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import vbatch_command

from vbatch.io.manifest_schema import check_manifest
from vbatch.jobs.cli import main

GOOD_PART = {"name": "part-00000.parquet", "num_rows": 2, "positions": [[0, 2]]}


def _parts(*parts: dict) -> dict:
    return {"fingerprint": {"input_files": [], "generation": {}},
            "output": {"num_rows": 0, "part_files": list(parts)}}


BAD_MANIFESTS = {
    "a string": ("x", "not a JSON object (got str)"),
    "a list": ([], "not a JSON object (got list)"),
    "part without a name": (
        _parts(GOOD_PART, {**GOOD_PART, "name": "part-00001.parquet", "positions": [[2, 4]]},
               {"num_rows": 1, "positions": [[4, 5]]}),
        "output.part_files[2].name missing"),
    "start after end": (_parts({**GOOD_PART, "positions": [[2, 0]]}),
                        "output.part_files[0]: positions must be sorted, disjoint"),
    "not a pair": (_parts({**GOOD_PART, "positions": [[0]]}),
                   "output.part_files[0].positions[0]: should be a [start, end] pair"),
    "positions not a list": (_parts({**GOOD_PART, "positions": "0-2"}),
                             "output.part_files[0].positions: should be a list"),
    "positions miscount rows": (_parts({**GOOD_PART, "positions": [[0, 5]]}),
                                "positions cover 5 rows but num_rows is 2"),
    "num_rows a string": (_parts({**GOOD_PART, "num_rows": "2"}),
                          "output.part_files[0].num_rows: should be an integer, got '2'"),
    "num_rows negative": (_parts({**GOOD_PART, "num_rows": -1, "positions": None}),
                          "output.part_files[0].num_rows"),
    "listed twice": (_parts(GOOD_PART, GOOD_PART),
                     "output.part_files[1]: part-00000.parquet is listed twice"),
    "name is a path": (_parts({**GOOD_PART, "name": "../../x"}),
                       "output.part_files[0].name: '../../x' is not a part file name"),
    "rows in two parts": (
        _parts(GOOD_PART, {**GOOD_PART, "name": "part-00001.parquet", "positions": [[1, 3]]}),
        "output.part_files[1]: part-00001.parquet holds rows that part_files[0] holds too"),
    "part_files an object": ({"fingerprint": {}, "output": {"part_files": {}}},
                             "output.part_files: should be a list"),
    "fingerprint a string": ({"fingerprint": "x", "output": {"part_files": []}},
                             "fingerprint: should be a JSON object"),
    "input file without path": ({"fingerprint": {"input_files": [{"size": 3}]}},
                                "fingerprint.input_files[0].path missing"),
}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("validation") / "in.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"row {i}"}) + "\n" for i in range(4)))
    return path


def _output_with(tmp_path: Path, content) -> Path:
    output = tmp_path / "out"
    output.mkdir()
    (output / "_manifest.json").write_text(json.dumps(content))
    (output / "part-00007.parquet").write_bytes(b"not listed")   # resume would delete it
    return output


def _resume_args(source: Path, model: Path, output: Path) -> list[str]:
    return ["run", str(source), "--model", str(model), "--output", str(output), "--resume",
            "--max-tokens", "2", "--dtype", "float32", "-q"]


def _check_refusal(case: str, output: Path, returncode: int, stderr: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert returncode == 2, (case, stderr)
    assert len(lines) == 1 and "Traceback" not in stderr, (case, stderr)
    assert lines[0].startswith(f"Error: cannot resume: {output / '_manifest.json'} is not a "
                               "vbatch manifest: "), (case, lines[0])
    assert BAD_MANIFESTS[case][1] in lines[0], (case, lines[0])
    assert sorted(path.name for path in output.iterdir()) == ["_manifest.json",
                                                              "part-00007.parquet"], case


@pytest.mark.parametrize("case", list(BAD_MANIFESTS))
def test_bad_manifest_is_refused_by_the_cli(case, source, tiny_models, tmp_path):
    """The `vbatch` click command in this process (one interpreter start for the table)."""
    output = _output_with(tmp_path, BAD_MANIFESTS[case][0])
    result = CliRunner().invoke(main, _resume_args(source, tiny_models["llama-gqa-untied"],
                                                   output))
    assert result.exception is None or isinstance(result.exception, SystemExit), result
    _check_refusal(case, output, result.exit_code, result.stderr)


def test_bad_manifest_is_refused_by_the_installed_command(source, tiny_models, tmp_path):
    case = "part without a name"
    output = _output_with(tmp_path, BAD_MANIFESTS[case][0])
    result = subprocess.run([*vbatch_command(), *_resume_args(
        source, tiny_models["llama-gqa-untied"], output)], capture_output=True, text=True,
        timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    _check_refusal(case, output, result.returncode, result.stderr)


def test_fields_vbatch_does_not_read_are_allowed():
    content = {**_parts({**GOOD_PART, "note": "kept", "num_error_rows": 1}),
               "status": "running", "counts": {"anything": [1, 2]}, "future_key": None}
    assert check_manifest(content, Path("_manifest.json")) is content
    assert check_manifest({}, Path("_manifest.json")) == {}
