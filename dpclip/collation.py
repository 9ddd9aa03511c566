"""Whether a loader's ``collate_fn`` keeps examples apart: each row of a collated batch must be one example's own.

DP-SGD bounds each example's influence on a step by clipping its gradient to C (Abadi et al. 2016, Alg. 1), which
holds only if the example reaches one row of the batch. A ``collate_fn`` that combines examples (mixup or cutmix
with a partner from the same batch) lets one example reach several rows, so one example could move the release by
several times C while ε is charged for C. The engine cannot see inside the collate function, so
:func:`collate_mixing` tests it on two examples of the data set before training: their batch must hold, row for
row, what each example gives collated alone (on the region both share: padding to the batch's longest example, at
the end or at the start, is fine; so is a collate that reorders the rows, e.g. by length).

Random augmentation is compared under one seed for both calls (torch's, numpy's and Python's global generators,
each restored afterwards): an augmentation that draws per example, in order, gives the batch's first example the
draws it gets alone, so only that example's row is compared for a collate that draws random numbers. Three seeds
are tried, so a partner picked at random is seen in all but rare cases.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch.nn.utils.rnn import PackedSequence
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.data import DataLoader, default_collate

from .errors import EngineUsageError

Tensor = torch.Tensor

_SEEDS = (20_231, 77_003, 5_150)


@contextmanager
def seeded_global_generators(seed: int) -> Iterator[None]:
    """torch's CPU, numpy's and Python's global generators seeded with ``seed`` for the block, then restored."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def _plain_sequence(value: Any) -> bool:
    """A list or tuple holding no tensors (a text column's strings): one leaf, whatever its length."""
    return isinstance(value, (list, tuple)) and not any(isinstance(v, Tensor) for v in tree_flatten(list(value))[0])


def _rows(batch: Any) -> tuple[Any, list[Tensor]]:
    """The batch's structure and its tensors with at least one dim (the ones that hold rows)."""
    # (a PackedSequence holds the batch's time steps, not rows: one opaque leaf)
    leaves, spec = tree_flatten(batch, is_leaf=lambda v: _plain_sequence(v) or isinstance(v, PackedSequence))
    return spec, [leaf for leaf in leaves if isinstance(leaf, Tensor) and leaf.dim() > 0]


def _same_region(x: Tensor, y: Tensor) -> bool:
    """Whether ``x`` and ``y`` (one row each) agree on the region both have, aligned at the start or at the end."""
    if x.dim() != y.dim() or x.dtype != y.dtype:
        return False
    common = [min(a, b) for a, b in zip(x.shape, y.shape)]
    if 0 in common:
        return True
    for at_end in (False, True):
        region_x = tuple(slice(a - c, a) if at_end else slice(0, c) for a, c in zip(x.shape, common))
        region_y = tuple(slice(b - c, b) if at_end else slice(0, c) for b, c in zip(y.shape, common))
        u, v = x[region_x], y[region_y]
        if not (u.is_floating_point() or u.is_complex()):
            if torch.equal(u, v):
                return True
        elif torch.allclose(u.to(torch.complex128 if u.is_complex() else torch.float64),
                            v.to(torch.complex128 if v.is_complex() else torch.float64),
                            rtol=1e-5, atol=1e-6 * max(float(v.abs().max()), 1e-12)):
            return True
    return False


def _matches(pair: list[Tensor], alone: list[Tensor], row: int) -> bool:
    """Whether row ``row`` of a pair's tensors is what one example collated alone gives."""
    return all(_same_region(p[row], a[0]) for p, a in zip(pair, alone))


def _same_row(first: list[Tensor], second: list[Tensor], row: int) -> bool:
    """Whether row ``row`` is the same in two collated batches."""
    return all(_same_region(x[row], y[row]) for x, y in zip(first, second))


def _perturbed(item: Any) -> tuple[Any, bool]:
    """``item`` with 1 added to its floating-point tensors and arrays (same shapes), and whether any was changed."""
    changed = []

    def shift(value: Any) -> Any:
        if isinstance(value, Tensor) and value.is_floating_point():
            changed.append(True)
            return value + 1.0
        if isinstance(value, np.ndarray) and value.dtype.kind == "f":
            changed.append(True)
            return value + 1.0
        return value

    return tree_map(shift, item), bool(changed)


