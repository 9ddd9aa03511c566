"""The layerwise tape: per-example gradients from each layer's inputs and output gradients.

The model runs its ordinary batched forward with its trainable parameters switched to ``requires_grad=False``,
so autograd computes activation gradients only. A forward hook on every layer with trainable parameters
(registered first, so users' hooks see what it returns) records the call and attaches a gradient hook to the
layer's output; when the user's ``loss.backward()`` ends, each call's :class:`~dpclip.grads.LayerRule` turns
(inputs, output gradient) into per-example norms and clipped sums (:class:`LayerwiseGradients`).

Where the examples sit in each call is a *layout*: the dim of the input and of the output that holds the
batch, or "shared" for a call on tensors without examples (a position table: its output is broadcast over the
batch later, so the tape expands it to one copy per example and each copy's gradient is that example's).
Layouts are learnt on a probe batch whose size matches no other dim of the model (see
:mod:`dpclip.grads.verify`) and then pinned, so a batch whose size happens to equal a sequence length is never
mistaken for one; calls that contradict a pinned layout are refused.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..clipping import Norm
from ..errors import EngineUsageError, LossNotPerExampleError, ModelNotSupportedError, PrivacyBudgetExceeded
from ..hooks import EngineHook
from ..norms import clip_norm
from . import rules as _rules  # noqa: F401  (registers the built-in rules)
from .contributions import CacheBudget, Contribution, LinearWeight, Summed, vector_norms
from .registry import LayerCall, LayerRule, float_leaves, rule_for
from .rules.fallback import VmapLayerRule

Tensor = torch.Tensor


class LayoutError(ModelNotSupportedError):
    """A layer call's examples are not where the tape can find them (or not where they were on the probe)."""


@dataclass(frozen=True)
class Layout:
    """Where a layer call holds the examples: input dim and output dim, or ``shared`` (no examples)."""

    shared: bool
    in_dim: int = 0
    out_dim: int = 0
    batched_args: tuple[bool, ...] = ()


def _per_example(t: Tensor, batch: int) -> Tensor:
    """A shared tensor as one (stride-0) copy per example: [1, ...] → [batch, ...], else [batch, *shape]."""
    if t.dim() > 0 and t.shape[0] == 1:
        return t.expand(batch, *t.shape[1:])
    return t.unsqueeze(0).expand(batch, *t.shape)


def _tensors_in(value: Any) -> list[Tensor]:
    """The tensors of a layer argument: itself, or those inside plain tuples, lists and dicts (an LSTMCell's
    ``(h, c)``), in order. Other containers (a PackedSequence, a user's object) count as one opaque value."""
    if isinstance(value, Tensor):
        return [value]
    if type(value) in (tuple, list):
        return [t for item in value for t in _tensors_in(item)]
    if type(value) is dict:
        return [t for item in value.values() for t in _tensors_in(item)]
    return []


def _nested_map(fn: Callable[[Any], Any], value: Any) -> Any:
    """``fn`` applied to every value that is not a plain tuple, list or dict, keeping those containers."""
    if type(value) in (tuple, list):
        return type(value)(_nested_map(fn, item) for item in value)
    if type(value) is dict:
        return {k: _nested_map(fn, item) for k, item in value.items()}
    return fn(value)


def _statistics_dtype(module: nn.Module) -> torch.dtype | None:
    """The precision a call's statistics are formed in: the widest of float32 and the layer's floating parameters
    (for a row block, the weight it stands for). Under autocast the activations and output gradients are bf16 or
    fp16; promoted, the rules' per-example norms, clipping factors and clipped sums are still float32 or wider
    (a bf16 factor alone could round above min(1, C/‖g‖) by 2^-9). None for a call without parameters."""
    tensors = [module.w, module.b] if isinstance(module, _RowBlock) else list(module.parameters())
    dtypes = [t.dtype for t in tensors if t is not None and t.is_floating_point()]
    return functools.reduce(torch.promote_types, dtypes, torch.float32) if dtypes else None


class _CaptureOutput(torch.autograd.Function):
    """Identity that puts a tensor without gradient history on the autograd graph in place: marked dirty, the
    same tensor comes back with this node as its ``grad_fn``, so a hook on it receives the output's gradient (the
    anchor, a scalar that requires grad, makes the node record). Unlike ``detach().requires_grad_()`` it is not a
    leaf, so the model may still modify it in place (``nn.ReLU(inplace=True)``), and unlike ``clone()`` nothing is
    copied. Only for outputs the layer created (:attr:`LayerRule.fresh_outputs`) and that are not views."""

    @staticmethod
    def forward(ctx: Any, output: Tensor, anchor: Tensor) -> Tensor:
        ctx.mark_dirty(output)
        return output

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


