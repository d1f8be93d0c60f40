"""The Arrow shape of token logprobs: the `logprobs` and `prompt_logprobs` output columns.

Each cell is a list with one entry per token (generated, or of the prompt: its first entry is
null), each entry the token's id, text, logprob and rank (1 = most likely) and its
`top_logprobs` alternatives, most likely first.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyarrow as pa

#: One of the most likely tokens at a position.
TOP_LOGPROB_TYPE = pa.struct([("token_id", pa.int32()), ("token", pa.string()),
                              ("logprob", pa.float32())])
#: One position: the token there (sampled, or the prompt's), its logprob and rank (1 = most
#: likely), and the top alternatives, most likely first.
TOKEN_LOGPROB_TYPE = pa.struct([("token_id", pa.int32()), ("token", pa.string()),
                                ("logprob", pa.float32()), ("rank", pa.int32()),
                                ("top_logprobs", pa.list_(TOP_LOGPROB_TYPE))])
#: The type of the `logprobs` and `prompt_logprobs` columns.
LOGPROBS_TYPE = pa.list_(TOKEN_LOGPROB_TYPE)


def _entry_value(entry: Any, name: str) -> Any:
    return entry[name] if isinstance(entry, dict) else getattr(entry, name)


def logprobs_array(cells: Sequence[Sequence[Any] | None]) -> pa.Array:
    """A `LOGPROBS_TYPE` array of `cells`: each None (a null cell) or a list of entries, each
    None (a null entry: a prompt's first token) or an object or dict with token_id, token,
    logprob, rank and top_logprobs (objects or dicts with token_id, token, logprob). Built
    column by column (no Python dict per value)."""
    offsets, cell_valid = [0], []
    token_ids, tokens, values, ranks, entry_valid = [], [], [], [], []
    top_offsets, top_ids, top_tokens, top_values = [0], [], [], []
    for cell in cells:
        cell_valid.append(cell is not None)
        if cell is None:
            offsets.append(offsets[-1])
            continue
        for entry in cell:
            entry_valid.append(entry is not None)
            if entry is None:
                token_ids.append(0)
                tokens.append("")
                values.append(0.0)
                ranks.append(0)
                top_offsets.append(top_offsets[-1])
                continue
            token_ids.append(_entry_value(entry, "token_id"))
            tokens.append(_entry_value(entry, "token"))
            values.append(_entry_value(entry, "logprob"))
            ranks.append(_entry_value(entry, "rank"))
            tops = _entry_value(entry, "top_logprobs") or ()
            for top in tops:
                top_ids.append(_entry_value(top, "token_id"))
                top_tokens.append(_entry_value(top, "token"))
                top_values.append(_entry_value(top, "logprob"))
            top_offsets.append(top_offsets[-1] + len(tops))
        offsets.append(offsets[-1] + len(cell))
    top_structs = pa.StructArray.from_arrays(
        [pa.array(top_ids, pa.int32()), pa.array(top_tokens, pa.string()),
         pa.array(top_values, pa.float32())], fields=list(TOP_LOGPROB_TYPE))
    top_lists = pa.ListArray.from_arrays(pa.array(top_offsets, pa.int32()), top_structs,
                                         type=TOKEN_LOGPROB_TYPE.field("top_logprobs").type)
    entry_mask = None if all(entry_valid) else pa.array([not v for v in entry_valid])
    entries = pa.StructArray.from_arrays(
        [pa.array(token_ids, pa.int32()), pa.array(tokens, pa.string()),
         pa.array(values, pa.float32()), pa.array(ranks, pa.int32()), top_lists],
        fields=list(TOKEN_LOGPROB_TYPE), mask=entry_mask)
    cell_mask = None if all(cell_valid) else pa.array([not v for v in cell_valid])
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), entries, type=LOGPROBS_TYPE,
                                    mask=cell_mask)
