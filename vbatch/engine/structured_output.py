"""Structured outputs: a per-request spec, compiled with xgrammar into a token bitmask per step.

`StructuredOutputsParams` is the spec, pure Python (xgrammar and torch are imported lazily, so
the CLI can check job flags cheaply); `GrammarCompilerCache` compiles specs for one tokenizer;
`GrammarState` is one sequence's matcher; `allocate_bitmask` / `apply_bitmask` mask the logits.
"""
from __future__ import annotations

import json as jsonlib
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vbatch.engine.json_schema_rewrite import rewrite_schema

if TYPE_CHECKING:
    import torch
    import xgrammar

KINDS = ("choice", "regex", "json", "grammar", "json_object")
# xgrammar's C++ errors start with "[12:37:06] /project/cpp/regex_converter.cc:94: ".
_CPP_PREFIX = re.compile(r"^\[[0-9:.]+\]\s+\S+:\d+:\s*")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _xgrammar():
    import xgrammar  # noqa: PLC0415 - start-up: the CLI imports this module; keep it light
    return xgrammar


def _torch():
    import torch  # noqa: PLC0415 - start-up: the CLI imports this module; keep it free of torch
    return torch


def _one_line(exc: BaseException) -> str:
    """xgrammar's error text on one line, without its C++ source-location prefixes."""
    lines = (_CPP_PREFIX.sub("", line.strip()) for line in str(exc).splitlines())
    return " ".join(" ".join(lines).split()) or type(exc).__name__


class StructuredOutputError(ValueError):
    """A request's structured-output spec that cannot be compiled (or is not supported)."""


