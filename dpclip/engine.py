"""PrivacyEngine: wires the data path (per-example grads → clip → sum → noise → optimizer step) to a model,
an optimizer and a Poisson data loader, records every step with the accountant, and guards the budget."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from accountants import (
    Composed,
    Event,
    Gaussian,
    Laplace,
    PoissonSampled,
    ACCOUNTANTS,
    RDPAccountant,
    calibrate_noise,
    make_accountant,
    epochs_to_steps,
    privacy_statement,
)
from accountants._validation import (
    PrivacyParameterError,
    check_count,
    check_delta,
    check_positive,
    check_sample_rate,
    warn_if_delta_too_large,
)

from .clipping import FixedClipping, MedianClipping, check_norm, clip_factors, layer_bound
from .distributed import DistributedContext, unwrap_model
from .example_grads import ExampleGradients, MaterializedGradients
from .layerwise import LayerwiseTape
from .errors import EngineUsageError, NonFiniteGradientError, PrivacyBudgetExceeded
from .module import ChunkCollector, PrivateModule, per_example_forward
from .noise import NoiseSource, add_noise
from .optimizer import DPOptimizer
from .per_sample import batch_size_of, trainable_parameters
from .progress import PrivacyProgress
from .sampling import PoissonDataLoader
from .validation import validate_model

Tensor = torch.Tensor
_STATE_FORMAT = "dpclip.PrivacyEngine"
_STATE_VERSION = 1
_AUTO_CHUNK_BYTES = 256 * 2**20


@dataclass(frozen=True)
class PrivacySettings:
    """Everything that defines the mechanism; a checkpoint only loads into an engine with the same settings."""

    noise_multiplier: float
    norm: str
    clipping: str
    sample_rate: float
    dataset_size: int
    count_noise_multiplier: float | None
    per_layer: bool
    loss_reduction: str

    @property
    def mechanism(self) -> str:
        return "gaussian" if self.norm == "l2" else "laplace"

    @property
    def expected_batch_size(self) -> float:
        return self.sample_rate * self.dataset_size

    @property
    def gradient_noise_multiplier(self) -> float:
        """Noise multiplier of the gradient sum.

        With median clipping and Gaussian noise the total σ is split as σ_grad = (σ⁻² − (2σ_b)⁻²)^{−1/2}, so the
        gradient and the count together form one Gaussian(σ) mechanism (Andrew et al. 2021, Thm. 1).
        """
        if self.clipping == "median" and self.norm == "l2":
            return (self.noise_multiplier**-2 - (2 * self.count_noise_multiplier) ** -2) ** -0.5
        return self.noise_multiplier

    def step_event(self) -> Event:
        """The accountant's event for one logical step, including the adaptive-clipping count release."""
        base: Event = Gaussian(self.gradient_noise_multiplier) if self.norm == "l2" else Laplace(self.noise_multiplier)
        if self.clipping == "median":
            base = Composed([base, Gaussian(2 * self.count_noise_multiplier)])
        return PoissonSampled(self.sample_rate, base)


def _settings_for(
    noise_multiplier: float,
    norm: str,
    clipping: str,
    sample_rate: float,
    dataset_size: int,
    count_noise_multiplier: float | None,
    per_layer: bool,
    loss_reduction: str,
) -> PrivacySettings:
    norm = check_norm(norm)
    sample_rate = check_sample_rate(sample_rate)
    dataset_size = check_count("dataset_size", dataset_size)
    if clipping not in ("fixed", "median"):
        raise PrivacyParameterError(f"clipping must be 'fixed' or 'median', got {clipping!r}")
    if loss_reduction not in ("mean", "sum"):
        raise PrivacyParameterError(f"loss_reduction must be 'mean' or 'sum' (how your loss combines examples), got {loss_reduction!r}")
    if clipping == "median":
        if per_layer:
            raise PrivacyParameterError("per_layer=True is only available with clipping='fixed'")
        if count_noise_multiplier is None:
            # Andrew et al. 2021 (§4): σ_b = expected batch size / 20.
            count_noise_multiplier = sample_rate * dataset_size / 20.0
        count_noise_multiplier = check_positive("count_noise_multiplier", count_noise_multiplier)
    else:
        count_noise_multiplier = None
    settings = PrivacySettings(
        noise_multiplier=check_positive("noise_multiplier", noise_multiplier),
        norm=norm,
        clipping=clipping,
        sample_rate=sample_rate,
        dataset_size=dataset_size,
        count_noise_multiplier=count_noise_multiplier,
        per_layer=bool(per_layer),
        loss_reduction=loss_reduction,
    )
    if clipping == "median" and norm == "l2" and not settings.noise_multiplier < 2 * count_noise_multiplier:
        raise PrivacyParameterError(
            f"median clipping needs noise_multiplier ({settings.noise_multiplier:g}) < 2 × count_noise_multiplier "
            f"({count_noise_multiplier:g}) so that the gradient keeps a positive share of the noise; raise "
            "count_noise_multiplier (or use a larger batch: its default is expected batch size / 20)"
        )
    return settings


