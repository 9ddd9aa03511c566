"""Poisson sampling: every example joins every step's batch independently with probability q.

This is the sampling the accountant assumes (``PoissonSampled``). Batches vary in size and may be empty; an
empty batch is still a step (noise is still added and the step is accounted). A logical batch that does not
fit in memory is cut into physical micro-batches of at most ``max_physical_batch_size`` examples; the engine
adds noise once per logical batch.

Inclusion is decided with integers, never with floats: a float32 uniform lies on the 2⁻²⁴ grid, so the test
``torch.rand(N) < q`` includes an example with probability ⌈q·2²⁴⌉/2²⁴ — up to 5.96·q at q = 10⁻⁸ and slightly
above q for every q that is not a multiple of 2⁻²⁴ — while the accountant charges q. Here every example gets
a uniform integer U on [0, 2⁶²) and joins iff U < t = ⌊q·2⁶²⌋ (t computed exactly from the float q with
Python fractions), so P(include) = t/2⁶² ≤ q, short of q by less than 2⁻⁶²: never more than the accountant
charges. Sampling at a rate q' ≤ q is at least as private as at q: for add/remove neighbours the two output
laws are P and (1 − q')P + q'Q, and every f-divergence between them (the hockey-stick divergence behind
(ε, δ), the Rényi moments) is convex in q' by joint convexity and vanishes at q' = 0, hence nondecreasing in
q' (Balle, Barthe & Gaboardi 2018, "Privacy Amplification by Subsampling", §3 for the mixture form). See
:func:`bernoulli_indices` for how U is drawn.

Sampling always runs in the main process; reading and collating the items can run in worker processes with the
user's ``DataLoader`` settings (:meth:`PoissonDataLoader.from_loader`; the class docstring's "Loading" explains
how steps, checkpoints and empty batches stay exact although the workers read ahead).
"""

from __future__ import annotations

import hashlib
import math
import os
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset, default_collate
from torch.utils._pytree import tree_map

from accountants import steps_per_epoch as _steps_per_epoch
from accountants.errors import PrivacyParameterError
from accountants.checks import check_count, check_sample_rate

from .errors import EngineUsageError


#: Bits of the uniform integer U that decides an inclusion (two 31-bit halves; see :func:`bernoulli_indices`).
INCLUSION_BITS = 62
_HALF_BITS = INCLUSION_BITS // 2


def inclusion_threshold(sample_rate: float) -> int:
    """t = ⌊q·2^62⌋, exactly: an example joins the batch iff its uniform integer U ∈ [0, 2^62) is below t.

    Computed with :class:`fractions.Fraction` from the exact binary value of the float ``sample_rate``, so no
    rounding can push it above q·2^62. q = 1 gives t = 2^62 (every example joins).
    """
    q = Fraction(float(sample_rate))
    if not 0 <= q <= 1:
        raise PrivacyParameterError(f"sample_rate must lie in (0, 1], got {sample_rate!r}")
    return math.floor(q * 2**INCLUSION_BITS)


def inclusion_probability(sample_rate: float) -> Fraction:
    """The exact probability that :func:`bernoulli_indices` includes an example: t/2^62 with t =
    :func:`inclusion_threshold` (≤ q, and q − t/2^62 < 2^-62)."""
    return Fraction(inclusion_threshold(sample_rate), 2**INCLUSION_BITS)


def bernoulli_indices(n: int, sample_rate: float, generator: torch.Generator) -> torch.Tensor:
    """The sorted indices in [0, ``n``) that join a Poisson batch: each independently, with probability
    p = :func:`inclusion_probability` ≤ q.

    Each example's U = H·2^31 + L has independent halves H, L uniform on [0, 2^31) (``random_(0, 2**31)``:
    torch reduces one 32-bit Mersenne-Twister output modulo 2^31, which is exactly uniform), so U is uniform
    on [0, 2^62). With t = T_H·2^31 + T_L, "U < t" is "H < T_H, or H = T_H and L < T_L" (lexicographic order);
    L is drawn only for the examples with H = T_H (probability 2^-31 each), in index order, which changes the
    cost, not the law. So P(include) = T_H/2^31 + 2^-31·T_L/2^31 = t/2^62 exactly, and examples are
    independent (each uses its own draws). Everything comes from ``generator`` (its ``get_state()``
    captures the sequence). One pass over n 31-bit draws; the ties are looked for among the ≈ q·n candidates.
    """
    threshold = inclusion_threshold(sample_rate)
    if threshold >= 2**INCLUSION_BITS:  # q = 1
        return torch.arange(n)
    high_t, low_t = divmod(threshold, 2**_HALF_BITS)
    high = torch.empty(n, dtype=torch.int32).random_(0, 2**_HALF_BITS, generator=generator)
    candidates = (high <= high_t).nonzero().flatten()  # H < T_H (in), or H = T_H (decided by L)
    tied = high[candidates] == high_t
    if bool(tied.any()):
        low = torch.empty(int(tied.sum()), dtype=torch.int32).random_(0, 2**_HALF_BITS, generator=generator)
        keep = ~tied
        keep[tied] = low < low_t
        candidates = candidates[keep]
    return candidates


