"""Decode rate of running sequences while prompts keep arriving, vs pure decode, in one run.

Workload: the default model (SmolLM2-135M-Instruct) unless `--model`; `--running` (64) chat
prompts of `examples/prompts.jsonl` generate with EOS ignored (they decode through the whole
measurement). Then, on the same engine:

(a) pure decode: `--steps` (48) engine steps with nothing arriving;
(b) a stream: the same number of steps while a new prompt of `--prompt-tokens` (256) tokens
    arrives every `--every` (4) steps (`max_tokens=1`: a scoring-style request, so the running
    batch stays the same size and only the prefill work is added), under
    `--max-num-batched-tokens` (1024): with mixed steps each arrival's prefill (chunked when it
    does not fit) rides in the running sequences' steps instead of stalling them.

Printed: the running sequences' decode tokens/s in (a) and (b), their ratio (the issue's target:
within 10%), the inter-token latency p50/p99 of the running sequences in each, the prefill tokens
the stream added per step, and the CPU; one JSON line last. Only meaningful on an idle machine.

    python benchmarks/chunked_prefill.py [--running 64] [--every 4] [--prompt-tokens 256]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_throughput import conversations, cpu_name  # noqa: E402 (the same prompts and CPU line)


def run_steps(engine, steps: int, arrive=None) -> tuple[float, list[float]]:
    """`steps` engine steps (calling `arrive(step)` before each); seconds and step times."""
    times = []
    start = time.perf_counter()
    for step in range(steps):
        if arrive is not None:
            arrive(step)
        began = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - began)
    return time.perf_counter() - start, times


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    from vbatch import LLM, SamplingParams

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--running", type=int, default=64)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--every", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=1024)
    args = parser.parse_args()

    llm = LLM(args.model, dtype=args.dtype, max_num_seqs=args.running + 16,
              max_num_batched_tokens=args.max_num_batched_tokens)
    engine = llm.llm_engine
    running = SamplingParams(temperature=0, max_tokens=10_000, ignore_eos=True)
    for index, messages in enumerate(conversations(args.running)):
        engine.add_request(f"run-{index}", engine.encode_prompt(messages=messages), running)
    while not all(seq.has_prefilled for seq in engine.scheduler.running) \
            or engine.scheduler.waiting:
        engine.step()
    run_steps(engine, 4)                                        # warm-up decode steps

    pure_s, pure_times = run_steps(engine, args.steps)
    filler = engine.encode_prompt(" ".join(
        m[0]["content"] for m in conversations(64)))[:args.prompt_tokens]
    scoring = SamplingParams(temperature=0, max_tokens=1)
    added = 0

    def arrive(step: int) -> None:
        nonlocal added
        if step % args.every == 0:
            engine.add_request(f"arrival-{step}", list(filler), scoring)
            added += len(filler)

    prefill_before = engine.num_prefill_tokens
    stream_s, stream_times = run_steps(engine, args.steps, arrive)
    prefill_per_step = (engine.num_prefill_tokens - prefill_before) / args.steps
    pure_rate = args.running * args.steps / pure_s
    stream_rate = args.running * args.steps / stream_s
    result = {
        "cpu": cpu_name(), "cores": os.cpu_count(), "running": args.running,
        "every": args.every, "prompt_tokens": len(filler),
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "pure_decode_tok_s": round(pure_rate, 1), "stream_decode_tok_s": round(stream_rate, 1),
        "ratio": round(stream_rate / pure_rate, 3),
        "pure_itl_p50_ms": round(1000 * percentile(pure_times, 0.5), 1),
        "pure_itl_p99_ms": round(1000 * percentile(pure_times, 0.99), 1),
        "stream_itl_p50_ms": round(1000 * percentile(stream_times, 0.5), 1),
        "stream_itl_p99_ms": round(1000 * percentile(stream_times, 0.99), 1),
        "prefill_tokens_per_step": round(prefill_per_step, 1)}
    print(f"CPU: {result['cpu']}, {result['cores']} cores; {args.running} running sequences, "
          f"a {len(filler)}-token prompt every {args.every} steps, budget "
          f"{args.max_num_batched_tokens} tokens")
    print(f"pure decode      {pure_rate:8.1f} tok/s   ITL p50 {result['pure_itl_p50_ms']} ms  "
          f"p99 {result['pure_itl_p99_ms']} ms")
    print(f"with the stream  {stream_rate:8.1f} tok/s   ITL p50 {result['stream_itl_p50_ms']} "
          f"ms  p99 {result['stream_itl_p99_ms']} ms   ({prefill_per_step:.1f} prefill "
          "tokens a step)")
    print(f"ratio {result['ratio']:.3f} (target >= 0.9)")
    print(json.dumps(result))
    engine.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
