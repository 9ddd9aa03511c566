"""Everything ``make_private`` checks before it touches anything: the mechanism, the clipping policy, the budget
and the engine options, built from its arguments into one immutable :class:`TrainingPlan` (or a clear
:class:`~dpclip.errors.PrivacyParameterError`)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from numbers import Real
from typing import Any

from torch.utils.data import DataLoader

from accountants import calibrate_noise, epochs_to_steps

from accountants.errors import PrivacyParameterError, PrivacyWarning
from accountants.checks import (
    check_count,
    check_delta,
    check_positive,
    check_sample_rate,
    warn_if_delta_too_large,
)

from .clipping import ClippingPolicy, FixedClipping, MedianClipping
from .collation import check_collate
from .errors import EngineUsageError
from .mechanism import DPSGDMechanism
from .sampling import PoissonDataLoader, map_style_size


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
    memory: str = "fast"

    @property
    def kept_bytes(self) -> int | None:
        """The layerwise path's budget for kept per-example gradients: its default ("fast"), or none ("low")."""
        return 0 if self.memory == "low" else None


def check_loader(data_loader: Any) -> None:
    """make_private's loader: a torch ``DataLoader`` over the data set, not one make_private returned."""
    if isinstance(data_loader, PoissonDataLoader):
        raise EngineUsageError(
            "this loader is already private: make_private returned it (each engine samples its own batches, and two "
            "engines drawing on one loader would each charge only their own steps). Pass the original torch "
            "DataLoader, or use the engine that returned this loader"
        )
    if not isinstance(data_loader, DataLoader):
        raise PrivacyParameterError(
            f"make_private takes a torch.utils.data.DataLoader, got {type(data_loader).__name__}: dpclip draws each "
            "step's batch itself (Poisson sampling over the data set's examples), so it needs the data set, not "
            "batches. Put the examples in a data set (e.g. TensorDataset(x, y)) and pass DataLoader(dataset, "
            "batch_size=<expected batch size>)"
        )


def dataset_size(data_loader: DataLoader) -> int:
    """N, the size of the loader's data set; refuses iterable-style data sets and empty ones."""
    return map_style_size(data_loader.dataset)


def sample_rate_of(data_loader: DataLoader, sample_rate: float | None) -> float:
    """q: ``sample_rate`` if given, else the loader's batch size / N (at most 1)."""
    if sample_rate is not None:
        return check_sample_rate(sample_rate)
    if data_loader.batch_size is None:
        raise PrivacyParameterError("the data loader has no batch_size; pass sample_rate= (expected batch size / N)")
    size = dataset_size(data_loader)
    if data_loader.batch_size > size:
        warnings.warn(PrivacyWarning(
            f"batch_size {data_loader.batch_size} exceeds the data set's {size} examples: every example is in every "
            "batch (q = 1, and ε is charged for q = 1); pass batch_size <= N for Poisson sampling to amplify privacy"
        ), stacklevel=3)
    return min(1.0, data_loader.batch_size / size)


#: Opacus spellings of dpclip options, and what to pass instead.
_OPACUS_CLIPPING = {
    "flat": "clipping='fixed' (the default)",
    "per_layer": "clipping='fixed' with per_layer=True, or a list/dict max_grad_norm (one bound per parameter)",
    "adaptive": "clipping='median' (Andrew et al. 2021; its noisy count is accounted)",
}
_OPACUS_MODES = {
    "hooks": "'layerwise' (per-example norms from each layer's hooks; 'auto', the default, picks it)",
    "ghost": "'layerwise' (it computes norms the ghost-clipping way, without per-example weight gradients)",
    "ew": "'layerwise'",
    "functorch": "'vmap' (the whole model under torch.func.vmap)",
}


def check_opacus_options(*, poisson_sampling: bool, batch_first: bool, criterion: Any, clipping: str,
                         grad_sample_mode: str) -> None:
    """Refuse, with the reason and what to use, the Opacus options dpclip spells otherwise or does not honour."""
    if clipping in _OPACUS_CLIPPING:
        raise PrivacyParameterError(f"clipping={clipping!r} is Opacus's name; in dpclip pass {_OPACUS_CLIPPING[clipping]}")
    if grad_sample_mode in _OPACUS_MODES:
        raise PrivacyParameterError(
            f"grad_sample_mode={grad_sample_mode!r} is Opacus's name; in dpclip pass grad_sample_mode="
            f"{_OPACUS_MODES[grad_sample_mode]}"
        )
    if poisson_sampling is not True:
        raise PrivacyParameterError(
            "poisson_sampling=False is not offered: shuffled fixed-size batches accounted as if Poisson-sampled "
            "under-report ε (Chua et al. 2024, \"How Private are DP-SGD Implementations?\"), and dpclip reports only "
            "what its sampling really guarantees. Leave poisson_sampling out: the returned loader samples each example "
            "independently with q = batch_size / N; for fixed-size micro-batches in memory use max_physical_batch_size"
        )
    if batch_first is not True:
        raise PrivacyParameterError(
            "batch_first=False is not offered: dpclip needs the examples in dim 0 of the model's inputs, as the "
            "loader yields them. Keep the inputs batch-first and transpose inside the model (e.g. x = x.transpose(0, 1) "
            "at the start of forward): inner layers may use any layout, which dpclip tracks and verifies per layer"
        )
    if criterion is not None:
        raise PrivacyParameterError(
            "criterion is not needed: dpclip never wraps the loss. Per-example norms come from each layer's "
            "activations and output gradients (the ghost-clipping trick is automatic in grad_sample_mode='auto'), so "
            "compute your loss as usual (mean or sum over the batch, see loss_reduction) and call loss.backward(); "
            "dpclip.check_loss(model, criterion, x, y) checks once that it is a per-example loss"
        )


