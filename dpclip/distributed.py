"""DP-SGD over ``torch.distributed`` process groups: one private mechanism for the global batch.

What each rank does per logical step (the engine calls into :class:`DistributedContext`):

1. **Sampling.** Every rank holds the *whole* data set (indexable by global index) and a sampling generator
   seeded identically on all ranks (rank 0's seed, broadcast). Each draws the same Bernoulli(q) mask over all
   N indices and keeps the indices of its own shard, ``index % world_size == rank``. The union over ranks is
   therefore exactly one Poisson(q) sample of the global data set (the very batch a single process with the
   same seed would draw), whatever the shard of an example. In ``secure_mode`` each rank reseeds from its own
   OS CSPRNG instead: every example's inclusion is then decided by one rank alone, independently with
   probability q, which is still exactly Poisson(q) over N.
2. **Clipping.** Each rank computes, clips (to C) and sums the per-example gradients of its own examples.
3. **Aggregation.** The step's tagged header (see "Lock-step check" below) carries each rank's position, its
   centred count of examples below C (median clipping) and whether its examples had NaN/inf gradients
   (``nonfinite="error"``); then the clipped sums are all-reduced (SUM). A flagged rank makes every rank
   raise :class:`NonFiniteGradientError` from ``optimizer.step()`` (instead of one rank raising from
   ``backward()`` while the others wait in the all-reduce), and the sums are then not reduced at all.
4. **Noise, exactly once.** The global sum Σ_i clip(g_i) gets one draw of N(0, σ²C²) per coordinate (Laplace
   for L1), and the noisy count one draw of N(0, σ_b²):

   - default: every rank draws the *same* noise from a generator seeded identically on all ranks (rank 0's
     seed, broadcast). Ranks hold bitwise-identical sums (the all-reduce result) and identical generator
     states, so they compute the same release without a second collective;
   - ``secure_mode``: seeds come from each rank's OS CSPRNG and cannot be shared, so rank 0 alone draws and
     snaps the release, and broadcasts it.

   Either way the released value is Σ_{ranks} Σ_{i ∈ shard batch} clip(g_i) + Z with a single Z of the
   calibrated law: the same random variable as single-process training on the global batch (the sum is the
   same sum, merely added in another order). The divisor is the global q·N, the optimizer step is then
   identical on every rank, and every rank composes the same event into its accountant, so ε is that of
   single-process training with the same (q, σ, steps).

**Lock-step check.** Every collective operation of the private step (and of make_private, load_state_dict,
assert_in_sync and the end of each epoch of the loader) starts with one small tagged all-reduce, the *header*:
each rank writes into its own row (phase, logical batches its loader drew, steps released, error flag, median
count) and zeros elsewhere, so after the SUM every rank holds every rank's row. Only when all rows agree on
(phase, batch, step) are the payload collectives (the clipped sums, the secure-mode broadcasts, the state
digests) issued; otherwise every rank raises :class:`EngineUsageError` naming each rank's position. So a rank
that skipped a batch (or stopped early, or called load_state_dict alone) can neither pair its all-reduce with
another step's nor leave the other ranks waiting for the process-group timeout: the mismatch is reported at
the next collective on every rank. (A rank that stops calling collectives altogether, e.g. one that leaves
the training loop with a ``break`` while the others go on, still leaves them waiting until the
process-group timeout: there is no collective left to carry its tag.)

DistributedDataParallel: its reducer all-reduces and *averages* the ordinary (non-private) gradients into
``.grad`` during ``backward()``. The engine therefore never runs the DDP wrapper in training: it trains
``ddp.module`` directly (per-example gradients go to expanded copies of the parameters, or, on the layerwise
path, parameters have ``requires_grad=False`` during the forward; either way no hook of DDP's reducer fires
and DDP's ``prepare_for_backward`` is never called), and does its own all-reduce of the clipped sums. A
training-mode call of the DDP wrapper itself raises :class:`EngineUsageError`. DDP's buffer broadcast is
bypassed too, which is harmless because models with running statistics (BatchNorm) are refused anyway.

FSDP2 (``fully_shard``) models run through :class:`dpclip.sharded.ShardedContext`, a subclass of this context:
the same sampling, header and count, with the clipped sums reduce-scattered to the parameter shards and noise
drawn per shard. FSDP1 and other DTensor parameters (tensor parallelism) are refused.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from .errors import EngineUsageError, ModelNotSupportedError, PrivacyParameterError
from .example_grads import as_dense
from .collective import assign_gradients

if TYPE_CHECKING:  # pragma: no cover
    from .engine import PrivacyEngine
    from .sampling import PoissonDataLoader

Tensor = torch.Tensor


#: Examples read by :func:`dataset_digest` from a data set that is not a TensorDataset.
DIGEST_EXAMPLES = 32


def dataset_digest(dataset: Any) -> str:
    """A fingerprint of the data set's examples in their order, for comparing ranks: all of a ``TensorDataset``'s
    tensors, else :data:`DIGEST_EXAMPLES` examples at fixed positions (first, last and spread between), read with
    the global generators seeded alike on every rank (so augmentation in ``__getitem__`` draws the same) and
    restored. Tensors and arrays by their bytes, numbers and strings by value, other objects by type only."""
    from torch.utils.data import TensorDataset
    from torch.utils._pytree import tree_flatten

    from .collation import seeded_global_generators

    digest = hashlib.sha256()

    def add(value: Any) -> None:
        for leaf in tree_flatten(value)[0]:
            if isinstance(leaf, Tensor):
                digest.update(f"{leaf.dtype}{tuple(leaf.shape)}".encode())
                digest.update(leaf.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
            elif hasattr(leaf, "__array_interface__") or hasattr(leaf, "__array__"):
                import numpy as np

                array = np.ascontiguousarray(np.asarray(leaf))
                digest.update(f"{array.dtype}{array.shape}".encode() + array.tobytes())
            elif isinstance(leaf, (str, bytes, int, float, bool, type(None))):
                digest.update(repr(leaf).encode())
            else:
                digest.update(type(leaf).__qualname__.encode())

    size = len(dataset)
    if isinstance(dataset, TensorDataset):
        add(list(dataset.tensors))
    else:
        positions = sorted({0, size - 1, *(k * (size - 1) // (DIGEST_EXAMPLES - 1) for k in range(DIGEST_EXAMPLES))})
        with seeded_global_generators(0):
            for position in positions:
                add(dataset[position])
    return f"{size} examples, sha256 {digest.hexdigest()[:16]}"


def _layout_code(summed: Mapping[str, Tensor]) -> int:
    """48 bits of SHA-256 over the names, shapes and dtypes of a step's sums (exact in a float64 header)."""
    text = repr([(name, tuple(t.shape), str(t.dtype)) for name, t in summed.items()])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:6], "little")


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _is_ddp(module: nn.Module) -> bool:
    return torch.distributed.is_available() and isinstance(module, nn.parallel.DistributedDataParallel)


