"""`find_quoting_error`: the CSV mistakes pyarrow would read silently wrong are found (with
their line), and every validly quoted CSV passes."""
from __future__ import annotations

import csv
import io

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vbatch.errors import InputError
from vbatch.io.csv_quoting import (
    check_csv_quoting,
    find_quoting_error,
    find_quoting_error_in_pieces,
)


@pytest.mark.parametrize("data", [
    b'id,prompt\n1,plain\n',
    b'id,prompt\n1,"a ""quoted"" word"\n2,"multi\nline, with comma"\n',
    b'\xef\xbb\xbf"id","prompt"\r\n1,"x"\r\n',
    b'id,prompt\n1,5\'10" tall\n',               # a literal quote inside an unquoted field
    b'id,prompt\n1,""\n2,"x"  \n',                # empty quoted field; blanks after a quote
    b'id,prompt\n1,"ends at eof"',
])
def test_valid_quoting_passes(data):
    assert find_quoting_error(data) is None


@pytest.mark.parametrize("data, expected", [
    (b'id,prompt\n1,"hello\n2,world\n', "line 2: a quoted field that starts here is never closed"),
    (b'id,prompt\n1,ok\n2,"hel"lo"\n', "line 3: unexpected text after the closing quote"),
    (b'id,prompt\n1,"""\n', "line 2: a quoted field that starts here is never closed"),
    (b'"id,prompt\n', "line 1: a quoted field that starts here is never closed"),
])
def test_bad_quoting_is_found_with_its_line(data, expected):
    assert find_quoting_error(data).startswith(expected)


def test_check_csv_quoting_names_the_file(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_bytes(b'id,prompt\n1,"open\n')
    with pytest.raises(InputError, match=r"bad\.csv: line 2: a quoted field"):
        check_csv_quoting(path)
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    check_csv_quoting(empty)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.text(alphabet='ab ,"\n\r', max_size=8), min_size=2, max_size=2),
                min_size=1, max_size=6))
def test_anything_csv_writer_quotes_passes(rows):
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    assert find_quoting_error(buffer.getvalue().encode()) is None


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=40).map(lambda raw: bytes(b'",\n\r a\t'[byte % 7] for byte in raw)),
       st.lists(st.integers(min_value=1, max_value=6), max_size=8), st.booleans())
def test_walking_in_pieces_finds_what_the_whole_walk_finds(data, piece_sizes, bom):
    """An object-store CSV is walked in pieces as it is read: same answer, wherever it is cut."""
    data = (b"\xef\xbb\xbf" if bom else b"") + data
    pieces, start = [], 0
    for size in piece_sizes:
        size = max(size, 3) if not pieces else size       # the byte order mark in one piece
        pieces.append(data[start:start + size])
        start += size
    pieces.append(data[start:])
    assert find_quoting_error_in_pieces(pieces) == find_quoting_error(data)
