"""Prompts of a batch -> token ids, row by row safe: a bad row becomes a `RowError`, never a
job failure.

Checks per row: a null, empty or whitespace-only prompt (`empty_prompt`), a value that is not
text (`not_text`), an empty or malformed `messages` list (`empty_prompt` / `bad_messages`), a
chat template that raises (`chat_template`), a tokenizer that raises (`tokenize`), a
`prompt_token_ids` cell that is not a list of ids in the vocabulary (`bad_token_ids`,
jobs/row_token_ids.py; such prompts are not tokenized). The common
case stays fast: all good rows of a batch are tokenized in one batched tokenizer call; rows are
tokenized one at a time only when that call fails. `PromptEncoder.fit` then applies the
long-prompt policy (`--on-long-prompt error|truncate`).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pyarrow as pa

from vbatch.errors import VBatchUsageError
from vbatch.io.mixed_text import python_values
from vbatch.io.schema import MESSAGES_COLUMN, TOKEN_IDS_COLUMN
from vbatch.jobs.options import ON_LONG_PROMPT_CHOICES
from vbatch.jobs.row_errors import (
    BAD_MESSAGES,
    CHAT_TEMPLATE,
    EMPTY_PROMPT,
    NOT_TEXT,
    PROMPT_TOO_LONG,
    TOKENIZE,
    RowError,
)
from vbatch.jobs.row_token_ids import token_ids_cell, vocabulary_size


@dataclass(frozen=True)
class RowPrompts:
    """How to read prompts from a batch: the prompt column (`"messages"` = chat turns,
    `"prompt_token_ids"` = token ids, used as they are), the row-key column, whether to
    chat-template raw text, and what to do with a prompt that leaves no room to generate
    (`on_long_prompt`: "error" or "truncate"). Raises VBatchUsageError for `chat` with token
    ids."""

    prompt_column: str
    id_column: str
    chat: bool
    on_long_prompt: str = "error"

    def __post_init__(self) -> None:
        if self.on_long_prompt not in ON_LONG_PROMPT_CHOICES:
            raise VBatchUsageError(f"--on-long-prompt must be error or truncate, "
                                   f"got {self.on_long_prompt!r}")
        if self.chat and self.prompt_column == TOKEN_IDS_COLUMN:
            raise VBatchUsageError(f"--chat needs text prompts, but the prompts are the "
                                   f"{TOKEN_IDS_COLUMN} column (token ids are used as they "
                                   "are); leave out --chat")

    @property
    def uses_chat_template(self) -> bool:
        return self.chat or self.prompt_column == MESSAGES_COLUMN


class PromptEncoder:
    """Token ids of each row's prompt, with the same ids `LLMEngine.encode_prompt` gives:
    raw text with the tokenizer's special tokens; chat turns rendered by the chat template
    (with the generation prompt) and tokenized without extra special tokens.

    `engine` needs `tokenizer`, `max_model_len` and `encode_prompts`. Raises VBatchUsageError
    when a chat template is needed (`--chat` or a `messages` column) and the tokenizer has none.
    """

    def __init__(self, engine, prompts: RowPrompts):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self.prompts = prompts
        if prompts.uses_chat_template and not getattr(self.tokenizer, "chat_template", None):
            how = ("the input has a messages column" if prompts.prompt_column == MESSAGES_COLUMN
                   else "--chat was given")
            raise VBatchUsageError(f"{how} but the model's tokenizer has no chat template; "
                                   "use a model with one, or raw prompts without --chat")

    def encode(self, batch: pa.RecordBatch) -> list[list[int] | RowError]:
        """One entry per row of `batch`: its prompt token ids, or the RowError that stops it."""
        # A JSON prompt column that mixes text and other values: those values as Python
        # objects, so their rows become `not_text` errors.
        values = python_values(batch.column(self.prompts.prompt_column))
        if self.prompts.prompt_column == TOKEN_IDS_COLUMN:
            vocab_size = vocabulary_size(self.engine)
            return [token_ids_cell(value, vocab_size) for value in values]
        if self.prompts.prompt_column == MESSAGES_COLUMN:
            texts = [self._render(_chat_turns(value)) for value in values]
        elif self.prompts.chat:
            texts = [self._render(_user_turn(value)) for value in values]
        else:
            texts = [_raw_text(value) for value in values]
            return self._tokenize(texts, self.engine.encode_prompts,
                                  lambda text: self.engine.encode_prompt(prompt=text))
        return self._tokenize(
            texts, lambda many: self.tokenizer(many, add_special_tokens=False)["input_ids"],
            lambda text: self.tokenizer.encode(text, add_special_tokens=False))

    def fit(self, token_ids: list[int], max_tokens: int | None) -> list[int] | RowError:
        """Apply the long-prompt policy. A prompt is too long when it leaves no room to
        generate (>= max_model_len tokens); shorter prompts are returned unchanged (they may
        finish with "length"). "error": a `prompt_too_long` RowError. "truncate": the last
        tokens that leave room for `max_tokens` (None: for 1), always at least 1 token of
        prompt and 1 of room. An empty token list is an `empty_prompt` RowError."""
        num_tokens = len(token_ids)
        if num_tokens == 0:
            return RowError(EMPTY_PROMPT, "the prompt has no tokens")
        limit = self.max_model_len
        if num_tokens < limit:
            return token_ids
        if self.prompts.on_long_prompt == "truncate":
            room = min(max_tokens or 1, limit - 1)
            return token_ids[num_tokens - (limit - room):]
        return RowError(PROMPT_TOO_LONG,
                        f"{num_tokens} prompt tokens >= max_model_len {limit}, no room to "
                        "generate; shorten the prompt, raise --max-model-len or pass "
                        "--on-long-prompt truncate")

    def _render(self, turns: list[dict] | RowError) -> str | RowError:
        if isinstance(turns, RowError):
            return turns
        try:
            return self.tokenizer.apply_chat_template(turns, tokenize=False,
                                                      add_generation_prompt=True)
        except Exception as error:  # noqa: BLE001 - any template failure is this row's error
            return RowError(CHAT_TEMPLATE, f"{type(error).__name__}: {error}")

    @staticmethod
    def _tokenize(texts: Sequence[str | RowError], encode_many: Callable[[list[str]], list],
                  encode_one: Callable[[str], list[int]]) -> list[list[int] | RowError]:
        results: list[list[int] | RowError] = list(texts)
        good = [row for row, text in enumerate(texts) if not isinstance(text, RowError)]
        if not good:
            return results
        try:
            encoded = encode_many([texts[row] for row in good])
        except Exception:  # noqa: BLE001 - find the bad rows one by one below
            encoded = None
        for index, row in enumerate(good):
            if encoded is not None:
                results[row] = list(encoded[index])
                continue
            try:
                results[row] = list(encode_one(texts[row]))
            except Exception as error:  # noqa: BLE001 - this row's error
                results[row] = RowError(TOKENIZE, f"{type(error).__name__}: {error}")
        return results


def _raw_text(value: object) -> str | RowError:
    if value is None or (isinstance(value, str) and not value.strip()):
        return RowError(EMPTY_PROMPT, "the prompt is empty or null")
    if not isinstance(value, str):
        return RowError(NOT_TEXT, f"the prompt is a {type(value).__name__}, not text")
    return value


def _user_turn(value: object) -> list[dict] | RowError:
    text = _raw_text(value)
    return text if isinstance(text, RowError) else [{"role": "user", "content": text}]


def _chat_turns(value: object) -> list[dict] | RowError:
    """A `messages` cell as the list of turns the chat template gets (null struct fields, e.g.
    a `name` only some rows have, are dropped), or the RowError that makes it unusable."""
    if value is None or (isinstance(value, (list, tuple)) and not value):
        return RowError(EMPTY_PROMPT, "the messages list is empty or null")
    if not isinstance(value, (list, tuple)):
        return RowError(NOT_TEXT, f"messages is a {type(value).__name__}, not a list of turns")
    turns = []
    for number, turn in enumerate(value, start=1):
        if not isinstance(turn, dict):
            return RowError(BAD_MESSAGES, f"turn {number} is not a {{role, content}} object")
        role, content = turn.get("role"), turn.get("content")
        if not isinstance(role, str) or not role.strip():
            return RowError(BAD_MESSAGES, f"turn {number}: role must be a non-empty string, "
                                          f"got {role!r}")
        if not isinstance(content, str):
            return RowError(BAD_MESSAGES, f"turn {number}: content must be a string, "
                                          f"got {content!r}")
        turns.append({key: item for key, item in turn.items() if item is not None})
    return turns
