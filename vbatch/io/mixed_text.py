"""A prompt column whose JSON values are not all text: `{"prompt": "hi"}` on one line and
`{"prompt": 42}` on another (or a `prompt_token_ids` / `stop` column mixing lists and text).

pyarrow's JSON reader refuses such a block outright, which would fail a whole file for one bad
row. The JSON lines reader reads that column as `MIXED_TEXT` instead: a dense union of the
strings (`text`, nulls included) and the JSON text of every other value (`json`). The prompt
encoder sees the decoded values (`python_values`), so the row with `42` becomes a `not_text`
error row; output files hold the column as plain strings (`as_text`: `42` -> `"42"`), since
Parquet has no union type.
"""
from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

_TEXT, _JSON = 0, 1
MIXED_TEXT = pa.dense_union([pa.field("text", pa.string()), pa.field("json", pa.string())])


def is_mixed_text(data_type: pa.DataType) -> bool:
    """True for the `MIXED_TEXT` type."""
    return data_type.equals(MIXED_TEXT)


def mixed_text_array(values: Sequence[object]) -> pa.Array:
    """A `MIXED_TEXT` array of Python values: str and None as text, anything else as JSON."""
    codes = np.array([_TEXT if value is None or isinstance(value, str) else _JSON
                      for value in values], dtype=np.int8)
    texts = [value for value, code in zip(values, codes) if code == _TEXT]
    others = [json.dumps(value, ensure_ascii=False)
              for value, code in zip(values, codes) if code == _JSON]
    return _union(codes, pa.array(texts, pa.string()), pa.array(others, pa.string()))


def to_mixed_text(array: pa.Array) -> pa.Array:
    """A text (string, large string or null type) array as `MIXED_TEXT`, values unchanged; a
    list array (a block of a JSON lines file whose other blocks mix lists and text) as the
    JSON text of each list."""
    if is_mixed_text(array.type):
        return array
    if pa.types.is_list(array.type) or pa.types.is_large_list(array.type):
        return mixed_text_array(array.to_pylist())
    codes = np.zeros(len(array), dtype=np.int8)
    return _union(codes, array.cast(pa.string()), pa.array([], pa.string()))


def as_text(array: pa.Array) -> pa.Array:
    """A `MIXED_TEXT` array as a string array: text as it is, other values as their JSON."""
    codes = array.type_codes.to_numpy(zero_copy_only=False)
    offsets = array.offsets.to_numpy(zero_copy_only=False)
    children = [array.field(code).to_pylist() for code in (_TEXT, _JSON)]
    return pa.array([children[code][offset] for code, offset in zip(codes, offsets)],
                    pa.string())


def python_values(array: pa.Array) -> list[object]:
    """The values as Python objects: text as str (or None), the others decoded from JSON."""
    if not is_mixed_text(array.type):
        return array.to_pylist()
    codes = array.type_codes.to_numpy(zero_copy_only=False)
    texts = as_text(array).to_pylist()
    return [json.loads(text) if code == _JSON else text for code, text in zip(codes, texts)]


def _union(codes: np.ndarray, texts: pa.Array, others: pa.Array) -> pa.Array:
    offsets = np.zeros(len(codes), dtype=np.int32)
    for code in (_TEXT, _JSON):
        where = codes == code
        offsets[where] = np.arange(int(where.sum()), dtype=np.int32)
    return pa.UnionArray.from_dense(pa.array(codes, pa.int8()), pa.array(offsets, pa.int32()),
                                    [texts, others], ["text", "json"], [_TEXT, _JSON])
