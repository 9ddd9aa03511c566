"""The audit's statistics, torch-free (numpy and scipy only): Clopper–Pearson bounds, the ε lower bound, the
choice of score, threshold and side on a calibration part, its evaluation on the held-out part, and
:class:`AuditResult`.

The scores with and without the canary are split: a calibration part picks the score, the threshold τ and
the side of the test; the held-out part gives one-sided Clopper–Pearson bounds (each at α/2, α = 1 −
confidence) on the false-positive and false-negative rates, and

    ε ≥ max( ln((1 − δ − FNR⁺) / FPR⁺),  ln((1 − δ − FPR⁺) / FNR⁺) )

holds with probability ≥ 1 − α for any (ε, δ)-DP mechanism (both inequalities use the same two bounds;
Jagielski, Ullman & Oprea 2020).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import stats

__all__ = [
    "AuditResult",
    "Evaluation",
    "ScoreTest",
    "clopper_pearson",
    "epsilon_lower_bound",
    "evaluate",
    "select_test",
]

Scores = Mapping[str, tuple[np.ndarray, np.ndarray]]  # score name → (values with the canary, values without)


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
class ScoreTest:
    """A membership test: "canary present" when ``score`` > ``threshold`` (``above``), else when ≤ ``threshold``."""

    score: str  # "gradient", "max_step", "step_range", "count" or "combined"
    threshold: float
    above: bool
    calibration_bound: float  # the bound predicted for the held-out part from the calibration part

    def says_present(self, values: np.ndarray) -> np.ndarray:
        return values > self.threshold if self.above else values <= self.threshold

    def describe(self) -> str:
        side = ">" if self.above else "≤"
        return f"'{self.score}' score {side} {self.threshold:.6g} means 'canary present'"


def _hits(sorted_scores: np.ndarray, thresholds: np.ndarray, above: bool) -> np.ndarray:
    at_or_below = np.searchsorted(sorted_scores, thresholds, side="right")
    return len(sorted_scores) - at_or_below if above else at_or_below


def select_test(scores: Scores, held_out: tuple[int, int], alpha: float, delta: float) -> ScoreTest:
    """Pick the score, threshold and side whose bound *predicted for the held-out part* is largest.

    The prediction takes pessimistic (one-sided 84%, about one standard error) Clopper–Pearson rates from the
    calibration part (``scores``), scales them to the held-out sizes and applies the final bound, so a threshold
    deep in a tail, estimated from a handful of calibration points, is not preferred by luck. Any rule is valid
    here: only calibration data are used.
    """
    best = ScoreTest("gradient", math.inf, True, -1.0)
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
                best = ScoreTest(name, float(thresholds[i]), above, float(bounds[i]))
    return best


@dataclass(frozen=True)
class Evaluation:
    """The chosen test on the held-out part: its hits in each world and the bound they give."""

    test: ScoreTest
    hits_with: int
    trials_with: int
    hits_without: int
    trials_without: int
    epsilon_lower_bound: float
    fpr_upper: float
    fnr_upper: float

    @property
    def fpr(self) -> float:
        return self.hits_without / self.trials_without

    @property
    def fnr(self) -> float:
        return 1.0 - self.hits_with / self.trials_with


def evaluate(
    scores: Scores, trials: int, rng: np.random.Generator, *, calibration_fraction: float, alpha: float, delta: float
) -> Evaluation:
    """Split the ``trials`` observations of each world at random (the same split for every score) into a
    calibration part (``calibration_fraction`` of them) and a held-out part; pick the test on the first
    (:func:`select_test`) and bound ε with the second (:func:`epsilon_lower_bound`, confidence 1 − ``alpha``)."""
    order_with, order_without = rng.permutation(trials), rng.permutation(trials)
    cut = max(1, min(trials - 1, int(round(calibration_fraction * trials))))
    calibration = {n: (w[order_with[:cut]], wo[order_without[:cut]]) for n, (w, wo) in scores.items()}
    test = select_test(calibration, (trials - cut, trials - cut), alpha, delta)
    held_with = scores[test.score][0][order_with[cut:]]
    held_without = scores[test.score][1][order_without[cut:]]
    hits_with = int(np.sum(test.says_present(held_with)))
    hits_without = int(np.sum(test.says_present(held_without)))
    bound, fpr_upper, fnr_upper = epsilon_lower_bound(hits_with, len(held_with), hits_without, len(held_without), alpha, delta)
    return Evaluation(
        test, hits_with, len(held_with), hits_without, len(held_without), float(bound), float(fpr_upper), float(fnr_upper)
    )


@dataclass(frozen=True)
class AuditResult:
    """Outcome of :func:`dpclip.audit.audit_config`.

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
