"""BatchNorm with frozen statistics: what a pretrained BatchNorm becomes for private fine-tuning.

A BatchNorm layer in training mode normalises each example with the mean and variance of the whole batch, so one
example changes every other example's output and gradient: DP-SGD's per-example clipping would not bound its
influence. With its running statistics frozen it is a fixed per-channel affine map, (x − μ) / √(σ² + eps) · w + b,
applied to each example alone — exactly what the layer computes in eval mode, but independent of ``train()`` /
``eval()``, so the training loop's ``model.train()`` cannot switch it back to batch statistics. Its affine ``weight``
and ``bias`` stay trainable; μ and σ² are buffers that never change. ``dpclip.fix_model(model, batchnorm="freeze")``
puts it in place of every BatchNorm, keeping the pretrained statistics that GroupNorm would discard.

The frozen statistics are outside the accountant: they must come from data that is not private (pretraining on a
public set). Statistics a model gathered on the private training set were released without noise, and no ε
dpclip reports covers them.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import ModelNotSupportedError

Tensor = torch.Tensor


def require_statistics(layer: nn.modules.batchnorm._BatchNorm, where: str = "") -> None:
    """Refuse a BatchNorm without running statistics (``track_running_stats=False``): nothing to freeze."""
    if layer.running_mean is None or layer.running_var is None:
        raise ModelNotSupportedError(
            f"{where or type(layer).__name__} ({type(layer).__name__}, track_running_stats=False) has no running "
            "statistics to freeze; use batchnorm='groupnorm'"
        )


class FrozenBatchNorm(nn.Module):
    """BatchNorm1d/2d/3d in eval semantics in every mode: y = (x − running_mean) / √(running_var + eps) · weight + bias.

    Same parameters and buffers (names, shapes) as the BatchNorm it replaces, so state dicts load both ways; the
    statistics (and ``num_batches_tracked``) are never updated.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.num_features, self.eps, self.affine = num_features, eps, affine
        kind = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.ones(num_features, **kind)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_features, **kind)) if affine else None
        self.register_buffer("running_mean", torch.zeros(num_features, **kind))
        self.register_buffer("running_var", torch.ones(num_features, **kind))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))

    @classmethod
    def from_batchnorm(cls, layer: nn.modules.batchnorm._BatchNorm, where: str = "") -> FrozenBatchNorm:
        """The frozen twin of ``layer``: its statistics copied, its affine parameters shared (the same tensors)."""
        require_statistics(layer, where)
        frozen = cls(layer.num_features, layer.eps, layer.affine, device=layer.running_mean.device,
                     dtype=layer.running_mean.dtype)
        with torch.no_grad():
            frozen.running_mean.copy_(layer.running_mean)
            frozen.running_var.copy_(layer.running_var)
            if layer.num_batches_tracked is not None:
                frozen.num_batches_tracked.copy_(layer.num_batches_tracked)
        if layer.affine:
            frozen.weight, frozen.bias = layer.weight, layer.bias
        return frozen

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() < 2 or input.shape[1] != self.num_features:
            raise ValueError(f"FrozenBatchNorm: expected input [batch, {self.num_features}, ...], got {tuple(input.shape)}")
        return F.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias, training=False, eps=self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}, statistics frozen"
