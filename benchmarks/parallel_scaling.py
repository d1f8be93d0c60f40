"""Tensor / pipeline parallel scaling of one engine, and whether pipeline stages overlap.

Part 1, scaling: the same job through the real command line for each layout tp x pp in
`--layouts` (default 1x1, 3x1, 1x2, 3x2): the first `--num-prompts` prompts of
`examples/prompts.jsonl`, chat template, `--max-tokens` new tokens, greedy, the default model
(SmolLM2-135M-Instruct), `--dtype` (default auto). Each run is timed from outside (whole process:
start-up, model load, generation, writing), output tokens are summed from the Parquet output.
Reported per layout: output tok/s, the ratio against tp=pp=1 measured in the same run, peak RSS
of the process tree, and how many rows' texts equal tp=pp=1's (in float32 all must; in
bfloat16 the reduction order differs across layouts, so a few rows may drift).

Part 2, overlap: one pp=2 engine in this process (`vbatch.LLM`), a decode-heavy batch; each stage
records the (start, end) of its steps from when its input is ready. Reported: each stage's busy
fraction of the generation time and the fraction of time both stages computed at once. With one
step in flight both-busy would be 0; vbatch keeps pp virtual engines in flight.

On this 2-core CPU, tp=3 or pp=2 cannot be faster than tp=1 (every rank is a process competing
for 2 cores, plus gloo traffic); the point of the numbers is the overhead, and overlap > 0.

Run from the repository root after `pip install -e .`:

    python benchmarks/parallel_scaling.py                       # ~10 min on 2 cores
    python benchmarks/parallel_scaling.py --dtype float32 --layouts 1x1 3x2 --num-prompts 16
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _proc import add_contention_arguments, run_uncontended  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
PROMPTS = REPO_ROOT / "examples" / "prompts.jsonl"


def _layout(text: str) -> tuple[int, int]:
    tp, _, pp = text.partition("x")
    return int(tp), int(pp or 1)


def run_layout(tp: int, pp: int, args, workdir: Path) -> dict:
    """Run the CLI job with this layout; returns timing, memory and texts by row id."""
    import pyarrow.parquet as pq

    prompts = workdir / "prompts.jsonl"
    output = workdir / f"out-{tp}x{pp}"
    exe = shutil.which("vbatch")
    command = ([exe] if exe else [sys.executable, "-m", "vbatch"]) + [
        "run", str(prompts), "--chat", "--temperature", "0", "--max-tokens", str(args.max_tokens),
        "--dtype", args.dtype, "--tp", str(tp), "--pp", str(pp), "--output", str(output),
        "--overwrite", "--quiet"]
    measured = run_uncontended(command, attempts=args.attempts, wait_idle_s=args.wait_idle)
    if measured.returncode != 0:
        raise SystemExit(f"{tp}x{pp} failed:\n{measured.tail()}")
    table = pq.read_table(output).to_pylist()
    tokens = sum(row["num_generated_tokens"] for row in table)
    return {"tp": tp, "pp": pp, "wall_s": round(measured.wall_s, 2),
            "output_tokens": tokens, "tok_per_s": round(tokens / measured.wall_s, 1),
            "tree_peak_rss_mb": measured.tree_peak_rss_mb, "others_cores": measured.others_cores,
            "texts": {row["id"]: row["generated_text"] for row in table}}


def measure_overlap(args) -> dict:
    """Busy fractions of the two stages of a pp=2 engine and how much they overlap."""
    from vbatch import LLM, SamplingParams

    rows = [json.loads(line) for line in PROMPTS.read_text().splitlines() if line.strip()]
    conversations = [[{"role": "user", "content": row["prompt"]}]
                     for row in rows[:args.num_prompts]]
    llm = LLM(dtype=args.dtype, pipeline_parallel_size=2, max_model_len=1024)
    try:
        started = time.monotonic()
        llm.chat(conversations, SamplingParams(temperature=0, max_tokens=args.max_tokens,
                                               ignore_eos=True))
        ended = time.monotonic()
        first, last = llm.llm_engine.executor.collective_rpc("step_trace")
    finally:
        llm.llm_engine.shutdown()
    window = ended - started

    def busy(trace):
        return sum(end - start for start, end in trace if start >= started) / window

    both = sum(max(0.0, min(e0, e1) - max(s0, s1)) for s0, e0 in first if s0 >= started
               for s1, e1 in last if s1 >= started)
    return {"window_s": round(window, 2), "stage0_busy": round(busy(first), 3),
            "stage1_busy": round(busy(last), 3), "both_busy": round(both / window, 3),
            "steps": len(first)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layouts", nargs="+", default=["1x1", "3x1", "1x2", "3x2"])
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--skip-overlap", action="store_true")
    add_contention_arguments(parser)
    args = parser.parse_args()
    layouts = [_layout(text) for text in args.layouts]
    if layouts[0] != (1, 1):
        layouts.insert(0, (1, 1))
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        lines = [line for line in PROMPTS.read_text().splitlines() if line.strip()]
        (workdir / "prompts.jsonl").write_text("\n".join(lines[:args.num_prompts]) + "\n")
        results = [run_layout(tp, pp, args, workdir) for tp, pp in layouts]
    base = results[0]
    print(f"{'layout':>7} {'tok/s':>8} {'vs 1x1':>7} {'wall s':>7} {'tree RSS MB':>12} "
          f"{'rows = 1x1':>11} {'other cores':>12}")
    for result in results:
        same = sum(result["texts"][key] == text for key, text in base["texts"].items())
        result["rows_equal_to_1x1"] = f"{same}/{len(base['texts'])}"
        result["ratio_vs_1x1"] = round(result["tok_per_s"] / base["tok_per_s"], 3)
        rss = result["tree_peak_rss_mb"]
        others = result["others_cores"]
        print(f"{result['tp']}x{result['pp']:<5} {result['tok_per_s']:>8.1f} "
              f"{result['ratio_vs_1x1']:>7.2f} {result['wall_s']:>7.1f} "
              f"{rss if rss is None else round(rss):>12} {result['rows_equal_to_1x1']:>11} "
              f"{'-' if others is None else round(others, 2):>12}")
    summary = {"dtype": args.dtype, "num_prompts": args.num_prompts,
               "max_tokens": args.max_tokens, "cpu_count": os.cpu_count(),
               "layouts": [{k: v for k, v in r.items() if k != "texts"} for r in results]}
    if not args.skip_overlap:
        overlap = measure_overlap(args)
        print(f"pp=2 overlap: stage 0 busy {overlap['stage0_busy']:.0%}, stage 1 busy "
              f"{overlap['stage1_busy']:.0%}, both at once {overlap['both_busy']:.0%} of "
              f"{overlap['window_s']} s ({overlap['steps']} steps)")
        summary["pp2_overlap"] = overlap
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
