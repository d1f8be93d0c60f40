"""End-to-end batch throughput: `vbatch run` vs. plain Hugging Face `generate`, same workload.

The fixed workload: the prompts of `examples/prompts.jsonl` (all 256 by default), chat template
applied, 64 new tokens, greedy, EOS respected, vbatch's default model (SmolLM2-135M-Instruct from
the GGUF, converted once to float32 safetensors; both systems load exactly that directory).

(a) vbatch: the real command line as a subprocess,
        vbatch run PROMPTS --chat --max-tokens 64 --temperature 0 --output TMP --overwrite --quiet
    [+ --vbatch-args], timed from the parent (whole process: start-up, model load, generation,
    writing Parquet). Output tokens are summed from the output Parquet's `num_generated_tokens`.
(b) HF: `benchmarks/hf_baseline.py` subprocesses. First a sweep over dtypes x batch sizes on the
    first `--sweep-prompts` prompts picks HF's best setting (by generation tok/s; load time is the
    same for all settings), then the full run at that setting, timed the same way.

Reported: output tokens/s over the whole process (load included) for both, HF's generation-only
tok/s, HF's best setting, the ratio vbatch / HF, and peak memory of each (largest process from
`wait4`'s ru_maxrss, and the summed RSS of the process tree, sampled). Before timing anything the
model cache is warmed (`resolve_model(None)` in a subprocess), so a one-off GGUF conversion is not
charged to either side; `benchmarks/startup.py` measures that cold path.

Shared machines: before each timed run the script waits (`--wait-idle`) until the CPUs are idle,
measures how many cores OTHER processes used during the run (from /proc/stat minus the child's own
CPU time; column "other"), and repeats a contended run (`--attempts`), keeping the least
contended. Numbers with "other" well above 0 are pessimistic; on 2 cores they can be 5x off.

With `--compare`, greedy texts are compared row by row with HF float32 (an extra HF float32 run is
made when the best HF setting is not float32). Token-for-token agreement is expected only when
vbatch also runs in float32: pass `--vbatch-args="--dtype float32"`.

Run (from the repository root, after `pip install -e .`):

    python benchmarks/throughput.py                      # sweep + full runs, ~5-10 min on 2 cores
    python benchmarks/throughput.py --skip-sweep --hf-batch-size 64 --hf-dtype bfloat16
    python benchmarks/throughput.py --vbatch-args="--dtype float32" --compare --num-prompts 64
    python benchmarks/throughput.py --hf-only            # only the HF side (no vbatch needed)

Prints a readable table and, as the last stdout line, one JSON object.
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
DEFAULT_PROMPTS = REPO_ROOT / "examples" / "prompts.jsonl"
HF_BASELINE = Path(__file__).resolve().parent / "hf_baseline.py"
WAIT_IDLE_S = 60.0  # set from --wait-idle
ATTEMPTS = 3  # set from --attempts


def measure(cmd: list[str]) -> tuple[Measured, float | None]:
    """Run `cmd` measured, after waiting for the machine to go idle, and again (up to ATTEMPTS
    times) if other processes competed for the CPUs meanwhile. Returns the least contended run
    and the average number of cores other work used during it."""
    measured = run_uncontended(cmd, attempts=ATTEMPTS, wait_idle_s=WAIT_IDLE_S,
                               cwd=str(REPO_ROOT))
    others = None if measured.others_cores is None else round(measured.others_cores, 2)
    return measured, others


def fail(message: str) -> None:
    print(f"throughput: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def find_vbatch() -> str:
    exe = shutil.which("vbatch")
    if exe is None:
        fail("vbatch is not installed (no `vbatch` command on PATH). Install it from the "
             "repository root with `pip install -e .`, or pass --hf-only to run only the HF side.")
    return exe


def resolve_default_model() -> tuple[str, float]:
    """Path of vbatch's default model dir (converting the GGUF if needed) and the time it took."""
    code = ("from vbatch.engine.loader import resolve_model; "
            "print(resolve_model(None).path)")
    measured = run_measured([sys.executable, "-c", code], cwd=str(REPO_ROOT))
    if measured.returncode != 0:
        fail("could not resolve vbatch's default model with vbatch.engine.loader.resolve_model "
             "(is vbatch installed? `pip install -e .`), or pass --hf-model DIR:\n"
             + measured.tail())
    return measured.stdout.strip().splitlines()[-1], measured.wall_s


def read_rows(path: str, num_prompts: int | None) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows[:num_prompts] if num_prompts else rows


