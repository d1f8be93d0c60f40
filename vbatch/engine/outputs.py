"""What the engine returns per request (vLLM's RequestOutput / CompletionOutput / Logprob).

Log-probabilities are the log-softmax of the model's raw logits in float32, before temperature,
penalties and structured-output masks (vLLM's default "raw_logprobs"). A token's `rank` is the
number of vocabulary entries at least as likely as it (1 = most likely), as vLLM counts it.
They are kept compact (`TokenLogprob`, one per position) and shown in vLLM's shape
(`list[dict[token_id, Logprob]]`) on demand.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class Logprob:
    """vLLM's per-token entry: the logprob, its rank and the token's text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass(slots=True)
class TopLogprob:
    """One of the most likely tokens at a position."""

    token_id: int
    token: str
    logprob: float


@dataclass(slots=True)
class TokenLogprob:
    """One position: the token that is there (sampled, or the prompt's), its logprob and rank,
    and the `top_logprobs` most likely tokens, most likely first."""

    token_id: int
    token: str
    logprob: float
    rank: int
    top_logprobs: list[TopLogprob]

    def as_vllm_dict(self) -> dict[int, Logprob]:
        """vLLM's shape: the token itself first, then the top alternatives by rank."""
        entries = {self.token_id: Logprob(self.logprob, self.rank, self.token)}
        for rank, top in enumerate(self.top_logprobs, start=1):
            entries.setdefault(top.token_id, Logprob(top.logprob, rank, top.token))
        return entries


@dataclass
class CompletionOutput:
    """One generated completion: its text, tokens and why it ended ("stop" or "length").

    `index` is the sample index (0..n-1). `token_logprobs` (one per generated token) and
    `cumulative_logprob` (their sum) are set when the request asked for `logprobs`.
    """

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: int | str | None = None
    cumulative_logprob: float | None = None
    token_logprobs: list[TokenLogprob] | None = None

    @property
    def logprobs(self) -> list[dict[int, Logprob]] | None:
        """vLLM's shape of `token_logprobs`."""
        if self.token_logprobs is None:
            return None
        return [entry.as_vllm_dict() for entry in self.token_logprobs]


@dataclass
class RequestOutput:
    """The result for one prompt: the prompt, its token ids and its `n` completions (by index).

    `prompt_token_logprobs` (one per prompt token, the first None) is set when the request
    asked for `prompt_logprobs`.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = True
    prompt_token_logprobs: list[TokenLogprob | None] | None = None

    @property
    def prompt_logprobs(self) -> list[dict[int, Logprob] | None] | None:
        """vLLM's shape of `prompt_token_logprobs`."""
        if self.prompt_token_logprobs is None:
            return None
        return [None if entry is None else entry.as_vllm_dict()
                for entry in self.prompt_token_logprobs]