_ANCHOR = torch.zeros((), requires_grad=True)  # never receives a gradient (the node returns None for it)


#: Raised inside a layer's per-example work but not a failure of it: passed on as they are.
_PASSED_ON = (ModelNotSupportedError, EngineUsageError, MemoryError, torch.OutOfMemoryError)


@contextmanager
def refusing(where: str) -> Iterator[None]:
    """Per-example work of the layer or parameter ``where`` (a rule's contributions when backward ends, or the
    norms and clipped sums they form later): a failure inside torch reaches the user as dpclip's refusal, naming
    it and the fixes, never as torch's own error."""
    try:
        yield
    except _PASSED_ON:
        raise
    except Exception as error:
        raise ModelNotSupportedError(
            f"{where}: per-example gradients failed with {type(error).__name__}: {error}. Register a rule for this "
            "layer (dpclip.register_layer), replace it (dpclip.fix_model replaces recurrent layers and BatchNorm), "
            "or freeze its parameters."
        ) from error


def modified_input_error(what: str) -> EngineUsageError:
    """The refusal when ``what`` (an input a forward read) changed in place before its backward."""
    return EngineUsageError(
        f"{what} was modified in place after the forward used it (e.g. loss = mse(model(x), x.clamp_(0, 1))): its "
        "per-example gradients would be computed from the modified values (plain PyTorch refuses this too where it "
        "saved the input). Modify a copy (x.clamp(0, 1)) or do it before the forward. Nothing was applied."
    )


