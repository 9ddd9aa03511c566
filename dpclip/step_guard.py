"""The training loop as an explicit state machine: what may happen when, so that what is charged is what ran.

One logical step goes through these states::

    idle ──loader: begin_step──▶ open ──loader: begin_micro_batch──▶ batch ──model forward──▶ forwarded
      ▲                                     ▲                                                   │ backward
      │                                     └──────── optimizer.step() (not the last) ◀── delivered
      └─────────────────────────── optimizer.step() (last micro-batch: release + charge) ◀──┘

Every transition not drawn is refused with :class:`~dpclip.errors.EngineUsageError` before anything changes:
a training forward outside the loader's batch, two forwards on one batch, a step without a forward (the
model left in eval mode) or without a backward, a sampled batch left without its step, a checkpoint mid-batch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch.nn.utils.rnn import PackedSequence

from .errors import EngineUsageError
from .guards import check_batch_is_yielded
from .per_sample import first_batched_tensor

Tensor = torch.Tensor


class StepGuard:
    """Tracks one logical step of the private loop and refuses what the accounting would not match."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Back to idle (after a release, a refusal that abandons the step, or a checkpoint load)."""
        self.open = False  # a logical batch was sampled and not yet released
        self.read_data = False  # the model ran on one of its micro-batches
        self.last = True  # the current micro-batch is the logical batch's last
        self.size: int | None = None  # examples in the current micro-batch
        self.yielded: Any = None  # the tensors the loader yielded for it
        self.forwarded = False
        self.delivered = False  # per-example gradients of the current micro-batch reached the engine
        self.micro_stepped = False  # optimizer.step() was called for the current (not last) micro-batch

    @property
    def unread(self) -> bool:
        """A logical batch was handed out, the model never ran on it and no step released it."""
        return self.open and not self.read_data

    # -- transitions driven by the loader ---------------------------------------------------------------
    def skipped_error(self) -> EngineUsageError:
        """The refusal of a batch handed out and left without optimizer.step() before the model ran on it."""
        return EngineUsageError(
            "the loop went on without optimizer.step() for the batch the private loader handed out: skipping a "
            "sampled batch (e.g. `if len(y) == 0: continue`, or a skip that looks at the labels) is a decision that "
            "depends on which examples were sampled, and no noise covers it. Call optimizer.step() for every batch "
            "the loader yields: an empty batch may skip its forward, and step() then releases the noise alone "
            "(charged like any step). Nothing of another batch was read; a new iteration over the loader hands the "
            "skipped batch out again. To stop early, break out of the loop (a batch the model never ran on goes "
            "back to the loader)."
        )

    def begin_step(self) -> None:
        """Open the next logical step; a previous one the model read and no step released is refused (one it
        never read is the engine's ``check_skipped``, which tells the other ranks first)."""
        if self.open and self.read_data:
            raise EngineUsageError(
                "the previous batch was used but optimizer.step() was not called: every sampled batch, even an "
                "empty one, must be released with optimizer.step() or the accounting would not match the training. "
                + ("" if self.last else
                   "Here the loop left a logical batch before its last micro-batch (max_physical_batch_size), and "
                   "optimizer.step() releases only after the last one: load the last checkpoint "
                   "(dpclip.load_checkpoint) to go on, and do not break out of the loop in the middle of a logical "
                   "batch. ")
                + "To accumulate gradients over a batch too large for memory, do not skip optimizer.step(): pass "
                "max_physical_batch_size=<examples that fit> to make_private; the loader then cuts each Poisson batch "
                "into micro-batches, and optimizer.step() after each one adds noise and steps only after the last "
                "(README § Large batches and gradient accumulation). For a larger logical batch, raise the loader's "
                "batch_size (q = batch_size / N)."
            )
        self.reset()
        self.open = True

    def return_unread(self) -> bool:
        """At the start of a new iteration over the loader: the batch it last handed out goes back if the model
        never ran on it and no step released it (nothing of it was used). True if it went back."""
        if self.unread:
            self.reset()
            return True
        return False

    def begin_micro_batch(self, last: bool, size: int | None, batch: Any) -> None:
        self.last, self.size, self.yielded = last, size, batch
        self.forwarded = self.delivered = self.micro_stepped = False

    # -- the model's training forward -------------------------------------------------------------------
    def before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """The forward must run once, inside a batch of the loader, on that batch, on the parameters' device, with
        float32/float64 trainable parameters."""
        if not self.open:
            raise EngineUsageError(
                "the model ran in training mode outside a batch of the data loader returned by make_private. "
                "Iterate over that loader (its Poisson sampling is what the accountant assumes); "
                "for evaluation use model.eval() or torch.no_grad()."
            )
        if self.forwarded:
            raise EngineUsageError(
                "a second training-mode forward on the same batch: its examples would be counted twice. "
                "Run one forward per batch (use torch.no_grad() or model.eval() for extra forwards)."
            )
        if any(isinstance(value, PackedSequence) for value in [*args, *kwargs.values()]):
            raise EngineUsageError(
                f"{type(module).__name__} was called on a PackedSequence: its data holds the batch's time steps "
                "packed together, not one row per example, so dpclip cannot give each example its own gradient. Have "
                "the collate_fn return the padded batch (examples in dim 0) and the lengths, and pack inside the "
                "model's forward with pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False) "
                "(nothing was computed)"
            )
        first = first_batched_tensor(args, kwargs)  # its dim 0 is the batch
        batch = first.shape[0]
        if self.size is not None and batch != self.size:
            raise EngineUsageError(
                f"{type(module).__name__} was called on a batch of {batch} examples (dim 0 of its first tensor "
                f"argument), but the batch the private data loader just yielded has {self.size}. dpclip needs the "
                "examples in dim 0 of the model's inputs (batch-first; transpose inside the model if its layers want "
                "another layout). Train only on the batches of the loader returned by make_private (its Poisson "
                "sampling is what the accountant assumes), one row per example: a batch from another loader, a slice "
                "of the batch, or augmentation that adds rows is not accounted."
            )
        trainable = [p for p in module.parameters() if p.requires_grad]
        check_precision(trainable)
        devices = {p.device for p in trainable}
        if first.device not in devices:
            raise EngineUsageError(
                f"the batch is on device {first.device} but the model's parameters are on "
                f"{', '.join(sorted(map(str, devices)))}: move the batch first, e.g. x = x.to(device) with the "
                "model's device (nothing was computed)"
            )
        check_batch_is_yielded(module, args, kwargs, self.yielded)

    def forward_ran(self) -> None:
        self.forwarded = self.read_data = True

    # -- optimizer.step() ----------------------------------------------------------------------------------
    def before_step(self, gradients_arrived: bool) -> None:
        """A non-empty micro-batch needs a training forward and a backward that reached the model."""
        if not self.open:
            raise EngineUsageError("optimizer.step() was called outside a batch of the data loader returned by make_private")
        if (self.size or 0) > 0 and not self.forwarded:
            raise EngineUsageError(
                "optimizer.step() on a batch the private model did not train on: the model ran in eval mode (call "
                "model.train()), or was not called on this batch. Nothing was applied."
            )
        if self.forwarded and (self.size or 0) > 0 and not (self.delivered or gradients_arrived):
            raise EngineUsageError(
                "optimizer.step() without a backward through the model: call loss.backward() on the loss of this "
                "batch first (a step without it would release noise only and still charge ε). Nothing was applied."
            )

    def before_checkpoint(self) -> None:
        if self.open and self.read_data:
            raise EngineUsageError("checkpoint after optimizer.step(), not in the middle of a batch")


