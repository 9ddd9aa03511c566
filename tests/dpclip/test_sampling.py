"""Poisson sampling: the real inclusion probability never exceeds the q the accountant charges.

The old sampler compared float32 uniforms (a 2⁻²⁴ grid) with q, so an example joined with probability
⌈q·2²⁴⌉/2²⁴ — 5.96·q at q = 10⁻⁸, 1.19·q at 10⁻⁷, and slightly above q for every q off the grid. A sample mean
cannot see a 1.3% excess at q = 10⁻⁶, so these tests check the *exact* probability: the threshold arithmetic
(:func:`inclusion_probability` ≤ q for every float q), that the loader's decisions are exactly "U < t" on the
generator's raw integers (re-derived here with Python integers, the tie path included), and that those
integers are uniform on the full 2⁶² range. A sample mean is a last sanity check.
"""

from __future__ import annotations

import math
import os
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import TensorDataset

from dpclip import PoissonDataLoader
from dpclip.sampling import INCLUSION_BITS, bernoulli_mask, inclusion_probability, inclusion_threshold

RATES = [1e-8, 1e-7, 1e-6, 1e-3, 1 / 3, 0.1, 0.25, 0.3, 0.5, 2 / 3, 0.999999, 1.0, 2**-24 * 1.5, 5e-324]


def float32_rule_probability(q: float) -> Fraction:
    """The old rule ``torch.rand(N) < q`` (float32 uniforms on the 2⁻²⁴ grid): ⌈q·2²⁴⌉/2²⁴."""
    return Fraction(math.ceil(Fraction(q) * 2**24), 2**24)


@pytest.mark.parametrize("q", RATES)
def test_exact_inclusion_probability_never_exceeds_q(q: float) -> None:
    p = inclusion_probability(q)
    assert p <= Fraction(q)
    assert Fraction(q) - p < Fraction(1, 2**INCLUSION_BITS)  # rounded down by less than one step of 2⁻⁶²
    assert p.denominator <= 2**INCLUSION_BITS and (p * 2**INCLUSION_BITS).denominator == 1


@settings(max_examples=300, deadline=None)
@given(st.floats(min_value=5e-324, max_value=1.0))
def test_exact_inclusion_probability_never_exceeds_any_float_q(q: float) -> None:
    p = inclusion_probability(q)
    assert 0 <= Fraction(q) - p < Fraction(1, 2**INCLUSION_BITS)


