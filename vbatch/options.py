"""Options declared once, as dataclass fields: `field: T = option(default, help=..., ...)`.

An option's declaration is the field of the class that consumes it (`EngineConfig` for the
engine, `SamplingParams` for a request, `JobOptions` for the job itself) and holds everything
about it: name and type (the field), default, CLI spellings, environment variable, help text,
validation, whether it is part of a job's fingerprint, and whether `vbatch run` offers it at
all. Everything else derives from that field: the click options, the YAML and env parsing, the
flat `JobConfig`, the `LLM(...)` keyword arguments and the fingerprint (see `vbatch.jobs.config`).

Validation is written once here, as `Check`s on the option, and used by every surface: the CLI
and YAML (messages name the flag, `--max-tokens must be >= 1, got 0`), the Python API and the
per-row sampling columns (messages name the field, `max_tokens must be >= 1, got 0`).

This module imports nothing of vbatch and nothing heavy: the CLI reads declarations without
loading torch.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

#: Bounds of 64-bit integers: integer options end up in torch/Arrow int64 values (top_k, token
#: counts, sizes), seeds in torch.manual_seed's uint64.
INT64_MAX = 2**63 - 1
UINT64_MAX = 2**64 - 1

#: A check returns what is wrong with a value ("must be >= 1, got 0"), or None when it is fine.
Check = Callable[[Any], "str | None"]

_NO_DEFAULT: Any = dataclasses.MISSING


class _Unset:
    """Marks `Option.job_default` as not given (None is a valid default)."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()


@dataclass(frozen=True, slots=True)
class Option:
    """What one option declares besides its name, type and default (see module docstring).

    `flags`: extra CLI spellings besides `--field-name` (e.g. `("--tp", "-tp")`); `negatable`:
    a boolean offered as `--x/--no-x`; `env`: the environment variable that sets it;
    `choices`: the allowed values (checked, and offered by the CLI); `checks`: validation;
    `normalize`: applied to a value before it is checked (e.g. top_k -1 -> 0);
    `fingerprint`: part of the job fingerprint (it changes which rows exist or what they
    generate), so `--resume` refuses a change to it; `in_job`: offered by `vbatch run` and job
    YAML; `job_default`/`job_default_factory`: the job's default where it differs from the API's
    (vLLM's `max_tokens=16` vs a job's 256); `cli_argument`: the positional INPUT argument;
    `per_row`: an input column of this name overrides the value for its row.
    """

    help: str
    flags: tuple[str, ...] = ()
    negatable: bool = False
    env: str | None = None
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    case_sensitive: bool = True
    checks: tuple[Check, ...] = ()
    normalize: Callable[[Any], Any] | None = None
    fingerprint: bool = True
    in_job: bool = True
    job_default: Any = UNSET
    job_default_factory: Callable[[], Any] | None = None
    cli_argument: bool = False
    per_row: bool = False


def option(default: Any = _NO_DEFAULT, *, default_factory: Callable[[], Any] | None = None,
           help: str, checks: Check | tuple[Check, ...] = (), **spec: Any) -> Any:
    """A dataclass field declaring an option (see `Option` for the keyword arguments)."""
    if not isinstance(checks, tuple):
        checks = (checks,)
    metadata = {"option": Option(help=help, checks=checks, **spec)}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclass(frozen=True, slots=True)
class DeclaredOption:
    """One declared option as read back from its class: name, type, defaults and `Option`."""

    name: str
    type: Any
    default: Any
    default_factory: Callable[[], Any] | None
    spec: Option

    @property
    def flag(self) -> str:
        """The option's main CLI spelling: `--max-tokens` for `max_tokens`."""
        return "--" + self.name.replace("_", "-")

    def job_field(self) -> dataclasses.Field:
        """A dataclass field with the job's default and this option's metadata."""
        spec = self.spec
        if spec.job_default_factory is not None:
            factory, default = spec.job_default_factory, _NO_DEFAULT
        elif spec.job_default is not UNSET:
            factory, default = None, spec.job_default
        else:
            factory, default = self.default_factory, self.default
        metadata = {"option": spec}
        if factory is not None:
            return dataclasses.field(default_factory=factory, metadata=metadata)
        return dataclasses.field(default=default, metadata=metadata)

    def job_default_value(self) -> Any:
        """The default a job starts from (None when the option has none)."""
        field = self.job_field()
        if field.default_factory is not _NO_DEFAULT:
            return field.default_factory()
        return None if field.default is _NO_DEFAULT else field.default


@functools.cache
def declared_options(cls: type) -> tuple[DeclaredOption, ...]:
    """The options `cls` declares, in declaration order (fields without `option()` skipped).
    Cached per class: validation runs for every request."""
    hints = typing.get_type_hints(cls)
    declared = []
    for field in dataclasses.fields(cls):
        spec = field.metadata.get("option")
        if spec is None:
            continue
        factory = None if field.default_factory is _NO_DEFAULT else field.default_factory
        declared.append(DeclaredOption(field.name, hints[field.name], field.default, factory,
                                       spec))
    return tuple(declared)


