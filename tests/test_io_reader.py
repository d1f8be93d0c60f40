"""Tests for vbatch.io.reader: input files -> record batches with one schema and row keys."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vbatch.errors import InputError
from vbatch.io import formats
from vbatch.io.formats import count_rows
from vbatch.io.inputs import input_root, resolve_input_files
from vbatch.io.reader import (
    input_schema,
    prompt_column_of,
    read_batches,
    scan_inputs,
    validate_inputs,
)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_text(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def write_parquet(path: Path, columns: dict, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path, **kwargs)
    return path


def read_all(input: str, *, prompt_column="prompt", id_column="id", batch_size=1024,
             **scan_options) -> pa.Table:
    """Read INPUT the way a job does and check every batch has the announced schema.
    `scan_options`: `scan_inputs`' csv_infer_types / allow_type_promotion."""
    files = resolve_input_files(input)
    columns = {"prompt_column": prompt_column, "id_column": id_column}
    scan = scan_inputs(files, **columns, **scan_options)
    schema = scan.schema
    if not scan_options:
        assert input_schema(files, **columns).equals(schema)
    batches = list(read_batches(files, root=input_root(input), batch_size=batch_size, scan=scan,
                                **columns))
    assert all(batch.schema.equals(schema) for batch in batches)
    return pa.Table.from_batches(batches, schema=schema)


def input_error(call, *args, **kwargs) -> str:
    """Run `call`, expect InputError, check its message is one line, and return it."""
    with pytest.raises(InputError) as caught:
        result = call(*args, **kwargs)
        if hasattr(result, "__next__"):
            list(result)
    message = str(caught.value)
    assert "\n" not in message and message.strip() == message
    return message


# --- round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".ndjson", ".csv", ".parquet"])
def test_single_file_round_trip_adds_row_keys(tmp_path, suffix):
    rows = [{"prompt": f"p{i}", "topic": f"t{i}"} for i in range(5)]
    path = tmp_path / f"data{suffix}"
    if suffix == ".csv":
        write_text(path, "prompt,topic\n" + "".join(f"{r['prompt']},{r['topic']}\n" for r in rows))
    elif suffix == ".parquet":
        write_parquet(path, {key: [row[key] for row in rows] for key in ("prompt", "topic")})
    else:
        write_jsonl(path, rows)
    table = read_all(str(path))
    assert table.schema.names == ["id", "prompt", "topic"]
    assert table.schema.field("id").type == pa.string()
    assert table.to_pylist() == [{"id": f"data{suffix}:{i}", **row} for i, row in enumerate(rows)]


def test_existing_id_column_and_other_columns_pass_through_unchanged(tmp_path):
    path = write_parquet(
        tmp_path / "d.parquet",
        {"meta": [{"a": 1}, {"a": 2}], "prompt": ["x", "y"], "id": [10, 20], "score": [0.5, 1.5]},
    )
    table = read_all(str(path))
    assert table.schema.names == ["meta", "prompt", "id", "score"]
    assert table.column("id").to_pylist() == [10, 20]
    assert table.column("meta").to_pylist() == [{"a": 1}, {"a": 2}]


def test_custom_prompt_and_id_columns(tmp_path):
    path = write_text(tmp_path / "d.csv", "key,question\n007,why\n008,how\n")
    table = read_all(str(path), prompt_column="question", id_column="key")
    assert table.to_pylist() == [
        {"key": "007", "question": "why"},
        {"key": "008", "question": "how"},
    ]


def test_numeric_looking_csv_prompts_stay_text(tmp_path):
    path = write_text(tmp_path / "d.csv", "prompt\n1\n2\n")
    assert read_all(str(path)).column("prompt").to_pylist() == ["1", "2"]


