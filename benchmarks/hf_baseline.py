"""Plain Hugging Face `model.generate` baseline for batch inference on CPU.

What it measures: one process that loads a Hugging Face-style model directory with
`AutoModelForCausalLM` + `AutoTokenizer`, applies the chat template to every prompt
(`add_generation_prompt=True`), left-pads fixed-size batches of B prompts in input order and runs
greedy `generate` (`do_sample=False`, `max_new_tokens=64` by default, EOS respected) under
`torch.inference_mode()` with `torch.set_num_threads(2)`.

Output tokens are counted as a user would count them: per row, the generated tokens up to and
including the first EOS, not the padding `generate` appends after a row has finished (a row that
never emits EOS counts `max_new_tokens`). Times:

- `load_s`: model + tokenizer load (after `import torch, transformers`);
- `generate_s`: tokenization + all `generate` calls + decoding;
- `wall_s`: the whole process, from the kernel's process start time (so interpreter start-up and
  imports are included) to the end of generation.

By default the model is vbatch's default model, i.e. the directory that
`vbatch.engine.loader.resolve_model(None).path` returns (the SmolLM2-135M-Instruct GGUF converted
to float32 safetensors), so this baseline and `vbatch run` use exactly the same weights.

Run (from the repository root):

    python benchmarks/hf_baseline.py --batch-size 64 --dtype bfloat16
    python benchmarks/hf_baseline.py --model /path/to/hf_dir --num-prompts 64 --dtype float32 \
        --texts-out /tmp/hf_fp32.jsonl

It prints a readable table and, as the LAST stdout line, one JSON object (what
`benchmarks/throughput.py` parses).
"""
from __future__ import annotations

import time

_T_MAIN_START = time.time()  # fallback when the kernel's process start time is unavailable

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PROMPTS = REPO_ROOT / "examples" / "prompts.jsonl"
DTYPES = ("float32", "bfloat16", "float16")


def process_start_time() -> float:
    """Unix time at which this process started (Linux /proc), else the time this module started."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            # The comm field (2) may contain spaces; the fields after the last ')' are fixed.
            fields = f.read().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])  # field 22 overall: starttime, in clock ticks since boot
        with open("/proc/stat", encoding="ascii") as f:
            boot_time = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return boot_time + start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return _T_MAIN_START


def default_model_dir() -> str:
    """The HF-style directory of vbatch's default model (the same weights `vbatch run` uses)."""
    try:
        from vbatch.engine.loader import resolve_model
    except ImportError as exc:
        raise SystemExit(
            "hf_baseline: cannot import vbatch.engine.loader.resolve_model "
            f"({exc}); install vbatch (`pip install -e .`) or pass --model DIR"
        ) from exc
    return str(resolve_model(None).path)


