"""Exceptions that carry a user-facing, one-line message.

Everything the user can fix (a bad flag, a missing file, an unknown model) is a `ValueError`
subclass: the CLI prints its message on one line and exits with code 2. `TooManyRowErrors`
(exit code 3) is deliberately not a `ValueError`. Anything else is an internal failure (exit
code 1). `one_line` is the one way the package folds an error's text onto one line.
"""


class VBatchUsageError(ValueError):
    """A problem with what the user asked for: bad option, unknown model, bad output path."""


class InputError(VBatchUsageError):
    """A problem with the input data: missing/unreadable file, missing column, malformed rows."""


class TooManyRowErrors(Exception):
    """More rows failed than `--max-error-rate` allows (exit code 3); the message is one line."""


def one_line(error: BaseException | str, limit: int | None = None) -> str:
    """`error`'s text on one line: runs of whitespace (newlines included) become one space.

    An exception whose text is empty gives its type name instead (a string gives ""). With a
    `limit`, text longer than `limit` characters is cut to `limit` characters ending in "...".
    """
    text = " ".join(str(error).split())
    if not text and isinstance(error, BaseException):
        text = type(error).__name__
    if limit is not None and len(text) > limit:
        text = text[: limit - 3] + "..."
    return text
