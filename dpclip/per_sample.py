"""Step 1 of the data path: per-example gradients with ``torch.func`` (functional_call + vmap).

Two entry points share one building block, :func:`single_example_call` (run the model on one example by
adding and removing a batch dimension of size 1):

- :func:`per_sample_grads` — ``vmap(grad(loss))`` for users who write their own loop;
- :func:`batched_parameter_forward` — the engine's forward: parameters are expanded to one (stride-0) copy per
  example and the model is vmapped over (copy, example) pairs, so an ordinary ``loss.backward()`` leaves each
  example's gradient in its own slice. Dropout masks are drawn once (``randomness="different"``) and reused by
  the backward pass, so the gradients are those of the forward the user actually ran.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn as nn
from torch.func import functional_call, grad, vmap
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from .errors import ModelNotSupportedError

Tensor = torch.Tensor


def trainable_parameters(model: nn.Module) -> dict[str, Tensor]:
    """The parameters that get private gradients: those with ``requires_grad`` (frozen ones are skipped)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def fixed_tensors(model: nn.Module) -> dict[str, Tensor]:
    """Frozen parameters and buffers, passed unbatched to every example."""
    frozen = {name: p.detach() for name, p in model.named_parameters() if not p.requires_grad}
    return {**frozen, **dict(model.named_buffers())}


def first_batched_tensor(args: Sequence[Any], kwargs: Mapping[str, Any]) -> Tensor:
    """The first tensor argument with a dim 0 (its dim 0 is the batch); if no argument is one, the first inside
    tuples, lists and dicts (a model called with ``((x, mask),)`` or ``{"input_ids": ...}``)."""
    values = [*args, *kwargs.values()]
    for value in [*values, *tree_flatten(values)[0]]:
        if isinstance(value, Tensor) and value.dim() > 0:
            return value
    raise ModelNotSupportedError(
        "the model was called without any tensor argument (inside tuples, lists and dicts included), so dpclip "
        "cannot tell the batch size: pass the batch's tensors to the model, examples in dim 0"
    )


def batch_size_of(args: Sequence[Any], kwargs: Mapping[str, Any]) -> int:
    """Size of dim 0 of the first tensor argument (the batch), inside plain containers too."""
    return first_batched_tensor(args, kwargs).shape[0]


def batch_in_dims(values: Any, batch: int) -> Any:
    """vmap in_dims for a pytree of arguments: 0 for tensors whose dim 0 is the batch, None otherwise."""
    return tree_map(lambda v: 0 if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == batch else None, values)


def single_example_call(
    model: nn.Module, tensors: Mapping[str, Tensor], args: Sequence[Any], kwargs: Mapping[str, Any], in_dims: Any,
    padding: bool = True,
) -> Any:
    """Run ``model`` (with ``tensors`` as its parameters/buffers) on one example inside vmap. ``padding=False``
    skips :class:`_PaddingRowsDetached` (a Python-level hook on every op) for a model known to make no embedding
    lookup with a ``padding_idx``."""
    args_dims, kwargs_dims = in_dims
    batched_args = tuple(_unsqueeze(a, d) for a, d in zip(args, args_dims))
    batched_kwargs = {k: _unsqueeze(v, kwargs_dims[k]) for k, v in kwargs.items()}
    _refuse_aliased_modules(model)
    with _PaddingRowsDetached() if padding else nullcontext():
        out = functional_call(model, dict(tensors), batched_args, batched_kwargs)
    return tree_map(lambda t: t.squeeze(0) if isinstance(t, Tensor) and t.dim() > 0 else t, out)


def _refuse_aliased_modules(model: nn.Module) -> None:
    """ModelNotSupportedError for a module with its own parameters or buffers registered under two names
    (``self.b = self.a``): torch.func.functional_call swaps its tensors in under one name and restores them under
    the other, leaving the vmapped copies in the model."""
    first: dict[int, str] = {}
    for name, sub in model.named_modules(remove_duplicate=False):
        if next(iter(sub.parameters(recurse=False)), None) is None and next(iter(sub.buffers(recurse=False)), None) is None:
            continue
        if id(sub) in first:
            raise ModelNotSupportedError(
                f"{first[id(sub)]} and {name} are the same {type(sub).__name__} registered under two names: "
                "torch.func.functional_call, which the vmap path runs the model with, would leave per-example copies "
                "of its parameters in the model. Register it once and call it twice in forward (drop the second "
                "attribute); dpclip's layerwise path (PrivacyEngine's default grad_sample_mode='auto') handles it."
            )
        first[id(sub)] = name or type(sub).__name__


