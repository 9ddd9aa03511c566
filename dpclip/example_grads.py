"""What the clipping step needs from per-example gradients: their norms and weighted sums.

Two implementations share this small interface, so the engine's clip → sum code is one piece:
- :class:`MaterializedGradients` holds the per-example gradients themselves (the vmap path);
- :class:`dpclip.grads.LayerwiseGradients` derives both from each layer's inputs and output gradients
  without materialising per-example weight gradients (the fast path).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import torch

from .clipping import Norm, layer_norms

Tensor = torch.Tensor


class ExampleGradients(Protocol):
    names: list[str]

    def norms(self, norm: Norm) -> Tensor:
        """Per-example, per-parameter norms: shape [batch, len(names)]."""
        ...

    def weighted_sum(self, factors: Tensor, sparse_rows: bool = False) -> dict[str, Tensor]:
        """Σ_i factors[i, j] · g_i[names[j]] for every parameter j; rows with factor 0 contribute exactly 0.
        ``sparse_rows``: a sum may be a sparse COO tensor of the parameter's shape (rows of an embedding)."""
        ...

    def add_weighted_sum(self, factors: Tensor, into: Mapping[str, Tensor]) -> None:
        """``into[names[j]]`` += Σ_i factors[i, j] · g_i[names[j]] in place (dense tensors of the parameters' shapes)."""
        ...


def as_dense(values: Tensor) -> Tensor:
    """A clipped sum as a dense tensor: a sparse COO one (``weighted_sum(..., sparse_rows=True)``) summed into
    its rows, any other returned as it is."""
    return values.to_dense() if values.is_sparse else values


def masked_scale(values: Tensor, factors: Tensor, kept: bool | None = None) -> Tensor:
    """values[i] · factors[i] over the batch dim, with exact zeros where the factor is 0 (even if values are NaN).
    ``kept``: :func:`all_kept` of ``factors`` where the caller has it already."""
    shaped = factors.to(values.dtype).reshape(-1, *([1] * (values.dim() - 1)))
    if all_kept(factors) if kept is None else kept:  # the usual case: one multiplication, no masking pass
        return values * shaped
    return torch.where(shaped != 0, values * shaped, torch.zeros((), dtype=values.dtype, device=values.device))


def all_kept(factors: Tensor) -> bool:
    """Whether no example has factor 0 (none was dropped as non-finite): then nothing needs masking."""
    return bool(factors.all())


def kept_rows(values: Tensor, factors: Tensor, kept: bool | None = None) -> Tensor:
    """``values`` with the rows of dropped examples (factor 0) set to exactly 0 (``values`` itself if none was).
    ``kept``: :func:`all_kept` of ``factors`` where the caller has it already."""
    if all_kept(factors) if kept is None else kept:
        return values
    return masked_scale(values, (factors != 0).to(factors.dtype), kept=False)


def weighted_example_sum(values: Tensor, factors: Tensor) -> Tensor:
    """Σ_i factors[i] · values[i] over the batch dim; examples with factor 0 contribute exactly 0 (even NaN ones).

    Without dropped examples one matrix-vector product (no scaled copy of ``values``), else the masked product summed."""
    if all_kept(factors):
        rows = values.reshape(values.shape[0], -1)
        return torch.mv(rows.t(), factors.to(values.dtype)).reshape(values.shape[1:])
    return masked_scale(values, factors).sum(dim=0)


class MaterializedGradients:
    """Per-example gradients held in full: {name: tensor [batch, *param.shape]}."""

    def __init__(self, grads: Mapping[str, Tensor]) -> None:
        self.grads = dict(grads)
        self.names = list(self.grads)

    def norms(self, norm: Norm) -> Tensor:
        return layer_norms(self.grads, norm)

    def weighted_sum(self, factors: Tensor, sparse_rows: bool = False) -> dict[str, Tensor]:
        return {name: weighted_example_sum(g, factors[:, j]) for j, (name, g) in enumerate(self.grads.items())}

    def add_weighted_sum(self, factors: Tensor, into: Mapping[str, Tensor]) -> None:
        for name, total in self.weighted_sum(factors).items():
            into[name].add_(total.to(into[name].dtype))