class _Use:
    """One call of a recorded layer; its output gradients arrive in backward."""

    def __init__(self, tape: LayerwiseTape, where: str, module: nn.Module, rule: LayerRule, call_args: tuple, call_kwargs: dict, layout: Layout, main: Tensor) -> None:
        self.tape, self.where, self.module, self.rule = tape, where, module, rule
        self.args, self.kwargs, self.layout, self.main = call_args, call_kwargs, layout, main
        self.grads: list[Tensor | None] = []
        self.forward_state: Any = None  # what the rule kept from the forward (LayerRule.forward_state)
        self.released = False
        # the inputs' version counters (shared with the caller's tensors), which the rule reads in backward; a layer
        # with a rule whose only trainable parameters are biases (BitFit) needs its output gradients alone
        biases_only = not isinstance(rule, VmapLayerRule) and id(module) in tape.biases_only
        self.versions = [] if biases_only else [(t, t._version) for t in _tensors_in([*call_args, *call_kwargs.values()])]

    def capture(self, output: Any) -> Any:
        """The output with a gradient hook on each floating tensor (expanded per example for a shared call)."""
        leaves, spec = tree_flatten(output)
        out = []
        bases = [id(leaf._base) for leaf in leaves if isinstance(leaf, Tensor) and leaf._is_view()]
        for leaf in leaves:
            if isinstance(leaf, Tensor) and leaf.is_floating_point():
                index = len(self.grads)
                self.grads.append(None)
                if self.layout.shared:
                    leaf = _per_example(leaf, self.tape.batch)
                if not leaf.requires_grad:  # e.g. the first layer: its inputs and (switched-off) weights need none
                    if self.rule.fresh_outputs and not leaf._is_view():
                        leaf = _CaptureOutput.apply(leaf, _ANCHOR)  # the layer's own tensor: on the graph, no copy
                        leaf.register_hook(self._hook(index))
                    else:
                        base = leaf.detach().requires_grad_()
                        base.register_hook(self._hook(index))
                        leaf = base.clone()
                elif (leaf._is_view() and not self.layout.shared and bases.count(id(leaf._base)) == 1
                      and leaf._base.is_contiguous() and not self._aliases_inputs(leaf)):
                    # A hook on a view never fires once a later op modifies the view in place, and many layer
                    # outputs are views of a tensor the layer made (F.linear with a bias on [B, T, d], InstanceNorm,
                    # batch-first attention): a masked_fill_ or clamp_ acting on a later batch only dropped the
                    # layer's gradients from that step's release. The hook goes on the view's base instead (its old
                    # version's gradient, read through the view's strides), which fires either way; no copy.
                    leaf._base.register_hook(self._through_view(index, leaf))
                else:
                    leaf.register_hook(self._hook(index))
            out.append(leaf)
        self.tape.uses.append(self)
        return tree_unflatten(out, spec)

    def _aliases_inputs(self, view: Tensor) -> bool:
        """Whether ``view`` shares memory with the call's inputs or the layer's own tensors (a layer returning a
        view of its input or of a parameter): its base is then not the layer's alone, so the hook stays on it."""
        module = self.module
        own = [*module.parameters(), *module.buffers()] if isinstance(module, nn.Module) else []
        pointer = view.untyped_storage().data_ptr()
        return any(t.untyped_storage().data_ptr() == pointer for t in [*_tensors_in([*self.args, *self.kwargs.values()]), *own])

    def _through_view(self, index: int, view: Tensor) -> Callable[[Tensor], None]:
        """The hook for output ``index`` placed on its (contiguous) base: the base's gradient, read at the view's
        size, strides and offset."""
        size, stride, offset = view.size(), view.stride(), view.storage_offset() - view._base.storage_offset()
        on_grad = self._hook(index)

        def on_base_grad(grad: Tensor) -> None:
            whole = grad.contiguous()  # the base's layout (contiguous); it may itself start past its storage's start
            on_grad(whole.as_strided(size, stride, whole.storage_offset() + offset))

        return on_base_grad

    def _hook(self, index: int) -> Callable[[Tensor], None]:
        def on_grad(grad: Tensor) -> None:
            if self.released or self.grads[index] is not None or self.tape.finished:
                raise EngineUsageError(
                    "backward ran twice through the same forward: each example's gradient would count twice. "
                    "Run one forward per batch and call backward on it once."
                )
            self.grads[index] = grad.detach()
            self.tape.on_backward()

        return on_grad

    def call(self, budget: CacheBudget | None = None) -> LayerCall:
        """The batch-first view of this call that rules read (``budget``: the step's, shared by every call)."""
        layout, batch = self.layout, self.tape.batch
        dtype = _statistics_dtype(self.module)

        def promote(t: Tensor) -> Tensor:  # autocast: statistics in float32 or the parameters' wider precision
            return t.to(dtype) if dtype is not None and t.is_floating_point() and t.dtype != dtype else t

        if layout.shared:
            grads = [None if g is None else promote(g) for g in self.grads]
            main = promote(_per_example(self.main, batch))
            args, kwargs = self.args, self.kwargs
            in_dims: tuple[Any, Any] = (tuple(None for _ in args), {k: None for k in kwargs})
        else:
            grads = [None if g is None else promote(g.movedim(layout.out_dim, 0)) for g in self.grads]
            main = promote(self.main.movedim(layout.in_dim, 0))
            flags = iter(layout.batched_args)

            def arrange_leaf(v: Any) -> tuple[Any, Any]:
                if not isinstance(v, Tensor):
                    return v, None
                batched = next(flags)
                return (promote(v.movedim(layout.in_dim, 0)), 0) if batched else (promote(v), None)

            def arrange(v: Any) -> tuple[Any, Any]:  # a tensor, or a plain tuple/list/dict of them (an LSTM's (h, c))
                if type(v) in (tuple, list) and _tensors_in(v):
                    pairs = [arrange(item) for item in v]
                    return type(v)(p[0] for p in pairs), type(v)(p[1] for p in pairs)
                if type(v) is dict and _tensors_in(v):
                    pairs_of = {k: arrange(item) for k, item in v.items()}
                    return {k: p[0] for k, p in pairs_of.items()}, {k: p[1] for k, p in pairs_of.items()}
                return arrange_leaf(v)

            pairs = [arrange(v) for v in self.args]
            kw_pairs = {k: arrange(v) for k, v in self.kwargs.items()}
            args = tuple(p[0] for p in pairs)
            kwargs = {k: p[0] for k, p in kw_pairs.items()}
            in_dims = (tuple(p[1] for p in pairs), {k: p[1] for k, p in kw_pairs.items()})
        return _BoundCall(
            module=self.module, module_name=self.where, args=args, kwargs=kwargs, in_dims=in_dims,
            output_grads=grads, batch=batch, names=self.tape.names,
            layout_dims=None if layout.shared else (layout.in_dim, layout.out_dim),
            unsqueeze=not layout.shared, budget=budget, forward_state=self.forward_state, main_input=main,
        )

    def release(self) -> None:
        """Drop the recorded inputs and output gradients (the contributions hold what they need). The gradient
        hooks on the graph's tensors keep this object alive as long as the user keeps the loss, often into the
        next step: holding them here would keep a whole step's activations and output gradients alive too."""
        self.released = True
        self.args, self.kwargs, self.main, self.grads = (), {}, None, [None] * len(self.grads)  # type: ignore[assignment]
        self.versions, self.forward_state = [], None

    def contributions(self, budget: CacheBudget | None = None) -> list[Contribution]:
        if all(g is None for g in self.grads):
            return []
        if any(t._version != version for t, version in self.versions):
            raise modified_input_error(f"an input of {self.where} ({type(self.module).__name__})")
        with refusing(f"{self.where} ({type(self.module).__name__})"):
            return self.rule.contributions(self.call(budget))


