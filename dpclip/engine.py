"""PrivacyEngine: wires the data path (per-example grads → clip → sum → noise → optimizer step) to a model, an
optimizer and a Poisson data loader, records every step with the accountant, and guards the budget.

Each job lives in its own module; the engine only wires them: :mod:`.setup` (arguments → plan),
:mod:`.grads.paths` (verified per-example forward), :mod:`.aggregation` (clip and sum), :mod:`.collective`
(one process or all ranks), :mod:`.step_guard` (the loop's state machine), :mod:`.report`, :mod:`.checkpoint`.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from accountants import ACCOUNTANTS, make_accountant
from accountants.checks import check_count, check_flag
from accountants.errors import PrivacyParameterError

from .aggregation import ClippedSum, noisy_release, release_checksum
from .clipping import ClippingPolicy, check_bound
from .collective import Collective, LocalCollective
from .distributed import DistributedContext, unwrap_model
from .errors import EngineUsageError, ModelNotSupportedError, NonFiniteGradientError
from .example_grads import ExampleGradients
from .grads.paths import PerExampleForward
from .guards import check_model, check_wrappable, claim_parameters
from .mechanism import DPSGDMechanism
from .module import PrivateModule
from .noise import NoiseSource
from .optimizer import DPOptimizer
from .per_sample import trainable_parameters
from .checkpoint import Checkpointing, state_digest
from .report import BudgetGuard, PrivacyReporting, check_budget
from .sampling import PoissonDataLoader
from .sharded import ShardedContext, ShardedModel
from .setup import calibrated_noise_multiplier, check_opacus_options, plan_training
from .step_guard import StepGuard

PrivacySettings = DPSGDMechanism  # the name under which engine.settings has always been public


def _optimizer_signature(optimizer: torch.optim.Optimizer) -> tuple[str, list[dict[str, Any]]]:
    """The optimizer's class and each parameter group's plain hyper-parameters (numbers, strings, flags and tuples
    of them: lr, momentum, betas, ...): what every rank's optimizer must share for the ranks' models to stay equal.
    Other values (a callable, a tensor) are left out: their repr may differ between equal ranks."""
    plain = (int, float, str, type(None))

    def comparable(value: Any) -> bool:
        return isinstance(value, plain) or (isinstance(value, tuple) and all(isinstance(v, plain) for v in value))

    return type(optimizer).__name__, [{k: v for k, v in sorted(group.items()) if k != "params" and comparable(v)}
                                      for group in optimizer.param_groups]


class PrivacyEngine(PrivacyReporting, Checkpointing):
    """Private training with an honest, live (ε, δ).

    >>> engine = PrivacyEngine()
    >>> model, optimizer, loader = engine.make_private(model, optimizer, loader,
    ...                                               noise_multiplier=1.1, max_grad_norm=1.0)
    >>> for x, y in loader:                      # the ordinary PyTorch loop
    ...     optimizer.zero_grad(); criterion(model(x), y).backward(); optimizer.step()
    >>> engine.get_epsilon(delta=1e-5)
    """

    def __init__(self, accountant: Literal["pld", "rdp"] = "pld", secure_mode: bool = False, seed: int | None = None) -> None:
        """``accountant``: "pld" (default; privacy loss distributions: the tightest certified ε, as the budget
        calculator ``dpclip-budget`` uses by default) or "rdp" (Rényi DP: looser, cheaper to query).
        ``secure_mode``: OS-seeded noise and sampling, float-attack-resistant noise (README § Secure noise).
        ``seed``: reproducible noise and sampling (not with secure_mode)."""
        if not isinstance(accountant, str) or accountant not in ACCOUNTANTS:
            hints = {"prv": " ('pld' is the same kind of accountant: privacy loss distributions)",
                     "gdp": " (Gaussian DP's CLT approximation can under-report ε; dpclip offers only certified bounds)"}
            hint = hints.get(accountant, "") if isinstance(accountant, str) else ""
            raise PrivacyParameterError(
                f"accountant must be 'pld' (privacy loss distributions: the tightest ε, the default) or 'rdp' (Rényi "
                f"DP: faster queries, looser ε), got {accountant!r}{hint}"
            )
        secure_mode = check_flag("secure_mode", secure_mode)
        if seed is not None:  # the loader seeds its generator with seed + 1: both must fit torch's 64-bit seed
            seed = check_count("seed", seed, minimum=0, maximum=2**63 - 2)
        self.accountant_name = accountant
        self.accountant = make_accountant(accountant)
        self.secure_mode = secure_mode
        self.noise = NoiseSource(seed=seed, secure_mode=secure_mode)
        self._seed = seed
        self._settings: DPSGDMechanism | None = None
        self.clipping: ClippingPolicy | None = None
        self._bound: float | None = None  # the clipping bound C the engine set; any other value is refused
        self.budget: tuple[float, float] | None = None
        self.budget_guard: BudgetGuard | None = None  # counts the steps left within the budget (report.py)
        self.steps = 0
        #: ``steps`` right after the last checkpoint load that did not continue this engine's own line (0 before
        #: any): the steps of its own line are ``steps - steps_at_load`` (loading its own state, or a continuation
        #: of it, keeps them its own: dpclip.checkpoint)
        self.steps_at_load = 0
        #: after each released step, the running sum of :func:`~dpclip.aggregation.release_checksum` over the steps
        #: so far (one entry per step; 0 up to the step of a checkpoint written without it). Checkpoints carry it,
        #: so an engine tells its own line (its state and continuations of it) from another branch (dpclip.checkpoint)
        self.release_trail: list[float] = []
        #: steps refused with NonFiniteGradientError (nonfinite="error"): each refusal tells, without noise, that its
        #: batch held an example with a non-finite gradient, which ε does not cover (the privacy report says so)
        self.nonfinite_refusals = 0
        #: released steps whose noise and batches came from seeded generators (every step without secure_mode, and
        #: those a checkpoint of such a run brings): ε then assumes the seeds stay secret (the privacy report says so)
        self.seeded_steps = 0
        self._module: nn.Module | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._loader: PoissonDataLoader | None = None
        self._forwarder: PerExampleForward | None = None
        self._sharded: ShardedModel | None = None  # FSDP2 models (dpclip.sharded)
        self._micro_index = 0  # the index, within its logical batch, of the micro-batch the loader handed out last
        self.distributed: DistributedContext | None = None  # set by make_private under torch.distributed
        self.collective: Collective = LocalCollective(self._abandon_step)
        self.guard = StepGuard()
        self._sum: ClippedSum | None = None

    @property
    def settings(self) -> DPSGDMechanism | None:
        """The mechanism fixed by :meth:`make_private` (None before); read-only."""
        return self._settings

    @settings.setter
    def settings(self, value: Any) -> None:
        raise EngineUsageError(
            "engine.settings cannot be changed: σ, q and the clipping mode are fixed by make_private, and the "
            "accountant charges every step for them. To train with other settings, start a new PrivacyEngine."
        )

    @property
    def grad_sample_path(self) -> str | None:
        """The per-example path in use: "layerwise" or "vmap" (None until verification has chosen one)."""
        return None if self._forwarder is None else self._forwarder.path

    def make_private(
        self, module: nn.Module, optimizer: torch.optim.Optimizer, data_loader: DataLoader, *,
        noise_multiplier: float, max_grad_norm: float, norm: Literal["l2", "l1"] = "l2",
        clipping: Literal["fixed", "median"] = "fixed", target_quantile: float = 0.5, clip_learning_rate: float = 0.2,
        count_noise_multiplier: float | None = None, per_layer: bool = False,
        loss_reduction: Literal["mean", "sum"] = "mean", max_physical_batch_size: int | None = None,
        chunk_size: int | None = None, nonfinite: Literal["error", "drop"] = "error",
        target_epsilon: float | None = None, target_delta: float | None = None, sample_rate: float | None = None,
        grad_sample_mode: Literal["auto", "layerwise", "vmap"] = "auto", distributed: bool | None = None,
        verify: Literal["first-step", "every-step", "off"] = "first-step", memory: Literal["fast", "low"] = "fast",
        noise_generator: torch.Generator | None = None, poisson_sampling: bool = True, batch_first: bool = True,
        criterion: Any = None,
    ) -> tuple[PrivateModule, DPOptimizer, PoissonDataLoader]:
        """Wrap ``module``, ``optimizer`` and ``data_loader`` for DP-SGD; returns their private versions.

        - ``norm``: "l2" clips to L2 norm ≤ C and adds Gaussian noise of std σ·C; "l1" clips to L1 norm ≤ C and adds
          Laplace noise of scale σ·C per coordinate. ``per_layer`` splits C over the parameters; a list (one per
          trainable parameter, in ``named_parameters()`` order) or dict (name → C_k) ``max_grad_norm`` clips each
          parameter to its own C_k, with noise for C = √Σ C_k² (L2) or Σ C_k (L1), as Opacus's per-layer clipping.
        - ``noise_multiplier=0``: a non-private baseline (loud warning, ε = ∞ reported, no finite budget allowed).
        - ``clipping="median"`` adapts C towards the ``target_quantile`` of the per-example norms (Andrew et al.
          2021); its noisy count is accounted.
        - The loader is replaced by Poisson sampling at q = batch_size / N (``sample_rate`` overrides); the noisy sum
          is divided by the expected batch size q·N. ``loss_reduction``: how your criterion combines examples.
          The loader's ``collate_fn`` must treat each example alone; one seen to combine examples (mixup across
          the batch) is refused (:mod:`dpclip.collation`).
        - ``target_epsilon``/``target_delta``: a budget; a step that would exceed it raises
          :class:`PrivacyBudgetExceeded` before any example is read.
        - ``nonfinite="drop"`` zeroes examples with NaN/inf gradients instead of raising (still private: such an
          example contributes 0, within C, and the decision depends on that example alone).
        - ``grad_sample_mode``: "layerwise" (per-example norms and clipped sums from each layer's activations and
          output gradients, through layer rules, :func:`dpclip.register_layer`), "vmap" (the whole model under
          vmap), or "auto" (default): the first of the two that verification accepts.
        - ``verify`` ("first-step", default; "every-step"; "off"): before the first release, check on a probe of
          the batch (and, for the layerwise path, on the whole batch) that the path's per-example gradients equal
          those of each example computed alone, that the model keeps examples apart, writes nothing into its own
          state and uses no parameter where the path cannot see it (:mod:`dpclip.grads.verify`); else
          :class:`ModelNotSupportedError` naming the layer. A first forward of one example is verified again on
          the first forward of two or more.
        - ``memory`` ("fast", default; "low"): on the layerwise path, "fast" keeps the per-example gradients that fit
          a 256 MiB budget per step between the norms and the clipped sum (a linear layer's then cost no ghost
          Grams); "low" keeps none: peak memory about the non-private step's, some speed lost on sequence models.
        - ``distributed`` (default None = automatic under an initialised process group with world size > 1 or a
          DDP model): every rank clips its shard of one global Poisson batch; the clipped sums are all-reduced and
          noised once (:mod:`dpclip.distributed`). Call it identically on every rank with the whole data set.
          An FSDP2 (``fully_shard``) model trains as it is: sums reduce-scattered to the shards, noise drawn per
          shard, per-rank checkpoints (:mod:`dpclip.sharded`).
        - Opacus names: ``noise_generator`` (a ``torch.Generator`` on the parameters' device) draws the noise;
          ``poisson_sampling=False``, ``batch_first=False`` and ``criterion`` are refused with the reason and what to
          use instead (README § Coming from Opacus).
        """
        check_wrappable(self._module, module, optimizer)
        dist_context = DistributedContext.resolve(distributed, module, self.secure_mode)
        wrapper, module = module, unwrap_model(module)  # DDP → ddp.module (its reducer is bypassed); FSDP1 refused
        try:  # a refusal on one rank alone is announced, so the others refuse too instead of waiting for it
            sharded = dist_context.attach(module) if isinstance(dist_context, ShardedContext) else None  # FSDP2
            check_model(module, optimizer)
            check_opacus_options(poisson_sampling=poisson_sampling, batch_first=batch_first, criterion=criterion,
                                 clipping=clipping, grad_sample_mode=grad_sample_mode)
            # Everything is validated into locals first: a refused call leaves the engine, model and optimizer as they were.
            noise = self.noise if noise_generator is None else NoiseSource.from_generator(
                noise_generator, module, self.secure_mode, dist_context is not None)
            plan = plan_training(
                data_loader, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                parameter_names=list(trainable_parameters(module)), norm=norm, clipping=clipping,
                target_quantile=target_quantile, clip_learning_rate=clip_learning_rate,
                count_noise_multiplier=count_noise_multiplier, per_layer=per_layer, loss_reduction=loss_reduction,
                chunk_size=chunk_size, nonfinite=nonfinite, target_epsilon=target_epsilon, target_delta=target_delta,
                sample_rate=sample_rate, grad_sample_mode=grad_sample_mode, verify=verify, memory=memory,
            )
            step_event = plan.mechanism.step_event()  # the accountant's event: its checks refuse here, before any change
            if sharded is not None and plan.grad_sample_mode == "vmap":
                raise PrivacyParameterError(
                    "grad_sample_mode='vmap' is not available for FSDP2 (fully_shard) models: sharded training runs on the "
                    "layerwise path, which needs no per-example weight gradients. Pass grad_sample_mode='auto' or 'layerwise'"
                )
            loader = PoissonDataLoader.from_loader(  # keeps the loader's collate_fn, workers, pinning, prefetching
                data_loader, plan.mechanism.sample_rate, max_physical_batch_size=max_physical_batch_size,
                seed=None if self._seed is None else self._seed + 1, secure_mode=self.secure_mode,
            )
        except Exception:
            if dist_context is not None:
                dist_context.announce_local_refusal()
            raise
        if dist_context is not None:  # same mechanism, model and seeds on every rank; this rank's shard
            fingerprint = dict(settings=plan.mechanism, clipping=plan.clipping, budget=plan.budget,
                               nonfinite=plan.nonfinite, secure_mode=self.secure_mode, accountant=self.accountant_name,
                               optimizer=_optimizer_signature(optimizer),
                               # (FSDP2: each rank holds its own shard's state)
                               optimizer_state=None if sharded is not None else state_digest({"state": optimizer.state_dict()["state"]}))
            shared_seed = dist_context.synchronize_setup(wrapper, module, loader, fingerprint, noise.seed, lambda: self.steps)
            if shared_seed is not None:
                noise = NoiseSource(seed=shared_seed, secure_mode=False)
        claim_parameters(module, self)  # refuses a model that another live engine trains
        self.noise = noise
        self.distributed = dist_context
        if dist_context is not None:
            self.collective = dist_context
        if sharded is not None:  # the tape and verification see the gathered parameters (FSDP2 keeps them)
            sharded.gather()
        mode = "layerwise" if sharded is not None else plan.grad_sample_mode
        self._sharded = sharded
        self._forwarder = PerExampleForward(module, mode, plan.verify, plan.chunk_size, plan.kept_bytes)
        self._settings, self.clipping, self.budget = plan.mechanism, plan.clipping, plan.budget
        self._bound = plan.clipping.max_norm
        self._step_event = step_event
        self._sum = ClippedSum(plan.mechanism, plan.clipping, plan.nonfinite, self.collective.defer_error,
                               sum_in_noise=dist_context is None and not self.secure_mode)
        loader.listener = self
        self._module, self._optimizer, self._loader = module, optimizer, loader
        optimizer._dpclip_wrapped = True  # type: ignore[attr-defined]
        return PrivateModule(module, self._forward), DPOptimizer(optimizer, self._step, self), loader

    def make_private_with_epsilon(
        self, module: nn.Module, optimizer: torch.optim.Optimizer, data_loader: DataLoader, *, target_epsilon: float,
        target_delta: float, epochs: float, max_grad_norm: float, **kwargs: Any,
    ) -> tuple[PrivateModule, DPOptimizer, PoissonDataLoader]:
        """As :meth:`make_private`, with the smallest noise multiplier that keeps ``epochs`` epochs within
        (target_epsilon, target_delta), which also becomes the budget."""
        sigma = calibrated_noise_multiplier(data_loader, target_epsilon, target_delta, epochs, self.accountant_name, kwargs)
        return self.make_private(
            module, optimizer, data_loader, noise_multiplier=sigma, max_grad_norm=max_grad_norm,
            target_epsilon=target_epsilon, target_delta=target_delta, **kwargs,
        )

    # -- the step, driven by the loader (begin_step / begin_micro_batch), the model and the optimizer -------
    def _require_setup(self) -> DPSGDMechanism:
        if self.settings is None:
            raise EngineUsageError("call engine.make_private(...) (or make_private_with_epsilon) first")
        return self.settings

    def _abandon_step(self) -> None:
        """Forget the current logical step (nothing of it was or will be released)."""
        self.guard.reset()
        self._clear_step()

    def _clear_step(self) -> None:
        """Empty what a logical step collects: the clipped sum, the per-example chunks and the forward's state
        guard (a step without a forward, an empty batch, then checks no earlier step's state)."""
        if self._sum is not None:
            self._sum.reset()
        if self._forwarder is not None:
            self._forwarder.collectors = []
            self._forwarder.state = None

    def begin_step(self) -> None:
        """Called by the Poisson loader before it samples a logical batch: the budget guard lives here."""
        self._require_setup()
        self.check_skipped()  # the batch handed out last was used or released
        self.guard.begin_step()  # refuses a sampled batch left without its step; opens this one
        try:
            check_budget(self)
        except Exception:
            self.guard.reset()  # refused before sampling: no batch is open (none to hand out again)
            raise
        self._clear_step()

    def return_unread_batch(self) -> bool:
        """Called by the Poisson loader when a new iteration starts: True if the batch it last handed out goes back
        to it unread (the model never ran on it, no step released it), see :meth:`StepGuard.return_unread`. In
        secure mode a draw cannot be repeated, so such a batch is refused instead (nothing changes)."""
        if self.secure_mode and self.guard.unread:
            raise EngineUsageError(
                "the private loader's last batch was handed out and never used (a loop left before the model ran on "
                "it), and in secure mode its draw cannot be repeated: handing out a fresh one would let a loop choose "
                "among draws. Load the last checkpoint (dpclip.load_checkpoint) to go on; with secure_mode, leave "
                "the loop only after optimizer.step()."
            )
        returned = self.guard.return_unread()
        if returned:
            self._clear_step()
        return returned

    def check_skipped(self) -> None:
        """Called by :meth:`begin_step` before the next batch is drawn, and by the Poisson loader when an iteration
        ends: a batch it handed out that no optimizer.step() released and the model never ran on was skipped, which is refused
        (on every rank at once in distributed training: the others meet this at their next collective)."""
        if self.guard.unread:
            self._refuse_skip()

    def _refuse_skip(self) -> None:
        """Raise the skip refusal (after telling the other ranks, in distributed training)."""
        error = self.guard.skipped_error()
        if self.distributed is not None:
            try:
                self.distributed.exchange_header("skipped batch")
            except EngineUsageError as out_of_step:
                raise error from out_of_step
        raise error

    def step_open(self) -> bool:
        """Whether the current logical step is still open (False once released or abandoned): the loader skips the
        remaining micro-batches of an abandoned step."""
        return self.guard.open

    def begin_micro_batch(self, index: int, last: bool, size: int | None = None, batch: Any = None) -> None:
        """Called by the Poisson loader before it yields a (micro-)batch of ``size`` examples (``batch``). A
        micro-batch left without optimizer.step() is a skip like a whole batch's: refused before the next one."""
        if index > 0 and self.guard.open and not self.guard.micro_stepped:
            self._refuse_skip()
        self.guard.begin_micro_batch(last, size, batch)
        self._micro_index = index

    def _add(self, example_grads: ExampleGradients, scale: float) -> None:
        self.guard.delivered = True
        assert self._sum is not None
        assert self._forwarder is not None
        # the last micro-batch's layerwise sum is formed at the release, inside the noise (one backward, one delivery;
        # the vmap path delivers chunk after chunk, each summed at once to keep one chunk's gradients at a time)
        last = self.guard.last and self._forwarder.path == "layerwise"
        try:
            self._sum.add(example_grads, scale, last=last)
        except NonFiniteGradientError:  # raised in backward (with several ranks: deferred to the release)
            self.nonfinite_refusals += 1
            raise

    def _forward(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        settings = self._require_setup()
        self.guard.before_forward(module, args, kwargs)
        check_bound(self.clipping, self._bound)
        assert self._forwarder is not None and self._optimizer is not None
        if self._sharded is not None:
            if self._micro_index == 0 and self.distributed is not None:
                # FSDP2's gather is a collective of its own: a rank out of step (a skipped batch, a checkpoint loaded
                # alone) would pair it with another rank's header and hang; this header refuses that on every rank
                self.distributed.exchange_header("forward")
            self._sharded.gather()
        self._forwarder.follow_trainable(module, self._optimizer, None if self._sharded is None else self._sharded.sharded)
        out = self._forwarder.forward(module, args, kwargs, settings.loss_reduction == "mean", self._add)
        self.guard.forward_ran()
        return out

    def _step(self) -> None:
        """optimizer.step(): after the last micro-batch of a logical batch, noise, account, then the optimizer's step."""
        settings = self._require_setup()
        assert self._module is not None and self._optimizer is not None and self.clipping is not None
        assert self._forwarder is not None and self._sum is not None
        # a parameter group appended by hand after the forward would be stepped with its raw gradient
        self._forwarder.check_optimizer_holds(self._module, self._optimizer, None if self._sharded is None else self._sharded.sharded)
        self.guard.before_step(self._forwarder.gradients_arrived())
        if self._sharded is not None and not self.guard.forwarded:
            raise EngineUsageError(
                "optimizer.step() without a forward on this (empty) batch: under FSDP2 the forward gathers the "
                "sharded parameters that the step's collectives work on, so every rank must run the model on every "
                "batch its private loader yields, an empty shard too (model(x) on the 0-row batch, then backward "
                "and step). Nothing was reduced or applied here."
            )
        check_bound(self.clipping, self._bound)
        if self._forwarder.state is not None:
            try:
                self._forwarder.state.check()  # the forward wrote into the model's state: refused before release
            except ModelNotSupportedError:
                self._abandon_step()
                raise
        self._forwarder.finish()
        if not self.guard.last:
            self.guard.micro_stepped = True
            return
        check_budget(self)
        params = trainable_parameters(self._module)
        try:
            noisy, count = noisy_release(self._sum, params, self.collective, self.noise, settings.expected_batch_size)
        except NonFiniteGradientError:
            self._abandon_step()
            self.nonfinite_refusals += 1
            raise
        except ModelNotSupportedError:  # a layer rule refused while the last batch was summed: nothing released
            self._abandon_step()
            raise
        fingerprint = release_checksum(noisy)  # before anything is released: nothing after it may fail uncharged
        self.collective.assign_gradients(params, noisy)
        self.release_trail.append((self.release_trail[-1] if self.release_trail else 0.0) + fingerprint)
        # released (p.grad holds it) from here on: charged before the optimizer runs, so a failing optimizer step
        # can neither leave an uncharged release nor let a retry release the same batch again
        self.accountant.compose(self._step_event)
        self.steps += 1
        self.seeded_steps += 0 if self.secure_mode else 1
        self._bound = self.clipping.after_release(count, settings.expected_batch_size)
        self._abandon_step()
        try:
            self._optimizer.step()
        except Exception as error:
            raise EngineUsageError(
                f"the optimizer's own step() failed after this batch's noisy gradient was released: "
                f"{type(error).__name__}: {error}. The release is charged (ε counts it) and the batch's step is "
                "closed, so a retry releases nothing. Fix the cause (an optimizer whose step() works on these "
                "parameters' device and dtype) and go on with this engine; the failed step may have updated part of "
                "the parameters or the optimizer's state. A checkpoint taken before it does not undo the release: "
                "resumed elsewhere, add this run's ε to the resumed one's."
            ) from error
