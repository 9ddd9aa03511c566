"""The layer-rule registry: how the layerwise tape gets per-example gradients of each layer family.

A rule is registered for exact layer types (a subclass with its own ``forward`` is another layer) or for a
type's qualified name, so rules for third-party layers (``"transformers.pytorch_utils.Conv1D"``) need no
import. A layer with trainable parameters and no rule gets per-example gradients by vmap over that layer alone
(:class:`dpclip.grads.rules.fallback.VmapLayerRule`). Users add their own::

    @dpclip.register_layer(MyScale)
    class MyScaleRule(dpclip.LayerRule):
        def contributions(self, call):
            return [Summed(call.name(call.module.scale), call.grad * call.input)]   # per-example Σ_t g_t ⊙ x_t
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten

from .contributions import CacheBudget, Contribution

if TYPE_CHECKING:
    from .tape import LayerwiseTape

Tensor = torch.Tensor


def float_leaves(output: Any) -> list[Tensor]:
    """The floating-point tensors of a (possibly nested) layer or model output, in pytree order."""
    return [t for t in tree_flatten(output)[0] if isinstance(t, Tensor) and t.is_floating_point()]


@dataclass
class LayerCall:
    """One recorded call of a layer, laid out batch-first: what a rule needs to build contributions.

    ``args``/``kwargs`` are the call's arguments (tensors detached; ``in_dims`` says, like vmap's, which hold the
    examples in dim 0); ``output_grads`` the gradients of the output's floating tensors ([batch, ...]; None where
    no gradient arrived). ``layout_dims`` is (input dim, output dim) of the examples as the layer saw them
    (None for a shared call, whose inputs hold no examples and were expanded to the batch); ``unsqueeze`` says
    whether one example's inputs need a batch dim of 1 to run the layer on them alone; ``budget`` the step's
    shared budget for what a rule keeps until the clipped sum.
    """

    module: nn.Module
    module_name: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    in_dims: tuple[Any, Any]
    output_grads: list[Tensor | None]
    batch: int
    names: dict[int, str]
    layout_dims: tuple[int, int] | None = (0, 0)
    unsqueeze: bool = True
    #: the step's budget for tensors kept beyond what backward holds (per-example gradients, patches), shared by
    #: all layers; None: no limit beyond each contribution's own (``make_private(memory="low")``: 0 bytes)
    budget: CacheBudget | None = None
    #: what the rule kept from the layer's forward (:meth:`LayerRule.forward_state`), or None
    forward_state: Any = None

    @property
    def input(self) -> Tensor:
        """The first tensor argument (what ``nn.Linear`` & co. call ``input``)."""
        return next(v for v in [*self.args, *self.kwargs.values()] if isinstance(v, Tensor))

    @property
    def grad(self) -> Tensor:
        """The gradient of the (first) output tensor."""
        grad = self.output_grads[0]
        assert grad is not None
        return grad

    def name(self, param: Tensor | None) -> str | None:
        """The trainable parameter's name in the model, or None (frozen, absent)."""
        return None if param is None else self.names.get(id(param))


class LayerRule:
    """How the tape turns one call of a layer into per-example gradient contributions of its parameters."""

    #: the rule covers every trainable parameter below the layer (its sub-layers are not recorded separately)
    covers_submodules: bool = False
    #: the layer's forward returns tensors it creates (never an input, buffer or parameter): an output without
    #: gradient history (a first layer's) is then put on the graph as it is, not copied (:class:`_CaptureOutput`)
    fresh_outputs: bool = False

    def supports(self, module: nn.Module) -> str | None:
        """Why this rule cannot serve ``module`` (then the per-layer vmap fallback does), or None."""
        return None

    def refusal(self, module: nn.Module) -> str | None:
        """Why ``module`` can never be trained privately as it is (with the fix), or None."""
        return None

    def contributions(self, call: LayerCall) -> list[Contribution]:
        """The per-example contributions of this call to the layer's trainable parameters."""
        raise NotImplementedError

    def recorded_forward(self, module: nn.Module, tape: LayerwiseTape) -> Callable[..., Any] | None:
        """A forward to run instead of the layer's own while recording (it records its uses itself), or None."""
        return None

    def forward_state(self, module: nn.Module, output: Any) -> Any:
        """What the rule keeps from a recorded call's forward for its contributions, read when the layer returns
        (a norm layer's statistics, off its output's autograd node), or None; it reaches the rule as
        :attr:`LayerCall.forward_state`. Rules must not rely on it being there: it is None where the output has
        no autograd node of the expected kind (the layer's first call without gradients, another dtype...)."""
        return None


_BY_TYPE: dict[type, LayerRule] = {}
_BY_NAME: dict[str, LayerRule] = {}
R = TypeVar("R", bound=type[LayerRule])


def _qualified(layer_type: type) -> str:
    return f"{layer_type.__module__}.{layer_type.__qualname__}"


def register_layer(*layer_types: type[nn.Module] | str) -> Callable[[R], R]:
    """Class decorator: use this :class:`LayerRule` for layers of exactly these types (or qualified names)."""
    if not layer_types:
        raise TypeError("register_layer needs at least one layer type, e.g. @register_layer(nn.Linear)")

    def register(rule_class: R) -> R:
        rule = rule_class()
        for layer_type in layer_types:
            if isinstance(layer_type, str):
                _BY_NAME[layer_type] = rule
            elif isinstance(layer_type, type) and issubclass(layer_type, nn.Module):
                _BY_TYPE[layer_type] = rule
            else:
                raise TypeError(f"register_layer takes nn.Module subclasses or qualified names, got {layer_type!r}")
        return rule_class

    return register


def layer_class(module: nn.Module) -> type:
    """``module``'s class; for a module that FSDP2's ``fully_shard`` wrapped (its class becomes a subclass
    ``FSDP<Name>(FSDPModule, <Name>)``), the original class, whose rule still applies."""
    cls = type(module)
    bases = cls.__bases__
    if len(bases) == 2 and bases[0].__name__ == "FSDPModule" and cls.__name__ == f"FSDP{bases[1].__name__}":
        return bases[1]
    return cls


def rule_for(module: nn.Module) -> LayerRule | None:
    """The rule registered for ``module``'s exact type (or its qualified name), or None. None too for a module
    whose ``forward`` was replaced on the instance (``m.forward = ...``, as wrappers that patch a layer do): the
    rule knows its class's forward, not the replacement (one that clamps its input would get the gradients of
    the unclamped one), so the layer falls back alone like an unknown one."""
    if "forward" in vars(module):
        return None
    layer_type = layer_class(module)
    return _BY_TYPE.get(layer_type) or _BY_NAME.get(_qualified(layer_type))


def refusals(model: nn.Module) -> list[str]:
    """Every layer of ``model`` that a rule refuses, with the reason and the fix."""
    problems = []
    for name, module in model.named_modules():
        rule = rule_for(module)
        reason = rule.refusal(module) if rule is not None else None
        if reason:
            problems.append(f"{name or type(module).__name__} ({type(module).__name__}): {reason}")
    return problems
