"""Column types across input files: one schema for all batches, and batches cast to it.

Columns pass through unchanged: `unify_input_schemas` merges the files' schemas (or the
blocks' of one text file) into one only where that loses nothing (int32 + int64 -> int64, null
+ T -> T, string + large_string, a dictionary column -> its values, struct fields merged) and
refuses any other type conflict before the model loads, unless promotion is allowed
(`--allow-type-promotion`); `conform_batch` casts each batch to the merged schema, so every
batch the reader yields has it.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import pyarrow as pa

from vbatch.errors import InputError, one_line
from vbatch.io.mixed_text import MIXED_TEXT, is_mixed_text, to_mixed_text

_ARROW_ERRORS = (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError)


def show(value: object) -> str:
    """`value` as text that fits on one line (messages must be one line; names can hold "\\n")."""
    text = str(value)
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def decoded_type(data_type: pa.DataType) -> pa.DataType:
    """The type a column is read as: a dictionary-encoded column (a pandas category) is decoded
    to its values, so files with different dictionaries (or none) combine."""
    return data_type.value_type if pa.types.is_dictionary(data_type) else data_type


def is_plain_text(data_type: pa.DataType) -> bool:
    """True for string types and the null type (a column with no values yet)."""
    return (
        pa.types.is_string(data_type)
        or pa.types.is_large_string(data_type)
        or pa.types.is_string_view(data_type)
        or pa.types.is_null(data_type)
    )


def _is_scalar(data_type: pa.DataType) -> bool:
    return not pa.types.is_nested(data_type) and not pa.types.is_dictionary(data_type)


def _is_binary(data_type: pa.DataType) -> bool:
    return (pa.types.is_binary(data_type) or pa.types.is_large_binary(data_type)
            or pa.types.is_binary_view(data_type))


def _is_variable_list(data_type: pa.DataType) -> bool:
    return pa.types.is_list(data_type) or pa.types.is_large_list(data_type)


def _lossless(source: pa.DataType, target: pa.DataType) -> bool:
    """True when every value of type `source` converts to `target` and reads back unchanged."""
    if source.equals(target) or pa.types.is_null(source):
        return True
    if is_mixed_text(target):     # a list becomes its JSON text (io/mixed_text.py)
        return is_plain_text(source) or _is_variable_list(source)
    if is_plain_text(source) and is_plain_text(target):
        return True
    if _is_binary(source) and _is_binary(target):
        return True
    if pa.types.is_integer(source) and pa.types.is_integer(target):
        if pa.types.is_signed_integer(source) == pa.types.is_signed_integer(target):
            return target.bit_width >= source.bit_width
        return pa.types.is_signed_integer(target) and target.bit_width > source.bit_width
    if pa.types.is_floating(source) and pa.types.is_floating(target):
        return target.bit_width >= source.bit_width
    if _is_variable_list(source) and _is_variable_list(target):
        return _lossless(source.value_type, target.value_type)
    if pa.types.is_struct(source) and pa.types.is_struct(target):
        target_fields = {target.field(i).name: target.field(i).type
                         for i in range(target.num_fields)}
        return all(source.field(i).name in target_fields
                   and _lossless(source.field(i).type, target_fields[source.field(i).name])
                   for i in range(source.num_fields))
    return False


def _promoted(name: str, distinct: Sequence[pa.DataType]) -> pa.DataType | None:
    """pyarrow's permissive promotion of `distinct` (None when there is none)."""
    if any(is_mixed_text(data_type) for data_type in distinct):
        return MIXED_TEXT
    try:
        merged = pa.unify_schemas(
            [pa.schema([pa.field(name, data_type)]) for data_type in distinct],
            promote_options="permissive",
        )
        return merged.field(0).type
    except _ARROW_ERRORS:
        return None


def _conflict(found: Sequence[tuple[str, pa.DataType]]) -> tuple[tuple[str, pa.DataType], ...]:
    """The first two (file, type) entries that cannot take each other's values."""
    for i, (file, data_type) in enumerate(found):
        for other_file, other_type in found[i + 1:]:
            if not (_lossless(data_type, other_type) or _lossless(other_type, data_type)):
                return (file, data_type), (other_file, other_type)
    first = found[0]
    return first, next(entry for entry in found if not entry[1].equals(first[1]))