def _dataset_size(data_loader: DataLoader) -> int:
    """N, the size of the loader's data set; refuses data sets without a length and empty ones."""
    try:
        size = len(data_loader.dataset)  # type: ignore[arg-type]
    except TypeError:
        raise PrivacyParameterError(
            "the data set must have a length: an iterable-style data set cannot be Poisson-sampled (use a map-style "
            "Dataset, e.g. TensorDataset)"
        ) from None
    if size == 0:
        raise PrivacyParameterError("the data set is empty: there is nothing to train on")
    return size


class PrivacyEngine:
    """Private training with an honest, live (ε, δ).

    >>> engine = PrivacyEngine()
    >>> model, optimizer, loader = engine.make_private(model, optimizer, loader,
    ...                                               noise_multiplier=1.1, max_grad_norm=1.0)
    >>> for x, y in loader:                      # the ordinary PyTorch loop
    ...     optimizer.zero_grad(); criterion(model(x), y).backward(); optimizer.step()
    >>> engine.get_epsilon(delta=1e-5)
    """

    def __init__(self, accountant: Literal["rdp", "pld"] = "rdp", secure_mode: bool = False, seed: int | None = None) -> None:
        if accountant not in ACCOUNTANTS:
            raise PrivacyParameterError(
                f"accountant must be 'rdp' (Rényi DP: fast) or 'pld' (privacy loss distributions: tighter ε), got {accountant!r}"
            )
        self.accountant_name = accountant
        self.accountant = make_accountant(accountant)
        self.secure_mode = secure_mode
        self.noise = NoiseSource(seed=seed, secure_mode=secure_mode)
        self._seed = seed
        self._settings: PrivacySettings | None = None
        self.clipping: FixedClipping | MedianClipping | None = None
        self._bound: float | None = None  # the clipping bound C the engine set; any other value is refused
        self.budget: tuple[float, float] | None = None
        self.steps = 0
        self._module: nn.Module | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._loader: PoissonDataLoader | None = None
        self._tape: LayerwiseTape | None = None
        self.distributed: DistributedContext | None = None  # set by make_private under torch.distributed
        self._reset_step()

    @property
    def settings(self) -> PrivacySettings | None:
        """The mechanism fixed by :meth:`make_private` (None before); read-only."""
        return self._settings

    @settings.setter
    def settings(self, value: Any) -> None:
        raise EngineUsageError(
            "engine.settings cannot be changed: σ, q and the clipping mode are fixed by make_private, and the "
            "accountant charges every step for them. To train with other settings, start a new PrivacyEngine."
        )

    # ------------------------------------------------------------------------------------------------
    # Set-up
    # ------------------------------------------------------------------------------------------------
    def make_private(
        self,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        data_loader: DataLoader,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        norm: Literal["l2", "l1"] = "l2",
        clipping: Literal["fixed", "median"] = "fixed",
        target_quantile: float = 0.5,
        clip_learning_rate: float = 0.2,
        count_noise_multiplier: float | None = None,
        per_layer: bool = False,
        loss_reduction: Literal["mean", "sum"] = "mean",
        max_physical_batch_size: int | None = None,
        chunk_size: int | None = None,
        nonfinite: Literal["error", "drop"] = "error",
        target_epsilon: float | None = None,
        target_delta: float | None = None,
        sample_rate: float | None = None,
        grad_sample_mode: Literal["auto", "layerwise", "vmap"] = "auto",
        distributed: bool | None = None,
    ) -> tuple[PrivateModule, DPOptimizer, PoissonDataLoader]:
        """Wrap ``module``, ``optimizer`` and ``data_loader`` for DP-SGD; returns their private versions.

        - ``norm="l2"`` clips to L2 norm ≤ C and adds Gaussian noise of std σ·C; ``norm="l1"`` clips to L1 norm
          ≤ C and adds Laplace noise of scale σ·C per coordinate.
        - ``clipping="median"`` adapts C towards the ``target_quantile`` of the per-example norms (Andrew et al.
          2021); its noisy count is accounted.
        - The loader is replaced by Poisson sampling at q = batch_size / len(dataset) (``sample_rate``
          overrides); the gradient sum is divided by the expected batch size q·N.
        - ``loss_reduction`` says how your criterion combines examples ("mean" as in PyTorch's default).
        - ``target_epsilon``/``target_delta`` set a budget: a step that would exceed it raises
          :class:`PrivacyBudgetExceeded` before any example is read.
        - ``nonfinite="drop"`` zeroes examples with NaN/inf gradients instead of raising (still private: an
          example's contribution is then 0, within the bound C, and the decision depends on that example alone).
        - ``grad_sample_mode``: "layerwise" computes norms and clipped sums from layer activations without
          materialising per-example weight gradients (Linear, Conv2d, Embedding, LayerNorm, GroupNorm,
          MultiheadAttention); "vmap" materialises them for any model; "auto" (default) takes "layerwise" when
          every trainable layer has a fast path.
        - ``distributed`` (default None = automatic): under an initialised ``torch.distributed`` process group
          with world size > 1, or for a ``DistributedDataParallel`` model, every rank clips its shard of one
          global Poisson batch, the clipped sums are all-reduced and noised once (:mod:`dpclip.distributed`);
          ε is that of single-process training. Call it identically on every rank with the whole data set;
          train with the returned model (a DDP wrapper's reducer is bypassed). FSDP is refused.
          ``False``: this process trains alone.
        """
        if self._module is not None:
            raise EngineUsageError("this PrivacyEngine already manages a model; create one engine per model")
        if getattr(optimizer, "_dpclip_wrapped", False) or isinstance(optimizer, DPOptimizer):
            raise EngineUsageError("this optimizer is already wrapped by a PrivacyEngine; wrap the original optimizer once")
        if isinstance(module, PrivateModule):
            raise EngineUsageError("this model is already wrapped by a PrivacyEngine; pass the original model")
        dist_context = DistributedContext.resolve(distributed, module, self.secure_mode)
        wrapper, module = module, unwrap_model(module)  # DDP → ddp.module (its reducer is bypassed); FSDP refused
        validate_model(module)
        # Everything is validated into locals first: a refused call leaves the engine, model and optimizer as they were.
        dataset = data_loader.dataset
        dataset_size = _dataset_size(data_loader)
        if sample_rate is None:
            if data_loader.batch_size is None:
                raise PrivacyParameterError("the data loader has no batch_size; pass sample_rate= (expected batch size / N)")
            sample_rate = min(1.0, data_loader.batch_size / dataset_size)
        settings = _settings_for(
            noise_multiplier, norm, clipping, sample_rate, dataset_size, count_noise_multiplier, per_layer, loss_reduction
        )
        strategy = (
            MedianClipping(max_grad_norm, target_quantile, clip_learning_rate, settings.count_noise_multiplier)
            if clipping == "median"
            else FixedClipping(max_grad_norm)
        )
        if nonfinite not in ("error", "drop"):
            raise PrivacyParameterError(f"nonfinite must be 'error' or 'drop', got {nonfinite!r}")
        if chunk_size is not None:
            chunk_size = check_count("chunk_size", chunk_size)
        if (target_epsilon is None) != (target_delta is None):
            raise PrivacyParameterError("give both target_epsilon and target_delta for a budget, or neither")
        budget = None
        if target_epsilon is not None:
            delta = check_delta(target_delta, "target_delta")
            warn_if_delta_too_large(delta, dataset_size)
            budget = (check_positive("target_epsilon", target_epsilon), delta)

        if grad_sample_mode not in ("auto", "layerwise", "vmap"):
            raise PrivacyParameterError(f"grad_sample_mode must be 'auto', 'layerwise' or 'vmap', got {grad_sample_mode!r}")
        unsupported = LayerwiseTape.unsupported(module)
        if grad_sample_mode == "layerwise" and unsupported:
            raise PrivacyParameterError("grad_sample_mode='layerwise' cannot serve this model: " + "; ".join(unsupported))
        loader = PoissonDataLoader(
            dataset,
            settings.sample_rate,
            collate_fn=data_loader.collate_fn,
            max_physical_batch_size=max_physical_batch_size,
            seed=None if self._seed is None else self._seed + 1,
            secure_mode=self.secure_mode,
        )
        if dist_context is not None:  # same mechanism, model and seeds on every rank; this rank's shard
            fingerprint = dict(settings=settings, clipping=strategy, budget=budget, nonfinite=nonfinite)
            dist_context.synchronize_setup(self, wrapper, module, loader, fingerprint)
        self.distributed = dist_context
        self._tape = LayerwiseTape(module) if grad_sample_mode != "vmap" and not unsupported else None
        self._settings, self.clipping, self.budget = settings, strategy, budget
        self._bound = strategy.max_norm
        self._step_event = settings.step_event()
        self._nonfinite = nonfinite
        self._chunk_size = chunk_size
        loader.listener = self
        self._module, self._optimizer, self._loader = module, optimizer, loader
        optimizer._dpclip_wrapped = True  # type: ignore[attr-defined]
        return PrivateModule(module, self._forward), DPOptimizer(optimizer, self._step), loader

    def make_private_with_epsilon(
        self,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        data_loader: DataLoader,
        *,
        target_epsilon: float,
        target_delta: float,
        epochs: float,
        max_grad_norm: float,
        **kwargs: Any,
    ) -> tuple[PrivateModule, DPOptimizer, PoissonDataLoader]:
        """As :meth:`make_private`, with the smallest noise multiplier that keeps ``epochs`` epochs within
        (target_epsilon, target_delta), which also becomes the budget."""
        if "noise_multiplier" in kwargs:
            raise PrivacyParameterError(
                "make_private_with_epsilon computes noise_multiplier from target_epsilon, target_delta and epochs; "
                "do not pass it (or call make_private(noise_multiplier=...) instead)"
            )
        check_delta(target_delta, "target_delta")
        dataset_size = _dataset_size(data_loader)
        if kwargs.get("sample_rate") is not None:
            q = check_sample_rate(kwargs["sample_rate"])
        elif data_loader.batch_size is None:
            raise PrivacyParameterError("the data loader has no batch_size; pass sample_rate= (expected batch size / N)")
        else:
            q = min(1.0, data_loader.batch_size / dataset_size)
        steps = epochs_to_steps(epochs, q)
        fields = dict(
            norm=kwargs.get("norm", "l2"),
            clipping=kwargs.get("clipping", "fixed"),
            sample_rate=q,
            dataset_size=dataset_size,
            count_noise_multiplier=kwargs.get("count_noise_multiplier"),
            per_layer=kwargs.get("per_layer", False),
            loss_reduction=kwargs.get("loss_reduction", "mean"),
        )

        def event_for(sigma: float) -> Event:
            if fields["clipping"] == "median" and fields["norm"] == "l2":
                return PoissonSampled(q, Gaussian(sigma))  # the split mechanism is exactly Gaussian(σ)
            return _settings_for(sigma, **fields).step_event()

        sigma = calibrate_noise(event_for, target_epsilon, target_delta, steps, accountant=self.accountant_name)
        return self.make_private(
            module,
            optimizer,
            data_loader,
            noise_multiplier=sigma,
            max_grad_norm=max_grad_norm,
            target_epsilon=target_epsilon,
            target_delta=target_delta,
            **{k: v for k, v in kwargs.items() if k not in ("target_epsilon", "target_delta")},
        )

    # ------------------------------------------------------------------------------------------------
    # The step, driven by the loader (begin_step / begin_micro_batch), the model (forward) and the optimizer
    # ------------------------------------------------------------------------------------------------
    def _reset_step(self) -> None:
        self._step_open = False
        self._read_data = False
        self._last_micro_batch = True
        self._micro_batch_size: int | None = None
        self._forwarded = False
        self._sum: dict[str, Tensor] = {}
        self._count = 0.0
        self._collectors: list[ChunkCollector] = []

    def _require_setup(self) -> PrivacySettings:
        if self.settings is None:
            raise EngineUsageError("call engine.make_private(...) (or make_private_with_epsilon) first")
        return self.settings

    def _check_budget(self) -> None:
        if self.budget is None:
            return
        target, delta = self.budget
        after = self.accountant.get_epsilon_after(self._step_event, delta)
        if after > target:
            raise PrivacyBudgetExceeded(
                f"one more step would bring epsilon to {after:.4f} > target {target:g} (delta={delta:g}); "
                f"{self.steps} steps taken so far, epsilon = {self.accountant.get_epsilon(delta):.4f}. "
                "Stop training here, or plan more steps with make_private_with_epsilon(..., epochs=...)."
            )

    def begin_step(self) -> None:
        """Called by the Poisson loader before it samples a logical batch: the budget guard lives here."""
        self._require_setup()
        if self._step_open and self._read_data:
            raise EngineUsageError(
                "the previous batch was used but optimizer.step() was not called: every sampled batch, even an "
                "empty one, must be released with optimizer.step() or the accounting would not match the training"
            )
        self._check_budget()
        self._reset_step()
        self._step_open = True

    def begin_micro_batch(self, index: int, last: bool, size: int | None = None, batch: Any = None) -> None:
        """Called by the Poisson loader before it yields a (micro-)batch of ``size`` examples (``batch``)."""
        self._last_micro_batch = last
        self._forwarded = False
        self._micro_batch_size = size

    def _check_bound(self) -> None:
        """Refuse a clipping bound C changed behind the engine's back (clipping and noise must use the same C)."""
        assert self.clipping is not None
        if self.clipping.max_norm != self._bound:
            raise EngineUsageError(
                f"max_grad_norm (the clipping bound C) was changed from {self._bound!r} to {self.clipping.max_norm!r} "
                "outside the engine: the noise, the privacy report and checkpoints must all use the C that clipped "
                "the batch. C is fixed by make_private (clipping='median' adapts it privately); to train with "
                "another C, start a new PrivacyEngine."
            )

    def _check_batch(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """The training forward's batch must be the loader's (same size) and sit on the parameters' device."""
        batch = batch_size_of(args, kwargs)
        if self._micro_batch_size is not None and batch != self._micro_batch_size:
            raise EngineUsageError(
                f"the model was called on a batch of {batch} examples, but the batch the private data loader just "
                f"yielded has {self._micro_batch_size}. Train only on the batches of the loader returned by "
                "make_private (its Poisson sampling is what the accountant assumes), one row per example: a batch "
                "from another loader, a slice of the batch, or augmentation that adds rows is not accounted."
            )
        first = next(t for t in [*args, *kwargs.values()] if isinstance(t, Tensor) and t.dim() > 0)  # as batch_size_of
        devices = {p.device for p in module.parameters() if p.requires_grad}
        if first.device not in devices:
            raise EngineUsageError(
                f"the batch is on device {first.device} but the model's parameters are on "
                f"{', '.join(sorted(map(str, devices)))}: move the batch first, e.g. x = x.to(device) with the "
                "model's device (nothing was computed)"
            )

    def _forward(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        settings = self._require_setup()
        if not self._step_open:
            raise EngineUsageError(
                "the model ran in training mode outside a batch of the data loader returned by make_private. "
                "Iterate over that loader (its Poisson sampling is what the accountant assumes); "
                "for evaluation use model.eval() or torch.no_grad()."
            )
        if self._forwarded:
            raise EngineUsageError(
                "a second training-mode forward on the same batch: its examples would be counted twice. "
                "Run one forward per batch (use torch.no_grad() or model.eval() for extra forwards)."
            )
        self._check_bound()
        self._check_batch(module, args, kwargs)
        self._forwarded = self._read_data = True
        mean = settings.loss_reduction == "mean"
        if self._tape is not None:
            batch = batch_size_of(args, kwargs)
            if batch > 0:
                scale = float(batch) if mean else 1.0
                return self._tape.forward(module, args, kwargs, batch, lambda grads: self._consume(grads, scale))
        params = trainable_parameters(module)
        out, collectors = per_example_forward(
            module, args, kwargs, self._chunk_size_for(params), mean,
            lambda grads, scale, start: self._consume(MaterializedGradients(grads), scale),
        )
        self._collectors.extend(collectors)
        return out

    def _chunk_size_for(self, params: Mapping[str, Tensor]) -> int:
        if self._chunk_size is not None:
            return self._chunk_size
        per_example = sum(p.numel() * p.element_size() for p in params.values())
        return max(1, _AUTO_CHUNK_BYTES // max(per_example, 1))

    def _consume(self, example_grads: ExampleGradients, scale: float) -> None:
        """Clip one batch (or chunk) of per-example gradients and add it to the step's sum (runs in backward).

        ``scale`` undoes a mean-reduced loss (each example's gradient arrives divided by the batch size).
        """
        settings, clipping = self.settings, self.clipping
        assert settings is not None and clipping is not None
        per_param = example_grads.norms(settings.norm) * scale  # type: ignore[arg-type]
        norms = per_param.square().sum(dim=1).sqrt() if settings.norm == "l2" else per_param.sum(dim=1)
        finite = torch.isfinite(norms)
        if not bool(finite.all()) and self._nonfinite == "error":
            bad = [name for j, name in enumerate(example_grads.names) if not bool(torch.isfinite(per_param[:, j]).all())]
            if self.distributed is not None:  # raised on every rank by optimizer.step() (see dpclip.distributed)
                return self.distributed.defer_error(f"{int((~finite).sum())} examples with NaN/inf gradients in {', '.join(bad)}")
            self._reset_step()
            raise NonFiniteGradientError(
                f"{int((~finite).sum())} of {len(norms)} examples have NaN/inf gradients (in {', '.join(bad)}); "
                "the step was abandoned and nothing was applied. Check the loss and inputs, lower the learning "
                "rate, or pass nonfinite='drop' to make_private to zero such examples privately."
            )
        if settings.per_layer:
            factors = clip_factors(per_param, layer_bound(clipping.max_norm, len(example_grads.names), settings.norm))  # type: ignore[arg-type]
        else:
            factors = clip_factors(norms, clipping.max_norm)[:, None].expand(-1, per_param.shape[1])
        factors = torch.where(finite[:, None], factors, 0.0)  # nonfinite="drop": those examples contribute 0
        for name, contribution in example_grads.weighted_sum(factors * scale).items():
            self._sum[name] = contribution if name not in self._sum else self._sum[name] + contribution
        if isinstance(clipping, MedianClipping):
            self._count += float(clipping.centred_count(norms))  # NaN norms count as "above C"

    def _release(self, compute: Callable[[], Any], like: Any) -> Any:
        """``compute()`` (add noise) here, or across ranks: the shared-seed draw or rank 0's broadcast."""
        return compute() if self.distributed is None else self.distributed.release(compute, like)

    def _step(self) -> None:
        """optimizer.step(): after the last micro-batch of a logical batch, noise, step and account."""
        settings = self._require_setup()
        if not self._step_open:
            raise EngineUsageError(
                "optimizer.step() was called outside a batch of the data loader returned by make_private"
            )
        self._check_bound()
        for collector in self._collectors:
            collector.finish()
        self._collectors = []
        if self._tape is not None:
            self._tape.finish()
        if not self._last_micro_batch:
            return
        self._check_budget()
        assert self._module is not None and self._optimizer is not None and self.clipping is not None
        params = trainable_parameters(self._module)
        summed = {name: self._sum.get(name, torch.zeros_like(p)) for name, p in params.items()}
        bound = self.clipping.max_norm
        if self.distributed is not None:  # Σ over ranks of the clipped sums (and counts), before the one noise draw
            summed, self._count, error = self.distributed.all_reduce(summed, self._count)
            if error is not None:
                self._reset_step()
                raise NonFiniteGradientError(error)
        noisy = self._release(lambda: add_noise(summed, settings.gradient_noise_multiplier, bound, settings.norm, self.noise), summed)  # type: ignore[arg-type]
        for name, p in params.items():
            p.grad = (noisy[name] / settings.expected_batch_size).to(p.dtype)
        self._optimizer.step()
        self.accountant.compose(self._step_event)
        self.steps += 1
        if isinstance(self.clipping, MedianClipping):
            count = torch.tensor(self._count, dtype=torch.float64)
            noisy_count = self._release(lambda: self.noise.noisy(count, settings.count_noise_multiplier, "gaussian"), count)
            self._bound = self.clipping.update(float(noisy_count), settings.expected_batch_size)
        self._reset_step()

    # ------------------------------------------------------------------------------------------------
    # Reporting
    # ------------------------------------------------------------------------------------------------
    def get_epsilon(self, delta: float | None = None) -> float:
        """ε spent so far at ``delta`` (default: the budget's δ)."""
        self._require_setup()
        return self.accountant.get_epsilon(self._delta(delta))

    def _delta(self, delta: float | None) -> float:
        if delta is None:
            if self.budget is None:
                raise PrivacyParameterError("pass delta= (no target_delta was set)")
            return self.budget[1]
        return delta

    @property
    def clip_history(self) -> list[float]:
        """The clipping bound C before each step and after the last (constant for fixed clipping)."""
        if isinstance(self.clipping, MedianClipping):
            return list(self.clipping.history)
        return [] if self.clipping is None else [self.clipping.max_norm] * (self.steps + 1)

    def privacy_report(self, delta: float | None = None) -> dict[str, Any]:
        """A JSON-ready summary: ε, δ, σ, q, steps, clipping, mechanism, accountant and a plain statement."""
        settings = self._require_setup()
        delta = self._delta(delta)
        if isinstance(self.accountant, RDPAccountant):
            eps, order = self.accountant.get_epsilon_and_order(delta)
            error = None
        else:
            (eps, error), order = self.accountant.get_epsilon_and_error(delta), None
        extra = None
        if settings.clipping == "median":
            extra = (
                f"Adaptive clipping (median tracking) releases a noisy count each step (noise multiplier "
                f"{2 * settings.count_noise_multiplier:.4g} on sensitivity 1); it is included in ε."
            )
        return {
            "epsilon": eps,
            "delta": delta,
            "order": None if order is None or math.isinf(order) else order,
            "epsilon_error": error,
            "accountant": self.accountant_name,
            "mechanism": settings.mechanism,
            "norm": settings.norm,
            "noise_multiplier": settings.noise_multiplier,
            "gradient_noise_multiplier": settings.gradient_noise_multiplier,
            "count_noise_multiplier": settings.count_noise_multiplier,
            "sample_rate": settings.sample_rate,
            "dataset_size": settings.dataset_size,
            "expected_batch_size": settings.expected_batch_size,
            "steps": self.steps,
            "clipping": settings.clipping,
            "max_grad_norm": self.clipping.max_norm if self.clipping else None,
            "clip_history": self.clip_history,
            "per_layer_clipping": settings.per_layer,
            "budget": None if self.budget is None else {"epsilon": self.budget[0], "delta": self.budget[1]},
            "history": [str(entry) for entry in self.accountant.history],
            "statement": privacy_statement(
                eps,
                delta,
                steps=self.steps,
                sample_rate=settings.sample_rate,
                noise_multiplier=settings.noise_multiplier,
                mechanism=settings.mechanism,
                order=order,
                accountant="RDP" if self.accountant_name == "rdp" else "PLD",
                extra=extra,
            ),
        }

    def progress(self, iterable: Iterable, delta: float | None = None, **tqdm_kwargs: Any) -> PrivacyProgress:
        """A tqdm bar over ``iterable`` showing ε spent (and whatever you pass to ``.log(loss=...)``)."""
        return PrivacyProgress(iterable, lambda: self.get_epsilon(delta), lambda: self.steps, **tqdm_kwargs)

    # ------------------------------------------------------------------------------------------------
    # Checkpoints
    # ------------------------------------------------------------------------------------------------
    def _signature(self) -> list[tuple[str, tuple[int, ...]]]:
        assert self._module is not None
        return [(name, tuple(t.shape)) for name, t in self._module.state_dict().items()]

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: model, optimizer, accountant history, C, RNG states, step counts.

        Save it with ``torch.save``; take it after ``optimizer.step()`` (between logical batches).
        """
        settings = self._require_setup()
        assert self._module is not None and self._optimizer is not None and self._loader is not None
        if self._step_open and self._read_data:
            raise EngineUsageError("checkpoint after optimizer.step(), not in the middle of a batch")
        return {
            "format": _STATE_FORMAT,
            "version": _STATE_VERSION,
            "settings": asdict(settings),
            "signature": self._signature(),
            "model": self._module.state_dict(),
            "optimizer": self._optimizer.state_dict(),
            "accountant": self.accountant.state_dict(),
            "clipping": {"max_norm": self.clipping.max_norm, "history": self.clip_history},  # type: ignore[union-attr]
            "budget": self.budget,
            "steps": self.steps,
            "noise": self.noise.state_dict(),
            "loader": self._loader.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict`; refuses (changing nothing) a checkpoint of another model or mechanism."""
        settings = self._require_setup()
        if not isinstance(state, Mapping) or state.get("format") != _STATE_FORMAT:
            raise PrivacyParameterError("not a dpclip PrivacyEngine checkpoint")
        if state.get("version") != _STATE_VERSION:
            raise PrivacyParameterError(f"unsupported checkpoint version {state.get('version')!r}")
        assert self._module is not None and self._optimizer is not None and self._loader is not None
        try:  # parse and validate every part before changing anything
            saved = PrivacySettings(**state["settings"])
            signature = [(name, tuple(shape)) for name, shape in state["signature"]]
            accountant = type(self.accountant).from_state_dict(state["accountant"])
            tensors = [(name, tuple(t.shape)) for name, t in state["model"].items()]
            groups = [len(group["params"]) for group in state["optimizer"]["param_groups"]]
            max_norm = check_positive("max_grad_norm", state["clipping"]["max_norm"])
            clip_history = [float(c) for c in state["clipping"]["history"]]
            budget = state["budget"]
            if budget is not None:
                budget = (check_positive("target_epsilon", budget[0]), check_delta(budget[1], "target_delta"))
            steps = check_count("steps", state["steps"], minimum=0)
            NoiseSource(secure_mode=self.secure_mode).load_state_dict(state["noise"])
            torch.Generator().set_state(state["loader"]["generator"])
            steps_in_epoch = check_count("steps_done_in_epoch", state["loader"]["steps_done_in_epoch"], minimum=0)
            torch.Generator().set_state(state["torch_rng"])
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as error:
            raise PrivacyParameterError(f"corrupt or truncated checkpoint: {error!r}") from None
        if saved != settings:
            raise PrivacyParameterError(
                f"the checkpoint was made with different privacy settings:\n  saved:   {saved}\n  current: {settings}\n"
                "call make_private with the same arguments as the run you resume"
            )
        if signature != self._signature():
            raise PrivacyParameterError("the checkpoint belongs to a different model (parameter names or shapes differ)")
        if tensors != signature:
            raise PrivacyParameterError("corrupt checkpoint: its model tensors do not match its own signature")
        if groups != [len(group["params"]) for group in self._optimizer.param_groups]:
            raise PrivacyParameterError(
                "the checkpoint's optimizer has other parameter groups than this one; build the optimizer as in the "
                "run you resume"
            )
        if accountant.steps != steps:
            raise PrivacyParameterError("corrupt checkpoint: the accountant history does not match the step count")
        foreign = [str(entry.event) for entry in accountant.history if entry.event != self._step_event]
        if foreign:
            raise PrivacyParameterError(
                f"corrupt checkpoint: its accountant history records {foreign[0]}, but every step of this engine is "
                f"{self._step_event}; the history was edited or comes from another run"
            )
        if self.distributed is not None:  # every rank must resume from the same state (see dpclip.distributed)
            self.distributed.check_same_state(state, self.secure_mode)
        self._module.load_state_dict(state["model"])
        self._optimizer.load_state_dict(state["optimizer"])
        self.accountant = accountant
        self.clipping.max_norm = self._bound = max_norm  # type: ignore[union-attr]
        if isinstance(self.clipping, MedianClipping):
            self.clipping.history = clip_history
        self.budget = budget  # type: ignore[assignment]
        self.steps = steps
        self.noise.load_state_dict(state["noise"])
        self._loader.load_state_dict({"generator": state["loader"]["generator"], "steps_done_in_epoch": steps_in_epoch})
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self._reset_step()
