"""Empirical privacy audit: a statistically valid *lower* bound on ε for a DP-SGD configuration.

Membership inference on gradient canaries, run through the real dpclip code path — :class:`PrivacyEngine`,
its Poisson loader, per-example gradients, clipping, noise, the division by q·N, the optimizer step and the
accountant (Jagielski, Ullman & Oprea 2020, "Auditing Differentially Private Machine Learning: How Private is
Private SGD?"; Nasr et al. 2021, "Adversary Instantiation: Lower Bounds for Differentially Private Machine
Learning").

The set-up (the strongest, white-box adversary of Nasr et al. 2021):

- the model is an ``nn.Embedding(K + 1, 1)`` started at zero; canary slot t is one coordinate of its weight;
- the canary of slot t is an example whose gradient is ``canary_norm``·C along coordinate t (≫ C by default,
  so clipping cuts it to exactly C); ``background`` other examples have gradient ``background_norm``·C along
  coordinate K, orthogonal to every canary;
- each run draws a fresh engine and data set holding half of the K canaries ("with") and not the other half
  ("without"), trains ``steps`` steps with the ordinary loop, and scores every slot by the update of its
  coordinate (public output), Σ_s −Δw_t · q·N / (lr · C_s), i.e. b_t + noise in units of C;
- with ``clipping="median"`` and one canary per run, the released clipping bound is scored too: the noisy
  count is recovered from C_{s+1}/C_s and compared with what the background alone would give.

The scores with and without the canary are split: a calibration part picks the score, the threshold τ and
the side of the test; the held-out part gives one-sided Clopper–Pearson bounds (each at α/2, α = 1 −
confidence) on the false-positive and false-negative rates, and

    ε ≥ max( ln((1 − δ − FNR⁺) / FPR⁺),  ln((1 − δ − FPR⁺) / FNR⁺) )

holds with probability ≥ 1 − α for any (ε, δ)-DP mechanism (both inequalities use the same two bounds).

What the number means: if ``epsilon_lower_bound`` exceeds the ε the engine's accountant claims, the
implementation or the accounting is wrong (up to the audit's 1 − confidence chance of a false alarm). A low
bound proves nothing: the audit is one adversary among many.

Independence. With ``canaries_per_run=1`` every trial is a separate run (fresh engine, model, data set and
seed): the classical audit, valid for any implementation. With K > 1 canaries per run the K slots of a run
are treated as independent trials; that holds for the mechanism the accountant charges (independent noise
per coordinate, independent Poisson inclusion per example, per-example clipping), so a bound above the claim
still means the implementation is not that mechanism, but the K > 1 audit assumes that structure. The
score multiplies by each run's q·N, i.e. treats the data set size as public, as the accountant does.

Planting bugs: the audit reaches dpclip through module attributes at call time (``dpclip.engine.PrivacyEngine``,
which itself calls ``dpclip.engine.add_noise``, ``dpclip.engine.clip_factors``, ``NoiseSource.gaussian``...),
so ``monkeypatch.setattr`` on any of them changes the audited path; ``tamper=`` gets each fresh engine too.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn as nn
from scipy import stats
from torch.utils.data import DataLoader, TensorDataset

from accountants._validation import PrivacyParameterError, check_count, check_delta, check_positive, check_sample_rate

from . import engine as _engine

__all__ = ["AuditResult", "audit_config", "clopper_pearson", "epsilon_lower_bound", "main"]

# ----------------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------------
def clopper_pearson(successes: np.ndarray | int, trials: int, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """One-sided (1 − ``alpha``) lower and upper bounds on a binomial rate (Clopper & Pearson 1934, Biometrika)."""
    k = np.asarray(successes, dtype=np.float64)
    n = float(trials)
    with np.errstate(all="ignore"):
        lower = np.where(k > 0, stats.beta.ppf(alpha, np.maximum(k, 1), n - k + 1), 0.0)
        upper = np.where(k < n, stats.beta.ppf(1 - alpha, k + 1, np.maximum(n - k, 1)), 1.0)
    return lower, upper


def epsilon_lower_bound(
    hits_with: np.ndarray | int, n_with: int, hits_without: np.ndarray | int, n_without: int, alpha: float, delta: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ε lower bound from a test "canary present" (region G): G holds ``hits_with`` of ``n_with`` runs with the
    canary and ``hits_without`` of ``n_without`` runs without.

    (ε, δ)-DP gives P₁(G) ≤ e^ε P₀(G) + δ and P₀(Gᶜ) ≤ e^ε P₁(Gᶜ) + δ; with TPR⁻ and FPR⁺ one-sided
    Clopper–Pearson bounds at α/2 each, both bounds below hold together with probability ≥ 1 − α
    (Jagielski et al. 2020). Returns (ε lower bound ≥ 0, FPR⁺, FNR⁺ = 1 − TPR⁻).
    """
    tpr_lower, _ = clopper_pearson(hits_with, n_with, alpha / 2)
    _, fpr_upper = clopper_pearson(hits_without, n_without, alpha / 2)
    fnr_upper = 1.0 - tpr_lower
    with np.errstate(divide="ignore", invalid="ignore"):
        first = np.log(np.maximum(1.0 - fnr_upper - delta, 0.0) / fpr_upper)
        second = np.log(np.maximum(1.0 - fpr_upper - delta, 0.0) / fnr_upper)
    bound = np.nan_to_num(np.maximum(first, second), nan=0.0, neginf=0.0, posinf=np.inf)
    return np.maximum(bound, 0.0), fpr_upper, fnr_upper


