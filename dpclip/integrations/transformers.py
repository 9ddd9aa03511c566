"""Private training with the Hugging Face ``transformers.Trainer``: :class:`DPTrainer`.

``DPTrainer`` takes the usual ``Trainer`` arguments plus the privacy ones, and runs every training step through a
:class:`dpclip.PrivacyEngine` (``make_private`` / ``make_private_with_epsilon``): Poisson sampling of the Trainer's
train data set with its data collator, per-example clipping, noise, accounting and the budget guard are the
engine's own; nothing of them is reimplemented here. ``per_device_train_batch_size`` is the *expected* logical
batch size: q = per_device_train_batch_size / N.

The user's model object is left untouched: ``trainer.model`` stays the ``PreTrainedModel`` (or PEFT model) it was,
so the Trainer's type checks, ``save_pretrained``, ``model.config`` and PEFT handling see the real model. The
engine's :class:`~dpclip.PrivateModule` wrapper is only used inside :meth:`DPTrainer.training_step` to run the
training forward.

Settings that would break the guarantee are refused in ``__init__`` (before anything trains), with the reason and
what to do: gradient accumulation, several processes or GPUs, DeepSpeed/FSDP, non-random samplers
(``group_by_length``...), a custom ``_get_train_sampler``, fp16 loss scaling, ``auto_find_batch_size``, and a loss
over token-level labels (a batch-wide token mean, or the Trainer's ``num_items_in_batch`` normalisation, weighs
each example by the others' lengths).
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Mapping
from typing import Any, Literal

try:
    from transformers import Trainer
    from transformers.loss.loss_utils import ForSequenceClassificationLoss
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
except ImportError as error:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "dpclip.integrations.transformers needs the Hugging Face `transformers` package, which dpclip itself does "
        "not require: pip install 'dpclip[transformers]' (or pip install transformers accelerate)"
    ) from error

import torch
from torch.utils.data import DataLoader

from accountants import steps_per_epoch as _steps_per_epoch

from ..checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ..engine import PrivacyEngine
from ..errors import EngineUsageError, LossNotPerExampleError, PrivacyBudgetExceeded, PrivacyParameterError
from ..validation import refuse_unless_per_example

logger = logging.getLogger(__name__)

#: File written into every Trainer checkpoint folder: the engine's state (accountant history, steps, C, budget,
#: sampling and noise generators, torch RNG, model and optimizer), with dpclip's integrity digest.
ENGINE_STATE_NAME = "dpclip_engine.pt"

__all__ = ["DPTrainer", "ENGINE_STATE_NAME"]


class _MicroBatches(dict):
    """A logical Poisson batch cut into micro-batches (``max_physical_batch_size``), handed to the Trainer as one
    batch. It is the first micro-batch's dict (so the Trainer's token and FLOP counters read a real batch); the
    further micro-batches are pulled from the engine's loader only when :meth:`DPTrainer.training_step` has
    finished the previous one, as the engine's step guard requires."""

    def __init__(self, first: dict, rest: Any, engine: PrivacyEngine) -> None:
        super().__init__(first)
        self.first, self.rest, self.engine = first, rest, engine


class _PrivateTrainLoader:
    """What :meth:`DPTrainer.get_train_dataloader` returns: the engine's :class:`~dpclip.PoissonDataLoader`, one
    item per logical step (``len()`` = steps per epoch, ⌈1/q⌉). The budget guard's refusal ends the iteration and
    asks the Trainer to stop."""

    def __init__(self, trainer: DPTrainer, loader: Any) -> None:
        self.trainer, self.loader, self.dataset = trainer, loader, loader.dataset
        self.batch_size = trainer.args.per_device_train_batch_size
        self._batches: Any = None

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Any:
        engine = self.trainer.engine
        if self._batches is not None:
            self._batches.close()  # the Trainer stops pulling after its last step of an epoch: end that iteration
        if self.loader.steps_done_in_epoch >= len(self.loader):  # ... at the epoch's end (also right after a resume)
            self.loader.load_state_dict(dict(self.loader.state_dict(), steps_done_in_epoch=0))
        batches = self._batches = iter(self.loader)
        while True:
            try:
                first = next(batches)
            except StopIteration:
                return
            except PrivacyBudgetExceeded as refusal:
                self.trainer._stop_at_budget(refusal)
                return
            yield first if engine.guard.last else _MicroBatches(first, batches, engine)


