"""Exceptions that carry a user-facing, one-line message.

Everything the user can fix (a bad flag, a missing file, an unknown model) is a `ValueError`
subclass: the CLI prints its message on one line and exits with code 2. `TooManyRowErrors`
(exit code 3) is deliberately not a `ValueError`. Anything else is an internal failure (exit
code 1).
"""


class VBatchUsageError(ValueError):
    """A problem with what the user asked for: bad option, unknown model, bad output path."""


class InputError(VBatchUsageError):
    """A problem with the input data: missing/unreadable file, missing column, malformed rows."""


class TooManyRowErrors(Exception):
    """More rows failed than `--max-error-rate` allows (exit code 3); the message is one line."""
