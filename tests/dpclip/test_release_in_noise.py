"""The release of a one-process step with the default sampler: the noise is drawn first and the last batch's clipped
sum is formed inside it (dpclip.aggregation.ClippedSum.release_in_noise). Held against a brute-force oracle: each
example's gradient computed alone, clipped, summed, plus the Gaussian (or Laplace) draws a fresh generator seeded
with the engine's seed gives for the parameters in their order; and the noise left after subtracting the brute-force
sum must pass a Kolmogorov–Smirnov test against the charged law."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
from scipy import stats
from torch.utils.data import DataLoader, TensorDataset

from dpclip import PrivacyEngine

SIGMA, BOUND, N, SEED = 0.8, 0.5, 48, 11


def dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(N, 12, generator=g), torch.randint(0, 3, (N,), generator=g))


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 400), nn.Tanh(), nn.Linear(400, 3))


def brute_force_sum(reference: nn.Module, data: TensorDataset, norm: str) -> dict[str, torch.Tensor]:
    """Σ_i clip(g_i, C) with each g_i from example i alone (float64 bookkeeping)."""
    total = {name: torch.zeros_like(p, dtype=torch.float64) for name, p in reference.named_parameters()}
    for x, y in zip(*data.tensors):
        reference.zero_grad()
        nn.functional.cross_entropy(reference(x[None]), y[None]).backward()
        grads = {name: p.grad.double() for name, p in reference.named_parameters()}
        flat = torch.cat([g.flatten() for g in grads.values()])
        size = flat.norm(p=2 if norm == "l2" else 1)
        factor = min(1.0, BOUND / float(size))
        for name, g in grads.items():
            total[name] += factor * g
    return total


def oracle_noise(shapes: dict[str, torch.Size], norm: str) -> dict[str, torch.Tensor]:
    """The draws of a generator seeded with the engine's seed, parameters in order: N(0, (σC/N)²) per coordinate,
    or Laplace(σC/N) as the difference of two Exp(1) draws."""
    gen = torch.Generator().manual_seed(SEED)
    scale = SIGMA * BOUND / N
    out = {}
    for name, shape in shapes.items():
        if norm == "l2":
            out[name] = torch.empty(shape).normal_(0.0, scale, generator=gen)
        else:
            first = torch.empty(shape).exponential_(generator=gen)
            out[name] = (first - torch.empty(shape).exponential_(generator=gen)) * scale
    return out


@pytest.mark.parametrize("norm", ["l2", "l1"])
@pytest.mark.parametrize("micro", [None, 20], ids=["one_batch", "micro_batches"])
def test_release_is_the_brute_force_clipped_sum_plus_the_seeded_draws(norm, micro):
    net, data = model(), dataset()
    reference = copy.deepcopy(net)
    engine = PrivacyEngine(seed=SEED)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.0)
    private, optimizer, loader = engine.make_private(
        net, optimizer, DataLoader(data, batch_size=N), noise_multiplier=SIGMA, max_grad_norm=BOUND, norm=norm,
        sample_rate=1.0, max_physical_batch_size=micro)
    pending_seen = []
    for x, y in loader:
        optimizer.zero_grad()
        nn.functional.cross_entropy(private(x), y).backward()
        pending_seen.append(engine._sum.pending is not None)
        optimizer.step()
        if engine.steps == 1:
            break
    # only the step's last batch is left to the release (earlier micro-batches are summed in their backward)
    assert pending_seen[-1] and not any(pending_seen[:-1])
    expected_sum = brute_force_sum(reference, data, norm)
    noise = oracle_noise({name: p.shape for name, p in net.named_parameters()}, norm)
    residuals = []
    for name, p in net.named_parameters():
        expected = noise[name].double() + expected_sum[name] / N
        torch.testing.assert_close(p.grad.double(), expected, rtol=0, atol=2e-6 * BOUND / N * 100)
        residuals.append(((p.grad.double() - expected_sum[name] / N) * N / (SIGMA * BOUND)).flatten())
    standardized = torch.cat(residuals).numpy()
    assert standardized.size > 6000
    law = ("norm", ()) if norm == "l2" else ("laplace", ())
    assert stats.kstest(standardized, law[0]).pvalue > 1e-3
    assert abs(float(np.std(standardized)) - (1.0 if norm == "l2" else np.sqrt(2.0))) < 0.05


def test_secure_mode_sums_apart_and_snaps_the_sum():
    """Secure mode snaps value + noise to a grid, so it never takes the sum-inside-the-noise path."""
    net, data = model(), dataset()
    engine = PrivacyEngine(secure_mode=True)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.0)
    private, optimizer, loader = engine.make_private(
        net, optimizer, DataLoader(data, batch_size=N), noise_multiplier=SIGMA, max_grad_norm=BOUND, sample_rate=1.0)
    x, y = next(iter(loader))
    nn.functional.cross_entropy(private(x), y).backward()
    assert engine._sum.pending is None and engine._sum.sums
    optimizer.step()
    assert engine.steps == 1