def normalize_options(instance: Any) -> None:
    """Apply each declared option's `normalize` to its value on `instance`, in place."""
    for declared in declared_options(type(instance)):
        if declared.spec.normalize is not None:
            value = getattr(instance, declared.name)
            setattr(instance, declared.name, declared.spec.normalize(value))


def option_problem(declared: DeclaredOption, value: Any) -> str | None:
    """What is wrong with `value` for this option ("must be >= 1, got 0"), or None. None
    values of options whose type allows None are fine (they mean "default" or "off")."""
    if value is None and _allows_none(declared.type):
        return None
    choices = declared.spec.choices
    if choices is not None and value not in choices:
        return f"must be one of {', '.join(choices)}, got {value!r}"
    for check in declared.spec.checks:
        problem = check(value)
        if problem is not None:
            return problem
    return None


def validate_options(instance: Any, label: Callable[[DeclaredOption], str]) -> None:
    """Check every declared option of `instance`; raise ValueError("<label> <problem>") for the
    first bad one. `label` names the option for the surface at hand (its flag, or its name)."""
    for declared in declared_options(type(instance)):
        problem = option_problem(declared, getattr(instance, declared.name))
        if problem is not None:
            raise ValueError(f"{label(declared)} {problem}")


# ---- checks ---------------------------------------------------------------------------------

def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_finite_number(value: Any) -> bool:
    """A number that is not inf/nan (any int is: `math.isfinite` would overflow on huge ones)."""
    return _is_number(value) and (isinstance(value, int) or math.isfinite(value))


def at_least(minimum: float, maximum: float | None = None) -> Check:
    """value >= minimum (and a finite number), and value <= maximum when one is given (e.g.
    `INT64_MAX` for an integer that must fit in 64 bits)."""
    def check(value: Any) -> str | None:
        if not _is_finite_number(value) or value < minimum:
            return f"must be >= {minimum}, got {value}"
        if maximum is not None and value > maximum:
            return f"must be <= {maximum}, got {value}"
        return None
    return check


def greater_than(minimum: float) -> Check:
    """value > minimum (and a finite number)."""
    def check(value: Any) -> str | None:
        if not _is_finite_number(value) or value <= minimum:
            return f"must be > {minimum}, got {value}"
        return None
    return check


def in_range(low: float, high: float, *, low_open: bool = False) -> Check:
    """low <= value <= high, or low < value <= high with `low_open`."""
    interval = f"{'(' if low_open else '['}{low}, {high}]"

    def check(value: Any) -> str | None:
        if not _is_finite_number(value):
            return f"must be in {interval}, got {value}"
        if value > high or value < low or (low_open and value == low):
            return f"must be in {interval}, got {value}"
        return None
    return check


def not_blank(what: str = "") -> Check:
    """A string with something besides whitespace; `what` names it in the message."""
    def check(value: Any) -> str | None:
        if not isinstance(value, str) or not value.strip():
            return f"must be {what or 'a non-empty string'}"
        return None
    return check


def non_empty_strings(value: Any) -> str | None:
    """Every string of a list (or a single string) is non-empty."""
    values = [value] if isinstance(value, str) else list(value or ())
    for item in values:
        if not isinstance(item, str) or item == "":
            return f"strings must be non-empty, got {item!r}"
    return None


# ---- types ----------------------------------------------------------------------------------

def _allows_none(annotation: Any) -> bool:
    return annotation is type(None) or type(None) in typing.get_args(annotation)


def base_type(annotation: Any) -> Any:
    """`int` for `int | None`, `list` for `list[str] | str | None`, else the annotation."""
    args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        if any(typing.get_origin(arg) is list for arg in args):
            return list
        return args[0] if len(args) == 1 else annotation
    return typing.get_origin(annotation) or annotation


def convert_plain_value(declared: DeclaredOption, value: Any) -> Any:
    """`value` (from YAML or JSON) as the option's type, strictly: an int is a number but not
    a bool, a string is never a number, `null` only where the option allows None, a lone
    string is a one-item list. Raises TypeError naming what was expected ("an integer")."""
    if value is None:
        if _allows_none(declared.type):
            return None
        raise TypeError(_EXPECTED.get(base_type(declared.type), "a value"))
    kind = base_type(declared.type)
    if kind is bool:
        if not isinstance(value, bool):
            raise TypeError("true or false")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError("an integer")
        return value
    if kind is float:
        if not _is_number(value):
            raise TypeError("a number")
        return float(value)
    if kind is list:
        if isinstance(value, str):
            return [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise TypeError("a string or a list of strings")
        return list(value)
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise TypeError("a string")
    return str(value)


_EXPECTED = {bool: "true or false", int: "an integer", float: "a number",
             list: "a string or a list of strings", str: "a string"}
