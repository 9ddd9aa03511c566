"""nn.Conv1d/2d/3d and transposed convolutions with zero padding; biases as sums of the output gradient.

Weights: where a layer has no more output positions than output channels (deep, small-resolution layers), as the
linear map on the input's patches (:class:`ConvPatches`: its per-example gradients, or their norms by the ghost
identity, cost less there than the vmapped weight backward, which torch runs as a grouped convolution); elsewhere
by the vmapped convolution weight backward (:class:`ConvWeight`), which forms no patches. The threshold is measured
by ``benchmarks/conv_routes.py`` (``benchmarks/results/conv_routes.md``)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..contributions import Contribution, ConvPatches, ConvWeight, Summed
from ..registry import LayerCall, LayerRule, register_layer


@register_layer(nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
class ConvRule(LayerRule):
    fresh_outputs = True  # F.conv* creates its output
    def supports(self, module: nn.Module) -> str | None:
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r} pads outside the convolution"
        if isinstance(module.padding, str):
            return f"padding={module.padding!r}"
        return None

    def contributions(self, call: LayerCall) -> list[Contribution]:
        module, g = call.module, call.grad
        parts: list[Contribution] = []
        if (name := call.name(module.weight)) is not None:
            kind = ConvPatches if prefers_patches(module, call.input, g) else ConvWeight
            parts.append(kind(name, module, call.input, g))
        if (name := call.name(module.bias)) is not None:
            parts.append(Summed(name, g.reshape(g.shape[0], g.shape[1], -1).transpose(1, 2)))
        return parts


def prefers_patches(conv: nn.Module, x: torch.Tensor, g: torch.Tensor) -> bool:
    """Whether :class:`ConvPatches` is the cheaper route: an ordinary convolution (groups = 1, not transposed)
    with positions T ≤ C_out, whose patches [B, T, |kernel|·C_in] fit in ``ConvPatches.patch_bytes``. T ≤ C_out
    also keeps the patches no larger than the per-example gradients. On one CPU thread at batch 256
    (benchmarks/results/conv_routes.md) the patches were up to 10× faster on such layers, and the weight backward
    1.6–3.6× faster on every layer with T > C_out."""
    if isinstance(conv, nn.modules.conv._ConvTransposeNd) or conv.groups != 1:  # type: ignore[union-attr]
        return False
    positions = math.prod(g.shape[2:])
    size = g.shape[0] * positions * math.prod(conv.weight.shape[1:]) * max(x.element_size(), 4)  # type: ignore[union-attr]
    return positions <= g.shape[1] and size <= ConvPatches.patch_bytes
