"""Empirical privacy audit: Clopper–Pearson against scipy's binomial, correct configurations stay below the
claim (and below the exact privacy curve), planted bugs are caught, and the bound is tight to within a stated
fraction of the claim."""

import math
import runpy
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from scipy import optimize, stats

import dpclip.audit.statistics
import dpclip.clipping
from accountants import Composed, Gaussian, Laplace, PLDAccountant, PoissonSampled
from dpclip.audit import audit_config, clopper_pearson, epsilon_lower_bound, main
from dpclip.clipping import clip_factors
from dpclip.noise import NoiseSource


def exact_gaussian_epsilon(noise_multiplier: float, delta: float) -> float:
    """ε(δ) of one Gaussian mechanism with sensitivity 1 (Balle & Wang 2018, Thm. 8):
    δ = Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2), μ = 1/σ. Any valid audit of it must stay below."""
    mu = 1.0 / noise_multiplier
    gap = lambda eps: stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2) - delta
    return optimize.brentq(gap, 0.0, 100.0)


def claimed(event, steps: int = 1, delta: float = 1e-5) -> float:
    accountant = PLDAccountant()  # the engine's default accountant
    accountant.compose(event, steps)
    return accountant.get_epsilon(delta)


# ------------------------------------------------------------------------------------------------------
# Statistics
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k, n", [(0, 50), (3, 50), (17, 50), (50, 50), (0, 100_000), (12, 100_000)])
def test_clopper_pearson_inverts_the_binomial_tails(k, n):
    """Upper bound u: P(Bin(n, u) ≤ k) = α; lower bound l: P(Bin(n, l) ≥ k) = α (scipy's binomial)."""
    alpha = 0.025
    lower, upper = (float(v) for v in clopper_pearson(k, n, alpha))
    if k < n:
        assert stats.binom.cdf(k, n, upper) == pytest.approx(alpha, rel=1e-6)
    else:
        assert upper == 1.0
    if k > 0:
        assert stats.binom.sf(k - 1, n, lower) == pytest.approx(alpha, rel=1e-6)
    else:
        assert lower == 0.0
        assert upper == pytest.approx(1 - alpha ** (1 / n), rel=1e-9)  # closed form for zero successes


def test_bound_of_a_perfect_test_has_the_closed_form():
    """All n runs with the canary detected, none of the n without: FPR⁺ = FNR⁺ = 1 − (α/2)^{1/n}."""
    n, alpha, delta = 1000, 0.05, 1e-5
    bound, fpr_upper, fnr_upper = epsilon_lower_bound(n, n, 0, n, alpha, delta)
    rate = 1 - (alpha / 2) ** (1 / n)
    assert float(fpr_upper) == pytest.approx(rate) and float(fnr_upper) == pytest.approx(rate)
    assert float(bound) == pytest.approx(math.log((1 - rate - delta) / rate))
    useless, _, _ = epsilon_lower_bound(500, 1000, 500, 1000, alpha, delta)  # a coin flip proves nothing
    assert float(useless) == 0.0


