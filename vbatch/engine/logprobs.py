"""Log-probabilities of tokens: of sampled tokens, and of every prompt token.

logprob(t | context) = log_softmax(raw logits in float32)[t], from the logits before
temperature, penalties and structured-output masks (vLLM's default), evaluated as
(x_t - max) - log(sum_i exp(x_i - max)). rank(t) is the number of vocabulary entries whose
logprob is >= t's (1 = the most likely; vLLM's count). The top-K alternatives are the K largest
logprobs, most likely first (the lower token id first among equal values).

No [R, V] float32 copy or log_softmax output is made: per row, the native CPU kernel
(kernels/cpu_logprobs.c) reads the logits twice for the top entries, the max and the log of the
normalising sum; a token's logprob is then one lookup. PyTorch ops do the same elsewhere.

Prompt logprobs need the logits of every prompt position, [P, V] for a prompt of P tokens
(P = 4096 and V = 150k would be 1.2 GB in bf16): they are computed `PROMPT_CHUNK` positions at a
time, keeping only what is returned.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from vbatch.engine.kernels.cpu_kernels import cpu_kernels_for
from vbatch.engine.sequence import PromptLogprobs, SampleLogprobs

#: Prompt positions whose logits exist at once while prompt logprobs are computed.
PROMPT_CHUNK = 256

#: Top entries every row's rank is first looked up in (see `LogprobStats.token_logprobs`).
RANK_PROBE = 8


@dataclass
class LogprobStats:
    """What the logprobs of rows of raw logits [R, V] need: the row maxima and log-sums (the
    log_softmax normaliser) and the `probe` most likely entries of each row."""

    maxima: torch.Tensor         # [R] float32
    log_sums: torch.Tensor       # [R] float32: log(sum_i exp(x_i - max))
    top_ids: torch.Tensor        # [R, probe] int64, most likely first
    top_logprobs: torch.Tensor   # [R, probe] float32

    @staticmethod
    def of(logits: torch.Tensor, probe: int) -> LogprobStats:
        """The statistics of `logits` [R, V] (any float dtype), with the top min(probe, V)."""
        probe = min(probe, logits.shape[1])
        kernels = cpu_kernels_for(logits.device, logits.dtype)
        if kernels is not None and logits.stride(1) == 1:
            maxima, log_sums, top_ids, top_values = kernels.logprob_stats(logits, probe)
        else:
            values = logits.float()
            top_values, top_ids = values.topk(probe, dim=1)
            maxima = top_values[:, 0]
            log_sums = (values - maxima.unsqueeze(1)).exp_().sum(dim=1).log_()
        top_logprobs = (top_values - maxima.unsqueeze(1)) - log_sums.unsqueeze(1)
        return LogprobStats(maxima, log_sums, top_ids, top_logprobs)

    def token_logprobs(self, logits: torch.Tensor, token_ids: torch.Tensor, num_top: int):
        """(logprobs [R], ranks [R], top ids [R, num_top], top logprobs [R, num_top]) of
        `token_ids` [R] in the rows of `logits` these statistics were taken from.

        A rank is a count over the whole vocabulary, an expensive pass; but a token more likely
        than the row's `probe`-th most likely entry (greedy picks always, sampled ones nearly
        always) has its rank among the top entries. Only the other rows are counted in full.
        """
        rows = torch.arange(len(token_ids), device=logits.device)
        raw = logits[rows, token_ids].float()
        values = (raw - self.maxima) - self.log_sums
        ranks = (self.top_logprobs >= values.unsqueeze(1)).sum(dim=1)
        counted = (values <= self.top_logprobs[:, -1]).nonzero().squeeze(1)
        if counted.numel():
            full = ((logits.index_select(0, counted).float()
                     - self.maxima[counted].unsqueeze(1)) - self.log_sums[counted].unsqueeze(1))
            ranks[counted] = (full >= values[counted].unsqueeze(1)).sum(dim=1)
        return values, ranks, self.top_ids[:, :num_top], self.top_logprobs[:, :num_top]


class SampledLogprobs:
    """Logprobs of a step's sample rows, from the raw logits before anything changes them.

    `raw_logits` [R, V] is kept by reference unless `will_be_modified` (penalties or grammar
    masks are about to change it in place), when it is copied first.
    """

    def __init__(self, raw_logits: torch.Tensor, max_top: int, will_be_modified: bool = False):
        self.logits = raw_logits.clone() if will_be_modified else raw_logits
        self.stats = LogprobStats.of(raw_logits, max(max_top, RANK_PROBE))

    def entries(self, token_ids: torch.Tensor, num_top: list[int]) -> list[SampleLogprobs]:
        """One `SampleLogprobs` per row for its sampled `token_ids` [R], with the row's own
        number of top alternatives `num_top[r]`."""
        values, ranks, top_ids, top_values = self.stats.token_logprobs(
            self.logits, token_ids, max(num_top))
        values, ranks = values.tolist(), ranks.tolist()
        top_ids, top_values = top_ids.tolist(), top_values.tolist()
        return [SampleLogprobs(values[r], ranks[r], top_ids[r][:k], top_values[r][:k])
                for r, k in enumerate(num_top)]


def prompt_logprobs(compute_logits: Callable[[torch.Tensor], torch.Tensor],
                    hidden: torch.Tensor, token_ids: torch.Tensor, num_top: int,
                    is_driver: bool) -> PromptLogprobs | None:
    """Logprobs of prompt tokens 1..P-1 given the hidden states of positions 0..P-1
    (`hidden` [P, H], `token_ids` [P]): position p's logits score token p + 1.

    `compute_logits` may be a collective (tensor-parallel LM head): every rank of the stage
    calls it on the same chunks; only the driver (`is_driver`) computes and returns the result.
    """
    num_positions = hidden.shape[0] - 1
    parts = []
    for start in range(0, num_positions, PROMPT_CHUNK):
        end = min(start + PROMPT_CHUNK, num_positions)
        logits = compute_logits(hidden[start:end])
        if is_driver:
            stats = LogprobStats.of(logits, max(num_top, RANK_PROBE))
            parts.append(stats.token_logprobs(logits, token_ids[start + 1:end + 1], num_top))
    if not is_driver:
        return None
    if not parts:
        empty = torch.empty(0)
        return PromptLogprobs(empty, empty.long(), torch.empty((0, num_top)).long(),
                              torch.empty((0, num_top)))
    values, ranks, top_ids, top_values = (torch.cat(column) for column in zip(*parts))
    return PromptLogprobs(values.cpu(), ranks.cpu(), top_ids.cpu(), top_values.cpu())
