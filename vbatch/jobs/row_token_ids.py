"""A `prompt_token_ids` cell -> the prompt's token ids (vLLM's TokensPrompt), or why not.

A cell is a list of token ids (integers; floats such as 5.0 from JSON are taken when they are
whole), or its JSON text (CSV cells, a JSON lines string). The ids are used as they are: no
special tokens added, no chat template. Bad cells are row errors, never the job's: a null or
empty list is `empty_prompt`; anything that is not a list of integers, or an id outside the
vocabulary (0 <= id < vocabulary size), is `bad_token_ids`.
"""
from __future__ import annotations

import json

from vbatch.jobs.row_errors import BAD_TOKEN_IDS, EMPTY_PROMPT, RowError

_SHOWN = 40


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN else text[:_SHOWN] + "..."


def token_ids_cell(value: object, vocab_size: int) -> list[int] | RowError:
    """The token ids of one `prompt_token_ids` cell (see module docstring)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return RowError(BAD_TOKEN_IDS, f"prompt_token_ids must be a list of token ids, "
                                           f"got the text {_shown(value)}")
    if value is None or (isinstance(value, (list, tuple)) and not value):
        return RowError(EMPTY_PROMPT, "prompt_token_ids is empty or null")
    if not isinstance(value, (list, tuple)):
        return RowError(BAD_TOKEN_IDS, f"prompt_token_ids must be a list of token ids, got "
                                       f"a {type(value).__name__}")
    token_ids = []
    for index, item in enumerate(value):
        if isinstance(item, float) and item.is_integer():
            item = int(item)
        if isinstance(item, bool) or not isinstance(item, int):
            return RowError(BAD_TOKEN_IDS, f"prompt_token_ids[{index}] must be an integer, "
                                           f"got {_shown(item)}")
        if not 0 <= item < vocab_size:
            return RowError(BAD_TOKEN_IDS, f"prompt_token_ids[{index}] = {item} is outside "
                                           f"the vocabulary (0..{vocab_size - 1})")
        token_ids.append(item)
    return token_ids


def vocabulary_size(engine) -> int:
    """The ids a prompt may use: those the tokenizer can decode and the model can embed
    (the smaller of the two sizes; a model's embedding is often padded past its tokenizer)."""
    sizes = [len(engine.tokenizer)]
    hf_config = getattr(engine, "hf_config", None)
    if getattr(hf_config, "vocab_size", None):
        sizes.append(hf_config.vocab_size)
    return min(sizes)
