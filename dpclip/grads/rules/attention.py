"""nn.MultiheadAttention: run as its projections (Linear uses on row blocks of ``in_proj_weight``) around the
same attention computation, so stock attention layers need no replacement."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..registry import LayerRule, register_layer

if TYPE_CHECKING:
    from ..tape import LayerwiseTape

Tensor = torch.Tensor


@register_layer(nn.MultiheadAttention)
class MultiheadAttentionRule(LayerRule):
    covers_submodules = True

    def supports(self, module: nn.Module) -> str | None:
        if not module._qkv_same_embed_dim or module.bias_k is not None or module.add_zero_attn:
            return "MultiheadAttention with kdim/vdim, bias_kv or add_zero_attn"
        return None

    def recorded_forward(self, module: nn.Module, tape: LayerwiseTape) -> Callable[..., Any] | None:
        return _recorded_forward(module, tape, tape.module_names[id(module)])


def _recorded_forward(module: nn.MultiheadAttention, tape: LayerwiseTape, where: str) -> Callable[..., Any]:
    """nn.MultiheadAttention's forward (training semantics), computed from recorded projections."""

    def forward(
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        if not module.batch_first and query.dim() == 3:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        batch, tgt, embed = query.shape
        src, heads = key.shape[1], module.num_heads
        head_dim = embed // heads
        w, b = module.in_proj_weight, module.in_proj_bias
        q, k, v = (
            tape.record_linear(f"{where}.in_proj", x, w, b, slice(i * embed, (i + 1) * embed))
            for i, x in enumerate((query, key, value))
        )
        q = q.reshape(batch, tgt, heads, head_dim).transpose(1, 2)
        k = k.reshape(batch, src, heads, head_dim).transpose(1, 2)
        v = v.reshape(batch, src, heads, head_dim).transpose(1, 2)
        if is_causal and attn_mask is None:
            attn_mask = torch.ones(tgt, src, dtype=torch.bool, device=q.device).triu(1)
        masks = [attn_mask.reshape(-1, heads, tgt, src) if attn_mask is not None and attn_mask.dim() == 3 else attn_mask,
                 None if key_padding_mask is None else key_padding_mask[:, None, None, :]]
        dropout = module.dropout if module.training else 0.0
        if not need_weights:  # as torch's own path: fused attention, no [B, heads, T, T] tensors kept for backward
            additive = [m.new_zeros(m.shape, dtype=q.dtype).masked_fill(m, float("-inf")) if m.dtype == torch.bool
                        else m.to(q.dtype) for m in masks if m is not None]
            bias = None if not additive else additive[0] if len(additive) == 1 else additive[0] + additive[1]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)
            out = out.transpose(1, 2).reshape(batch, tgt, embed)
            attn = None
        else:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(head_dim)
            for mask in masks:
                if mask is not None:
                    scores = scores.masked_fill(mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
            attn = F.dropout(torch.softmax(scores, dim=-1), p=dropout, training=module.training)
            out = (attn @ v).transpose(1, 2).reshape(batch, tgt, embed)
        proj = module.out_proj
        out = tape.record_linear(f"{where}.out_proj", out, proj.weight, proj.bias, None)
        if not module.batch_first:
            out = out.transpose(0, 1)
        weights = None if attn is None else attn.mean(dim=1) if average_attn_weights else attn
        return out, weights

    return forward