def test_messages_column_is_accepted_without_prompt(tmp_path):
    chat = [{"role": "user", "content": "hi"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": chat}, {"messages": chat}])
    table = read_all(str(path))
    assert prompt_column_of(table.schema) == "messages"
    assert table.column("messages").to_pylist() == [chat, chat]


def test_directory_is_searched_recursively_and_sorted(tmp_path):
    data = tmp_path / "data"
    write_jsonl(data / "b.jsonl", [{"prompt": "b"}])
    write_jsonl(data / "a" / "z.jsonl", [{"prompt": "az"}])
    write_parquet(data / "c.parquet", {"prompt": ["c"]})
    write_text(data / "_SUCCESS", "")
    write_text(data / "README.md", "not data")
    write_jsonl(data / ".hidden.jsonl", [{"prompt": "hidden"}])
    write_jsonl(data / "_tmp" / "x.jsonl", [{"prompt": "tmp"}])
    write_parquet(data / "old.vbatch" / "part-00000.parquet", {"prompt": ["output"]})
    files = resolve_input_files(str(data))
    assert [f.relative_to(data).as_posix() for f in files] == ["a/z.jsonl", "b.jsonl", "c.parquet"]
    keys = read_all(str(data)).column("id").to_pylist()
    assert keys == ["a/z.jsonl:0", "b.jsonl:0", "c.parquet:0"]


def test_glob_input_and_its_root(tmp_path):
    write_jsonl(tmp_path / "data" / "1.jsonl", [{"prompt": "one"}])
    write_jsonl(tmp_path / "data" / "2.jsonl", [{"prompt": "two"}])
    write_parquet(tmp_path / "data" / "3.parquet", {"prompt": ["three"]})
    pattern = str(tmp_path / "data" / "*.jsonl")
    assert [f.name for f in resolve_input_files(pattern)] == ["1.jsonl", "2.jsonl"]
    assert input_root(pattern) == tmp_path / "data"
    assert read_all(pattern).column("id").to_pylist() == ["1.jsonl:0", "2.jsonl:0"]


def test_row_keys_are_stable_across_reruns_and_added_files(tmp_path):
    data = tmp_path / "data"
    write_jsonl(data / "x" / "a.jsonl", [{"prompt": str(i)} for i in range(7)])
    first = read_all(str(data), batch_size=3).column("id").to_pylist()
    assert first == read_all(str(data), batch_size=2).column("id").to_pylist()
    assert first == [f"x/a.jsonl:{i}" for i in range(7)]
    write_jsonl(data / "y" / "b.jsonl", [{"prompt": "new"}])
    assert read_all(str(data)).column("id").to_pylist()[:7] == first


def test_batches_respect_batch_size_and_never_span_files(tmp_path):
    write_parquet(tmp_path / "a.parquet", {"prompt": [str(i) for i in range(10)]}, row_group_size=3)
    write_jsonl(tmp_path / "b.jsonl", [{"prompt": str(i)} for i in range(5)])
    files = resolve_input_files(str(tmp_path))
    sizes = [batch.num_rows for batch in read_batches(files, batch_size=4)]
    assert sizes == [4, 4, 2, 4, 1]


def test_schemas_are_unified_across_files(tmp_path):
    write_text(tmp_path / "a.csv", "prompt,n,x\np,1,1\n")
    write_text(tmp_path / "b.csv", "prompt,n,x\nq,many,2.5\n")
    write_jsonl(tmp_path / "c.jsonl", [{"prompt": "r", "extra": True}])
    table = read_all(str(tmp_path))
    assert table.schema.field("n").type == pa.string()
    assert table.schema.field("x").type == pa.string()  # CSV cells are text
    assert table.column("n").to_pylist() == ["1", "many", None]
    assert table.column("x").to_pylist() == ["1", "2.5", None]
    assert table.column("extra").to_pylist() == [None, None, True]


def test_incompatible_nested_types_raise(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "tags": ["x"]}])
    write_jsonl(tmp_path / "b.jsonl", [{"prompt": "p", "tags": {"k": 1}}])
    message = input_error(validate_inputs, resolve_input_files(str(tmp_path)))
    assert "'tags'" in message and "a.jsonl" in message and "b.jsonl" in message


def test_text_files_larger_than_a_block_get_one_schema(tmp_path, monkeypatch):
    monkeypatch.setattr(formats, "BLOCK_SIZE", 256)
    csv_rows = "".join(f"p{i},{i},{i}\n" for i in range(200)) + "last,unknown,1.5\n"
    csv_path = write_text(tmp_path / "big.csv", "prompt,a,b\n" + csv_rows)
    jsonl_rows = [{"prompt": f"p{i}", "n": i} for i in range(200)]
    jsonl_rows += [{"prompt": "x" * 1000, "n": 0.5, "late": "new"}]  # one line > a block
    jsonl_path = write_jsonl(tmp_path / "big.jsonl", jsonl_rows)
    # Inferred types that differ between blocks widen only when asked to (else: refused).
    promote = {"csv_infer_types": True, "allow_type_promotion": True}
    csv_table = read_all(str(csv_path), batch_size=64, **promote)
    assert csv_table.schema.field("a").type == pa.string()
    assert csv_table.schema.field("b").type == pa.float64()
    assert csv_table.column("a").to_pylist()[-2:] == ["199", "unknown"]
    jsonl_table = read_all(str(jsonl_path), batch_size=64, allow_type_promotion=True)
    assert jsonl_table.num_rows == 201
    assert jsonl_table.schema.field("n").type == pa.float64()
    assert jsonl_table.column("late").to_pylist()[-2:] == [None, "new"]
    assert jsonl_table.column("id").to_pylist()[-1] == "big.jsonl:200"


