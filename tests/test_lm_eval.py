"""vbatch as an lm-evaluation-harness model, checked against lm-eval's own `--model hf`.

Three local tasks of the tests' own (task YAML + JSON data through `--include_path`): a
multiple-choice loglikelihood task, a `generate_until` task and a rolling perplexity task over
texts longer than the scoring window. On the same tiny random checkpoint in float32, vbatch's
metrics must equal HF's: accuracies identical, perplexities within 1e-4 relative; also through
`vbatch eval` (the CLI writes lm-eval's results JSON), with tp=3 and with 2 replicas.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import CORPUS, save_tp3_llama

lm_eval = pytest.importorskip("lm_eval")

#: The rolling task's scoring window (HF's max_length = ours): texts span several windows.
WINDOW = 48

QUESTIONS = [
    ("The quick brown", ["fox", "dog", "capital"], 0),
    ("Paris is the capital of", [" France", " Germany", " numbers"], 0),
    ("Berlin is the capital of", [" France", " Germany", " fox"], 1),
    ("def add(a, b):\n    return", [" a + b", " a - b", " lazy"], 0),
    ("Once upon a time there was a small", [" language model", " dog", " France"], 0),
    ("Batch inference turns many prompts into many", [" completions.", " foxes.", " dogs."], 0),
    ("The lazy", [" dog", " fox", " model"], 0),
    ("numbers", [" 0123456789", " abc", " Paris"], 0),
]
GENERATION_PROMPTS = ["The quick brown fox", "Paris is", "def add(a, b):", "Once upon a time",
                      "Batch inference"]


def _write_tasks(root) -> None:
    data = root / "data"
    data.mkdir()
    (data / "mc.jsonl").write_text("".join(
        json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    (data / "gen.jsonl").write_text("".join(
        json.dumps({"prompt": p, "target": " the"}) + "\n" for p in GENERATION_PROMPTS))
    texts = [" ".join(CORPUS[i:i + 6]) for i in range(0, 24, 6)]
    (data / "ppl.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))

    def task(name: str, body: str) -> None:
        (root / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    test: {data / (name.split('_')[1] + '.jsonl')}\ntest_split: test\n{body}")

    task("vbt_mc", "output_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
                   "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
                   "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    task("vbt_gen", "output_type: generate_until\ndoc_to_text: '{{prompt}}'\n"
                    "doc_to_target: '{{target}}'\ngeneration_kwargs:\n  until: ['.', '\\n']\n"
                    "  max_gen_toks: 12\n  do_sample: false\n"
                    "metric_list:\n  - metric: exact_match\n")
    task("vbt_ppl", "output_type: loglikelihood_rolling\ndoc_to_text: ''\n"
                    "doc_to_target: '{{text}}'\nmetric_list:\n  - metric: word_perplexity\n"
                    "  - metric: byte_perplexity\n  - metric: bits_per_byte\n")


TASKS = ["vbt_mc", "vbt_gen", "vbt_ppl"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(task dir, model dir, HF's metrics, HF's per-sample outputs)."""
    root = tmp_path_factory.mktemp("lm-eval")
    tasks = root / "tasks"
    tasks.mkdir()
    _write_tasks(tasks)
    model = save_tp3_llama(root / "model")
    results = _evaluate("hf", f"pretrained={model},dtype=float32,device=cpu,"
                              f"max_length={WINDOW}", tasks)
    return tasks, model, results


def _evaluate(model, model_args: str, tasks, names: list[str] = TASKS) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    import vbatch.eval  # noqa: F401 - registers lm-eval's "vbatch" model
    return simple_evaluate(model=model, model_args=model_args, tasks=names,
                           task_manager=TaskManager(include_path=str(tasks)), log_samples=True,
                           random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                           fewshot_random_seed=0)


def _metrics(results: dict) -> dict[str, float]:
    return {f"{task}/{name}": value for task, metrics in results["results"].items()
            for name, value in metrics.items()
            if "," in name and "stderr" not in name and isinstance(value, (int, float))}


