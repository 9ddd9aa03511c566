"""The audit's canary runs, through the real dpclip code path: :func:`audit_config`.

Membership inference on gradient canaries, run through :class:`~dpclip.PrivacyEngine`, its Poisson loader,
per-example gradients, clipping, noise, the division by q·N, the optimizer step and the accountant (the
strongest, white-box adversary of Nasr et al. 2021, "Adversary Instantiation: Lower Bounds for Differentially
Private Machine Learning"):

- the model is an ``nn.Embedding(K + 1, 1)`` started at zero; canary slot t is one coordinate of its weight;
- the canary of slot t is an example whose gradient is ``canary_norm``·C along coordinate t (≫ C by default,
  so clipping cuts it to exactly C); ``background`` other examples have gradient ``background_norm``·C along
  coordinate K, orthogonal to every canary;
- each run draws a fresh engine and data set holding half of the K canaries ("with") and not the other half
  ("without"), trains ``steps`` steps with the ordinary loop, and reads every slot's per-step score
  x_s = −Δw_t · q·N / (lr · C_s) from the update of its coordinate (public output): b_{t,s} + Z_{t,s} in units
  of C, with b_{t,s} = 1 when the canary was sampled at step s. Three scores are built from (x_1, …, x_T):

  - ``gradient`` = Σ_s x_s, the sum over steps (the likelihood-ratio statistic when every step's
    inclusion is certain, q = 1: Nasr et al. 2021);
  - ``max_step`` = max_s x_s, the best single step: for q < 1 the canary is in only some steps, and the sum
    dilutes those steps with the others' noise;
  - ``step_range`` = max_s x_s − min_s x_s, the spread across steps, which sees per-step *structure*: under the
    charged mechanism the Z_{t,s} are independent across steps, but noise drawn once and reused makes every
    x_s of an absent canary equal (spread ≈ 0, float rounding only) while a present one, sampled at some steps
    and not at others, moves by exactly 1 — a perfect test, which the sum cannot see (it only sums
    T·Z_t + Σ_s b_{t,s}, one draw's worth of noise). Bugs that correlate noise across steps are caught here;
    the accountant's claim assumes T independent draws.

  With one step all three coincide (the range is 0) and only ``gradient`` is kept;
- with ``clipping="median"`` and one canary per run, the released clipping bound is scored too: the noisy
  count is recovered from C_{s+1}/C_s and compared with what the background alone would give.

The scores then go to :func:`dpclip.audit.statistics.evaluate` (calibration / held-out split, Clopper–Pearson).

Independence. With ``canaries_per_run=1`` every trial is a separate run (fresh engine, model, data set and
seed): the classical audit, valid for any implementation. With K > 1 canaries per run the K slots of a run
are treated as independent trials; that holds for the mechanism the accountant charges (independent noise
per coordinate, independent Poisson inclusion per example, per-example clipping), so a bound above the claim
still means the implementation is not that mechanism, but the K > 1 audit assumes that structure. The
score multiplies by each run's q·N, i.e. treats the data set size as public, as the accountant does.

Planting bugs: ``tamper=`` gets each fresh engine after ``make_private`` and before the first step, and may
replace its public parts (e.g. ``engine.noise``, the :class:`~dpclip.noise.NoiseSource` every noise draw goes
through). The runs also reach dpclip through attributes looked up at call time (``dpclip.engine.PrivacyEngine``,
the methods of :class:`~dpclip.noise.NoiseSource`...), so ``monkeypatch.setattr`` on them changes the audited
path too.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from accountants.checks import check_count, check_delta, check_positive, check_sample_rate
from accountants.errors import PrivacyParameterError

from .. import engine as _engine
from .statistics import AuditResult, evaluate

__all__ = ["audit_config"]


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
    step_max = np.full(k, -np.inf)
    step_min = np.full(k, np.inf)
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
            np.maximum(step_max, step_score, out=step_max)
            np.minimum(step_min, step_score, out=step_min)
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
    if plan.steps > 1:  # per-step structure (see the module docstring); with one step these equal "gradient" / 0
        scores.update(max_step=step_max, step_range=step_max - step_min)
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


def _checked_slots(trials: int, canaries_per_run: int | None, background: int, background_norm: float,
                   confidence: float, calibration_fraction: float) -> int:
    """The canary slots per run, after checking the audit's own settings (:func:`audit_config`'s arguments)."""
    check_count("trials", trials)
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
    return slots


def _collect_scores(plan: _Plan, trials: int, rng: np.random.Generator, tamper: Callable[[Any], None] | None
                    ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], float, int]:
    """Run the canary training runs until each world has ``trials`` observations: every score's values with and
    without the canary, the ε the engine claimed, and the number of runs. One slot per run alternates the two
    worlds run by run; more slots put the canary in a random half of them in each run."""
    slots = plan.slots
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
        run_seed = None if plan.secure_mode else int(rng.integers(0, 2**62))
        out = _run(plan, present, run_seed, tamper)
        if claimed is None:
            claimed = out.claimed_epsilon
        for name, values in out.scores.items():
            with_canary, without_canary = collected.setdefault(name, ([], []))
            with_canary.append(values[present])
            without_canary.append(values[~present])
    assert claimed is not None
    pooled = {name: (np.concatenate(w)[:trials], np.concatenate(wo)[:trials]) for name, (w, wo) in collected.items()}
    return pooled, claimed, runs


def _check_device(device: str) -> None:
    """A clear error for a device this torch cannot use (a typo, or "cuda" on a CPU build), before any run."""
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, ValueError, TypeError) as error:
        raise PrivacyParameterError(
            f"device {device!r} cannot be used by this torch ({type(error).__name__}: {error}); pass one it has, e.g. "
            + ("'cpu' or 'cuda'" if torch.cuda.is_available() else "'cpu'")
        ) from None


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
    check_delta(delta)
    check_positive("canary_norm", canary_norm)
    slots = _checked_slots(trials, canaries_per_run, background, background_norm, confidence, calibration_fraction)
    _check_device(device)
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
    pooled, claimed, runs = _collect_scores(plan, trials, rng, tamper)
    found = evaluate(pooled, trials, rng, calibration_fraction=calibration_fraction, alpha=1.0 - confidence, delta=delta)
    settings = dict(
        noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate, max_grad_norm=plan.max_grad_norm,
        norm=norm, clipping=clipping, steps=plan.steps, canary_norm=plan.canary_norm, background=plan.background,
        background_norm=plan.background_norm, count_noise_multiplier=plan.count_noise_multiplier,
        loss_reduction=loss_reduction, grad_sample_mode=grad_sample_mode, secure_mode=secure_mode, seed=seed,
    )
    return AuditResult(
        epsilon_lower_bound=found.epsilon_lower_bound,
        claimed_epsilon=float(claimed),
        delta=float(delta),
        confidence=float(confidence),
        trials=int(trials),
        evaluation_trials=(found.trials_with, found.trials_without),
        fpr=found.fpr,
        fnr=found.fnr,
        fpr_upper=found.fpr_upper,
        fnr_upper=found.fnr_upper,
        threshold=found.test.threshold,
        test=found.test.describe(),
        score=found.test.score,
        runs=runs,
        canaries_per_run=slots,
        settings=settings,
    )