def unwrap_model(module: nn.Module) -> nn.Module:
    """The module the engine trains: ``ddp.module`` for a DistributedDataParallel wrapper, else ``module``
    (an FSDP2 model is trained as it is, :mod:`dpclip.sharded`).

    Refuses FSDP1, DTensor parameters outside ``fully_shard`` and FSDP2 set-ups dpclip cannot run
    (:class:`ModelNotSupportedError`, with the reason and the fix). Changes nothing.
    """
    from .sharded import sharding_refusal

    world = torch.distributed.get_world_size() if _dist_ready() else 1
    reason = sharding_refusal(module.module if _is_ddp(module) else module, world)
    if reason is not None:
        raise ModelNotSupportedError(f"this sharded model cannot be trained privately: {reason}")
    return module.module if _is_ddp(module) else module


def _guard_ddp_wrapper(wrapper: nn.Module) -> None:
    """Make a training-mode call of the DDP wrapper itself raise: its reducer would average non-private gradients."""

    def refuse(ddp: nn.Module, args: tuple) -> None:
        if ddp.training and torch.is_grad_enabled():
            raise EngineUsageError(
                "this DistributedDataParallel wrapper was passed to PrivacyEngine.make_private: train with the "
                "model make_private returned. DDP's own reducer would all-reduce and average non-private "
                "gradients; dpclip all-reduces the clipped sums itself. (Evaluation through it is fine.)"
            )

    wrapper.register_forward_pre_hook(refuse)


