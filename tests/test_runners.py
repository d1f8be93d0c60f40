"""Replicated jobs: the local runner (replica processes) and the Ray runner (Ray Data actors).

Proves, on one input directory that mixes JSON lines, CSV, a Parquet directory and a
`save_to_disk` dataset (keys derived for the files without an `id` column): one in-process
replica, 2 local replica processes and 2 Ray replica actors give the same greedy generations for
every row, each input row exactly once, with the same columns, `_SUCCESS`, `_manifest.json` and
`_run_summary.json`; `--preserve-order` writes rows in input order. One private Ray instance is
shared by the module.
"""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest

from vbatch.jobs.config import JobConfig
from vbatch.jobs.progress import ProgressReporter
from vbatch.jobs.runner import run_job

PROMPTS = ["The quick brown fox", "Paris is", "def add(a, b):", "Once upon a time",
           "Batch inference turns", "Berlin is the capital", "0123456789"]


def _rows(n, offset):
    return [{"prompt": PROMPTS[(i + offset) % len(PROMPTS)] + f" {i}", "ordinal": offset + i}
            for i in range(n)]


@pytest.fixture(scope="module")
def mixed_inputs(tmp_path_factory):
    """A directory of 27 rows: a.jsonl (7), b.csv (5), pq/ (2 Parquet files, own string ids,
    4 + 5), hf/ (a datasets.save_to_disk folder, 6)."""
    import datasets

    root = tmp_path_factory.mktemp("mixed") / "data"
    (root / "pq").mkdir(parents=True)
    (root / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(7, 0)))
    pa_csv.write_csv(pa.Table.from_pylist(_rows(5, 100)), root / "b.csv")
    for part, (n, offset) in enumerate([(4, 200), (5, 300)]):
        rows = [{"id": f"p{r['ordinal']}", **r} for r in _rows(n, offset)]
        pq.write_table(pa.Table.from_pylist(rows), root / "pq" / f"part-{part}.parquet")
    datasets.Dataset.from_list(_rows(6, 400)).save_to_disk(str(root / "hf"))
    return root


@pytest.fixture(scope="module")
def ray_instance():
    ray = pytest.importorskip("ray")
    # address="local": always a new private instance. Without it ray.init joins the cluster named
    # in /tmp/ray/ray_current_cluster, which a two-node test cluster (conftest) running on
    # another xdist worker writes.
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             logging_level="warning")
    yield ray
    ray.shutdown()


def _run(mixed_inputs, model, output, **overrides):
    config = JobConfig(input=str(mixed_inputs), model=str(model), output=str(output),
                       max_tokens=6, temperature=0.0, dtype="float32", batch_size=3,
                       max_num_seqs=4, rows_per_file=10, csv_infer_types=True,
                       **overrides).validate()
    stats = run_job(config, ProgressReporter(quiet=True))
    return stats, pq.read_table(output).to_pylist()


def _input_keys(mixed_inputs):
    from vbatch.io import inputs, reader
    files = inputs.resolve_input_files(str(mixed_inputs))
    batches = reader.read_batches(files, root=inputs.input_root(str(mixed_inputs)),
                                  scan=reader.scan_inputs(files, csv_infer_types=True))
    return [key for batch in batches for key in batch.column("id").to_pylist()]


def _check_job_dir(output, rows, *, runner, num_replicas):
    assert (output / "_SUCCESS").is_file()
    manifest = json.loads((output / "_manifest.json").read_text())
    assert manifest["counts"]["rows"] == len(rows)
    summary = json.loads((output / "_run_summary.json").read_text())
    assert summary["plan"]["runner"] == runner
    assert summary["plan"]["replicas"] == num_replicas == len(summary["replicas"])
    assert summary["counts"]["rows"] == len(rows)
    assert sum(r["num_rows"] for r in summary["replicas"]) == len(rows)
    return summary


def test_local_and_ray_replicas_match_one_replica(tmp_path, tiny_models, mixed_inputs,
                                                  ray_instance):
    model = tiny_models["llama-gqa-tied"]
    keys = _input_keys(mixed_inputs)
    assert len(keys) == 27 and len(set(keys)) == 27
    assert {"a.jsonl:0", "b.csv:4", "p300", "hf/data-00000-of-00001.arrow:5"} <= set(keys)

    one_stats, one = _run(mixed_inputs, model, tmp_path / "one", runner="local", replicas=1)
    _check_job_dir(tmp_path / "one", one, runner="local", num_replicas=1)
    assert one_stats.num_replicas == 1
    reference = {r["id"]: r for r in one}
    assert sorted(reference) == sorted(keys)                 # every row exactly once
    assert all(r["finish_reason"] in ("stop", "length") for r in one)

    local_stats, local = _run(mixed_inputs, model, tmp_path / "local", runner="local",
                              replicas=2, preserve_order=True)
    _check_job_dir(tmp_path / "local", local, runner="local", num_replicas=2)
    assert (local_stats.runner, local_stats.num_replicas) == ("local", 2)
    assert [r["id"] for r in local] == keys                  # input order, each row once
    assert {r["id"]: r for r in local} == reference          # same generations, same columns

    ray_stats, on_ray = _run(mixed_inputs, model, tmp_path / "ray", runner="ray", replicas=2,
                             preserve_order=True)
    summary = _check_job_dir(tmp_path / "ray", on_ray, runner="ray", num_replicas=2)
    assert (ray_stats.runner, ray_stats.num_replicas) == ("ray", 2)
    assert [r["id"] for r in on_ray] == keys
    assert {r["id"]: r for r in on_ray} == reference
    assert len({entry["pid"] for entry in summary["replicas"]}) == 2    # two actors
    assert pq.read_schema(tmp_path / "ray" / "part-00000.parquet").names == \
        pq.read_schema(tmp_path / "one" / "part-00000.parquet").names
    assert ray_instance.is_initialized()                     # a Ray it did not start stays up


def test_replica_error_reaches_the_driver_and_nothing_is_written(tmp_path, tiny_models,
                                                               mixed_inputs):
    """The replicas refuse tp=3 for a 4-head model: the driver re-raises the replica's
    ValueError (exit code 2 in the CLI), stops both replicas and writes nothing."""
    with pytest.raises(ValueError, match="valid sizes: 1, 2, 4"):
        _run(mixed_inputs, tiny_models["llama-gqa-tied"], tmp_path / "out", runner="local",
             replicas=2, tensor_parallel_size=3)
    assert not (tmp_path / "out").exists()


def test_batches_cross_process_queues_as_compact_ipc():
    """A 64-row slice of a 100k-row table travels as its own rows only (pickling a slice would
    ship all 100k: the driver's memory then grew with the dataset), and comes back equal."""
    from vbatch.jobs.local_runner import from_ipc, tag_batch, to_ipc, untag_batch

    table = pa.table({"id": [f"r{i}" for i in range(100_000)], "n": list(range(100_000))})
    batch = table.combine_chunks().to_batches(max_chunksize=64)[7]
    payload = to_ipc(tag_batch(batch, 7))
    assert len(payload) < 10_000
    seq, rows, back = untag_batch(from_ipc(payload))
    assert seq == 7 and back.equals(batch) and rows.tolist() == list(range(64))