def run_hf(model_dir: str, prompts: str, batch_size: int, dtype: str, max_tokens: int,
           num_prompts: int | None = None, texts_out: str | None = None) -> tuple[dict, Measured]:
    cmd = [sys.executable, str(HF_BASELINE), "--model", model_dir, "--prompts", prompts,
           "--batch-size", str(batch_size), "--dtype", dtype, "--max-new-tokens", str(max_tokens),
           "--json-only"]
    if num_prompts is not None:
        cmd += ["--num-prompts", str(num_prompts)]
    if texts_out:
        cmd += ["--texts-out", texts_out]
    measured, busy = measure(cmd)
    if measured.returncode != 0:
        fail(f"hf_baseline failed (exit {measured.returncode}):\n{measured.tail()}")
    report = measured.last_json_line()
    report["parent_wall_s"] = round(measured.wall_s, 3)
    report["parent_tok_s"] = round(report["output_tokens"] / measured.wall_s, 2)
    report["others_cores"] = busy
    report["cpu_per_wall"] = round(measured.cpu_per_wall, 2)
    return report, measured


def read_vbatch_output(output_dir: Path) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not (output_dir / "_SUCCESS").exists():
        fail(f"vbatch finished but wrote no _SUCCESS in {output_dir}")
    parts = sorted(p for p in output_dir.rglob("*.parquet") if not p.name.startswith((".", "_")))
    if not parts:
        fail(f"vbatch wrote no Parquet part files in {output_dir}")
    table = pa.concat_tables([pq.read_table(p) for p in parts], promote_options="default")
    for column in ("generated_text", "num_generated_tokens"):
        if column not in table.column_names:
            fail(f"vbatch output has no column {column!r} (columns: {table.column_names})")
    return table.to_pylist()


def vbatch_dtype(vbatch_args: list[str]) -> str:
    for i, arg in enumerate(vbatch_args):
        if arg == "--dtype" and i + 1 < len(vbatch_args):
            return vbatch_args[i + 1]
        if arg.startswith("--dtype="):
            return arg.split("=", 1)[1]
    return os.environ.get("VBATCH_DTYPE", "auto")


