"""The per-layer fallback: per-example gradients of one layer's parameters by vmap over that layer alone.

For example i, the layer's forward is re-run on example i's inputs alone (``functional_call``) and its
vector-Jacobian product with example i's output gradient gives g_i for the layer's parameters — the
definition of a per-example gradient, vectorised over examples with ``torch.func.vmap``. Layers whose forward
draws random numbers cannot be re-run exactly and are refused.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.func import functional_call, vjp, vmap
from torch.utils._pytree import tree_map

from ...errors import ModelNotSupportedError
from ..contributions import Contribution, Materialized
from ..registry import LayerCall, LayerRule, float_leaves

Tensor = torch.Tensor


class VmapLayerRule(LayerRule):
    """Exact per-example gradients for any layer whose forward vmap can run (the rule of last resort).

    ``covers_submodules``: the parameters of the layer's sub-layers too (for layers that use their children's
    weights directly, as ``nn.MultiheadAttention`` uses ``out_proj.weight``).
    """

    def __init__(self, covers_submodules: bool = False) -> None:
        self.covers_submodules = covers_submodules

    def contributions(self, call: LayerCall) -> list[Contribution]:
        module = call.module
        params = {
            local: p for local, p in module.named_parameters(recurse=self.covers_submodules) if call.name(p) is not None
        }
        if not params:
            return []
        if call.layout_dims not in (None, (0, 0)):
            raise ModelNotSupportedError(
                f"{call.module_name} ({type(module).__name__}): its input holds the examples in dim "
                f"{call.layout_dims[0]}, and it has no layer rule that can follow that layout; give it examples in "
                "dim 0, or register a rule for it with dpclip.register_layer"
            )
        args_dims, kwargs_dims = call.in_dims
        add_batch = call.unsqueeze

        def one(args: tuple, kwargs: dict, grads: list[Tensor | None]) -> dict[str, Tensor]:
            shaped_args = tuple(_with_batch(v, d, add_batch) for v, d in zip(args, args_dims))
            shaped_kwargs = {k: _with_batch(v, kwargs_dims[k], add_batch) for k, v in kwargs.items()}

            def run(p: dict[str, Tensor]) -> list[Tensor]:
                return float_leaves(functional_call(module, p, shaped_args, shaped_kwargs))

            outs, pullback = vjp(run, params)
            tangents = [
                torch.zeros_like(o) if g is None else g.reshape(o.shape)
                for o, g in zip(outs, grads)
            ]
            return pullback(tangents)[0]

        grad_dims = [None if g is None else 0 for g in call.output_grads]
        grads = vmap(one, in_dims=(args_dims, kwargs_dims, grad_dims), randomness="error")(
            call.args, call.kwargs, call.output_grads
        )
        return [Materialized(call.names[id(p)], grads[local]) for local, p in params.items()]


def _with_batch(value: Any, dim: Any, add_batch: bool) -> Any:
    if not add_batch or dim is None:
        return value
    return tree_map(lambda t, d: t.unsqueeze(0) if d == 0 else t, value, dim)
