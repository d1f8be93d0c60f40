"""The cost of committing one part, at 1,000 and at 100,000 committed parts, and of resuming.

Today's commit log (io/commit_log.py: one small record per part, a checkpoint of the whole
state every K records) beside the previous protocol (`_manifest.json`, listing every part,
rewritten with `write_manifest` after each part), in the same run, on the same disk.

- commit: the mean time of `CommitLog.append` over a window of `--window` commits (a multiple
  of K, so the checkpoints that fall in it are amortised in the mean) after N parts are
  committed, the best of `--rounds` windows (taken in turn for each N, so a busy moment of a
  shared machine does not decide a ratio); for the previous protocol, `write_manifest` of
  N + i parts (at 100,000 parts only `--old-commits` of them: each costs a whole manifest).
- resume: `load_resume_state` of a job directory holding N part files (empty: only their
  names matter) and its log (a checkpoint and K - 1 records after it), or the previous
  format's running `_manifest.json`: seconds (best of `--repeats`), and the peak of Python's
  allocations while it runs (tracemalloc, in a separate run because tracing slows it).

Part entries look like a job's: 100 rows each, counts, one position interval, 100 parts per
input file (so the merged positions hold one interval per file). Prints the CPU and the
filesystem (fsync cost depends on them), a table, the ratios, and one JSON line last.

    python benchmarks/commit_scaling.py [--parts 1000,100000] [--window 200] [--dir /tmp]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
import tracemalloc
from pathlib import Path

from vbatch.io.commit_log import CommitLog
from vbatch.io.directory import OutputDirectory
from vbatch.io.manifest import load_resume_state, write_manifest
from vbatch.io.positions import position_of

ROWS_PER_PART = 100
PARTS_PER_FILE = 100


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def filesystem_of(path: Path) -> str:
    """The type and mount point of the filesystem holding `path` (Linux), else "unknown"."""
    try:
        mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return "unknown"
    resolved = str(path.resolve())
    best = max((m for m in mounts if resolved == m[1] or resolved.startswith(m[1].rstrip("/")
                                                                             + "/")),
               key=lambda m: len(m[1]), default=None)
    return f"{best[2]} on {best[1]}" if best else "unknown"


def part_entry(index: int) -> dict:
    file_index, within = divmod(index, PARTS_PER_FILE)
    start = position_of(file_index, within * ROWS_PER_PART)
    return {"name": f"part-{index:05d}.parquet", "num_rows": ROWS_PER_PART,
            "positions": [[start, start + ROWS_PER_PART]], "num_error_rows": index % 3,
            "num_prompt_tokens": 40 * ROWS_PER_PART, "num_output_tokens": 200 * ROWS_PER_PART}


def fingerprint(num_files: int) -> dict:
    return {"input_files": [{"path": f"/data/in/part-{i:05d}.parquet", "size": 10_000_000 + i,
                             "mtime_ns": 1_700_000_000_000_000_000 + i}
                            for i in range(num_files)],
            "model": {"source": "/models/llama", "fingerprint": "0" * 64},
            "generation": {"temperature": 0.0, "max_tokens": 256, "seed": 0},
            "vbatch_version": "bench"}


def time_log_commits(root: Path, sizes: list[int], window: int, interval: int,
                     rounds: int) -> dict[int, dict]:
    """Per size N: the best mean seconds per `append` over `window` commits (`rounds` windows,
    the sizes in turn) once N parts are committed (the few parts added by earlier windows
    aside), the writer's start (its first checkpoint) and the checkpoint's size."""
    results, logs, directories = {}, {}, []
    for n in sizes:
        directory = OutputDirectory.open(root / f"log-{n}")
        directories.append(directory)
        parts = [part_entry(i) for i in range(n)]
        started = time.perf_counter()
        logs[n] = CommitLog(directory, fingerprint=fingerprint(n // PARTS_PER_FILE + 1),
                            parts=parts, checkpoint_interval=interval)
        results[n] = {"commit_s": float("inf"), "start_s": time.perf_counter() - started}
    for round_index in range(rounds):
        for n in sizes:
            first = n + round_index * window
            new = [part_entry(first + i) for i in range(window)]
            started = time.perf_counter()
            for entry in new:
                logs[n].append(entry)
            mean_s = (time.perf_counter() - started) / window
            results[n]["commit_s"] = min(results[n]["commit_s"], mean_s)
    for n, directory in zip(sizes, directories):
        results[n]["checkpoint_bytes"] = max(
            os.stat(name, dir_fd=directory.fd).st_size
            for name in directory.names() if name.startswith("_checkpoint"))
        directory.close()
    return results


def time_manifest_commits(root: Path, num_parts: int, commits: int) -> dict:
    """Mean seconds per whole-manifest rewrite (the previous protocol) after `num_parts`."""
    with OutputDirectory.open(root / f"manifest-{num_parts}") as directory:
        parts = [part_entry(i) for i in range(num_parts)]
        job = {"fingerprint": fingerprint(num_parts // PARTS_PER_FILE + 1), "status": "running"}
        started = time.perf_counter()
        for i in range(commits):
            parts.append(part_entry(num_parts + i))
            write_manifest(directory, job, parts)
        mean_s = (time.perf_counter() - started) / commits
        size = os.stat("_manifest.json", dir_fd=directory.fd).st_size
    return {"commit_s": mean_s, "manifest_bytes": size}


def job_directory(root: Path, name: str, num_parts: int) -> Path:
    """A directory holding `num_parts` empty part files."""
    path = root / name
    path.mkdir()
    for i in range(num_parts):
        (path / f"part-{i:05d}.parquet").touch()
    return path


def measure_resume(path: Path, job_fingerprint: dict, repeats: int) -> dict:
    """Best seconds of `load_resume_state` and the peak of Python allocations during it."""
    best = float("inf")
    with OutputDirectory.open(path) as directory:
        for _ in range(repeats):
            started = time.perf_counter()
            state = load_resume_state(directory, job_fingerprint, force=False)
            best = min(best, time.perf_counter() - started)
        num_parts = len(state.parts)
        del state
        tracemalloc.start()
        load_resume_state(directory, job_fingerprint, force=False)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return {"resume_s": best, "peak_mb": peak / 2**20, "parts": num_parts}


def resume_benchmarks(root: Path, num_parts: int, interval: int, repeats: int) -> dict:
    job_fingerprint = fingerprint(num_parts // PARTS_PER_FILE + 1)
    new_dir = job_directory(root, "resume-log", num_parts)
    with OutputDirectory.open(new_dir) as directory:
        start = num_parts - (interval - 1)       # the worst case: K - 1 records to replay
        log = CommitLog(directory, fingerprint=job_fingerprint,
                        parts=[part_entry(i) for i in range(start)],
                        checkpoint_interval=interval)
        for i in range(start, num_parts):
            log.append(part_entry(i))
    old_dir = job_directory(root, "resume-manifest", num_parts)
    write_manifest(old_dir, {"fingerprint": job_fingerprint, "status": "running"},
                   [part_entry(i) for i in range(num_parts)])
    new = measure_resume(new_dir, job_fingerprint, repeats)
    old = measure_resume(old_dir, job_fingerprint, repeats)
    assert new["parts"] == old["parts"] == num_parts
    return {"log": new, "manifest": old}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="1000,100000",
                        help="committed parts to measure at, comma-separated")
    parser.add_argument("--window", type=int, default=200, help="commits timed per size")
    parser.add_argument("--checkpoint-interval", type=int, default=100)
    parser.add_argument("--old-commits", type=int, default=5,
                        help="manifest rewrites timed at the largest size")
    parser.add_argument("--rounds", type=int, default=3, help="commit windows per size")
    parser.add_argument("--repeats", type=int, default=3, help="resume runs")
    parser.add_argument("--dir", default=None, help="where to create the job directories")
    args = parser.parse_args()
    sizes = [int(text) for text in args.parts.split(",")]
    if args.window % args.checkpoint_interval:
        parser.error("--window must be a multiple of --checkpoint-interval")
    with tempfile.TemporaryDirectory(dir=args.dir) as temp:
        root = Path(temp)
        log = time_log_commits(root, sizes, args.window, args.checkpoint_interval, args.rounds)
        old = {n: time_manifest_commits(root, n, args.window if n < 10_000 else args.old_commits)
               for n in sizes}
        resume = resume_benchmarks(root, max(sizes), args.checkpoint_interval, args.repeats)
        filesystem = filesystem_of(root)
    small, large = min(sizes), max(sizes)
    print(f"CPU: {cpu_name()} ({os.cpu_count()} cores); filesystem: {filesystem}")
    print(f"K = {args.checkpoint_interval}; log commits: best of {args.rounds} windows of "
          f"{args.window} (checkpoints amortised); manifest rewrites over {args.window} "
          f"({args.old_commits} at {large:,} parts)")
    print(f"{'committed parts':>16} {'log ms/commit':>14} {'checkpoint':>11} "
          f"{'manifest ms/commit':>19} {'manifest':>10} {'manifest/log':>13}")
    for n in sizes:
        print(f"{n:>16,} {log[n]['commit_s'] * 1e3:14.3f} "
              f"{log[n]['checkpoint_bytes'] / 2**20:9.2f}MB "
              f"{old[n]['commit_s'] * 1e3:19.2f} {old[n]['manifest_bytes'] / 2**20:8.2f}MB "
              f"{old[n]['commit_s'] / log[n]['commit_s']:13.1f}")
    log_ratio = log[large]["commit_s"] / log[small]["commit_s"]
    old_ratio = old[large]["commit_s"] / old[small]["commit_s"]
    print(f"per-commit cost {large:,} vs {small:,} parts: log {log_ratio:.2f}x "
          f"(target <= 1.5x), manifest {old_ratio:.1f}x")
    print(f"resume of {large:,} parts: log (checkpoint + {args.checkpoint_interval - 1} "
          f"records) {resume['log']['resume_s']:.2f} s, peak {resume['log']['peak_mb']:.0f} MB; "
          f"manifest {resume['manifest']['resume_s']:.2f} s, "
          f"peak {resume['manifest']['peak_mb']:.0f} MB")
    print(f"writer start with {large:,} parts (its checkpoint): {log[large]['start_s']:.2f} s")
    print(json.dumps({"cpu": cpu_name(), "filesystem": filesystem,
                      "checkpoint_interval": args.checkpoint_interval,
                      "log_commit_ms": {n: round(log[n]["commit_s"] * 1e3, 4) for n in sizes},
                      "manifest_commit_ms": {n: round(old[n]["commit_s"] * 1e3, 3)
                                             for n in sizes},
                      "log_ratio": round(log_ratio, 3), "manifest_ratio": round(old_ratio, 2),
                      "resume": {kind: {k: round(v, 3) for k, v in values.items()}
                                 for kind, values in resume.items()}}))


if __name__ == "__main__":
    main()