def bernoulli_mask(n: int, sample_rate: float, generator: torch.Generator) -> torch.Tensor:
    """:func:`bernoulli_indices` as a boolean mask of length ``n`` (the same draws, the same decisions)."""
    mask = torch.zeros(n, dtype=torch.bool)
    mask[bernoulli_indices(n, sample_rate, generator)] = True
    return mask


class StepListener(Protocol):
    def begin_step(self) -> None: ...

    def begin_micro_batch(self, index: int, last: bool, size: int | None = None, batch: Any = None) -> None: ...

    def return_unread_batch(self) -> bool: ...

    def check_skipped(self) -> None: ...

    def step_open(self) -> bool: ...


class _EmptyBatch:
    """What a worker returns for an empty Poisson (micro-)batch, where ``collate_fn([])`` would fail; the main
    process replaces it by :meth:`PoissonDataLoader._empty_batch`. Compared by type (it crosses a pickle)."""

    __slots__ = ()


class _CollateOrEmpty:
    """The user's ``collate_fn`` as the workers call it: an empty list of samples gives an :class:`_EmptyBatch`.
    A module-level class holding only ``collate_fn``, so it pickles whenever that does (``spawn`` workers)."""

    def __init__(self, collate_fn: Callable[[list], Any]) -> None:
        self.collate_fn = collate_fn

    def __call__(self, samples: Any) -> Any:
        if len(samples) == 0:
            return _EmptyBatch()
        return self.collate_fn(samples)


@dataclass(frozen=True)
class _MicroBatch:
    """What the batch sampler knew of a micro-batch when it sampled it (popped as its data come back)."""

    step: int  # logical step within the epoch (0-based)
    index: int  # micro-batch index within the step
    last: bool
    size: int


@dataclass(eq=False)
class _Run:
    """One iteration of a worker-backed loader: what has been sampled ahead of the user.

    ``states[k]`` is the sampling generator's state just before the k-th sampled step that has not yet been handed
    to the user; ``pending`` the micro-batches sampled and not yet handed out, in sampling order (= the order in
    which the torch DataLoader returns them)."""

    first_step: int
    states: deque = field(default_factory=deque)
    pending: deque = field(default_factory=deque)
    batches: Iterator[Any] | None = None  # the torch DataLoader's iterator, started at the first step


class _PoissonBatchSampler:
    """The ``batch_sampler`` of the internal torch DataLoader: the index lists of the micro-batches, sampled in the
    main process by the owning :class:`PoissonDataLoader`. The owner is held weakly, also by the running iteration
    (a persistent-workers iterator keeps it), so dropping the loader frees its workers without waiting for the
    cycle collector. It has no ``len()``: the number of micro-batches is random."""

    def __init__(self, owner: PoissonDataLoader) -> None:
        self._owner = weakref.ref(owner)

    def __iter__(self) -> Iterator[list[int]]:
        owner = self._owner()
        run = None if owner is None else owner._run
        return iter(()) if run is None else _sample_run(self._owner, run)


