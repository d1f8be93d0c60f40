"""A request in flight: its tokens, its KV-cache blocks and its place in the schedule."""
from __future__ import annotations

import enum
from dataclasses import dataclass

from vbatch.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


class Sequence:
    """One prompt and its generated tokens.

    `token_ids` is prompt + generated so far. `num_computed_tokens` counts the leading tokens
    whose keys/values are in the KV cache (`block_table` lists their blocks); it drops back to 0
    when the sequence is preempted and its blocks are freed (recompute preemption).
    """

    def __init__(self, seq_id: int, request_id: str, prompt_token_ids: list[int],
                 sampling_params: SamplingParams, seed: int, row_key: str,
                 prompt: str | None = None):
        self.seq_id = seq_id
        self.request_id = request_id
        self.prompt = prompt
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.sampling_params = sampling_params
        self.seed = seed
        self.row_key = row_key
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.num_computed_tokens = 0
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_generated_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def generated_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def last_token_id(self) -> int:
        return self.token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)


@dataclass(slots=True)
class ScheduledSequence:
    """The slim, picklable slice of a Sequence that one model step needs on every worker.

    `token_ids` are the tokens to run this step (positions start at `start_position`);
    `block_table` covers every position up to start_position + len(token_ids). Sampling fields
    are only read on the sampling rank.
    """

    seq_id: int
    token_ids: list[int]
    start_position: int
    block_table: list[int]
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    seed: int
    row_key: str
    output_index: int
