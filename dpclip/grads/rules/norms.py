"""LayerNorm, GroupNorm, RMSNorm and frozen BatchNorm: the affine gradients Σ g ⊙ x̂ and Σ g of each example, exactly."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...frozen_norm import FrozenBatchNorm
from ..contributions import Contribution, Summed
from ..registry import LayerCall, LayerRule, register_layer


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    """[B, C, *spatial] → [B, positions, C]: a channel-wise affine's per-position rows."""
    return t.reshape(t.shape[0], t.shape[1], -1).transpose(1, 2)


def _affine(call: LayerCall, prod: torch.Tensor, grads: torch.Tensor) -> list[Contribution]:
    """The affine's contributions from Σ_t g ⊙ x̂ and Σ_t g, given per position ([B, T, *shape]): summed over the
    positions here, so that what is held until the norms is [B, 1, *shape] (a transformer's g ⊙ x̂ is as large
    as the layer's activations, and every layer's contributions are built before the first norm)."""
    module = call.module
    parts: list[Contribution] = []
    if (name := call.name(getattr(module, "weight", None))) is not None:
        parts.append(Summed(name, prod.sum(dim=1, keepdim=True)))
    if (name := call.name(getattr(module, "bias", None))) is not None:
        parts.append(Summed(name, grads.sum(dim=1, keepdim=True)))
    return parts


@register_layer(nn.LayerNorm)
class LayerNormRule(LayerRule):
    def contributions(self, call: LayerCall) -> list[Contribution]:
        module, g = call.module, call.grad
        with torch.no_grad():
            xhat = F.layer_norm(call.input, module.normalized_shape, None, None, module.eps)
        lead = (g.shape[0], -1, *module.normalized_shape)
        return _affine(call, (g * xhat).reshape(lead), g.reshape(lead))


@register_layer(nn.GroupNorm)
class GroupNormRule(LayerRule):
    """Each example's Σ_t g ⊙ x̂ and Σ_t g per channel from torch's own group-norm backward kernel, which computes
    exactly these sums per channel while it reduces over the batch: run on the batch as one example whose
    channels are the B·C (example, channel) pairs, in B·G groups (group norm normalizes each (example, group)
    block on its own, so the statistics are the same), it returns them per example and channel without forming
    x̂ or g ⊙ x̂. The statistics are those the forward computed, read off its autograd node (recomputed by the
    forward kernel where the output has none: a first layer). The ResNet benchmark's six group norms inside its
    training step (one thread, B = 256, interleaved runs): 31–34 ms per step forming x̂ and g ⊙ x̂, 27–28 ms with
    this kernel and recomputed statistics, 12.5–13.2 ms with the forward's."""

    def forward_state(self, module: nn.Module, output: Any) -> Any:
        node = getattr(output, "grad_fn", None)
        if node is None or node.name() != "NativeGroupNormBackward0":
            return None
        return node._saved_result1.detach(), node._saved_result2.detach()  # mean and 1/σ, [N, G]

    def contributions(self, call: LayerCall) -> list[Contribution]:
        module = call.module
        # contiguous: the flat views below read it so (torch's group-norm backward has crashed on a channels-last
        # slice of one example)
        g, x = call.grad.contiguous(), call.input.contiguous()
        batch, channels = x.shape[0], x.shape[1]
        positions, blocks = math.prod(x.shape[2:]), batch * module.num_groups
        if batch == 0:  # an empty Poisson batch: nothing to add up
            return _affine(call, x.new_zeros(0, 1, channels), x.new_zeros(0, 1, channels))
        with torch.no_grad():
            state = call.forward_state
            if (state is not None and call.layout_dims == (0, 0)
                    and all(t.shape == (batch, module.num_groups) and t.dtype == x.dtype for t in state)):
                mean, rstd = state
            else:
                _, mean, rstd = torch.ops.aten.native_group_norm(x, None, None, batch, channels, positions, module.num_groups, module.eps)
            flat = (1, batch * channels, positions)  # the batch as one example of B·C channels in B·G groups
            _, weight_grads, bias_grads = torch.ops.aten.native_group_norm_backward(
                g.reshape(flat), x.reshape(flat), mean.reshape(1, blocks), rstd.reshape(1, blocks),
                x.new_ones(batch * channels), 1, batch * channels, positions, blocks, [False, True, True],
            )
        rows = (batch, 1, channels)  # one position per example: Summed adds nothing up
        return _affine(call, weight_grads.reshape(rows), bias_grads.reshape(rows))


@register_layer(FrozenBatchNorm)
class FrozenBatchNormRule(LayerRule):
    """x̂ = (x − running_mean) / √(running_var + eps) per channel (dim 1), fixed statistics."""

    def contributions(self, call: LayerCall) -> list[Contribution]:
        module, g = call.module, call.grad
        with torch.no_grad():
            xhat = F.batch_norm(call.input, module.running_mean, module.running_var, None, None, training=False, eps=module.eps)
        return _affine(call, _channels_last(g * xhat), _channels_last(g))


@register_layer(nn.RMSNorm)
class RMSNormRule(LayerRule):
    def contributions(self, call: LayerCall) -> list[Contribution]:
        module, g = call.module, call.grad
        with torch.no_grad():
            xhat = F.rms_norm(call.input, module.normalized_shape, None, module.eps)
        lead = (g.shape[0], -1, *module.normalized_shape)
        return _affine(call, (g * xhat).reshape(lead), g.reshape(lead))


@register_layer(
    "transformers.models.llama.modeling_llama.LlamaRMSNorm",
    "transformers.models.mistral.modeling_mistral.MistralRMSNorm",
    "transformers.models.qwen2.modeling_qwen2.Qwen2RMSNorm",
)
class HFRMSNormRule(LayerRule):
    """Hugging Face's RMSNorm: weight ⊙ (x / sqrt(mean(x²) + eps)) computed in float32, cast back."""

    def contributions(self, call: LayerCall) -> list[Contribution]:
        module, g = call.module, call.grad
        with torch.no_grad():
            x = call.input.to(torch.float32)
            xhat = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)).to(call.input.dtype)
        width = module.weight.shape
        lead = (g.shape[0], -1, *width)
        return _affine(call, (g * xhat.to(g.dtype)).reshape(lead), g.reshape(lead))