def _sample_run(owner_ref: weakref.ref, run: _Run) -> Iterator[list[int]]:
    """The batch sampler's iteration for ``run``; runs in the main process, inside the torch DataLoader's
    ``iter()``/``next()``. Each step: record the generator state, sample with :meth:`PoissonDataLoader.sample_indices`
    (secure-mode reseeding and ``shard`` included), split into micro-batches, and queue each micro-batch's
    (step, index, last, size) in ``run.pending`` before yielding its indices. Stops at the end of the epoch, or
    before sampling a step once ``run`` is no longer the live iteration (abandoned, or ``load_state_dict`` moved
    the position)."""
    step = run.first_step
    while True:
        owner = owner_ref()
        if owner is None or owner._run is not run or step >= owner.steps_per_epoch:
            return
        state = owner.generator.get_state()
        parts = owner._micro_batches(owner.sample_indices())
        run.states.append(state)
        del owner  # not held across the yields
        for index, part in enumerate(parts):
            run.pending.append(_MicroBatch(step, index, index == len(parts) - 1, len(part)))
            yield part.tolist()
        step += 1


def _accelerator_available() -> bool:
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    if accelerator is not None:
        return bool(accelerator.is_available())
    return torch.cuda.is_available()


def _worker_seed(seed: int | None, secure_mode: bool) -> int:
    """Seed of the generator the torch DataLoader draws its per-iteration worker base seed from: derived from
    ``seed`` by a hash (so its stream is unrelated to the sampling generator's), from the OS without a seed or in
    secure mode."""
    if seed is None or secure_mode:
        return int.from_bytes(os.urandom(8), "little")
    return int.from_bytes(hashlib.sha256(f"dpclip.sampling.worker-seeds:{seed}".encode()).digest()[:8], "little")


def _without_rows(batch: Any) -> Any:
    """A collated batch of one example with its rows removed (see :meth:`PoissonDataLoader._empty_batch`)."""
    if isinstance(batch, torch.Tensor):
        return batch[:0]
    if isinstance(batch, dict):
        return type(batch)((k, _without_rows(v)) for k, v in batch.items())
    if isinstance(batch, (list, tuple)) and not hasattr(batch, "_fields"):  # (a namedtuple keeps its fields)
        if len(batch) == 1 and not isinstance(batch[0], (torch.Tensor, dict, list, tuple)):
            return type(batch)()  # one example's value per row: no rows
        return type(batch)(_without_rows(v) for v in batch)
    return tree_map(lambda t: t[:0] if isinstance(t, torch.Tensor) else t, batch)


def map_style_size(dataset: Any) -> int:
    """N for a map-style data set; refuses an iterable-style one (even with a ``__len__``: Poisson sampling picks
    examples by index) and an empty one."""
    message = ("the data set must have a length and be indexable: an iterable-style data set cannot be "
               "Poisson-sampled (use a map-style Dataset, e.g. TensorDataset)")
    if isinstance(dataset, torch.utils.data.IterableDataset):
        raise PrivacyParameterError(f"{type(dataset).__name__} is an IterableDataset: {message}")
    try:
        size = len(dataset)
    except TypeError:
        raise PrivacyParameterError(message) from None
    if size == 0:
        raise PrivacyParameterError("the data set is empty: there is nothing to train on")
    return size


def _taken_over() -> EngineUsageError:
    """An iteration resumed in the middle of a logical batch that the loader no longer holds as handed out."""
    return EngineUsageError(
        "this iterator over the private loader was in the middle of a logical batch (micro-batches of "
        "max_physical_batch_size) that the loader has since handed out again or moved past: a newer iteration "
        "(iter(loader), a nested loop) took the batch back unread, or a checkpoint was loaded. Its other "
        "micro-batches would reach the model a second time. Nothing was handed out; iterate the loader with one "
        "loop at a time (or finish a batch's micro-batches before starting another iteration)."
    )


