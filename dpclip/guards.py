"""Checks that keep data from leaving outside DP-SGD's mechanism through the training loop itself.

- one live engine per model (two engines would each report only their own ε);
- the optimizer steps exactly the model's trainable parameters (an extra parameter, e.g. a learnable
  temperature in the loss, would be stepped with its raw batch gradient);
- no non-private gradient lands in a parameter's ``.grad`` (an eval-mode or unwrapped forward + backward);
- the model is called on the batch the private loader yielded (not another batch of the same size).
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten

from .errors import EngineUsageError, PrivacyParameterError
from .module import PrivateModule
from .optimizer import DPOptimizer, outside_parameters_message
from .validation import validate_model

Tensor = torch.Tensor
_OWNERS: dict[int, tuple[weakref.ref, weakref.ref]] = {}  # id(parameter) → (parameter, engine)


def claim_parameters(module: nn.Module, engine: object) -> None:
    """Refuse a model any of whose parameters a live engine already trains; else record this engine as owner."""
    for name, p in module.named_parameters():
        entry = _OWNERS.get(id(p))
        if entry is not None and entry[0]() is p and entry[1]() is not None and entry[1]() is not engine:
            raise EngineUsageError(
                f"parameter {name} is already trained by another live PrivacyEngine: two engines on one model would "
                "each charge only their own steps, so neither ε would be true. Use one engine per model (wrap the "
                "model once), or delete the first engine before creating another."
            )
    ref = weakref.ref(engine)
    for p in module.parameters():
        _OWNERS[id(p)] = (weakref.ref(p), ref)


def check_wrappable(managed: nn.Module | None, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """One model per engine; an optimizer or model wrapped once only."""
    if managed is not None:
        raise EngineUsageError("this PrivacyEngine already manages a model; create one engine per model")
    if getattr(optimizer, "_dpclip_wrapped", False) or isinstance(optimizer, DPOptimizer):
        raise EngineUsageError("this optimizer is already wrapped by a PrivacyEngine; wrap the original optimizer once")
    if isinstance(module, PrivateModule):
        raise EngineUsageError("this model is already wrapped by a PrivacyEngine; pass the original model")


def check_model(module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Layers that mix examples or write data into the model, layers a rule refuses, and the optimizer."""
    validate_model(module)
    check_optimizer(module, optimizer)


def check_optimizer(module: nn.Module, optimizer: torch.optim.Optimizer, parameters: Mapping[str, Tensor] | None = None) -> None:
    """The optimizer must hold every trainable parameter of the model and nothing outside the model.
    ``parameters``: the model's parameters by name, if not ``module.named_parameters()`` (FSDP2: its shards)."""
    if isinstance(optimizer, (torch.optim.LBFGS, torch.optim.SparseAdam)):
        raise PrivacyParameterError(
            f"{type(optimizer).__name__} cannot step a private gradient: "
            + ("LBFGS needs a closure that re-runs the forward pass on the batch, so its examples would count more "
               "than once" if isinstance(optimizer, torch.optim.LBFGS) else
               "SparseAdam takes sparse gradients only, and the noisy gradient is dense (noise reaches every row)")
            + "; use SGD, Adam, AdamW or another optimizer whose step() needs no closure"
        )
    named = dict(module.named_parameters()) if parameters is None else dict(parameters)
    model_ids = {id(p) for p in named.values()}
    held = [p for group in optimizer.param_groups for p in group["params"]]
    held_ids = {id(p) for p in held}
    outside = [p for p in held if id(p) not in model_ids]
    missing = [name for name, p in named.items() if p.requires_grad and id(p) not in held_ids]
    if outside and missing:
        raise PrivacyParameterError(
            f"the optimizer was built for another version of the model: it misses the trainable parameter(s) "
            f"{', '.join(missing[:5])} and holds {len(outside)} that the model no longer has (e.g. it was built "
            "before dpclip.fix_model replaced a layer). Build the optimizer from model.parameters() after changing "
            "the model."
        )
    if outside:
        raise PrivacyParameterError(outside_parameters_message("the optimizer holds", outside, "or leave them out of "
                                                               "the optimizer."))
    if missing:
        raise PrivacyParameterError(
            f"the optimizer does not hold the trainable parameter(s) {', '.join(missing[:5])}: they would never "
            "train. Build the optimizer from model.parameters() after changing the model (e.g. after "
            "dpclip.fix_model), or freeze them (requires_grad=False)."
        )


def refuse_nonprivate_gradients(module: nn.Module) -> list[Any]:
    """Hooks that refuse any gradient accumulated into the model's own ``.grad`` (the engine assigns, never
    accumulates): a backward through the model in eval mode or through the unwrapped model, or a loss term that
    uses a parameter directly."""

    def refuser(name: str) -> Any:
        def refuse(p: Tensor) -> None:
            p.grad = None
            raise EngineUsageError(
                f"a non-private gradient reached the model's parameter {name}: the private model only produces "
                "per-example gradients in training mode on the private loader's batches. Call model.train() before "
                "training (use model.eval() or torch.no_grad() only for evaluation, without backward), call the "
                "model returned by make_private, not model.module, and keep parameters out of the loss outside the "
                "model's forward (for an L2 penalty Σ‖p‖², use the optimizer's weight_decay: it acts on the "
                "released gradient, after the noise)."
            )

        return refuse

    return [p.register_post_accumulate_grad_hook(refuser(name)) for name, p in module.named_parameters() if p.requires_grad]


def _leaves(values: Any) -> list[Tensor]:
    return [t for t in tree_flatten(values)[0] if isinstance(t, Tensor)]


def _same_examples(given: Tensor, yielded: Tensor) -> bool:
    if given is yielded:
        return True
    if given.dim() == 0 or yielded.dim() == 0 or given.shape[0] != yielded.shape[0] or given.numel() != yielded.numel():
        return False
    try:
        with torch.no_grad():
            other = yielded.to(device=given.device, dtype=given.dtype)
            return bool(torch.equal(given.detach().reshape(other.shape), other))
    except (RuntimeError, NotImplementedError):  # tensors that cannot be compared (meta device...) do not match
        return False


def check_batch_is_yielded(module: nn.Module, args: tuple, kwargs: dict, yielded: Any) -> None:
    """At least one tensor the model is called with must be (a view, copy or cast of) one the loader yielded."""
    batch = _leaves(yielded)
    if not batch:
        return
    given = _leaves((args, kwargs))
    if any(_same_examples(g, y) for g in given for y in batch):
        return
    raise EngineUsageError(
        f"{type(module).__name__} was called on tensors that are not the batch the private data loader just yielded (another "
        "batch of the same size, or one transformed in the loop): only the loader's Poisson batches are what the "
        "accountant charges. Pass the loader's tensors to the model (moving them to a device or casting them is "
        "fine); do data augmentation in the data set, in collate_fn, or inside the model."
    )
