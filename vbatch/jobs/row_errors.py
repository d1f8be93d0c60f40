"""Per-row errors: what one bad row records instead of failing the job, and the error budget.

A row that cannot be generated (empty or non-text prompt, malformed `messages`, a chat template
that raises, a prompt longer than the model allows, a bad per-row sampling value or
structured-output spec) is written
with `error` = "<code>: <message>" and null generation columns; the job goes on. `ErrorBudget`
turns `--max-error-rate` into `TooManyRowErrors` (exit code 3) when too many rows failed; for a
resumed job it counts the rows earlier runs committed too, so `--resume` never bypasses it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from vbatch.errors import TooManyRowErrors, one_line

#: The short codes that start every `error` value.
EMPTY_PROMPT = "empty_prompt"          # null, empty or whitespace-only prompt / empty messages
NOT_TEXT = "not_text"                  # the prompt is not a string
BAD_MESSAGES = "bad_messages"          # a chat turn without a string role or content
CHAT_TEMPLATE = "chat_template"        # the tokenizer's chat template raised
TOKENIZE = "tokenize"                  # the tokenizer raised on this row's text
PROMPT_TOO_LONG = "prompt_too_long"    # no room to generate within max_model_len
BAD_SAMPLING = "bad_sampling"          # a per-row sampling column holds an invalid value
BAD_STRUCTURED_OUTPUT = "bad_structured_output"   # a per-row structured_outputs cell that
                                       # does not parse, or a spec that does not compile
REJECTED = "rejected"                  # the engine refused the request (add_request raised)
BAD_TOKEN_IDS = "bad_token_ids"        # a prompt_token_ids cell that is not a list of ids in
                                       # the vocabulary
# OpenAI batch files (jobs/openai_rows.py)
INVALID_JSON = "invalid_json"          # the line is not a JSON request object
INVALID_REQUEST = "invalid_request"    # bad method, url, custom_id or body field (HTTP 400)
MODEL_NOT_FOUND = "model_not_found"    # the body names another model (HTTP 404)
ERROR_CODES = (EMPTY_PROMPT, NOT_TEXT, BAD_MESSAGES, CHAT_TEMPLATE, TOKENIZE, PROMPT_TOO_LONG,
               BAD_SAMPLING, BAD_STRUCTURED_OUTPUT, REJECTED, BAD_TOKEN_IDS, INVALID_JSON,
               INVALID_REQUEST, MODEL_NOT_FOUND)

_MAX_MESSAGE_CHARS = 300


@dataclass(frozen=True)
class RowError:
    """Why one row was not generated: `code` (one of `ERROR_CODES`) and a one-line message."""

    code: str
    message: str

    def __post_init__(self) -> None:
        if self.code not in ERROR_CODES:
            raise ValueError(f"unknown row error code {self.code!r}")

    def __str__(self) -> str:
        """The `error` column value: "<code>: <message>" on one line, at most ~300 chars."""
        return f"{self.code}: {one_line(self.message, _MAX_MESSAGE_CHARS)}"


class RowCounts(Protocol):
    """What `ErrorBudget` reads: rows finished (errors included), error rows, the first error
    ("row <key>: <error>", or None). `ReplicaCounters` has these; so can a sum over replicas."""

    num_rows: int
    num_error_rows: int
    first_error: str | None


@dataclass(frozen=True)
class ErrorBudget:
    """`--max-error-rate`: the job fails (exit code 3) when more than `max_error_rate` of its
    rows errored. `max_error_rate=None` never fails. `total_rows` (None when unknown) is every
    input row of the job, earlier runs' included; it lets `check_progress` stop a job early
    once failure is certain, whatever the remaining rows do. `earlier_rows` and
    `earlier_error_rows` are what earlier runs of a resumed job committed: every check counts
    them with the `counts` of this run.
    """

    max_error_rate: float | None
    total_rows: int | None = None
    earlier_rows: int = 0
    earlier_error_rows: int = 0

    def check_start(self) -> None:
        """Raise TooManyRowErrors when the earlier runs' error rows alone already exceed the
        rate of the total (a resumed job that cannot succeed fails before any model loads)."""
        self.check_progress(_NoRows())

    def check_progress(self, counts: RowCounts) -> None:
        """Raise TooManyRowErrors when the errors so far already exceed the rate of the total."""
        if self.max_error_rate is None or self.total_rows is None or self.total_rows == 0:
            return
        if (self.earlier_error_rows + counts.num_error_rows) / self.total_rows > \
                self.max_error_rate:
            self._fail(counts, self.total_rows)

    def check_final(self, counts: RowCounts) -> None:
        """Raise TooManyRowErrors when more than the rate of all finished rows errored."""
        num_rows = self.earlier_rows + counts.num_rows
        if self.max_error_rate is None or num_rows == 0:
            return
        if (self.earlier_error_rows + counts.num_error_rows) / num_rows > self.max_error_rate:
            self._fail(counts, num_rows)

    def _fail(self, counts: RowCounts, num_rows: int) -> None:
        num_errors = self.earlier_error_rows + counts.num_error_rows
        share = num_errors / num_rows
        earlier = (f" ({self.earlier_error_rows} committed by earlier runs)"
                   if self.earlier_error_rows else "")
        which = " in this run" if self.earlier_error_rows else ""
        first = f"; first{which}: {counts.first_error}" if counts.first_error else ""
        raise TooManyRowErrors(
            f"{num_errors} of {num_rows} rows failed ({share:.1%}){earlier}, more than "
            f"--max-error-rate {self.max_error_rate:g}{first}")


@dataclass(frozen=True)
class _NoRows:
    num_rows: int = 0
    num_error_rows: int = 0
    first_error: str | None = None
