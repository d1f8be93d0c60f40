"""The shape of `_manifest.json` as `--resume` reads it back, checked before anything is used.

A manifest is JSON that anyone (a person, a script, a crash of an older version) may have
touched, so `check_manifest` validates it against the models below before `load_resume_state`
deletes a file or skips a row: part names must be vbatch part names (never a path such as
`../../x`), listed once; row counts non-negative integers; positions sorted, disjoint
[start, end) pairs that cover exactly the part's rows and no other part's. Fields vbatch does
not read are allowed (`extra="allow"`). A bad shape is one line naming the file and the first
problem's place: `output.part_files[2].name missing`. The commit log's records and checkpoints
(io/commit_log.py) hold the same part entries and are checked the same way (`LogRecord`,
`Checkpoint`, and `check_log_parts` over the replayed log).
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from vbatch.errors import VBatchUsageError, one_line
from vbatch.io.output_dir import PART_FILE_PATTERN

_MAX_POSITION = 2**63 - 1
Count = Annotated[StrictInt, Field(ge=0)]
Position = Annotated[StrictInt, Field(ge=0, le=_MAX_POSITION)]
Interval = Annotated[list[Position], Field(min_length=2, max_length=2)]


class _Entry(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class InputFileEntry(_Entry):
    """One input file of the fingerprint (only `path` is read by name; the rest is compared)."""

    path: StrictStr


class FingerprintEntry(_Entry):
    """The job fingerprint: compared field by field with the resumed job's."""

    input_files: list[InputFileEntry] = []
    generation: dict[str, Any] = {}


class PartEntry(_Entry):
    """One committed part file: its name, rows, the positions of its rows and, since the
    per-part counts were added, its error-row and token counts."""

    name: StrictStr
    num_rows: Count
    positions: list[Interval] | None = None
    num_error_rows: Count | None = None
    num_prompt_tokens: Count | None = None
    num_output_tokens: Count | None = None

    @field_validator("name")
    @classmethod
    def _is_part_name(cls, name: str) -> str:
        if not PART_FILE_PATTERN.fullmatch(name):
            raise ValueError(f"{name!r} is not a part file name (part-NNNNN.parquet or .jsonl)")
        return name

    @model_validator(mode="after")
    def _consistent(self) -> PartEntry:
        if self.num_error_rows is not None and self.num_error_rows > self.num_rows:
            raise ValueError(f"num_error_rows {self.num_error_rows} > num_rows {self.num_rows}")
        if self.positions is not None:
            previous_end, covered = -1, 0
            for start, end in self.positions:
                if start >= end or start < previous_end:
                    raise ValueError("positions must be sorted, disjoint [start, end) pairs "
                                     f"with start < end, got [{start}, {end}]")
                previous_end = end
                covered += end - start
            if covered != self.num_rows:
                raise ValueError(f"positions cover {covered} rows but num_rows is "
                                 f"{self.num_rows}")
        return self


class OutputEntry(_Entry):
    """The committed part files (each listed once, no row in two of them: `_parts_problem`)."""

    part_files: list[PartEntry] = []


class Manifest(_Entry):
    """What `--resume` reads of `_manifest.json`; every other key is kept as written."""

    fingerprint: FingerprintEntry | None = None
    output: OutputEntry | None = None


class LogRecord(_Entry):
    """One record of the commit log (io/commit_log.py): the part it commits."""

    log_format: Literal[1]
    version: Count
    add: list[PartEntry]


class Checkpoint(_Entry):
    """A checkpoint of the commit log: the whole state as of its version (its part rows are
    checked as `PartEntry`s once decoded: `check_part_entries`)."""

    log_format: Literal[1]
    version: Count
    fingerprint: FingerprintEntry | None = None
    committed: list[Interval] = []
    part_columns: list[StrictStr]
    part_rows: list[list[Any]]


class _PartList(_Entry):
    part_files: list[PartEntry]


