"""Score a multiple-choice job by loglikelihood: `python examples/score_choices.py OUT`.

The job (examples/scoring/job.yaml) ran each `context + " " + answer` with `prompt_logprobs`.
A candidate's score is the sum of the logprobs of its answer's tokens: the prompt's last
tokens, found from their own text (`prompt_logprobs[i].token`), so no tokenizer is needed
here (the answer must start at a token boundary, as " Paris" after "is" does). The candidate
with the highest score is the model's answer; accuracy is the share of questions where it is
the `gold` one. Exits 1 when the job has no `_SUCCESS`.
"""
from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import pyarrow.parquet as pq


def answer_loglikelihood(row: dict) -> float:
    """Sum of the logprobs of the prompt's last tokens that spell the answer (the text after
    `row["context"]`, its leading space included), counted back from the end."""
    answer = row["prompt"][len(row["context"]):]
    suffix, total = "", 0.0
    for entry in reversed(row["prompt_logprobs"][1:]):   # the first token has no logprob
        if len(suffix) >= len(answer):
            break
        total += entry["logprob"]
        suffix = entry["token"] + suffix
    return total


def main(output_dir: str) -> int:
    if not (Path(output_dir) / "_SUCCESS").is_file():
        print(f"{output_dir}: no _SUCCESS, the job did not finish", file=sys.stderr)
        return 1
    rows = pq.read_table(output_dir).to_pylist()
    questions: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        if row["error"] is None:
            questions[row["question"]].append(row)
    correct = 0
    for name, candidates in sorted(questions.items()):
        best = max(candidates, key=answer_loglikelihood)
        correct += best["choice"] == best["gold"]
        scores = ", ".join(
            f"{c['prompt'][len(c['context']):].strip()}={answer_loglikelihood(c):.2f}"
            for c in sorted(candidates, key=lambda c: c["choice"]))
        print(f"{name}: {'ok ' if best['choice'] == best['gold'] else 'bad'} {scores}")
    print(f"accuracy {correct}/{len(questions)} = {correct / max(1, len(questions)):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]) if len(sys.argv) == 2 else 2)