@dataclass(frozen=True)
class StructuredOutputsParams:
    """vLLM's StructuredOutputsParams: exactly one of the kinds is set (json_object only when
    True). `json` is a JSON schema (a dict, or its JSON text: an object or a boolean schema);
    `regex` must match the whole output; `choice` (stored as a tuple) means the output is exactly
    one of these strings; `grammar` is EBNF as xgrammar accepts it, root rule `root`.
    `disable_any_whitespace` (vLLM's name): JSON (json, json_object) without free whitespace
    between tokens, compact output; by default any whitespace is allowed, as in vLLM.
    Raises ValueError on construction when the spec is malformed."""

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | tuple[str, ...] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.disable_any_whitespace, bool):
            raise ValueError("structured_outputs disable_any_whitespace must be true or false, "
                             f"got {self.disable_any_whitespace!r}")
        if self.json_object is not None and not isinstance(self.json_object, bool):
            raise ValueError("structured_outputs json_object must be true or false, got "
                             f"{self.json_object!r}")
        given = [k for k in KINDS if getattr(self, k) is not None and getattr(self, k) is not False]
        if len(given) != 1:
            raise ValueError("structured_outputs needs exactly one of " + ", ".join(KINDS)
                             + f"; got {', '.join(given) or 'none'}")
        kind, value = given[0], getattr(self, given[0])
        object.__setattr__(self, "_kind", kind)
        if kind == "choice":
            object.__setattr__(self, "choice", _checked_choices(value))
        elif kind == "json":
            _schema_of(value)
        elif kind != "json_object" and (not isinstance(value, str) or not value):
            raise ValueError(f"structured_outputs {kind} must be a non-empty string, got "
                             f"{value!r}")

    def __hash__(self) -> int:
        return hash(self.key())

    @property
    def kind(self) -> str:
        """The kind that is set: "json", "regex", "choice", "grammar" or "json_object"."""
        return self._kind

    def key(self) -> tuple[str, str]:
        """(kind, text), for caching compiled grammars: equal for specs that compile to the same
        grammar. A JSON schema is serialized compactly with its key order kept: xgrammar emits
        an object's properties in their declared order, so that order is part of the spec.
        JSON without free whitespace has kind "json:compact" / "json_object:compact"."""
        kind = self.kind
        if kind == "json":
            text = jsonlib.dumps(_schema_of(self.json), separators=(",", ":"))
        elif kind == "choice":
            text = jsonlib.dumps(list(self.choice))
        else:
            text = "" if kind == "json_object" else getattr(self, kind)
        if self.disable_any_whitespace and kind in ("json", "json_object"):
            kind += ":compact"
        return kind, text

    @classmethod
    def from_value(cls, value: Any) -> StructuredOutputsParams:
        """Parse a per-row cell: a dict (an Arrow struct cell becomes a dict whose absent keys are
        None: None-valued keys are ignored), the JSON text of such a dict, or a
        StructuredOutputsParams (returned as is). Unknown keys raise ValueError naming them."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                value = jsonlib.loads(value)
            except ValueError as exc:
                raise ValueError(f"structured_outputs text is not valid JSON ({exc}); write an "
                                 'object such as {"regex": "[0-9]+"}') from exc
        if not isinstance(value, Mapping):
            raise ValueError(f"structured_outputs must be an object with one of {', '.join(KINDS)}"
                             f"; got {type(value).__name__}")
        unknown = sorted(str(key) for key in value
                         if key not in KINDS and key != "disable_any_whitespace")
        if unknown:
            raise ValueError(f"structured_outputs has unknown key(s) {', '.join(unknown)}; "
                             f"allowed: {', '.join(KINDS)}, disable_any_whitespace")
        return cls(**{key: item for key, item in value.items() if item is not None})

    def to_grammar(self) -> xgrammar.Grammar:
        """The xgrammar.Grammar for this spec (no tokenizer needed). Raises ValueError, one line,
        when xgrammar rejects it (bad regex, schema or EBNF, an unsupported feature)."""
        grammar, kind = _xgrammar().Grammar, self.kind
        any_whitespace = not self.disable_any_whitespace
        try:
            if kind == "json":
                schema = jsonlib.dumps(rewrite_schema(_schema_of(self.json)),
                                       separators=(",", ":"))
                return grammar.from_json_schema(schema, any_whitespace=any_whitespace)
            if kind == "json_object":
                return grammar.from_json_schema('{"type": "object"}',
                                                any_whitespace=any_whitespace)
            if kind == "regex":
                return grammar.from_regex(self.regex)
            text = _choice_ebnf(self.choice) if kind == "choice" else self.grammar
            return grammar.from_ebnf(text)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise ValueError(f"structured_outputs {kind} is not usable: {_one_line(exc)}") \
                from exc


def _checked_choices(choice: Any) -> tuple[str, ...]:
    """choice as a tuple of non-empty strings, else ValueError."""
    if not isinstance(choice, (list, tuple)) or not choice:
        raise ValueError("structured_outputs choice must be a non-empty list of strings, got "
                         f"{choice!r}")
    for item in choice:  # a lone surrogate is no UTF-8: no token sequence can spell it
        if not isinstance(item, str) or not item or _SURROGATE.search(item):
            raise ValueError("structured_outputs choice entries must be non-empty strings of "
                             f"valid Unicode, got {item!r}")
    return tuple(choice)


def _schema_of(value: Any) -> dict | bool:
    """The JSON schema `value` holds (a dict, or JSON text of an object or boolean)."""
    if not isinstance(value, (str, dict)):
        raise ValueError("structured_outputs json must be a JSON schema (a dict or its JSON "
                         f"text), got {type(value).__name__}")
    try:
        schema = jsonlib.loads(value) if isinstance(value, str) else value
        jsonlib.dumps(schema)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"structured_outputs json is not valid JSON ({exc}); pass a JSON schema "
                         "object") from exc
    if not isinstance(schema, (dict, bool)):
        raise ValueError("structured_outputs json must be a JSON schema object (or true/false), "
                         f"got {type(schema).__name__}")
    return schema


def _escaped(char: str) -> str:
    """One character inside an xgrammar EBNF string literal."""
    code = ord(char)
    if char in '"\\':
        return "\\" + char
    if 0x20 <= code < 0x7F:
        return char
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _choice_ebnf(choices: Iterable[str]) -> str:
    """EBNF whose root matches exactly one of `choices` (non-ASCII as \\u / \\U escapes)."""
    literals = ('"' + "".join(map(_escaped, choice)) + '"' for choice in dict.fromkeys(choices))
    return "root ::= " + " | ".join(literals)


class GrammarState:
    """One sequence's matcher (made by GrammarCompilerCache.new_matcher). Feed it every sampled
    token with accept_token; before sampling, fill_bitmask writes which tokens may come next."""

    def __init__(self, matcher: xgrammar.GrammarMatcher, stop_token_ids: tuple[int, ...]):
        self._matcher = matcher
        self._stop_token_ids = stop_token_ids
        self._num_accepted = 0

    def accept_token(self, token_id: int) -> bool:
        """Advance by `token_id`; False (state unchanged) if the grammar rejects it, or has
        already terminated."""
        accepted = self._matcher.accept_token(int(token_id))
        self._num_accepted += bool(accepted)
        return accepted

    @property
    def is_terminated(self) -> bool:
        """True once the grammar reached its end and a stop token was accepted."""
        return self._matcher.is_terminated()

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into row `row` of a bitmask from allocate_bitmask (once
        terminated: only the stop tokens)."""
        if not 0 <= row < bitmask.shape[0]:
            raise ValueError(f"bitmask row {row} is out of range: the bitmask has "
                             f"{bitmask.shape[0]} rows")
        if not self.is_terminated:
            self._matcher.fill_next_token_bitmask(bitmask, row)
            return
        bitmask[row].zero_()
        for token_id in self._stop_token_ids:
            word, bit = divmod(token_id, 32)
            bitmask[row, word] |= (1 << bit) if bit < 31 else -(1 << 31)

    def rollback(self, num_tokens: int) -> None:
        """Undo the last `num_tokens` accepted tokens (0 <= num_tokens <= tokens accepted)."""
        if not 0 <= num_tokens <= self._num_accepted:
            raise ValueError(f"cannot roll back {num_tokens} tokens: {self._num_accepted} accepted")
        if num_tokens:
            self._matcher.rollback(num_tokens)
            self._num_accepted -= num_tokens


