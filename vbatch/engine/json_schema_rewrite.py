"""JSON schemas rewritten before xgrammar compiles them, where its grammar would be wrong.

xgrammar 0.2.9 compiles a string with `minLength` / `maxLength` (and no `pattern`) to
characters `[^"\\\\\\r\\n]`: raw control characters such as a tab are allowed (invalid JSON) and
escape sequences are not. Such strings are rewritten to the pattern
`^[^"\\\\\\x00-\\x1f\\ud800-\\udfff]{min,max}$`: printable characters only, no escapes
and no UTF-16 surrogates (xgrammar's classes admit them, and their UTF-8 bytes decode to three
replacement characters), so the length counted on the JSON text is the string's own length and
every output parses and validates. (A length-bounded string therefore cannot contain a quote,
a backslash or a newline.)
"""
from __future__ import annotations

from typing import Any

#: Keywords whose values are data, not subschemas: never rewritten.
_DATA_KEYWORDS = frozenset({"enum", "const", "default", "examples"})


def _is_length_bounded_string(schema: dict) -> bool:
    types = schema.get("type")
    is_string = types == "string" or (isinstance(types, list) and types == ["string"])
    return (is_string and ("minLength" in schema or "maxLength" in schema)
            and not {"pattern", "format", "enum", "const"} & schema.keys())


def _bounds(schema: dict) -> str:
    low = int(schema.get("minLength", 0))
    high = schema.get("maxLength")
    return f"{{{low},}}" if high is None else f"{{{low},{int(high)}}}"


def rewrite_schema(schema: Any) -> Any:
    """`schema` with every length-bounded string subschema given an equivalent safe pattern
    (see module docstring); anything else is returned unchanged (new containers, same leaves)."""
    if isinstance(schema, list):
        return [rewrite_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    rewritten = {key: value if key in _DATA_KEYWORDS else rewrite_schema(value)
                 for key, value in schema.items()}
    if _is_length_bounded_string(rewritten):
        pattern = '^[^"\\\\\\x00-\\x1f\\ud800-\\udfff]' + _bounds(rewritten) + "$"
        rewritten = {key: value for key, value in rewritten.items()
                     if key not in ("minLength", "maxLength")}
        rewritten["pattern"] = pattern
    return rewritten