#: Header columns: (phase, logical batches drawn, steps released, non-finite flag, centred median count).
_PHASE, _BATCH, _STEP, _FLAG, _COUNT, _LAYOUT = range(6)
#: The phases of the header, with what a rank in that phase is doing (for the error message).
PHASES: dict[str, str] = {
    "make_private": "in make_private",
    "step": "in optimizer.step()",
    "end of epoch": "at the end of an epoch of the private loader",
    "load_state_dict": "in engine.load_state_dict",
    "assert_in_sync": "in assert_in_sync",
    "skipped batch": "refusing a batch its loop skipped without optimizer.step()",
    "forward": "in the training forward of a logical batch's first micro-batch (FSDP2)",
}
_PHASE_CODES = {name: code for code, name in enumerate(PHASES, start=1)}
_PHASE_NAMES = {code: name for name, code in _PHASE_CODES.items()}


def _default_device(backend: str) -> torch.device:
    if backend == "nccl" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@dataclass
class DistributedContext:
    """The engine's view of the process group: rank, world size and the collectives of the private step."""

    rank: int
    world_size: int
    #: True in secure mode: rank 0 draws the noise and broadcasts the release (seeds cannot be shared).
    broadcast_noise: bool
    #: Where collectives on host-side values (seeds, counts, flags) run: CUDA for NCCL, else CPU.
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    _pending_error: str | None = None
    #: The engine and loader whose position (steps released, batches drawn) tags every collective.
    _steps_released: Callable[[], int] | None = field(default=None, repr=False)
    _loader: Any = field(default=None, repr=False)

    # ---------------------------------------------------------------------------------------------------
    # Set-up
    # ---------------------------------------------------------------------------------------------------
    @classmethod
    def resolve(cls, distributed: bool | None, module: nn.Module, secure_mode: bool) -> DistributedContext | None:
        """The context for ``make_private(..., distributed=...)``, or None for single-process training.

        ``None`` (default): distributed when a default process group is initialised with world size > 1 or
        the model is a DDP wrapper. ``True``: requires an initialised process group. ``False``: this process
        trains on its own (refused for a DDP wrapper).
        """
        if distributed is not None and not isinstance(distributed, bool):
            raise PrivacyParameterError(f"distributed must be True, False or None (automatic), got {distributed!r}")
        from .sharded import ShardedContext, is_fsdp2

        ddp, fsdp2 = _is_ddp(module), is_fsdp2(module)
        if distributed is False:
            if ddp:
                raise EngineUsageError("distributed=False with a DistributedDataParallel model: pass model.module, or distributed=True")
            if fsdp2:
                raise EngineUsageError("distributed=False with an FSDP2 (fully_shard) model: its parameters are sharded "
                                       "across the ranks, which train it together; leave distributed out (or True)")
            return None
        if not _dist_ready():
            if distributed or ddp or fsdp2:
                raise EngineUsageError(
                    "distributed training needs an initialised process group: call "
                    "torch.distributed.init_process_group(...) (e.g. under torchrun) before make_private"
                )
            return None
        world_size = torch.distributed.get_world_size()
        if distributed is None and world_size == 1 and not ddp and not fsdp2:
            return None
        backend = str(torch.distributed.get_backend())
        kind = ShardedContext if fsdp2 else cls
        return kind(torch.distributed.get_rank(), world_size, broadcast_noise=secure_mode, device=_default_device(backend))

    def synchronize_setup(
        self, wrapper: nn.Module, module: nn.Module, loader: PoissonDataLoader, fingerprint: Mapping[str, Any],
        noise_seed: int, steps_released: Callable[[], int], checked: bool = False,
    ) -> int | None:
        """At make_private, after every local check: make sure every rank has the same mechanism, then give all
        ranks rank 0's model (as DDP does), rank 0's sampling seed (outside secure mode) and this rank's shard of
        the loader; returns rank 0's ``noise_seed`` for every rank's noise source (None in secure mode, where
        rank 0 draws the noise and broadcasts it). ``steps_released`` tells the lock-step checks how many steps
        this rank's engine released.

        ``fingerprint`` holds what must agree across ranks (settings, clipping strategy, budget, ...); the data
        set's size is part of the settings, its examples are compared by :func:`dataset_digest`. Raises :class:`PrivacyParameterError` on every rank, before changing
        anything, when a rank differs.
        """
        self._steps_released, self._loader = steps_released, loader
        if not checked:  # (``checked``: the caller compared the ranks already, before changing anything)
            self.check_same_setup(module, loader, fingerprint)
        if _is_ddp(wrapper):
            _guard_ddp_wrapper(wrapper)
        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                self._broadcast_(tensor)
        loader.shard = (self.rank, self.world_size)
        loader.on_epoch_end = self.end_of_epoch
        if self.broadcast_noise:  # secure mode: each rank samples from its own OS seeds; rank 0 draws the noise
            return None
        seeds: list[Any] = [noise_seed, int(loader.generator.initial_seed())] if self.rank == 0 else [None, None]
        torch.distributed.broadcast_object_list(seeds, src=0, device=self.device)
        loader.generator.manual_seed(int(seeds[1]))
        return int(seeds[0])

    def check_same_setup(self, module: nn.Module, loader: PoissonDataLoader, fingerprint: Mapping[str, Any]) -> None:
        """Every rank's settings, model layout and data (:func:`dataset_digest`) equal rank 0's, else
        :class:`PrivacyParameterError` on every rank, before anything changes."""
        rows = self.exchange_header("make_private")
        refused = [rank for rank in range(self.world_size) if rows[rank, _FLAG].item() > 0]
        if refused:
            raise PrivacyParameterError(
                f"rank(s) {refused} refused make_private's arguments on their own (their error says why), so no rank "
                "trains: fix the arguments there and call make_private again on every rank. Nothing was changed."
            )
        mine = {key: repr(value) for key, value in fingerprint.items()}
        mine.update(
            world_size=repr(self.world_size),
            model=repr([(name, tuple(p.shape), p.dtype, p.requires_grad) for name, p in module.named_parameters()]),
            data=dataset_digest(loader.dataset),
        )
        gathered: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(gathered, mine)
        for rank, other in enumerate(gathered):
            diff = sorted(k for k in set(gathered[0]) | set(other) if gathered[0].get(k) != other.get(k))
            if diff:
                raise PrivacyParameterError(
                    f"rank {rank} called make_private with other {', '.join(diff)} than rank 0: "
                    + "; ".join(f"{k}: {gathered[0].get(k)} (rank 0) vs {other.get(k)} (rank {rank})" for k in diff)
                    + ". Every rank must pass the same data set, in the same order (each rank trains on its share of "
                    "the sampled positions: a data set shuffled or split per rank would count some examples twice "
                    "and others never), the same privacy settings, the same model and the same optimizer, its state included."
                )

    def announce_local_refusal(self) -> None:
        """This rank refused make_private's arguments on its own: its part of the setup's header exchange, flagged,
        so that the other ranks (there already, or on their way) refuse too instead of waiting for this one."""
        try:
            self.exchange_header("make_private", flag=True)
        except EngineUsageError:  # out of step as well: every rank refuses on that already
            pass

    # ---------------------------------------------------------------------------------------------------
    # The private step
    # ---------------------------------------------------------------------------------------------------
    def defer_error(self, message: str) -> None:
        """Remember a non-finite-gradient error of this rank; it is raised on every rank at the step."""
        self._pending_error = self._pending_error or message

    def position(self) -> tuple[int, int]:
        """(logical batches this rank's loader drew, steps this rank's engine released): what every collective
        carries. Since make_private or the last load_state_dict; equal on all ranks while they are in step."""
        batches = int(getattr(self._loader, "batches_drawn", 0)) if self._loader is not None else 0
        steps = int(self._steps_released()) if self._steps_released is not None else 0
        return batches, steps

    def exchange_header(self, phase: str, count: float = 0.0, flag: bool = False, layout: int = 0) -> Tensor:
        """The tagged all-reduce that opens every collective operation; returns the (world_size, 6) header
        (one row per rank: phase, batch, step, flag, count, layout) after checking that all ranks are at the same
        (phase, batch, step) and, for a step, reduce the same parameters (``layout``: :func:`_layout_code` of
        the sums). Raises :class:`EngineUsageError` on every rank otherwise (all ranks see the same header, so
        all of them decide alike), before any payload collective is issued."""
        if phase not in _PHASE_CODES:
            raise ValueError(f"unknown phase {phase!r}; one of {sorted(_PHASE_CODES)}")
        batches, steps = self.position()
        header = torch.zeros(self.world_size, 6, dtype=torch.float64, device=self.device)
        header[self.rank] = torch.tensor(
            [_PHASE_CODES[phase], batches, steps, 1.0 if flag else 0.0, count, float(layout)], dtype=torch.float64
        )
        torch.distributed.all_reduce(header)
        rows = header.cpu()
        tags = [tuple(int(v) for v in rows[r, :3].tolist()) for r in range(self.world_size)]
        if any(tag != tags[0] for tag in tags):
            raise EngineUsageError(self._out_of_step_message(tags))
        layouts = [int(rows[r, _LAYOUT].item()) for r in range(self.world_size)]
        if any(code != layouts[0] for code in layouts):
            differ = [r for r, code in enumerate(layouts) if code != layouts[0]]
            raise EngineUsageError(
                f"ranks {differ} train other parameters than rank 0 in this step (a layer frozen or unfrozen with "
                "requires_grad on some ranks only?): their clipped sums would be added to other parameters' and the "
                "models would drift apart. Nothing was reduced or applied, on any rank. Change requires_grad "
                "identically on every rank, then restart every rank from the last checkpoint."
            )
        return rows

    def _out_of_step_message(self, tags: list[tuple[int, ...]]) -> str:
        where = "; ".join(
            f"rank {r} is {PHASES.get(_PHASE_NAMES.get(phase, ''), f'in unknown phase {phase}')} after its "
            f"loader drew {batch} logical batch(es) and its engine released {step} step(s)"
            for r, (phase, batch, step) in enumerate(tags)
        )
        differ = [r for r, tag in enumerate(tags) if tag != tags[0]]
        return (
            f"the ranks are out of step ({where}); ranks {differ} differ from rank 0. A rank skipped or repeated a "
            "batch (or called make_private, load_state_dict or assert_in_sync alone), so its collectives would "
            "have been paired with another step's. Nothing was reduced or applied in this call, on any rank. "
            "Every rank must run forward, backward and optimizer.step() on every batch its private loader yields "
            "(an empty shard too: do not `continue` past it), in the same order, and call make_private, "
            "load_state_dict and assert_in_sync together. Restart every rank from the last checkpoint."
        )

    def end_of_epoch(self) -> None:
        """Called by the loader when an epoch's iteration ends: a header exchange, so a rank that skipped the
        last batch of the epoch meets the others' optimizer.step() with a clear error instead of a hang."""
        self.exchange_header("end of epoch")

    def all_reduce(self, summed: Mapping[str, Tensor], count: float) -> tuple[dict[str, Tensor], float, str | None]:
        """SUM-reduce the clipped sums and the centred count over ranks; also say whether any rank flagged
        non-finite gradients (then the caller abandons the step on every rank).

        The header (step tag, count, flags) is exchanged and checked first; the sums are reduced only when every
        rank is at the same step (see :meth:`exchange_header`)."""
        local_error, self._pending_error = self._pending_error, None
        header = self.exchange_header("step", count=count, flag=local_error is not None, layout=_layout_code(summed))
        bad = [rank for rank in range(self.world_size) if header[rank, _FLAG].item() > 0]
        if bad:
            here = f" (here: {local_error})" if local_error else ""
            return {}, 0.0, f"examples with NaN/inf gradients on rank(s) {bad}{here}; the step was abandoned on every rank"
        total = sum(float(header[rank, _COUNT].item()) for rank in range(self.world_size))  # same order everywhere
        summed = {name: as_dense(s) for name, s in summed.items()}  # (a sparse sum: an embedding's rows)
        return self._reduce_sums(summed), total, None

    def _reduce_sums(self, summed: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The payload of the step: Σ over ranks of every clipped sum (one all-reduce per dtype and device)."""
        buckets = self._buckets(summed)
        works = [torch.distributed.all_reduce(flat, async_op=True) for flat, _ in buckets]
        for work in works:
            work.wait()
        return self._unflatten(summed, buckets)

    def release(self, compute: Callable[[], Any], like: Tensor | Mapping[str, Tensor]) -> Any:
        """The noisy release: drawn on every rank from the shared generator, or (secure mode) drawn by rank 0
        and broadcast. ``compute`` adds the noise; ``like`` gives the shapes on ranks that do not draw.

        The engine calls it right after :meth:`all_reduce` of the same step, with no rank-dependent branch in
        between; that step's header already established that every rank is at this step, so the broadcast
        cannot be paired with another step's."""
        if not self.broadcast_noise:
            return compute()
        if self.rank == 0:
            released = compute()
        elif isinstance(like, Tensor):
            released = torch.empty_like(like)
        else:
            released = {name: torch.empty_like(t) for name, t in like.items()}
        for tensor in [released] if isinstance(released, Tensor) else released.values():
            self._broadcast_(tensor)
        return released

    def release_sums(self, add: Callable[[Any], dict[str, Tensor]], like: Mapping[str, Tensor], noise: Any) -> dict[str, Tensor]:
        """The noisy sums: ``add(noise)`` on every rank from the shared generator (or by rank 0, broadcast)."""
        return self.release(lambda: add(noise), like)

    def assign_gradients(self, params: Mapping[str, Tensor], noisy: Mapping[str, Tensor]) -> None:
        assign_gradients(params, noisy)

    # ---------------------------------------------------------------------------------------------------
    # Checks
    # ---------------------------------------------------------------------------------------------------
    def check_same_state(self, state: Mapping[str, Any] | None, secure_mode: bool, what: str = "load_state_dict",
                         refusal: Exception | None = None) -> None:
        """Raise :class:`EngineUsageError` on every rank unless every rank holds the same ``state`` (an engine
        state_dict) in all that must agree: model, optimizer, accountant, C, budget, steps and, outside secure
        mode, the noise and sampling generators. Ranks resumed from different states would release different
        noisy values (and so more than the accountant charges). torch's global RNG (dropout) may differ.
        ``refusal``: this rank refused the state on its own (a damaged file, a rewind); every rank then raises
        (this one its own error), instead of the others waiting for it."""
        if refusal is not None:
            mine: Any = {"refused": f"{type(refusal).__name__}: {refusal}"}
        else:
            assert state is not None
            mine = state_digest(state, secure_mode)
        self.exchange_header(what if what in _PHASE_CODES else "load_state_dict")
        gathered: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(gathered, mine)
        refused = [rank for rank, other in enumerate(gathered) if "refused" in other]
        if refused:
            if refusal is not None:
                raise refusal
            raise EngineUsageError(f"{what} was refused on rank(s) {refused} ({gathered[refused[0]]['refused']}); "
                                   "nothing was changed on any rank")
        bad = [rank for rank, other in enumerate(gathered) if other != gathered[0]]
        if bad:
            parts = sorted({k for rank in bad for k in gathered[0] if gathered[rank].get(k) != gathered[0][k]})
            raise EngineUsageError(
                f"{what}: the state on rank(s) {bad} differs from rank 0's in {', '.join(parts)}; nothing was "
                "changed. Every rank must resume from the same checkpoint (save it on rank 0 and load it "
                "everywhere, or save each rank's identical engine state)."
            )

    # ---------------------------------------------------------------------------------------------------
    # Helpers
    # ---------------------------------------------------------------------------------------------------
    def _broadcast_(self, tensor: Tensor) -> None:
        """In-place broadcast from rank 0 (through ``self.device`` for tensors the backend cannot send)."""
        if tensor.device == self.device or self.device.type == "cpu":
            torch.distributed.broadcast(tensor, src=0)
            return
        moved = tensor.to(self.device)
        torch.distributed.broadcast(moved, src=0)
        tensor.copy_(moved)

    @staticmethod
    def _groups(summed: Mapping[str, Tensor]) -> list[list[str]]:
        """The names of the sums by (dtype, device), in order: each rank issues the same collectives in the same order."""
        groups: dict[tuple[torch.dtype, torch.device], list[str]] = {}
        for name, t in summed.items():
            groups.setdefault((t.dtype, t.device), []).append(name)
        return list(groups.values())

    @classmethod
    def _buckets(cls, summed: Mapping[str, Tensor]) -> list[tuple[Tensor, list[str]]]:
        """One flat buffer per (dtype, device), so each rank issues the same few all-reduces in the same order."""
        return [(torch.cat([summed[n].reshape(-1) for n in names]), names) for names in cls._groups(summed)]

    @staticmethod
    def _unflatten(summed: Mapping[str, Tensor], buckets: list[tuple[Tensor, list[str]]]) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for flat, names in buckets:
            offset = 0
            for name in names:
                n = summed[name].numel()
                out[name] = flat[offset : offset + n].view_as(summed[name])
                offset += n
        return {name: out[name] for name in summed}


def _tensor_hash(tensors: Any) -> str:
    h = hashlib.sha256()

    def feed(value: Any) -> None:
        if isinstance(value, Tensor):
            t = value.detach().cpu().contiguous().reshape(-1)
            h.update(str((t.dtype, tuple(value.shape))).encode())
            h.update(t.view(torch.uint8).numpy().tobytes())
        elif isinstance(value, Mapping):
            for k in sorted(value, key=str):
                h.update(str(k).encode())
                feed(value[k])
        elif isinstance(value, (list, tuple)):
            for v in value:
                feed(v)
        else:
            h.update(repr(value).encode())

    feed(tensors)
    return h.hexdigest()


def state_digest(state: Mapping[str, Any], secure_mode: bool) -> dict[str, str]:
    """SHA-256 of each part of an engine ``state_dict`` that must be identical on every rank (per-rank state,
    torch's global RNG used by dropout, is left out; so are the OS-seeded generators of secure mode)."""
    keys = ["model", "optimizer", "accountant", "clipping", "budget", "steps", "settings"]
    if not secure_mode:
        keys += ["noise", "loader"]
    return {key: _tensor_hash(state.get(key)) for key in keys}


def assert_in_sync(engine: PrivacyEngine) -> None:
    """Raise :class:`EngineUsageError` unless every rank's engine state is identical (a debugging aid; call it
    between steps, on every rank; it hashes the model and optimizer state on the CPU, so call it rarely on
    large models). A no-op for single-process engines."""
    context = getattr(engine, "distributed", None)
    if context is not None:
        context.check_same_state(engine.state_dict(), engine.secure_mode, what="assert_in_sync")