def fmt_cores(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def fmt_mb(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", default=str(DEFAULT_PROMPTS), help="JSONL with id/prompt")
    parser.add_argument("--num-prompts", type=int, default=None, help="first N prompts (all)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--vbatch-args", default="",
                        help='extra flags for `vbatch run`, e.g. --vbatch-args="--dtype float32"')
    parser.add_argument("--hf-model", help="HF model dir (default: resolve_model(None).path)")
    parser.add_argument("--hf-only", action="store_true", help="skip vbatch; HF side only")
    parser.add_argument("--skip-sweep", action="store_true",
                        help="no sweep: use --hf-batch-size and --hf-dtype")
    parser.add_argument("--hf-batch-size", type=int, default=64)
    parser.add_argument("--hf-dtype", default="bfloat16", choices=("float32", "bfloat16"))
    parser.add_argument("--sweep-dtypes", default="float32,bfloat16")
    parser.add_argument("--sweep-batch-sizes", default="32,64,128")
    parser.add_argument("--sweep-prompts", type=int, default=128,
                        help="sweep on the first N prompts (>= the largest batch size, so every "
                             "batch size is really exercised)")
    parser.add_argument("--compare", action="store_true",
                        help="compare vbatch's greedy texts with HF float32 row by row")
    add_contention_arguments(parser)
    parser.add_argument("--keep-output", help="write vbatch's output here instead of a temp dir")
    args = parser.parse_args()

    global WAIT_IDLE_S, ATTEMPTS
    WAIT_IDLE_S, ATTEMPTS = args.wait_idle, args.attempts
    vbatch_args = shlex.split(args.vbatch_args)
    vbatch_exe = None if args.hf_only else find_vbatch()  # fail fast, before any long HF run
    rows = read_rows(args.prompts, args.num_prompts)
    if not rows:
        fail(f"no prompts in {args.prompts}")

    tmp = Path(tempfile.mkdtemp(prefix="vbatch_throughput_"))
    prompts_path = str(tmp / "prompts.jsonl")
    with open(prompts_path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")

    if args.hf_model:
        model_dir, resolve_s = args.hf_model, None
    else:
        model_dir, resolve_s = resolve_default_model()
        print(f"model cache warmed: {model_dir} ({resolve_s:.1f} s)", flush=True)

    result: dict = {"workload": {"prompts": args.prompts, "rows": len(rows),
                                 "max_tokens": args.max_tokens, "greedy": True, "chat": True,
                                 "eos": True, "model_dir": model_dir}}

    # ---- (a) vbatch ------------------------------------------------------------------------
    vb = None
    vbatch_rows: list[dict] = []
    if vbatch_exe is not None:
        output_dir = Path(args.keep_output) if args.keep_output else tmp / "vbatch_out"
        cmd = [vbatch_exe, "run", prompts_path, "--chat", "--max-tokens", str(args.max_tokens),
               "--temperature", "0", "--output", str(output_dir), "--overwrite", "--quiet",
               *vbatch_args]
        print(f"running: {shlex.join(cmd)}", flush=True)
        measured, busy = measure(cmd)
        if measured.returncode != 0:
            fail(f"vbatch run failed (exit {measured.returncode}):\n{measured.tail()}")
        vbatch_rows = read_vbatch_output(output_dir)
        if len(vbatch_rows) != len(rows):
            fail(f"vbatch wrote {len(vbatch_rows)} rows, expected {len(rows)}")
        output_tokens = sum(int(r["num_generated_tokens"]) for r in vbatch_rows)
        vb = {
            "args": vbatch_args,
            "dtype": vbatch_dtype(vbatch_args),
            "rows": len(vbatch_rows),
            "output_tokens": output_tokens,
            "wall_s": round(measured.wall_s, 3),
            "tok_s": round(output_tokens / measured.wall_s, 2),
            "max_rss_mb": round(measured.max_rss_mb, 1),
            "tree_peak_rss_mb": None if measured.tree_peak_rss_mb is None
            else round(measured.tree_peak_rss_mb, 1),
            "others_cores": busy,
            "cpu_per_wall": round(measured.cpu_per_wall, 2),
            "summary": measured.stderr.strip().splitlines()[-6:],
        }
        result["vbatch"] = vb
        print(f"  vbatch: {output_tokens} tokens in {measured.wall_s:.2f} s "
              f"= {vb['tok_s']:.1f} tok/s", flush=True)

    # ---- (b) HF: sweep, then the full run -----------------------------------------------------
    sweep: list[dict] = []
    if args.skip_sweep:
        best_dtype, best_bs = args.hf_dtype, args.hf_batch_size
    else:
        sweep_n = min(args.sweep_prompts, len(rows))
        for dtype in args.sweep_dtypes.split(","):
            for bs in (int(b) for b in args.sweep_batch_sizes.split(",")):
                report, _ = run_hf(model_dir, prompts_path, bs, dtype, args.max_tokens, sweep_n)
                sweep.append(report)
                print(f"  sweep HF {dtype:<8} batch {bs:>4} on {sweep_n} prompts: "
                      f"{report['tok_s_generate']:7.1f} tok/s generate, "
                      f"{report['parent_tok_s']:7.1f} tok/s whole process", flush=True)
        best = max(sweep, key=lambda r: r["tok_s_generate"])
        best_dtype, best_bs = best["dtype"], best["batch_size"]
        result["hf_sweep"] = [
            {k: r[k] for k in ("dtype", "batch_size", "rows", "output_tokens", "generate_s",
                               "tok_s_generate", "parent_wall_s", "parent_tok_s", "peak_rss_mb",
                               "others_cores")}
            for r in sweep
        ]

    want_texts = args.compare and vb is not None
    hf_texts_path = str(tmp / "hf_texts.jsonl") if want_texts and best_dtype == "float32" else None
    print(f"running HF full: dtype={best_dtype} batch_size={best_bs} rows={len(rows)}", flush=True)
    hf, hf_measured = run_hf(model_dir, prompts_path, best_bs, best_dtype, args.max_tokens,
                             texts_out=hf_texts_path)
    hf["max_rss_mb"] = round(hf_measured.max_rss_mb, 1)
    hf["tree_peak_rss_mb"] = None if hf_measured.tree_peak_rss_mb is None \
        else round(hf_measured.tree_peak_rss_mb, 1)
    result["hf"] = hf
    print(f"  HF: {hf['output_tokens']} tokens in {hf['parent_wall_s']:.2f} s "
          f"= {hf['parent_tok_s']:.1f} tok/s", flush=True)

    # ---- agreement --------------------------------------------------------------------------
    if want_texts:
        if hf_texts_path is None:
            fp32_bs = max((r for r in sweep if r["dtype"] == "float32"),
                          key=lambda r: r["tok_s_generate"], default={"batch_size": 64})
            hf_texts_path = str(tmp / "hf_texts.jsonl")
            print(f"running HF float32 (batch {fp32_bs['batch_size']}) for --compare", flush=True)
            run_hf(model_dir, prompts_path, fp32_bs["batch_size"], "float32", args.max_tokens,
                   texts_out=hf_texts_path)
        with open(hf_texts_path, encoding="utf-8") as f:
            hf_by_id = {str(r["id"]): r for r in map(json.loads, f)}
        id_key = "id" if vbatch_rows and "id" in vbatch_rows[0] else None
        num_text_equal = num_count_equal = num_matched = 0
        for row in vbatch_rows:
            ref = hf_by_id.get(str(row[id_key])) if id_key else None
            if ref is None:
                continue
            num_matched += 1
            num_text_equal += row["generated_text"] == ref["text"]
            num_count_equal += int(row["num_generated_tokens"]) == ref["num_generated_tokens"]
        result["agreement"] = {
            "vbatch_dtype": vb["dtype"], "hf_dtype": "float32", "rows_compared": num_matched,
            "texts_equal": num_text_equal, "token_counts_equal": num_count_equal,
        }

    # ---- report -----------------------------------------------------------------------------
    print()
    print(f"Workload: {len(rows)} chat prompts from {args.prompts}, {args.max_tokens} new tokens, "
          f"greedy, EOS respected; model {model_dir}")
    if sweep:
        print(f"\nHF sweep (first {min(args.sweep_prompts, len(rows))} prompts):")
        print(f"  {'dtype':<9} {'batch':>5} {'out tok':>8} {'gen s':>7} {'gen tok/s':>10} "
              f"{'wall s':>7} {'wall tok/s':>11} {'peak RSS':>10} {'other':>5}")
        for r in sweep:
            print(f"  {r['dtype']:<9} {r['batch_size']:>5} {r['output_tokens']:>8} "
                  f"{r['generate_s']:>7.2f} {r['tok_s_generate']:>10.1f} {r['parent_wall_s']:>7.2f}"
                  f" {r['parent_tok_s']:>11.1f} {r['peak_rss_mb']:>6.0f} MiB "
                  f"{fmt_cores(r['others_cores']):>5}")
    print(f"\nFull run ({len(rows)} prompts), whole process timed from the parent "
          f"(cores = its CPU time / wall time; other = cores used by other processes meanwhile):")
    print(f"  {'system':<34} {'out tok':>8} {'wall s':>7} {'tok/s':>8} {'max RSS':>10} "
          f"{'tree RSS':>10} {'cores':>5} {'other':>5}")
    if vb is not None:
        label = "vbatch run " + " ".join(vbatch_args)
        print(f"  {label:<34} {vb['output_tokens']:>8} {vb['wall_s']:>7.2f} {vb['tok_s']:>8.1f} "
              f"{fmt_mb(vb['max_rss_mb']):>10} {fmt_mb(vb['tree_peak_rss_mb']):>10} "
              f"{vb['cpu_per_wall']:>5.2f} {fmt_cores(vb['others_cores']):>5}")
    label = f"HF generate {best_dtype} batch {best_bs}"
    print(f"  {label:<34} {hf['output_tokens']:>8} {hf['parent_wall_s']:>7.2f} "
          f"{hf['parent_tok_s']:>8.1f} {fmt_mb(hf['max_rss_mb']):>10} "
          f"{fmt_mb(hf['tree_peak_rss_mb']):>10} {hf['cpu_per_wall']:>5.2f} "
          f"{fmt_cores(hf['others_cores']):>5}")
    print(f"  (HF: load {hf['load_s']:.2f} s, generation only {hf['tok_s_generate']:.1f} tok/s)")
    result["hf_best"] = {"dtype": best_dtype, "batch_size": best_bs}
    if vb is not None:
        ratio = vb["tok_s"] / hf["parent_tok_s"]
        result["ratio_vbatch_over_hf"] = round(ratio, 3)
        print(f"\nvbatch / HF (whole-process output tok/s): {ratio:.2f}x")
    if "agreement" in result:
        a = result["agreement"]
        note = "" if a["vbatch_dtype"] == "float32" else \
            f" (vbatch ran {a['vbatch_dtype']}: drift vs float32 is expected)"
        print(f"Agreement with HF float32: {a['texts_equal']}/{a['rows_compared']} texts equal, "
              f"{a['token_counts_equal']}/{a['rows_compared']} token counts equal{note}")
    shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
