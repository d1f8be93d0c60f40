"""One replica: an engine that turns input record batches into output record batches.

Rows are streamed into the engine so it stays full across input-batch boundaries: up to
`max_in_flight` sequences (a row sampled n times counts n) are queued at once. Finished rows
come out as they finish, not when their whole input batch has: `process` yields small output
batches (input columns + generation columns) of the rows finished since the last one, at most
every `emit_interval_s` seconds or `emit_rows` rows (and at once when the engine has nothing
left to step), one output batch per input batch that has finished rows, in finish order. A row
sampled n > 1 times becomes n adjacent output rows, `sample_index` 0..n-1, always in the same
output batch (io/schema.py), so they are written and committed together.

A row that cannot be generated (see `row_prompts`, `row_sampling`) never reaches the engine: it
finishes at once as an error row (`error` set, generation columns null), so one bad row never
fails the job and every input row appears in the output exactly once.

OpenAI batch rows (io/openai_batch.py) are translated by `jobs/openai_rows.py` instead: each
is one output row whatever its n, its response body in the `response` column.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import pyarrow as pa

from vbatch.engine import structured_output
from vbatch.engine.llm_engine import LLMEngine
from vbatch.engine.outputs import RequestOutput
from vbatch.engine.sampling_params import SamplingParams
from vbatch.io.positions import POSITION_COLUMN
from vbatch.io.schema import (
    CUMULATIVE_LOGPROB,
    ERROR,
    FINISH_REASON,
    GENERATED_TEXT,
    LOGPROBS,
    NUM_GENERATED_TOKENS,
    NUM_PROMPT_TOKENS,
    PROMPT_LOGPROBS,
    SAMPLE_INDEX,
    OutputColumns,
    build_output_batch,
)
from vbatch.jobs.openai_rows import OpenAIRequest, OpenAIRows
from vbatch.jobs.row_errors import BAD_STRUCTURED_OUTPUT, REJECTED, RowError
from vbatch.jobs.row_prompts import PromptEncoder, RowPrompts
from vbatch.jobs.row_sampling import RowSampling

__all__ = ["Replica", "ReplicaCounters", "RowPrompts"]


#: What the engine raises from `add_request` for a structured-output spec that does not
#: compile (a ValueError; looked up by name so a missing class degrades to `rejected`).
_STRUCTURED_OUTPUT_ERROR: type[Exception] | None = getattr(structured_output,
                                                            "StructuredOutputError", None)


@dataclass
class _PendingBatch:
    """An input batch in the replica: its finished rows not yet emitted (finish order)."""

    batch: pa.RecordBatch
    columns: OutputColumns
    ready_rows: list[int] = field(default_factory=list)
    ready_results: list = field(default_factory=list)
    num_done: int = 0


@dataclass
class _Row:
    """One input row on its way to the engine: token ids and params, or why it cannot go."""

    batch_index: int
    row: int
    key: str
    sample_key: str
    token_ids: list[int] | None
    params: SamplingParams | None
    error: RowError | None
    openai: OpenAIRequest | None = None

    @property
    def request_id(self) -> str:
        return f"{self.batch_index}:{self.row}"


def _sample_keys(batch: pa.RecordBatch, ids: list[str]) -> list[str]:
    """The key of each row's random draws: its input position (io/positions.py) when the batch
    carries positions, as every job's batches do, so two rows with the same id (or a null id)
    still draw independently, and a row draws the same wherever and with whomever it runs;
    else (batches from other callers) its id."""
    if POSITION_COLUMN not in batch.schema.names:
        return ids
    return [f"position:{position}" for position in batch.column(POSITION_COLUMN).to_pylist()]


@dataclass
class ReplicaCounters:
    """Running totals of what a replica has finished. `num_rows` counts every finished input
    row, error rows included; `num_output_rows` the output rows (one per sample of a generated
    row, one per error row); `num_error_rows` the rows written with `error` set (the first one
    as "row <key>: <error>" in `first_error`); `num_truncated_rows` the prompts cut by
    `--on-long-prompt truncate`. Token counts cover generated rows only: prompt tokens once
    per row, output tokens of every sample. `num_prompt_prefills` / `num_prefill_tokens` are
    the engine's own counters (prompts prefilled from scratch, once per row whatever its n;
    tokens prefilled)."""

    num_rows: int = 0
    num_output_rows: int = 0
    num_error_rows: int = 0
    num_truncated_rows: int = 0
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_prompt_prefills: int = 0
    num_prefill_tokens: int = 0
    first_error: str | None = None


ProgressCallback = Callable[[int, int, int], None]

#: What a batch source may yield instead of a batch to say "none ready yet": the replica then
#: steps its engine instead of waiting (a source fed by another process must not block while
#: the engine holds rows, or those rows never finish).
NO_BATCH_YET = object()

#: What `Replica._rows` yields right before it asks its source for the next batch.
_ASKING_SOURCE = object()

#: How often, at most, a replica hands out the rows finished since last time (also bounded
#: by rows: `Replica.process`'s `emit_rows`).
DEFAULT_EMIT_INTERVAL_S = 0.5


class Replica:
    """Drives one `LLMEngine` over a stream of input batches (see module docstring).

    `sampling_params` are the job's; per-row sampling columns override them row by row.
    The optional output columns follow from them and each batch's columns
    (`OutputColumns.for_job`, the same rule the job's output schema uses).
    Raises VBatchUsageError when the prompts need a chat template the tokenizer lacks.
    With `openai` the batches are OpenAI batch rows, translated (prompts and params) by it.
    """

    def __init__(self, engine: LLMEngine, sampling_params: SamplingParams, prompts: RowPrompts,
                 *, max_in_flight: int | None = None, openai: OpenAIRows | None = None):
        self.engine = engine
        self.sampling_params = sampling_params
        self.prompts = prompts
        self.openai = openai
        self._openai_requests: dict[str, OpenAIRequest] = {}
        self.encoder = PromptEncoder(engine, prompts)
        self.sampling = RowSampling(sampling_params)
        self.max_in_flight = max_in_flight or 2 * engine.config.max_num_seqs
        self.counters = ReplicaCounters()
        self._in_flight: dict[str, int] = {}    # request id -> its sequences (n)
        self._num_in_flight = 0
        self._engine_counts_at_start = self._engine_counts()

    def output_columns(self, schema: pa.Schema) -> OutputColumns:
        """The optional output columns of batches with input schema `schema`."""
        params = self.sampling_params
        return OutputColumns.for_job(n=params.n, logprobs=params.logprobs,
                                     prompt_logprobs=params.prompt_logprobs,
                                     input_names=schema.names,
                                     openai_requests=self.openai is not None)

    def process(self, batches: Iterable[pa.RecordBatch],
                on_progress: ProgressCallback | None = None, *,
                emit_interval_s: float = DEFAULT_EMIT_INTERVAL_S, emit_rows: int | None = None,
                idle_batches: bool = False) -> Iterator[pa.RecordBatch]:
        """Yield the finished rows as output batches (see module docstring): at most every
        `emit_interval_s` seconds or once `emit_rows` output rows (default: `max_in_flight`)
        are ready, at once when the engine is idle, and the rest at the end. `batches` may
        yield `NO_BATCH_YET` (see there) between batches; batches of zero rows give nothing.
        With `idle_batches`, an interval that finished nothing yields a batch of zero rows and
        no columns (so the caller can act on time while long rows generate).

        `on_progress(num_rows, num_output_tokens, num_error_rows)` is called with increments
        as rows finish (error rows count in `num_rows` too).
        """
        ready = _ReadyRows(emit_interval_s, emit_rows or self.max_in_flight)
        pending: dict[int, _PendingBatch] = {}
        row_queue: Iterator[_Row] = self._rows(batches, pending)
        exhausted = False
        engine = self.engine
        while True:
            num_errors = 0
            while not exhausted and self._num_in_flight < self.max_in_flight:
                item = next(row_queue, None)
                if item is None:
                    exhausted = True
                    break
                if item is NO_BATCH_YET:
                    break
                if item is _ASKING_SOURCE:
                    # A source fed by another process may block now: rows finished while
                    # the engine is idle must be out first (nothing else would send them).
                    if ready.has_rows and not engine.has_unfinished_requests():
                        yield from ready.take()
                    continue
                if item.error is None:
                    try:
                        engine.add_request(item.request_id, item.token_ids, item.params,
                                           row_key=item.sample_key,
                                           prompt=item.openai and item.openai.prompt)
                        if item.openai is not None:
                            self._openai_requests[item.request_id] = item.openai
                        self._in_flight[item.request_id] = item.params.n
                        self._num_in_flight += item.params.n
                        continue
                    except ValueError as refused:
                        item.error = _refusal(refused)
                num_errors += 1
                self._finish(pending, ready, item.batch_index, item.row,
                             self._error_result(item))
            if num_errors and on_progress is not None:
                on_progress(num_errors, 0, num_errors)
            if not engine.has_unfinished_requests():
                # Nothing finishes before more input arrives: hand out what is ready now.
                yield from ready.take()
                if exhausted:                           # so every row was queued
                    break
                continue             # none ready yet and nothing to step: ask the source again
            finished = engine.step()
            self._read_engine_counters()
            new_tokens = 0
            for output in finished:
                batch_index, row = map(int, output.request_id.split(":"))
                self._num_in_flight -= self._in_flight.pop(output.request_id, 0)
                openai = self._openai_requests.pop(output.request_id, None)
                if openai is not None:
                    samples = self._openai_result(openai, output)
                    new_tokens += samples[NUM_GENERATED_TOKENS]
                else:
                    samples = self._samples(output, pending[batch_index].columns)
                    new_tokens += sum(sample[NUM_GENERATED_TOKENS] for sample in samples)
                self._finish(pending, ready, batch_index, row, samples)
            if finished and on_progress is not None:
                on_progress(len(finished), new_tokens, 0)
            if ready.is_due():
                yield from ready.take()
                if idle_batches and not ready.took_rows:
                    yield pa.RecordBatch.from_pydict({})
        yield from ready.take()

    def _engine_counts(self) -> tuple[int, int]:
        return (getattr(self.engine, "num_prompt_prefills", 0),
                getattr(self.engine, "num_prefill_tokens", 0))

    def _read_engine_counters(self) -> None:
        """The engine's prefill counters, since this replica started driving it."""
        (prefills, tokens), (prefills_0, tokens_0) = (self._engine_counts(),
                                                      self._engine_counts_at_start)
        self.counters.num_prompt_prefills = prefills - prefills_0
        self.counters.num_prefill_tokens = tokens - tokens_0

    def _samples(self, output: RequestOutput, columns: OutputColumns) -> list[dict]:
        """One result per completion of a finished request (by sample index); counts tokens."""
        num_prompt = len(output.prompt_token_ids)
        self.counters.num_prompt_tokens += num_prompt
        samples = []
        for completion in sorted(output.outputs, key=lambda c: c.index):
            num_generated = len(completion.token_ids)
            self.counters.num_output_tokens += num_generated
            sample = {SAMPLE_INDEX: completion.index, GENERATED_TEXT: completion.text,
                      FINISH_REASON: completion.finish_reason,
                      NUM_PROMPT_TOKENS: num_prompt, NUM_GENERATED_TOKENS: num_generated}
            if columns.logprobs:
                sample[CUMULATIVE_LOGPROB] = completion.cumulative_logprob
                sample[LOGPROBS] = completion.token_logprobs
            if columns.prompt_logprobs:
                sample[PROMPT_LOGPROBS] = output.prompt_token_logprobs
            samples.append(sample)
        return samples

    def _openai_result(self, request: OpenAIRequest, output: RequestOutput) -> dict:
        """The one output row of a finished OpenAI batch request; counts its tokens."""
        result = self.openai.result(request, output)
        self.counters.num_prompt_tokens += result[NUM_PROMPT_TOKENS]
        self.counters.num_output_tokens += result[NUM_GENERATED_TOKENS]
        return result

    def _finish(self, pending: dict[int, _PendingBatch], ready: _ReadyRows, batch_index: int,
                row: int, result: dict | list[dict]) -> None:
        """Record one finished row (an error row's result, or its samples' results) as ready
        to be emitted; its batch leaves `pending` with its last row."""
        entry = pending[batch_index]
        num_output_rows = 1 if isinstance(result, dict) else len(result)
        ready.add(batch_index, entry, row, result, num_output_rows)
        entry.num_done += 1
        self.counters.num_rows += 1
        self.counters.num_output_rows += num_output_rows
        if entry.num_done == entry.batch.num_rows:
            del pending[batch_index]

    def _error_result(self, item: _Row) -> dict:
        text = str(item.error)
        self.counters.num_error_rows += 1
        if self.counters.first_error is None:
            self.counters.first_error = f"row {item.key}: {text}"
        return {ERROR: text}

    def _rows(self, batches: Iterable[pa.RecordBatch],
              pending: dict[int, _PendingBatch]) -> Iterator[_Row]:
        batch_index = -1
        source = iter(batches)
        while True:
            yield _ASKING_SOURCE
            batch = next(source, None)
            if batch is None:
                return
            if batch is NO_BATCH_YET:
                yield NO_BATCH_YET
                continue
            if not batch.num_rows:
                continue
            batch_index += 1
            pending[batch_index] = _PendingBatch(batch, self.output_columns(batch.schema))
            keys = [str(k) for k in batch.column(self.prompts.id_column).to_pylist()]
            sample_keys = _sample_keys(batch, keys)
            if self.openai is not None:
                for row, request in enumerate(self.openai.for_batch(batch)):
                    if isinstance(request, RowError):
                        yield _Row(batch_index, row, keys[row], sample_keys[row], None, None,
                                   request)
                    else:
                        yield _Row(batch_index, row, keys[row], sample_keys[row],
                                   request.token_ids, request.params, None, request)
                continue
            encoded = self.encoder.encode(batch)
            params = self.sampling.for_batch(batch)
            for row, (key, token_ids, row_params) in enumerate(zip(keys, encoded, params)):
                sample_key = sample_keys[row]
                error = next((x for x in (token_ids, row_params) if isinstance(x, RowError)),
                             None)
                if error is None:
                    fitted = self.encoder.fit(token_ids, row_params.max_tokens)
                    if isinstance(fitted, RowError):
                        error = fitted
                    elif len(fitted) < len(token_ids):
                        self.counters.num_truncated_rows += 1
                    token_ids = fitted
                if error is not None:
                    yield _Row(batch_index, row, key, sample_key, None, None, error)
                else:
                    yield _Row(batch_index, row, key, sample_key, token_ids, row_params, None)


class _ReadyRows:
    """Finished rows not yet emitted, by input batch (first finished first), and when the next
    emission is due: `interval_s` after the last one, or once `max_rows` output rows wait."""

    def __init__(self, interval_s: float, max_rows: int):
        self.interval_s, self.max_rows = interval_s, max_rows
        self._entries: dict[int, _PendingBatch] = {}
        self._num_rows = 0
        self._last = time.monotonic()
        self.took_rows = False            # whether the last `take` emitted anything

    def add(self, batch_index: int, entry: _PendingBatch, row: int, result: dict | list[dict],
            num_output_rows: int) -> None:
        """Record row `row` of input batch `batch_index` (`entry`) as finished."""
        entry.ready_rows.append(row)
        entry.ready_results.append(result)
        self._entries.setdefault(batch_index, entry)
        self._num_rows += num_output_rows

    @property
    def has_rows(self) -> bool:
        """Whether any finished row waits to be emitted."""
        return bool(self._entries)

    def is_due(self) -> bool:
        """Whether an emission is due now."""
        return (self._num_rows >= self.max_rows
                or time.monotonic() - self._last >= self.interval_s)

    def take(self) -> Iterator[pa.RecordBatch]:
        """The ready rows as output batches, one per input batch, rows in finish order."""
        entries, self._entries = self._entries, {}
        self.took_rows = bool(entries)
        self._num_rows = 0
        self._last = time.monotonic()
        for entry in entries.values():
            rows, results = entry.ready_rows, entry.ready_results
            entry.ready_rows, entry.ready_results = [], []
            yield build_output_batch(entry.batch.take(pa.array(rows, pa.int64())), results,
                                     entry.columns)


def _refusal(refused: ValueError) -> RowError:
    """The row error of a request `add_request` refused: `bad_structured_output` for a
    structured-output spec that does not compile, else `rejected`."""
    if _STRUCTURED_OUTPUT_ERROR is not None and isinstance(refused, _STRUCTURED_OUTPUT_ERROR):
        return RowError(BAD_STRUCTURED_OUTPUT, str(refused))
    return RowError(REJECTED, str(refused))
