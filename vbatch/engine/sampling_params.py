"""Per-request sampling parameters, with vLLM's names and defaults.

Each field is an option declared once (`vbatch.options`): its checks run here for the Python
API and for per-row sampling columns, and `vbatch run` offers the fields marked for jobs as
flags (with the job's own default where it differs, e.g. `max_tokens` 256).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from vbatch.options import (
    INT64_MAX,
    UINT64_MAX,
    at_least,
    in_range,
    non_empty_strings,
    normalize_options,
    option,
    validate_options,
)


def _only_one(value: int) -> str | None:
    if value != 1:
        return f"must be 1 (n={value} is not supported yet: one completion per prompt)"
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

    Generation stops at `max_tokens`, at an EOS token (unless `ignore_eos`), at any of
    `stop_token_ids`, or when the text contains one of `stop` (the stop string is cut from the
    output unless `include_stop_str_in_output`).
    """

    n: int = option(1, checks=_only_one, in_job=False,
                    help="Completions per prompt (only 1 is supported).")
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
        None, checks=non_empty_strings, job_default_factory=list, metavar="STR",
        help="Stop generating a row when this string appears (repeatable).")
    stop_token_ids: list[int] | None = option(None, in_job=False,
                                              help="Token ids that end generation.")
    max_tokens: int | None = option(16, per_row=True, checks=at_least(1, INT64_MAX),
                                    job_default=256,
                                    help="Maximum number of tokens to generate per row.")
    ignore_eos: bool = option(
        False, help="Keep generating after the end-of-sequence token (until --max-tokens).")
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
