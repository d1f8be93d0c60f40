"""Where in a text file a problem is: the line of the first byte that is not UTF-8."""
from __future__ import annotations

from vbatch.io.input_file import InputFile, open_input

_READ_SIZE = 1 << 20


def invalid_utf8_offset(data: bytes) -> int | None:
    """Offset of the first byte of `data` that does not decode as UTF-8, or None."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as error:
        return error.start
    return None


def invalid_utf8_line(path: InputFile) -> int | None:
    """1-based line of `path` that holds its first invalid UTF-8 byte, or None (read in
    pieces, so memory stays bounded)."""
    line, carry = 1, b""
    with open_input(path) as handle:
        while True:
            data = handle.read(_READ_SIZE)
            block = carry + data
            try:
                block.decode("utf-8")
                carry = b""
            except UnicodeDecodeError as error:
                if data and error.reason == "unexpected end of data":
                    # A character cut by the piece boundary: decode it with the next piece.
                    carry = block[error.start:]
                    block = block[:error.start]
                else:
                    return line + block.count(b"\n", 0, error.start)
            line += block.count(b"\n")
            if not data:
                return None