def _candidate_thresholds(values: np.ndarray, dense: int = 256, spaced: int = 1024) -> np.ndarray:
    """Thresholds at order statistics: every one of the ``dense`` extremes at each end, then geometrically
    spaced ranks (the tails, where small error rates live) and a linear grid."""
    ordered = np.unique(values)
    m = len(ordered)
    if m <= 2 * dense + 2 * spaced:
        return ordered
    ends = np.arange(dense)
    geometric = np.unique(np.geomspace(1, m, spaced).astype(np.int64)) - 1
    ranks = np.concatenate([ends, m - 1 - ends, geometric, m - 1 - geometric, np.linspace(0, m - 1, spaced).astype(np.int64)])
    return ordered[np.unique(np.clip(ranks, 0, m - 1))]


@dataclass(frozen=True)
class _Choice:
    score: str  # "gradient", "count" or "combined"
    threshold: float
    above: bool  # the test says "canary present" when score > threshold (else when score <= threshold)
    calibration_bound: float


def _hits(sorted_scores: np.ndarray, thresholds: np.ndarray, above: bool) -> np.ndarray:
    at_or_below = np.searchsorted(sorted_scores, thresholds, side="right")
    return len(sorted_scores) - at_or_below if above else at_or_below


def _select(
    scores: dict[str, tuple[np.ndarray, np.ndarray]], held_out: tuple[int, int], alpha: float, delta: float
) -> _Choice:
    """Pick the score, threshold and side whose bound *predicted for the held-out part* is largest.

    The prediction takes pessimistic (one-sided 84%, about one standard error) Clopper–Pearson rates from the
    calibration part, scales them to the held-out sizes and applies the final bound, so a threshold deep in
    a tail, estimated from a handful of calibration points, is not preferred by luck. Any rule is valid here:
    only calibration data are used.
    """
    best = _Choice("gradient", math.inf, True, -1.0)
    n_with, n_without = held_out
    for name, (with_canary, without_canary) in scores.items():
        w, wo = np.sort(with_canary), np.sort(without_canary)
        thresholds = _candidate_thresholds(np.concatenate([w, wo]))
        for above in (True, False):
            tpr, _ = clopper_pearson(_hits(w, thresholds, above), len(w), 0.16)
            _, fpr = clopper_pearson(_hits(wo, thresholds, above), len(wo), 0.16)
            bounds, _, _ = epsilon_lower_bound(tpr * n_with, n_with, fpr * n_without, n_without, alpha, delta)
            # Among (near-)ties — e.g. a plateau of perfect separation — take the middle threshold.
            ties = np.flatnonzero(bounds >= bounds.max() - 1e-9)
            i = int(ties[len(ties) // 2])
            if bounds[i] > best.calibration_bound:
                best = _Choice(name, float(thresholds[i]), above, float(bounds[i]))
    return best


# ----------------------------------------------------------------------------------------------------
# Result
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AuditResult:
    """Outcome of :func:`audit_config`.

    ``epsilon_lower_bound`` holds with probability ≥ ``confidence`` for an implementation that is
    (``claimed_epsilon``, ``delta``)-DP; above ``claimed_epsilon`` it is evidence of a bug (:attr:`violated`).
    ``fpr``/``fnr`` are the held-out error rates of the chosen test, ``fpr_upper``/``fnr_upper`` their
    Clopper–Pearson bounds; ``trials`` counts observations per world (with / without the canary).
    """

    epsilon_lower_bound: float
    claimed_epsilon: float
    delta: float
    confidence: float
    trials: int
    evaluation_trials: tuple[int, int]
    fpr: float
    fnr: float
    fpr_upper: float
    fnr_upper: float
    threshold: float
    test: str
    score: str
    runs: int
    canaries_per_run: int
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def violated(self) -> bool:
        """True when the empirical lower bound exceeds the accountant's claim: the implementation is wrong."""
        return self.epsilon_lower_bound > self.claimed_epsilon

    @property
    def tightness(self) -> float:
        """epsilon_lower_bound / claimed_epsilon (1 would mean the claim is exactly attained)."""
        return self.epsilon_lower_bound / self.claimed_epsilon if self.claimed_epsilon > 0 else math.inf

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(violated=self.violated, tightness=self.tightness)
        return out

    def summary(self) -> str:
        s = self.settings
        mechanism = "Gaussian/L2" if s.get("norm") == "l2" else "Laplace/L1"
        lines = [
            f"audit: {mechanism}, {s.get('clipping')} clipping, noise multiplier {s.get('noise_multiplier'):g}, "
            f"q = {s.get('sample_rate'):g}, C = {s.get('max_grad_norm'):g}, {s.get('steps')} step(s), δ = {self.delta:g}",
            f"  claimed ε (the engine's accountant):      {self.claimed_epsilon:.4f}",
            f"  empirical lower bound ({self.confidence:.0%} confidence): {self.epsilon_lower_bound:.4f}"
            f"   ({self.tightness:.0%} of the claim)",
            f"  test: {self.test} on {self.evaluation_trials[0]:,} held-out trials with the canary and "
            f"{self.evaluation_trials[1]:,} without: FPR {self.fpr:.3g} (≤ {self.fpr_upper:.3g}), "
            f"FNR {self.fnr:.3g} (≤ {self.fnr_upper:.3g})",
            f"  trials: {self.trials:,} per world in {self.runs:,} run(s) of {self.canaries_per_run:,} canary slot(s)",
        ]
        if self.violated:
            lines.append("  VIOLATION: the lower bound exceeds the claimed ε; the implementation or its accounting is wrong")
        else:
            lines.append("  consistent with the claim (a low bound does not prove privacy: it is one adversary's view)")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Running the mechanism
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Plan:
    noise_multiplier: float
    sample_rate: float
    max_grad_norm: float
    norm: str
    clipping: str
    steps: int
    delta: float
    slots: int
    canary_norm: float
    background: int
    background_norm: float
    count_noise_multiplier: float | None
    target_quantile: float
    clip_learning_rate: float
    loss_reduction: str
    grad_sample_mode: str
    secure_mode: bool
    device: str


@dataclass
class _RunOutput:
    scores: dict[str, np.ndarray]  # per slot
    claimed_epsilon: float


def _run(plan: _Plan, present: np.ndarray, seed: int | None, tamper: Callable[[Any], None] | None) -> _RunOutput:
    """One private training run on the canaries marked ``present`` (plus the background); scores every slot."""
    k, c0 = plan.slots, plan.max_grad_norm
    device = torch.device(plan.device)
    slots_in = torch.from_numpy(np.flatnonzero(present)).to(torch.long)
    ids = torch.cat([slots_in, torch.full((plan.background,), k, dtype=torch.long)])
    weights = torch.cat(
        [torch.full((len(slots_in),), plan.canary_norm * c0), torch.full((plan.background,), plan.background_norm * c0)]
    )
    dataset = TensorDataset(ids.to(device), weights.to(device))
    model = nn.Embedding(k + 1, 1).to(device)
    with torch.no_grad():
        model.weight.zero_()
    weight = model.weight
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    engine = _engine.PrivacyEngine(seed=seed, secure_mode=plan.secure_mode)
    private_model, private_optimizer, loader = engine.make_private(
        model,
        optimizer,
        DataLoader(dataset, batch_size=1),
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=c0,
        norm=plan.norm,  # type: ignore[arg-type]
        clipping=plan.clipping,  # type: ignore[arg-type]
        target_quantile=plan.target_quantile,
        clip_learning_rate=plan.clip_learning_rate,
        count_noise_multiplier=plan.count_noise_multiplier,
        loss_reduction=plan.loss_reduction,  # type: ignore[arg-type]
        sample_rate=plan.sample_rate,
        grad_sample_mode=plan.grad_sample_mode,  # type: ignore[arg-type]
    )
    if tamper is not None:
        tamper(engine)
    settings = engine.settings
    assert settings is not None and engine.clipping is not None
    score_count = plan.clipping == "median" and k == 1
    gradient = np.zeros(k)
    count = np.zeros(1)
    combined = np.zeros(k)
    done = 0
    while done < plan.steps:
        for x, w in loader:
            bound = float(engine.clipping.max_norm)
            before = weight.detach().clone()
            private_optimizer.zero_grad()
            per_example = private_model(x).squeeze(-1) * w
            loss = per_example.mean() if plan.loss_reduction == "mean" and len(x) > 0 else per_example.sum()
            loss.backward()
            private_optimizer.step()
            expected = settings.expected_batch_size
            # lr = 1: Δw = −(Σ clip(g_i) + noise) / (q·N); in units of C the canary adds 1 when it is sampled.
            step_score = (-(weight.detach() - before)[:k, 0]).double().cpu().numpy() * expected / bound
            gradient += step_score
            if score_count:
                noisy_count, sign, count_variance = _released_count(plan, engine, bound, expected)
                count += sign * noisy_count
                mean_gradient = min(plan.canary_norm * c0, bound) / bound
                gradient_variance = settings.gradient_noise_multiplier**2 * (1.0 if plan.norm == "l2" else 2.0)
                combined += mean_gradient * step_score / gradient_variance + 0.5 * sign * noisy_count / count_variance
            done += 1
            if done == plan.steps:
                break
    scores = {"gradient": gradient}
    if score_count:
        scores.update(count=count, combined=combined)
    return _RunOutput(scores, engine.get_epsilon(plan.delta))


def _released_count(plan: _Plan, engine: Any, bound: float, expected: float) -> tuple[float, float, float]:
    """The noisy centred count released by a median-clipping step, read off the public update of C, minus what
    the background contributes on average; with the sign of the canary's contribution and the variance."""
    clipping = engine.clipping
    ratio = clipping.max_norm / bound  # C ← C · exp(−η (b̃ − γ)),  b̃ = noisy centred count / (qN) + ½
    fraction_below = clipping.target_quantile - math.log(ratio) / clipping.learning_rate
    released = (fraction_below - 0.5) * expected
    q = plan.sample_rate
    below = float(plan.background_norm * plan.max_grad_norm <= bound)
    background_mean = q * plan.background * (below - 0.5)
    sign = 1.0 if plan.canary_norm * plan.max_grad_norm <= bound else -1.0
    variance = engine.settings.count_noise_multiplier**2 + plan.background * q * (1 - q) / 4
    return released - background_mean, sign, variance


# ----------------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------------
def audit_config(
    noise_multiplier: float,
    sample_rate: float,
    max_grad_norm: float = 1.0,
    *,
    norm: Literal["l2", "l1"] = "l2",
    clipping: Literal["fixed", "median"] = "fixed",
    steps: int = 1,
    trials: int = 100_000,
    confidence: float = 0.95,
    delta: float = 1e-5,
    seed: int | None = 0,
    canaries_per_run: int | None = None,
    canary_norm: float = 1000.0,
    background: int = 10,
    background_norm: float = 2.0,
    count_noise_multiplier: float | None = None,
    target_quantile: float = 0.5,
    clip_learning_rate: float = 0.2,
    loss_reduction: Literal["sum", "mean"] = "sum",
    grad_sample_mode: Literal["auto", "layerwise", "vmap"] = "auto",
    secure_mode: bool = False,
    calibration_fraction: float = 0.5,
    device: str = "cpu",
    tamper: Callable[[Any], None] | None = None,
) -> AuditResult:
    """Audit one DP-SGD configuration of :class:`dpclip.PrivacyEngine`; returns an :class:`AuditResult`.

    - ``trials``: observations with the canary, and as many without (split into calibration and held-out
      parts by ``calibration_fraction``).
    - ``canaries_per_run``: canary slots per run (1, or an even number; default min(2·trials, 200,000)).
      1 gives fully independent runs and, with median clipping, also scores the released count.
    - ``canary_norm`` / ``background_norm``: gradient norms of the canary and the background examples in units
      of C (≫ 1: the canary is clipped to exactly C; below 1 it counts as "below C" for median clipping).
    - ``count_noise_multiplier``: σ_b of median clipping; default q·N/20 with N the size of the data set
      holding the canary, the same for both worlds.
    - ``seed``: seeds the slot assignment and every run's engine (ignored for the engines in ``secure_mode``).
    - ``tamper``: called with each fresh engine after ``make_private`` (to plant a bug in a test).

    Paper: Jagielski, Ullman & Oprea 2020 (Clopper–Pearson audit); Nasr et al. 2021 (gradient canaries).
    """
    check_positive("noise_multiplier", noise_multiplier)
    check_sample_rate(sample_rate)
    check_positive("max_grad_norm", max_grad_norm)
    check_count("steps", steps)
    check_count("trials", trials)
    check_delta(delta)
    check_positive("canary_norm", canary_norm)
    if not 0 < confidence < 1:
        raise PrivacyParameterError(f"confidence must be in (0, 1), got {confidence!r}")
    if not 0 < calibration_fraction < 1:
        raise PrivacyParameterError(f"calibration_fraction must be in (0, 1), got {calibration_fraction!r}")
    if trials < 2:
        raise PrivacyParameterError("trials must be at least 2 (calibration and held-out parts)")
    slots = min(200_000, 2 * trials) if canaries_per_run is None else check_count("canaries_per_run", canaries_per_run)
    if slots > 1 and slots % 2:
        raise PrivacyParameterError(f"canaries_per_run must be 1 or even (half with, half without), got {slots}")
    if background < (1 if slots == 1 else 0):
        raise PrivacyParameterError("with one canary per run, background must be ≥ 1 (the data set without it)")
    if background_norm < 0:
        raise PrivacyParameterError(f"background_norm must be ≥ 0, got {background_norm!r}")
    if clipping == "median" and count_noise_multiplier is None:
        holding = background + (1 if slots == 1 else slots // 2)
        count_noise_multiplier = sample_rate * holding / 20.0
    plan = _Plan(
        float(noise_multiplier), float(sample_rate), float(max_grad_norm), norm, clipping, int(steps), float(delta),
        slots, float(canary_norm), int(background), float(background_norm),
        None if clipping != "median" else float(count_noise_multiplier),  # type: ignore[arg-type]
        float(target_quantile), float(clip_learning_rate), loss_reduction, grad_sample_mode, bool(secure_mode), device,
    )
    rng = np.random.default_rng(seed)
    per_run = 1 if slots == 1 else slots // 2  # observations per world and run (2 runs per pair when slots = 1)
    runs = 2 * trials if slots == 1 else math.ceil(trials / per_run)
    collected: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {}
    claimed: float | None = None
    for r in range(runs):
        if slots == 1:
            present = np.array([r % 2 == 0])
        else:
            present = np.zeros(slots, dtype=bool)
            present[rng.permutation(slots)[: slots // 2]] = True
        run_seed = None if secure_mode else int(rng.integers(0, 2**62))
        out = _run(plan, present, run_seed, tamper)
        if claimed is None:
            claimed = out.claimed_epsilon
        for name, values in out.scores.items():
            with_canary, without_canary = collected.setdefault(name, ([], []))
            with_canary.append(values[present])
            without_canary.append(values[~present])
    assert claimed is not None
    alpha = 1.0 - confidence
    pooled = {name: (np.concatenate(w)[:trials], np.concatenate(wo)[:trials]) for name, (w, wo) in collected.items()}
    order_with, order_without = rng.permutation(trials), rng.permutation(trials)
    cut = max(1, min(trials - 1, int(round(calibration_fraction * trials))))
    calibration = {n: (w[order_with[:cut]], wo[order_without[:cut]]) for n, (w, wo) in pooled.items()}
    choice = _select(calibration, (trials - cut, trials - cut), alpha, delta)
    held_with = pooled[choice.score][0][order_with[cut:]]
    held_without = pooled[choice.score][1][order_without[cut:]]
    hits_with = int(np.sum(held_with > choice.threshold)) if choice.above else int(np.sum(held_with <= choice.threshold))
    hits_without = (
        int(np.sum(held_without > choice.threshold)) if choice.above else int(np.sum(held_without <= choice.threshold))
    )
    bound, fpr_upper, fnr_upper = epsilon_lower_bound(hits_with, len(held_with), hits_without, len(held_without), alpha, delta)
    settings = dict(
        noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate, max_grad_norm=plan.max_grad_norm,
        norm=norm, clipping=clipping, steps=plan.steps, canary_norm=plan.canary_norm, background=plan.background,
        background_norm=plan.background_norm, count_noise_multiplier=plan.count_noise_multiplier,
        loss_reduction=loss_reduction, grad_sample_mode=grad_sample_mode, secure_mode=secure_mode, seed=seed,
    )
    side = ">" if choice.above else "≤"
    return AuditResult(
        epsilon_lower_bound=float(bound),
        claimed_epsilon=float(claimed),
        delta=float(delta),
        confidence=float(confidence),
        trials=int(trials),
        evaluation_trials=(len(held_with), len(held_without)),
        fpr=hits_without / len(held_without),
        fnr=1.0 - hits_with / len(held_with),
        fpr_upper=float(fpr_upper),
        fnr_upper=float(fnr_upper),
        threshold=choice.threshold,
        test=f"'{choice.score}' score {side} {choice.threshold:.6g} means 'canary present'",
        score=choice.score,
        runs=runs,
        canaries_per_run=slots,
        settings=settings,
    )


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dpclip.audit",
        description=(
            "Empirical privacy audit of a DP-SGD configuration: runs dpclip's PrivacyEngine many times with and "
            "without a gradient canary, and turns the best membership test's error rates into a lower bound on ε "
            "that holds with the given confidence (Clopper-Pearson; Jagielski et al. 2020). A lower bound above "
            "the claimed ε means the implementation or its accounting is wrong; a low bound proves nothing. "
            "Exit status 1 on a violation."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--noise-multiplier", type=float, required=True, help="σ (L2/Gaussian) or λ (L1/Laplace), in units of C")
    parser.add_argument("--sample-rate", type=float, required=True, help="Poisson sampling rate q")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="clipping bound C (initial C for median clipping)")
    parser.add_argument("--norm", choices=["l2", "l1"], default="l2", help="l2: Gaussian noise; l1: Laplace noise")
    parser.add_argument("--clipping", choices=["fixed", "median"], default="fixed", help="fixed C or adaptive median clipping")
    parser.add_argument("--steps", type=int, default=1, help="training steps per run (the claim is for the whole run)")
    parser.add_argument("--trials", type=int, default=100_000, help="observations with the canary (and as many without)")
    parser.add_argument("--confidence", type=float, default=0.95, help="probability that the bound is valid")
    parser.add_argument("--delta", type=float, default=1e-5, help="δ of the claim and of the bound")
    parser.add_argument("--seed", type=int, default=0, help="seed of the audit (ignored by engines in --secure-mode)")
    parser.add_argument(
        "--canaries-per-run", type=int, default=None,
        help="canary slots per run: 1 = independent runs (also scores median clipping's count); even K: K/2 with, K/2 "
        "without, treated as independent (default min(2·trials, 200000))",
    )
    parser.add_argument("--canary-norm", type=float, default=1000.0, help="canary gradient norm in units of C (≫1: clipped to C)")
    parser.add_argument("--background", type=int, default=10, help="number of other examples in the data set")
    parser.add_argument("--background-norm", type=float, default=2.0, help="their gradient norm in units of C (orthogonal to canaries)")
    parser.add_argument("--count-noise-multiplier", type=float, default=None, help="σ_b of median clipping (default q·N/20)")
    parser.add_argument("--grad-sample-mode", choices=["auto", "layerwise", "vmap"], default="auto", help="per-example gradient path")
    parser.add_argument("--secure-mode", action="store_true", help="audit the engine with secure_mode=True (OS-seeded, snapped noise)")
    parser.add_argument("--device", default="cpu", help="torch device of the audited model")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dpclip.audit``: print the lower bound next to the claimed ε; exit 1 on a violation."""
    args = _parser().parse_args(argv)
    result = audit_config(
        args.noise_multiplier,
        args.sample_rate,
        args.max_grad_norm,
        norm=args.norm,
        clipping=args.clipping,
        steps=args.steps,
        trials=args.trials,
        confidence=args.confidence,
        delta=args.delta,
        seed=args.seed,
        canaries_per_run=args.canaries_per_run,
        canary_norm=args.canary_norm,
        background=args.background,
        background_norm=args.background_norm,
        count_noise_multiplier=args.count_noise_multiplier,
        grad_sample_mode=args.grad_sample_mode,
        secure_mode=args.secure_mode,
        device=args.device,
    )
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.summary())
    return 1 if result.violated else 0


if __name__ == "__main__":
    sys.exit(main())