class PoissonDataLoader:
    """Iterate over Poisson-sampled batches of ``dataset``; ``len()`` is the number of logical steps per epoch.

    Sampling runs in the main process from its own ``torch.Generator`` (reseeded from the OS before every step
    in secure mode), so a checkpoint restores the exact sequence of batches.

    Each example joins a batch with probability :func:`inclusion_probability` (q rounded *down* to a
    multiple of 2^-62; see :func:`bernoulli_indices`), never more than the q the accountant charges.

    ``shard=(rank, world_size)`` (distributed training, see :mod:`dpclip.distributed`): the Bernoulli(q) mask is
    still drawn over all N indices of the *global* data set, and this process keeps the sampled indices with
    ``index % world_size == rank``. With the same generator seed on every rank the shards' union is exactly the
    single-process Poisson batch; with independent seeds (secure mode) each example's inclusion is still decided
    once, by its own rank, with probability q. ``len()`` and the expected batch size stay global.

    **Loading.** :meth:`from_loader` keeps the user's ``DataLoader`` settings (``num_workers``, ``pin_memory``,
    ``prefetch_factor``, ``persistent_workers``, ``worker_init_fn``, ``timeout``, ``multiprocessing_context``);
    the same keyword-only options can be given to the constructor. Without workers (and without pinning on a
    machine with an accelerator) every micro-batch is read in the main process when it is due (a ``TensorDataset``
    with the default collate is indexed directly). With ``num_workers > 0`` (or ``pin_memory`` with an
    accelerator) the items are read and collated by an ordinary ``torch.utils.data.DataLoader`` whose
    ``batch_sampler`` yields the index list of each micro-batch:

    - *Sampling stays here.* The batch sampler is iterated in the main process, from this loader's generator,
      with the same :func:`bernoulli_indices`, secure-mode reseeding, ``shard`` filter and micro-batch split as
      without workers, so a seed gives the same batches whatever ``num_workers``. The workers only read and
      collate the index lists they are sent (reading ahead is not a release).
    - *Steps are attributed when handed out, not when sampled.* Workers prefetch, so the sampler runs up to
      ``prefetch_factor · num_workers`` micro-batches ahead of the user. Each yielded index list leaves its
      (step, index, last, size) in a FIFO, popped as its data come back (the DataLoader keeps the order:
      ``in_order=False`` is not taken over). ``listener.begin_step()`` (the engine's budget and step guard) is
      called before the first micro-batch of a step is requested, so a refused step hands out nothing;
      ``listener.begin_micro_batch(...)`` right before each micro-batch is yielded; ``steps_done_in_epoch`` and
      ``batches_drawn`` count the steps handed out, as without workers.
    - *Checkpoints ignore the read-ahead.* The generator state before each step's sampling is recorded;
      :meth:`state_dict` returns that of the first step not yet handed out, so a restored loader draws exactly the
      batches the saved one would have handed out next. Leaving an iteration early (``break``, an exception, a
      refused step) shuts the workers down (unless ``persistent_workers``) and rewinds the generator to the same
      point, so the next iteration continues the epoch as it would without workers.
    - *Empty batches.* A worker returns a marker for an empty index list (``collate_fn([])`` fails) and the main
      process substitutes the usual empty batch (``collate_fn`` of one item, cut to zero rows).
    - *Worker seeds.* The DataLoader's per-iteration worker base seed is drawn from a private generator (derived
      from ``seed`` by a hash; from the OS without a seed or in secure mode), never from the global torch RNG, so
      the model's own randomness does not depend on ``num_workers``. That generator is not part of checkpoints:
      random augmentations in workers do not replay exactly after a resume (as with a plain DataLoader).
    """

    def __init__(
        self,
        dataset: Dataset,
        sample_rate: float,
        steps_per_epoch: int | None = None,
        collate_fn: Callable[[list], Any] | None = None,
        max_physical_batch_size: int | None = None,
        seed: int | None = None,
        secure_mode: bool = False,
        shard: tuple[int, int] | None = None,
        *,
        num_workers: int = 0,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
        persistent_workers: bool = False,
        worker_init_fn: Callable[[int], None] | None = None,
        timeout: float = 0,
        multiprocessing_context: Any = None,
    ) -> None:
        """``num_workers``, ``pin_memory``, ``prefetch_factor``, ``persistent_workers``, ``worker_init_fn``,
        ``timeout``, ``multiprocessing_context``: as for ``torch.utils.data.DataLoader`` (and checked by it, here);
        see the class docstring for how workers are used."""
        self.dataset_size = map_style_size(dataset)
        self.dataset = dataset
        self._sample_rate = check_sample_rate(sample_rate)
        self.steps_per_epoch = (
            _steps_per_epoch(self.sample_rate) if steps_per_epoch is None else check_count("steps_per_epoch", steps_per_epoch)
        )
        self.collate_fn = collate_fn or default_collate
        self.max_physical_batch_size = (
            None if max_physical_batch_size is None else check_count("max_physical_batch_size", max_physical_batch_size)
        )
        self.secure_mode = secure_mode
        if shard is not None:
            rank, world_size = (int(v) for v in shard)
            if not (world_size >= 1 and 0 <= rank < world_size):
                raise PrivacyParameterError(f"shard must be (rank, world_size) with 0 <= rank < world_size, got {shard!r}")
            shard = (rank, world_size)
        self.shard = shard
        self.generator = torch.Generator().manual_seed(
            int.from_bytes(os.urandom(8), "little") if seed is None else seed
        )
        self.steps_done_in_epoch = 0
        #: Logical batches drawn since this loader was created or restored (not saved in checkpoints);
        #: :mod:`dpclip.distributed` compares it across ranks at every collective.
        self.batches_drawn = 0
        self.listener: StepListener | None = None
        #: (generator state, steps_done_in_epoch, batches_drawn) before the last step handed out: where the loader
        #: goes back to when that step's batch returns unread (see :meth:`_return_unread`)
        self._handed_out: tuple[torch.Tensor, int, int] | None = None
        #: Called when an epoch's iteration ends (distributed training: a tagged check that every rank got there).
        self.on_epoch_end: Callable[[], None] | None = None
        self._empty: Any = None
        self._run: _Run | None = None  # the live worker-backed iteration, if any
        #: The torch DataLoader that reads and collates the micro-batches in worker processes (None: main process).
        self.workers_loader: DataLoader | None = None
        if num_workers > 0 or (pin_memory and _accelerator_available()) or persistent_workers or prefetch_factor is not None:
            # built here so that torch checks the options now (starting no process: workers start per iteration)
            self.workers_loader = DataLoader(
                dataset, batch_sampler=_PoissonBatchSampler(self), num_workers=num_workers,
                collate_fn=_CollateOrEmpty(self.collate_fn), pin_memory=pin_memory, timeout=timeout,
                worker_init_fn=worker_init_fn, multiprocessing_context=multiprocessing_context,
                generator=torch.Generator().manual_seed(_worker_seed(seed, secure_mode)),
                prefetch_factor=prefetch_factor, persistent_workers=persistent_workers,
            )

    @classmethod
    def from_loader(
        cls,
        data_loader: DataLoader,
        sample_rate: float,
        *,
        max_physical_batch_size: int | None = None,
        seed: int | None = None,
        secure_mode: bool = False,
    ) -> PoissonDataLoader:
        """A Poisson loader over ``data_loader``'s data set that keeps its ``collate_fn`` and loading settings:
        ``num_workers``, ``pin_memory``, ``prefetch_factor``, ``persistent_workers``, ``worker_init_fn``,
        ``timeout``, ``multiprocessing_context``. Its sampler, ``batch_size``, ``shuffle``, ``drop_last`` and
        ``generator`` are replaced by Poisson sampling at ``sample_rate``; ``in_order=False`` is not taken over
        (micro-batches must come back in sampling order to be attributed to their step)."""
        workers = int(data_loader.num_workers)
        return cls(
            data_loader.dataset, sample_rate, collate_fn=data_loader.collate_fn,
            max_physical_batch_size=max_physical_batch_size, seed=seed, secure_mode=secure_mode,
            num_workers=workers, pin_memory=bool(data_loader.pin_memory),
            prefetch_factor=data_loader.prefetch_factor if workers > 0 else None,
            persistent_workers=bool(data_loader.persistent_workers) if workers > 0 else False,
            worker_init_fn=data_loader.worker_init_fn, timeout=data_loader.timeout,
            multiprocessing_context=data_loader.multiprocessing_context if workers > 0 else None,
        )

    @property
    def sample_rate(self) -> float:
        """q, each example's probability of joining a batch: fixed when the loader is made (the engine charges
        every step at it)."""
        return self._sample_rate

    @sample_rate.setter
    def sample_rate(self, value: float) -> None:
        raise EngineUsageError(
            f"loader.sample_rate cannot be set (to {value!r}): every step's batch is drawn at q = {self._sample_rate} "
            "and the accountant charges that q, so another rate would spend more privacy than ε reports (or less, "
            "unreported). To sample at another rate, pass sample_rate= to make_private in a new PrivacyEngine."
        )

    @property
    def expected_batch_size(self) -> float:
        return self.sample_rate * self.dataset_size

    def __len__(self) -> int:
        return self.steps_per_epoch

    def sample_indices(self) -> torch.Tensor:
        """Indices of one Poisson batch (with ``shard``: this rank's part of the global batch). Refused, before
        anything is drawn, when the data set no longer has the size the loader was made for."""
        size = len(self.dataset)  # type: ignore[arg-type]
        if size != self.dataset_size:
            raise EngineUsageError(
                f"the data set changed size after make_private ({self.dataset_size} examples then, {size} now): the "
                "batches are drawn over the examples it had, and the expected batch size that scales the release was "
                "planned for them. Keep the data set fixed while training, or make a new PrivacyEngine for the new one"
            )
        if self.secure_mode:
            self.generator.manual_seed(int.from_bytes(os.urandom(8), "little"))
        indices = bernoulli_indices(self.dataset_size, self.sample_rate, self.generator)
        if self.shard is not None:
            rank, world_size = self.shard
            indices = indices[indices % world_size == rank]
        return indices

    def _micro_batches(self, indices: torch.Tensor) -> Sequence[torch.Tensor]:
        if self.max_physical_batch_size is None or len(indices) == 0:
            return [indices]
        return list(torch.split(indices, self.max_physical_batch_size))

    def _fetch(self, indices: torch.Tensor) -> Any:
        if len(indices) == 0:
            return self._empty_batch()
        if isinstance(self.dataset, TensorDataset) and self.collate_fn is default_collate:
            return [t[indices] for t in self.dataset.tensors]
        return self.collate_fn([self.dataset[i] for i in indices.tolist()])

    def _empty_batch(self) -> Any:
        """A batch with zero examples and the shapes/dtypes of a real one: example 0 collated, then every tensor cut
        to 0 rows and every per-example list (a list or tuple of one plain value, e.g. the strings of a text
        column) emptied, so that no value of example 0 reaches an empty step."""
        if self._empty is None:
            self._empty = _without_rows(self.collate_fn([self.dataset[0]]))
        return self._empty

    def __iter__(self) -> Iterator[Any]:
        if self.workers_loader is not None:
            return self._iter_workers()
        return self._iter_main()

    def _return_unread(self) -> None:
        """At the start of an iteration: a batch the last one handed out that the model never trained on and no
        step released (the loop left at the top of its body: ``if step == max_steps: break``) goes back, so this
        iteration hands it out again (the same draw) — as a run resumed from a checkpoint taken at that point does.
        Within one iteration a batch left without its step is refused; in secure mode (draws cannot be repeated) an
        unread batch is refused here too."""
        if self.listener is not None and self._handed_out is not None and self.listener.return_unread_batch():
            state, self.steps_done_in_epoch, self.batches_drawn = self._handed_out
            self.generator.set_state(state)
        self._handed_out = None

    def _end_epoch(self) -> None:
        """The epoch's last batch is handed out: refuse it if its step was skipped, then start the next epoch. A
        worker run still alive in another iteration (iterators alternated by hand) has sampled this epoch to its
        end: it is ended, so that iteration starts a run of the next epoch when it resumes."""
        if self.listener is not None:
            self.listener.check_skipped()
        if self._run is not None:
            self._end_run(self._run)
        self.steps_done_in_epoch = 0
        if self.on_epoch_end is not None:
            self.on_epoch_end()

    def _close_finished_epoch(self) -> None:
        """At the start of an iteration: an epoch whose last batch the previous iteration handed out before the loop
        left it (``break`` after the last step) ends here, so this iteration is the next epoch, not an empty one."""
        if self.steps_done_in_epoch >= self.steps_per_epoch:
            self._end_epoch()

    def _iter_main(self) -> Iterator[Any]:
        self._return_unread()
        self._close_finished_epoch()
        while self.steps_done_in_epoch < self.steps_per_epoch:
            if self.listener is not None:
                # The listener (the engine) refuses a skipped batch and a step past the budget here, before any
                # example is read.
                self.listener.begin_step()
            # where a checkpoint, or the next iteration if this step comes back unread, starts: before this step
            handed_out = self._handed_out = (self.generator.get_state(), self.steps_done_in_epoch, self.batches_drawn)
            parts = self._micro_batches(self.sample_indices())
            self.steps_done_in_epoch += 1
            self.batches_drawn += 1
            for index, part in enumerate(parts):
                if index > 0 and self._handed_out is not handed_out:
                    raise _taken_over()
                if index > 0 and self.listener is not None and not self.listener.step_open():
                    break  # the step was abandoned (e.g. a non-finite gradient): its other micro-batches are not used
                batch = self._fetch(part)
                if self.listener is not None:  # the engine checks that the model is called on this very batch
                    self.listener.begin_micro_batch(index, last=index == len(parts) - 1, size=len(part), batch=batch)
                yield batch
        self._end_epoch()  # (the epoch's last batch is checked for a skipped step too)

    # -- worker-backed iteration (see the class docstring) -------------------------------------------------
    def _start_run(self) -> _Run:
        if self._run is not None:
            # An earlier iteration is still alive (an iterator kept by hand, or a loop nested in another over this
            # loader): end it first, so the generator goes back to before the steps its workers read ahead.
            self._end_run(self._run)
        self._run = _Run(first_step=self.steps_done_in_epoch)
        return self._run

    def _end_run(self, run: _Run) -> None:
        """Stop the workers of ``run`` (kept with ``persistent_workers``) and, if it is still the live iteration,
        rewind the generator to before the first step sampled ahead and not handed out."""
        batches, run.batches = run.batches, None
        if batches is not None and not (self.workers_loader is not None and self.workers_loader.persistent_workers):
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
        if self._run is run:
            if run.states:
                self.generator.set_state(run.states[0])
            self._run = None
        run.states.clear()
        run.pending.clear()

    def _iter_workers(self) -> Iterator[Any]:
        assert self.workers_loader is not None
        self._return_unread()
        self._close_finished_epoch()
        run = self._start_run()
        try:
            while self.steps_done_in_epoch < self.steps_per_epoch:
                if self._run is not run:  # load_state_dict() (or another iteration) moved the position: go on from it
                    self._end_run(run)
                    run = self._start_run()
                if self.listener is not None:
                    # Before the step's first micro-batch is even requested: a refused step hands out nothing.
                    self.listener.begin_step()
                # before this step (the first sampled ahead and not handed out, or the generator's next draw)
                handed_out = self._handed_out = (run.states[0].clone() if run.states else self.generator.get_state(),
                                                 self.steps_done_in_epoch, self.batches_drawn)
                if run.batches is None:
                    run.batches = iter(self.workers_loader)
                step = self.steps_done_in_epoch
                last = started = False
                while not last:
                    if started and (self._handed_out is not handed_out or self._run is not run):
                        raise _taken_over()
                    started = True
                    batch = next(run.batches)
                    meta = run.pending.popleft()
                    last = meta.last
                    if meta.index == 0:
                        if meta.step != step:
                            raise RuntimeError(f"internal error: step {meta.step} came back while step {step} was due")
                        run.states.popleft()  # this step is handed out: a checkpoint now resumes after it
                        self.steps_done_in_epoch += 1
                        self.batches_drawn += 1
                    elif self.listener is not None and not self.listener.step_open():
                        continue  # the step was abandoned (e.g. a non-finite gradient): its other micro-batches go unused
                    if isinstance(batch, _EmptyBatch):
                        batch = self._empty_batch()
                    if self.listener is not None:
                        self.listener.begin_micro_batch(meta.index, last=meta.last, size=meta.size, batch=batch)
                    yield batch
        finally:
            self._end_run(run)
        self._end_epoch()  # (the epoch's last batch is checked for a skipped step too)

    def state_dict(self, unread_step_returns: bool = False) -> dict:
        """The sampling generator's state before the first step not yet handed out, and the steps handed out in
        this epoch (with workers, the steps sampled ahead are not part of it). ``unread_step_returns``: the last
        step handed out has not been used (a checkpoint taken at the top of the loop body), so the state is the one
        before it and a restored loader hands it out again."""
        if unread_step_returns and self._handed_out is not None:
            state, steps, _ = self._handed_out
            return {"generator": state.clone(), "steps_done_in_epoch": steps}
        run = self._run
        state = run.states[0].clone() if run is not None and run.states else self.generator.get_state()
        return {"generator": state, "steps_done_in_epoch": self.steps_done_in_epoch}

    def load_state_dict(self, state: dict) -> None:
        self._handed_out = None
        self._run = None  # a live worker-backed iteration drops what it sampled ahead and continues from here
        self.generator.set_state(state["generator"])
        self.steps_done_in_epoch = int(state["steps_done_in_epoch"])
        self.batches_drawn = 0
