"""n samples per input row (`--n`, a per-row `n` column): one output row per sample, committed
exactly once per input row.

Proves, without a model: `sample_index` is in the output schema only when asked for, right
after the input columns; `build_output_batch` repeats a row's columns for each of its samples
(an error row is one row, sample_index null); the part writer never splits one position's rows
between two parts (random group sizes against every rows-per-file) and its manifest counts input
rows, so `--resume`'s checks and counts hold; `OutputTally` drops every sample of a duplicated
row and counts prompt tokens once per row; duplicate-id counts are per input row.
With a tiny model: the replica samples n completions per row (per-row `n` too, n=0 an error
row), bounds the sequences in flight, and a row's samples do not depend on its batch.
End to end (`--n 4 --temperature 0.8 --seed 1`): 4 adjacent rows per input row, sample_index
0..3, samples that differ, the same samples for the first row alone, inside a batch of 50, with
2 replicas killed (SIGKILL) and resumed, every row exactly once; `prompt_prefills` counts each
row's prompt once.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import run_offline, vbatch_command, write_prompt_jsonl

from vbatch.io.commit_log import committed_parts
from vbatch.io.fingerprint import job_fingerprint
from vbatch.io.manifest import load_resume_state, part_counts
from vbatch.io.parts import ParquetPartWriter
from vbatch.io.positions import POSITION_COLUMN
from vbatch.io.schema import (
    OUTPUT_COLUMNS,
    SAMPLE_INDEX,
    OutputColumns,
    build_output_batch,
    count_input_rows,
    output_schema,
)
from vbatch.jobs.output_tally import OutputTally, count_ids

GENERATED = {"generated_text": "x", "finish_reason": "length", "num_prompt_tokens": 5,
             "num_generated_tokens": 2}
WITH_SAMPLES = OutputColumns(sample_index=True)


def _sample(index: int, text: str = "x", tokens: int = 2) -> dict:
    return {**GENERATED, SAMPLE_INDEX: index, "generated_text": text,
            "num_generated_tokens": tokens}


# --- schema and output batches -----------------------------------------------------------------

def test_sample_index_is_there_only_when_asked_for():
    assert OutputColumns.for_job(n=1, logprobs=None, prompt_logprobs=None,
                                 input_names=["prompt"]) == OutputColumns()
    assert OutputColumns.for_job(n=4, logprobs=None, prompt_logprobs=None,
                                 input_names=["prompt"]).sample_index
    assert OutputColumns.for_job(n=1, logprobs=None, prompt_logprobs=None,
                                 input_names=["prompt", "n"]).sample_index   # a per-row n
    schema = pa.schema([("id", pa.string()), ("prompt", pa.string())])
    assert output_schema(schema).names == ["id", "prompt", *OUTPUT_COLUMNS]
    with_samples = output_schema(schema, WITH_SAMPLES)
    assert with_samples.names == ["id", "prompt", SAMPLE_INDEX, *OUTPUT_COLUMNS]
    assert with_samples.field(SAMPLE_INDEX).type == pa.int32()


def test_an_input_column_named_sample_index_is_refused():
    from vbatch.errors import InputError
    with pytest.raises(InputError, match="'sample_index' has the name of a column vbatch"):
        output_schema(pa.schema([("prompt", pa.string()), (SAMPLE_INDEX, pa.int64())]))


def test_samples_become_adjacent_rows_with_the_input_columns_repeated():
    batch = pa.record_batch({"id": ["a", "b", "c"], "prompt": ["p", "q", "r"],
                             POSITION_COLUMN: pa.array([7, 8, 9], pa.int64())})
    results = [[_sample(0, "a0"), _sample(1, "a1"), _sample(2, "a2")],
               {"error": "empty_prompt: the prompt is empty or null"},
               [_sample(0, "c0")]]
    out = build_output_batch(batch, results, WITH_SAMPLES)
    assert out.schema.equals(output_schema(batch.schema, WITH_SAMPLES))
    rows = out.to_pylist()
    assert [(r["id"], r["prompt"], r[POSITION_COLUMN], r[SAMPLE_INDEX], r["generated_text"])
            for r in rows] == [("a", "p", 7, 0, "a0"), ("a", "p", 7, 1, "a1"),
                               ("a", "p", 7, 2, "a2"), ("b", "q", 8, None, None),
                               ("c", "r", 9, 0, "c0")]
    assert rows[3]["error"].startswith("empty_prompt") and rows[3]["finish_reason"] is None
    assert count_input_rows(out) == 3
    # a list without explicit indices numbers its samples in order
    plain = [{k: v for k, v in s.items() if k != SAMPLE_INDEX} for s in results[0]]
    again = build_output_batch(batch.slice(0, 1), [plain], WITH_SAMPLES)
    assert again.column(SAMPLE_INDEX).to_pylist() == [0, 1, 2]


def test_samples_need_the_sample_index_column_and_errors_cannot_set_it():
    batch = pa.record_batch({"prompt": ["p"]})
    with pytest.raises(ValueError, match="2 samples but no sample_index column"):
        build_output_batch(batch, [[_sample(0), _sample(1)]])
    with pytest.raises(ValueError, match="an error row must not set 'sample_index'"):
        build_output_batch(batch, [{"error": "x: y", SAMPLE_INDEX: 0}], WITH_SAMPLES)


# --- the part writer: a position's rows stay in one part ---------------------------------------

def _grouped_batches(rng: random.Random, num_groups: int, max_n: int) -> list[pa.RecordBatch]:
    """Output batches of whole groups (one group = the samples of one position)."""
    batches, position = [], 0
    while position < num_groups:
        size = min(rng.randint(1, 5), num_groups - position)
        results, positions = [], []
        for offset in range(size):
            n = rng.randint(1, max_n)
            results.append([_sample(i, f"{position + offset}:{i}") for i in range(n)])
            positions.append(position + offset)
        batch = pa.record_batch({"prompt": [f"p{p}" for p in positions],
                                 POSITION_COLUMN: pa.array(positions, pa.int64())})
        batches.append(build_output_batch(batch, results, WITH_SAMPLES))
        position += size
    return batches


@pytest.mark.parametrize("rows_per_file", [1, 3, 4, 10])
def test_the_part_writer_never_splits_a_position(rows_per_file, tmp_path):
    rng = random.Random(rows_per_file)
    batches = _grouped_batches(rng, num_groups=40, max_n=7)
    fingerprint = job_fingerprint(files=[], model={"source": "m"}, generation={"n": 4},
                                  vbatch_version="0")
    writer = ParquetPartWriter(tmp_path, rows_per_file=rows_per_file,
                               job_info={"fingerprint": fingerprint})
    for batch in batches:
        writer.write(batch)
    writer.commit({"counts": {}})
    manifest = json.loads((tmp_path / "_manifest.json").read_text())
    seen: set[str] = set()
    total = 0
    for part in manifest["output"]["part_files"]:
        rows = pq.read_table(tmp_path / part["name"]).to_pylist()
        groups = [row["prompt"] for row in rows]
        distinct = list(dict.fromkeys(groups))
        assert not seen & set(distinct), f"a position split across parts in {part['name']}"
        seen |= set(distinct)
        # whole groups, in order: each group's sample indices are 0..n-1
        for prompt in distinct:
            indices = [row[SAMPLE_INDEX] for row in rows if row["prompt"] == prompt]
            assert indices == list(range(len(indices)))
        assert len(rows) <= rows_per_file or len(distinct) == 1   # over only for one big row
        assert part["num_rows"] == len(distinct)                # input rows (the positions)
        assert part.get("num_output_rows", part["num_rows"]) == len(rows)
        total += len(rows)
    assert len(seen) == 40 and total == sum(batch.num_rows for batch in batches)
    assert manifest["output"]["num_rows"] == 40
    state = load_resume_state(tmp_path, fingerprint, force=False)   # the manifest checks pass
    assert len(state.committed) == state.num_committed_rows == 40
    assert state.num_output_rows == total


# --- the tally and the per-part counts ---------------------------------------------------------

def _job_batch(positions: list[int], n: int) -> pa.RecordBatch:
    batch = pa.record_batch({"id": [f"r{p}" for p in positions],
                             "prompt": [f"p{p}" for p in positions],
                             POSITION_COLUMN: pa.array(positions, pa.int64())})
    return build_output_batch(batch, [[_sample(i, tokens=3) for i in range(n)]
                                      for _ in positions], WITH_SAMPLES)


def test_the_tally_drops_every_sample_of_a_duplicated_row():
    tally = OutputTally()
    first = tally.accept(_job_batch([0, 1, 2], n=4), "id")
    assert first.num_rows == 12
    assert tally.accept(_job_batch([0, 1, 2], n=4), "id").num_rows == 0   # a retried batch
    mixed = tally.accept(_job_batch([2, 3], n=4), "id")                # one old, one new
    assert mixed.column(POSITION_COLUMN).to_pylist() == [3] * 4
    assert (tally.num_rows, tally.num_output_rows) == (4, 16)
    assert tally.num_prompt_tokens == 4 * 5          # once per input row
    assert tally.num_output_tokens == 16 * 3         # every sample's
    assert tally.num_duplicate_rows == 16
    errors = build_output_batch(pa.record_batch({"id": ["e"], "prompt": [""],
                                                 POSITION_COLUMN: pa.array([9], pa.int64())}),
                                [{"error": "empty_prompt: e"}], WITH_SAMPLES)
    tally.accept(errors, "id")
    assert (tally.num_rows, tally.num_output_rows, tally.num_error_rows) == (5, 17, 1)
    assert tally.first_error == "row e: empty_prompt: e"


def test_part_counts_and_duplicate_ids_count_input_rows(tmp_path):
    table = pa.Table.from_batches([_job_batch([0, 1], n=3)]).drop_columns([POSITION_COLUMN])
    assert part_counts(table) == {"num_error_rows": 0, "num_prompt_tokens": 10,
                                  "num_output_tokens": 18}
    pq.write_table(table, tmp_path / "part-00000.parquet")
    counts = count_ids([tmp_path / "part-00000.parquet"], "id")
    assert (counts.duplicate_ids, counts.null_ids) == (0, 0)     # 3 samples share an id


# --- the replica, with a tiny model ------------------------------------------------------------

class _CountingEngine:
    """An engine proxy that records the most sequences (samples) ever in flight."""

    def __init__(self, engine):
        self._engine = engine
        self._n: dict[str, int] = {}
        self.most_in_flight = 0

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def add_request(self, request_id, token_ids, params, **kwargs):
        self._engine.add_request(request_id, token_ids, params, **kwargs)
        self._n[request_id] = params.n
        self.most_in_flight = max(self.most_in_flight, sum(self._n.values()))

    def step(self):
        finished = self._engine.step()
        for output in finished:
            assert len(output.outputs) == self._n.pop(output.request_id)
        return finished


@pytest.fixture(scope="module")
def engine(tiny_models):
    from vbatch.engine.config import EngineConfig
    from vbatch.engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineConfig(model=str(tiny_models["llama-gqa-untied"]), dtype="float32",
                                    max_model_len=128, kv_cache_memory_gb=0.05, max_num_seqs=8))
    yield engine
    engine.shutdown()


def _replica_rows(engine, table: pa.Table, *, batch_size: int, n: int = 3,
                  max_in_flight: int = 6):
    from vbatch.engine.sampling_params import SamplingParams
    from vbatch.jobs.replica import Replica
    from vbatch.jobs.row_prompts import RowPrompts

    params = SamplingParams(n=n, temperature=0.8, seed=1, max_tokens=5, ignore_eos=True)
    counting = _CountingEngine(engine)
    replica = Replica(counting, params, RowPrompts("prompt", "id", chat=False),
                      max_in_flight=max_in_flight)
    outputs = list(replica.process(table.to_batches(max_chunksize=batch_size)))
    rows = [row for batch in outputs for row in batch.to_pylist()]
    return rows, replica.counters, counting.most_in_flight


def test_the_replica_samples_each_row_and_bounds_the_sequences_in_flight(engine):
    prompts = [f"row {i} says hello" for i in range(8)]
    n_column = [None, 2, None, 0, None, None, 5, None]      # per-row n; 0 is refused
    positions = pa.array(range(8), pa.int64())
    table = pa.table({"id": [f"r{i}" for i in range(8)], "prompt": prompts, "n": n_column,
                      POSITION_COLUMN: positions})
    rows, counters, most = _replica_rows(engine, table, batch_size=3)
    by_id: dict[str, list[dict]] = {}
    for row in rows:
        by_id.setdefault(row["id"], []).append(row)
    expected_n = {f"r{i}": 3 if n is None else n for i, n in enumerate(n_column)}
    for key, samples in by_id.items():
        if expected_n[key] == 0:
            assert len(samples) == 1 and samples[0][SAMPLE_INDEX] is None
            assert samples[0]["error"] == "bad_sampling: n must be >= 1, got 0"
            continue
        assert [s[SAMPLE_INDEX] for s in samples] == list(range(expected_n[key]))
        assert len({s["generated_text"] for s in samples}) > 1, samples   # they differ
        assert all(s["num_generated_tokens"] == 5 for s in samples)
    # adjacent: each id's rows form one run
    ids = [row["id"] for row in rows]
    assert all(ids.index(key) + len(by_id[key]) - 1 == len(ids) - 1 - ids[::-1].index(key)
               for key in by_id)
    assert (counters.num_rows, counters.num_error_rows) == (8, 1)
    assert counters.num_output_rows == len(rows) == sum(max(n, 1) for n in expected_n.values())
    assert counters.num_output_tokens == 5 * (len(rows) - 1)
    assert counters.num_prompt_prefills == 7             # once per generated row, whatever n
    # at most max_in_flight sequences, plus one row's n - 1 admitted under the bound
    assert 6 <= most <= 6 + 5 - 1
    # the same samples one row at a time, and in one batch of all rows
    alone, _, _ = _replica_rows(engine, table, batch_size=1, max_in_flight=1)
    together, _, _ = _replica_rows(engine, table, batch_size=8, max_in_flight=64)

    def texts(found):
        return sorted((r["id"], r[SAMPLE_INDEX] or 0, r["generated_text"] or "") for r in found)
    assert texts(alone) == texts(rows) == texts(together)


# --- end to end: --n 4 --------------------------------------------------------------------------

NUM_ROWS = 50
N = 4


def _n_job(source: Path, model: Path, output: Path, *extra: str) -> list[str]:
    return [*vbatch_command(), "run", str(source), "--model", str(model), "--output", str(output),
            "--n", str(N), "--temperature", "0.8", "--seed", "1", "--max-tokens", "6",
            "--ignore-eos", "--dtype", "float32", "--max-num-seqs", "8", *extra]


def _samples_by_position(output: Path) -> list[tuple[str, ...]]:
    """Each input row's sample texts, in input order, checking exactly-once and adjacency."""
    rows = pq.read_table(output).to_pylist()
    runs: list[list[dict]] = []
    for row in rows:
        if runs and runs[-1][0]["prompt"] == row["prompt"]:
            runs[-1].append(row)
        else:
            runs.append([row])
    prompts = [run[0]["prompt"] for run in runs]
    assert len(prompts) == len(set(prompts)), "a row's samples are not adjacent or written twice"
    for run in runs:
        assert [row[SAMPLE_INDEX] for row in run] == list(range(N))
        assert len({row["id"] for row in run}) == 1
    runs.sort(key=lambda run: int(run[0]["prompt"].split()[-1]))   # "<prompt> <row>"
    return [tuple(row["generated_text"] for row in run) for run in runs]