def check_manifest(content: Any, path: Path) -> dict:
    """`content` (parsed JSON of the manifest at `path`) when it has the shape above; raises
    VBatchUsageError "cannot resume: <path> is not a vbatch manifest: <first problem>"."""
    try:
        manifest = Manifest.model_validate(content, strict=True)
        problem = _parts_problem([(part.name, part.positions) for part in
                                  (manifest.output.part_files if manifest.output else [])])
    except ValidationError as error:
        problem = _first_problem(error)
    if problem:
        raise VBatchUsageError(f"cannot resume: {path} is not a vbatch manifest: {problem}")
    return content


def check_log_record(content: Any, where: str) -> dict:
    """`content` (parsed JSON of the commit-log record `where`) when shaped like a
    `LogRecord`; raises VBatchUsageError "cannot resume: <where> is not a vbatch commit log
    file: <first problem>"."""
    return _check_log_file(LogRecord, content, where)


def check_checkpoint(content: Any, where: str) -> dict:
    """`content` (parsed JSON of the checkpoint `where`) when shaped like a `Checkpoint`;
    raises VBatchUsageError as `check_log_record` does."""
    return _check_log_file(Checkpoint, content, where)


def _check_log_file(model: type[_Entry], content: Any, where: str) -> dict:
    try:
        model.model_validate(content, strict=True)
    except ValidationError as error:
        raise VBatchUsageError(f"cannot resume: {where} is not a vbatch commit log file: "
                               f"{_first_problem(error)}") from None
    return content


def check_part_entries(parts: list[dict], where: str) -> list[dict]:
    """`parts` (the decoded part entries of the checkpoint `where`) when each is shaped like a
    `PartEntry`; raises VBatchUsageError as `check_log_record` does."""
    _check_log_file(_PartList, {"part_files": parts}, where)
    return parts


def check_log_parts(parts: list[dict], where: str) -> None:
    """Refuse (VBatchUsageError) a replayed commit log (`where`) whose part entries (already
    checked one by one) name a part twice or two parts holding the same row."""
    problem = _parts_problem([(part["name"], part.get("positions")) for part in parts],
                             place="parts")
    if problem:
        raise VBatchUsageError(f"cannot resume: the commit log in {where} is not a vbatch "
                               f"commit log: {problem}")


def _parts_problem(parts: list[tuple[str, list | None]],
                   place: str = "output.part_files") -> str | None:
    """A part listed twice, or rows that two parts hold, as "<place>[i]: ..."; `parts`: each
    part's (name, positions)."""
    names: set[str] = set()
    for index, (name, _) in enumerate(parts):
        if name in names:
            return f"{place}[{index}]: {name} is listed twice"
        names.add(name)
    intervals = sorted((start, end, index) for index, (_, positions) in enumerate(parts)
                       for start, end in positions or [])
    # Sorted by start, any overlap shows between neighbours.
    for (_, end, first), (start, _, second) in zip(intervals, intervals[1:]):
        if start < end:
            earlier, later = sorted((first, second))
            short = place.rsplit(".", 1)[-1]
            return (f"{place}[{later}]: {parts[later][0]} holds rows that "
                    f"{short}[{earlier}] holds too")
    return None


_EXPECTED = {"model_type": "should be a JSON object", "dict_type": "should be a JSON object",
             "list_type": "should be a list", "int_type": "should be an integer",
             "string_type": "should be a string",
             # the only length-checked lists are the [start, end] position pairs
             "too_short": "should be a [start, end] pair",
             "too_long": "should be a [start, end] pair"}


def _first_problem(error: ValidationError) -> str:
    problem = error.errors(include_url=False)[0]
    place = "".join(f"[{step}]" if isinstance(step, int) else f".{step}"
                    for step in problem["loc"]).lstrip(".")
    if problem["type"] == "missing":
        return f"{place} missing"
    if not place:
        return f"not a JSON object (got {type(problem['input']).__name__})"
    message = _EXPECTED.get(problem["type"], problem["msg"].removeprefix("Value error, "))
    if not problem["type"].startswith("value_error"):
        message += f", got {one_line(repr(problem['input']), 60)}"
    return f"{place}: {message}"