#: The parameter precisions dpclip trains; bf16 and fp16 belong in the activations (torch.autocast), not the weights.
TRAINABLE_DTYPES = (torch.float32, torch.float64)


def check_precision(trainable: list[Tensor]) -> None:
    """Refuse half-precision trainable parameters (before anything is computed): the private gradient is formed in
    the parameters' precision, and a bf16 weight rounds away DP-SGD's small noisy updates."""
    low = sorted({str(p.dtype).removeprefix("torch.") for p in trainable
                  if p.is_floating_point() and p.dtype not in TRAINABLE_DTYPES})
    if low:
        raise EngineUsageError(
            f"the model's trainable parameters are {', '.join(low)}: dpclip trains float32 (or float64) parameters. "
            "Keep the weights in float32 and run the forward under torch.autocast(device_type, dtype=torch.bfloat16): "
            "the activations are then bf16 while the per-example norms, the clipping and the noisy sum stay in float32 "
            "(README § Mixed precision). With half-precision weights the clipped sum and its noise would be formed in "
            "half precision, and an update smaller than 2^-9 of a bf16 weight is rounded away, so the many small noisy "
            "steps DP-SGD averages over would be lost. Frozen (requires_grad=False) half-precision parameters are "
            "fine. Nothing was computed."
        )
