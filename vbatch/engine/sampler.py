"""Logits -> next tokens, with randomness that is a pure function of (seed, row key, position).

Greedy rows take the argmax. Other rows: p = softmax(logits / T), then top-k, top-p and min-p
zero out the excluded tokens, and the token is drawn by inverse transform sampling: the first
token whose cumulative probability (in vocabulary order) exceeds u * sum(p), with
u = row_uniform(seed, row_key, output_index, sample_index) in [0, 1). Because u does not come
from a shared random stream, a row's sample is the same whatever rows share its batch, whichever
replica runs it, and after preemption and recomputation; sample 0 of n draws exactly what the
row draws with n = 1.

A scheduled sequence with `num_samples` > 1 (a request's first token) gets that many sample
rows, all reading its logits row: `SamplingMetadata.logits_rows` maps sample rows to logits rows.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch


def row_uniform(seed: int, row_key: str, output_index: int, sample_index: int = 0) -> float:
    """A uniform number in [0, 1) determined by (seed, row key, output position, sample) alone
    (sample 0 keeps the key of a single-sample row)."""
    key = f"{seed}\x1f{row_key}\x1f{output_index}"
    if sample_index:
        key += f"\x1f{sample_index}"
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "little") >> 11) * (1.0 / (1 << 53))


@dataclass
class SamplingMetadata:
    """Per-row sampling settings of one step, as tensors on the logits' device."""

    temperatures: torch.Tensor   # [B] float32; 0 = greedy
    top_ks: torch.Tensor         # [B] int64; 0 = off
    top_ps: torch.Tensor         # [B] float32; 1 = off
    min_ps: torch.Tensor         # [B] float32; 0 = off
    uniforms: torch.Tensor       # [B] float64
    all_greedy: bool
    needs_sort: bool
    needs_min_p: bool
    logits_rows: torch.Tensor | None = None   # [B] int64: sample row -> logits row; None: same

    @staticmethod
    def build(seqs: list, device: torch.device) -> SamplingMetadata:
        """From objects with temperature, top_k, top_p, min_p, seed, row_key, output_index,
        sample_index and num_samples (one sample row per sample)."""
        rows, sample_indices, logits_rows = seqs, None, None
        if any(s.num_samples > 1 for s in seqs):
            rows = [s for s in seqs for _ in range(s.num_samples)]
            sample_indices = [s.sample_index + j for s in seqs for j in range(s.num_samples)]
            logits_rows = torch.tensor([i for i, s in enumerate(seqs)
                                        for _ in range(s.num_samples)], device=device)
        all_greedy = all(r.temperature == 0 for r in rows)
        if sample_indices is None:
            sample_indices = [r.sample_index for r in rows]
        uniforms = [0.0 if r.temperature == 0 else
                    row_uniform(r.seed, r.row_key, r.output_index, sample)
                    for r, sample in zip(rows, sample_indices)]
        # One float64 host buffer, one copy (pinned and asynchronous on a GPU): every value is
        # exact in float64 (float32 settings, top_k < 2^53), so the casts below change nothing.
        host = torch.tensor([[r.temperature for r in rows], [r.top_k for r in rows],
                             [r.top_p for r in rows], [r.min_p for r in rows], uniforms],
                            dtype=torch.float64)
        values = to_device(host, device)
        return SamplingMetadata(
            temperatures=values[0].float(), top_ks=values[1].long(), top_ps=values[2].float(),
            min_ps=values[3].float(), uniforms=values[4], all_greedy=all_greedy,
            needs_sort=any(r.temperature > 0 and (r.top_k > 0 or r.top_p < 1) for r in rows),
            needs_min_p=any(r.temperature > 0 and r.min_p > 0 for r in rows),
            logits_rows=logits_rows,
        )


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`host` (a CPU tensor) on `device`: itself on the CPU; on a GPU through pinned memory
    with a non-blocking copy (ordered on the current stream before any kernel reading it)."""
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def sample(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """[B, V] logits (one row per sample row: expanded by the caller) -> [B] int64 token ids
    (see module docstring for the math).

    Greedy picks use `max(dim=-1).indices` in the logits' own dtype: the first maximal index,
    exactly argmax's (and Hugging Face's) choice, but several times faster than `argmax` on CPU;
    converting bf16 logits to float32 first could not change which is largest.
    """
    greedy_tokens = logits.max(dim=-1).indices
    if meta.all_greedy:
        return greedy_tokens
    logits = logits.float()
    is_greedy = meta.temperatures == 0
    temperatures = torch.where(is_greedy, 1.0, meta.temperatures)
    probs = torch.softmax(logits / temperatures.unsqueeze(1), dim=-1)
    if meta.needs_min_p:
        threshold = meta.min_ps.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < threshold, 0.0)
    if meta.needs_sort:
        probs = _apply_top_k_top_p(probs, meta.top_ks, meta.top_ps)
    cumulative = probs.double().cumsum(dim=-1)
    targets = meta.uniforms.unsqueeze(1) * cumulative[:, -1:]
    sampled = torch.searchsorted(cumulative, targets, right=True).squeeze(1)
    sampled = sampled.clamp_(max=logits.shape[-1] - 1)
    return torch.where(is_greedy, greedy_tokens, sampled)


def _apply_top_k_top_p(probs: torch.Tensor, top_ks: torch.Tensor,
                       top_ps: torch.Tensor) -> torch.Tensor:
    """Zero the probabilities outside each row's top-k and top-p sets."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    vocab = probs.shape[-1]
    ranks = torch.arange(vocab, device=probs.device).unsqueeze(0)
    k = torch.where(top_ks > 0, top_ks, vocab).unsqueeze(1)
    sorted_probs = sorted_probs.masked_fill(ranks >= k, 0.0)
    # top-p on the top-k survivors: keep a token if the mass strictly before it is < p of their
    # total (so the most likely token always stays).
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    drop = mass_before >= top_ps.unsqueeze(1) * sorted_probs.sum(dim=-1, keepdim=True)
    drop &= (top_ps < 1).unsqueeze(1)   # float rounding must not trim rows without top-p
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter_(1, order, sorted_probs)