def layer_bounds_of(max_grad_norm: Any, parameter_names: Sequence[str]) -> dict[str, float] | None:
    """Per-parameter clipping bounds from a list (one per trainable parameter, in ``model.named_parameters()``
    order) or a dict (parameter name → C_k), as Opacus's per-layer ``max_grad_norm``; None for one number."""
    if isinstance(max_grad_norm, Real) and not isinstance(max_grad_norm, bool):
        return None
    if isinstance(max_grad_norm, Mapping):
        unknown = [str(n) for n in max_grad_norm if n not in parameter_names]
        missing = [n for n in parameter_names if n not in max_grad_norm]
        if unknown or missing:
            raise PrivacyParameterError(
                "a dict max_grad_norm needs one bound per trainable parameter, keyed by its name in "
                f"model.named_parameters(); missing: {missing or 'none'}; not trainable parameters: {unknown or 'none'}"
            )
        return {name: max_grad_norm[name] for name in parameter_names}
    if isinstance(max_grad_norm, Sequence) and not isinstance(max_grad_norm, str):
        if len(max_grad_norm) != len(parameter_names):
            raise PrivacyParameterError(
                f"a list max_grad_norm needs one bound per trainable parameter ({len(parameter_names)}: "
                f"{', '.join(parameter_names)}), got {len(max_grad_norm)}; or pass a dict keyed by parameter name"
            )
        return dict(zip(parameter_names, max_grad_norm))
    raise PrivacyParameterError(
        f"max_grad_norm must be a positive number, or per-layer bounds (a list or a dict of numbers), got {max_grad_norm!r}"
    )


def plan_training(
    data_loader: DataLoader,
    *,
    noise_multiplier: float,
    max_grad_norm: float | Sequence[float] | Mapping[str, float],
    parameter_names: Sequence[str],
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
    memory: str = "fast",
) -> TrainingPlan:
    """Validate every argument of ``make_private`` into a :class:`TrainingPlan`."""
    check_loader(data_loader)
    size = dataset_size(data_loader)
    check_collate(data_loader)
    layer_bounds = layer_bounds_of(max_grad_norm, parameter_names)
    if layer_bounds is not None and clipping == "median":
        raise PrivacyParameterError("per-layer bounds (a list or dict max_grad_norm) are only available with clipping='fixed'")
    mechanism = DPSGDMechanism.create(
        noise_multiplier, norm, clipping, sample_rate_of(data_loader, sample_rate), size, count_noise_multiplier,
        per_layer, loss_reduction, layer_bounds,
    )
    bound = mechanism.layer_bounds_total if layer_bounds is not None else max_grad_norm
    policy: ClippingPolicy = (
        MedianClipping(bound, target_quantile, clip_learning_rate, mechanism.count_noise_multiplier)  # type: ignore[arg-type]
        if clipping == "median"
        else FixedClipping(bound)  # type: ignore[arg-type]
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
        if mechanism.non_private:
            raise PrivacyParameterError(
                "noise_multiplier=0 gives ε = ∞, so no finite target_epsilon can be met: drop target_epsilon and "
                "target_delta for a non-private baseline, or pass a positive noise_multiplier"
            )
    if grad_sample_mode not in ("auto", "layerwise", "vmap"):
        raise PrivacyParameterError(f"grad_sample_mode must be 'auto', 'layerwise' or 'vmap', got {grad_sample_mode!r}")
    if verify not in ("first-step", "every-step", "off"):
        raise PrivacyParameterError(f"verify must be 'first-step', 'every-step' or 'off', got {verify!r}")
    if memory not in ("fast", "low"):
        raise PrivacyParameterError(
            f"memory must be 'fast' (keep per-example gradients that fit a 256 MiB budget: faster) or 'low' (keep "
            f"none: about the non-private step's peak memory), got {memory!r}"
        )
    return TrainingPlan(mechanism, policy, budget, nonfinite, chunk_size, grad_sample_mode, verify, memory)


def calibrated_noise_multiplier(data_loader: DataLoader, target_epsilon: float, target_delta: float, epochs: float,
                                accountant: str, options: dict[str, Any]) -> float:
    """The smallest σ that keeps ``epochs`` epochs of the mechanism ``options`` describe within the budget."""
    if "noise_multiplier" in options:
        raise PrivacyParameterError(
            "make_private_with_epsilon computes noise_multiplier from target_epsilon, target_delta and epochs; "
            "do not pass it (or call make_private(noise_multiplier=...) instead)"
        )
    check_loader(data_loader)
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
