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

from accountants import RDPAccountant
from accountants.checks import check_positive

from .clipping import Norm, clip, clipped_sum, per_example_norms
from .mechanism import DPSGDMechanism
from .errors import NonFiniteGradientError
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
    accountant: RDPAccountant,
    source: NoiseSource,
    norm: Norm = "l2",
    per_layer: bool = False,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """One DP-SGD step on a Poisson-sampled batch (inputs, targets); returns the per-example norms.

    The batch must have been drawn with Poisson sampling at ``sample_rate`` from ``dataset_size`` examples
    (e.g. by :class:`dpclip.PoissonDataLoader`): that is what the recorded event asserts.
    """
    mechanism = DPSGDMechanism.create(noise_multiplier, norm, "fixed", sample_rate, dataset_size, per_layer=per_layer, loss_reduction="sum")
    bound = check_positive("max_grad_norm", max_grad_norm)
    grads = per_sample_grads(model, loss_fn, inputs, targets, chunk_size=chunk_size)
    norms = per_example_norms(grads, norm)
    if not bool(torch.isfinite(norms).all()):
        raise NonFiniteGradientError("some per-example gradients are NaN or infinite; nothing was applied")
    noisy = add_noise(clipped_sum(grads, bound, norm, per_layer), mechanism.noise_multiplier, bound, norm, source)
    for name, p in trainable_parameters(model).items():
        p.grad = noisy[name] / mechanism.expected_batch_size
    optimizer.step()
    accountant.compose(mechanism.step_event())
    return norms
