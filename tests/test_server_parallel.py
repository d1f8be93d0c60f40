"""`python -m vbatch.entrypoints.openai.api_server` with vLLM's flags on a tp=3 x pp=2 engine
(mp executor, six worker processes): concurrent streamed requests give the single-rank
engine's greedy text; a dropped stream leaves no KV blocks held; a killed worker turns
requests and /health into 503s. (Aborting while pipeline steps are in flight is tested on the
engine, where it can be timed: tests/test_engine_abort_stream.py.)"""
from __future__ import annotations

import asyncio
import time

import httpx
import openai
import psutil
import pytest
from conftest import save_tp3_llama
from server_process import metric, running_server

from vbatch import LLM, SamplingParams

PROMPTS = [f"Row {i}: the quick brown fox" for i in range(6)]


@pytest.mark.slow
def test_tp3_pp2_server_matches_single_rank_greedy(tmp_path):
    model_dir = save_tp3_llama(tmp_path / "model")     # 6 heads / 3 KV heads, 4 layers
    reference = LLM(str(model_dir), dtype="float32", kv_cache_memory_gb=0.01)
    try:
        expected = [o.outputs[0].text for o in reference.generate(
            PROMPTS, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))]
    finally:
        reference.llm_engine.shutdown()
    args = ["--model", str(model_dir), "--dtype", "float32", "--tensor-parallel-size", "3",
            "--pipeline-parallel-size", "2", "--distributed-executor-backend", "mp",
            "--kv-cache-memory-gb", "0.05"]
    with running_server(args, tmp_path / "server.log") as base_url:
        idle = metric(base_url, "vbatch_kv_free_blocks")

        async def stream_all() -> list[str]:
            async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="none",
                                          max_retries=0) as client:
                async def one(prompt: str) -> str:
                    stream = await client.completions.create(
                        prompt=prompt, max_tokens=10, temperature=0, stream=True,
                        model=str(model_dir), extra_body={"ignore_eos": True})
                    return "".join([c.choices[0].text async for c in stream if c.choices])
                return await asyncio.gather(*(one(p) for p in PROMPTS))
        assert asyncio.run(stream_all()) == expected
        with httpx.stream("POST", f"{base_url}/v1/completions", timeout=30, json={
                "prompt": PROMPTS[0], "max_tokens": 200, "ignore_eos": True,
                "stream": True}) as response:
            assert response.status_code == 200
            next(response.iter_lines())
        deadline = time.monotonic() + 30
        while metric(base_url, "vbatch_kv_free_blocks") != idle:
            assert time.monotonic() < deadline, "the dropped stream still holds KV blocks"
            time.sleep(0.2)
        # a dead worker fails the engine: requests get 503, /health says so
        for worker in _workers(base_url):
            worker.kill()
        response = httpx.post(f"{base_url}/v1/completions", timeout=60,
                              json={"prompt": PROMPTS[0], "max_tokens": 4})
        assert response.status_code == 503, response.text
        assert response.json()["error"]["type"] == "service_unavailable"
        assert httpx.get(f"{base_url}/health").status_code == 503


def _workers(base_url: str) -> list[psutil.Process]:
    """The server's tp x pp worker processes (its children, Python's resource tracker
    aside)."""
    port = int(base_url.rsplit(":", 1)[1])
    [pid] = [c.pid for c in psutil.net_connections("tcp")
             if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
    workers = [child for child in psutil.Process(pid).children(recursive=True)
               if "resource_tracker" not in " ".join(child.cmdline())]
    assert len(workers) == 6, [w.cmdline() for w in workers]
    return workers
