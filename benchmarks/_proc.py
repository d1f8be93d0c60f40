"""Shared helpers for the benchmark scripts: run a command, timing it and its memory from outside.

`run_measured` starts a subprocess, times it from the parent (so interpreter start-up, imports and
model loading are all included), and reports two peak-memory figures:

- `max_rss_mb`: the kernel's `ru_maxrss` from `wait4`, i.e. the peak RSS of the largest single
  process in the tree (the child, or a descendant it waited for); exact, the same number
  `/usr/bin/time -v` prints as "Maximum resident set size".
- `tree_peak_rss_mb`: the peak of the summed RSS of the child and all its descendants, sampled
  from /proc every `sample_s` seconds (Linux only; None elsewhere). This is the one that matters
  when work is spread over several worker processes; short spikes between samples can be missed.

It also reports `others_cores`: the average number of cores that OTHER processes kept busy while
the command ran (machine-wide busy CPU time from /proc/stat minus the child's own CPU time).
`run_uncontended` waits for an idle machine and repeats a run that was contended.
"""
from __future__ import annotations

import os
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@dataclass
class Measured:
    cmd: list[str]
    returncode: int
    wall_s: float
    stdout: str
    stderr: str
    max_rss_mb: float
    tree_peak_rss_mb: float | None
    cpu_s: float = 0.0  # user + system CPU time of the child (and descendants it waited for)
    others_cores: float | None = None  # average cores busy with OTHER work during the run

    @property
    def is_contended(self) -> bool:
        """True when other processes used more than a quarter of a core on average meanwhile."""
        return self.others_cores is not None and self.others_cores > 0.25

    @property
    def cpu_per_wall(self) -> float:
        """Average cores the job kept busy; well below the thread count means contention."""
        return self.cpu_s / self.wall_s if self.wall_s > 0 else 0.0

    def last_json_line(self) -> dict:
        import json

        for line in reversed(self.stdout.strip().splitlines()):
            line = line.strip()
            if line.startswith("{"):
                return json.loads(line)
        raise ValueError(f"no JSON line in the output of {' '.join(self.cmd)}")

    def tail(self, num_lines: int = 15) -> str:
        text = (self.stdout + "\n" + self.stderr).strip().splitlines()
        return "\n".join(text[-num_lines:])


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    return children


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * _PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return 0


def tree_rss_bytes(root_pid: int) -> int:
    """Summed RSS of `root_pid` and all its descendants right now."""
    children = _children_map()
    total, stack = 0, [root_pid]
    while stack:
        pid = stack.pop()
        total += _rss_bytes(pid)
        stack.extend(children.get(pid, ()))
    return total


class _TreeSampler(threading.Thread):
    def __init__(self, pid: int, sample_s: float) -> None:
        super().__init__(daemon=True)
        self.pid, self.sample_s = pid, sample_s
        self.peak = 0
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.peak = max(self.peak, tree_rss_bytes(self.pid))
            self.stop_event.wait(self.sample_s)


def run_measured(
    cmd: list[str],
    *,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    sample_s: float = 0.1,
    timeout_s: float | None = None,
) -> Measured:
    """Run `cmd` to completion; return its exit code, wall time, output and peak memory."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        busy0 = _busy_seconds()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=cwd)
        sampler = _TreeSampler(proc.pid, sample_s) if os.path.isdir("/proc") else None
        if sampler is not None:
            sampler.start()
        killer = None
        if timeout_s is not None:
            killer = threading.Timer(timeout_s, proc.kill)
            killer.start()
        _, status, rusage = os.wait4(proc.pid, 0)
        wall_s = time.perf_counter() - t0
        busy1 = _busy_seconds()
        if killer is not None:
            killer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)  # we reaped it ourselves
        tree_peak = None
        if sampler is not None:
            sampler.stop_event.set()
            sampler.join()
            tree_peak = sampler.peak / 2**20
        out.seek(0)
        err.seek(0)
        return Measured(
            cmd=cmd,
            returncode=proc.returncode,
            wall_s=wall_s,
            stdout=out.read(),
            stderr=err.read(),
            max_rss_mb=rusage.ru_maxrss / 1024,  # KiB on Linux
            tree_peak_rss_mb=tree_peak,
            cpu_s=rusage.ru_utime + rusage.ru_stime,
            others_cores=None if busy0 is None or busy1 is None else max(
                0.0, (busy1 - busy0 - rusage.ru_utime - rusage.ru_stime) / wall_s),
        )


def _busy_seconds() -> float | None:
    """CPU-seconds all CPUs have spent busy since boot (Linux), else None."""
    try:
        total, idle = _cpu_times()
    except (OSError, ValueError):
        return None
    return (total - idle) / os.sysconf("SC_CLK_TCK")


def run_uncontended(cmd: list[str], *, attempts: int = 3, wait_idle_s: float = 60.0,
                    log=print, **kwargs) -> Measured:
    """`run_measured`, repeated (up to `attempts` times) while other processes competed for the
    CPUs during the run; returns the least contended attempt. On a shared machine this is the
    difference between a benchmark and noise."""
    best: Measured | None = None
    for attempt in range(1, max(1, attempts) + 1):
        if wait_idle_s > 0:
            wait_until_idle(wait_idle_s)
        measured = run_measured(cmd, **kwargs)
        if best is None or (measured.others_cores or 0) < (best.others_cores or 0):
            best = measured
        if measured.returncode != 0 or not measured.is_contended:
            break
        if attempt < attempts:
            log(f"  (other work used {measured.others_cores:.2f} cores during that run: "
                f"repeating it, attempt {attempt + 1}/{attempts})")
    return best


def _cpu_times() -> tuple[int, int]:
    with open("/proc/stat", encoding="ascii") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return sum(values), idle


def machine_busy_fraction(interval_s: float = 1.0) -> float | None:
    """Fraction of all CPUs busy over the next `interval_s` seconds (Linux), else None."""
    try:
        total0, idle0 = _cpu_times()
        time.sleep(interval_s)
        total1, idle1 = _cpu_times()
    except (OSError, ValueError):
        return None
    total = total1 - total0
    return 0.0 if total <= 0 else 1.0 - (idle1 - idle0) / total


def wait_until_idle(max_wait_s: float, threshold: float = 0.15,
                    quiet: bool = False) -> float | None:
    """Wait (up to `max_wait_s`) until the machine is below `threshold` busy; return the last
    busy fraction. Benchmarks on a shared machine are meaningless while someone else computes."""
    deadline = time.monotonic() + max_wait_s
    busy = machine_busy_fraction()
    warned = False
    while busy is not None and busy > threshold and time.monotonic() < deadline:
        if not quiet and not warned:
            print(f"  machine is {busy:.0%} busy with other work; waiting up to "
                  f"{max_wait_s:.0f} s for it to go idle ...", flush=True)
            warned = True
        busy = machine_busy_fraction(2.0)
    if not quiet and busy is not None and busy > threshold:
        print(f"  warning: machine still {busy:.0%} busy: timings will be pessimistic", flush=True)
    return busy


def add_contention_arguments(parser) -> None:
    """The shared `--wait-idle` / `--attempts` options of the benchmark scripts."""
    parser.add_argument("--wait-idle", type=float, default=60.0, metavar="S",
                        help="before each timed run, wait up to S seconds for the machine to be "
                             "idle (others' work skews timings); 0 = don't check")
    parser.add_argument("--attempts", type=int, default=3,
                        help="repeat a timed run up to this many times while other processes "
                             "used > 0.25 cores during it; the least contended run is reported")
