"""nn.Conv1d/2d/3d and transposed convolutions with zero padding: per-example weight gradients by the vmapped
convolution weight backward (no unfolded patches); biases as sums of the output gradient."""

from __future__ import annotations

import torch.nn as nn

from ..contributions import Contribution, ConvWeight, Summed
from ..registry import LayerCall, LayerRule, register_layer


@register_layer(nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
class ConvRule(LayerRule):
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
            parts.append(ConvWeight(name, module, call.input, g))
        if (name := call.name(module.bias)) is not None:
            parts.append(Summed(name, g.reshape(g.shape[0], g.shape[1], -1).transpose(1, 2)))
        return parts