def _collated(collate_fn: Callable[[list], Any], groups: Sequence[list], seed: int) -> list[tuple[Any, list[Tensor]]]:
    """Each group collated under the same seed."""
    outputs = []
    for items in groups:
        with seeded_global_generators(seed):
            outputs.append(_rows(collate_fn(items)))
    return outputs


def _row_leaves(outputs: list[tuple[Any, list[Tensor]]], rows: Sequence[int]) -> list[list[Tensor]] | None:
    """The tensors holding one row per example in every output (``rows[k]`` rows in output k), or None if the
    outputs differ in structure or hold no such tensor."""
    specs, tensors = zip(*outputs)
    if any(spec != specs[0] or len(t) != len(tensors[0]) for spec, t in zip(specs, tensors)):
        return None
    kept = [j for j in range(len(tensors[0])) if all(t[j].shape[0] == n for t, n in zip(tensors, rows))]
    return [[t[j] for j in kept] for t in tensors] if kept else None


def collate_mixing(collate_fn: Callable[[list], Any], dataset: Sequence) -> str | None:
    """Why ``collate_fn`` is seen to mix examples of a batch (a sentence for the refusal), or None: it keeps them
    apart on the examples tried, or cannot be tested (torch's ``default_collate``, a data set of one example, a
    collate that fails on these examples or gives no tensor with one row per example).

    A deterministic collate must give, row for row, what each example gives alone. One that draws random numbers
    (whose draws for a batch need not be those for one example: masked-token collators draw over the padded
    batch) must leave example 0's row unchanged when example 1's floating-point values change (same shapes,
    same seed): a mixup partner's values reach the other row. Without floating-point values to change, a random
    collate cannot be tested."""
    if collate_fn is default_collate or len(dataset) < 2:
        return None
    with seeded_global_generators(_SEEDS[0]):  # augmentation in __getitem__ draws here; the generators are restored
        first, second = dataset[0], dataset[1]
    shifted, changeable = _perturbed(second)
    try:
        # random draws, told by the pair collated under several seeds (a coin flip per example agrees across
        # eight seeds with probability 2^-14)
        pairs = [_collated(collate_fn, [[first, second]], seed)[0] for seed in range(8)]
        leaves = _row_leaves(pairs, (2,) * len(pairs))
        if leaves is None:
            return None
        random_draws = not all(_same_row(leaves[0], other, row) for other in leaves[1:] for row in (0, 1))
        reason = None
        for seed in _SEEDS:
            if random_draws:
                if not changeable:
                    return None
                leaves = _row_leaves(_collated(collate_fn, [[first, second], [first, shifted]], seed), (2, 2))
                if leaves is None:
                    return None
                pair, changed = leaves
                kept = any(_same_row(pair, changed, row) for row in (0, 1))
            else:
                leaves = _row_leaves(_collated(collate_fn, [[first, second], [first], [second]], seed), (2, 1, 1))
                if leaves is None:
                    return None
                pair, alone_a, alone_b = leaves
                kept = ((_matches(pair, alone_a, 0) and _matches(pair, alone_b, 1))
                        or (_matches(pair, alone_a, 1) and _matches(pair, alone_b, 0)))
            if not kept:
                reason = (
                    "collated together, examples 0 and 1 of the data set give rows that are not each example's own ("
                    + ("under one random seed, example 0's row changes when example 1's values do" if random_draws
                       else "each collated alone gives another row")
                    + "): the collate_fn combines examples (mixup or cutmix with a partner from the batch, batch "
                    "statistics), so one example reaches several rows and its influence on a step is no longer bounded "
                    "by C"
                )
                break
    except Exception:  # noqa: BLE001 (the collate's own failures are the training loop's to report)
        return None
    return reason


def check_collate(data_loader: DataLoader) -> None:
    """Refuse a loader whose ``collate_fn`` is seen to mix examples (:func:`collate_mixing`), with the fix."""
    reason = collate_mixing(data_loader.collate_fn, data_loader.dataset)  # type: ignore[arg-type]
    if reason is not None:
        raise EngineUsageError(
            f"the data loader's collate_fn cannot be trained on privately: {reason}. Augment each example alone, in "
            "the data set's __getitem__ or per example inside collate_fn (mixup between examples of one batch has "
            "no DP-SGD guarantee at C). Nothing was changed."
        )
