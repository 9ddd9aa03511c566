"""Poisson sampling: every example joins every step's batch independently with probability q.

This is the sampling the accountant assumes (``PoissonSampled``). Batches vary in size and may be empty; an
empty batch is still a step (noise is still added and the step is accounted). A logical batch that does not
fit in memory is cut into physical micro-batches of at most ``max_physical_batch_size`` examples; the engine
adds noise once per logical batch.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import torch
from torch.utils.data import Dataset, TensorDataset, default_collate
from torch.utils._pytree import tree_map

from accountants import steps_per_epoch as _steps_per_epoch
from accountants._validation import PrivacyParameterError, check_count, check_sample_rate


class StepListener(Protocol):
    def begin_step(self) -> None: ...

    def begin_micro_batch(self, index: int, last: bool, size: int | None = None, batch: Any = None) -> None: ...


class PoissonDataLoader:
    """Iterate over Poisson-sampled batches of ``dataset``; ``len()`` is the number of logical steps per epoch.

    Sampling runs in the main process from its own ``torch.Generator`` (reseeded from the OS before every step
    in secure mode), so a checkpoint restores the exact sequence of batches.

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
        self.listener: StepListener | None = None
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
        mask = torch.rand(self.dataset_size, generator=self.generator) < self.sample_rate
        indices = mask.nonzero().flatten()
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
            for index, part in enumerate(parts):
                batch = self._fetch(part)
                if self.listener is not None:  # the engine checks that the model is called on this very batch
                    self.listener.begin_micro_batch(index, last=index == len(parts) - 1, size=len(part), batch=batch)
                yield batch
        self.steps_done_in_epoch = 0

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "steps_done_in_epoch": self.steps_done_in_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.steps_done_in_epoch = int(state["steps_done_in_epoch"])