#: make_private's keyword arguments that DPTrainer sets from its own arguments (private_options may not hold them)
_OWN_ARGUMENTS = {
    "noise_multiplier": "noise_multiplier", "max_grad_norm": "max_grad_norm", "target_epsilon": "target_epsilon",
    "target_delta": "target_delta", "epochs": "epochs", "max_physical_batch_size": "max_physical_batch_size",
    "loss_reduction": "loss_reduction", "grad_sample_mode": "grad_sample_mode",
}


def _checked_private_options(private_options: Any) -> dict[str, Any]:
    """``private_options`` as a dict of make_private keyword arguments that DPTrainer does not set itself; else a
    PrivacyParameterError naming the key and where it goes (it failed at train() with a raw TypeError, or was
    silently replaced by DPTrainer's own value)."""
    if private_options is None:
        return {}
    if not isinstance(private_options, Mapping):
        raise PrivacyParameterError(
            f"private_options must be a dict of make_private keyword arguments, got {type(private_options).__name__}"
        )
    accepted = {name for name, parameter in inspect.signature(PrivacyEngine.make_private).parameters.items()
                if parameter.kind is inspect.Parameter.KEYWORD_ONLY}
    for key in private_options:
        if key in _OWN_ARGUMENTS:
            raise PrivacyParameterError(
                f"private_options[{key!r}] is set by DPTrainer itself: pass DPTrainer({_OWN_ARGUMENTS[key]}=...) "
                "instead (it would be replaced, or passed twice)"
            )
        if key not in accepted:
            raise PrivacyParameterError(
                f"private_options[{key!r}] is not a make_private keyword argument; those DPTrainer passes on are: "
                f"{', '.join(sorted(accepted - set(_OWN_ARGUMENTS)))}"
            )
    return dict(private_options)


