"""Refuse models whose layers mix examples within a batch (offer a fix); check that a loss is per-example."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn

from .errors import LossNotPerExampleError, ModelNotSupportedError, PrivacyParameterError
from .frozen_norm import FrozenBatchNorm, require_statistics
from .grads.registry import refusals
from .grads.rules.embedding import embedding_refusal
from .per_sample import batch_size_of, batched_parameter_forward, per_sample_grads, trainable_parameters
from .recurrent import convert as _convert_recurrent
from .recurrent import is_convertible as _is_convertible_recurrent

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_INSTANCE_NORMS = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
_RECURRENT = (nn.RNN, nn.LSTM, nn.GRU)


def model_problems(model: nn.Module) -> list[str]:
    """Reasons, one per offending layer, why ``model`` cannot be trained with per-example privacy, each with its
    fix: the checks ``make_private`` makes on the model before any data (verification on the first batch may still
    refuse a model that passes them)."""
    problems = []
    scripted: list[str] = []  # TorchScript modules already reported: their submodules are not reported again
    for name, layer in model.named_modules():
        where = name or type(model).__name__
        if any(name == s or name.startswith(s + ".") or s == "" for s in scripted):
            continue
        if isinstance(layer, torch.jit.RecursiveScriptModule):
            scripted.append(name)
            problems.append(
                f"{name or 'the model'} ({layer.original_name}) is a TorchScript module (torch.jit.script): dpclip "
                "follows each layer's inputs and outputs with forward hooks, and TorchScript modules take none; pass "
                "the eager module (torch.jit.script the trained model afterwards if you need it)"
            )
        elif isinstance(layer, _BATCH_NORMS) or isinstance(layer, nn.modules.batchnorm._LazyNormBase):
            problems.append(
                f"{where} ({type(layer).__name__}) normalises with statistics of the whole batch in training mode, "
                "so one example changes every other example's gradient"
                + ("" if layer.training else " (refused in eval mode too: the model trains in training mode, and "
                   "model.train() switches the layer back to batch statistics)")
                + "; "
                + ("run one forward pass first (the lazy layer then becomes a BatchNorm), then "
                   if isinstance(layer, nn.modules.lazy.LazyModuleMixin) and layer.has_uninitialized_params() else "")
                + "replace it by GroupNorm (dpclip.fix_model(model) does this) or, to keep pretrained statistics, "
                "freeze them (dpclip.fix_model(model, batchnorm='freeze'): a fixed per-channel affine map)"
            )
        elif isinstance(layer, nn.modules.lazy.LazyModuleMixin) and layer.has_uninitialized_params():
            problems.append(
                f"{where} ({type(layer).__name__}) is a lazy layer whose parameters do not exist yet (they are made "
                "on its first forward, after the optimizer and dpclip would have to know them); run one forward "
                "pass on a batch first (e.g. with torch.no_grad()), then build the optimizer and call make_private"
            )
        elif isinstance(layer, nn.EmbeddingBag) and (reason := embedding_refusal(layer)) is not None:
            problems.append(f"{where} (EmbeddingBag): {reason}")  # as nn.Embedding's rule refuses (no rule of its own)
        elif isinstance(layer, _INSTANCE_NORMS) and layer.track_running_stats:
            problems.append(
                f"{where} ({type(layer).__name__}) keeps running statistics updated from every example; use "
                "track_running_stats=False (dpclip.fix_model(model) does this)"
            )
        elif isinstance(layer, _RECURRENT):
            kind = next(t.__name__ for t in _RECURRENT if isinstance(layer, t))
            if getattr(layer, "proj_size", 0):
                problems.append(
                    f"{where} ({type(layer).__name__} with proj_size={layer.proj_size}) runs as one fused kernel "
                    "that per-example gradients cannot see into, and dpclip has no replacement for projected "
                    "LSTMs; use proj_size=0 (then dpclip.fix_model(model) replaces it by dpclip.recurrent.DPLSTM)"
                )
            elif _is_convertible_recurrent(layer):
                problems.append(
                    f"{where} ({kind}) runs as one fused kernel that per-example gradients cannot see into; "
                    f"dpclip.fix_model(model) replaces it by dpclip.recurrent.DP{kind} (same function, parameters "
                    "and state_dict keys)"
                )
            else:
                problems.append(
                    f"{where} ({type(layer).__name__}, a subclass of nn.{kind}) runs as one fused kernel that "
                    f"per-example gradients cannot see into; rebuild it on dpclip.recurrent.DP{kind} "
                    f"(dpclip.fix_model(model) replaces exact nn.{kind} layers only)"
                )
    problems.extend(
        f"parameter {name} is complex ({p.dtype}): dpclip measures gradient norms and draws noise for real "
        "coordinates, and a complex gradient would have its norm and its noise counted on the real part only; store "
        "it as a real parameter with a trailing dimension of 2 (real, imaginary) and use torch.view_as_complex on it "
        "in forward"
        for name, p in model.named_parameters() if p.requires_grad and p.is_complex()
    )
    problems.extend(refusals(model))  # what a layer rule refuses (Embedding max_norm / sparse, a user's rule)
    if not any(p.requires_grad for p in model.parameters()):
        problems.append("the model has no trainable parameters (every parameter has requires_grad=False)")
    return problems


def validate_model(model: nn.Module) -> None:
    """Raise :class:`ModelNotSupportedError` listing every reason :func:`model_problems` finds (layers that mix
    examples, fused recurrent layers, TorchScript modules, complex trainable parameters, layers a rule refuses, no
    trainable parameter): what ``make_private`` refuses before it looks at the data."""
    problems = model_problems(model)
    if problems:
        raise ModelNotSupportedError("model not supported for DP training:\n  - " + "\n  - ".join(problems))


def _group_count(channels: int) -> int:
    """Most groups (≤ 32) dividing ``channels`` with ≥ 2 channels each, so a group never normalises one value."""
    return next((g for g in (32, 16, 8, 4, 2) if channels % g == 0 and channels // g >= 2), 1)


def fix_model(model: nn.Module, batchnorm: str = "groupnorm") -> nn.Module:
    """Make ``model`` trainable with per-example privacy, in place; returns it.

    BatchNorm becomes GroupNorm (same channels, affine; ``batchnorm="groupnorm"``, the default) or, with
    ``batchnorm="freeze"``, a :class:`~dpclip.frozen_norm.FrozenBatchNorm` that keeps its running statistics
    fixed (the pretrained layer's eval-mode function in every mode, affine parameters still trained: for fine-tuning
    a pretrained network). InstanceNorm drops its running statistics, and ``nn.RNN``/``nn.LSTM``/``nn.GRU``
    become :class:`~dpclip.recurrent.DPRNN`/``DPLSTM``/``DPGRU`` (same function, weights and ``state_dict``
    keys; a layer shared by several sub-modules or names gets one replacement, shared the same way). If ``model``
    itself is such a layer, the replacement is returned (use the return value). Raises
    :class:`ModelNotSupportedError` for ``nn.LSTM(proj_size > 0)`` and, with "freeze", for a BatchNorm without
    running statistics; nothing is replaced then.
    """
    if batchnorm not in ("groupnorm", "freeze"):
        raise ValueError(f"batchnorm must be 'groupnorm' or 'freeze' (keep the running statistics), got {batchnorm!r}")
    unfixable = [
        f"{name or type(layer).__name__} (LSTM with proj_size={layer.proj_size})"
        for name, layer in model.named_modules()
        if _is_convertible_recurrent(layer) and getattr(layer, "proj_size", 0)
    ]
    if unfixable:  # refused before anything is replaced, so the model is left as it was
        raise ModelNotSupportedError(
            f"{', '.join(unfixable)}: dpclip has no private replacement for LSTMs with a projection; "
            "use proj_size=0 (e.g. with a smaller hidden_size, or an nn.Linear on the outputs)"
        )
    if batchnorm == "freeze":
        for name, layer in model.named_modules():  # every statistic exists before anything is replaced
            if isinstance(layer, _BATCH_NORMS):
                require_statistics(layer, name or type(model).__name__)
    replacement = _replacement(model, type(model).__name__, batchnorm)
    if replacement is not None:
        return replacement
    _fix_children(model, "", batchnorm, {})
    return model


def _replacement(layer: nn.Module, where: str, batchnorm: str) -> nn.Module | None:
    """What :func:`fix_model` puts in place of ``layer`` (None: keep it, fixing its children)."""
    if isinstance(layer, _BATCH_NORMS):
        if batchnorm == "freeze":
            return FrozenBatchNorm.from_batchnorm(layer, where)
        channels = layer.num_features
        return nn.GroupNorm(_group_count(channels), channels, affine=layer.affine, eps=layer.eps)
    if isinstance(layer, _INSTANCE_NORMS) and layer.track_running_stats:
        return type(layer)(layer.num_features, eps=layer.eps, affine=layer.affine, track_running_stats=False)
    if _is_convertible_recurrent(layer):
        return _convert_recurrent(layer, where)  # type: ignore[arg-type]
    return None


def _fix_children(model: nn.Module, prefix: str, batchnorm: str,
                  done: dict[int, tuple[nn.Module, nn.Module | None]]) -> None:
    """Replace ``model``'s children in place, each module once: a layer registered in several places (shared by
    two sub-modules, or under two names) gets one replacement everywhere, so tied weights stay tied. ``done``
    maps id(module) to (the module, kept alive while ids are compared, and its replacement or None)."""
    for name, child in list(model._modules.items()):  # (named_children() skips a second name of the same child)
        if child is None:
            continue
        if id(child) not in done:
            done[id(child)] = (child, _replacement(child, prefix + name, batchnorm))
            if done[id(child)][1] is None:
                _fix_children(child, f"{prefix}{name}.", batchnorm, done)
        replacement = done[id(child)][1]
        if replacement is not None:
            setattr(model, name, replacement)


def check_loss(
    model: nn.Module,
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor],
    inputs: torch.Tensor | Sequence[torch.Tensor],
    targets: torch.Tensor,
    loss_reduction: str = "mean",
    rtol: float = 1e-4,
    atol: float = 1e-6,
) -> None:
    """Check on one batch that ``loss_fn`` is what the engine assumes: the mean (or sum) of per-example losses.

    The engine clips each example's gradient of *your* batch loss; that bounds one example's influence only if
    the loss of example i depends on example i alone. This compares, for every example, the gradient of
    ``loss_fn(model(inputs), targets)`` with respect to that example's copy of the parameters (what the engine
    clips) against the gradient of ``loss_fn`` on that example alone, and raises
    :class:`LossNotPerExampleError` if they differ: a loss that normalises with batch statistics or compares
    examples with each other, or a ``loss_reduction`` that does not match the criterion. The engine cannot make
    this check itself (it never sees the loss); call it once before training. Dropout is switched off for the
    check; needs a batch of at least 2 examples.
    """
    if loss_reduction not in ("mean", "sum"):
        raise PrivacyParameterError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
    args = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    batch = batch_size_of(args, {})
    if batch < 2:
        raise PrivacyParameterError(f"check_loss needs a batch of at least 2 examples to see them interact, got {batch}")
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        alone = per_sample_grads(model, loss_fn, args, targets)
        leaves = {n: p.detach().expand(batch, *p.shape).requires_grad_() for n, p in trainable_parameters(model).items()}
        loss = loss_fn(batched_parameter_forward(model, leaves, args, {}), targets)
        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        together = {n: torch.zeros_like(leaf) if g is None else g for (n, leaf), g in zip(leaves.items(), grads)}
    finally:
        for m, mode in modes.items():
            m.training = mode
    scale = float(batch) if loss_reduction == "mean" else 1.0
    refuse_unless_per_example([(together[name] * scale, alone[name]) for name in leaves], batch, loss_reduction,
                              "the loss", "loss_reduction={!r} to make_private", rtol, atol)


def refuse_unless_per_example(pairs: list[tuple[torch.Tensor, torch.Tensor]], batch: int, loss_reduction: str,
                              subject: str, setting: str, rtol: float, atol: float) -> None:
    """Raise :class:`LossNotPerExampleError` unless, in every pair, the gradient for example i of the batch loss
    (times B for a mean) equals the gradient of example i's loss alone: the loss is then a mean (or sum) of
    per-example losses, and clipping each example's gradient bounds its influence. Where they agree up to a factor
    B or 1/B, the message names the reduction to declare (``setting``, formatted with it); ``subject`` names the
    loss."""

    def matches(factor: float) -> bool:
        return all(torch.allclose(g * factor, a, rtol=rtol, atol=atol) for g, a in pairs)

    if matches(1.0):
        return
    for factor, actual, fix in ((1.0 / batch, "sums", "sum"), (float(batch), "averages", "mean")):
        if matches(factor):
            raise LossNotPerExampleError(
                f"{subject} {actual} over the batch's examples but loss_reduction={loss_reduction!r}: pass "
                f"{setting.format(fix)} or change its reduction (otherwise each example's gradient is off by a factor "
                "of the batch size before clipping)"
            )
    raise LossNotPerExampleError(
        f"with {subject}, the loss of one example depends on the other examples of the batch (e.g. it normalises with "
        "batch statistics, takes a token mean over all the batch's tokens, or compares examples with each other): "
        "clipping each example's gradient would not bound its influence, so DP-SGD cannot account it. Compute a loss "
        "per example (e.g. each example's token mean) and reduce it over the examples with mean (or sum)."
    )
