"""Per-row errors: what one bad row records instead of failing the job, and the error budget.

A row that cannot be generated (empty or non-text prompt, malformed `messages`, a chat template
that raises, a prompt longer than the model allows, a bad per-row sampling value) is written
with `error` = "<code>: <message>" and null generation columns; the job goes on. `ErrorBudget`
turns `--max-error-rate` into `TooManyRowErrors` (exit code 3) when too many rows failed.
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
REJECTED = "rejected"                  # the engine refused the request (add_request raised)
ERROR_CODES = (EMPTY_PROMPT, NOT_TEXT, BAD_MESSAGES, CHAT_TEMPLATE, TOKENIZE, PROMPT_TOO_LONG,
               BAD_SAMPLING, REJECTED)

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
    rows errored. `max_error_rate=None` never fails. `total_rows` (None when unknown) lets
    `check_progress` stop a job early once failure is certain, whatever the remaining rows do.
    """

    max_error_rate: float | None
    total_rows: int | None = None

    def check_progress(self, counts: RowCounts) -> None:
        """Raise TooManyRowErrors when the errors so far already exceed the rate of the total."""
        if self.max_error_rate is None or self.total_rows is None or self.total_rows == 0:
            return
        if counts.num_error_rows / self.total_rows > self.max_error_rate:
            self._fail(counts, self.total_rows)

    def check_final(self, counts: RowCounts) -> None:
        """Raise TooManyRowErrors when more than the rate of all finished rows errored."""
        if self.max_error_rate is None or counts.num_rows == 0:
            return
        if counts.num_error_rows / counts.num_rows > self.max_error_rate:
            self._fail(counts, counts.num_rows)

    def _fail(self, counts: RowCounts, num_rows: int) -> None:
        share = counts.num_error_rows / num_rows
        first = f"; first: {counts.first_error}" if counts.first_error else ""
        raise TooManyRowErrors(
            f"{counts.num_error_rows} of {num_rows} rows failed ({share:.1%}), more than "
            f"--max-error-rate {self.max_error_rate:g}{first}")
