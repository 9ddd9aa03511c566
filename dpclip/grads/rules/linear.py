"""nn.Linear and transformers' Conv1D (y = x W + b with W stored [in, out]): ghost norms, book-keeping sums."""

from __future__ import annotations

import torch.nn as nn

from ..contributions import Contribution, LinearWeight, Summed
from ..registry import LayerCall, LayerRule, register_layer


def _positions(x):  # [B, ..., d] → [B, T, d]
    return x.reshape(x.shape[0], -1, x.shape[-1])


def linear_contributions(call: LayerCall, weight, bias, transposed: bool = False) -> list[Contribution]:
    """Contributions of y = x Wᵀ + b (or x W + b when ``transposed``) from the input and output gradient."""
    a, g = _positions(call.input), _positions(call.grad)
    parts: list[Contribution] = []
    if (name := call.name(weight)) is not None:
        parts.append(LinearWeight(name, None, a, g, weight.shape, transposed))
    if (name := call.name(bias)) is not None:
        parts.append(Summed(name, g))
    return parts


@register_layer(nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear)
class LinearRule(LayerRule):
    fresh_outputs = True  # F.linear creates its output (a view on 3-D inputs: then copied as before)

    def contributions(self, call: LayerCall) -> list[Contribution]:
        return linear_contributions(call, call.module.weight, call.module.bias)


@register_layer("transformers.pytorch_utils.Conv1D")
class HFConv1DRule(LayerRule):
    """GPT-2's ``Conv1D``: ``x @ weight + bias`` with ``weight`` of shape [in, out]."""

    def contributions(self, call: LayerCall) -> list[Contribution]:
        return linear_contributions(call, call.module.weight, call.module.bias, transposed=True)
