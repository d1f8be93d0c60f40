"""The sampler: greedy, top-k / top-p / min-p, per-row randomness, and SamplingParams checks.

Proves that greedy rows take the argmax; that `row_uniform` is a deterministic function of
(seed, row key, position) in [0, 1) that changes with each of them; that a row samples the same
token alone or inside any batch of other rows with other settings; that top_k=1, a tiny top_p
and min_p=1 reduce to greedy; that with temperature 1 the draws over many row keys follow
softmax(logits) (chi-square); and that top-k / top-p / min-p / temperature give exactly the
support and the probabilities of an independent numpy computation (checked by inverse-transform
counts over a fine grid of uniforms). Also the validation of `SamplingParams`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vbatch.engine.sampler import SamplingMetadata, row_uniform, sample
from vbatch.engine.sampling_params import SamplingParams


@dataclass
class Row:
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int = 0
    row_key: str = "row"
    output_index: int = 0
    sample_index: int = 0
    num_samples: int = 1


def sample_rows(logits: torch.Tensor, rows: list[Row]) -> list[int]:
    return sample(logits, SamplingMetadata.build(rows, torch.device("cpu"))).tolist()


def meta_with_uniforms(n: int, uniforms, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """Metadata for n identical rows with explicit uniforms (bypasses row_uniform)."""
    return SamplingMetadata(
        temperatures=torch.full((n,), temperature, dtype=torch.float32),
        top_ks=torch.full((n,), top_k, dtype=torch.int64),
        top_ps=torch.full((n,), top_p, dtype=torch.float32),
        min_ps=torch.full((n,), min_p, dtype=torch.float32),
        uniforms=torch.as_tensor(uniforms, dtype=torch.float64),
        all_greedy=temperature == 0, needs_sort=temperature > 0 and (top_k > 0 or top_p < 1),
        needs_min_p=temperature > 0 and min_p > 0)


def reference_probs(logits: np.ndarray, *, temperature=1.0, top_k=0, top_p=1.0,
                    min_p=0.0) -> np.ndarray:
    """Independent float64 numpy version of the documented math (min-p, top-k, then top-p on the
    top-k survivors: keep a token while the mass strictly before it is < p of their total)."""
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if min_p > 0:
        p = np.where(p < min_p * p.max(), 0.0, p)
    order = np.argsort(-p, kind="stable")
    keep = np.zeros_like(p, dtype=bool)
    k = top_k if top_k > 0 else len(p)
    survivors = order[:k]
    total = p[survivors].sum()
    before = 0.0
    for tok in survivors:
        if before < top_p * total:
            keep[tok] = True
        before += p[tok]
    q = np.where(keep, p, 0.0)
    return q / q.sum()


def grid_counts(logits: torch.Tensor, n: int, **settings_) -> np.ndarray:
    """Inverse-transform counts of the sampler over the uniform grid (j + 1/2) / n."""
    uniforms = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    rows = logits.unsqueeze(0).expand(n, -1)
    tokens = sample(rows, meta_with_uniforms(n, uniforms, **settings_))
    return np.bincount(tokens.numpy(), minlength=logits.shape[-1])


# ---- greedy -------------------------------------------------------------------------------------

def test_greedy_is_argmax():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 50, generator=gen)
    rows = [Row(temperature=0.0, row_key=f"k{i}") for i in range(16)]
    assert sample_rows(logits, rows) == logits.argmax(-1).tolist()


def test_greedy_rows_stay_argmax_in_mixed_batch():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(12, 30, generator=gen)
    rows = [Row(temperature=0.0 if i % 2 else 1.3, top_k=5 * (i % 3), top_p=0.9 if i % 4 else 1.0,
                min_p=0.05 * (i % 2 == 0), row_key=f"k{i}") for i in range(12)]
    out = sample_rows(logits, rows)
    for i in range(1, 12, 2):
        assert out[i] == int(logits[i].argmax())


def test_greedy_accepts_half_precision_logits():
    logits = torch.randn(4, 20, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    out = sample_rows(logits, [Row(temperature=0.0)] * 4)
    assert out == logits.float().argmax(-1).tolist()


# ---- row_uniform --------------------------------------------------------------------------------

@settings(max_examples=200, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**63 - 1), key=st.text(max_size=40), index=st.integers(0, 10**6))
def test_row_uniform_deterministic_in_unit_interval(seed, key, index):
    u = row_uniform(seed, key, index)
    assert isinstance(u, float) and 0.0 <= u < 1.0
    assert u == row_uniform(seed, key, index)


def test_row_uniform_varies_with_each_input():
    base = row_uniform(0, "row-1", 0)
    assert row_uniform(0, "row-2", 0) != base
    assert row_uniform(0, "row-1", 1) != base
    assert row_uniform(1, "row-1", 0) != base
    values = {row_uniform(7, f"key-{i}", j) for i in range(200) for j in range(10)}
    assert len(values) == 2000
    # no separator ambiguity between (key, index) pairs that concatenate alike
    assert row_uniform(0, "a1", 2) != row_uniform(0, "a", 12)


def test_row_uniform_is_roughly_uniform():
    values = np.array([row_uniform(3, f"k{i}", 0) for i in range(20000)])
    hist, _ = np.histogram(values, bins=10, range=(0, 1))
    assert np.all(np.abs(hist - 2000) < 200)
    assert abs(values.mean() - 0.5) < 0.01


# ---- batch invariance ---------------------------------------------------------------------------

def random_row(rng: np.random.Generator, i: int) -> Row:
    return Row(temperature=float(rng.choice([0.0, 0.5, 1.0, 1.7])),
               top_k=int(rng.choice([0, 0, 1, 3, 10])),
               top_p=float(rng.choice([1.0, 1.0, 0.5, 0.9])),
               min_p=float(rng.choice([0.0, 0.0, 0.1])),
               seed=int(rng.integers(0, 5)), row_key=f"row-{i}",
               output_index=int(rng.integers(0, 100)))


def test_row_sample_independent_of_batch_mates():
    rng = np.random.default_rng(0)
    vocab = 40
    torch.manual_seed(0)
    for trial in range(30):
        logits = torch.randn(1, vocab) * 3
        row = Row(temperature=float(rng.choice([0.7, 1.0, 1.5])), row_key=f"target-{trial}",
                  output_index=trial, top_k=int(rng.choice([0, 5])),
                  top_p=float(rng.choice([1.0, 0.8])), min_p=float(rng.choice([0.0, 0.02])))
        alone = sample_rows(logits, [row])[0]
        for _ in range(3):
            num_others = int(rng.integers(1, 9))
            others = [random_row(rng, 1000 * trial + j) for j in range(num_others)]
            position = int(rng.integers(0, num_others + 1))
            rows = others[:position] + [row] + others[position:]
            batch = torch.randn(num_others + 1, vocab) * 3
            batch[position] = logits[0]
            assert sample_rows(batch, rows)[position] == alone


def test_untruncated_row_keeps_tail_tokens_when_batch_needs_sort():
    logits = torch.tensor([1e-9, 0.5, 0.5]).log()
    alone = sample(logits.unsqueeze(0), meta_with_uniforms(1, [1e-10]))
    batch = SamplingMetadata(
        temperatures=torch.tensor([1.0, 1.0]), top_ks=torch.tensor([0, 2]),
        top_ps=torch.tensor([1.0, 1.0]), min_ps=torch.tensor([0.0, 0.0]),
        uniforms=torch.tensor([1e-10, 0.5], dtype=torch.float64), all_greedy=False,
        needs_sort=True, needs_min_p=False)
    together = sample(torch.stack([logits, logits]), batch)
    assert alone.tolist() == [0]
    assert together[0].item() == alone.item()


def test_same_row_key_same_token_different_key_varies():
    logits = torch.zeros(1, 1000)
    first = sample_rows(logits, [Row(row_key="a", seed=5, output_index=3)])
    assert sample_rows(logits, [Row(row_key="a", seed=5, output_index=3)]) == first
    draws = {sample_rows(logits, [Row(row_key=f"k{i}", seed=5)])[0] for i in range(50)}
    assert len(draws) > 40


# ---- degenerate settings reduce to greedy -------------------------------------------------------

@pytest.mark.parametrize("settings_", [dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0),
                                       dict(top_k=1, top_p=0.5, min_p=0.3)])
@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.5])
def test_degenerate_settings_equal_greedy(settings_, temperature):
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(64, 100, generator=gen) * 2     # continuous: no ties
    rows = [Row(temperature=temperature, row_key=f"r{i}", output_index=i, **settings_)
            for i in range(64)]
    assert sample_rows(logits, rows) == logits.argmax(-1).tolist()


# ---- distributions ------------------------------------------------------------------------------

def chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    mask = expected > 0
    assert counts[~mask].sum() == 0, "a token outside the support was sampled"
    return float(((counts[mask] - expected[mask]) ** 2 / expected[mask]).sum())


def test_temperature_one_matches_softmax_over_row_keys():
    logits = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0])
    n = 20000
    rows = [Row(temperature=1.0, seed=11, row_key=f"prompt-{i}") for i in range(n)]
    tokens = sample_rows(logits.unsqueeze(0).expand(n, -1).contiguous(), rows)
    counts = np.bincount(tokens, minlength=5)
    probs = torch.softmax(logits.double(), -1).numpy()
    # 4 degrees of freedom: P(chi2 > 25) ~ 5e-5; the row keys are fixed, so this is deterministic
    assert chi_square(counts, probs) < 25, (counts, probs * n)


def test_temperature_and_top_k_match_reference_over_row_keys():
    logits = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0, 0.9])
    n = 20000
    rows = [Row(temperature=0.7, top_k=3, seed=2, row_key=f"p{i}", output_index=i % 7)
            for i in range(n)]
    tokens = sample_rows(logits.unsqueeze(0).expand(n, -1).contiguous(), rows)
    counts = np.bincount(tokens, minlength=6)
    probs = reference_probs(logits.numpy(), temperature=0.7, top_k=3)
    assert set(np.flatnonzero(counts)) == {0, 3, 5}
    assert chi_square(counts, probs) < 25


def _well_separated(logits: np.ndarray, **kw) -> bool:
    """True if no top-p / min-p boundary of the reference is within 1e-4 of flipping."""
    temperature = kw.get("temperature", 1.0)
    z = logits / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if kw.get("min_p", 0) > 0 and np.min(np.abs(p - kw["min_p"] * p.max())) < 1e-4:
        return False
    if kw.get("top_p", 1.0) < 1:
        q = p.copy()
        if kw.get("min_p", 0) > 0:
            q = np.where(p < kw["min_p"] * p.max(), 0, p)
        s = np.sort(q)[::-1]
        k = kw.get("top_k", 0) or len(s)
        s = s[:k]
        before = np.cumsum(s) - s
        if np.min(np.abs(before - kw["top_p"] * s.sum())) < 1e-4:
            return False
    return True


@pytest.mark.parametrize("case", range(30))
def test_support_and_probabilities_match_numpy_reference(case):
    rng = np.random.default_rng(100 + case)
    vocab = int(rng.integers(2, 30))
    while True:
        logits = rng.normal(size=vocab) * rng.choice([0.5, 2.0, 4.0])
        kw = dict(temperature=float(rng.choice([0.5, 1.0, 1.8])),
                  top_k=int(rng.choice([0, 1, 2, 5, vocab + 3])),
                  top_p=float(rng.choice([1.0, 0.3, 0.75, 0.95])),
                  min_p=float(rng.choice([0.0, 0.0, 0.05, 0.3])))
        if _well_separated(logits, **kw):
            break
    expected = reference_probs(logits, **kw)
    n = 20000
    counts = grid_counts(torch.tensor(logits, dtype=torch.float32), n, **kw)
    # support: never outside the reference's; every token with mass > 1/n is hit by the grid
    support = set(np.flatnonzero(counts))
    assert support <= set(np.flatnonzero(expected))
    assert set(np.flatnonzero(expected > 1.0 / n)) <= support
    # inverse transform over a uniform grid: each token's share is its probability, to 1/n
    assert np.all(np.abs(counts / n - expected) <= 2.0 / n + 1e-5), (counts / n, expected, kw)


def test_top_k_support_is_the_k_largest():
    rng = np.random.default_rng(7)
    logits = rng.normal(size=50) * 2
    counts = grid_counts(torch.tensor(logits, dtype=torch.float32), 20000, top_k=4)
    assert set(np.flatnonzero(counts)) == set(np.argsort(-logits)[:4])


def test_top_p_support_is_smallest_prefix_reaching_p():
    probs = np.array([0.05, 0.4, 0.1, 0.3, 0.15])
    logits = np.log(probs)
    # sorted: 0.4, 0.3, 0.15, 0.1, 0.05 -> p=0.6 keeps {0.4, 0.3}; p=0.75 keeps also 0.15
    counts = grid_counts(torch.tensor(logits, dtype=torch.float32), 10000, top_p=0.6)
    assert set(np.flatnonzero(counts)) == {1, 3}
    counts = grid_counts(torch.tensor(logits, dtype=torch.float32), 10000, top_p=0.75)
    assert set(np.flatnonzero(counts)) == {1, 3, 4}
    assert abs(counts[1] / 10000 - 0.4 / 0.85) < 2e-4


def test_min_p_support():
    probs = np.array([0.5, 0.2, 0.04, 0.26])
    counts = grid_counts(torch.tensor(np.log(probs), dtype=torch.float32), 10000, min_p=0.1)
    assert set(np.flatnonzero(counts)) == {0, 1, 3}       # 0.04 < 0.1 * 0.5


# ---- SamplingParams -----------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(min_p=2.0), "min_p"),
    (dict(min_p=-0.1), "min_p"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(n=0), "n must be >= 1"),
    (dict(n=1025), "n must be <= 1024"),
    (dict(logprobs=21), "logprobs must be <= 20"),
    (dict(prompt_logprobs=-1), "prompt_logprobs must be >= 0"),
    (dict(repetition_penalty=0), "repetition_penalty must be > 0"),
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=-3), "frequency_penalty"),
    (dict(structured_outputs={"choice": ["a"]}), "StructuredOutputsParams"),
    (dict(stop=["ok", ""]), "stop"),
])
def test_sampling_params_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_sampling_params_accepts_and_normalises():
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams(top_k=0).top_k == 0
    assert SamplingParams(top_k=5).top_k == 5
    assert SamplingParams(temperature=0).is_greedy
    assert not SamplingParams().is_greedy
    assert SamplingParams(max_tokens=None).max_tokens is None
    p = SamplingParams(stop="END", stop_token_ids=None)
    assert p.stop_strings == ("END",) and p.stop_token_ids == []
    assert SamplingParams(stop=["a", "bc"]).stop_strings == ("a", "bc")
    assert SamplingParams().stop_strings == ()
    SamplingParams(top_p=1.0, min_p=1.0, temperature=0.0, max_tokens=1)