class GrammarCompilerCache:
    """Compiles specs against one tokenizer; one CompiledGrammar per distinct spec key (cached:
    the `max_entries` most recently used, failures too; a lock makes it safe for one engine).
    `vocab_size` is the model's LM-head vocabulary (ids past the tokenizer's are never allowed);
    a grammar ends by emitting one of `stop_token_ids`. The tokenizer's special tokens (dropped
    by skip_special_tokens) are never allowed inside a grammar."""

    def __init__(self, tokenizer, *, vocab_size: int, stop_token_ids: Iterable[int],
                 max_entries: int = 512):
        stops = tuple(dict.fromkeys(int(i) for i in stop_token_ids))
        if not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
        if not stops or not all(0 <= i < vocab_size for i in stops):
            raise ValueError(f"stop_token_ids must be non-empty ids below vocab_size "
                             f"{vocab_size}, got {list(stops)}")
        xgr = _xgrammar()
        try:
            base = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                      stop_token_ids=list(stops))
        except (ValueError, RuntimeError, TypeError) as exc:
            raise ValueError(f"structured outputs cannot use this tokenizer: {_one_line(exc)}") \
                from exc
        special = set(getattr(tokenizer, "all_special_ids", ()))
        special |= {i for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items()
                    if getattr(tok, "special", False)}
        # Each token's decoded bytes, special ones blanked: xgrammar never allows a token whose
        # text is empty (the stop tokens are allowed by id, at the grammar's end).
        vocab = [b"" if i in special else text for i, text in enumerate(base.decoded_vocab)]
        self.tokenizer_info = xgr.TokenizerInfo(
            vocab, xgr.VocabType.RAW, vocab_size=vocab_size, stop_token_ids=list(stops),
            add_prefix_space=base.add_prefix_space)
        self.vocab_size = vocab_size
        self.stop_token_ids = stops
        self._compiler = xgr.GrammarCompiler(self.tokenizer_info, cache_enabled=False)
        self._max_entries = max(1, max_entries)
        self._cache: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, params: StructuredOutputsParams) -> xgrammar.CompiledGrammar:
        """The CompiledGrammar for `params` (the same object for equal keys while cached).
        Raises ValueError when the spec cannot be compiled."""
        key = params.key()
        with self._lock:
            entry = self._cache.get(key)
            if entry is None:
                try:
                    entry = self._compiler.compile_grammar(params.to_grammar())
                except ValueError as exc:  # cached too: a bad spec in many rows fails fast
                    entry = exc
                except RuntimeError as exc:
                    entry = ValueError(f"structured_outputs {params.kind}: {_one_line(exc)}")
                self._cache[key] = entry
                if len(self._cache) > self._max_entries:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(key)
        if isinstance(entry, ValueError):
            raise ValueError(str(entry))
        return entry

    def new_matcher(self, params: StructuredOutputsParams) -> GrammarState:
        """A fresh GrammarState for one sequence under `params` (ValueError as compile)."""
        return GrammarState(_xgrammar().GrammarMatcher(self.compile(params)), self.stop_token_ids)


