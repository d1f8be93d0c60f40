"""`vbatch serve` under load vs. offline generation of the same prompts, in one run.

Workload: the first `--num-prompts` (256) chat prompts of `examples/prompts.jsonl` (repeated if
needed), greedy, `--max-tokens` (64) new tokens a reply with EOS ignored, so both sides produce
exactly the same number of tokens; the default model (SmolLM2-135M-Instruct) unless `--model`.

(a) offline, two baselines: `vbatch run` on the same conversations (a JSONL `messages` file),
    the real command as a subprocess timed whole (start-up, model load, writing Parquet: the
    issue's baseline); and `vbatch.LLM(...).chat(all prompts)` in this process timed around
    the call (the engine's generation phase only: the stricter one).
(b) server: `vbatch serve` as a subprocess on a free 127.0.0.1 port (start-up not timed), one
    warm-up request, then `--concurrency` (64) clients of the official `openai` async client
    each taking the next prompt until all are done, streaming with usage; timed from the first
    request to the last reply. Time to first token per request, from sending it to its first
    content chunk.

Printed: output tok/s of each, the ratios server / `vbatch run` (target >= 0.7) and server /
generation phase, TTFT p50 / p99, the CPU, and one JSON line last. Only meaningful on an
otherwise idle machine.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def conversations(num_prompts: int) -> list[list[dict]]:
    rows = [json.loads(line) for line in
            (REPO_ROOT / "examples" / "prompts.jsonl").read_text().splitlines()]
    texts = [row.get("prompt") or row["messages"][-1]["content"] for row in rows]
    texts = (texts * (num_prompts // len(texts) + 1))[:num_prompts]
    return [[{"role": "user", "content": text}] for text in texts]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def offline_tok_s(args, prompts) -> float:
    from vbatch import LLM, SamplingParams
    llm = LLM(args.model, dtype=args.dtype, max_num_seqs=args.max_num_seqs)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    llm.chat(prompts[:8], params)                    # warm-up
    start = time.perf_counter()
    outputs = llm.chat(prompts, params)
    seconds = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    llm.llm_engine.shutdown()
    return tokens / seconds


def vbatch_run_tok_s(args, prompts) -> float:
    import tempfile

    import pyarrow.parquet as pq
    with tempfile.TemporaryDirectory() as scratch:
        source, output = Path(scratch) / "chats.jsonl", Path(scratch) / "out"
        source.write_text("".join(json.dumps({"messages": m}) + "\n" for m in prompts))
        command = [sys.executable, "-m", "vbatch", "run", str(source), "--output", str(output),
                   "--max-tokens", str(args.max_tokens), "--temperature", "0", "--ignore-eos",
                   "--dtype", args.dtype, "--max-num-seqs", str(args.max_num_seqs), "-q"]
        if args.model:
            command += ["--model", args.model]
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - start
        tokens = sum(pq.read_table(output).column("num_generated_tokens").to_pylist())
    return tokens / seconds


def start_server(args, port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "vbatch", "serve", "--port", str(port), "--dtype",
               args.dtype, "--max-num-seqs", str(args.max_num_seqs)]
    if args.model:
        command += ["--model", args.model]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    import httpx
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"server exited: {server.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.5)
    server.kill()
    raise RuntimeError("server did not become healthy in 300 s")


async def load(args, port: int, prompts) -> tuple[float, int, list[float]]:
    from openai import AsyncOpenAI
    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused",
                         max_retries=0, timeout=600)
    model = (await client.models.list()).data[0].id
    extra = {"ignore_eos": True}

    async def one(messages) -> tuple[int, float]:
        sent = time.perf_counter()
        first, tokens = None, 0
        stream = await client.chat.completions.create(
            model=model, messages=messages, max_tokens=args.max_tokens, temperature=0,
            stream=True, stream_options={"include_usage": True}, extra_body=extra)
        async for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - sent
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return tokens, first if first is not None else float("nan")

    await one(prompts[0])                               # warm-up
    queue = list(reversed(prompts))
    results: list[tuple[int, float]] = []

    async def client_loop():
        while queue:
            results.append(await one(queue.pop()))

    start = time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(args.concurrency)))
    seconds = time.perf_counter() - start
    await client.close()
    return seconds, sum(t for t, _ in results), sorted(f for _, f in results)


def percentile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    args = parser.parse_args()
    prompts = conversations(args.num_prompts)
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; {args.num_prompts} prompts, "
          f"{args.concurrency} clients, {args.max_tokens} tokens each", flush=True)
    run = vbatch_run_tok_s(args, prompts)
    print(f"vbatch run         {run:8.1f} tok/s (whole process)", flush=True)
    offline = offline_tok_s(args, prompts)
    print(f"offline LLM.chat   {offline:8.1f} tok/s (generation phase)", flush=True)
    port = free_port()
    server = start_server(args, port)
    try:
        seconds, tokens, ttfts = asyncio.run(load(args, port, prompts))
    finally:
        server.terminate()
        server.wait(timeout=60)
    served = tokens / seconds
    result = {"cpu": cpu_name(), "vbatch_run_tok_s": round(run, 1),
              "generation_tok_s": round(offline, 1), "server_tok_s": round(served, 1),
              "ratio_vs_run": round(served / run, 3),
              "ratio_vs_generation": round(served / offline, 3),
              "ttft_p50_s": round(percentile(ttfts, 0.5), 3),
              "ttft_p99_s": round(percentile(ttfts, 0.99), 3), "tokens": tokens,
              "concurrency": args.concurrency, "num_prompts": args.num_prompts}
    print(f"vbatch serve       {served:8.1f} tok/s   / vbatch run {result['ratio_vs_run']:.3f} "
          f"(target >= 0.7), / generation {result['ratio_vs_generation']:.3f}   "
          f"TTFT p50 {result['ttft_p50_s']:.3f} s  p99 {result['ttft_p99_s']:.3f} s")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
