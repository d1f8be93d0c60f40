"""`vbatch serve` / `python -m vbatch.entrypoints.openai.api_server` command lines: the engine
flags come from the engine's declarations (with vLLM's names), and bad values are usage
errors (exit 2, one line) before any model loads; the app's body limit, without a model."""
from __future__ import annotations

import asyncio
import types

import httpx
from click.testing import CliRunner

from vbatch.entrypoints.openai.app import build_app
from vbatch.entrypoints.openai.cli import serve_command
from vbatch.jobs.cli import main


def test_serve_is_a_vbatch_command_with_vllm_flag_names():
    result = CliRunner().invoke(main, ["serve", "-h"])
    assert result.exit_code == 0, result.output
    for flag in ("--model", "--tensor-parallel-size", "--tp", "--pipeline-parallel-size",
                 "--pp", "--distributed-executor-backend", "--host", "--port", "--api-key",
                 "--served-model-name", "--dtype", "--max-model-len", "--max-num-seqs",
                 "--kv-cache-memory-gb", "--seed", "--trust-remote-code"):
        assert flag in result.output
    assert "127.0.0.1" in result.output


def test_bad_values_are_usage_errors_before_loading():
    runner = CliRunner()
    for args, message in ((["--max-num-seqs", "0"], "max_num_seqs must be >= 1"),
                          (["--port", "70000"], "70000"),
                          (["--served-model-name", " "], "served-model-name"),
                          (["--distributed-executor-backend", "mpi"], "mpi")):
        result = runner.invoke(serve_command, ["--model", "/nonexistent", *args])
        assert result.exit_code == 2, result.output
        assert message in result.output


def test_an_oversized_body_is_refused_unread():
    """The body limit holds before any engine work (the app is driven in-process, no engine
    loop started: the request never reaches it)."""
    engine = types.SimpleNamespace(max_model_len=16)
    app = build_app(engine, served_model_names=["m"], max_body_bytes=1024)

    async def post(size: int) -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://test") as client:
            return await client.post("/v1/completions", content=b"x" * size)
    response = asyncio.run(post(4096))
    assert response.status_code == 413 and "1024 bytes" in response.json()["error"]["message"]
    assert asyncio.run(post(10)).status_code == 400     # small, not JSON
