"""LayerNorm, GroupNorm, RMSNorm and frozen BatchNorm: the affine gradients Σ g ⊙ x̂ and Σ g of each example, exactly."""

from __future__ import annotations

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
    module = call.module
    parts: list[Contribution] = []
    if (name := call.name(getattr(module, "weight", None))) is not None:
        parts.append(Summed(name, prod))
    if (name := call.name(getattr(module, "bias", None))) is not None:
        parts.append(Summed(name, grads))
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
    def contributions(self, call: LayerCall) -> list[Contribution]:
        module, g = call.module, call.grad
        with torch.no_grad():
            xhat = F.group_norm(call.input, module.num_groups, None, None, module.eps)
        return _affine(call, _channels_last(g * xhat), _channels_last(g))


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
