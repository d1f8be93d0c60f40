"""Log-probabilities of tokens: of sampled tokens, and of every prompt token.

logprob(t | context) = log_softmax(raw logits in float32)[t], from the logits before
temperature, penalties and structured-output masks (vLLM's default). rank(t) is the number of
vocabulary entries whose logprob is >= t's (1 = the most likely; vLLM's count). The top-K
alternatives are the K largest logprobs, most likely first.

Prompt logprobs need the logits of every prompt position, [P, V] float32 for a prompt of P
tokens (P = 4096 and V = 150k would be 2.4 GB): they are computed `PROMPT_CHUNK` positions at a
time, keeping only what is returned.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from vbatch.engine.sequence import PromptLogprobs, SampleLogprobs

#: Prompt positions whose logits exist at once while prompt logprobs are computed.
PROMPT_CHUNK = 256


#: Top entries every row's rank is first looked up in (see `_logprob_ranks_and_top`).
RANK_PROBE = 8


def _logprob_ranks_and_top(logprobs: torch.Tensor, token_ids: torch.Tensor, num_top: int):
    """Token logprobs, ranks and the top `num_top` of each row of `logprobs` [R, V].

    A rank is a count over the whole vocabulary, an expensive pass; but a token that is more
    likely than the row's RANK_PROBE-th most likely token (greedy picks always, sampled ones
    nearly always) has its rank among the top entries, which the top-K lookup finds anyway.
    Only the other rows are counted in full.
    """
    token_logprobs = logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1)
    probe = min(max(num_top, RANK_PROBE), logprobs.shape[1])
    top_logprobs, top_ids = logprobs.topk(probe, dim=1)
    ranks = (top_logprobs >= token_logprobs.unsqueeze(1)).sum(dim=1)
    counted = (token_logprobs <= top_logprobs[:, -1]).nonzero().squeeze(1)
    if counted.numel():
        rows = logprobs.index_select(0, counted)
        ranks[counted] = (rows >= token_logprobs[counted].unsqueeze(1)).sum(dim=1)
    return token_logprobs, ranks, top_ids[:, :num_top], top_logprobs[:, :num_top]


class SampledLogprobs:
    """Logprobs of a step's sample rows, taken from the raw logits before anything changes
    them (penalties and grammar masks may then modify those logits in place)."""

    def __init__(self, raw_logits: torch.Tensor):
        self.logprobs = torch.log_softmax(raw_logits.float(), dim=-1)   # a new tensor

    def entries(self, token_ids: torch.Tensor, num_top: list[int]) -> list[SampleLogprobs]:
        """One `SampleLogprobs` per row for its sampled `token_ids` [R], with the row's own
        number of top alternatives `num_top[r]`."""
        values, ranks, top_ids, top_values = _logprob_ranks_and_top(self.logprobs, token_ids,
                                                                    max(num_top))
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
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            parts.append(_logprob_ranks_and_top(logprobs, token_ids[start + 1:end + 1],
                                                num_top))
    if not is_driver:
        return None
    if not parts:
        empty = torch.empty(0)
        return PromptLogprobs(empty, empty.long(), torch.empty((0, num_top)).long(),
                              torch.empty((0, num_top)))
    values, ranks, top_ids, top_values = (torch.cat(column) for column in zip(*parts))
    return PromptLogprobs(values.cpu(), ranks.cpu(), top_ids.cpu(), top_values.cpu())