@dataclass
class _BoundCall(LayerCall):
    main_input: Tensor | None = None

    @property
    def input(self) -> Tensor:
        assert self.main_input is not None
        return self.main_input


class LayerwiseTape:
    """Hooks on a model's layers with trainable parameters; one forward + backward → :class:`LayerwiseGradients`."""

    def __init__(self, model: nn.Module, kept_bytes: int | None = None) -> None:
        """``kept_bytes``: the step's budget for per-example gradients kept between the norms and the clipped sum
        (None: :attr:`LayerwiseGradients.cache_bytes`; 0 keeps none, the least memory)."""
        self.model = model
        self.kept_bytes = kept_bytes
        self.recording = False
        self.finished = True
        self.uses: list[_Use] = []
        self.batch = 0
        self.probe = False
        self.layouts: dict[tuple[str, int], Layout] = {}  # by (layer, number of tensor arguments)
        self.consume: Callable[[LayerwiseGradients], None] | None = None
        self._queued = False
        self._handles: list[Any] = []
        self.rebuild()

    def rebuild(self) -> None:
        """(Re)read which parameters are trainable and which layers record them; forgets learnt layouts."""
        for handle in self._handles:
            handle.remove()
        model = self.model
        self.names = {id(p): name for name, p in model.named_parameters() if p.requires_grad}
        self.module_names = {id(m): name for name, m in model.named_modules()}
        # layers whose trainable parameters are all biases (BitFit): their rules read no input in backward
        self.biases_only = {id(m) for m in model.modules() if all(
            name.rsplit(".", 1)[-1] == "bias" for name, p in m.named_parameters() if id(p) in self.names)}
        self.layouts = {}
        self._replaced: list[tuple[nn.Module, LayerRule]] = []
        # every layer whose calls are recorded (hooked or replaced), with the parameters its rule covers
        self._recorded: list[tuple[nn.Module, frozenset[int]]] = []
        self._handles = []
        covered: set[int] = set()
        for name, module in model.named_modules():
            if id(module) in covered:
                continue
            rule = rule_for(module)
            reason = rule.supports(module) if rule is not None else None
            if rule is not None and reason is None and rule.recorded_forward(module, self) is not None:
                if not self._trainable(module, recurse=True):
                    continue
                self._replaced.append((module, rule))
                self._recorded.append((module, frozenset(id(p) for p in module.parameters())))
            elif rule is not None and rule.covers_submodules:
                if not self._trainable(module, recurse=True):
                    continue
                rule = rule if reason is None else VmapLayerRule(covers_submodules=True)
                self._hook_module(name, module, rule, recurse=True)
            else:
                if not self._trainable(module, recurse=False):
                    continue
                self._hook_module(name, module, rule if rule is not None and reason is None else VmapLayerRule(), recurse=False)
                continue
            covered.update(id(m) for m in module.modules())

    def _trainable(self, module: nn.Module, recurse: bool) -> bool:
        return any(p.requires_grad for p in module.parameters(recurse=recurse))

    def _hook_module(self, name: str, module: nn.Module, rule: LayerRule, recurse: bool) -> None:
        def hook(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            return self._record(name or type(mod).__name__, mod, rule, args, kwargs, output)

        self._handles.append(module.register_forward_hook(EngineHook(hook), with_kwargs=True, prepend=True))
        self._recorded.append((module, frozenset(id(p) for p in module.parameters(recurse=recurse))))

    # -- recording ---------------------------------------------------------------------------------
    def forward(self, module: nn.Module, args: tuple, kwargs: dict, batch: int, consume: Callable[[LayerwiseGradients], None], probe: bool = False) -> Any:
        """Run ``module`` on a batch of ``batch`` examples, recording; ``probe``: learn (pin) the layouts."""
        trainable = [p for p in module.parameters() if p.requires_grad]
        self.uses, self.batch, self.consume, self.probe = [], batch, consume, probe
        self.finished, self.recording = False, True
        try:
            for p in trainable:
                p.requires_grad_(False)
            for layer, rule in self._replaced:  # an instance attribute shadows the class's forward for this call
                layer.forward = rule.recorded_forward(layer, self)  # type: ignore[method-assign]
            if not probe:
                return module(*args, **kwargs)
            with _OutsideUses(self._recorded, self.names) as watch:
                out = self._run_probe(module, args, kwargs)
            watch.check()
            return out
        finally:
            for p in trainable:
                p.requires_grad_(True)
            for layer, _ in self._replaced:
                layer.__dict__.pop("forward", None)
            self.recording = False

    def _run_probe(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        """The model's forward on the probe; a torch error after a shared call was given its batch dim is refused
        naming that call (later forwards run what the probe passed)."""
        try:
            return module(*args, **kwargs)
        except (EngineUsageError, LossNotPerExampleError, ModelNotSupportedError, PrivacyBudgetExceeded):
            raise
        except (RuntimeError, IndexError, ValueError) as error:
            shared = sorted({use.where for use in self.uses if use.layout.shared})
            if not shared:
                raise
            raise ModelNotSupportedError(
                f"{type(error).__name__} in the model's forward after the layerwise path gave the output of "
                f"{', '.join(shared)} one copy per example: {error}. Such a layer is called on tensors that hold no "
                "examples (a table looked up on positions, a relative-position bias), so its output is shared by the "
                "batch; the layerwise path adds a leading dim of the batch's size to it, so that each example gets "
                "its own gradient, and code that then reorders or reshapes that output's dims (a permute, a view) "
                "cannot take the extra dim. Use grad_sample_mode='auto' (or 'vmap'): the vmap path runs each "
                "example alone and adds no dim. Or call the layer on inputs that hold the batch (e.g. "
                "positions.expand(batch, *positions.shape)) and write the code after it for that dim."
            ) from error

    def _layout(self, where: str, main: Tensor, output: Tensor, leaves: list[Tensor]) -> Layout:
        batch = self.batch
        if self.probe:
            in_dims = [d for d, s in enumerate(main.shape) if s == batch]
            out_dims = [d for d, s in enumerate(output.shape) if s == batch]
            if not in_dims and not out_dims:
                layout = Layout(shared=True)
            elif len(in_dims) == 1 and len(out_dims) == 1:
                d = in_dims[0]
                layout = Layout(False, d, out_dims[0], tuple(t.dim() > d and t.shape[d] == batch for t in leaves))
            else:
                raise LayoutError(
                    f"{where}: cannot tell which dim of its input {tuple(main.shape)} / output {tuple(output.shape)} "
                    f"holds the {batch} examples"
                )
            # pinned per number of tensor arguments: a cell stepped in a loop is called without a state, then with one
            pinned = self.layouts.setdefault((where, len(leaves)), layout)
            if pinned != layout:
                raise LayoutError(f"{where}: called with examples laid out differently in one forward ({pinned} and {layout})")
            return layout
        layout = self.layouts.get((where, len(leaves)))
        if layout is None and any(name == where for name, _ in self.layouts):
            raise LayoutError(f"{where}: called with other arguments than on the verified probe")
        if layout is None:  # not verified (verify="off"): the examples must be in dim 0 of everything
            if main.dim() == 0 or main.shape[0] != batch or output.dim() == 0 or output.shape[0] != batch:
                raise LayoutError(
                    f"{where}: its input {tuple(main.shape)} / output {tuple(output.shape)} do not hold the {batch} "
                    "examples in dim 0 (verification, which learns other layouts, is off)"
                )
            return Layout(False, 0, 0, tuple(t.dim() > 0 and t.shape[0] == batch for t in leaves))
        if not layout.shared:
            if main.dim() <= layout.in_dim or main.shape[layout.in_dim] != batch or output.dim() <= layout.out_dim or output.shape[layout.out_dim] != batch:
                raise LayoutError(
                    f"{where}: its input {tuple(main.shape)} / output {tuple(output.shape)} no longer hold the {batch} "
                    f"examples in dims {layout.in_dim} / {layout.out_dim}, where the verified probe found them"
                )
        return layout

    def _check_not_recomputed(self, where: str) -> None:
        """A recorded layer running with gradients on inside the backward of a step still to finish is gradient
        checkpointing's recompute (``torch.utils.checkpoint``): the recorded graph and the recomputed one differ
        (torch would stop with its own CheckpointError), so it is refused here, by name. Verification refuses a
        model that always checkpoints; this catches one that checkpoints only on some batches. (A custom backward
        that calls a layer under ``no_grad`` is not a recompute and passes.)"""
        if self.uses and not self.finished and torch.is_grad_enabled() and torch._C._current_graph_task_id() != -1:
            raise ModelNotSupportedError(
                f"{where} ran again inside backward: gradient checkpointing (torch.utils.checkpoint) recomputes "
                "layers the layerwise path records, which dpclip does not support. Nothing of this batch was "
                "released. Remove the checkpointing (if memory is why it is there, grad_sample_mode='vmap' with a "
                "smaller chunk_size bounds it) and start again from your last checkpoint"
            )

    def _record(self, where: str, module: nn.Module, rule: LayerRule, args: tuple, kwargs: dict, output: Any) -> Any:
        if not self.recording or not torch.is_grad_enabled():
            self._check_not_recomputed(where)
            return None
        leaves = _tensors_in([*args, *kwargs.values()])  # as _Use.call arranges them
        outputs = float_leaves(output)
        if not leaves or not outputs:
            raise LayoutError(f"{where}: a layer with trainable parameters must take tensor arguments and return tensors")
        main = leaves[0]
        layout = self._layout(where, main, outputs[0], leaves)
        detach = lambda v: v.detach() if isinstance(v, Tensor) else v  # noqa: E731
        use = _Use(self, where, module, rule, _nested_map(detach, args), {k: _nested_map(detach, v) for k, v in kwargs.items()}, layout, main.detach())
        use.forward_state = rule.forward_state(module, output)
        return use.capture(output)

    def record_linear(self, where: str, x: Tensor, weight: Tensor, bias: Tensor | None, rows: slice | None) -> Tensor:
        """F.linear on a row block of a parameter, recorded as a use (attention projections); examples in dim 0."""
        w = weight if rows is None else weight[rows]
        b = None if bias is None else (bias if rows is None else bias[rows])
        out = F.linear(x, w, b)
        if not self.recording or not torch.is_grad_enabled():
            self._check_not_recomputed(where)
            return out
        if x.shape[0] != self.batch:
            raise LayoutError(f"{where}: its input {tuple(x.shape)} does not hold the {self.batch} examples in dim 0")
        use = _Use(self, where, _RowBlock(weight, bias, rows), _ROW_BLOCK_RULE, (x.detach(),), {}, Layout(False, 0, 0, (True,)), x.detach())
        return use.capture(out)

    # -- end of backward -----------------------------------------------------------------------------
    def on_backward(self) -> None:
        if not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self.finish)

    def finish(self) -> None:
        """Build the per-example statistics (calls that got no gradient contribute zero) and hand them over."""
        self._queued = False
        if self.finished:
            return
        self.finished = True
        uses, self.uses = self.uses, []
        budget = CacheBudget(LayerwiseGradients.cache_bytes if self.kept_bytes is None else self.kept_bytes)
        parts: list[Contribution] = []
        for use in uses:
            parts.extend(use.contributions(budget))
            use.release()
        del uses
        gradients = LayerwiseGradients(self.batch, list(self.names.values()), parts, self.model, budget)
        del parts  # the weighted sum releases each layer's activations and output gradients as it goes
        consume, self.consume = self.consume, None  # (the model's hooks keep the tape alive, not the consumer)
        if consume is not None:
            consume(gradients)


# Ops that read only a parameter's shape, dtype or device (or no gradient flows through them): not uses.
_TEMPLATE_OPS = {"new_zeros", "new_ones", "new_empty", "new_full", "new_tensor", "zeros_like", "ones_like",
                 "empty_like", "full_like", "rand_like", "randn_like", "randint_like", "detach"}
_AS_TEMPLATE_OPS = {"to", "type_as", "view_as", "reshape_as", "expand_as"}  # another tensor made like the parameter


def _tensor_attributes(module: nn.Module) -> dict[str, int]:
    """The floating tensors held as plain attributes of ``module`` (not parameters or buffers), by name: id."""
    return {k: id(v) for k, v in vars(module).items() if isinstance(v, Tensor) and v.is_floating_point()}


class _Derived:
    """Tensors derived from some trainable parameters (by id, with a weak reference to tell a reused id apart)."""

    def __init__(self) -> None:
        self.items: dict[int, tuple[weakref.ref, frozenset[str]]] = {}

    def sources(self, t: Tensor) -> frozenset[str]:
        entry = self.items.get(id(t))
        return entry[1] if entry is not None and entry[0]() is t else frozenset()

    def add(self, t: Tensor, names: frozenset[str]) -> None:
        self.items[id(t)] = (weakref.ref(t), names | self.sources(t))

    def alive(self) -> set[str]:
        return {name for ref, names in self.items.values() if ref() is not None for name in names}


class _OutsideUses(TorchFunctionMode):
    """Watches a probe's forward for values of trainable parameters that reach the loss other than through the
    outputs of the recorded layers that own them, which is all the tape sees gradients at (such a term's gradient
    would be dropped):

    - a parameter used where no recorded layer covering it runs (``x @ layer.weight.T`` in a parent module, a
      user's forward hook on the layer), if what it was used for outlives the forward — it feeds the output, or is
      stored on the model or elsewhere (a logged ``float(weight.norm())`` does not);
    - a recorded layer that stores on itself, while it runs, a tensor derived from its own parameters other than
      through its output (``self.reg = self.weight.pow(2).sum()``; a ``.detach()``-ed cache is fine).

    A layer is running from its first forward pre-hook (so torch's weight_norm and pruning hooks, which form the
    weight, count) to its own forward's end (so the user's forward hooks do not). Only ops with gradients enabled
    that return floating tensors carry a parameter's value, and not those that read only its shape, dtype or
    device (``weight.new_zeros(...)``, ``x.to(weight)``, ``.data``, ``.detach()``)."""

    def __init__(self, recorded: list[tuple[nn.Module, frozenset[int]]], trainable: dict[int, str]) -> None:
        super().__init__()
        self.trainable, self.stored = trainable, []
        self.outside = _Derived()
        self.running: list[tuple[frozenset[int], dict[str, int], _Derived]] = []
        self._handles = []
        for module, covers in recorded:
            self._handles.append(module.register_forward_pre_hook(self._enter(covers), prepend=True))
            self._handles.append(module.register_forward_hook(self._leave, prepend=True, always_call=True))

    def _enter(self, covers: frozenset[int]) -> Callable[[nn.Module, Any], None]:
        def enter(module: nn.Module, args: Any) -> None:
            self.running.append((covers, _tensor_attributes(module), _Derived()))

        return enter

    def _leave(self, module: nn.Module, args: Any, output: Any) -> None:
        _, before, own = self.running.pop()
        for name, value in vars(module).items():
            if isinstance(value, Tensor) and before.get(name) != id(value) and own.sources(value):
                if (where := f"{type(module).__name__}.{name}") not in self.stored:
                    self.stored.append(where)

    def __exit__(self, *exc: Any) -> Any:
        for handle in self._handles:
            handle.remove()
        return super().__exit__(*exc)

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if not torch.is_grad_enabled() or name in _TEMPLATE_OPS or func == Tensor.data.__get__:
            return out
        results = [t for t in tree_flatten(out)[0] if isinstance(t, Tensor) and t.is_floating_point()]
        if not results:
            return out
        leaves = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)]
        if name in _AS_TEMPLATE_OPS:
            leaves = leaves[:1]  # the other tensor serves as a template only
        covers, own = (self.running[-1][0], self.running[-1][2]) if self.running else (frozenset(), None)
        outside, inside = frozenset(), frozenset()
        for t in leaves:
            outside |= self.outside.sources(t)
            if own is not None:
                inside |= own.sources(t)
            if (param := self.trainable.get(id(t))) is not None:
                if id(t) in covers:
                    inside |= {param}
                elif not any(id(t) in frame[0] for frame in self.running):
                    outside |= {param}
        for t in results:
            if outside:
                self.outside.add(t, outside)
            if inside and own is not None:
                own.add(t, inside)
        return out

    def check(self) -> None:
        if self.stored:
            raise ModelNotSupportedError(
                f"a layer stores on itself in its forward a tensor derived from its parameters ({', '.join(self.stored)}): "
                "a side output next to what it returns (a regulariser), which the layerwise path's rule for it cannot "
                "see. Return the term from forward instead, store it detached if it is only logged, or use "
                "grad_sample_mode='vmap'"
            )
        if found := sorted(self.outside.alive()):
            raise ModelNotSupportedError(
                f"the forward uses the parameter(s) {', '.join(found)} outside the forward of the layer they belong to "
                "(e.g. h @ emb.weight.T in a parent module, a loss term computed from a weight and stored on the model, "
                "a forward hook): the layerwise path sees gradients only at its layers' outputs. Call the layer "
                "instead, return the term from forward, or use grad_sample_mode='vmap'"
            )


