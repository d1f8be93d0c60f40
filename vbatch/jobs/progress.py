"""Progress reporting for a job: a tqdm bar on a terminal, plain periodic lines otherwise.

Everything goes to stderr (stdout stays clean for pipes). `JobStats` is what `run_job` returns
and what the final summary prints.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

LINE_PREFIX = "[vbatch]"


@dataclass(slots=True)
class JobStats:
    """Counts and timings of one finished job.

    `wall_time_s` is the whole job's wall time, model loading included; `load_time_s` is the part
    of it spent loading the model. The counts are the job's totals: `num_rows` counts every row
    of the output, a resumed job's rows committed by earlier runs included (those are
    `num_resumed_rows`, their errors and tokens `num_resumed_*`); `num_error_rows` the rows
    written with `error` set instead of a completion; `num_part_files` the output's part files.
    `this_run` is what this run computed. `num_duplicate_ids` / `num_null_ids`: output rows
    whose id an earlier row has / rows without an id. `warnings`: one line each, printed after
    the summary. Throughputs are this run's tokens over the
    generation time (`wall_time_s - load_time_s`), so a large model's load time does not hide
    engine speed.
    """

    num_rows: int
    num_prompt_tokens: int
    num_output_tokens: int
    wall_time_s: float
    output_dir: str
    model: str
    dtype: str
    load_time_s: float = 0.0
    num_part_files: int = 0
    num_error_rows: int = 0
    runner: str = "local"
    num_replicas: int = 1
    num_resumed_rows: int = 0
    num_resumed_error_rows: int = 0
    num_resumed_prompt_tokens: int = 0
    num_resumed_output_tokens: int = 0
    num_duplicate_ids: int = 0
    num_null_ids: int = 0
    warnings: tuple[str, ...] = ()

    @property
    def this_run(self) -> dict[str, int]:
        """What this run computed: rows, error rows, prompt and output tokens (the totals less
        what earlier runs committed)."""
        return {"rows": self.num_rows - self.num_resumed_rows,
                "error_rows": self.num_error_rows - self.num_resumed_error_rows,
                "prompt_tokens": self.num_prompt_tokens - self.num_resumed_prompt_tokens,
                "output_tokens": self.num_output_tokens - self.num_resumed_output_tokens}

    @property
    def generation_time_s(self) -> float:
        """Wall time minus model load time (never negative)."""
        return max(self.wall_time_s - self.load_time_s, 0.0)

    @property
    def output_tokens_per_s(self) -> float:
        """Generated tokens per second of generation time (this run's); 0.0 when no time
        elapsed."""
        return _rate(self.num_output_tokens - self.num_resumed_output_tokens,
                     self.generation_time_s)

    @property
    def total_tokens_per_s(self) -> float:
        """(Prompt + generated) tokens per second of generation time (this run's); 0.0 when no
        time elapsed."""
        this_run = self.this_run
        return _rate(this_run["prompt_tokens"] + this_run["output_tokens"],
                     self.generation_time_s)


def _rate(count: float, seconds: float) -> float:
    return count / seconds if seconds > 0 else 0.0


def format_duration(seconds: float) -> str:
    """`3725.4` -> `"1:02:05"` (hours are not wrapped at 24)."""
    total_seconds = max(int(round(seconds)), 0)
    hours, remainder = divmod(total_seconds, 3600)
    minutes, secs = divmod(remainder, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def format_summary(stats: JobStats) -> str:
    """The multi-line end-of-job summary printed by `ProgressReporter.summary`."""
    load_note = f" (model load {format_duration(stats.load_time_s)})" if stats.load_time_s else ""
    part_note = f" ({stats.num_part_files} part files)" if stats.num_part_files else ""
    error_note = f" ({stats.num_error_rows:,} with errors)" if stats.num_error_rows else ""
    if stats.num_resumed_rows:
        error_note += (f"; {stats.num_resumed_rows:,} committed by an earlier run (resumed), "
                       f"{stats.this_run['rows']:,} computed now")
    rows = [
        ("rows", f"{stats.num_rows:,}{error_note}"),
        ("prompt tokens", f"{stats.num_prompt_tokens:,}"),
        ("output tokens", f"{stats.num_output_tokens:,}"),
        ("output tok/s", f"{stats.output_tokens_per_s:,.1f}"),
        ("total tok/s", f"{stats.total_tokens_per_s:,.1f}"),
        ("wall time", f"{format_duration(stats.wall_time_s)}{load_note}"),
        ("model", stats.model),
        ("dtype", stats.dtype),
        ("replicas", f"{stats.num_replicas} ({stats.runner} runner)"),
        ("output", f"{stats.output_dir}{part_note}"),
    ]
    lines = [f"{LINE_PREFIX} job finished"]
    lines += [f"  {label:<14} {value}" for label, value in rows]
    return "\n".join(lines)


class ProgressReporter:
    """Shows how far a job is; the runner calls `start`, `update` (increments), `close`.

    On a terminal (`stream.isatty()`), a tqdm bar with rows done / total, output tokens/s and ETA.
    Otherwise a plain line at most every `interval_s` seconds (and a last one on `close`):
    `[vbatch] 1200/5000 rows (24.0%), 3456 out tok/s, elapsed 0:01:10, eta 0:03:40`.
    `quiet=True` silences progress but not `summary`. `stream` defaults to `sys.stderr` (looked
    up at use time); `is_tty` and `clock` are overridable for tests.
    """

    def __init__(
        self,
        *,
        quiet: bool = False,
        interval_s: float = 10.0,
        stream: TextIO | None = None,
        is_tty: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.quiet = quiet
        self.interval_s = interval_s
        self._stream = stream
        self._is_tty = is_tty
        self._clock = clock
        self.total_rows: int | None = None
        self.num_rows_done = 0
        self.num_output_tokens = 0
        self.num_error_rows = 0
        self._start_time: float | None = None
        self._last_line_time = 0.0
        self._rows_at_last_line = -1
        self._bar: Any = None
        self.replica_states: dict[int, str] = {}

    @property
    def stream(self) -> TextIO:
        """Where progress and the summary go."""
        return self._stream if self._stream is not None else sys.stderr

    def _uses_bar(self) -> bool:
        if self._is_tty is not None:
            return self._is_tty
        isatty = getattr(self.stream, "isatty", None)
        return bool(isatty and isatty())

    def start(self, total_rows: int | None) -> None:
        """Begin timing; `total_rows=None` when the number of rows is not known up front."""
        self.total_rows = total_rows
        self.num_rows_done = 0
        self.num_output_tokens = 0
        self.num_error_rows = 0
        self._start_time = self._clock()
        self._last_line_time = self._start_time
        self._rows_at_last_line = -1
        if self.quiet or not self._uses_bar():
            return
        from tqdm.auto import tqdm  # noqa: PLC0415 - start-up: keeps `vbatch --help` fast

        self._bar = tqdm(
            total=total_rows,
            unit="row",
            desc="vbatch",
            file=self.stream,
            dynamic_ncols=True,
            smoothing=0.1,
        )

    def update(self, num_rows: int, num_output_tokens: int, num_error_rows: int = 0) -> None:
        """Add `num_rows` finished rows (`num_error_rows` of them error rows) that generated
        `num_output_tokens` tokens in total."""
        if self._start_time is None:
            self.start(None)
        self.num_rows_done += num_rows
        self.num_output_tokens += num_output_tokens
        self.num_error_rows += num_error_rows
        if self.quiet:
            return
        if self._bar is not None:
            errors = f", {self.num_error_rows} errors" if self.num_error_rows else ""
            self._bar.set_postfix_str(f"{self._output_tokens_per_s():,.0f} out tok/s{errors}",
                                      refresh=False)
            self._bar.update(num_rows)
            return
        now = self._clock()
        if now - self._last_line_time >= self.interval_s:
            self._write_line(now)

    def set_replica_state(self, index: int, state: str) -> None:
        """Record what replica `index` is doing ("loading", "running", "done", ...); with more
        than one replica the states are shown after the job's counts."""
        self.replica_states[index] = state
        if self._bar is not None and len(self.replica_states) > 1:
            self._bar.set_description_str(f"vbatch [{self._replica_summary()}]", refresh=False)

    def _replica_summary(self) -> str:
        return " ".join(f"r{index}:{state}" for index, state in sorted(self.replica_states.items()))

    def close(self) -> None:
        """Finish the bar, or print a last plain line if progress moved since the previous one.

        Safe to call more than once.
        """
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            return
        if self.quiet or self._start_time is None:
            return
        if self.num_rows_done != self._rows_at_last_line:
            self._write_line(self._clock())

    def summary(self, stats: JobStats) -> None:
        """Print the end-of-job summary (always, even when quiet); closes progress first."""
        self.close()
        print(format_summary(stats), file=self.stream, flush=True)
        for warning in stats.warnings:
            print(warning, file=self.stream, flush=True)

    def progress_line(self, now: float | None = None) -> str:
        """The plain-text progress line for the current counts."""
        now = self._clock() if now is None else now
        elapsed_s = now - self._start_time if self._start_time is not None else 0.0
        if self.total_rows:
            percent = 100.0 * self.num_rows_done / self.total_rows
            rows = f"{self.num_rows_done}/{self.total_rows} rows ({percent:.1f}%)"
        else:
            rows = f"{self.num_rows_done} rows"
        if self.num_error_rows:
            rows += f" ({self.num_error_rows} errors)"
        line = (
            f"{LINE_PREFIX} {rows}, {self._output_tokens_per_s(now):.0f} out tok/s, "
            f"elapsed {format_duration(elapsed_s)}"
        )
        if len(self.replica_states) > 1:
            line += f", replicas {self._replica_summary()}"
        rows_per_s = _rate(self.num_rows_done, elapsed_s)
        if self.total_rows and rows_per_s > 0:
            remaining_rows = max(self.total_rows - self.num_rows_done, 0)
            line += f", eta {format_duration(remaining_rows / rows_per_s)}"
        return line

    def _output_tokens_per_s(self, now: float | None = None) -> float:
        if self._start_time is None:
            return 0.0
        now = self._clock() if now is None else now
        return _rate(self.num_output_tokens, now - self._start_time)

    def _write_line(self, now: float) -> None:
        print(self.progress_line(now), file=self.stream, flush=True)
        self._last_line_time = now
        self._rows_at_last_line = self.num_rows_done