def test_multi_line_csv_prompts_across_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(formats, "BLOCK_SIZE", 128)
    prompts = [f"line {i}\nsecond, quoted \"line\"" for i in range(40)]
    quoted = ['"' + prompt.replace('"', '""') + '"' for prompt in prompts]
    lines = "".join(f"{prompt},{i}\n" for i, prompt in enumerate(quoted))
    path = write_text(tmp_path / "multi.csv", "prompt,n\n" + lines)
    table = read_all(str(path), batch_size=16)
    assert table.column("prompt").to_pylist() == prompts
    assert table.column("n").to_pylist() == [str(i) for i in range(40)]  # CSV cells are text


def test_byte_order_mark_and_blank_lines_are_tolerated(tmp_path):
    write_text(tmp_path / "a.csv", b"\xef\xbb\xbfprompt\nx\n")
    write_text(tmp_path / "b.jsonl", b'\xef\xbb\xbf{"prompt": "y"}\n\n\n{"prompt": "z"}\n')
    write_text(tmp_path / "c.jsonl", b"\n")
    assert read_all(str(tmp_path)).column("prompt").to_pylist() == ["x", "y", "z"]


def test_count_rows_is_cheap_or_none(tmp_path):
    a = write_parquet(tmp_path / "a.parquet", {"prompt": ["1", "2", "3"]})
    b = write_parquet(tmp_path / "b.parquet", {"prompt": ["4"]})
    c = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "5"}])
    assert count_rows([a, b]) == 4
    assert count_rows([a, c]) is None


def test_arrow_ipc_file_and_hf_save_to_disk_directory(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"prompt": ["a", "b", "c"], "n": [1, 2, 3]}).save_to_disk(
        str(tmp_path / "hf")
    )
    files = resolve_input_files(str(tmp_path / "hf"))
    assert [f.suffix for f in files] == [".arrow"]
    assert count_rows(files) == 3
    table = read_all(str(tmp_path / "hf"))
    assert table.column("prompt").to_pylist() == ["a", "b", "c"]
    assert table.column("id").to_pylist()[0].endswith(".arrow:0")
    assert table.schema.metadata is None  # stale HF feature metadata is dropped
    splits = {"train": datasets.Dataset.from_dict({"prompt": ["t"]}),
              "test": datasets.Dataset.from_dict({"prompt": ["u"]})}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "hf_dict"))
    keys = read_all(str(tmp_path / "hf_dict")).column("id").to_pylist()
    assert [key.split("/")[0] for key in keys] == ["test", "train"]
    with pa.OSFile(str(tmp_path / "f.arrow"), "wb") as sink:
        with pa.ipc.new_file(sink, pa.schema([("prompt", pa.string())])) as writer:
            writer.write_table(pa.table({"prompt": ["p", "q"]}))
    assert read_all(str(tmp_path / "f.arrow")).column("prompt").to_pylist() == ["p", "q"]


# --- errors ----------------------------------------------------------------------------------


def test_missing_inputs_raise_one_line_errors(tmp_path):
    assert "no such file" in input_error(resolve_input_files, str(tmp_path / "nope.jsonl"))
    assert "no files match" in input_error(resolve_input_files, str(tmp_path / "*.parquet"))
    (tmp_path / "empty").mkdir()
    assert "holds no" in input_error(resolve_input_files, str(tmp_path / "empty"))
    write_text(tmp_path / "notes.txt", "x")
    message = input_error(resolve_input_files, str(tmp_path / "notes.txt"))
    assert "unsupported file type '.txt'" in message
    assert "matches no" in input_error(resolve_input_files, str(tmp_path / "*.txt"))
    assert "unsupported URL scheme" in input_error(resolve_input_files, "http://h/data.parquet")
    assert "no such file" in input_error(resolve_input_files, f"file://{tmp_path}/nope.jsonl")


