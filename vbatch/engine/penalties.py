"""Repetition, presence and frequency penalties on a step's logits (vLLM's semantics).

For a row with history h (prompt + tokens generated so far) and output o (the generated part):
  repetition r:  for every token t in h: l[t] = l[t] / r if l[t] > 0 else l[t] * r
                 (Hugging Face's RepetitionPenaltyLogitsProcessor)
  presence p, frequency f:  l[t] -= f * count_o(t) + p * (count_o(t) > 0)
Repetition applies first. Rows are processed together: histories are padded to one length
with a copy of their own first token, so padding rewrites a token with its own new value.
"""
from __future__ import annotations

import torch


def apply_penalties(logits: torch.Tensor, rows: list[int], seqs: list) -> None:
    """In place on float32 `logits` [B, V]: penalise row rows[i] with the history and
    penalties of seqs[i] (objects with history, num_prompt_tokens, repetition_penalty,
    presence_penalty and frequency_penalty)."""
    device, vocab = logits.device, logits.shape[1]
    longest = max(len(seq.history) for seq in seqs)
    padded = [seq.history + [seq.history[0]] * (longest - len(seq.history)) for seq in seqs]
    history = torch.tensor(padded, dtype=torch.int64, device=device)
    index = torch.tensor(rows, dtype=torch.int64, device=device)
    scores = logits.index_select(0, index)
    repetition = torch.tensor([seq.repetition_penalty for seq in seqs], device=device)
    if bool((repetition != 1).any()):
        penalty = repetition.unsqueeze(1)
        seen = scores.gather(1, history)
        scores.scatter_(1, history, torch.where(seen > 0, seen / penalty, seen * penalty))
    presence = torch.tensor([seq.presence_penalty for seq in seqs], device=device)
    frequency = torch.tensor([seq.frequency_penalty for seq in seqs], device=device)
    if bool((presence != 0).any() or (frequency != 0).any()):
        positions = torch.arange(longest, device=device).unsqueeze(0)
        starts = torch.tensor([seq.num_prompt_tokens for seq in seqs], device=device)
        lengths = torch.tensor([len(seq.history) for seq in seqs], device=device)
        is_output = (positions >= starts.unsqueeze(1)) & (positions < lengths.unsqueeze(1))
        counts = torch.zeros((len(seqs), vocab), dtype=torch.float32, device=device)
        counts.scatter_add_(1, history, is_output.float())
        scores -= frequency.unsqueeze(1) * counts + presence.unsqueeze(1) * (counts > 0)
    logits.index_copy_(0, index, scores)
