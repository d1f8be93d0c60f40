"""`--quantization int8` (dynamic W8A8) on CPU: speed and quality against bf16 and float32.

(a) Speed: benchmarks/throughput.py's workload (the prompts of `examples/prompts.jsonl`, chat
    template, 64 new tokens, greedy, EOS respected, the default model SmolLM2-135M-Instruct),
    run as `vbatch run` once per setting: float32, bfloat16, bfloat16 + int8. Reported: the
    job's generation tok/s (`_run_summary.json`: output tokens over wall time minus model
    load) and the whole process's tok/s, and the ratio int8 / bf16 (the acceptance: >= 1.6).
(b) Greedy agreement on the same rows: int8 vs bf16 and int8 vs float32 (and bf16 vs float32
    for scale), as rows whose generated text is identical and the mean share of the float32
    text's characters before the first difference.
(c) Perplexity of a fixed text (PARAGRAPH below) through `LLM(None, ...)`:
    exp(-mean log p(token_i | tokens_<i)) from prompt logprobs
    (`SamplingParams(prompt_logprobs=0, max_tokens=1)`), for float32 / bf16 / int8.

Shared machines: timings are noisy; the CPU model and the load average are printed.

Run (from the repository root, after `pip install -e .`):

    python benchmarks/int8.py                       # all 256 prompts, ~5-10 min on 2 cores
    python benchmarks/int8.py --num-prompts 64

Prints a table and, as the last stdout line, one JSON object.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput  # noqa: E402
from throughput import (  # noqa: E402
    DEFAULT_PROMPTS,
    find_vbatch,
    measure,
    read_rows,
    read_vbatch_output,
    resolve_default_model,
)

SETTINGS = {"float32": ["--dtype", "float32"], "bf16": ["--dtype", "bfloat16"],
            "int8": ["--dtype", "bfloat16", "--quantization", "int8"]}
PARAGRAPH = (
    "The history of computing is a story of abstraction. Early machines were programmed by "
    "rewiring panels and flipping switches; later, stored programs let the same hardware run "
    "many different tasks. Assembly languages gave names to instructions, and compilers turned "
    "readable code into machine instructions. Operating systems shared one computer among many "
    "users, and networks connected computers across the world. Today a small language model "
    "can run on a laptop, answering questions, summarising documents and translating text, "
    "while the same ideas of layering and reuse continue to shape how software is built."
)


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else platform's guess."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_job(vbatch: str, prompts: str, out: Path, extra: list[str], max_tokens: int) -> dict:
    """One timed `vbatch run` of the workload; its rows and throughputs."""
    cmd = [vbatch, "run", prompts, "--chat", "--max-tokens", str(max_tokens), "--temperature",
           "0", "--output", str(out), "--overwrite", "--quiet", *extra]
    print(f"running: {' '.join(cmd)}", flush=True)
    measured, others = measure(cmd)
    if measured.returncode != 0:
        throughput.fail(f"vbatch run failed (exit {measured.returncode}):\n{measured.tail()}")
    rows = read_vbatch_output(out)
    timings = json.loads((out / "_run_summary.json").read_text())["timings"]
    tokens = sum(int(r["num_generated_tokens"]) for r in rows)
    return {"rows": rows, "output_tokens": tokens, "wall_s": round(measured.wall_s, 2),
            "process_tok_s": round(tokens / measured.wall_s, 1),
            "generation_tok_s": timings["output_tokens_per_s"],
            "load_s": timings["load_time_s"], "others_cores": others}


def agreement(rows: list[dict], reference: list[dict]) -> dict:
    """Rows with identical greedy text, and the mean share of the reference text before the
    first differing character."""
    by_id = {str(r["id"]): r["generated_text"] for r in reference}
    equal, prefix = 0, 0.0
    for row in rows:
        a, b = row["generated_text"], by_id[str(row["id"])]
        equal += a == b
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        prefix += n / max(1, len(b)) if a != b else 1.0
    return {"texts_equal": equal, "rows": len(rows), "mean_prefix_share": round(prefix / len(rows),
                                                                               3)}


def perplexity(dtype: str, quantization: str | None) -> float:
    """exp(-mean log p) of PARAGRAPH's tokens (the first has no logprob) under `LLM(None)`."""
    from vbatch import LLM, SamplingParams

    llm = LLM(None, dtype=dtype, quantization=quantization, kv_cache_memory_gb=0.5)
    try:
        out = llm.generate([PARAGRAPH], SamplingParams(prompt_logprobs=0, max_tokens=1))[0]
        logprobs = [e.logprob for e in out.prompt_token_logprobs[1:]]
    finally:
        llm.llm_engine.shutdown()
    return math.exp(-sum(logprobs) / len(logprobs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", default=str(DEFAULT_PROMPTS))
    parser.add_argument("--num-prompts", type=int, default=None, help="first N prompts (all)")
    parser.add_argument("--max-tokens", type=int, default=64)
    throughput.add_contention_arguments(parser)
    args = parser.parse_args()
    throughput.WAIT_IDLE_S, throughput.ATTEMPTS = args.wait_idle, args.attempts

    vbatch = find_vbatch()
    model_dir, _ = resolve_default_model()
    rows = read_rows(args.prompts, args.num_prompts)
    tmp = Path(tempfile.mkdtemp(prefix="vbatch_int8_"))
    prompts = str(tmp / "prompts.jsonl")
    with open(prompts, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    print(f"CPU: {cpu_name()} ({os.cpu_count()} logical cores); load {os.getloadavg()}")

    runs = {name: run_job(vbatch, prompts, tmp / name, extra, args.max_tokens)
            for name, extra in SETTINGS.items()}
    agree = {"int8_vs_bf16": agreement(runs["int8"]["rows"], runs["bf16"]["rows"]),
             "int8_vs_float32": agreement(runs["int8"]["rows"], runs["float32"]["rows"]),
             "bf16_vs_float32": agreement(runs["bf16"]["rows"], runs["float32"]["rows"])}
    ppl = {"float32": perplexity("float32", None), "bf16": perplexity("bfloat16", None),
           "int8": perplexity("bfloat16", "int8")}
    shutil.rmtree(tmp, ignore_errors=True)

    print(f"\nWorkload: {len(rows)} chat prompts, {args.max_tokens} new tokens, greedy; model "
          f"{model_dir}\n  {'setting':<8} {'out tok':>8} {'gen tok/s':>10} {'wall s':>7} "
          f"{'proc tok/s':>10} {'load s':>6} {'other':>5}")
    for name, r in runs.items():
        print(f"  {name:<8} {r['output_tokens']:>8} {r['generation_tok_s']:>10.1f} "
              f"{r['wall_s']:>7.1f} {r['process_tok_s']:>10.1f} {r['load_s']:>6.1f} "
              f"{throughput.fmt_cores(r['others_cores']):>5}")
    ratio = runs["int8"]["generation_tok_s"] / runs["bf16"]["generation_tok_s"]
    print(f"int8 / bf16 generation tok/s: {ratio:.2f}x")
    for name, a in agree.items():
        print(f"greedy {name}: {a['texts_equal']}/{a['rows']} texts equal, mean prefix share "
              f"{a['mean_prefix_share']:.3f}")
    print("perplexity of the fixed paragraph: "
          + ", ".join(f"{k} {v:.3f}" for k, v in ppl.items()))
    print(f"load after: {os.getloadavg()}")
    result = {"cpu": cpu_name(), "rows": len(rows), "ratio_int8_over_bf16": round(ratio, 3),
              "runs": {k: {x: y for x, y in v.items() if x != "rows"} for k, v in runs.items()},
              "agreement": agree, "perplexity": {k: round(v, 4) for k, v in ppl.items()}}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