def read_prompts(path: str, prompt_column: str, id_column: str, limit: int | None) -> list[dict]:
    """Rows of a JSONL or CSV file as dicts with at least `id` and `prompt`."""
    rows: list[dict] = []
    if path.endswith(".csv"):
        import csv

        with open(path, newline="", encoding="utf-8") as f:
            records = list(csv.DictReader(f))
    else:
        with open(path, encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
    for index, record in enumerate(records):
        if prompt_column not in record:
            raise SystemExit(f"hf_baseline: {path} row {index} has no column {prompt_column!r}")
        rows.append({"id": record.get(id_column, index), "prompt": record[prompt_column]})
    return rows[:limit] if limit is not None else rows


def count_until_eos(token_ids: list[int], eos_ids: set[int]) -> int:
    """Generated tokens up to and including the first EOS (all of them if there is none)."""
    for position, token_id in enumerate(token_ids):
        if token_id in eos_ids:
            return position + 1
    return len(token_ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model",
                        help="HF-style model directory (default: vbatch's default model)")
    parser.add_argument("--prompts", default=str(DEFAULT_PROMPTS), help="JSONL or CSV input")
    parser.add_argument("--prompt-column", default="prompt")
    parser.add_argument("--id-column", default="id")
    parser.add_argument("--num-prompts", type=int, default=None, help="use only the first N rows")
    parser.add_argument("--batch-size", "-b", type=int, default=64)
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--ignore-eos", action="store_true", help="always generate max-new-tokens")
    parser.add_argument("--no-chat", action="store_true", help="raw prompts, no chat template")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--texts-out", help="write {id, text, num_generated_tokens} JSONL here")
    parser.add_argument("--json-only", action="store_true", help="print only the JSON line")
    args = parser.parse_args()

    t_start = process_start_time()
    rows = read_prompts(args.prompts, args.prompt_column, args.id_column, args.num_prompts)
    if not rows:
        raise SystemExit("hf_baseline: no prompts")
    model_dir = args.model or default_model_dir()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    t_load = time.time()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, args.dtype))
    model.eval()
    load_s = time.time() - t_load

    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
    if tokenizer.eos_token_id is not None:
        eos_ids.add(tokenizer.eos_token_id)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids)
    if args.ignore_eos:
        model.generation_config.eos_token_id = None  # transformers 5: the only way to disable it

    if args.no_chat:
        texts = [row["prompt"] for row in rows]
    else:
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": row["prompt"]}],
                add_generation_prompt=True,
                tokenize=False,
            )
            for row in rows
        ]

    t_gen = time.time()
    num_prompt_tokens = 0
    num_output_tokens = 0
    num_steps = 0
    results: list[dict] = []
    with torch.inference_mode():
        for begin in range(0, len(texts), args.batch_size):
            batch = tokenizer(
                texts[begin : begin + args.batch_size],
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,
            )
            num_prompt_tokens += int(batch["attention_mask"].sum())
            output = model.generate(
                **batch,
                do_sample=False,
                max_new_tokens=args.max_new_tokens,
                pad_token_id=pad_id,
            )
            generated = output[:, batch["input_ids"].shape[1] :].tolist()
            num_steps += len(generated[0])
            for offset, token_ids in enumerate(generated):
                n = len(token_ids) if args.ignore_eos else count_until_eos(token_ids, eos_ids)
                num_output_tokens += n
                row = rows[begin + offset]
                text = tokenizer.decode(token_ids[:n], skip_special_tokens=True)
                results.append({"id": row["id"], "text": text, "num_generated_tokens": n})
    t_end = time.time()
    generate_s = t_end - t_gen
    wall_s = t_end - t_start

    if args.texts_out:
        with open(args.texts_out, "w", encoding="utf-8") as f:
            for result in results:
                f.write(json.dumps(result, ensure_ascii=False) + "\n")

    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    report = {
        "system": "hf_generate",
        "model": model_dir,
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "max_new_tokens": args.max_new_tokens,
        "ignore_eos": args.ignore_eos,
        "rows": len(rows),
        "prompt_tokens": num_prompt_tokens,
        "output_tokens": num_output_tokens,
        "decode_steps": num_steps,
        "load_s": round(load_s, 3),
        "generate_s": round(generate_s, 3),
        "wall_s": round(wall_s, 3),
        "tok_s_wall": round(num_output_tokens / wall_s, 2),
        "tok_s_generate": round(num_output_tokens / generate_s, 2),
        "peak_rss_mb": round(peak_rss_mb, 1),
        "torch": torch.__version__,
    }
    if not args.json_only:
        print(f"HF generate baseline: {model_dir}")
        print(f"  dtype={args.dtype} batch_size={args.batch_size} threads={args.threads} "
              f"max_new_tokens={args.max_new_tokens} ignore_eos={args.ignore_eos}")
        table = [
            ("rows", f"{len(rows)}"),
            ("prompt tokens", f"{num_prompt_tokens}"),
            ("output tokens", f"{num_output_tokens}"),
            ("load", f"{load_s:.2f} s"),
            ("generate", f"{generate_s:.2f} s"),
            ("wall (whole process)", f"{wall_s:.2f} s"),
            ("output tok/s (wall)", f"{num_output_tokens / wall_s:.1f}"),
            ("output tok/s (generate)", f"{num_output_tokens / generate_s:.1f}"),
            ("peak RSS", f"{peak_rss_mb:.0f} MiB"),
        ]
        for name, value in table:
            print(f"  {name:<24} {value:>12}")
    print(json.dumps(report))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