def _padding_of(func: Any, args: tuple, kwargs: dict) -> tuple[Tensor, int] | None:
    """(ids, padding row) of an embedding lookup with a ``padding_idx`` (``F.embedding``, ``torch.embedding``),
    else None."""
    if func is torch.nn.functional.embedding:
        ids, weight = (args[0] if args else kwargs["input"]), (args[1] if len(args) > 1 else kwargs["weight"])
        padding = args[2] if len(args) > 2 else kwargs.get("padding_idx")
    elif func is torch.embedding:
        weight, ids = (args[0] if args else kwargs["weight"]), (args[1] if len(args) > 1 else kwargs["indices"])
        padding = args[2] if len(args) > 2 else kwargs.get("padding_idx", -1)
        padding = None if padding < 0 else padding
    else:
        return None
    if padding is None:
        return None
    return ids, padding + weight.shape[0] if padding < 0 else padding


class PaddingLookups(TorchFunctionMode):
    """Records, while active, whether the model made an embedding lookup with a ``padding_idx``."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = False

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        self.seen = self.seen or _padding_of(func, args, kwargs) is not None
        return func(*args, **kwargs)


class _PaddingRowsDetached(TorchFunctionMode):
    """Each embedding lookup with a ``padding_idx`` (``nn.Embedding`` and its subclasses, ``F.embedding``,
    ``torch.embedding``) gives its padding positions' outputs no gradient, as torch's own embedding backward does:
    torch's vmap batching rule offsets the ids of batched weights but not ``padding_idx``, so that row would
    otherwise get gradients from the lookup. Only that lookup's: the same table used elsewhere (``emb.weight`` in a
    tied output head) still trains the row."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if (lookup := _padding_of(func, args, kwargs)) is None:
            return out
        ids, padding = lookup
        return torch.where((ids == padding).unsqueeze(-1), out.detach(), out)


def _unsqueeze(value: Any, dim: Any) -> Any:
    if dim is None:
        return value
    return tree_map(lambda t, d: t.unsqueeze(0) if d == 0 else t, value, dim)


def batched_parameter_forward(
    model: nn.Module, leaves: Mapping[str, Tensor], args: Sequence[Any], kwargs: Mapping[str, Any], padding: bool = True,
) -> Any:
    """Model output on a batch where ``leaves[name]`` holds one copy of each trainable parameter per example
    (``padding``: see :func:`single_example_call`)."""
    batch = batch_size_of(args, kwargs)
    dims = (batch_in_dims(tuple(args), batch), batch_in_dims(dict(kwargs), batch))
    fixed = fixed_tensors(model)

    def one(params: Mapping[str, Tensor], a: tuple, kw: dict) -> Any:
        return single_example_call(model, {**fixed, **params}, a, kw, dims, padding)

    return vmap(one, in_dims=(0, dims[0], dims[1]), randomness="different")(dict(leaves), tuple(args), dict(kwargs))


def per_sample_grads(
    model: nn.Module,
    loss_fn: Callable[[Any, Tensor], Tensor],
    inputs: Tensor | Sequence[Tensor],
    targets: Tensor,
    chunk_size: int | None = None,
) -> dict[str, Tensor]:
    """Gradient of ``loss_fn(model(x_i), y_i)`` for each example i, for every trainable parameter.

    ``loss_fn`` receives the output and target of a batch of one example, so any PyTorch criterion works.
    Returns ``{name: tensor of shape [batch, *param.shape]}``. ``chunk_size`` bounds memory by vectorising
    over that many examples at a time.
    """
    args = (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)
    batch = batch_size_of(args, {})
    dims = (batch_in_dims(args, batch), {})
    fixed = fixed_tensors(model)
    params = {name: p.detach() for name, p in trainable_parameters(model).items()}

    def loss_of_one(p: dict[str, Tensor], a: tuple, target: Tensor) -> Tensor:
        out = single_example_call(model, {**fixed, **p}, a, {}, dims)
        return loss_fn(tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, out), target.unsqueeze(0))

    if batch == 0:
        return {name: p.new_zeros((0, *p.shape)) for name, p in params.items()}
    per_example = vmap(grad(loss_of_one), in_dims=(None, dims[0], 0), randomness="different", chunk_size=chunk_size)
    return per_example(params, args, targets)