@pytest.fixture(scope="module")
def n_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("n-samples")
    many = write_prompt_jsonl(root / "many.jsonl", NUM_ROWS)
    alone = root / "alone.jsonl"
    alone.write_text(many.read_text().splitlines()[0] + "\n")
    return many, alone


@pytest.fixture(scope="module")
def in_one_batch(n_inputs, tiny_models, tmp_path_factory):
    output = tmp_path_factory.mktemp("n-batch") / "out"
    result = run_offline(_n_job(n_inputs[0], tiny_models["llama-gqa-untied"], output,
                                "--batch-size", str(NUM_ROWS)))
    assert result.returncode == 0, result.stderr
    return output


def test_n_samples_per_row_are_rows_of_their_own(in_one_batch):
    samples = _samples_by_position(in_one_batch)
    assert len(samples) == NUM_ROWS
    assert all(len(set(texts)) > 1 for texts in samples), "the samples of a row must differ"
    summary = json.loads((in_one_batch / "_run_summary.json").read_text())["counts"]
    assert summary["rows"] == NUM_ROWS and summary["output_rows"] == NUM_ROWS * N
    assert summary["prompt_prefills"] == NUM_ROWS          # each prompt prefilled once
    manifest = json.loads((in_one_batch / "_manifest.json").read_text())
    assert manifest["counts"]["rows"] == NUM_ROWS
    assert manifest["counts"]["output_rows"] == NUM_ROWS * N
    assert manifest["output"]["num_rows"] == NUM_ROWS
    table = pq.read_table(in_one_batch)
    assert table.schema.names.index(SAMPLE_INDEX) == table.schema.names.index("prompt") + 1
    assert table.schema.field(SAMPLE_INDEX).type == pa.int32()
    assert summary["prompt_tokens"] == sum(r["num_prompt_tokens"] for r in table.to_pylist()
                                           if r[SAMPLE_INDEX] == 0)


