"""Secure noise (secure_mode=True): the Holohan–Braghin samplers against scipy's laws, the snapped release
against the exact discretised law, the power-of-two grid, and a Mironov-style reachability attack that breaks
a textbook float sampler but finds nothing on the snapped release."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from accountants import Gaussian, PLDAccountant, PoissonSampled
from dpclip import NoiseSource, PrivacyEngine, add_noise
from dpclip.noise import (
    GRID_BITS,
    RANGE_BITS,
    secure_standard_gaussian,
    secure_standard_laplace,
    snapping_bound,
    snapping_grid,
)

KS_LEVEL = 1e-3  # reject a distribution at p < 1e-3

LAWS = {
    "gaussian": (secure_standard_gaussian, stats.norm),
    "laplace": (secure_standard_laplace, stats.laplace),
}


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("mechanism", ["gaussian", "laplace"])
def test_secure_samplers_follow_the_exact_laws(mechanism):
    """400k float64 draws: Kolmogorov–Smirnov against scipy's N(0, 1) / Laplace(0, 1) at the 1e-3 level, and
    the variance within 1.5% (≥ 4 standard errors for either law at this size). Power check: the same KS test
    rejects the other law with the same variance, and a single Holohan–Braghin product term (not Laplace)."""
    sampler, law = LAWS[mechanism]
    values = sampler((400_000,), _generator(11), torch.device("cpu"))
    assert values.dtype == torch.float64
    x = values.numpy()
    assert stats.kstest(x, law.cdf).pvalue > KS_LEVEL
    assert x.var() == pytest.approx(law.var(), rel=0.015)
    other = stats.laplace(scale=math.sqrt(0.5)) if mechanism == "gaussian" else stats.norm(scale=math.sqrt(2.0))
    assert stats.kstest(x, other.cdf).pvalue < 1e-6
    if mechanism == "laplace":
        u = torch.rand((2, 400_000), generator=_generator(12), dtype=torch.float64)
        one_term = (torch.log1p(-u[0]) * torch.cos(math.pi * u[1])).numpy() * math.sqrt(2.0)  # variance 1 → 2
        assert stats.kstest(one_term, law.cdf).pvalue < 1e-6


@pytest.mark.parametrize("scale", [3e-3, 0.37, 1.0, 1234.5])
@pytest.mark.parametrize("mechanism", ["gaussian", "laplace"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_secure_release_lies_on_a_power_of_two_grid(scale, mechanism, dtype):
    grid = snapping_grid(scale)
    assert math.frexp(grid)[0] == 0.5  # a power of two
    assert scale * 2.0**-GRID_BITS <= grid < scale * 2.0 ** (1 - GRID_BITS)
    assert snapping_bound(scale) == grid * 2.0**RANGE_BITS
    g = _generator(5)
    values = (torch.randn(50_000, generator=g, dtype=torch.float64) * 3 * scale + 0.1).to(dtype)  # off-grid inputs
    out = NoiseSource(secure_mode=True).noisy(values, scale, mechanism)
    assert out.dtype == dtype and out.shape == values.shape
    steps = out.double() / grid
    assert torch.equal(steps, torch.round(steps))
    assert not torch.equal(values.double() / grid, torch.round(values.double() / grid))  # the inputs were not


@pytest.mark.parametrize("mechanism", ["gaussian", "laplace"])
def test_snapped_release_has_the_exact_discretised_law(mechanism):
    """200k releases of x = 0.3·s (off the grid): P(Y = kΛ) = F((k+½)Λ − x) − F((k−½)Λ − x) with F scipy's CDF of
    the noise; the largest CDF gap must stay below the KS critical value at 1e-3 (conservative for a discrete
    law). Mean within 5 standard errors of x; variance s² + Λ²/12 (Sheppard) within 1.5%."""
    _, law = LAWS[mechanism]
    scale = 0.7
    grid = snapping_grid(scale)
    n = 200_000
    x = 0.3 * scale
    out = NoiseSource(secure_mode=True).noisy(torch.full((n,), x, dtype=torch.float64), scale, mechanism).numpy()
    k = np.round(out / grid).astype(np.int64)
    support = np.arange(k.min(), k.max() + 1)
    empirical = np.searchsorted(np.sort(k), support, side="right") / n
    exact = law.cdf((support + 0.5) * grid - x, scale=scale)
    gap = np.abs(empirical - exact).max()
    assert gap < stats.kstwo.ppf(1 - KS_LEVEL, n)
    noise_sd = scale * (1.0 if mechanism == "gaussian" else math.sqrt(2.0))
    assert abs(out.mean() - x) < 5 * noise_sd / math.sqrt(n)
    assert out.var() == pytest.approx(noise_sd**2 + grid**2 / 12, rel=0.015)
    # Power check: the same statistic sees a shift of the input by a quarter of a standard deviation.
    shifted = law.cdf((support + 0.5) * grid - x - 0.25 * noise_sd, scale=scale)
    assert np.abs(empirical - shifted).max() > stats.kstwo.ppf(1 - KS_LEVEL, n)


def _naive_laplace(x: float, scale: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """Textbook inverse-CDF Laplace in float64, x + s·sign·(−ln U) with U on the 2^-53 grid: the sampler that
    Mironov (2012) shows to be porous."""
    u = rng.integers(1, 2**53, size=n, endpoint=True).astype(np.float64) * 2.0**-53
    sign = np.where(rng.random(n) < 0.5, -1.0, 1.0)
    return x + scale * sign * (-np.log(u))


def _naive_reachable(y: np.ndarray, x0: float, scale: float) -> np.ndarray:
    """Exact attack (Mironov 2012): could the naive sampler have produced y from x0? Invert the logarithm and
    replay the float computation for the nearby uniforms."""
    d = y - x0
    sign = np.where(d < 0, -1.0, 1.0)
    guess = np.rint(np.exp(-np.abs(d) / scale) * 2.0**53).astype(np.int64)
    ok = np.zeros(len(y), dtype=bool)
    for j in range(-4, 5):
        u = np.clip(guess + j, 1, 2**53).astype(np.float64) * 2.0**-53
        ok |= (x0 + scale * sign * (-np.log(u))) == y
    return ok


@pytest.mark.parametrize("mechanism", ["gaussian", "laplace"])
def test_no_reachability_signature_between_neighbouring_inputs(mechanism):
    """Inputs x0 = 0 and x1 = 1 (sensitivity 1, noise scale 1). Control: against the textbook float Laplace the
    exact reachability attack certifies x1 for most of its outputs (an infinite privacy loss). Secure release:
    both inputs land on the same lattice ΛZ, every grid point of the window [0, 1] is produced from either
    input (no gaps), so every output of x1 is also an output of x0 and the attack certifies nothing."""
    rng = np.random.default_rng(3)
    scale, n = 1.0, 200_000
    naive1 = _naive_laplace(1.0, scale, n, rng)
    assert _naive_reachable(_naive_laplace(0.0, scale, n, rng), 0.0, scale).all()  # the attack's replay is exact
    assert _naive_reachable(naive1, 0.0, scale).mean() < 0.6  # ≥ 40% of x1's outputs impossible from x0

    grid = snapping_grid(scale)
    source = NoiseSource(secure_mode=True)
    out0 = source.noisy(torch.zeros(n, dtype=torch.float64), scale, mechanism).numpy()
    out1 = source.noisy(torch.ones(n, dtype=torch.float64), scale, mechanism).numpy()
    for out in (out0, out1):
        assert np.array_equal(out / grid, np.round(out / grid))
    window = np.arange(0, round(1.0 / grid) + 1) * grid  # every grid point between the two inputs
    assert np.isin(window, out0).all() and np.isin(window, out1).all()
    # Reachable from x0 = on the lattice and within x0 ± the sampler's range (|noise| < 12.2·s Gaussian, 73.5·s
    # Laplace): every output of x1 qualifies, so the attack certifies none of them.
    reach = 12.2 * scale if mechanism == "gaussian" else 73.5 * scale
    assert (np.abs(out1 - 0.0) < reach).all()


def test_large_values_are_clamped_to_the_bound_and_small_ones_are_not():
    scale = 1.0
    bound = snapping_bound(scale)
    source = NoiseSource(secure_mode=True)
    out = source.noisy(torch.tensor([10 * bound, -10 * bound, 5.0], dtype=torch.float64), scale, "laplace")
    # clamp(x) = ±B, plus noise, snapped, clamped again: within the Laplace sampler's range (73.5·s) inside ±B.
    assert bound - 73.5 * scale <= out[0].item() <= bound
    assert -bound <= out[1].item() <= -bound + 73.5 * scale
    assert abs(out[2].item() - 5.0) < 80 * scale


def test_secure_mode_through_add_noise_engine_and_count():
    """add_noise, the engine's gradient step and median clipping's count all release snapped values; the
    accountant charges the same Gaussian as without secure mode; the draw stays on the input's device."""
    summed = {"w": torch.randn(4, 3) * 5, "b": torch.randn(3)}
    secure = NoiseSource(secure_mode=True)
    noisy = add_noise(summed, noise_multiplier=1.3, max_norm=0.5, norm="l2", source=secure)
    grid = snapping_grid(1.3 * 0.5)
    for name, value in noisy.items():
        assert value.dtype == summed[name].dtype
        assert torch.equal(value.double() / grid, torch.round(value.double() / grid))
    count = secure.noisy(torch.tensor(-2.5, dtype=torch.float64), 3.0, "gaussian")
    assert count.dim() == 0 and (count.item() / snapping_grid(3.0)).is_integer()

    torch.manual_seed(0)
    x, y = torch.randn(64, 5), torch.randn(64)
    model = torch.nn.Linear(5, 1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine = PrivacyEngine(secure_mode=True)
    model, optimizer, loader = engine.make_private(
        model, torch.optim.SGD(model.parameters(), lr=1.0), torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(x, y), batch_size=64), noise_multiplier=1.0, max_grad_norm=1.0,
        sample_rate=1.0, loss_reduction="sum",
    )
    for xb, yb in loader:  # q = 1, N = 64: the update × 64 is the released noisy sum, exactly (powers of two)
        optimizer.zero_grad()
        ((model(xb).squeeze(1) - yb) ** 2).sum().backward()
        optimizer.step()
    grid = snapping_grid(1.0)
    for name, p in model.module.named_parameters():
        released = (before[name] - p.detach()).double() * 64
        assert torch.equal(released / grid, torch.round(released / grid))
    reference = PLDAccountant()  # the engine's default accountant
    reference.compose(PoissonSampled(1.0, Gaussian(1.0)))
    assert engine.get_epsilon(1e-5) == pytest.approx(reference.get_epsilon(1e-5), rel=1e-12)

    median = PrivacyEngine(secure_mode=True)
    m2 = torch.nn.Linear(5, 1)
    m2, opt2, loader2 = median.make_private(
        m2, torch.optim.SGD(m2.parameters(), lr=0.1), torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(x, y), batch_size=16), noise_multiplier=1.0, max_grad_norm=1.0,
        clipping="median", count_noise_multiplier=2.0,
    )
    for xb, yb in loader2:
        opt2.zero_grad()
        ((m2(xb).squeeze(1) - yb) ** 2).mean().backward()
        opt2.step()
    assert median.steps == len(loader2) and len(set(median.clip_history)) > 1

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        for mechanism in ("gaussian", "laplace"):
            out = secure.noisy(torch.zeros(1000, device=device), 1.0, mechanism)
            assert out.device.type == device and out.dtype == torch.float32 and out.std().item() > 0.5


def test_default_mode_is_unchanged_and_reproducible():
    values = torch.randn(1000, generator=_generator(1))
    a = NoiseSource(seed=9).noisy(values, 0.5, "gaussian")
    b = values + NoiseSource(seed=9).gaussian(values, 0.5)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="noise law"):
        NoiseSource(seed=9).noisy(values, 0.5, "uniform")
