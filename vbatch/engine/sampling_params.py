"""Per-request sampling parameters, with vLLM's names and defaults.

Each field is an option declared once (`vbatch.options`): its checks run here for the Python
API and for per-row sampling columns, and `vbatch run` offers the fields marked for jobs as
flags (with the job's own default where it differs, e.g. `max_tokens` 256).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from vbatch.engine.structured_output import StructuredOutputsParams
from vbatch.options import (
    INT64_MAX,
    UINT64_MAX,
    at_least,
    greater_than,
    in_range,
    non_empty_strings,
    normalize_options,
    option,
    validate_options,
)

#: Most completions one prompt may ask for (each is a running sequence of the engine).
MAX_N = 1024
#: Most top alternatives `logprobs` / `prompt_logprobs` may ask for per token.
MAX_LOGPROBS = 20


def _is_structured_outputs(value: object) -> str | None:
    if value is not None and not isinstance(value, StructuredOutputsParams):
        return f"must be a StructuredOutputsParams, got {type(value).__name__}"
    return None


@dataclass
class SamplingParams:
    """How to turn a prompt's logits into tokens.

    temperature 0 means greedy (argmax). Otherwise logits are divided by `temperature`, then the
    distribution is restricted by `top_k` (keep the k most likely; 0 or -1 = off), `top_p` (keep
    the smallest set whose mass reaches p), and `min_p` (drop tokens with p < min_p * p_max), and
    one token is drawn. The draw uses a uniform number that is a pure function of
    (seed, row key, output position), so a row's sample never depends on its batch mates;
    `seed=None` takes the engine's seed.

    Before sampling, penalties change the logits (vLLM's semantics): `repetition_penalty` r
    divides positive logits and multiplies negative ones of every token in the prompt or the
    output (HF's processor); `presence_penalty` subtracts a constant from every token generated
    so far and `frequency_penalty` subtracts it once per occurrence. `structured_outputs`
    then forbids every token its grammar does not allow. `n` samples are drawn per prompt; sample
    i draws from (seed, row key, i, output position). `logprobs` / `prompt_logprobs` are the
    log-softmax of the raw logits in float32 (before temperature, penalties and constraints).

    Generation stops at `max_tokens`, at an EOS token (unless `ignore_eos`), at any of
    `stop_token_ids`, or when the text contains one of `stop` (the stop string is cut from the
    output unless `include_stop_str_in_output`).
    """

    n: int = option(1, per_row=True, checks=at_least(1, MAX_N),
                    help="Completions (samples) per prompt; each is its own output row, "
                         "numbered by sample_index.")
    temperature: float = option(1.0, per_row=True, checks=at_least(0),
                                help="Sampling temperature; 0 means greedy decoding.")
    top_p: float = option(
        1.0, per_row=True, checks=in_range(0, 1, low_open=True),
        help="Nucleus sampling: keep the smallest token set with this total probability, in "
             "(0, 1]; 1 disables it.")
    top_k: int = option(
        0, per_row=True, checks=at_least(0, INT64_MAX),
        normalize=lambda value: 0 if value == -1 else value,
        help="Keep only the k most likely tokens; 0 or -1 disables it.")
    min_p: float = option(
        0.0, per_row=True, checks=in_range(0, 1),
        help="Drop tokens less likely than min_p times the top token's probability, in [0, 1]; "
             "0 disables it.")
    seed: int | None = option(None, checks=at_least(0, UINT64_MAX), in_job=False, per_row=True,
                              help="This request's seed (None: the engine's).")
    stop: str | list[str] | None = option(
        None, per_row=True, checks=non_empty_strings, job_default_factory=list, metavar="STR",
        help="Stop generating a row when this string appears (repeatable).")
    stop_token_ids: list[int] | None = option(None, in_job=False,
                                              help="Token ids that end generation.")
    max_tokens: int | None = option(16, per_row=True, checks=at_least(1, INT64_MAX),
                                    job_default=256,
                                    help="Maximum number of tokens to generate per row.")
    logprobs: int | None = option(
        None, per_row=True, checks=at_least(0, MAX_LOGPROBS), metavar="K",
        help="Return each generated token's logprob and rank and the K most likely "
             f"alternatives (0-{MAX_LOGPROBS}); log-softmax of the raw logits in float32.")
    prompt_logprobs: int | None = option(
        None, per_row=True, checks=at_least(0, MAX_LOGPROBS), metavar="K",
        help="Return the same for every prompt token (the first is null): what loglikelihood "
             f"scoring needs (0-{MAX_LOGPROBS}).")
    repetition_penalty: float = option(
        1.0, per_row=True, checks=greater_than(0),
        help="HF's repetition penalty over prompt and output tokens (> 0; 1 disables it).")
    presence_penalty: float = option(
        0.0, per_row=True, checks=in_range(-2, 2),
        help="Subtracted from the logit of every token already generated, in [-2, 2].")
    frequency_penalty: float = option(
        0.0, per_row=True, checks=in_range(-2, 2),
        help="Subtracted from a token's logit once per time it was generated, in [-2, 2].")
    structured_outputs: StructuredOutputsParams | None = option(
        None, checks=_is_structured_outputs, in_job=False,
        help="Constrain the output to a choice, regex, JSON schema or grammar.")
    ignore_eos: bool = option(
        False, per_row=True,
        help="Keep generating after the end-of-sequence token (until --max-tokens).")
    include_stop_str_in_output: bool = option(
        False, help="Keep the stop string (--stop) that ended a row at the end of its text.")
    skip_special_tokens: bool = option(True, in_job=False,
                                       help="Leave special tokens out of the output text.")
    stop_strings: tuple[str, ...] = field(init=False, repr=False, default=())

    def __post_init__(self) -> None:
        normalize_options(self)
        if self.stop is None:
            self.stop_strings = ()
        elif isinstance(self.stop, str):
            self.stop_strings = (self.stop,)
        else:
            self.stop_strings = tuple(self.stop)
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.validate()

    def validate(self) -> None:
        """Raise ValueError with an actionable message for an impossible setting."""
        validate_options(self, label=lambda declared: declared.name)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        """True when a repetition, presence or frequency penalty changes the logits."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)
