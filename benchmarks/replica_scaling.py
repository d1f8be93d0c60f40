"""Replica scaling on the CPU, and memory that stays flat however many rows a job has.

Part 1, scaling: the same job through the real command line with 1 and with 2 replicas
(`--runner`, default local): `--num-rows` prompts, `--max-tokens` new tokens per row (EOS
ignored, so every row costs the same), greedy, float32, a tiny random LLaMA built here (the
tests' fixture; `--model` takes any other, e.g. `smollm2`). Each run is timed from outside
(whole process: start-up, model loads, generation, writing); the generation-only time comes
from the job's `_run_summary.json`. Reported: output tok/s over the whole run and over the
generation time, the 2-replica / 1-replica ratio of each, peak RSS of the process tree, and
whether both runs wrote identical rows. On 2 cores one replica already uses both (torch
threads); two replicas get one core each, so the gain is what one engine leaves unused (its
Python scheduling between steps), largest for a tiny model.

Part 2, flat memory: `--memory-rows` (default 100,000) tiny rows (`--max-tokens 1`) and a tenth
of them through 2 replicas, peak RSS of the whole process tree of each. Memory is bounded by the
batches in flight, so both peaks should be about equal.

Run from the repository root after `pip install -e .`:

    python benchmarks/replica_scaling.py                 # ~4 min on 2 cores
    python benchmarks/replica_scaling.py --model smollm2 --num-rows 128 --skip-memory

Prints a readable table and, as the last stdout line, one JSON object.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _proc import add_contention_arguments, run_uncontended  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
WORDS = ["The quick brown fox", "Paris is the capital of", "def add(a, b):", "Once upon a time",
         "Batch inference turns", "Berlin is"]


def tiny_model(workdir: Path) -> str:
    """A tiny random LLaMA (GQA) with its tokenizer, as in the tests."""
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from conftest import save_tiny_model
    return str(save_tiny_model(workdir / "tiny-llama", "llama-gqa-tied"))


def write_prompts(path: Path, num_rows: int) -> Path:
    with open(path, "w") as handle:
        for i in range(num_rows):
            handle.write(json.dumps({"prompt": f"{WORDS[i % len(WORDS)]} {i}"}) + "\n")
    return path


def run_job(source: Path, output: Path, model: str, replicas: int, args, *,
            max_tokens: int) -> dict:
    """One `vbatch run` measured from outside; returns timings, memory and the rows."""
    import pyarrow.parquet as pq

    exe = shutil.which("vbatch")
    command = ([exe] if exe else [sys.executable, "-m", "vbatch"]) + [
        "run", str(source), "--model", model, "--replicas", str(replicas),
        "--runner", args.runner, "--max-tokens", str(max_tokens), "--ignore-eos",
        "--temperature", "0", "--dtype", "float32", "--batch-size", str(args.batch_size),
        "--output", str(output), "--overwrite", "--quiet"]
    measured = run_uncontended(command, attempts=args.attempts, wait_idle_s=args.wait_idle)
    if measured.returncode != 0:
        raise SystemExit(f"{replicas} replica(s) failed:\n{measured.tail()}")
    summary = json.loads((output / "_run_summary.json").read_text())
    tokens = summary["counts"]["output_tokens"]
    generation_s = summary["timings"]["generation_time_s"]
    result = {"replicas": replicas, "rows": summary["counts"]["rows"],
              "wall_s": round(measured.wall_s, 2), "generation_s": generation_s,
              "output_tokens": tokens, "tok_per_s": round(tokens / measured.wall_s, 1),
              "generation_tok_per_s": round(tokens / generation_s, 1) if generation_s else None,
              "tree_peak_rss_mb": round(measured.tree_peak_rss_mb or 0, 1),
              "others_cores": measured.others_cores,
              "rows_per_replica": [entry["num_rows"] for entry in summary["replicas"]]}
    if max_tokens > 1:
        result["texts"] = {row["id"]: row["generated_text"] for row in
                           pq.read_table(output, columns=["id", "generated_text"]).to_pylist()}
    return result


def scaling(workdir: Path, model: str, args) -> dict:
    source = write_prompts(workdir / "scaling.jsonl", args.num_rows)
    one = run_job(source, workdir / "one", model, 1, args, max_tokens=args.max_tokens)
    two = run_job(source, workdir / "two", model, 2, args, max_tokens=args.max_tokens)
    same = one.pop("texts") == two.pop("texts")
    print(f"\nreplica scaling ({args.runner} runner, {args.num_rows} rows x "
          f"{args.max_tokens} tokens)")
    print(f"  {'replicas':>8} {'wall s':>8} {'tok/s':>8} {'gen tok/s':>10} {'peak RSS':>9} "
          f"{'other':>6}  rows per replica")
    for row in (one, two):
        other = f"{row['others_cores']:.2f}" if row["others_cores"] is not None else "n/a"
        print(f"  {row['replicas']:>8} {row['wall_s']:>8} {row['tok_per_s']:>8} "
              f"{row['generation_tok_per_s']:>10} {row['tree_peak_rss_mb']:>8}M {other:>6}  "
              f"{row['rows_per_replica']}")
    ratio = round(two["tok_per_s"] / one["tok_per_s"], 2)
    generation_ratio = round(two["generation_tok_per_s"] / one["generation_tok_per_s"], 2)
    print(f"  2 / 1 replicas: {ratio}x whole run, {generation_ratio}x generation only; "
          f"identical rows: {same}")
    return {"one": one, "two": two, "ratio": ratio, "generation_ratio": generation_ratio,
            "identical_rows": same}


def flat_memory(workdir: Path, model: str, args) -> dict:
    runs = []
    for num_rows in (args.memory_rows // 10, args.memory_rows):
        source = write_prompts(workdir / f"memory-{num_rows}.jsonl", num_rows)
        runs.append(run_job(source, workdir / f"memory-{num_rows}", model, 2, args,
                            max_tokens=1))
    small, large = runs
    print(f"\nflat memory (2 replicas, {args.runner} runner, 1 token per row)")
    for row in runs:
        print(f"  {row['rows']:>8} rows: peak RSS of the process tree {row['tree_peak_rss_mb']} MB,"
              f" wall {row['wall_s']} s")
    growth = round(large["tree_peak_rss_mb"] / small["tree_peak_rss_mb"], 2)
    print(f"  {large['rows'] // small['rows']}x the rows -> {growth}x the peak RSS")
    return {"small": small, "large": large, "rss_growth": growth}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model for both parts (default: a tiny random LLaMA)")
    parser.add_argument("--runner", choices=["local", "ray"], default="local")
    parser.add_argument("--num-rows", type=int, default=16384)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--memory-rows", type=int, default=100_000)
    parser.add_argument("--skip-scaling", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    add_contention_arguments(parser)
    args = parser.parse_args()
    result: dict = {"runner": args.runner}
    with tempfile.TemporaryDirectory(prefix="vbatch-replicas-") as tmp:
        workdir = Path(tmp)
        model = args.model or tiny_model(workdir)
        result["model"] = args.model or "tiny random llama (tests/conftest.py)"
        if not args.skip_scaling:
            result["scaling"] = scaling(workdir, model, args)
        if not args.skip_memory:
            result["memory"] = flat_memory(workdir, model, args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