def _check_equal(ours: dict, expected: dict) -> None:
    ours = _metrics(ours)
    expected = {name: value for name, value in _metrics(expected).items()
                if name.split("/")[0] in {key.split("/")[0] for key in ours}}
    assert ours.keys() == expected.keys() and len(ours) >= 2
    for name, value in expected.items():
        if "perplexity" in name or "bits_per_byte" in name:
            assert ours[name] == pytest.approx(value, rel=1e-4), name
        else:
            assert ours[name] == value, name


def _vbatch(model, **args) -> str:
    extra = "".join(f",{key}={value}" for key, value in args.items())
    return f"pretrained={model},dtype=float32,max_length={WINDOW},kv_cache_memory_gb=0.05{extra}"


def test_metrics_equal_hf_in_process(setup):
    """In-process engine: the three tasks' metrics equal HF's; generations equal HF's text."""
    tasks, model, expected = setup
    ours = _evaluate("vbatch", _vbatch(model), tasks)
    _check_equal(ours, expected)
    assert len(_metrics(ours)) == 6          # acc, acc_norm, exact_match, three perplexities
    for task in TASKS:
        assert len(ours["samples"][task]) == len(expected["samples"][task])
        for mine, theirs in zip(ours["samples"][task], expected["samples"][task]):
            if task == "vbt_gen":
                assert mine["filtered_resps"] == theirs["filtered_resps"]
            elif task == "vbt_ppl":
                assert mine["filtered_resps"] == pytest.approx(theirs["filtered_resps"],
                                                               rel=1e-6)
            else:     # the per-choice loglikelihoods themselves
                for [(a, greedy_a)], [(b, greedy_b)] in zip(mine["resps"], theirs["resps"]):
                    assert float(a) == pytest.approx(float(b), abs=1e-4)
                    assert greedy_a == greedy_b


def test_vbatch_eval_cli_writes_lm_eval_results(setup, tmp_path):
    """`vbatch eval` passes lm-eval's flags through and writes its results JSON."""
    tasks, model, expected = setup
    out = tmp_path / "out"
    command = [sys.executable, "-m", "vbatch", "eval", "--model", str(model), "--dtype",
               "float32", "--kv-cache-memory-gb", "0.05", "--tasks", "vbt_mc",
               "--include_path", str(tasks), "--output_path", str(out), "--seed", "0",
               "--model_args", "x=1"]
    refused = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--model_args" in refused.stderr
    # the run itself in this process (lm-eval and the model are loaded already)
    from click.testing import CliRunner

    from vbatch.jobs.cli import main
    done = CliRunner().invoke(main, command[3:-2], catch_exceptions=False)
    assert done.exit_code == 0, done.output[-3000:]
    files = list(out.rglob("results_*.json"))
    assert len(files) == 1
    ours = json.loads(files[0].read_text())
    assert ours["results"]["vbt_mc"]["acc,none"] == expected["results"]["vbt_mc"]["acc,none"]
    assert ours["config"]["model"] == "vbatch"


def test_bad_model_args_are_refused(setup):
    from vbatch.eval import VBatchLM
    _, model, _ = setup
    with pytest.raises(ValueError, match="unknown not_an_option"):
        VBatchLM(pretrained=str(model), not_an_option=1)


@pytest.mark.slow
@pytest.mark.parametrize("parallel,names", [({"tensor_parallel_size": 3}, ["vbt_mc", "vbt_ppl"]),
                                            ({"data_parallel_size": 2}, ["vbt_mc"])],
                         ids=["tp3", "dp2"])
def test_metrics_equal_hf_parallel(setup, parallel, names):
    """tp=3 (mp workers: scoring and rolling windows) and 2 replicas (a call is one job of
    prompt_token_ids rows over the job's work queue; rolling windows use the same scoring
    call; per-row stop strings of generate_until: tests/test_job_token_prompts.py): the same
    metrics as HF. The LM's engine workers stop when it is shut down."""
    from vbatch.eval import VBatchLM
    tasks, model, expected = setup
    lm = VBatchLM(pretrained=str(model), dtype="float32", max_length=WINDOW,
                  kv_cache_memory_gb=0.05, **parallel)
    try:
        _check_equal(_evaluate(lm, "", tasks, names), expected)
    finally:
        lm.shutdown()
    lm.shutdown()                                    # idempotent
