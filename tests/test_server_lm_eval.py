"""lm-eval's `local-completions` model against `vbatch serve` gives what lm-eval's in-process
`vbatch` model gives (issue 13's acceptance), on the lm-eval tests' own local tasks: the
multiple-choice loglikelihoods (echo + logprobs, token-id prompts, batched) and the
generate_until texts (stop strings) per sample, and so the metrics.

The rolling-perplexity task is left out: lm-eval's API models cut rolling windows of
max_length - 1 tokens and its HF-style models windows of max_length, so their perplexities
differ by lm-eval's design, whatever the server (its logprobs per window equal HF's).
"""
from __future__ import annotations

import pytest
from conftest import save_tp3_llama
from server_process import running_server
from test_lm_eval import _write_tasks

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("tenacity", reason="lm-eval's API models need lm-eval[api]")

TASKS = ["vbt_mc", "vbt_gen"]


def _evaluate(model: str, model_args: str, tasks) -> dict:
    from lm_eval import simple_evaluate  # noqa: PLC0415 - lm-eval loads only if installed
    from lm_eval.tasks import TaskManager  # noqa: PLC0415 - lm-eval loads only if installed

    import vbatch.eval  # noqa: F401, PLC0415 - registers lm-eval's "vbatch" model
    return simple_evaluate(model=model, model_args=model_args, tasks=TASKS,
                           task_manager=TaskManager(include_path=str(tasks)), log_samples=True,
                           random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                           fewshot_random_seed=0)


@pytest.mark.slow
def test_local_completions_against_the_server_equals_vbatch_in_process(tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    _write_tasks(tasks)
    model = save_tp3_llama(tmp_path / "model")
    expected = _evaluate("vbatch", f"pretrained={model},dtype=float32,kv_cache_memory_gb=0.05",
                         tasks)
    args = ["--model", str(model), "--dtype", "float32", "--served-model-name", "m",
            "--kv-cache-memory-gb", "0.05"]
    with running_server(args, tmp_path / "server.log") as base_url:
        served = _evaluate("local-completions",
                           f"base_url={base_url}/v1/completions,model=m,tokenizer={model},"
                           "tokenized_requests=True,num_concurrent=4,batch_size=4,"
                           "max_retries=1", tasks)
    for task in TASKS:
        assert served["results"][task] == expected["results"][task], task
        for mine, theirs in zip(served["samples"][task], expected["samples"][task],
                                strict=True):
            if task == "vbt_gen":
                assert mine["filtered_resps"] == theirs["filtered_resps"]
            else:
                for [(a, greedy_a)], [(b, greedy_b)] in zip(mine["resps"], theirs["resps"],
                                                           strict=True):
                    assert float(a) == pytest.approx(float(b), abs=1e-4)
                    assert greedy_a == greedy_b
