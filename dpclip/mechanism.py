"""One DP-SGD mechanism object: what runs and what is charged come from the same place.

:class:`DPSGDMechanism` holds everything that defines one step's release — σ, the clipping norm and policy,
Poisson sampling at q over N examples, the adaptive-clipping count's noise, per-layer clipping, the loss's
reduction — and derives from it the noise law of the gradient sum and the accountant's event. The engine,
:func:`dpclip.functional.private_step`, calibration (``make_private_with_epsilon``) and the audit all build
their steps and their charges from it.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from accountants import Composed, Event, Gaussian, NonPrivate, PoissonSampled
from accountants.errors import PrivacyParameterError, PrivacyWarning
from accountants.checks import check_count, check_flag, check_nonnegative, check_positive, check_sample_rate

from .norms import ClipNorm, clip_norm



def _caller_outside_dpclip() -> int:
    """The ``stacklevel`` that points a warning at the first caller outside the dpclip package (the user's line)."""
    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    return level

@dataclass(frozen=True)
class DPSGDMechanism:
    """Everything that defines the mechanism; a checkpoint only loads into an engine with the same one.

    Build it with :meth:`create` (validates and fills defaults); it is immutable.
    """

    noise_multiplier: float
    norm: str
    clipping: str
    sample_rate: float
    dataset_size: int
    count_noise_multiplier: float | None
    per_layer: bool
    loss_reduction: str
    #: Per-parameter clipping bounds C_k (name, C_k), or None: C split equally when ``per_layer``.
    layer_bounds: tuple[tuple[str, float], ...] | None = None

    def __post_init__(self) -> None:
        if self.layer_bounds is not None:  # a checkpoint stores pairs as lists; compare as tuples
            object.__setattr__(self, "layer_bounds", tuple((str(n), float(c)) for n, c in self.layer_bounds))

    @classmethod
    def create(
        cls,
        noise_multiplier: float,
        norm: str = "l2",
        clipping: Literal["fixed", "median"] | str = "fixed",
        sample_rate: float = 1.0,
        dataset_size: int = 1,
        count_noise_multiplier: float | None = None,
        per_layer: bool = False,
        loss_reduction: Literal["mean", "sum"] | str = "mean",
        layer_bounds: Mapping[str, float] | None = None,
    ) -> DPSGDMechanism:
        """Validate every argument (a clear :class:`PrivacyParameterError` for each misuse) and build it.

        ``noise_multiplier=0`` is a non-private baseline: allowed with a :class:`PrivacyWarning`, charged as
        :class:`~accountants.NonPrivate` (ε = ∞). ``layer_bounds`` (parameter name → C_k) implies ``per_layer``.
        """
        norm = clip_norm(norm).name
        sample_rate = check_sample_rate(sample_rate)
        dataset_size = check_count("dataset_size", dataset_size)
        if clipping not in ("fixed", "median"):
            raise PrivacyParameterError(f"clipping must be 'fixed' or 'median', got {clipping!r}")
        if loss_reduction not in ("mean", "sum"):
            raise PrivacyParameterError(
                f"loss_reduction must be 'mean' or 'sum' (how your loss combines examples), got {loss_reduction!r}"
            )
        noise_multiplier = check_nonnegative("noise_multiplier", noise_multiplier)
        if noise_multiplier == 0 and clipping == "median":
            raise PrivacyParameterError(
                "noise_multiplier=0 (a non-private baseline) needs clipping='fixed': median clipping splits the "
                "noise between the gradient and its count"
            )
        if layer_bounds is not None:
            per_layer = True
        if clipping == "median":
            if per_layer:
                raise PrivacyParameterError("per_layer=True is only available with clipping='fixed'")
            if count_noise_multiplier is None:
                # Andrew et al. 2021 (§4): σ_b = expected batch size / 20.
                count_noise_multiplier = sample_rate * dataset_size / 20.0
            count_noise_multiplier = check_positive("count_noise_multiplier", count_noise_multiplier)
        else:
            count_noise_multiplier = None
        mechanism = cls(
            noise_multiplier=noise_multiplier,
            norm=norm,
            clipping=clipping,
            sample_rate=sample_rate,
            dataset_size=dataset_size,
            count_noise_multiplier=count_noise_multiplier,
            per_layer=check_flag("per_layer", per_layer),
            loss_reduction=loss_reduction,
            layer_bounds=None if layer_bounds is None else tuple(
                (name, check_positive(f"the clipping bound of {name}", bound)) for name, bound in layer_bounds.items()
            ),
        )
        if clipping == "median" and norm == "l2" and not mechanism.noise_multiplier < 2 * count_noise_multiplier:
            raise PrivacyParameterError(
                f"median clipping needs noise_multiplier ({mechanism.noise_multiplier:g}) < 2 × count_noise_multiplier "
                f"({count_noise_multiplier:g}) so that the gradient keeps a positive share of the noise; raise "
                "count_noise_multiplier (or use a larger batch: its default is expected batch size / 20)"
            )
        if mechanism.non_private:
            warnings.warn(
                "noise_multiplier=0: NO NOISE is added, so this run is NOT differentially private (ε = ∞ is "
                "reported). Use it only as a non-private baseline with the same clipping and sampling.",
                PrivacyWarning,
                stacklevel=_caller_outside_dpclip(),
            )
        return mechanism

    @property
    def clip_norm(self) -> ClipNorm:
        """L2 or L1: how norms combine, the per-layer split and the noise law (:mod:`dpclip.norms`)."""
        return clip_norm(self.norm)

    @property
    def layer_bounds_total(self) -> float | None:
        """The whole-gradient bound C that the per-parameter bounds C_k imply (None without them).

        √Σ C_k² (L2) or Σ C_k (L1): clipping each part to C_k bounds the example's norm by it, so noise σ·C
        covers the sensitivity (as Opacus's per-layer clipping does).
        """
        if self.layer_bounds is None:
            return None
        bounds = torch.tensor([b for _, b in self.layer_bounds], dtype=torch.float64)
        return float(self.clip_norm.combine(bounds[None, :])[0])

    def part_bounds(self, names: Sequence[str], max_norm: float) -> torch.Tensor:
        """Per-parameter clipping bounds [len(names)] (float64): ``layer_bounds``, or C split equally."""
        if self.layer_bounds is None:
            return torch.full((len(names),), self.clip_norm.part_bound(max_norm, len(names)), dtype=torch.float64)
        bounds = dict(self.layer_bounds)
        missing = [n for n in names if n not in bounds]
        if missing:
            raise PrivacyParameterError(
                f"no clipping bound for the trainable parameter(s) {', '.join(missing)}: the per-layer "
                "max_grad_norm names every trainable parameter at make_private; keep the same parameters trainable "
                "or start a new PrivacyEngine"
            )
        return torch.tensor([bounds[n] for n in names], dtype=torch.float64)

    @property
    def non_private(self) -> bool:
        """Whether this is the noise-free baseline (noise_multiplier = 0: ε = ∞)."""
        return self.noise_multiplier == 0

    @property
    def mechanism(self) -> str:
        """The noise law of the gradient sum: "gaussian" (L2) or "laplace" (L1)."""
        return self.clip_norm.noise

    @property
    def expected_batch_size(self) -> float:
        return self.sample_rate * self.dataset_size

    @property
    def gradient_noise_multiplier(self) -> float:
        """Noise multiplier of the gradient sum.

        With median clipping and Gaussian noise the total σ is split as σ_grad = (σ⁻² − (2σ_b)⁻²)^{−1/2}, so the
        gradient and the count together form one Gaussian(σ) mechanism (Andrew et al. 2021, Thm. 1).
        """
        if self.clipping == "median" and self.norm == "l2":
            assert self.count_noise_multiplier is not None
            return (self.noise_multiplier**-2 - (2 * self.count_noise_multiplier) ** -2) ** -0.5
        return self.noise_multiplier

    def step_event(self) -> Event:
        """The accountant's event for one logical step, including the adaptive-clipping count release."""
        if self.non_private:
            return PoissonSampled(self.sample_rate, NonPrivate())
        base = self.clip_norm.event(self.gradient_noise_multiplier)
        if self.clipping == "median":
            assert self.count_noise_multiplier is not None
            base = Composed([base, Gaussian(2 * self.count_noise_multiplier)])
        return PoissonSampled(self.sample_rate, base)

    @classmethod
    def event_at(cls, noise_multiplier: float, **fields: object) -> Event:
        """The step event of the mechanism with these fields at noise multiplier σ: what calibration searches.

        With median clipping and L2 the split gradient + count mechanism is exactly Gaussian(σ) (Andrew et al.
        2021, Thm. 1), whatever σ_b; :meth:`create` then checks σ_b > σ/2 for the σ found.
        """
        if fields.get("clipping") == "median" and fields.get("norm", "l2") == "l2":
            return PoissonSampled(check_sample_rate(fields.get("sample_rate", 1.0)), Gaussian(noise_multiplier))  # type: ignore[arg-type]
        return cls.create(noise_multiplier, **fields).step_event()  # type: ignore[arg-type]
