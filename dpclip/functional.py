"""The data path as plain functions, for users who write their own training loop.

    grads = per_sample_grads(model, criterion, x, y)                     # 1. per-example gradients
    summed = clipped_sum(grads, max_norm=1.0, norm="l2")                  # 2-3. clip and aggregate
    noisy = add_noise(summed, noise_multiplier=1.1, max_norm=1.0, norm="l2", source=NoiseSource(seed=0))  # 4.
    ... set p.grad = noisy[name] / expected_batch_size, optimizer.step() # 5.

:func:`private_step` does all five and records the step with an accountant.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from accountants import Accountant

from .aggregation import ClippedSum, noisy_release, raise_nonfinite
from .clipping import ClippingPolicy, FixedClipping, Norm, clip, clipped_sum, per_example_norms
from .collective import LocalCollective
from .example_grads import MaterializedGradients
from .mechanism import DPSGDMechanism
from .noise import NoiseSource, add_noise
from .per_sample import per_sample_grads, trainable_parameters

__all__ = ["add_noise", "clip", "clipped_sum", "per_example_norms", "per_sample_grads", "private_step"]


def private_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    sample_rate: float,
    dataset_size: int,
    accountant: Accountant,
    source: NoiseSource,
    norm: Norm = "l2",
    per_layer: bool = False,
    chunk_size: int | None = None,
    clipping: ClippingPolicy | None = None,
    nonfinite: str = "error",
) -> torch.Tensor:
    """One DP-SGD step on a Poisson-sampled batch (inputs, targets); returns the per-example norms.

    The batch must have been drawn with Poisson sampling at ``sample_rate`` from ``dataset_size`` examples
    (e.g. by :class:`dpclip.PoissonDataLoader`): that is what the recorded event asserts. ``clipping`` is a
    policy (default: fixed C = ``max_grad_norm``; a :class:`~dpclip.MedianClipping` adapts C and its noisy count
    is charged); ``nonfinite="drop"`` zeroes examples with NaN/inf gradients. The clipping, the noisy release and
    the charged event are the engine's own (:mod:`dpclip.aggregation`, :class:`dpclip.mechanism.DPSGDMechanism`).
    """
    policy = clipping if clipping is not None else FixedClipping(max_grad_norm)
    count_sigma = getattr(policy, "count_noise_multiplier", None) if policy.adaptive else None
    mechanism = DPSGDMechanism.create(
        noise_multiplier, norm, "median" if policy.adaptive else "fixed", sample_rate, dataset_size,
        count_sigma, per_layer, "sum",
    )
    grads = per_sample_grads(model, loss_fn, inputs, targets, chunk_size=chunk_size)
    norms = per_example_norms(grads, norm)
    total = ClippedSum(mechanism, policy, nonfinite, raise_nonfinite)
    total.add(MaterializedGradients(grads), 1.0)
    params = trainable_parameters(model)
    noisy, count = noisy_release(total, params, LocalCollective(total.reset), source, mechanism.expected_batch_size)
    for name, p in params.items():
        p.grad = noisy[name]
    optimizer.step()
    accountant.compose(mechanism.step_event())
    policy.after_release(count, mechanism.expected_batch_size)
    return norms
