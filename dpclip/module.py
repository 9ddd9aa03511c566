"""The wrapped model: an ordinary ``nn.Module`` whose training forward yields per-example gradients.

In training mode with autograd on, each forward (chunk by chunk) expands every trainable parameter to one
stride-0 copy per example and runs the model under vmap (:func:`dpclip.per_sample.batched_parameter_forward`).
The user's own ``loss.backward()`` then fills each copy's ``.grad`` with that example's gradient; a hook hands
each completed chunk to the engine, which clips and sums it and frees it, so at most one chunk of per-example
gradients is alive at a time. The model's own ``.grad`` is never filled with non-private gradients.

Cost: one forward and one backward, vectorised over examples (the per-example weight gradients are
materialised for one chunk at a time). In eval mode or under ``torch.no_grad()`` the plain model runs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from .errors import EngineUsageError
from .hooks import DEEPCOPY_MESSAGE, PICKLE_MESSAGE
from .per_sample import batch_size_of, batched_parameter_forward, trainable_parameters

Tensor = torch.Tensor
ChunkConsumer = Callable[[dict[str, Tensor], float, int], None]  # (grads, scale, index of first example)


class ChunkCollector:
    """Gathers the per-example gradients of one chunk as backward produces them."""

    def __init__(self, leaves: Mapping[str, Tensor], scale: float, start: int, consume: ChunkConsumer) -> None:
        self.leaves = dict(leaves)
        self.start = start
        self.scale = scale
        self.consume = consume
        self.grads: dict[str, Tensor] = {}
        self.done = False
        for name, leaf in self.leaves.items():
            leaf.register_post_accumulate_grad_hook(self._hook(name))

    def _hook(self, name: str) -> Callable[[Tensor], None]:
        def on_grad(leaf: Tensor) -> None:
            if self.done or name in self.grads:
                raise EngineUsageError(
                    "backward ran twice through the same forward: each example's gradient would count twice. "
                    "Run one forward per batch and call backward on it once."
                )
            self.grads[name] = leaf.grad
            leaf.grad = None
            if len(self.grads) == len(self.leaves):
                self.finish()

        return on_grad

    def finish(self) -> None:
        """Hand the chunk to the engine; parameters that got no gradient contribute zeros."""
        if self.done:
            return
        grads = {
            name: self.grads[name] if name in self.grads else torch.zeros_like(leaf) for name, leaf in self.leaves.items()
        }
        self.done = True
        self.grads = {}
        self.consume(grads, self.scale, self.start)


def _slice_batch(values: Any, batch: int, start: int, stop: int) -> Any:
    return tree_map(lambda t: t[start:stop] if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == batch else t, values)


def _concat(outputs: list[Any]) -> Any:
    if len(outputs) == 1:
        return outputs[0]
    flats = [tree_flatten(out) for out in outputs]
    spec = flats[0][1]
    leaves = [torch.cat(parts) if isinstance(parts[0], Tensor) else parts[0] for parts in zip(*(f[0] for f in flats))]
    return tree_unflatten(leaves, spec)


def per_example_forward(
    module: nn.Module,
    args: tuple,
    kwargs: dict,
    chunk_size: int,
    mean_reduction: bool,
    consume: ChunkConsumer,
    padding: bool = True,
) -> tuple[Any, list[ChunkCollector]]:
    """Forward pass whose backward delivers per-example gradients to ``consume`` chunk by chunk (``padding``: see
    :func:`dpclip.per_sample.single_example_call`)."""
    batch = batch_size_of(args, kwargs)
    if batch == 0:
        with torch.no_grad():
            out = module(*args, **kwargs)
        return tree_map(lambda t: t.detach().requires_grad_() if isinstance(t, Tensor) and t.is_floating_point() else t, out), []
    # With a mean-reduced loss each example's gradient arrives divided by the batch size; undo that.
    scale = float(batch) if mean_reduction else 1.0
    params = {name: p.detach() for name, p in trainable_parameters(module).items()}

    outputs, collectors = [], []
    for start in range(0, batch, chunk_size):
        stop = min(start + chunk_size, batch)
        leaves = {name: p.expand(stop - start, *p.shape).requires_grad_() for name, p in params.items()}
        collectors.append(ChunkCollector(leaves, scale, start, consume))
        chunk_args = _slice_batch(args, batch, start, stop)
        chunk_kwargs = _slice_batch(kwargs, batch, start, stop)
        outputs.append(batched_parameter_forward(module, leaves, chunk_args, chunk_kwargs, padding))
    return _concat(outputs), collectors


class PrivateModule(nn.Module):
    """Wraps a model for private training; behaves like it (attributes, ``state_dict`` and eval forward)."""

    def __init__(self, module: nn.Module, forward_hook: Callable[[nn.Module, tuple, dict], Any]) -> None:
        super().__init__()
        self._module = module
        object.__setattr__(self, "_private_forward", forward_hook)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not (self.training and torch.is_grad_enabled()):
            return self._module(*args, **kwargs)
        return self._private_forward(self._module, args, kwargs)

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise EngineUsageError(PICKLE_MESSAGE)

    def __deepcopy__(self, memo: dict) -> Any:
        raise EngineUsageError(DEEPCOPY_MESSAGE)

    @property
    def module(self) -> nn.Module:
        """The original model (same parameter objects)."""
        return self._module

    def state_dict(self, *args: Any, **kwargs: Any) -> dict:  # type: ignore[override]
        return self._module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:  # type: ignore[override]
        return self._module.load_state_dict(state_dict, strict=strict, assign=assign)

    # Containers (nn.Sequential, nn.ModuleList, ...) stay indexable: model[0], len(model), iter(model) reach the
    # wrapped model's layers. A training forward through a layer alone bypasses the engine and is refused at backward.
    def __getitem__(self, index: Any) -> Any:
        return self._module[index]  # type: ignore[index]

    def __len__(self) -> int:
        return len(self._module)  # type: ignore[arg-type]

    def __iter__(self) -> Any:
        return iter(self._module)  # type: ignore[call-overload]

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._module, name)
