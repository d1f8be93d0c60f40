"""Score a finished vbatch job against a reference column: `python examples/score.py OUT COLUMN`.

A row counts as correct when its normalised reference (lower case, no punctuation) appears in its
normalised `generated_text`. Prints the accuracy overall and per `task` (when that column exists)
and exits 1 when the job directory has no `_SUCCESS` (an unfinished job is never scored).
"""
from __future__ import annotations

import re
import sys
from collections import defaultdict
from pathlib import Path

import pyarrow.parquet as pq


def normalise(text: str | None) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", (text or "").lower()).split())


def main(output_dir: str, reference_column: str) -> int:
    if not (Path(output_dir) / "_SUCCESS").is_file():
        print(f"{output_dir}: no _SUCCESS, the job did not finish", file=sys.stderr)
        return 1
    rows = pq.read_table(output_dir).to_pylist()
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for row in rows:
        correct = normalise(row[reference_column]) in normalise(row["generated_text"])
        for group in ("all", row.get("task")):
            if group is not None:
                totals[group][0] += int(correct)
                totals[group][1] += 1
    for group, (num_correct, num_rows) in sorted(totals.items()):
        print(f"{group:<12} {num_correct:>4}/{num_rows:<4} {num_correct / num_rows:.1%}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.splitlines()[0])
    sys.exit(main(sys.argv[1], sys.argv[2]))
