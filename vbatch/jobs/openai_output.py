"""`--output-format openai`: output rows of OpenAI batch requests -> OpenAI batch output lines.

One JSON line per request (input line), as OpenAI's Batch API and `vllm run-batch` write:

    {"id": "batch_req_<hex>", "custom_id": ..., "response": {"status_code": 200,
     "request_id": "vbatch-batch-<hex>", "body": <ChatCompletion | Completion>}, "error": null}

A line that failed (jobs/openai_rows.py: invalid JSON, bad url or field, wrong model, ...)
has `"response": {"status_code": 400 (404 for model_not_found), "request_id", "body":
{"error": {"message", "type", "param": null, "code"}}}` and `"error": {"code", "message"}`
(both: OpenAI puts a request's 4xx in the response body, vLLM in `error`). A line with n > 1
samples is one line with n choices. The lines are committed in JSON lines part files by the
job's part writer (io/parts.py), exactly once each like Parquet rows.
"""
from __future__ import annotations

import json
import uuid
from typing import BinaryIO

import pyarrow as pa

from vbatch.io.openai_batch import CUSTOM_ID
from vbatch.io.schema import ERROR, RESPONSE
from vbatch.jobs.row_errors import MODEL_NOT_FOUND

PART_SUFFIX = ".jsonl"


def _error_response(error: str) -> tuple[dict, dict]:
    """The `response` and `error` entries of a line whose `error` column is "code: message"."""
    code, _, message = error.partition(": ")
    status, kind = (404, "not_found_error") if code == MODEL_NOT_FOUND \
        else (400, "invalid_request_error")
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return {"status_code": status, "request_id": f"vbatch-batch-{uuid.uuid4().hex}",
            "body": body}, {"code": code, "message": message}


def output_line(custom_id: str | None, response: str | None, error: str | None) -> dict:
    """One OpenAI batch output line (see module docstring) from an output row's `custom_id`,
    `response` (the body's JSON text) and `error` ("code: message") cells."""
    line: dict = {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id}
    if error is not None:
        line["response"], line["error"] = _error_response(error)
        return line
    line["response"] = {"status_code": 200, "request_id": f"vbatch-batch-{uuid.uuid4().hex}",
                        "body": json.loads(response)}
    line["error"] = None
    return line


def write_output_lines(table: pa.Table, file: BinaryIO) -> None:
    """Write `table`'s rows (output rows of OpenAI batch requests) as output lines to `file`:
    the part writer's `write_part` for `--output-format openai`."""
    columns = [table.column(name).to_pylist() for name in (CUSTOM_ID, RESPONSE, ERROR)]
    for custom_id, response, error in zip(*columns):
        line = output_line(custom_id, response, error)
        file.write(json.dumps(line, ensure_ascii=False).encode() + b"\n")
