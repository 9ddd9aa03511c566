"""L2 and L1: everything that depends on the clipping norm, in one place.

The norm fixes how per-parameter norms combine into an example's norm, how C is split across parameters for
per-layer clipping, which noise makes the clipped sum private, and the accounting event of that noise: the
Gaussian mechanism for L2 sensitivity (Dwork & Roth 2014, Thm. A.1; Mironov 2017, Prop. 7) and the Laplace
mechanism for L1 sensitivity (Dwork et al. 2006, Prop. 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from accountants import Event, Gaussian, Laplace
from accountants.errors import PrivacyParameterError

from .errors import ModelNotSupportedError

Tensor = torch.Tensor
NoiseLaw = Literal["gaussian", "laplace"]


@dataclass(frozen=True)
class ClipNorm:
    """A clipping norm: ``order`` (2 or 1) and the noise law its sensitivity calls for."""

    name: Literal["l2", "l1"]
    order: int
    noise: NoiseLaw

    def vector(self, values: Tensor) -> Tensor:
        """Each example's norm of ``values`` [batch, ...] (float32 or wider)."""
        flat = values.reshape(values.shape[0], -1)
        if flat.is_complex():  # .float() would keep the real part: a norm too small, an example under-clipped
            raise ModelNotSupportedError(
                f"a complex ({flat.dtype}) gradient reached the clipping norm; dpclip clips real coordinates only: "
                "store the parameter as a real tensor with a trailing dimension of 2 and use torch.view_as_complex "
                "on it in forward")
        if flat.dtype not in (torch.float32, torch.float64):
            flat = flat.float()
        return torch.linalg.vector_norm(flat, ord=self.order, dim=1)

    def combine(self, per_part: Tensor) -> Tensor:
        """An example's whole norm from the norms of its disjoint parts [batch, parts]: √Σ n² (L2) or Σ n (L1)."""
        return per_part.square().sum(dim=1).sqrt() if self.order == 2 else per_part.sum(dim=1)

    def part_bound(self, max_norm: float, parts: int) -> float:
        """Per-part bound C_k with Σ C_k² = C² (L2) or Σ C_k = C (L1), so the whole stays ≤ C."""
        return max_norm / math.sqrt(parts) if self.order == 2 else max_norm / parts

    def event(self, noise_multiplier: float) -> Event:
        """The accounting event of this norm's noise at noise multiplier σ (std or scale σ·C, sensitivity C)."""
        return Gaussian(noise_multiplier) if self.noise == "gaussian" else Laplace(noise_multiplier)


L2 = ClipNorm("l2", 2, "gaussian")
L1 = ClipNorm("l1", 1, "laplace")
NORMS: dict[str, ClipNorm] = {"l2": L2, "l1": L1}


def clip_norm(name: str) -> ClipNorm:
    """The :class:`ClipNorm` called ``name``; a clear error for anything else."""
    try:
        return NORMS[name]
    except (KeyError, TypeError):
        raise PrivacyParameterError(
            f"norm must be 'l2' (clipping in L2, Gaussian noise) or 'l1' (clipping in L1, Laplace noise), got {name!r}; "
            "the noise always matches the clipping norm, since only that pair is what the accountant charges"
        ) from None
