"""OpenAI batch input files: JSON lines `{"custom_id", "method", "url", "body"}`, one request a
line (what OpenAI's Batch API and `vllm run-batch` read).

Each line is decoded on its own with Python's json, never by pyarrow's JSON reader: request
bodies differ from line to line (chat and completions, response formats, schemas), and
unifying them into one Arrow struct type would refuse the file or invent fields. A line
becomes a row of `OPENAI_BATCH_SCHEMA`: `custom_id`, `method`, `url` as strings (null when
absent or not a string) and `body` as the body's JSON text; a line that is not a JSON object
(invalid JSON, invalid UTF-8, an array ...) or whose `custom_id` is not a string keeps its
place as a row with `line_error` set, so it becomes that line's error, never the file's.
Blank lines are skipped (row numbers count non-blank lines, as for other JSON lines files).

A file is an OpenAI batch file when `--input-format openai` says so, or (`auto`) when it is a
JSON lines file whose first non-blank line that parses is an object with the keys
`custom_id`, `url` and `body`. The schema carries `INPUT_FORMAT_KEY` in its metadata, so the
formats module reads the file's batches this way wherever the scan is used (a Ray read task).
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa

from vbatch.errors import InputError, one_line
from vbatch.io.input_file import open_input
from vbatch.io.jsonl import jsonl_chunks

CUSTOM_ID = "custom_id"
METHOD = "method"
URL = "url"
BODY = "body"
LINE_ERROR = "line_error"
INPUT_FORMAT_KEY = b"vbatch.input_format"
OPENAI = "openai"
#: The columns of every OpenAI batch file's rows.
OPENAI_BATCH_SCHEMA = pa.schema(
    [pa.field(CUSTOM_ID, pa.string()), pa.field(METHOD, pa.string()),
     pa.field(URL, pa.string()), pa.field(BODY, pa.string()), pa.field(LINE_ERROR, pa.string())],
    metadata={INPUT_FORMAT_KEY: OPENAI.encode()})
_DETECT_KEYS = (CUSTOM_ID, URL, BODY)
#: Lines looked at to decide whether a file is an OpenAI batch file.
_DETECT_LINES = 20
_BLOCK_SIZE = 8 << 20
_MESSAGE_LIMIT = 200


def is_openai_batch_schema(schema: pa.Schema | None) -> bool:
    """True for the schema `openai_batch_schema` gives (the metadata marks it)."""
    return schema is not None and (schema.metadata or {}).get(INPUT_FORMAT_KEY) == b"openai"


def looks_like_openai_batch(path: Path) -> bool:
    """True when the first non-blank line of `path` that parses as JSON is an object with
    `custom_id`, `url` and `body` (lines that do not parse are skipped, at most 20 looked at)."""
    looked = 0
    with open_input(path) as handle:
        for raw in handle:
            if not raw.strip():
                continue
            looked += 1
            if looked > _DETECT_LINES:
                return False
            try:
                line = json.loads(raw)
            except ValueError:
                continue
            return isinstance(line, dict) and all(key in line for key in _DETECT_KEYS)
    return False


def openai_batch_schema(path: Path) -> pa.Schema | None:
    """`OPENAI_BATCH_SCHEMA`, or None when the file holds no line (blank)."""
    with open_input(path) as handle:
        for raw in handle:
            if raw.replace(b"\xef\xbb\xbf", b"").strip():
                return OPENAI_BATCH_SCHEMA
    return None


def _row(raw: bytes) -> dict:
    """One non-blank line as a row of `OPENAI_BATCH_SCHEMA`."""
    row: dict = dict.fromkeys(OPENAI_BATCH_SCHEMA.names)
    try:
        line = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as error:
        row[LINE_ERROR] = f"the line is not UTF-8 text ({one_line(error, _MESSAGE_LIMIT)})"
        return row
    except ValueError as error:
        row[LINE_ERROR] = f"the line is not valid JSON: {one_line(error, _MESSAGE_LIMIT)}"
        return row
    if not isinstance(line, dict):
        row[LINE_ERROR] = f"the line is a JSON {type(line).__name__}, not a request object"
        return row
    for key in (CUSTOM_ID, METHOD, URL):
        value = line.get(key)
        row[key] = value if isinstance(value, str) else None
    if not isinstance(line.get(CUSTOM_ID), str):
        row[LINE_ERROR] = f"custom_id must be a string, got {line.get(CUSTOM_ID)!r}"
    elif BODY in line:
        row[BODY] = json.dumps(line[BODY], ensure_ascii=False)
    # other line-level keys (and method/url values that are not strings) are the
    # translation's to judge: it sees method/url as null and refuses them
    extra = sorted(set(line) - {CUSTOM_ID, METHOD, URL, BODY})
    if extra and row[LINE_ERROR] is None:
        row[LINE_ERROR] = f"unknown key {extra[0]!r} in the request line"
    return row


def openai_batch_batches(path: Path, batch_size: int) -> Iterator[pa.RecordBatch]:
    """The rows of the OpenAI batch file `path` (see module docstring), in line order, in
    batches of at most `batch_size` rows. Raises InputError only when the file is unreadable."""
    rows: list[dict] = []
    try:
        for _, chunk in jsonl_chunks(path, _BLOCK_SIZE):
            for raw in chunk.split(b"\n"):
                if raw.strip():
                    rows.append(_row(raw))
                if len(rows) >= batch_size:
                    yield pa.RecordBatch.from_pylist(rows, schema=OPENAI_BATCH_SCHEMA)
                    rows = []
    except OSError as error:
        raise InputError(f"{path}: {one_line(error, _MESSAGE_LIMIT)}") from None
    if rows:
        yield pa.RecordBatch.from_pylist(rows, schema=OPENAI_BATCH_SCHEMA)


def duplicate_custom_ids(paths: list[Path]) -> tuple[str, int] | None:
    """The first custom_id that appears twice over `paths`, and how many custom_ids repeat
    (None when every one is unique). Reads the files once, line by line."""
    seen: set[str] = set()
    first: str | None = None
    repeats = 0
    for path in paths:
        for batch in openai_batch_batches(path, 4096):
            for custom_id in batch.column(CUSTOM_ID).to_pylist():
                if custom_id is None:
                    continue
                if custom_id in seen:
                    repeats += 1
                    first = custom_id if first is None else first
                seen.add(custom_id)
    return None if first is None else (first, repeats)
