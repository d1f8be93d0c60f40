"""Find bad quoting in a CSV file before pyarrow silently reads it wrong.

pyarrow's CSV reader is lenient: a quoted field that is never closed swallows every following
line up to the end of the file (with `newlines_in_values`, which multi-line prompts need), so
rows vanish without an error; text after a closing quote (`"ab"c"`) is glued onto the value.
`check_csv_quoting` walks the quotes of a file with the same rules pyarrow uses (`"` opens a
quoted field only at the start of a field, `""` inside one is a literal quote) and reports the
first of these two mistakes with its line number. It jumps from quote to quote with
`bytes.find` on a memory map, so its cost follows the number of quotes, not of bytes. An
object-store file cannot be mapped: `QuoteWalker` walks it in pieces as they are read, with
the same rules and the same answers.
"""
from __future__ import annotations

import mmap
from collections.abc import Iterable

from vbatch.errors import InputError
from vbatch.io.input_file import InputFile, RemoteFile, file_size, open_input

_QUOTE = ord('"')
_FIELD_STARTS = (ord(","), ord("\n"), ord("\r"))
_AFTER_CLOSING = (ord(","), ord("\n"), ord("\r"), ord(" "), ord("\t"))
_BOM = b"\xef\xbb\xbf"
_READ_SIZE = 8 << 20


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


_NEVER_CLOSED = "a quoted field that starts here is never closed"
_TEXT_AFTER_CLOSING = ("unexpected text after the closing quote of a quoted field (write a "
                       "quote inside a quoted field as \"\")")


class QuoteWalker:
    """`find_quoting_error` over data that comes in pieces (`feed` each, then `finish`): the
    state between pieces is whether a quoted field is open (and its line), whether the last
    piece ended in a quote inside one (a close, or half of `""`), and the last byte."""

    def __init__(self) -> None:
        self.line = 1                 # line number at the start of the next piece
        self.previous: int | None = None  # last byte of the previous piece (None: file start)
        self.in_quotes = False
        self.opened_line = 0
        self.quote_at_end = False     # the last piece ended in a quote inside a quoted field
        self.problem: str | None = None

    def feed(self, data: bytes) -> str | None:
        """Walk the next piece; the first mistake found so far, or None."""
        if self.problem is not None or not data:
            return self.problem
        if self.previous is None and data.startswith(_BOM):
            data = data[len(_BOM):]
            if not data:
                return None
        position = 0
        if self.quote_at_end:
            self.quote_at_end = False
            if data[0] == _QUOTE:
                position = 1                                  # "" is an escaped quote
            else:
                self.in_quotes = False
                if data[0] not in _AFTER_CLOSING:
                    return self._found(self.line, _TEXT_AFTER_CLOSING)
        while True:
            if self.in_quotes:
                closing = data.find(b'"', position)
                while closing >= 0 and closing + 1 < len(data) and data[closing + 1] == _QUOTE:
                    closing = data.find(b'"', closing + 2)    # "" is an escaped quote
                if closing < 0:
                    break
                if closing + 1 == len(data):
                    self.quote_at_end = True
                    break
                if data[closing + 1] not in _AFTER_CLOSING:
                    return self._found(self.line + data.count(b"\n", 0, closing),
                                       _TEXT_AFTER_CLOSING)
                self.in_quotes, position = False, closing + 1
            else:
                position = data.find(b'"', position)
                if position < 0:
                    break
                before = data[position - 1] if position else self.previous
                if before is None or before in _FIELD_STARTS:
                    self.in_quotes = True
                    self.opened_line = self.line + data.count(b"\n", 0, position)
                position += 1
        self.line += data.count(b"\n")
        self.previous = data[-1]
        return None

    def finish(self) -> str | None:
        """The first mistake of the whole data (a quoted field still open at its end)."""
        if self.problem is None and self.in_quotes and not self.quote_at_end:
            self.problem = f"line {self.opened_line}: {_NEVER_CLOSED}"
        return self.problem

    def _found(self, line: int, what: str) -> str:
        self.problem = f"line {line}: {what}"
        return self.problem


def find_quoting_error_in_pieces(pieces: Iterable[bytes]) -> str | None:
    """`find_quoting_error` of the concatenated `pieces` (read one at a time)."""
    walker = QuoteWalker()
    for piece in pieces:
        if walker.feed(piece) is not None:
            break
    return walker.finish()


def _pieces(path: InputFile) -> Iterable[bytes]:
    with open_input(path) as handle:
        while data := handle.read(_READ_SIZE):
            yield data


def check_csv_quoting(path: InputFile) -> None:
    """Raise InputError("<path>: line N: ...") when `find_quoting_error` finds a mistake."""
    if file_size(path) == 0:
        return
    if isinstance(path, RemoteFile):
        problem = find_quoting_error_in_pieces(_pieces(path))
    else:
        with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0,
                                                   access=mmap.ACCESS_READ) as data:
            problem = find_quoting_error(data)
    if problem is not None:
        raise InputError(f"{path}: {problem}")


def _line_of(data: bytes | mmap.mmap, position: int) -> int:
    return data[:position].count(b"\n") + 1     # only on the error path: copying is fine