class _RowBlock(nn.Module):
    """Stands for a row block of a weight (and bias) used by F.linear inside a recorded forward."""

    def __init__(self, weight: Tensor, bias: Tensor | None, rows: slice | None) -> None:
        super().__init__()
        object.__setattr__(self, "w", weight)
        object.__setattr__(self, "b", bias)
        self.rows = rows


class _RowBlockRule(LayerRule):
    def contributions(self, call: LayerCall) -> list[Contribution]:
        block: _RowBlock = call.module  # type: ignore[assignment]
        a = call.input.reshape(call.input.shape[0], -1, call.input.shape[-1])
        g = call.grad.reshape(call.grad.shape[0], -1, call.grad.shape[-1])
        parts: list[Contribution] = []
        if (name := call.name(block.w)) is not None:
            shape = (block.w if block.rows is None else block.w[block.rows]).shape
            parts.append(LinearWeight(name, block.rows, a, g, shape))
        if (name := call.name(block.b)) is not None:
            parts.append(Summed(name, g, block.rows))
        return parts


_ROW_BLOCK_RULE = _RowBlockRule()


class LayerwiseGradients:
    """Norms and weighted sums of per-example gradients assembled from layer contributions."""

    #: Per-example gradients kept between the norms and the clipped sum, all layers together (mixed clipping,
    #: :class:`~dpclip.grads.LinearWeight`): keeping a layer's saves its ghost Grams (B·T²·(in + out)) and a
    #: B·T·in·out product — 10 % of the 2-layer benchmark transformer's step — at B·in·out·4 bytes. One budget
    #: for the step bounds that memory whatever the depth (a 6-layer d = 256 transformer would keep 1.5 GB);
    #: ``make_private(memory="low")`` sets it to 0 for one engine: that speed traded for memory.
    cache_bytes = 256 * 2**20

    def __init__(self, batch: int, names: list[str], parts: list[Contribution], model: nn.Module,
                 budget: CacheBudget) -> None:
        """``budget``: the step's (:attr:`cache_bytes`, or the engine's ``kept_bytes``), which the rules already drew on."""
        self.batch = batch
        self.names = names
        wanted = set(names)
        self.params = {name: p for name, p in model.named_parameters() if name in wanted}
        self._summed = False
        grouped: dict[str, list[Contribution]] = defaultdict(list)
        for part in parts:
            grouped[part.name].append(part)
        self.by_name: dict[str, list[Contribution]] = {}
        for name, group in grouped.items():
            if self._overlapping(group) and (one := group[0].joined(group[1:])) is not None:
                group = [one]  # a block used by several calls, as one contribution (Contribution.joined)
            for part in group:
                part.budget = budget
            self.by_name[name] = group

    @staticmethod
    def _overlapping(parts: list[Contribution]) -> bool:
        if len(parts) <= 1:
            return False
        spans = sorted((p.rows.start, p.rows.stop) if p.rows is not None else (-math.inf, math.inf) for p in parts)
        return any(spans[i][1] > spans[i + 1][0] for i in range(len(spans) - 1))

    def _param_norm(self, name: str, norm: Norm) -> Tensor:
        with refusing(name):  # the parts' deferred work (their rules ran when backward ended)
            return self._parts_norm(name, norm)

    def _parts_norm(self, name: str, norm: Norm) -> Tensor:
        parts = self.by_name.get(name, [])
        device = self.params[name].device
        if not parts:
            return torch.zeros(self.batch, dtype=torch.float64, device=device)
        if self._overlapping(parts):  # the same entries receive several contributions: add them up first
            param = self.params[name]
            full = param.new_zeros(self.batch, *param.shape)
            for part in parts:
                full[(slice(None), part.rows) if part.rows is not None else slice(None)] += part.materialize().to(full.dtype)
            return vector_norms(full, norm).double()
        norms = [part.norm(norm).double() for part in parts]
        for part in parts:
            part.after_norm()
        return norms[0] if len(parts) == 1 else clip_norm(norm).combine(torch.stack(norms, dim=1))

    def norms(self, norm: Norm) -> Tensor:
        """Per-example, per-parameter norms [batch, parameters] (float64)."""
        if not self.names:
            return torch.zeros(self.batch, 0, dtype=torch.float64)
        return torch.stack([self._param_norm(name, norm) for name in self.names], dim=1)

    def weighted_sum(self, factors: Tensor, sparse_rows: bool = False) -> dict[str, Tensor]:
        """Σ_i factors[i, j] · g_i[names[j]]; single use: it frees the recorded tensors as it goes.
        ``sparse_rows``: a parameter with one whole contribution may come back as a sparse COO tensor of its
        shape (:meth:`Contribution.weighted_rows`: an embedding's rows); dense otherwise."""
        self._claim()
        sums = {}
        for j, name in enumerate(self.names):
            param = self.params[name]
            total: Tensor | None = None  # a whole-parameter block is the sum itself (fresh): no zeros, no copy
            parts = self.by_name.pop(name, [])  # once summed, a part's tensors can be freed
            as_rows = sparse_rows and len(parts) == 1 and parts[0].rows is None
            for part in parts:
                with refusing(name):
                    block = (part.weighted_rows(factors[:, j]) if as_rows else part.weighted(factors[:, j])).to(param.dtype)
                if part.rows is None:
                    total = block if total is None else total.add_(block)
                else:
                    total = torch.zeros_like(param) if total is None else total
                    total[part.rows] += block
            sums[name] = torch.zeros_like(param) if total is None else total
        return sums

    def add_weighted_sum(self, factors: Tensor, into: Mapping[str, Tensor]) -> None:
        """``into[names[j]]`` += Σ_i factors[i, j] · g_i[names[j]] in place, each contribution formed inside its
        block of ``into`` (:meth:`Contribution.add_weighted`); single use, as :meth:`weighted_sum`."""
        self._claim()
        for j, name in enumerate(self.names):
            out = into[name]
            for part in self.by_name.pop(name, []):
                with refusing(name):
                    part.add_weighted(out if part.rows is None else out[part.rows], factors[:, j])

    def _claim(self) -> None:
        if self._summed:
            raise EngineUsageError("LayerwiseGradients.weighted_sum can be called once (its tensors are freed)")
        self._summed = True
