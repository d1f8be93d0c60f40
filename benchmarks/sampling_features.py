"""What structured outputs and logprobs cost: ratios against the same work without them.

Workload: vbatch's default model (SmolLM2-135M-Instruct), the 256 prompts of
`examples/prompts.jsonl` turned into labelling questions ("... positive, negative or neutral?
Answer with one word."), chat template, in one process through `vbatch.LLM`, default dtype.

  choice     `choice=[positive, negative, neutral]`, greedy, vs. the same prompts unconstrained
             with each row's max_tokens set to the constrained row's token count (EOS ignored):
             the same prefill and decode work, so the ratio is the constraint's own cost.
  json       a JSON schema (nested object, enum, integer bounds, array, required keys) at
             temperature 0.7, vs. unconstrained rows of the same token counts.
  logprobs   greedy, 32 tokens a row (EOS ignored) with `logprobs=5`, vs. the same without.

Each pair runs A, B, A, B and keeps each side's faster run (tok/s = generated tokens / wall time
of `generate`). Also printed: the microseconds to fill one row's bitmask for each grammar.
The CPU is reported with the figures. Prints a table and, last, one JSON line.

    python benchmarks/sampling_features.py [--num-prompts 256]
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
LABELS = ["positive", "negative", "neutral"]
SCHEMA = {
    "type": "object",
    "properties": {
        "label": {"enum": LABELS},
        "confidence": {"type": "integer", "minimum": 0, "maximum": 100},
        "topics": {"type": "array", "items": {"type": "string", "maxLength": 12},
                   "maxItems": 3},
        "source": {"type": "object", "properties": {"kind": {"enum": ["review", "news"]}},
                   "required": ["kind"]},
    },
    "required": ["label", "confidence", "source"],
}


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def cpu_flags() -> str:
    text = Path("/proc/cpuinfo").read_text()
    return ",".join(flag for flag in ("avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")
                    if flag in text)


def conversations(num_prompts: int) -> list[list[dict]]:
    rows = [json.loads(line) for line in
            (REPO_ROOT / "examples" / "prompts.jsonl").read_text().splitlines()]
    texts = [row.get("prompt") or row["messages"][-1]["content"] for row in rows]
    texts = (texts * (num_prompts // len(texts) + 1))[:num_prompts]
    return [[{"role": "user", "content": f"Text: {text}\nIs this text positive, negative or "
                                         "neutral? Answer with one word."}] for text in texts]


def timed(llm, prompts, params) -> tuple[float, int, list]:
    start = time.perf_counter()
    outputs = llm.chat(prompts, params)
    seconds = time.perf_counter() - start
    return seconds, sum(len(c.token_ids) for o in outputs for c in o.outputs), outputs


def pair(llm, prompts, params_a, params_b, name: str) -> dict:
    """Best of three alternating runs of each side, after one unmeasured run of each (warm
    caches and allocator): tok/s and the ratio b / a (printed)."""
    timed(llm, prompts, params_a)
    timed(llm, prompts, params_b)
    best = {"a": 0.0, "b": 0.0}
    tokens = {}
    for _ in range(3):
        for side, params in (("a", params_a), ("b", params_b)):
            seconds, num_tokens, _ = timed(llm, prompts, params)
            best[side] = max(best[side], num_tokens / seconds)
            tokens[side] = num_tokens
    result = {"baseline_tok_s": round(best["a"], 1), "with_tok_s": round(best["b"], 1),
              "ratio": round(best["b"] / best["a"], 3), "tokens": tokens}
    print(f"{name:11s} baseline {result['baseline_tok_s']:8.1f} tok/s   with "
          f"{result['with_tok_s']:8.1f} tok/s   ratio {result['ratio']:.3f}", flush=True)
    return result


def same_lengths(outputs, temperature: float):
    from vbatch import SamplingParams
    return [SamplingParams(temperature=temperature, seed=1, ignore_eos=True,
                           max_tokens=max(1, len(o.outputs[0].token_ids))) for o in outputs]


def fill_cost_us(llm, constraint, steps: int = 200) -> float:
    """Microseconds to fill one row's bitmask at the grammar's start state (averaged)."""
    from vbatch.engine.structured_output import allocate_bitmask
    engine = llm.llm_engine
    matcher = engine._grammar_cache().new_matcher(constraint)
    bitmask = allocate_bitmask(1, engine.hf_config.vocab_size)
    start = time.perf_counter()
    for _ in range(steps):
        matcher.fill_bitmask(bitmask, 0)
    return (time.perf_counter() - start) / steps * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--only", default="choice,json,logprobs",
                        help="comma-separated subset of: choice, json, logprobs")
    args = parser.parse_args()
    wanted = set(args.only.split(","))
    from vbatch import LLM, SamplingParams
    from vbatch.engine.structured_output import StructuredOutputsParams

    llm = LLM()
    prompts = conversations(args.num_prompts)
    choice = StructuredOutputsParams(choice=LABELS)
    schema = StructuredOutputsParams(json=SCHEMA)
    results = {"cpu": cpu_name(), "cpu_flags": cpu_flags(), "num_prompts": len(prompts),
               "dtype": str(llm.llm_engine.dtype)}

    print(f"CPU: {results['cpu']} ({results['cpu_flags'] or 'no bf16/vnni/amx flags'}), "
          f"{results['dtype']}, {results['num_prompts']} prompts", flush=True)
    if "choice" in wanted:
        constrained = SamplingParams(temperature=0, max_tokens=8, structured_outputs=choice)
        _, _, outputs = timed(llm, prompts, constrained)          # warm-up, and the lengths
        assert all(c.text in LABELS for o in outputs for c in o.outputs)
        results["choice"] = pair(llm, prompts, same_lengths(outputs, 0.0), constrained,
                                 "choice")
    if "json" in wanted:
        json_params = SamplingParams(temperature=0.7, seed=1, max_tokens=96,
                                     structured_outputs=schema)
        _, _, outputs = timed(llm, prompts, json_params)
        results["json"] = pair(llm, prompts, same_lengths(outputs, 0.7), json_params, "json")
        results["json"]["finished_stop"] = sum(o.outputs[0].finish_reason == "stop"
                                               for o in outputs)
    if "logprobs" in wanted:
        plain = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
        with_logprobs = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True,
                                       logprobs=5)
        results["logprobs_5"] = pair(llm, prompts, plain, with_logprobs, "logprobs_5")

    results["mask_fill_us_per_row"] = {"choice": round(fill_cost_us(llm, choice), 1),
                                       "json": round(fill_cost_us(llm, schema), 1)}
    llm.llm_engine.shutdown()

    print(f"mask fill per row: {results['mask_fill_us_per_row']} us")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
