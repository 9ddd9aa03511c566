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
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from fractions import Fraction
from typing import Any, Protocol

import torch
from torch.utils.data import Dataset, TensorDataset, default_collate
from torch.utils._pytree import tree_map

from accountants import steps_per_epoch as _steps_per_epoch
from accountants.errors import PrivacyParameterError
from accountants.checks import check_count, check_sample_rate


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
    ) -> None:
        try:
            self.dataset_size = len(dataset)  # type: ignore[arg-type]
        except TypeError:
            raise PrivacyParameterError("the data set must have a length (iterable-style data sets cannot be Poisson-sampled)") from None
        if self.dataset_size == 0:
            raise PrivacyParameterError("the data set is empty: there is nothing to train on")
        self.dataset = dataset
        self.sample_rate = check_sample_rate(sample_rate)
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
        #: Called when an epoch's iteration ends (distributed training: a tagged check that every rank got there).
        self.on_epoch_end: Callable[[], None] | None = None
        self._empty: Any = None

    @property
    def expected_batch_size(self) -> float:
        return self.sample_rate * self.dataset_size

    def __len__(self) -> int:
        return self.steps_per_epoch

    def sample_indices(self) -> torch.Tensor:
        """Indices of one Poisson batch (with ``shard``: this rank's part of the global batch)."""
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
        """A batch with zero examples and the shapes/dtypes of a real one."""
        if self._empty is None:
            one = self.collate_fn([self.dataset[0]])
            self._empty = tree_map(lambda t: t[:0] if isinstance(t, torch.Tensor) else t, one)
        return self._empty

    def __iter__(self) -> Iterator[Any]:
        while self.steps_done_in_epoch < self.steps_per_epoch:
            if self.listener is not None:
                # The listener (the engine) refuses a step past the budget here, before any example is read.
                self.listener.begin_step()
            parts = self._micro_batches(self.sample_indices())
            self.steps_done_in_epoch += 1
            self.batches_drawn += 1
            for index, part in enumerate(parts):
                batch = self._fetch(part)
                if self.listener is not None:  # the engine checks that the model is called on this very batch
                    self.listener.begin_micro_batch(index, last=index == len(parts) - 1, size=len(part), batch=batch)
                yield batch
        self.steps_done_in_epoch = 0
        if self.on_epoch_end is not None:
            self.on_epoch_end()

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "steps_done_in_epoch": self.steps_done_in_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.steps_done_in_epoch = int(state["steps_done_in_epoch"])
        self.batches_drawn = 0
