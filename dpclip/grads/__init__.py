"""Per-example gradients: the layerwise tape with its registry of layer rules, and verification.

- :mod:`.registry`: :class:`LayerRule`, :func:`register_layer`, :func:`rule_for` — one rule per layer family
  (:mod:`.rules`), users add their own; a layer without a rule falls back to vmap over that layer alone.
- :mod:`.contributions`: what a rule returns — per-example norms and clipped sums without materialising.
- :mod:`.tape`: :class:`LayerwiseTape` records one forward/backward and hands over :class:`LayerwiseGradients`.
"""

from .contributions import Contribution, ConvPatches, ConvWeight, EmbeddingWeight, LinearWeight, Materialized, Summed
from .registry import LayerCall, LayerRule, refusals, register_layer, rule_for
from .tape import LayerwiseGradients, LayerwiseTape, LayoutError

__all__ = [
    "Contribution",
    "ConvPatches",
    "ConvWeight",
    "EmbeddingWeight",
    "LayerCall",
    "LayerRule",
    "LayerwiseGradients",
    "LayerwiseTape",
    "LayoutError",
    "LinearWeight",
    "Materialized",
    "Summed",
    "refusals",
    "register_layer",
    "rule_for",
]
