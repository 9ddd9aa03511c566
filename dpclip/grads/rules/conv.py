"""nn.Conv1d/2d/3d and transposed convolutions with zero padding; biases as sums of the output gradient.

Weights: where a layer has no more output positions than output channels (deep, small-resolution layers), or
is a stride-1 first layer on one channel (whose patches :func:`~dpclip.grads.contributions.phase_patches` builds
fast), as the linear map on the input's patches
(:class:`ConvPatches`: its per-example gradients, or their norms by the ghost identity, cost less there than the
vmapped weight backward, which torch runs as a grouped convolution); elsewhere by the vmapped convolution weight
backward (:class:`ConvWeight`), which forms no patches. The choice is measured by ``benchmarks/conv_routes.py``
(``benchmarks/results/conv_routes.md``). Patches are held until the clipped sum, so they are drawn from the
step's budget like kept per-example gradients: ``memory="low"`` (no budget) forms none."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..contributions import Contribution, ConvPatches, ConvWeight, Summed, phases_pay
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
            parts.append(_weight(name, call))
        if (name := call.name(module.bias)) is not None:
            parts.append(Summed(name, g.reshape(g.shape[0], g.shape[1], -1).transpose(1, 2)))
        return parts


def _weight(name: str, call: LayerCall) -> Contribution:
    """The weight's contribution: on patches where they pay and the step's budget still holds them."""
    conv, x, g = call.module, call.input, call.grad
    if prefers_patches(conv, x, g) and (call.budget is None or call.budget.take(_patch_size(conv, x, g))):
        return ConvPatches(name, conv, x, g)
    return ConvWeight(name, conv, x, g)


def prefers_patches(conv: nn.Module, x: torch.Tensor, g: torch.Tensor) -> bool:
    """Whether :class:`ConvPatches` is the cheaper route: an ordinary convolution (groups = 1, not transposed)
    whose patches [B, T, |kernel|·C_in] fit in ``ConvPatches.patch_bytes``, with positions T ≤ C_out (which also
    keeps the patches no larger than the per-example gradients), or a stride-1 layer on one input channel whose
    patches are built by phases (:func:`phases_pay`: a first layer on grey images). On one CPU thread at batch 256
    the patches were 9–12× faster on the deep 4 × 4 layers (benchmarks/results/conv_routes.md); on one-channel
    stride-1 first layers at 28 × 28 (kernel 3 and 5) 1.05–1.21× faster, in interleaved runs of the whole norm and
    clipped sum. The weight backward stays faster elsewhere: 1.2–3.3× on the other layers with T > C_out measured,
    1.2–1.4× on a three-channel 3 × 3 first layer (on the Intel machine; on an AMD one the patches were faster
    there), and on the DP CNN's first layer (1 → 16, kernel 8, stride 2), once a tie, the one-channel weight route
    (:func:`~dpclip.grads.contributions.single_channel_grads`) is now 1.4× faster than the patches, and holds
    B·|W| values instead of 12.8 MB of patches."""
    if isinstance(conv, nn.modules.conv._ConvTransposeNd) or conv.groups != 1:  # type: ignore[union-attr]
        return False
    wide_first_layer = conv.in_channels == 1 and all(s == 1 for s in conv.stride) and phases_pay(conv, g)  # type: ignore[union-attr]
    pays = math.prod(g.shape[2:]) <= g.shape[1] or wide_first_layer
    return pays and _patch_size(conv, x, g) <= ConvPatches.patch_bytes


def _patch_size(conv: nn.Module, x: torch.Tensor, g: torch.Tensor) -> int:
    """Bytes of the patches [B, T, |kernel|·C_in]: the rule takes them from the step's budget (none with
    ``memory="low"``), as kept per-example gradients are."""
    return g.shape[0] * math.prod(g.shape[2:]) * math.prod(conv.weight.shape[1:]) * max(x.element_size(), 4)  # type: ignore[union-attr]
