"""nn.Embedding: per-example rows summed per token id (no [vocab × dim] tensor per example)."""

from __future__ import annotations

import torch.nn as nn

from ..contributions import Contribution, EmbeddingWeight
from ..registry import LayerCall, LayerRule, register_layer


def embedding_refusal(module: nn.Embedding | nn.EmbeddingBag) -> str | None:
    """Why an embedding table (``nn.Embedding`` or ``nn.EmbeddingBag``) cannot be trained privately as it is,
    with the fix, or None."""
    if module.max_norm is not None:
        return (
            "max_norm renormalises the rows of the real weight that the batch looks up, inside the forward: "
            "the model's state would carry which tokens the private batch holds. Use max_norm=None (clip the "
            "gradient instead: that is what DP-SGD does)"
        )
    if module.sparse:
        return "sparse=True gradients cannot be noised (DP noise covers every row): use sparse=False"
    return None


@register_layer(nn.Embedding)
class EmbeddingRule(LayerRule):
    fresh_outputs = True  # F.embedding creates its output

    def refusal(self, module: nn.Module) -> str | None:
        return embedding_refusal(module)  # type: ignore[arg-type]

    def contributions(self, call: LayerCall) -> list[Contribution]:
        module = call.module
        name = call.name(module.weight)
        if name is None:
            return []
        ids, g = call.input, call.grad
        if module.padding_idx is not None:
            g = g * (ids != module.padding_idx)[..., None]
        ids = ids.reshape(ids.shape[0], -1)
        g = g.reshape(g.shape[0], -1, g.shape[-1])
        return [EmbeddingWeight(name, ids, g, module.num_embeddings, module.scale_grad_by_freq)]
