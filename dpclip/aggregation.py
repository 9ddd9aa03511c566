"""Steps 2–3 of the data path inside the engine: clip each example's gradient and add it to the step's sum.

:class:`ClippedSum` takes each (micro-)batch's per-example gradients (:class:`~dpclip.example_grads.
ExampleGradients`, from either per-example path), computes every example's norm with the mechanism's
:class:`~dpclip.norms.ClipNorm`, the clipping factors min(1, C/‖g_i‖) (whole gradient, or per parameter with
``per_layer``), and accumulates Σ_i c_i g_i and the clipping policy's statistic (the median count).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .clipping import ClippingPolicy, clip_factors
from .errors import NonFiniteGradientError
from .example_grads import ExampleGradients
from .mechanism import DPSGDMechanism
from .noise import NoiseSource, add_noise

Tensor = torch.Tensor


class ClippedSum:
    """Σ_i clip(g_i, C) and the policy's statistic over the micro-batches of one logical step."""

    def __init__(self, mechanism: DPSGDMechanism, clipping: ClippingPolicy, nonfinite: str,
                 on_nonfinite: Callable[[str], None], sum_in_noise: bool = False) -> None:
        """``sum_in_noise``: the sums stay in this process and are released with the default sampler (one process,
        no secure mode), so the step's last batch may be summed inside the drawn noise (:func:`noisy_release`)."""
        self.mechanism, self.clipping, self.nonfinite = mechanism, clipping, nonfinite
        self.on_nonfinite = on_nonfinite  # raises (one process) or defers the error to the step (distributed)
        self.sum_in_noise = sum_in_noise
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.count = 0.0
        #: the step's last batch, clipped but not yet summed: its gradients and weights (:meth:`add` with ``last``)
        self.pending: tuple[ExampleGradients, Tensor] | None = None

    def add(self, example_grads: ExampleGradients, scale: float, last: bool = False) -> None:
        """Clip one batch (or chunk) and add it; ``scale`` undoes a mean-reduced loss (runs inside backward).
        ``last``: the step's last batch, whole (nothing of the step runs after it but the release): with
        ``sum_in_noise`` its weighted sum is left to the release, which forms it inside the noise."""
        per_param = example_grads.norms(self.mechanism.norm) * scale  # type: ignore[arg-type]
        norm = self.mechanism.clip_norm
        norms = norm.combine(per_param)
        finite = torch.isfinite(norms)
        if not bool(finite.all()) and self.nonfinite == "error":
            bad = [name for j, name in enumerate(example_grads.names) if not bool(torch.isfinite(per_param[:, j]).all())]
            self.on_nonfinite(f"{int((~finite).sum())} of {len(norms)} examples have NaN/inf gradients (in {', '.join(bad)})")
            return
        bound = self.clipping.max_norm
        if self.mechanism.per_layer:
            bounds = self.mechanism.part_bounds(example_grads.names, bound).to(per_param.device, per_param.dtype)
            factors = clip_factors(per_param, bounds)
        else:
            factors = clip_factors(norms, bound)[:, None].expand(-1, per_param.shape[1])
        factors = torch.where(finite[:, None], factors, 0.0)  # nonfinite="drop": those examples contribute 0
        self.sum_pending()
        if last and self.sum_in_noise:
            self.pending = (example_grads, factors * scale)
        else:
            self._sum(example_grads, factors * scale)
        self.count += self.clipping.observe(norms)

    def _sum(self, example_grads: ExampleGradients, weights: Tensor) -> None:
        for name, contribution in example_grads.weighted_sum(weights, sparse_rows=True).items():
            self.sums[name] = contribution if name not in self.sums else accumulate(self.sums[name], contribution)

    def sum_pending(self) -> None:
        """Sum the batch :meth:`add` left to the release into :attr:`sums` (its sum is then formed apart)."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            self._sum(*pending)

    def release_in_noise(self, params: Mapping[str, Tensor], source: NoiseSource, bound: float,
                         factor: float) -> dict[str, Tensor] | None:
        """The release with the noise drawn first: factor·(Σ clip(g_i) + noise) as noise(factor·σC), drawn for the
        parameters in their order (the draws :func:`add_noise` makes), then factor·Σ clip(g_i) added into it — the
        earlier batches' sums, and the pending batch's formed inside the noise (:meth:`Contribution.add_weighted`:
        a linear layer's ``addmm_``, no sum block and no pass to add it; ``profile_step.py``'s floor does the same).
        Post-processing by ``factor`` as :meth:`NoiseSource.noisy`. None where it does not apply (no pending batch,
        no noise, or a summed parameter that is no longer trainable): then :meth:`sum_pending` and add the noise."""
        sigma = self.mechanism.gradient_noise_multiplier
        if self.pending is None or not sigma > 0 or not set(self.pending[0].names) <= params.keys() \
                or not self.sums.keys() <= params.keys():
            return None
        law = self.mechanism.clip_norm.noise
        noisy = {name: source.draw(torch.empty((), dtype=p.dtype, device=p.device).expand(p.shape), sigma * bound * factor, law)
                 for name, p in params.items()}  # (stride-0 stand-ins: the noise is laid out contiguously)
        for name, total in self.sums.items():
            noisy[name].add_(total, alpha=factor)
        pending, weights = self.pending
        self.pending = None
        pending.add_weighted_sum(weights * factor, noisy)
        return noisy


def accumulate(total: Tensor, more: Tensor) -> Tensor:
    """``total + more`` where either may be a sparse COO sum (an embedding's rows): torch adds sparse to dense
    (dense result) and sparse to sparse, not dense to sparse in that order."""
    return more + total if total.is_sparse and not more.is_sparse else total + more


def noisy_release(clipped: ClippedSum, params: Mapping[str, Tensor], collective: Any, noise: NoiseSource,
                  batch_size: float) -> tuple[dict[str, Tensor], float | None]:
    """Step 4: Σ over processes of the clipped sums, then one noise draw — the step's release, divided by the
    expected ``batch_size`` (post-processing) — and, for adaptive clipping, the noisy count. Raises
    NonFiniteGradientError if a process flagged NaN/inf gradients."""
    mechanism, policy = clipped.mechanism, clipped.clipping
    bound = policy.max_norm
    noisy = clipped.release_in_noise(params, noise, bound, 1 / batch_size)  # one process: the sum inside the noise
    count = clipped.count
    if noisy is None:
        clipped.sum_pending()
        summed = {name: clipped.sums[name] if name in clipped.sums else torch.zeros_like(p) for name, p in params.items()}
        summed, count, error = collective.all_reduce(summed, clipped.count)
        if error is not None:
            raise NonFiniteGradientError(error)
        noisy = collective.release_sums(
            lambda source: add_noise(summed, mechanism.gradient_noise_multiplier, bound, mechanism.norm, source, 1 / batch_size),  # type: ignore[arg-type]
            summed, noise,
        )
    if not policy.adaptive:
        return noisy, None
    total = torch.tensor(count, dtype=torch.float64)  # the adaptive-clipping count: Gaussian, charged in the step event
    return noisy, float(collective.release(lambda: noise.noisy(total, mechanism.count_noise_multiplier, "gaussian"), total))  # type: ignore[arg-type]


def release_checksum(noisy: Mapping[str, Tensor]) -> float:
    """A fingerprint of one release: Σ_k k·‖r_k‖² over its tensors r_1, r_2, … in name order (a DTensor: this
    rank's shard), each norm taken on its own device, summed in float64 on the CPU. Two branches of one run
    continued from the same checkpoint draw the same noise; where they released anything different their
    fingerprints differ (but for exact ties of measure zero), so the running sums a checkpoint carries tell an
    engine's own line from another branch (dpclip.checkpoint)."""
    from .sharded import local  # sharded imports this module

    names = sorted(noisy)
    by_device: dict[torch.device, list[int]] = {}
    for k, name in enumerate(names):
        by_device.setdefault(local(noisy[name]).device, []).append(k)
    squares = [0.0] * len(names)
    for positions in by_device.values():
        norms = torch.stack([torch.linalg.vector_norm(local(noisy[names[k]]).detach().float()) for k in positions])
        for k, value in zip(positions, norms.cpu().tolist()):
            squares[k] = value * value
    return math.fsum((k + 1) * value for k, value in enumerate(squares))


def nonfinite_message(detail: str) -> str:
    return (
        f"{detail}; the step was abandoned and nothing was applied. Check the loss and inputs, lower the learning "
        "rate, or pass nonfinite='drop' to make_private to zero such examples privately."
    )


def raise_nonfinite(detail: str) -> None:
    raise NonFiniteGradientError(nonfinite_message(detail))
