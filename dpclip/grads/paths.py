"""The two per-example paths as runners that verification can try on a probe batch.

- ``layerwise``: the tape (:mod:`.tape`) with its layer rules — no per-example weight gradients where a rule
  avoids them;
- ``vmap``: the whole model under ``torch.func.vmap`` over (parameter copy, example) pairs
  (:func:`dpclip.module.per_example_forward`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_map

from ..errors import ModelNotSupportedError
from ..example_grads import ExampleGradients, MaterializedGradients
from ..guards import check_optimizer, refuse_nonprivate_gradients
from ..module import ChunkCollector, per_example_forward
from ..per_sample import PaddingLookups, batch_size_of, trainable_parameters
from .tape import LayerwiseTape, modified_input_error
from .verify import PathRunner, StateGuard, describe, fix_hint, verify_paths

Tensor = torch.Tensor


def tape_runner(tape: LayerwiseTape, learn: bool = True) -> PathRunner:
    """Run the tape on a probe, learning (pinning) each layer call's layout; with ``learn=False``, on the whole
    batch with the layouts already pinned (verification's check at the real batch size)."""

    def run(module: nn.Module, args: tuple, kwargs: dict, batch: int) -> tuple[Any, Callable[[], ExampleGradients]]:
        if learn:
            tape.layouts = {}
        captured: list[ExampleGradients] = []
        out = tape.forward(module, args, kwargs, batch, captured.append, probe=learn)

        def collect() -> ExampleGradients:
            if not captured:
                tape.finish()
            if not captured:
                raise ModelNotSupportedError("no gradient reached the recorded layers")
            return captured[0]

        return out, collect

    return run


def vmap_runner(module_names: list[str]) -> PathRunner:
    """Run the whole-model vmap path on a probe (one chunk)."""

    def run(module: nn.Module, args: tuple, kwargs: dict, batch: int) -> tuple[Any, Callable[[], ExampleGradients]]:
        captured: list[ExampleGradients] = []
        out, collectors = per_example_forward(
            module, args, kwargs, batch, False,
            lambda grads, scale, start: captured.append(MaterializedGradients(grads)),
        )

        def collect() -> ExampleGradients:
            for collector in collectors:
                collector.finish()
            return captured[0]

        return out, collect

    return run


class StoredTensorStandIn:
    """Stands for a tensor that a forward stored on the model (``self.aux = ...``) where reading it back would be
    wrong: after a vmapped forward (it exists only inside each example's run, functorch fails on any use of it, and
    a loss term built on it would bypass the per-example gradients), and after verification's forwards on the first
    batch (it was computed from those examples). Any use raises :class:`ModelNotSupportedError` saying so, before
    anything is released; a forward that stores it again (torch's weight_norm and pruning hooks) replaces it."""

    __slots__ = ("_message",)

    def __init__(self, message: str) -> None:
        object.__setattr__(self, "_message", message)

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise StoredTensorError(object.__getattribute__(self, "_message"))

    def __getattr__(self, name: str) -> Any:
        self._refuse()

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        stand_in = next(a for a in tree_flatten((args, kwargs or {}))[0] if isinstance(a, StoredTensorStandIn))
        stand_in._refuse()

    def __repr__(self) -> str:
        return f"<StoredTensorStandIn: {object.__getattribute__(self, '_message')}>"

    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __truediv__ = __rtruediv__ = _refuse
    __matmul__ = __rmatmul__ = __pow__ = __rpow__ = __neg__ = __getitem__ = __len__ = __iter__ = _refuse
    __float__ = __int__ = __bool__ = __array__ = _refuse
    __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = _refuse  # type: ignore[assignment]
    __hash__ = object.__hash__


class StoredTensorError(ModelNotSupportedError, AttributeError):
    """A :class:`StoredTensorStandIn` was used. Also an AttributeError, so ``hasattr(model, "aux")``-style probing
    and ``getattr(stand_in, name, default)`` keep working."""


def _replace_escaped_tensors(module: nn.Module) -> None:
    """After a vmapped forward: put a :class:`StoredTensorStandIn` in place of every tensor the forward stored on the
    model (functorch wrappers that escaped the vmapped run), so that a loss reading one gets dpclip's refusal with
    the fix instead of functorch's internal error."""
    for name, sub in module.named_modules():
        for attribute, value in list(vars(sub).items()):
            if attribute in ("_parameters", "_buffers", "_modules"):
                continue
            leaves = [t for t in tree_flatten(value)[0] if isinstance(t, Tensor)]
            if not any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in leaves):
                continue
            where = f"{name}.{attribute}" if name else attribute
            stand_in = StoredTensorStandIn(
                f"the model's forward stored a tensor on the model ({where}, in {type(sub).__name__}) and it was read "
                "after the forward: on the vmap path it exists only inside each example's run, and a loss term built on it "
                "would not be clipped per example. Return it from forward instead (e.g. as a second output, one row "
                "per example). Nothing was applied."
            )
            setattr(sub, attribute, tree_map(
                lambda t: stand_in if isinstance(t, Tensor) and torch._C._functorch.is_functorch_wrapped_tensor(t) else t,
                value))


