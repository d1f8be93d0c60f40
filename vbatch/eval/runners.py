"""Where the evaluation's engine requests run: one engine in this process, or R replicas.

A runner takes a list of `EngineRequest` (token ids + SamplingParams) and returns one
`RequestResult` per request, in order: the generated text of sample 0 and, when the request
asked for prompt logprobs, each prompt token's (token id, logprob, most likely token id) from
the second token on.

- `InProcessRunner` (data_parallel_size = 1): one `LLMEngine` here (its tp x pp workers as the
  engine's executor rule says); all requests of a call are queued at once, so the scheduler
  batches them continuously.
- `ReplicaRunner` (data_parallel_size = R > 1): the job runner itself. The requests are written
  to a Parquet file in a private temporary directory (column `prompt_token_ids` plus per-row
  sampling columns) and run as a job with R replicas, so the job's work queue, replica restarts
  and exactly-once commit apply; results are read back by request index.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from vbatch.engine.config import EngineConfig
from vbatch.engine.llm_engine import LLMEngine, derive_max_model_len
from vbatch.engine.loader.resolve import resolve_model
from vbatch.engine.sampling_params import SamplingParams


@dataclass
class EngineRequest:
    """One engine pass: the prompt's token ids and how to sample."""

    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass
class RequestResult:
    """What an evaluation reads back: sample 0's text, and per prompt token after the first
    (token id, logprob, most likely token id) when prompt logprobs were asked for."""

    text: str
    prompt_logprobs: list[tuple[int, float, int]] | None
    num_prompt_tokens: int


class InProcessRunner:
    """Requests on one engine in this process (see module docstring)."""

    def __init__(self, model: str, engine_args: dict):
        self.engine = LLMEngine(EngineConfig(model=model, **engine_args))
        self.tokenizer = self.engine.tokenizer
        self.max_model_len = self.engine.max_model_len

    def run(self, requests: list[EngineRequest], description: str = "",
            disable_tqdm: bool = True) -> list[RequestResult]:
        """Every request through the engine at once; results in request order."""
        engine = self.engine
        for index, request in enumerate(requests):
            try:
                engine.add_request(str(index), request.prompt_token_ids, request.params)
            except ValueError as error:
                raise ValueError(f"{description} request {index}: {error}") from None
        results: list[RequestResult | None] = [None] * len(requests)
        with tqdm(total=len(requests), desc=description, disable=disable_tqdm) as progress:
            while engine.has_unfinished_requests():
                for output in engine.step():
                    results[int(output.request_id)] = _result(output)
                    progress.update(1)
        return results

    def shutdown(self) -> None:
        self.engine.shutdown()


def _result(output) -> RequestResult:
    entries = None
    if output.prompt_token_logprobs is not None:
        entries = [(e.token_id, e.logprob, e.top_logprobs[0].token_id if e.top_logprobs
                    else -1) for e in output.prompt_token_logprobs[1:]]
    return RequestResult(output.outputs[0].text, entries, len(output.prompt_token_ids))


class ReplicaRunner:
    """Requests as a job over `replicas` replicas (see module docstring)."""

    def __init__(self, model: str, replicas: int, engine_args: dict):
        from transformers import AutoConfig, AutoTokenizer  # noqa: PLC0415 - the replicas load the model; this process only its tokenizer

        self.model, self.replicas, self.engine_args = model, replicas, dict(engine_args)
        trust = bool(engine_args.get("trust_remote_code"))
        model_dir = resolve_model(model, allow_pickle=False, trust_remote_code=trust,
                                  storage_options=engine_args.get("storage_options")).path
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust)
        self.max_model_len = derive_max_model_len(
            AutoConfig.from_pretrained(model_dir, trust_remote_code=trust),
            engine_args.get("max_model_len"))

    def run(self, requests: list[EngineRequest], description: str = "",
            disable_tqdm: bool = True) -> list[RequestResult]:
        """The requests as one job over the replicas; results in request order."""
        import pyarrow as pa  # noqa: PLC0415
        import pyarrow.parquet as pq  # noqa: PLC0415

        from vbatch.jobs.config import load_job_config  # noqa: PLC0415 - eval -> jobs only here
        from vbatch.jobs.progress import ProgressReporter  # noqa: PLC0415
        from vbatch.jobs.runner import run_job  # noqa: PLC0415
        with tempfile.TemporaryDirectory(prefix="vbatch-eval-") as scratch:
            inputs, outputs = Path(scratch) / "requests.parquet", Path(scratch) / "results"
            pq.write_table(pa.table(_request_columns(requests)), inputs)
            wants_prompt_logprobs = any(r.params.prompt_logprobs is not None for r in requests)
            config = load_job_config({
                "input": str(inputs), "output": str(outputs), "model": self.model,
                "replicas": self.replicas, "prompt_column": "prompt_token_ids",
                "id_column": "request_index", "max_error_rate": 0.0,
                **({"prompt_logprobs": 1} if wants_prompt_logprobs else {}),
                **{name: value for name, value in self.engine_args.items()
                   if value is not None}}, None)
            run_job(config, ProgressReporter(quiet=disable_tqdm))
            table = pq.read_table(outputs)
        results: list[RequestResult | None] = [None] * len(requests)
        for row in table.to_pylist():
            index = int(row["request_index"])
            if row.get("error"):
                raise RuntimeError(f"{description} request {index} failed: {row['error']}")
            entries = None
            if row.get("prompt_logprobs") is not None:
                entries = [(e["token_id"], e["logprob"], e["top_logprobs"][0]["token_id"]
                            if e["top_logprobs"] else -1)
                           for e in row["prompt_logprobs"][1:]]
            results[index] = RequestResult(row["generated_text"], entries,
                                           row["num_prompt_tokens"])
        missing = [i for i, result in enumerate(results) if result is None]
        if missing:
            raise RuntimeError(f"{description}: {len(missing)} results missing from the job")
        return results

    def shutdown(self) -> None:
        """Nothing stays running between calls: each call is its own job."""


def _request_columns(requests: list[EngineRequest]) -> dict[str, list]:
    """Input columns of the job: the token ids and every per-row sampling value."""
    def values(name):
        return [getattr(r.params, name) for r in requests]
    return {
        "request_index": list(range(len(requests))),
        "prompt_token_ids": [list(r.prompt_token_ids) for r in requests],
        "max_tokens": values("max_tokens"), "temperature": values("temperature"),
        "top_p": values("top_p"), "top_k": values("top_k"), "seed": values("seed"),
        "ignore_eos": values("ignore_eos"),
        "stop": [list(r.params.stop) if isinstance(r.params.stop, (list, tuple))
                 else ([r.params.stop] if r.params.stop else []) for r in requests],
    }


def make_request_runner(model: str, data_parallel_size: int, engine_args: dict):
    """The runner for `data_parallel_size` replicas (1: in this process)."""
    if data_parallel_size < 1:
        raise ValueError(f"data_parallel_size must be >= 1, got {data_parallel_size}")
    if data_parallel_size == 1:
        return InProcessRunner(model, engine_args)
    return ReplicaRunner(model, data_parallel_size, engine_args)
