"""Find bad quoting in a CSV file before pyarrow silently reads it wrong.

pyarrow's CSV reader is lenient: a quoted field that is never closed swallows every following
line up to the end of the file (with `newlines_in_values`, which multi-line prompts need), so
rows vanish without an error; text after a closing quote (`"ab"c"`) is glued onto the value.
`check_csv_quoting` walks the quotes of a file with the same rules pyarrow uses (`"` opens a
quoted field only at the start of a field, `""` inside one is a literal quote) and reports the
first of these two mistakes with its line number. It jumps from quote to quote with
`bytes.find` on a memory map, so its cost follows the number of quotes, not of bytes.
"""
from __future__ import annotations

import mmap
from pathlib import Path

from vbatch.errors import InputError

_QUOTE = ord('"')
_FIELD_STARTS = (ord(","), ord("\n"), ord("\r"))
_AFTER_CLOSING = (ord(","), ord("\n"), ord("\r"), ord(" "), ord("\t"))
_BOM = b"\xef\xbb\xbf"


def find_quoting_error(data: bytes | mmap.mmap) -> str | None:
    """The first quoting mistake in CSV `data` as "line N: ..." (1-based), or None if none.

    Mistakes: a quoted field never closed; a closing quote followed by text other than the
    delimiter, a line end or blanks. Quotes inside unquoted fields are literal (as in pyarrow).
    """
    start = len(_BOM) if data[: len(_BOM)] == _BOM else 0
    position = data.find(b'"', start)
    while position >= 0:
        if position > start and data[position - 1] not in _FIELD_STARTS:
            position = data.find(b'"', position + 1)      # a literal quote in an unquoted field
            continue
        opened_at = position
        closing = data.find(b'"', opened_at + 1)
        while closing >= 0 and closing + 1 < len(data) and data[closing + 1] == _QUOTE:
            closing = data.find(b'"', closing + 2)        # "" is an escaped quote
        if closing < 0:
            return (f"line {_line_of(data, opened_at)}: a quoted field that starts here is "
                    "never closed")
        after = closing + 1
        if after < len(data) and data[after] not in _AFTER_CLOSING:
            return (f"line {_line_of(data, closing)}: unexpected text after the closing quote "
                    "of a quoted field (write a quote inside a quoted field as \"\")")
        position = data.find(b'"', after)
    return None


def check_csv_quoting(path: Path) -> None:
    """Raise InputError("<path>: line N: ...") when `find_quoting_error` finds a mistake."""
    if path.stat().st_size == 0:
        return
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0,
                                               access=mmap.ACCESS_READ) as data:
        problem = find_quoting_error(data)
    if problem is not None:
        raise InputError(f"{path}: {problem}")


def _line_of(data: bytes | mmap.mmap, position: int) -> int:
    return data[:position].count(b"\n") + 1     # only on the error path: copying is fine