Consumer = Callable[[ExampleGradients, float], None]  # (a batch's per-example gradients, scale)
_AUTO_CHUNK_BYTES = 256 * 2**20


def _refuse_modified_inputs(out: Any, args: tuple, kwargs: dict) -> Any:
    """``out`` with a gradient hook on each of its floating tensors that raises dpclip's refusal if an input tensor
    of the forward was modified in place before backward reached the output (torch would raise its own error from
    inside the vmapped backward, or, where no input was saved, nothing: the layerwise path refuses both alike)."""
    versions = [(t, t._version) for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)]

    def check(grad: Tensor) -> None:
        for t, version in versions:
            if t._version != version:
                raise modified_input_error("an input of the model")

    for leaf in tree_flatten(out)[0]:
        if isinstance(leaf, Tensor) and leaf.requires_grad:
            leaf.register_hook(check)
    return out


class PerExampleForward:
    """The private model's training forward: verify (first step, or every step) which path computes exact
    per-example gradients for this model, then run the forward on it; backward hands the per-example
    gradients of each batch (or chunk) to the consumer.

    ``mode``: "auto" (layerwise, else vmap), "layerwise" or "vmap"; ``verify``: "first-step", "every-step", "off";
    ``kept_bytes``: the layerwise path's budget for kept per-example gradients (None: its default; 0: none).
    """

    def __init__(self, module: nn.Module, mode: str, verify: str, chunk_size: int | None, kept_bytes: int | None = None) -> None:
        self.tape = LayerwiseTape(module, kept_bytes) if mode != "vmap" else None
        self.paths = ["layerwise", "vmap"] if mode == "auto" else [mode]
        self.verify = verify
        self.path: str | None = None if verify != "off" else self.paths[0]
        self.seen_several = False  # whether the path was verified on a batch of two or more examples
        self.chunk_size = chunk_size
        self.trainable = list(trainable_parameters(module))
        self._checked: tuple | None = None  # the trainable set and the optimizer's parameters last checked
        self.batched_arguments: tuple[bool, ...] | None = None
        self.collectors: list[ChunkCollector] = []
        self.state: StateGuard | None = None
        self._gradient_guards = refuse_nonprivate_gradients(module)
        # whether the vmap path must detach embedding lookups' padding positions (a Python hook on every op):
        # unless verification saw the model make no lookup with a padding_idx and it has no such Embedding
        self.padding_lookups = True

    def follow_trainable(self, module: nn.Module, optimizer: torch.optim.Optimizer,
                         held: Mapping[str, Tensor] | None = None) -> None:
        """Follow changes made after make_private, each forward: :meth:`check_optimizer_holds`, and
        ``requires_grad`` changes re-read the trainable set and re-verify.
        ``held``: the parameters the optimizer must hold, if not the module's own (FSDP2: the shards)."""
        names = list(self.check_optimizer_holds(module, optimizer, held))
        if names == self.trainable:
            return
        for handle in self._gradient_guards:
            handle.remove()
        self._gradient_guards = refuse_nonprivate_gradients(module)
        self.trainable = names
        if self.tape is not None:
            self.tape.rebuild()
        if self.verify != "off":
            self.path = None

    def check_optimizer_holds(self, module: nn.Module, optimizer: torch.optim.Optimizer,
                              held: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """The optimizer still holds every trainable parameter and nothing outside the model (:func:`check_optimizer`)
        — a group appended to ``param_groups`` by hand, a parameter replaced under its name: checked by identity,
        again only when either set changed (a tuple of ids per call). Returns the trainable parameters it read."""
        trainable = trainable_parameters(module)
        checked = (tuple(id(p) for p in trainable.values()),
                   tuple(id(p) for group in optimizer.param_groups for p in group["params"]))
        if checked != self._checked:
            check_optimizer(module, optimizer, held)
            self._checked = checked
        return trainable

    def forward(self, module: nn.Module, args: tuple, kwargs: dict, mean: bool, consume: Consumer) -> Any:
        """The forward whose backward delivers per-example gradients (scaled back from a mean loss) to ``consume``."""
        batch = batch_size_of(args, kwargs)
        first = self.path is None
        # One example cannot show a layer that mixes or reorders examples (the probe repeats it): a path verified on
        # one is exact for batches of one (micro-batches of one included), and verified again on the first batch
        # that holds two or more.
        wider = self.path is not None and not self.seen_several and batch > 1 and self.verify != "off"
        if batch > 0 and (first or wider or self.verify == "every-step"):
            self.path = self._choose(module, args, kwargs, batch)
            self.seen_several = batch > 1
        path = self.path
        self.state = StateGuard(module, snapshot=first and batch > 0)
        scale = float(batch) if mean else 1.0
        if path == "layerwise" and batch > 0:
            assert self.tape is not None
            return self.tape.forward(module, args, kwargs, batch, lambda grads: consume(grads, scale))
        self._check_vmap_arguments(args, kwargs, batch, pin=first)
        try:
            out, collectors = per_example_forward(
                module, args, kwargs, self._chunk_size(module), mean,
                lambda grads, scale, start: consume(MaterializedGradients(grads), scale), self.padding_lookups,
            )
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as error:  # a torch error under vmap on a later batch: dpclip's refusal, nothing released
            raise ModelNotSupportedError(
                f"{describe(module)}: the vmap path failed on this batch of {batch} with {type(error).__name__}: "
                f"{error}{fix_hint(error)}. Nothing was applied."
            ) from error
        _replace_escaped_tensors(module)
        self.collectors.extend(collectors)
        return _refuse_modified_inputs(out, args, kwargs)

    def gradients_arrived(self) -> bool:
        """Whether backward reached the recorded layers (or the vmapped copies) of the current micro-batch."""
        tape = self.tape is not None and any(any(g is not None for g in use.grads) for use in self.tape.uses)
        return tape or any(c.done or c.grads for c in self.collectors)

    def finish(self) -> None:
        """After backward: hand over what is still pending (chunks with unused parameters, the tape)."""
        for collector in self.collectors:
            collector.finish()
        self.collectors = []
        if self.tape is not None:
            self.tape.finish()

    def _choose(self, module: nn.Module, args: tuple, kwargs: dict, batch: int) -> str:
        runners = {"layerwise": tape_runner(self.tape) if self.tape is not None else None, "vmap": vmap_runner(self.trainable)}
        candidates = {path: run for path in self.paths if (run := runners[path]) is not None}
        whole_batch = {"layerwise": tape_runner(self.tape, learn=False)} if self.tape is not None else {}
        with PaddingLookups() as lookups:
            path = verify_paths(module, args, kwargs, batch, candidates, self.trainable, whole_batch,
                                chosen_path=self.paths[0] if len(self.paths) == 1 else None)
        self.padding_lookups = lookups.seen or any(
            isinstance(m, nn.Embedding) and m.padding_idx is not None for m in module.modules())
        return path

    def _chunk_size(self, module: nn.Module) -> int:
        if self.chunk_size is not None:
            return self.chunk_size
        per_example = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
        return max(1, _AUTO_CHUNK_BYTES // max(per_example, 1))

    def _check_vmap_arguments(self, args: tuple, kwargs: dict, batch: int, pin: bool) -> None:
        """The vmap path splits every argument whose dim 0 is the batch size: that must be the same arguments as on
        the verified step, or a shared table whose length happens to equal this batch's size would be split."""
        batched = tuple(t.dim() > 0 and t.shape[0] == batch for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor))
        if pin or self.batched_arguments is None:
            self.batched_arguments = batched
        elif batched != self.batched_arguments and batch > 0:
            raise ModelNotSupportedError(
                f"the model's tensor arguments with the batch in dim 0 were {self.batched_arguments} on the verified "
                f"step and are {batched} on this batch of {batch}: a shared argument whose length equals the batch size "
                "cannot be told apart from a batched one on the vmap path. Keep shared tensors (tables, masks for all "
                "examples) as buffers of the model, not as arguments. Nothing was applied."
            )