class DPTrainer(Trainer):
    """``transformers.Trainer`` with DP-SGD by :class:`dpclip.PrivacyEngine`.

    >>> trainer = DPTrainer(model=model, args=TrainingArguments("out", per_device_train_batch_size=64, ...),
    ...                     train_dataset=train, data_collator=collator,
    ...                     target_epsilon=3.0, target_delta=1e-5, max_grad_norm=1.0)
    >>> trainer.train()            # ε, δ, σ, q and the DP step count are in every training log
    >>> trainer.engine.privacy_report()["statement"]

    Privacy arguments (keyword-only; every other argument is the Trainer's):

    - ``target_epsilon`` + ``target_delta``: σ is calibrated (``make_private_with_epsilon``) so that the planned
      training (``args.max_steps`` if set, else ``args.num_train_epochs``, or ``epochs=``) fits; the target is also
      the budget: training stops cleanly, with a logged message, at the first step that would exceed it.
    - ``noise_multiplier`` (σ): fixed noise (``make_private``); ``target_delta`` is then the δ of the logged ε, and
      ``target_epsilon`` (optional) a budget. ``noise_multiplier=0`` is dpclip's non-private baseline (loud
      ``PrivacyWarning``, ε = ∞).
    - ``max_grad_norm``: the per-example clipping bound C (the Trainer's own ``args.max_grad_norm`` clipping of the
      batch gradient is switched off, with a logged note: the DP clipping replaces it).
    - ``accountant`` ("pld" or "rdp"), ``secure_mode``, ``dp_seed`` (reproducible sampling and noise; not with
      ``secure_mode``): as ``PrivacyEngine(accountant, secure_mode, seed)``.
    - ``max_physical_batch_size``: cut each Poisson batch into micro-batches of at most this many examples (noise
      once per logical batch): dpclip's replacement for ``gradient_accumulation_steps``.
    - ``loss_reduction`` ("mean", the HF models' default, or "sum"), ``grad_sample_mode``, ``private_options``
      (any other ``make_private`` keyword argument, e.g. ``{"clipping": "median"}``).

    ``per_device_train_batch_size`` is the expected logical batch size: each example joins each step with
    probability q = per_device_train_batch_size / len(train_dataset); an epoch is ⌈1/q⌉ steps.
    """

    def __init__(
        self, *args: Any, noise_multiplier: float | None = None, target_epsilon: float | None = None,
        target_delta: float | None = None, epochs: float | None = None, max_grad_norm: float = 1.0,
        accountant: Literal["pld", "rdp"] = "pld", secure_mode: bool = False, dp_seed: int | None = None,
        max_physical_batch_size: int | None = None, loss_reduction: Literal["mean", "sum"] = "mean",
        grad_sample_mode: Literal["auto", "layerwise", "vmap"] = "auto", private_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if noise_multiplier is None and target_epsilon is None:
            raise PrivacyParameterError(
                "DPTrainer needs noise_multiplier=σ, or target_epsilon= and target_delta= (σ is then calibrated "
                "for the planned training)"
            )
        if target_delta is None:
            raise PrivacyParameterError(
                "DPTrainer needs target_delta= (the δ of the ε logged at every step; 1/N or smaller is usual)"
            )
        self.noise_multiplier, self.target_epsilon, self.target_delta = noise_multiplier, target_epsilon, target_delta
        self.dp_epochs, self.dp_max_grad_norm = epochs, max_grad_norm
        self.max_physical_batch_size = max_physical_batch_size
        self.private_options = dict(_checked_private_options(private_options), loss_reduction=loss_reduction,
                                    grad_sample_mode=grad_sample_mode)
        #: The engine (built at the first ``train()``/``get_train_dataloader()``); None before.
        self.engine: PrivacyEngine | None = None
        self._engine_args = dict(accountant=accountant, secure_mode=secure_mode, seed=dp_seed)
        PrivacyEngine(**self._engine_args)  # refuses a bad accountant or seed+secure_mode now
        self._private_model: Any = None
        self._dp_optimizer: Any = None
        self._dp_loader: _PrivateTrainLoader | None = None
        #: The budget guard's message once it stopped training (None otherwise).
        self.budget_exhausted: str | None = None
        self._loss_checked_for: Any = None
        #: Set once compute_loss_func has passed :func:`_check_loss_func` on a training batch of 2+ examples.
        self._loss_func_checked = False
        self._refuse_unsafe_settings()
        # The model must never see num_items_in_batch: a loss normalised by the whole batch's item count weighs
        # each example by the others (see _check_loss_is_per_example).
        self.model_accepts_loss_kwargs = False

    # -- what is refused, and what is adjusted, before anything trains --------------------------------------
    def _refuse_unsafe_settings(self) -> None:
        args = self.args
        if args.gradient_accumulation_steps != 1:
            raise EngineUsageError(
                f"gradient_accumulation_steps={args.gradient_accumulation_steps} is refused: the Trainer would step "
                "once per several batches, each sampled on its own, so the accountant's q and the noise per step "
                "would not match what ran. Set gradient_accumulation_steps=1, per_device_train_batch_size to the "
                "expected logical batch size you want, and DPTrainer(max_physical_batch_size=<examples that fit in "
                "memory>): dpclip then cuts each Poisson batch into micro-batches and adds noise once per batch."
            )
        if args.world_size > 1 or args.n_gpu > 1:
            raise EngineUsageError(
                f"DPTrainer runs in one process on one device (world_size={args.world_size}, n_gpu={args.n_gpu}): "
                "under several processes or DataParallel the Trainer shards and all-reduces the batch itself, outside "
                "dpclip's distributed mode (one global Poisson batch, noise added once). Run on one device "
                "(CUDA_VISIBLE_DEVICES=0, no torchrun/accelerate launch), or use PrivacyEngine with DDP directly "
                "(README § Distributed training)."
            )
        if getattr(args, "deepspeed", None) or getattr(args, "fsdp", None):
            raise EngineUsageError(
                "DeepSpeed and FSDP are refused: they shard and reduce gradients themselves, where dpclip must clip "
                "each example's whole gradient before any sum. Train without them."
            )
        strategy = getattr(args, "train_sampling_strategy", "random")
        if getattr(args, "group_by_length", False) or strategy != "random":
            raise EngineUsageError(
                f"train_sampling_strategy={strategy!r} is refused: DPTrainer samples every batch by Poisson sampling "
                "(each example independently with probability q), which is what the accountant charges; grouped, "
                "sequential or rebalanced batches are not. Leave train_sampling_strategy='random' (it is replaced)."
            )
        if type(self)._get_train_sampler is not Trainer._get_train_sampler:
            raise EngineUsageError(
                f"{type(self).__name__} overrides _get_train_sampler: a custom sampler is refused, since DPTrainer "
                "samples batches by Poisson sampling (what the accountant charges). Remove the override; to weight "
                "or filter examples, change the data set."
            )
        if type(self).get_train_dataloader is not DPTrainer.get_train_dataloader:
            raise EngineUsageError(
                f"{type(self).__name__} overrides get_train_dataloader: DPTrainer's own builds the engine and its "
                "Poisson loader (what the accountant charges), so an override would train on batches no step "
                "accounts for. Remove the override; pass data_collator= and the dataloader_* training arguments "
                "for the loading, and change the data set for what the batches hold."
            )
        if getattr(args, "gradient_checkpointing", False):
            raise EngineUsageError(
                "gradient_checkpointing=True is refused: checkpointing recomputes layers inside backward, which the "
                "per-example gradient paths cannot follow (the first step would refuse the model). Set "
                "TrainingArguments(gradient_checkpointing=False); for memory, cut each logical batch with "
                "DPTrainer(max_physical_batch_size=...)."
            )
        if args.fp16:
            raise EngineUsageError(
                "fp16=True is refused: it trains with loss scaling (GradScaler), which dpclip cannot clip correctly "
                "and which skips steps depending on the data. Use bf16=True (no loss scaling; the weights stay "
                "float32) or float32."
            )
        if getattr(args, "neftune_noise_alpha", None):
            raise EngineUsageError(
                f"neftune_noise_alpha={args.neftune_noise_alpha} is refused: NEFTune adds random noise to the "
                "embeddings inside the model's forward, which dpclip cannot check or re-run per example (its "
                "first-step verification would refuse the model). Train without it."
            )
        if args.auto_find_batch_size:
            raise EngineUsageError(
                "auto_find_batch_size=True is refused: it changes the batch size, hence q, after a failure. Set "
                "per_device_train_batch_size (the expected batch) and DPTrainer(max_physical_batch_size=...) for memory."
            )
        if args.max_grad_norm and args.max_grad_norm > 0:
            logger.warning(
                "DPTrainer: the Trainer's max_grad_norm=%s (clipping of the batch gradient) is switched off: dpclip "
                "clips each example's gradient to DPTrainer(max_grad_norm=%s) instead.", args.max_grad_norm,
                self.dp_max_grad_norm)
            args.max_grad_norm = 0.0
        if not args.ignore_data_skip:
            # A resumed run continues from the engine's restored loader state; the Trainer must not skip batches.
            args.ignore_data_skip = True
        self._check_loss_is_per_example()

    def _check_loss_is_per_example(self) -> None:
        """dpclip needs per-example outputs from the model and a loss that is a mean (or sum) over examples, computed
        outside the model (:meth:`compute_loss`). Refused here, before training: token-level labels with the stock
        loss (HF models average a token-level loss over all the batch's tokens, and the Trainer would normalise by
        ``num_items_in_batch``, the batch's token count, so one example's weight depends on the others' lengths),
        and labels the stock loss cannot read."""
        self._loss_checked_for = self.train_dataset
        if self.train_dataset is None or type(self).compute_loss is not DPTrainer.compute_loss:
            return  # a subclass that computes its own loss declares it per-example (loss_reduction)
        if self.compute_loss_func is not None:
            return  # the user's loss, called as compute_loss_func(outputs, labels, num_items_in_batch=None)
        if self.private_options["loss_reduction"] != "mean":
            raise LossNotPerExampleError(
                f"loss_reduction={self.private_options['loss_reduction']!r} with DPTrainer's stock loss, which is a "
                "mean over the batch: each example's gradient would reach the clipping divided by the sampled "
                "batch's size, a weight that depends on which other examples were sampled. Keep "
                "loss_reduction='mean' (the default), or pass a compute_loss_func that sums."
            )
        try:
            batch = self._training_collator()([self.train_dataset[0]])
        except Exception:  # noqa: BLE001 - cannot tell here; the engine's verification still runs
            return
        labels = batch.get("labels") if isinstance(batch, Mapping) else None  # (a BatchEncoding is no dict)
        fix = ("Pass compute_loss_func=f (f(outputs, labels, num_items_in_batch=None) -> the mean over examples of "
               "each example's loss; dpclip.check_loss checks it on a batch), or subclass DPTrainer and override "
               "compute_loss.")
        if not isinstance(labels, torch.Tensor):
            raise LossNotPerExampleError(
                "the training batches have no 'labels' tensor: DPTrainer computes the loss outside the model (the "
                "model must return one output row per example, so it is called without labels) and its stock loss "
                "is the sequence-classification loss of 'labels'. " + fix)
        num_labels = getattr(getattr(self.model, "config", None), "num_labels", None)
        multi_label = labels.is_floating_point() and labels.dim() == 2 and labels.shape[1] == num_labels
        if labels.dim() >= 2 and not multi_label:
            raise LossNotPerExampleError(
                f"the training labels are token-level (shape {tuple(labels.shape)} for one example): the model's "
                "loss is a mean over all tokens of the batch (the Trainer's num_items_in_batch normalisation too), so "
                "each example's weight depends on the other examples' lengths, and its clipped gradient would not be "
                "its own. Use as loss the mean over examples of each example's token-mean loss: " + fix)
        if num_labels is None:
            raise LossNotPerExampleError(
                "the model has no config.num_labels, so DPTrainer's stock loss (sequence classification, computed "
                "outside the model) does not apply. " + fix)

    def _training_collator(self) -> Any:
        collator = self.data_collator
        try:
            import datasets  # noqa: F401

            is_hf_dataset = isinstance(self.train_dataset, datasets.Dataset)
        except ImportError:
            is_hf_dataset = False
        if not is_hf_dataset:
            collator = self._get_collator_with_removed_columns(collator, description="training")
        return collator

    # -- the engine -----------------------------------------------------------------------------------------
    def get_train_dataloader(self) -> Any:
        """The engine's Poisson loader over the train data set (built once, with the optimizer, at the first call)."""
        if self._dp_loader is None:
            self._make_private()
        return self._dp_loader

    def _make_private(self) -> None:
        if self.train_dataset is None:
            raise ValueError("Trainer: training requires a train_dataset.")
        if self._loss_checked_for is not self.train_dataset:  # train_dataset was set after __init__
            self._check_loss_is_per_example()
        args = self.args
        dataset = self.train_dataset
        try:
            import datasets

            if isinstance(dataset, datasets.Dataset):
                dataset = self._remove_unused_columns(dataset, description="training")
        except ImportError:
            pass
        workers = args.dataloader_num_workers
        plain = DataLoader(
            dataset, batch_size=args.per_device_train_batch_size, collate_fn=self._training_collator(),
            num_workers=workers, pin_memory=args.dataloader_pin_memory,
            persistent_workers=args.dataloader_persistent_workers if workers > 0 else False,
            prefetch_factor=args.dataloader_prefetch_factor if workers > 0 else None,
            multiprocessing_context=args.dataloader_multiprocessing_context if workers > 0 else None,
        )
        self.create_optimizer()
        engine = PrivacyEngine(**self._engine_args)
        options = dict(self.private_options, max_physical_batch_size=self.max_physical_batch_size)
        if self.noise_multiplier is None:
            model, optimizer, loader = engine.make_private_with_epsilon(
                self.model, self.optimizer, plain, target_epsilon=self.target_epsilon, target_delta=self.target_delta,
                epochs=self._planned_epochs(len(dataset)), max_grad_norm=self.dp_max_grad_norm, **options)
        else:
            if self.target_epsilon is not None:
                options.update(target_epsilon=self.target_epsilon, target_delta=self.target_delta)
            model, optimizer, loader = engine.make_private(
                self.model, self.optimizer, plain, noise_multiplier=self.noise_multiplier,
                max_grad_norm=self.dp_max_grad_norm, **options)
        self.engine, self._private_model, self._dp_optimizer = engine, model, optimizer
        self.optimizer = optimizer  # the Trainer (and accelerate) step it; the scheduler shares its param groups
        self._dp_loader = _PrivateTrainLoader(self, loader)
        self.model_accepts_loss_kwargs = False
        settings = engine.settings
        assert settings is not None
        logger.info(
            "DPTrainer: Poisson sampling q = %.6g (expected batch %g of N = %d), %d steps per epoch, sigma = %.4g, "
            "C = %g, accountant %s", settings.sample_rate, settings.expected_batch_size, len(dataset), len(loader),
            settings.noise_multiplier, self.dp_max_grad_norm, engine.accountant_name)

    def _planned_epochs(self, dataset_size: int) -> float:
        if self.dp_epochs is not None:
            return float(self.dp_epochs)
        if self.args.max_steps and self.args.max_steps > 0:
            if dataset_size == 0:
                raise PrivacyParameterError("the training data set is empty: DPTrainer needs examples to sample from")
            q = min(1.0, self.args.per_device_train_batch_size / dataset_size)
            return self.args.max_steps / _steps_per_epoch(q)
        return float(self.args.num_train_epochs)

    def _stop_at_budget(self, refusal: PrivacyBudgetExceeded) -> None:
        self.budget_exhausted = str(refusal)
        logger.warning("DPTrainer: privacy budget reached, training stops after %d steps: %s",
                       self.engine.steps if self.engine else 0, refusal)
        self.control.should_training_stop = True

    # -- the training step: the engine's private forward, one logical batch per Trainer step -----------------
    def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> torch.Tensor:
        """The Trainer's step, with the engine's :class:`~dpclip.PrivateModule` as the model (``self.model`` is
        untouched) and no ``num_items_in_batch``; a logical batch cut into micro-batches runs each in turn."""
        if self._private_model is None:
            raise EngineUsageError("DPTrainer.training_step ran before the engine was set up: call trainer.train()")
        self._own_autocast()
        if not isinstance(inputs, _MicroBatches):
            return self._step_on(inputs)
        total, count, batch = None, 0, inputs.first
        while True:
            size = _rows(batch)
            loss = self._step_on(batch)
            weighted = loss * size if self.private_options["loss_reduction"] == "mean" else loss
            total = weighted if total is None else total + weighted
            count += size
            if inputs.engine.guard.last:
                break  # the Trainer's optimizer.step() releases the logical batch
            self._dp_optimizer.step()  # closes this micro-batch (the engine releases nothing before the last one)
            batch = next(inputs.rest)
        assert total is not None
        return total / max(count, 1) if self.private_options["loss_reduction"] == "mean" else total

    def _step_on(self, batch: Any) -> torch.Tensor:
        """The Trainer's forward and backward on one (micro-)batch, under bf16 autocast with ``bf16=True``. An empty
        Poisson batch runs no forward (stock models cannot reshape 0 rows): the engine releases its noise alone."""
        if _rows(batch) == 0:
            return torch.zeros((), device=self.args.device)
        with torch.autocast(self.args.device.type, dtype=torch.bfloat16, enabled=bool(self.args.bf16)):
            return super().training_step(self._private_model, batch, None)

    def _own_autocast(self) -> None:
        """With ``bf16=True``, accelerate wraps the model's forward in autocast, where dpclip's first-step check
        cannot switch it off (it checks in float32): the model gets its own forward back, and :meth:`_step_on`
        runs the training forward under autocast instead, around the private model."""
        original = self.model.__dict__.pop("_original_forward", None)
        if original is not None:
            self.model.forward = original

    def compute_loss(self, model: Any, inputs: dict, return_outputs: bool = False, num_items_in_batch: Any = None) -> Any:
        """The model runs without ``labels`` (so that it returns one output row per example, as dpclip needs) and
        the loss is computed here, a mean over examples: ``compute_loss_func(outputs, labels,
        num_items_in_batch=None)`` if given, else the label smoother, else transformers' own
        sequence-classification loss (``ForSequenceClassificationLoss``: cross-entropy, MSE or BCE by
        ``config.problem_type``, as the model would compute it). ``num_items_in_batch`` is never used: it normalises
        by the whole batch's item count, which would weigh each example by the others."""
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        outputs = model(**inputs)
        if self.compute_loss_func is not None:
            if not self._loss_func_checked and model is self._private_model:  # training only, once (not B = 1)
                self._loss_func_checked = _check_loss_func(
                    self.compute_loss_func, outputs, labels, _rows(inputs), self.private_options["loss_reduction"])
            loss = self.compute_loss_func(outputs, labels, num_items_in_batch=None)
        elif labels is None:
            raise LossNotPerExampleError("DPTrainer's stock loss needs 'labels' in the batch (see DPTrainer docs)")
        else:
            if self.label_smoother is not None:
                loss = self.label_smoother(outputs, labels)
            else:
                config = self.accelerator.unwrap_model(self.model).config
                loss = ForSequenceClassificationLoss(labels, outputs["logits"], config)
            loss = _over_every_example(loss, labels, outputs["logits"])
        return (loss, outputs) if return_outputs else loss

    # -- logs -------------------------------------------------------------------------------------------------
    def privacy_logs(self) -> dict[str, float]:
        """ε at ``target_delta``, δ, σ, q and the number of private steps, as logged."""
        engine = self.engine
        if engine is None or engine.settings is None:
            return {}
        return {
            "epsilon": float(engine.get_epsilon(self.target_delta)),
            "delta": float(self.target_delta),  # type: ignore[arg-type]
            "noise_multiplier": float(engine.settings.noise_multiplier),
            "sample_rate": float(engine.settings.sample_rate),
            "dp_steps": int(engine.steps),
        }

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self.engine is not None and not any(key.startswith("eval_") or key.startswith("test_") for key in logs):
            logs.pop("grad_norm", None)  # measured before the engine assigns the noisy gradient: always 0
            logs.update(self.privacy_logs())
        super().log(logs, *args, **kwargs)

    # -- checkpoints: the engine's state travels with every Trainer checkpoint ------------------------------
    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        if self.engine is not None and self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            save_checkpoint(os.path.join(folder, ENGINE_STATE_NAME), self.engine, global_step=self.state.global_step)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        """The Trainer loads the checkpoint's weights here, before the engine's state can be checked: a folder
        without the engine's state is refused first, and the weights are kept so that a later refusal of the
        engine's state (another σ, C, q or data set) puts them back."""
        _require_engine_state(resume_from_checkpoint)
        target = model if model is not None else self.model
        self._weights_before_resume = {k: v.detach().clone() for k, v in target.state_dict().items()}
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None or self.engine is None:
            super()._load_optimizer_and_scheduler(checkpoint)
            return
        path = _require_engine_state(checkpoint)
        try:  # (the engine's refusal changes nothing of the engine, the optimizer or the scheduler)
            extra = load_checkpoint(path, self.engine)
        except CheckpointError:
            weights = getattr(self, "_weights_before_resume", None)
            if weights is not None:
                self.model.load_state_dict(weights)  # the weights the Trainer had loaded from the folder go back
            raise
        super()._load_optimizer_and_scheduler(checkpoint)
        if extra.get("global_step") != self.state.global_step:
            raise CheckpointError(
                f"{path} was saved at step {extra.get('global_step')} but the Trainer state in {checkpoint} is at "
                f"step {self.state.global_step}: the folder mixes two runs"
            )


def _require_engine_state(checkpoint: str) -> str:
    """The engine's state file in a Trainer checkpoint folder, or a CheckpointError before anything is loaded."""
    path = os.path.join(checkpoint, ENGINE_STATE_NAME)
    if not os.path.isfile(path):
        raise CheckpointError(
            f"{checkpoint} has no {ENGINE_STATE_NAME}: it was not written by DPTrainer, so the privacy spent before it "
            "(accountant history, sampling and noise state) is unknown. Resume from a DPTrainer checkpoint, or start "
            "a new run. Nothing was loaded."
        )
    return path


def _check_loss_func(loss_func: Any, outputs: Any, labels: Any, batch: int, loss_reduction: str,
                     rtol: float = 1e-4, atol: float = 1e-6) -> bool:
    """Check ``compute_loss_func`` on a training batch's model outputs, before its loss is used: DP-SGD clips each
    example's gradient of the batch loss, which bounds its influence only if example i's loss depends on example i's
    outputs and labels alone (a mean, or with loss_reduction="sum" a sum, of per-example losses). The outputs with
    the batch in dim 0 are detached into leaves; for the first min(B, 4) examples, the gradient of the batch loss at
    row i, times B for "mean", must equal the gradient of the loss on example i alone (rtol, atol relative to the
    gradients' scale, as :func:`dpclip.check_loss`). A loss that normalises over the batch (a token mean over all its
    tokens, batch statistics) or a reduction other than ``loss_reduction`` raises :class:`LossNotPerExampleError`.
    The model is not run again. Returns True once checked, False when it cannot tell: a batch of one example (the
    next batch is checked), or outputs or labels it cannot cut into examples (not checked)."""
    if batch < 2:
        return False

    def rows(value: Any, index: slice) -> Any:
        if value is None:
            return None
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
            return value[index]
        if isinstance(value, Mapping):
            return {key: rows(item, index) for key, item in value.items()}
        raise TypeError(type(value).__name__)

    fields = {key: value for key, value in (outputs.items() if isinstance(outputs, Mapping) else [(None, outputs)])
              if value is not None}
    try:  # a structure that cannot be cut into examples (tuples of hidden states, a field without the batch in
        # dim 0, labels that are neither a tensor, a dict of tensors nor None) is not checked
        if not fields or not all(isinstance(value, torch.Tensor) for value in fields.values()):
            raise TypeError("outputs")
        rows(fields, slice(0, 1)), rows(labels, slice(0, 1))
    except TypeError:
        logger.warning("DPTrainer: compute_loss_func was not checked (outputs or labels cannot be cut into examples)")
        return True

    def grads_at(index: slice) -> list[torch.Tensor] | None:
        """The gradient of the loss on rows ``index`` with respect to those rows' floating-point outputs (zeros
        where it does not depend on them); None if the loss is not a scalar tensor."""
        leaves = {key: value[index].detach().float().requires_grad_() if value.is_floating_point()
                  else value[index] for key, value in fields.items()}
        wrt = [leaf for leaf in leaves.values() if leaf.requires_grad]
        with torch.enable_grad():
            loss = loss_func(leaves[None] if None in leaves else type(outputs)(**leaves), rows(labels, index),
                             num_items_in_batch=None)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                return None
            grads = torch.autograd.grad(loss, wrt, allow_unused=True) if loss.requires_grad else [None] * len(wrt)
        return [torch.zeros_like(w) if g is None else g for w, g in zip(wrt, grads)]

    with torch.autocast(next(iter(fields.values())).device.type, enabled=False):  # float32, as the tolerances assume
        together = grads_at(slice(None))
        if together is None:
            return True  # not a scalar loss: backward refuses it anyway
        pairs = []
        for i in range(min(batch, 4)):
            alone = grads_at(slice(i, i + 1)) or []
            pairs += [(g[i:i + 1] * (batch if loss_reduction == "mean" else 1), a) for g, a in zip(together, alone)]
    scale = max((float(a.abs().max()) for _, a in pairs if a.numel()), default=0.0) or 1.0
    refuse_unless_per_example(pairs, batch, loss_reduction, "the loss passed as compute_loss_func",
                              "DPTrainer(loss_reduction={!r})", rtol, atol * scale)
    return True


def _over_every_example(loss: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """The stock loss as a mean over every example of the batch. Cross-entropy (and the label smoother) leave out
    examples labelled -100 and divide by the number of the others, so each example's weight would depend on how
    many others are ignored: rescaled to divide by the batch size, an ignored example contributes 0 and every
    other its own loss / B, as loss_reduction="mean" assumes. Float labels (regression, multi-label) ignore none."""
    if labels.is_floating_point() or labels.numel() == 0:
        return loss
    kept = int((labels != -100).sum())
    if kept == labels.numel():
        return loss
    if kept == 0:  # (the mean over no example is NaN): every example contributes 0
        return logits.sum() * 0.0
    return loss * (kept / labels.numel())


def _rows(batch: Any) -> int:
    for value in (batch.values() if isinstance(batch, Mapping) else batch):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return 0