def test_a_row_alone_samples_as_inside_a_batch(n_inputs, in_one_batch, tiny_models, tmp_path):
    output = tmp_path / "alone"
    result = run_offline(_n_job(n_inputs[1], tiny_models["llama-gqa-untied"], output))
    assert result.returncode == 0, result.stderr
    assert _samples_by_position(output) == _samples_by_position(in_one_batch)[:1]


def _num_committed_parts(output: Path) -> int:
    try:
        return len(committed_parts(output))
    except (OSError, ValueError):
        return 0


def test_two_replicas_killed_and_resumed_sample_the_same(n_inputs, in_one_batch, tiny_models,
                                                         tmp_path):
    output = tmp_path / "out"
    args = _n_job(n_inputs[0], tiny_models["llama-gqa-untied"], output, "--replicas", "2",
                  "--runner", "local", "--batch-size", "4", "--rows-per-file", "6")
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 180
    while _num_committed_parts(output) < 2 and process.poll() is None:
        assert time.monotonic() < deadline, "no part was committed"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    assert not (output / "_SUCCESS").exists(), "the job finished before it could be killed"
    committed = committed_parts(output)
    for part in committed:           # whole rows only: every committed row has its 4 samples
        rows = pq.read_table(output / part["name"]).to_pylist()
        assert len(rows) == N * part["num_rows"]
    # resumed in one process: the replica count is not part of the job (fingerprint)
    at = args.index("--replicas")
    resumed = run_offline(args[:at] + args[at + 4:] + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert _samples_by_position(output) == _samples_by_position(in_one_batch)
    counts = json.loads((output / "_run_summary.json").read_text())["counts"]
    assert counts["rows"] == NUM_ROWS and counts["output_rows"] == NUM_ROWS * N
    assert counts["resumed_rows"] == sum(part["num_rows"] for part in committed) > 0
    assert counts["this_run"]["rows"] == NUM_ROWS - counts["resumed_rows"]
    assert counts["this_run"]["output_rows"] == N * counts["this_run"]["rows"]
    assert counts["prompt_prefills"] == counts["this_run"]["rows"]
    assert counts["duplicate_ids"] == 0