BAD_FILES = {
    "invalid_json.jsonl": (b'{"prompt": "a"}\n\n{"prompt": oops}\n', "line 3"),
    # a block starting with a top-level null segfaults pyarrow's JSON reader (pyarrow 26)
    "null_line.jsonl": (b'null\n{"prompt": "a"}\n', "line 1: not a JSON object"),
    "json_array.json": (b'[{"prompt": "a"}]', "JSON array"),
    "bad_utf8.jsonl": (b'{"prompt": "\xff"}\n', "UTF8"),
    "type_change.jsonl": (b'{"prompt": "a", "n": 1}\n{"prompt": "b", "n": "x"}\n', "line 2"),
    "bad_quotes.csv": (b'prompt,n\n"unterminated,1\n', "bad_quotes.csv"),
    "extra_field.csv": (b"prompt,n\na,1,2\n", "Expected 2 columns"),
    "bad_utf8.csv": (b"prompt\n\xff\n", "UTF8"),
    "duplicate.csv": (b"prompt,prompt\na,b\n", "more than once"),
    "no_prompt.jsonl": (
        b'{"text": "a", "n": 1}\n',
        "no column 'prompt' (columns: text, n); pass --prompt-column",
    ),
    "int_prompt.jsonl": (b'{"prompt": 1}\n', "must hold text"),
    "bad_messages.jsonl": (b'{"messages": "hello"}\n', "list of {role, content}"),
    "clash.jsonl": (b'{"prompt": "a", "generated_text": "b"}\n', "rename it"),
    "corrupt.parquet": (b"PAR1 this is not parquet PAR1", "corrupt.parquet"),
    "corrupt.arrow": (b"ARROW1 nope", "corrupt.arrow"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_files_raise_input_error_naming_the_file(tmp_path, name):
    content, expected = BAD_FILES[name]
    path = write_text(tmp_path / name, content)
    message = input_error(read_batches, [path])
    assert str(path) in message and expected in message


def test_truncated_parquet_raises_input_error(tmp_path):
    prompts = [f"prompt {i}" * 10 for i in range(500)]
    path = write_parquet(tmp_path / "t.parquet", {"prompt": prompts})
    path.write_bytes(path.read_bytes()[:-100])
    assert str(path) in input_error(read_batches, [path])


def test_validate_inputs_checks_every_file_before_reading(tmp_path):
    good = write_parquet(tmp_path / "a.parquet", {"prompt": ["x"]})
    bad = write_text(tmp_path / "b.csv", "question\nwhy\n")
    message = input_error(validate_inputs, [good, bad], "prompt")
    assert message == f"{bad}: no column 'prompt' (columns: question); pass --prompt-column"
    batches = read_batches([good, bad])
    with pytest.raises(InputError):
        next(batches)  # fails before yielding rows of the good file


def test_files_must_agree_on_the_prompt_source(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "x"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"messages": [{"role": "user", "content": "y"}]}])
    assert "same column" in input_error(validate_inputs, [a, b])


def test_only_empty_files_is_an_error(tmp_path):
    path = write_text(tmp_path / "empty.jsonl", "")
    assert "empty" in input_error(validate_inputs, [path])


# --- fuzzing: malformed bytes give batches or InputError, never another exception -------------

JSONL_PIECES = st.sampled_from(
    [b"{", b"}", b"[", b"]", b'"prompt"', b'"messages"', b":", b",", b"\n", b'"x"', b"1", b"1.5",
     b"null", b"true", b'{"prompt": "a"}\n', b'{"role": "user", "content": "c"}', b"\xff", b" "]
)
CSV_PIECES = st.sampled_from(
    [b"prompt", b"id", b"messages", b",", b"\n", b'"', b"a", b"1", b"2.5", b"\r\n", b"\xff", b" ",
     b"prompt,n\n"]
)


def _read_or_input_error(suffix: str, content: bytes) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / f"fuzz{suffix}"
        path.write_bytes(content)
        try:
            validate_inputs([path])
            for batch in read_batches([path], batch_size=3):
                batch.validate(full=True)
                batch.to_pylist()
        except InputError as error:
            assert "\n" not in str(error) and str(path) in str(error)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(JSONL_PIECES, max_size=30).map(b"".join) | st.binary(max_size=200))
def test_fuzzed_jsonl_yields_batches_or_input_error(content):
    _read_or_input_error(".jsonl", content)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(CSV_PIECES, max_size=30).map(b"".join) | st.binary(max_size=200))
def test_fuzzed_csv_yields_batches_or_input_error(content):
    _read_or_input_error(".csv", content)
