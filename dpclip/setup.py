"""Everything ``make_private`` checks before it touches anything: the mechanism, the clipping policy, the budget
and the engine options, built from its arguments into one immutable :class:`TrainingPlan` (or a clear
:class:`~dpclip.errors.PrivacyParameterError`)."""

from __future__ import annotations

from dataclasses import dataclass

from typing import Any

from torch.utils.data import DataLoader

from accountants import calibrate_noise, epochs_to_steps

from accountants.errors import PrivacyParameterError
from accountants.checks import (
    check_count,
    check_delta,
    check_positive,
    check_sample_rate,
    warn_if_delta_too_large,
)

from .clipping import ClippingPolicy, FixedClipping, MedianClipping
from .mechanism import DPSGDMechanism


@dataclass(frozen=True)
class TrainingPlan:
    """The validated arguments of one ``make_private`` call."""

    mechanism: DPSGDMechanism
    clipping: ClippingPolicy
    budget: tuple[float, float] | None
    nonfinite: str
    chunk_size: int | None
    grad_sample_mode: str
    verify: str


def dataset_size(data_loader: DataLoader) -> int:
    """N, the size of the loader's data set; refuses data sets without a length and empty ones."""
    try:
        size = len(data_loader.dataset)  # type: ignore[arg-type]
    except TypeError:
        raise PrivacyParameterError(
            "the data set must have a length: an iterable-style data set cannot be Poisson-sampled (use a map-style "
            "Dataset, e.g. TensorDataset)"
        ) from None
    if size == 0:
        raise PrivacyParameterError("the data set is empty: there is nothing to train on")
    return size


def sample_rate_of(data_loader: DataLoader, sample_rate: float | None) -> float:
    """q: ``sample_rate`` if given, else the loader's batch size / N (at most 1)."""
    if sample_rate is not None:
        return check_sample_rate(sample_rate)
    if data_loader.batch_size is None:
        raise PrivacyParameterError("the data loader has no batch_size; pass sample_rate= (expected batch size / N)")
    return min(1.0, data_loader.batch_size / dataset_size(data_loader))


def plan_training(
    data_loader: DataLoader,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    norm: str,
    clipping: str,
    target_quantile: float,
    clip_learning_rate: float,
    count_noise_multiplier: float | None,
    per_layer: bool,
    loss_reduction: str,
    chunk_size: int | None,
    nonfinite: str,
    target_epsilon: float | None,
    target_delta: float | None,
    sample_rate: float | None,
    grad_sample_mode: str,
    verify: str,
) -> TrainingPlan:
    """Validate every argument of ``make_private`` into a :class:`TrainingPlan`."""
    size = dataset_size(data_loader)
    mechanism = DPSGDMechanism.create(
        noise_multiplier, norm, clipping, sample_rate_of(data_loader, sample_rate), size, count_noise_multiplier,
        per_layer, loss_reduction,
    )
    policy: ClippingPolicy = (
        MedianClipping(max_grad_norm, target_quantile, clip_learning_rate, mechanism.count_noise_multiplier)  # type: ignore[arg-type]
        if clipping == "median"
        else FixedClipping(max_grad_norm)
    )
    if nonfinite not in ("error", "drop"):
        raise PrivacyParameterError(f"nonfinite must be 'error' or 'drop', got {nonfinite!r}")
    if chunk_size is not None:
        chunk_size = check_count("chunk_size", chunk_size)
    if (target_epsilon is None) != (target_delta is None):
        raise PrivacyParameterError("give both target_epsilon and target_delta for a budget, or neither")
    budget = None
    if target_epsilon is not None:
        delta = check_delta(target_delta, "target_delta")
        warn_if_delta_too_large(delta, size)
        budget = (check_positive("target_epsilon", target_epsilon), delta)
    if grad_sample_mode not in ("auto", "layerwise", "vmap"):
        raise PrivacyParameterError(f"grad_sample_mode must be 'auto', 'layerwise' or 'vmap', got {grad_sample_mode!r}")
    if verify not in ("first-step", "every-step", "off"):
        raise PrivacyParameterError(f"verify must be 'first-step', 'every-step' or 'off', got {verify!r}")
    return TrainingPlan(mechanism, policy, budget, nonfinite, chunk_size, grad_sample_mode, verify)


def calibrated_noise_multiplier(data_loader: DataLoader, target_epsilon: float, target_delta: float, epochs: float,
                                accountant: str, options: dict[str, Any]) -> float:
    """The smallest σ that keeps ``epochs`` epochs of the mechanism ``options`` describe within the budget."""
    if "noise_multiplier" in options:
        raise PrivacyParameterError(
            "make_private_with_epsilon computes noise_multiplier from target_epsilon, target_delta and epochs; "
            "do not pass it (or call make_private(noise_multiplier=...) instead)"
        )
    check_delta(target_delta, "target_delta")
    q = sample_rate_of(data_loader, options.get("sample_rate"))
    fields = dict(
        norm=options.get("norm", "l2"), clipping=options.get("clipping", "fixed"), sample_rate=q,
        dataset_size=dataset_size(data_loader), count_noise_multiplier=options.get("count_noise_multiplier"),
        per_layer=options.get("per_layer", False), loss_reduction=options.get("loss_reduction", "mean"),
    )
    steps = epochs_to_steps(epochs, q)
    return calibrate_noise(lambda sigma: DPSGDMechanism.event_at(sigma, **fields), target_epsilon, target_delta, steps,
                           accountant=accountant)
