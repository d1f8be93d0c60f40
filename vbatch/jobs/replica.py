"""One replica: an engine that turns input record batches into output record batches.

Rows are streamed into the engine so it stays full across input-batch boundaries: up to
`max_in_flight` rows are queued at once, and an input batch is emitted (with its generation
columns appended, rows in input order) as soon as its last row finishes.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import pyarrow as pa

from vbatch.engine.llm_engine import LLMEngine
from vbatch.engine.sampling_params import SamplingParams
from vbatch.errors import InputError
from vbatch.io.schema import (FINISH_REASON, GENERATED_TEXT, MESSAGES_COLUMN,
                              NUM_GENERATED_TOKENS, NUM_PROMPT_TOKENS, build_output_batch)


@dataclass
class RowPrompts:
    """How to read prompts from a batch: the column, whether to chat-template raw text."""

    prompt_column: str
    id_column: str
    chat: bool


@dataclass
class _PendingBatch:
    batch: pa.RecordBatch
    results: list = field(default_factory=list)
    num_done: int = 0


@dataclass
class ReplicaCounters:
    """Running totals of what a replica has finished."""

    num_rows: int = 0
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0


class Replica:
    """Drives one `LLMEngine` over a stream of input batches (see module docstring)."""

    def __init__(self, engine: LLMEngine, sampling_params: SamplingParams, prompts: RowPrompts,
                 *, max_in_flight: int | None = None):
        self.engine = engine
        self.sampling_params = sampling_params
        self.prompts = prompts
        self.max_in_flight = max_in_flight or 2 * engine.config.max_num_seqs
        self.counters = ReplicaCounters()

    def process(self, batches: Iterable[pa.RecordBatch], on_progress=None
                ) -> Iterator[pa.RecordBatch]:
        """Yield one output batch per input batch, in completion order.

        `on_progress(num_rows, num_output_tokens)` is called with increments as rows finish.
        """
        pending: dict[int, _PendingBatch] = {}
        row_queue: Iterator = self._rows(batches, pending)
        exhausted = False
        engine = self.engine
        while True:
            while not exhausted and engine.num_unfinished_requests < self.max_in_flight:
                item = next(row_queue, None)
                if item is None:
                    exhausted = True
                    break
                request_id, token_ids, row_key = item
                try:
                    engine.add_request(request_id, token_ids, self.sampling_params,
                                       row_key=row_key)
                except ValueError as error:
                    raise InputError(f"row {row_key}: {error}") from None
            if not engine.has_unfinished_requests():
                break
            finished = engine.step()
            new_tokens = 0
            for output in finished:
                batch_index, row = map(int, output.request_id.split(":"))
                completion = output.outputs[0]
                entry = pending[batch_index]
                entry.results[row] = {
                    GENERATED_TEXT: completion.text, FINISH_REASON: completion.finish_reason,
                    NUM_PROMPT_TOKENS: len(output.prompt_token_ids),
                    NUM_GENERATED_TOKENS: len(completion.token_ids)}
                entry.num_done += 1
                new_tokens += len(completion.token_ids)
                self.counters.num_rows += 1
                self.counters.num_prompt_tokens += len(output.prompt_token_ids)
                self.counters.num_output_tokens += len(completion.token_ids)
                if entry.num_done == entry.batch.num_rows:
                    del pending[batch_index]
                    yield build_output_batch(entry.batch, entry.results)
            if finished and on_progress is not None:
                on_progress(len(finished), new_tokens)
        for batch_index in sorted(pending):   # batches of zero rows
            entry = pending.pop(batch_index)
            yield build_output_batch(entry.batch, entry.results)

    def _rows(self, batches: Iterable[pa.RecordBatch], pending: dict[int, _PendingBatch]):
        for batch_index, batch in enumerate(batches):
            pending[batch_index] = _PendingBatch(batch, [None] * batch.num_rows)
            keys = [str(k) for k in batch.column(self.prompts.id_column).to_pylist()]
            token_ids = self._encode(batch, keys)
            for row, (key, ids) in enumerate(zip(keys, token_ids)):
                yield f"{batch_index}:{row}", ids, key

    def _encode(self, batch: pa.RecordBatch, keys: list[str]) -> list[list[int]]:
        column = self.prompts.prompt_column
        values = batch.column(column).to_pylist()
        for key, value in zip(keys, values):
            if value is None or (isinstance(value, str) and not value.strip()) \
                    or (isinstance(value, list) and not value):
                raise InputError(f"row {key}: the prompt in column {column!r} is empty or null")
        if column == MESSAGES_COLUMN:
            return [self.engine.encode_prompt(messages=m) for m in values]
        if self.prompts.chat:
            return [self.engine.encode_prompt(messages=[{"role": "user", "content": text}])
                    for text in values]
        return self.engine.encode_prompts(values)