def _unify_types(name: str, found: Sequence[tuple[str, pa.DataType]], *,
                 allow_promotion: bool) -> pa.DataType:
    found = [(file, decoded_type(data_type)) for file, data_type in found]
    distinct: list[pa.DataType] = []
    for _, data_type in found:
        if not any(data_type.equals(seen) for seen in distinct):
            distinct.append(data_type)
    if len(distinct) == 1:
        return distinct[0]
    merged = _promoted(name, distinct)
    if merged is not None and all(_lossless(data_type, merged) for data_type in distinct):
        return merged
    if not allow_promotion:
        (file, data_type), (other_file, other_type) = _conflict(found)
        csv_hint = (", or --csv-infer-types to read CSV numbers as numbers"
                    if any(f.lower().endswith(".csv") for f in (file, other_file)) else "")
        raise InputError(
            f"column {name!r} is {show(data_type)} in {file} but {show(other_type)} in "
            f"{other_file}; columns pass through unchanged, so make the types agree or pass "
            f"--allow-type-promotion to convert them to one type{csv_hint}"
        )
    if merged is not None:
        return merged
    if all(_is_scalar(data_type) for data_type in distinct):
        return pa.string()  # e.g. ints in one CSV, words in another: keep them all as text
    shown = ", ".join(f"{file}: {show(data_type)}" for file, data_type in found)
    raise InputError(
        f"column {name!r} has types that cannot be combined across input files ({shown})"
    )


def unify_input_schemas(schemas: Mapping[str, pa.Schema], *,
                        allow_promotion: bool = False) -> pa.Schema:
    """Merge per-file schemas (file name -> schema) into one schema for all batches.

    Columns keep the order of first appearance; a column missing from some files is filled with
    nulls there. Dictionary-encoded columns are decoded. Types combine only where no value
    changes (int32 + int64 -> int64, float32 + float64 -> float64, null + T -> T, string +
    large_string, lists of such, struct fields merged); any other difference raises InputError
    naming the column, two of the files and their types. `allow_promotion=True` (the job's
    `--allow-type-promotion`) promotes instead (int64 + double -> double; scalar types that do
    not promote, such as int64 + string, become string), raising only when nested types cannot
    be combined. Every field is nullable and schema metadata (stale pandas/HF info) is dropped.
    """
    found_by_name: dict[str, list[tuple[str, pa.DataType]]] = {}
    for file, schema in schemas.items():
        for field in schema:
            found_by_name.setdefault(field.name, []).append((file, field.type))
    return pa.schema(
        [pa.field(name, _unify_types(name, found, allow_promotion=allow_promotion))
         for name, found in found_by_name.items()]
    )


def conform_batch(batch: pa.RecordBatch, schema: pa.Schema, *, file: str) -> pa.RecordBatch:
    """Return `batch` with exactly the columns and types of `schema` (from `unify_input_schemas`).

    Missing columns become nulls, dictionary columns are decoded, other columns are cast
    (safely: no silent overflow). Raises InputError naming `file` and the column when a value
    cannot be converted.
    """
    columns = []
    for field in schema:
        index = batch.schema.get_field_index(field.name)
        if index < 0:
            columns.append(pa.nulls(batch.num_rows, field.type))
            continue
        column = batch.column(index)
        if not column.type.equals(field.type):
            try:
                if pa.types.is_dictionary(column.type):
                    column = column.cast(column.type.value_type)
                if is_mixed_text(field.type):
                    column = to_mixed_text(column)
                else:
                    column = column.cast(field.type)
            except _ARROW_ERRORS as error:
                raise InputError(
                    f"{file}: column {field.name!r}: cannot convert {show(column.type)} to "
                    f"{show(field.type)}: {one_line(str(error), 200)}"
                ) from None
        columns.append(column)
    return pa.RecordBatch.from_arrays(columns, schema=schema)