def allocate_bitmask(num_rows: int, vocab_size: int) -> torch.Tensor:
    """An int32 CPU tensor [num_rows, ceil(vocab_size / 32)], every token allowed; bit j % 32 of
    word j // 32 set means token j is allowed."""
    if num_rows < 1 or vocab_size < 1:
        raise ValueError(f"a bitmask needs num_rows >= 1 and vocab_size >= 1, got {num_rows} and "
                         f"{vocab_size}")
    return _xgrammar().allocate_token_bitmask(num_rows, vocab_size)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: Sequence[int]) -> None:
    """In place: logits[rows[i]] gets -inf on every token that bitmask row i forbids, and on
    every column past what the bitmask covers. logits: [B, V] float; bitmask: int32
    [>= len(rows), W]. CPU float32/bfloat16/float16 use xgrammar's kernel, anything else torch."""
    torch = _torch()
    rows = [int(r) for r in rows]
    if logits.dim() != 2 or bitmask.dim() != 2 or bitmask.dtype != torch.int32:
        raise ValueError(f"apply_bitmask needs 2-D logits and a 2-D int32 bitmask, got "
                         f"{tuple(logits.shape)} and {tuple(bitmask.shape)} {bitmask.dtype}")
    if len(rows) > bitmask.shape[0] or len(set(rows)) != len(rows) \
            or not all(0 <= r < logits.shape[0] for r in rows):
        raise ValueError(f"apply_bitmask rows {rows} must be distinct logits rows (< "
                         f"{logits.shape[0]}), at most one per bitmask row ({bitmask.shape[0]})")
    if not rows:
        return
    vocab = logits.shape[1]
    width = min(vocab, bitmask.shape[1] * 32)
    if logits.device.type != "cpu" or bitmask.device.type != "cpu" or logits.stride(1) != 1 \
            or logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        _apply_with_torch(logits, bitmask, rows, width)
    elif rows == list(range(len(rows))):
        _xgrammar().apply_token_bitmask_inplace(logits[:len(rows)], bitmask[:len(rows)],
                                                vocab_size=width)
    else:
        for i, row in enumerate(rows):
            _xgrammar().apply_token_bitmask_inplace(logits[row], bitmask[i], vocab_size=width)
    if width < vocab:
        logits[torch.tensor(rows, device=logits.device), width:] = float("-inf")


def _apply_with_torch(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int],
                      width: int) -> None:
    """apply_bitmask's first `width` columns with plain torch ops (any device, any float)."""
    torch = _torch()
    bits = bitmask[:len(rows)].to(logits.device)
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    allowed = ((bits.unsqueeze(-1) >> shifts) & 1).bool().reshape(len(rows), -1)[:, :width]
    index = torch.tensor(rows, device=logits.device)
    logits[index, :width] = logits[index, :width].masked_fill(~allowed, float("-inf"))