def test_the_statistics_run_without_torch():
    """dpclip/audit/statistics.py needs numpy and scipy only: loaded by path with torch unimportable, a perfectly
    separating score is found on the calibration half and gives the closed-form bound on the held-out half."""
    path = Path(dpclip.audit.statistics.__file__)
    code = textwrap.dedent(f"""
        import importlib.util, math, sys
        import numpy as np

        class NoTorch:  # first on the import path: `import torch` raises ImportError
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "torch":
                    raise ImportError("torch is blocked")

        sys.meta_path.insert(0, NoTorch())
        spec = importlib.util.spec_from_file_location("audit_statistics", {str(path)!r})
        statistics = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = statistics
        spec.loader.exec_module(statistics)
        rng = np.random.default_rng(0)
        scores = {{"noise": (rng.normal(size=2000), rng.normal(size=2000)),
                   "signal": (rng.normal(size=2000) + 100.0, rng.normal(size=2000))}}
        found = statistics.evaluate(scores, 2000, rng, calibration_fraction=0.5, alpha=0.05, delta=1e-5)
        assert found.test.score == "signal" and found.test.above and found.fpr == found.fnr == 0.0, found
        rate = 1 - 0.025 ** (1 / 1000)
        assert math.isclose(found.epsilon_lower_bound, math.log((1 - rate - 1e-5) / rate)), found
        assert "torch" not in sys.modules
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


# ------------------------------------------------------------------------------------------------------
# Correct configurations: below the claim (and below the exact curve where it is known)
# ------------------------------------------------------------------------------------------------------
CORRECT = [
    dict(norm="l2", clipping="fixed"),
    dict(norm="l1", clipping="fixed"),
    dict(norm="l2", clipping="median"),
    dict(norm="l1", clipping="median"),
    dict(norm="l2", clipping="fixed", sample_rate=0.3, steps=3),
    dict(norm="l1", clipping="fixed", sample_rate=0.3, steps=2),
    dict(norm="l2", clipping="fixed", grad_sample_mode="vmap", canaries_per_run=200, trials=10_000),
    dict(norm="l2", clipping="fixed", loss_reduction="mean"),
    dict(norm="l2", clipping="fixed", secure_mode=True),
]


@pytest.mark.parametrize("config", CORRECT, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_correct_configurations_stay_below_the_claim(config):
    config = dict(config)
    q = config.pop("sample_rate", 1.0)
    steps = config.get("steps", 1)
    trials = config.pop("trials", 50_000)
    result = audit_config(1.0, q, trials=trials, seed=1, **config)
    base = Gaussian(1.0) if config["norm"] == "l2" else Laplace(1.0)
    if config["clipping"] == "median":  # σ_b = q·N/20 with N = 10 background + K/2 canaries; split for Gaussian
        sigma_b = q * (10 + min(2 * trials, 200_000) // 2) / 20
        base = Composed([base, Gaussian(2 * sigma_b)])
        if config["norm"] == "l2":
            base = Composed([Gaussian((1.0 - (2 * sigma_b) ** -2) ** -0.5), Gaussian(2 * sigma_b)])
    assert result.claimed_epsilon == pytest.approx(claimed(PoissonSampled(q, base), steps), rel=1e-9)
    assert not result.violated and result.epsilon_lower_bound <= result.claimed_epsilon
    assert result.epsilon_lower_bound > 0.25 * result.claimed_epsilon  # the audit has power
    if q == 1.0 and steps == 1:
        exact = exact_gaussian_epsilon(1.0, 1e-5) if config["norm"] == "l2" else 1.0  # Laplace(1): pure ε = 1
        assert result.epsilon_lower_bound <= exact


def test_independent_runs_with_median_clipping_score_the_released_count():
    """One canary per run (fresh engine each): the count recovered from the public C update is scored too. With
    a small count noise σ_b the count carries most of the signal; the total is still one Gaussian(σ) per step."""
    result = audit_config(
        1.0, 1.0, clipping="median", canaries_per_run=1, trials=600, canary_norm=0.5, count_noise_multiplier=0.55, seed=2
    )
    assert result.runs == 1200 and result.canaries_per_run == 1
    assert result.claimed_epsilon == pytest.approx(claimed(PoissonSampled(1.0, Gaussian(1.0))), rel=1e-9)
    assert 0 < result.epsilon_lower_bound <= exact_gaussian_epsilon(1.0, 1e-5)


# ------------------------------------------------------------------------------------------------------
# Planted bugs: the bound must exceed the claim. They go in through public seams only — tamper= (each fresh
# engine's public parts), the NoiseSource class, the clip_factors function — never through the engine's internals.
# ------------------------------------------------------------------------------------------------------
class Silent(NoiseSource):
    """The planted bug: every noise draw is zero."""

    def gaussian(self, like, std):
        return torch.zeros_like(like)

    def laplace(self, like, scale):
        return torch.zeros_like(like)


def switch_noise_off(engine):
    """tamper=: swap the engine's public noise source for the silent one."""
    engine.noise = Silent(seed=engine.noise.seed)


@pytest.mark.parametrize("norm", ["l2", "l1"])
def test_noise_switched_off_is_caught(norm):
    result = audit_config(1.0, 1.0, norm=norm, trials=20_000, tamper=switch_noise_off)
    assert result.violated and result.epsilon_lower_bound > result.claimed_epsilon + 3
    assert result.fpr == 0 and result.fnr == 0


@pytest.mark.parametrize("norm", ["l2", "l1"])
def test_noise_scaled_down_tenfold_is_caught(monkeypatch, norm):
    gaussian, laplace = NoiseSource.gaussian, NoiseSource.laplace
    monkeypatch.setattr(NoiseSource, "gaussian", lambda self, like, std: gaussian(self, like, 0.1 * std))
    monkeypatch.setattr(NoiseSource, "laplace", lambda self, like, scale: laplace(self, like, 0.1 * scale))
    result = audit_config(1.0, 1.0, norm=norm, trials=20_000)
    assert result.violated and result.epsilon_lower_bound > result.claimed_epsilon + 2


def skip_clipping(monkeypatch):
    """The planted bug: every clipping factor min(1, C/‖g‖) is 1 — dpclip.clipping.clip_factors replaced in every
    dpclip module that imported it, wherever the engine happens to call it from."""
    holders = [
        module for name, module in sorted(sys.modules.items())
        if name.split(".")[0] == "dpclip" and getattr(module, "clip_factors", None) is clip_factors
    ]
    assert dpclip.clipping in holders and len(holders) > 1  # the definition, and where the engine clips
    for module in holders:
        monkeypatch.setattr(module, "clip_factors", lambda norms, max_norm: torch.ones_like(norms))


@pytest.mark.parametrize("norm", ["l2", "l1"])
def test_skipped_clipping_is_caught(monkeypatch, norm):
    """The canary's gradient has norm 1000·C; without clipping its update dwarfs the noise."""
    skip_clipping(monkeypatch)
    result = audit_config(1.0, 1.0, norm=norm, trials=20_000, canary_norm=1000.0)
    assert result.violated and result.epsilon_lower_bound > result.claimed_epsilon + 3


def test_median_count_released_without_noise_is_caught(monkeypatch):
    """Canary below C (0.5·C), the background above (2·C): the noiseless count moves by exactly ½ with the canary,
    which the released C_{s+1}/C_s reveals. The engine's scalar count draw is the only 0-dim draw."""
    gaussian = NoiseSource.gaussian

    def noiseless_count(self, like, std):
        return torch.zeros_like(like) if like.dim() == 0 else gaussian(self, like, std)

    monkeypatch.setattr(NoiseSource, "gaussian", noiseless_count)
    result = audit_config(
        2.0, 1.0, clipping="median", canaries_per_run=1, trials=400, canary_norm=0.5, background_norm=2.0,
        count_noise_multiplier=5.0, seed=3,
    )
    assert result.score in ("count", "combined")
    assert result.violated and result.epsilon_lower_bound > result.claimed_epsilon + 1


def test_the_same_count_audit_passes_with_the_noise_on():
    result = audit_config(
        2.0, 1.0, clipping="median", canaries_per_run=1, trials=400, canary_norm=0.5, background_norm=2.0,
        count_noise_multiplier=5.0, seed=3,
    )
    assert not result.violated


# The planted bug lives with the benchmark that reports its figures (README § Auditing): noise drawn once per
# tensor shape and reused at every step.
reuse_noise = runpy.run_path(str(Path(__file__).resolve().parents[2] / "benchmarks" / "audit_tightness.py"))["reuse_noise"]


@pytest.mark.parametrize("norm", ["l2", "l1"])
def test_noise_reused_across_steps_is_caught(norm):
    """q = 0.5, σ = 1, 4 steps: claimed ε = 6.68 (Gaussian, PLD). The sum of the steps' scores only sees
    4·Z + (number of steps with the canary): one draw's worth of noise, so the old score's bound was 1.35.
    The spread across steps is ≈ 0 without the canary (the same Z every step) and exactly 1 with it whenever
    it was sampled at some steps and not others (probability 1 − 2·0.5⁴): a perfect test, bound ≈ 8.7."""
    result = audit_config(1.0, 0.5, norm=norm, steps=4, trials=50_000, seed=1, tamper=reuse_noise)
    assert result.score in ("step_range", "max_step")
    assert result.violated and result.epsilon_lower_bound > result.claimed_epsilon + 0.5
    assert result.fpr < 1e-3 and result.fnr < 0.15  # 1 − 2·0.5⁴ = 0.875 of the canaries move between steps
    honest = audit_config(1.0, 0.5, norm=norm, steps=4, trials=50_000, seed=1)
    assert honest.claimed_epsilon == result.claimed_epsilon
    assert not honest.violated and honest.epsilon_lower_bound < honest.claimed_epsilon


def test_the_per_step_scores_are_offered_only_with_several_steps():
    one = audit_config(1.0, 1.0, trials=2_000, seed=0)
    assert one.score == "gradient"  # with one step max_step = gradient and step_range = 0: not offered
    several = audit_config(1.0, 0.5, steps=3, trials=2_000, seed=0, tamper=reuse_noise)
    assert several.score in ("step_range", "max_step")


def test_tamper_hook_reaches_each_engine():
    def no_noise(engine):
        engine.noise.gaussian = lambda like, std: torch.zeros_like(like)

    result = audit_config(1.0, 1.0, trials=5_000, tamper=no_noise)
    assert result.violated


# ------------------------------------------------------------------------------------------------------
# Tightness
# ------------------------------------------------------------------------------------------------------
def test_gaussian_audit_is_tight_to_half_the_claim():
    """One step, q = 1, σ = 1.2: claimed ε ≈ 3.549 (PLD, a hair above the exact ε of Balle & Wang). With 10⁶
    trials per world at 95% confidence the bound must reach half the claim (measured: 0.69–0.90 over 16 seeds,
    benchmarks/results/audit_tightness.md) and must not pass the exact curve."""
    result = audit_config(1.2, 1.0, trials=1_000_000, confidence=0.95, seed=0)
    exact = exact_gaussian_epsilon(1.2, 1e-5)
    assert 3.5 < exact < result.claimed_epsilon < 4.0
    assert result.epsilon_lower_bound <= exact
    assert result.tightness >= 0.5


def test_laplace_audit_is_nearly_exact():
    """Laplace(b = 0.5), one step, q = 1: pure ε = 2 is attained by the test "score > 1" (likelihood ratio e²);
    10⁵ trials pin it to within 5%."""
    result = audit_config(0.5, 1.0, norm="l1", trials=100_000, seed=0)
    assert result.claimed_epsilon == pytest.approx(2.0, rel=1e-4)  # PLD at δ = 1e-5: a hair below the pure ε = 2
    assert 0.95 * 2.0 <= result.epsilon_lower_bound <= 2.0


# ------------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------------
def test_command_line_prints_the_bound_next_to_the_claim(capsys):
    assert main(["--noise-multiplier", "1.0", "--sample-rate", "1", "--trials", "5000"]) == 0
    out = capsys.readouterr().out
    claim = claimed(PoissonSampled(1.0, Gaussian(1.0)))
    assert "claimed ε" in out and "lower bound" in out and f"{math.floor(claim * 1000) / 1000:.3f}" in out
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--noise-multiplier", "--sample-rate", "--norm", "--clipping", "--trials", "--confidence", "--canaries-per-run"):
        assert flag in text
    # a bad value exits 2 with a message (1 means a violation was found, so a typo must not look like one)
    # (a device this torch lacks raised torch's own error with exit status 1, read as a violation)
    for bad in (["--noise-multiplier", "-1"], ["--sample-rate", "2"], ["--delta", "1"], ["--trials", "1"],
                ["--device", "bogus"], ["--device", "meta:x"]):
        args = dict(zip(["--noise-multiplier", "--sample-rate"], ["1.0", "1"])) | dict(zip(bad[::2], bad[1::2]))
        with pytest.raises(SystemExit) as exit_info:
            main([part for pair in args.items() for part in pair])
        assert exit_info.value.code == 2
        assert "error:" in capsys.readouterr().err


def test_python_dash_m_runs_the_command_line():
    done = subprocess.run([sys.executable, "-m", "dpclip.audit", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "python -m dpclip.audit" in done.stdout and "--noise-multiplier" in done.stdout


def test_command_line_exits_1_on_a_violation(monkeypatch, capsys):
    monkeypatch.setattr(NoiseSource, "gaussian", Silent.gaussian)  # no tamper= on the command line
    assert main(["--noise-multiplier", "1.0", "--sample-rate", "1", "--trials", "5000", "--json"]) == 1
    assert '"violated": true' in capsys.readouterr().out
