"""Start-up cost of `vbatch run`: a one-prompt job, cold and warm, timed from the parent.

What it measures, each as a whole subprocess (interpreter start to exit) timed from the parent:

- floor: `python -c "import torch"` (best of 3) — nothing that uses torch can start faster;
- `vbatch --version` — the CLI's own import cost (it should not import torch);
- cold: `vbatch run ONE.jsonl --max-tokens 1 ...` with the default model and an empty
  `VBATCH_CACHE_DIR` (a fresh temp dir), so the GGUF -> safetensors conversion is included;
- warm: the same command twice more with the now-filled cache;
- reference (unless --no-hf): `benchmarks/hf_baseline.py` on the cached HF directory, one prompt,
  one new token (what plain transformers costs to start up on the same weights).

As in `throughput.py`, each timed run first waits for an idle machine (`--wait-idle`) and warm runs
are repeated while other processes competed for the CPUs (`--attempts`; column "other" = cores used
by other processes meanwhile). Each row shows the wall time, the peak RSS of the largest process
(`wait4` ru_maxrss) and the sampled peak of the summed RSS of the process tree.

Run (from the repository root, after `pip install -e .`):

    python benchmarks/startup.py
    python benchmarks/startup.py --warm-runs 5 --vbatch-args="--dtype float32"

Prints a table and, as the last stdout line, one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _proc import Measured, add_contention_arguments, run_measured, run_uncontended  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
HF_BASELINE = Path(__file__).resolve().parent / "hf_baseline.py"


def fail(message: str) -> None:
    print(f"startup: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def dir_size_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--warm-runs", type=int, default=2, help="warm runs after the cold one")
    parser.add_argument("--max-tokens", type=int, default=1)
    parser.add_argument("--vbatch-args", default="", help="extra flags for `vbatch run`")
    parser.add_argument("--no-hf", action="store_true", help="skip the HF reference row")
    add_contention_arguments(parser)
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (cache, outputs)")
    args = parser.parse_args()

    vbatch_exe = shutil.which("vbatch")
    if vbatch_exe is None:
        fail("vbatch is not installed (no `vbatch` command on PATH); install it from the "
             "repository root with `pip install -e .`")

    tmp = Path(tempfile.mkdtemp(prefix="vbatch_startup_"))
    cache_dir = tmp / "cache"
    cache_dir.mkdir()
    env = dict(os.environ, VBATCH_CACHE_DIR=str(cache_dir))
    prompt_file = tmp / "one.jsonl"
    prompt_file.write_text(json.dumps({"id": "p-0", "prompt": "Say hello in one word."}) + "\n")

    rows: list[tuple[str, Measured]] = []

    def record(label: str, cmd: list[str], *, check: bool = True, cold: bool = False) -> Measured:
        # The cold run is not repeated: a second try would find the cache filled.
        measured = run_uncontended(cmd, attempts=1 if cold else args.attempts,
                                   wait_idle_s=args.wait_idle, env=env, cwd=str(REPO_ROOT))
        if check and measured.returncode != 0:
            fail(f"{label} failed (exit {measured.returncode}): {shlex.join(cmd)}\n"
                 f"{measured.tail()}")
        rows.append((label, measured))
        print(f"  {label:<34} {measured.wall_s:7.2f} s", flush=True)
        return measured

    floors = [run_uncontended([sys.executable, "-c", "import torch"], attempts=args.attempts,
                              wait_idle_s=args.wait_idle, env=env) for _ in range(3)]
    best_floor = min(floors, key=lambda m: m.wall_s)
    rows.append(("python -c 'import torch' (best of 3)", best_floor))
    print(f"  {rows[-1][0]:<34} {best_floor.wall_s:7.2f} s", flush=True)
    record("vbatch --version", [vbatch_exe, "--version"])

    extra = shlex.split(args.vbatch_args)

    def vbatch_cmd(run_index: int) -> list[str]:
        return [vbatch_exe, "run", str(prompt_file), "--chat", "--max-tokens",
                str(args.max_tokens), "--temperature", "0", "--output",
                str(tmp / f"out{run_index}"), "--overwrite", "--quiet", *extra]

    record("vbatch run, cold (empty cache)", vbatch_cmd(0), cold=True)
    cache_mb = dir_size_mb(cache_dir)
    cache_note = None
    if cache_mb < 1:
        cache_note = ("VBATCH_CACHE_DIR stayed empty: vbatch may not honour it, so the 'cold' run "
                      "may have used an existing cache")
        print(f"  warning: {cache_note}", file=sys.stderr)
    for i in range(1, args.warm_runs + 1):
        record(f"vbatch run, warm #{i}", vbatch_cmd(i))
    for i in range(args.warm_runs + 1):
        if not (tmp / f"out{i}" / "_SUCCESS").exists():
            fail(f"vbatch run #{i} wrote no _SUCCESS in {tmp / f'out{i}'}")

    if not args.no_hf:
        code = "from vbatch.engine.loader import resolve_model; print(resolve_model(None).path)"
        resolved = run_measured([sys.executable, "-c", code], env=env, cwd=str(REPO_ROOT))
        if resolved.returncode == 0:
            model_dir = resolved.stdout.strip().splitlines()[-1]
            record("HF transformers (same weights)",
                   [sys.executable, str(HF_BASELINE), "--model", model_dir, "--num-prompts", "1",
                    "--batch-size", "1", "--max-new-tokens", str(args.max_tokens), "--json-only"])
        else:
            print(f"  (skipping the HF row: resolve_model failed: {resolved.tail(3)})",
                  file=sys.stderr)

    floor_s = best_floor.wall_s
    print(f"\nStart-up of a one-prompt job (--max-tokens {args.max_tokens}), default model, "
          f"whole process timed from the parent:")
    print(f"  {'run':<38} {'wall s':>7} {'- floor':>8} {'max RSS':>9} {'tree RSS':>9} "
          f"{'other':>5}")
    table = []
    for label, m in rows:
        tree = "n/a" if m.tree_peak_rss_mb is None else f"{m.tree_peak_rss_mb:,.0f}M"
        other = "n/a" if m.others_cores is None else f"{m.others_cores:.2f}"
        print(f"  {label:<38} {m.wall_s:>7.2f} {m.wall_s - floor_s:>+8.2f} "
              f"{m.max_rss_mb:>8,.0f}M {tree:>9} {other:>5}")
        table.append({"run": label, "wall_s": round(m.wall_s, 3),
                      "over_floor_s": round(m.wall_s - floor_s, 3),
                      "max_rss_mb": round(m.max_rss_mb, 1),
                      "tree_peak_rss_mb": None if m.tree_peak_rss_mb is None
                      else round(m.tree_peak_rss_mb, 1),
                      "others_cores": None if m.others_cores is None
                      else round(m.others_cores, 2)})
    print(f"  cache after the cold run: {cache_mb:,.0f} MiB in {cache_dir}")
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps({"runs": table, "cache_mb": round(cache_mb, 1), "note": cache_note,
                      "vbatch_args": extra, "max_tokens": args.max_tokens}))


if __name__ == "__main__":
    main()
