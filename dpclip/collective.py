"""Where the clipped sums meet before the one noisy release: this process alone, or every rank.

The engine talks to a :class:`Collective` only; :class:`LocalCollective` is the single-process one and
:class:`dpclip.distributed.DistributedContext` the torch.distributed one (all-reduced sums and counts, one
shared noise draw, errors raised on every rank together), and :class:`dpclip.sharded.ShardedContext` its FSDP2
variant (sums reduce-scattered to the parameter shards, noise drawn per shard).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch

from .aggregation import raise_nonfinite
from .noise import NoiseSource

Tensor = torch.Tensor


class Collective(Protocol):
    def defer_error(self, message: str) -> None:
        """A non-finite-gradient error met during backward (raised now, or on every rank at the step)."""
        ...

    def all_reduce(self, summed: Mapping[str, Tensor], count: float) -> tuple[dict[str, Tensor], float, str | None]:
        """Σ over processes of the clipped sums and the policy statistic; an error message if any process failed."""
        ...

    def release(self, compute: Callable[[], Any], like: Any) -> Any:
        """Run ``compute`` (add noise) once for all processes and return its result everywhere."""
        ...

    def release_sums(self, add: Callable[[NoiseSource], dict[str, Tensor]], like: Mapping[str, Tensor],
                     noise: NoiseSource) -> dict[str, Tensor]:
        """The noisy sums, ``add(source)``: one draw per coordinate over all processes (shared, or per shard)."""
        ...

    def assign_gradients(self, params: Mapping[str, Tensor], noisy: Mapping[str, Tensor]) -> None:
        """Give each trainable parameter its part of the release as ``.grad``, for the optimizer."""
        ...


def assign_gradients(params: Mapping[str, Tensor], noisy: Mapping[str, Tensor]) -> None:
    """``p.grad`` = the parameter's noisy release, in the parameter's dtype."""
    for name, p in params.items():
        p.grad = noisy[name].to(p.dtype)


class LocalCollective:
    """One process: nothing to reduce; errors are raised at once, after ``abandon`` reset the step."""

    def __init__(self, abandon: Callable[[], None]) -> None:
        self.abandon = abandon

    def defer_error(self, message: str) -> None:
        self.abandon()
        raise_nonfinite(message)

    def all_reduce(self, summed: Mapping[str, Tensor], count: float) -> tuple[dict[str, Tensor], float, str | None]:
        return dict(summed), count, None

    def release(self, compute: Callable[[], Any], like: Any) -> Any:
        return compute()

    def release_sums(self, add: Callable[[NoiseSource], dict[str, Tensor]], like: Mapping[str, Tensor],
                     noise: NoiseSource) -> dict[str, Tensor]:
        return add(noise)

    def assign_gradients(self, params: Mapping[str, Tensor], noisy: Mapping[str, Tensor]) -> None:
        assign_gradients(params, noisy)