def test_the_old_float32_rule_overcharged_where_the_new_one_does_not() -> None:
    """The figures of the bug report, and the new rule's at the same q."""
    for q, excess in [(1e-8, 5.96), (1e-7, 1.19), (1e-6, 1.013)]:
        assert float(float32_rule_probability(q) / Fraction(q)) == pytest.approx(excess, abs=0.005)
        assert inclusion_probability(q) <= Fraction(q)
    # and float32 uniforms really lie on the 2⁻²⁴ grid (what made the old rule coarse)
    u = torch.rand(10_000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(u * 2**24, torch.floor(u * 2**24))


def test_q_equal_to_one_includes_everything_and_draws_nothing() -> None:
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    assert inclusion_threshold(1.0) == 2**INCLUSION_BITS and inclusion_probability(1.0) == 1
    assert bool(bernoulli_mask(1000, 1.0, g).all())
    assert torch.equal(g.get_state(), state)
    loader = PoissonDataLoader(TensorDataset(torch.arange(50)), 1.0, seed=3)
    assert loader.sample_indices().tolist() == list(range(50))


def _reference_mask(n: int, q: float, generator: torch.Generator) -> list[bool]:
    """The rule re-derived with Python integers: U = H·2³¹ + L from the generator's 31-bit draws (H for every
    example, then L for the examples whose H equals the threshold's high half, in index order); include iff
    U < ⌊q·2⁶²⌋ computed with fractions."""
    t = math.floor(Fraction(q) * 2**62)
    high = torch.empty(n, dtype=torch.int32).random_(0, 2**31, generator=generator).tolist()
    ties = [i for i, h in enumerate(high) if h == t >> 31]
    low = dict(zip(ties, torch.empty(len(ties), dtype=torch.int32).random_(0, 2**31, generator=generator).tolist()))
    return [(h << 31) + low.get(i, 0) < t if h == t >> 31 else (h << 31) < t for i, h in enumerate(high)]


@pytest.mark.parametrize("q", [1e-8, 1e-6, 0.1, 1 / 3, 0.5])
def test_loader_decisions_are_exactly_the_integer_threshold_rule(q: float) -> None:
    n = 4000
    loader = PoissonDataLoader(TensorDataset(torch.arange(n)), q, seed=11)
    reference = torch.Generator()
    for _ in range(5):
        reference.set_state(loader.generator.get_state())
        expected = [i for i, keep in enumerate(_reference_mask(n, q, reference)) if keep]
        assert loader.sample_indices().tolist() == expected
        assert torch.equal(loader.generator.get_state(), reference.get_state())  # same draws consumed


def test_the_tie_path_decides_with_the_low_half() -> None:
    """Pick q so that t's high half equals some drawn H (probability 2⁻³¹ per example otherwise, never seen by
    chance): those examples must be decided by their second draw L < t's low half, exactly."""
    n, seed = 2000, 5
    high = torch.empty(n, dtype=torch.int32).random_(0, 2**31, generator=torch.Generator().manual_seed(seed))
    h = int(high[7])
    tied = [i for i, v in enumerate(high.tolist()) if v == h]
    for low_t in (0, 2**30, 2**31 - 2**9):
        q = ((h << 31) + low_t) / 2**62
        assert inclusion_threshold(q) == (h << 31) + low_t  # q is exact in binary64 (≤ 53 significant bits)
        g = torch.Generator().manual_seed(seed)
        mask = bernoulli_mask(n, q, g)
        expected = _reference_mask(n, q, torch.Generator().manual_seed(seed))
        assert mask.tolist() == expected
        assert [bool(mask[i]) for i in tied] == [expected[i] for i in tied]
        below = int((high < h).sum())
        assert below <= int(mask.sum()) <= below + len(tied)
    # L really decides: with T_L = 0 the tied examples are out, with T_L = 2³¹ − 2⁹ (almost surely) in
    assert not bernoulli_mask(n, (h << 31) / 2**62, torch.Generator().manual_seed(seed))[7]
    assert bernoulli_mask(n, ((h << 31) + 2**31 - 2**9) / 2**62, torch.Generator().manual_seed(seed))[7]


def test_the_integers_are_uniform_on_all_31_bits_of_each_half() -> None:
    """Every bit of H is a fair coin (5-sigma band over 10⁶ draws) and the range is [0, 2³¹): so U = H·2³¹ + L is
    uniform on [0, 2⁶²) and "U < t" has probability t/2⁶²."""
    n = 1_000_000
    draws = torch.empty(n, dtype=torch.int32).random_(0, 2**31, generator=torch.Generator().manual_seed(1)).long()
    assert int(draws.min()) >= 0 and int(draws.max()) < 2**31
    assert int(draws.max()) > 2**31 - 2**31 // 1000 and int(draws.min()) < 2**31 // 1000  # the whole range is used
    for bit in range(31):
        ones = int(((draws >> bit) & 1).sum())
        assert abs(ones - n / 2) < 5 * math.sqrt(n / 4), (bit, ones)


def test_sample_mean_matches_the_exact_probability() -> None:
    """Sanity: inclusion counts over 200 steps of 5000 examples at q = 0.3 (z-test, 5 sigma), and at q = 10⁻⁴
    over 10⁷ decisions."""
    for q, n, steps in [(0.3, 5000, 200), (1e-4, 1_000_000, 10)]:
        loader = PoissonDataLoader(TensorDataset(torch.arange(n)), q, seed=2)
        total = sum(len(loader.sample_indices()) for _ in range(steps))
        p, trials = float(inclusion_probability(q)), n * steps
        assert abs(total - p * trials) < 5 * math.sqrt(trials * p * (1 - p)), (q, total)


def test_secure_mode_reseeds_from_the_os_and_uses_the_same_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    n, q = 3000, 0.2
    loader = PoissonDataLoader(TensorDataset(torch.arange(n)), q, secure_mode=True)
    seed_bytes = bytes(range(8))
    monkeypatch.setattr(os, "urandom", lambda k: seed_bytes[:k])
    expected = bernoulli_mask(n, q, torch.Generator().manual_seed(int.from_bytes(seed_bytes, "little")))
    assert loader.sample_indices().tolist() == expected.nonzero().flatten().tolist()


@pytest.mark.parametrize("q", [1e-6, 0.05, 1 / 3])
def test_sharded_sampling_is_the_single_process_batch(q: float) -> None:
    """Distributed mode: the ranks' shards of the same mask partition the single-process batch."""
    n, world = 20_000, 3
    data = TensorDataset(torch.arange(n))
    whole = PoissonDataLoader(data, q, seed=9)
    shards = [PoissonDataLoader(data, q, seed=9, shard=(r, world)) for r in range(world)]
    for _ in range(5):
        expected = whole.sample_indices()
        parts = [loader.sample_indices() for loader in shards]
        assert all(bool((part % world == r).all()) for r, part in enumerate(parts))
        assert sorted(torch.cat(parts).tolist()) == expected.tolist()


def test_checkpoint_restores_the_sequence_and_counts_draws() -> None:
    loader = PoissonDataLoader(TensorDataset(torch.arange(500)), 0.1, seed=4)
    for _ in loader:
        pass
    assert loader.batches_drawn == len(loader)
    state = loader.state_dict()
    after = [loader.sample_indices().tolist() for _ in range(3)]
    resumed = PoissonDataLoader(TensorDataset(torch.arange(500)), 0.1, seed=99)
    resumed.load_state_dict(state)
    assert [resumed.sample_indices().tolist() for _ in range(3)] == after
    assert resumed.batches_drawn == 0  # counted from the restore (not part of the checkpoint)


def test_an_empty_batch_carries_no_value_of_any_example():
    """An empty Poisson batch is built from example 0's collated shape: its tensors and its per-example lists (a
    text column) must come out with no rows, so nothing of example 0 reaches a step that did not sample it."""
    rows = [{"x": torch.full((3,), float(i)), "text": f"secret {i}", "label": i % 2} for i in range(40)]

    def collate(batch: list[dict]) -> dict:
        return {"x": torch.stack([b["x"] for b in batch]), "text": [b["text"] for b in batch],
                "label": torch.tensor([b["label"] for b in batch])}

    loader = PoissonDataLoader(rows, sample_rate=0.01, collate_fn=collate, seed=3)
    empty = [batch for batch in loader if len(batch["label"]) == 0]
    assert empty and all(batch["text"] == [] and batch["x"].shape == (0, 3) for batch in empty)
