"""A collate_fn that combines examples of a batch is refused at make_private; ones that keep them apart train.

The oracle for "mixes": removing one example from a batch moves the released sum by more than C when the collate
mixes (a closed-form neighbour pair, noise ~ 0), which DP-SGD's accounting at sensitivity C does not cover."""

from __future__ import annotations

import random
import warnings
from typing import Any, Callable

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

import dpclip
from dpclip.errors import EngineUsageError


def _stack(items: list) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])


def mixup_with_neighbour(items: list) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _stack(items)
    return 0.5 * x + 0.5 * x.roll(1, 0), y


def mixup_random(items: list) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _stack(items)
    lam = float(np.random.beta(0.4, 0.4))
    return lam * x + (1 - lam) * x[torch.randperm(len(x))], y


def cutmix_random(items: list) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _stack(items)
    x = x.clone()
    cut = random.randint(1, x.shape[1] - 1)
    x[:, :cut] = x[torch.randperm(len(x)), :cut]
    return x, y


def centred_by_batch(items: list) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _stack(items)
    return x - x.mean(0), y


def noisy_per_example(items: list) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _stack(items)
    return x + 0.1 * torch.randn_like(x), y


def flipped_per_example(items: list) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([x.flip(0) if random.random() < 0.5 else x for x, _ in items]), torch.stack([y for _, y in items])


def _padded(items: list, left: bool, by_length: bool) -> dict[str, Any]:
    if by_length:
        items = sorted(items, key=lambda item: -len(item[0]))
    longest = max(len(ids) for ids, _ in items)
    rows, masks = [], []
    for ids, _ in items:
        pad = torch.zeros(longest - len(ids), dtype=ids.dtype)
        rows.append(torch.cat([pad, ids]) if left else torch.cat([ids, pad]))
        ones, zeros = torch.ones(len(ids), dtype=torch.long), torch.zeros(len(pad), dtype=torch.long)
        masks.append(torch.cat([zeros, ones]) if left else torch.cat([ones, zeros]))
    return {"ids": torch.stack(rows), "mask": torch.stack(masks), "labels": torch.stack([y for _, y in items]),
            "text": [f"example {int(y)}" for _, y in items]}


class Sentences(Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.items = [(torch.randint(1, 30, (int(n),), generator=g), torch.tensor(i % 2))
                      for i, n in enumerate(torch.randint(2, 9, (24,), generator=g))]
        self.items[0] = (self.items[0][0][:3], self.items[0][1])  # example 0 shorter than example 1

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Any:
        return self.items[i]


def _make_private(dataset: Any, collate_fn: Callable, model: nn.Module) -> tuple:
    engine = dpclip.PrivacyEngine(seed=0)
    return engine, engine.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                       DataLoader(dataset, batch_size=8, collate_fn=collate_fn),
                                       noise_multiplier=1.0, max_grad_norm=1.0)


def _images() -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(40, 6, generator=g), torch.randint(0, 3, (40,), generator=g))


@pytest.mark.parametrize("collate_fn", [mixup_with_neighbour, mixup_random, cutmix_random, centred_by_batch])
def test_a_collate_that_combines_examples_is_refused_before_anything_changes(collate_fn: Callable) -> None:
    model = nn.Linear(6, 3)
    before = [p.detach().clone() for p in model.parameters()]
    state = (torch.random.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    with pytest.raises(EngineUsageError, match=r"collate_fn cannot be trained on privately.*combines examples.*"
                                               r"Augment each example alone"):
        _make_private(_images(), collate_fn, model)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert torch.equal(torch.random.get_rng_state(), state[0]) and random.getstate() == state[1]
    assert (np.random.get_state()[1] == state[2]).all()


@pytest.mark.parametrize("collate_fn", [_stack, noisy_per_example, flipped_per_example])
def test_a_collate_that_augments_each_example_alone_trains(collate_fn: Callable) -> None:
    class Jittered(Dataset):  # draws from torch's global generator in __getitem__, as torchvision transforms do
        def __init__(self) -> None:
            self.data = _images()

        def __len__(self) -> int:
            return len(self.data)

        def __getitem__(self, i: int) -> Any:
            x, y = self.data[i]
            return x + 0.01 * torch.randn_like(x), y

    data, model = Jittered(), nn.Linear(6, 3)
    state = torch.random.get_rng_state()
    engine, (model, optimizer, loader) = _make_private(data, collate_fn, model)
    assert torch.equal(torch.random.get_rng_state(), state)  # the check's draws leave the generators as they were
    for x, y in loader:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        break
    assert engine.steps == 1


class Bag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.head = nn.Embedding(30, 4), nn.Linear(4, 2)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head((self.emb(ids) * mask[..., None]).sum(1))


def test_a_mixing_collate_with_text_columns_and_padding_is_refused() -> None:
    """Lists of strings (one per example) and padding do not stop the check: mixed token embeddings are seen."""
    def mixed(items: list) -> dict[str, Any]:
        batch = _padded(items, left=False, by_length=False)
        batch["ids"] = torch.maximum(batch["ids"], batch["ids"].roll(1, 0))
        return batch

    with pytest.raises(EngineUsageError, match=r"combines examples"):
        _make_private(Sentences(), mixed, Bag())


@pytest.mark.parametrize("left", [False, True])
@pytest.mark.parametrize("by_length", [False, True])
def test_padding_and_reordering_collates_train(left: bool, by_length: bool) -> None:
    """Padding to the batch's longest example (at the end or the start) and sorting by length keep examples apart."""
    engine, (model, optimizer, loader) = _make_private(Sentences(), lambda items: _padded(items, left, by_length), Bag())
    for batch in loader:
        optimizer.zero_grad()
        F.cross_entropy(model(batch["ids"], batch["mask"]), batch["labels"]).backward()
        optimizer.step()
        break
    assert engine.steps == 1


def _released_sum(n: int) -> torch.Tensor:
    """The private step's Σ of clipped gradients (σ ~ 0, q = 1) on the first n of 8 examples collated by
    mixup_with_neighbour, checks off: what the engine released before the collate check refused it."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 5, generator=g) * 100
    x[7] = -3 * x[6]  # the removed example points against its neighbour
    model = nn.Linear(5, 1, bias=False)
    nn.init.zeros_(model.weight)
    engine = dpclip.PrivacyEngine(seed=0)
    with warnings.catch_warnings(), pytest.MonkeyPatch.context() as patch:
        warnings.simplefilter("ignore")
        patch.setattr("dpclip.setup.check_collate", lambda loader: None)
        private, optimizer, loader = engine.make_private(
            model, torch.optim.SGD(model.parameters(), lr=1.0),
            DataLoader(TensorDataset(x[:n], torch.zeros(n, 1)), batch_size=n, collate_fn=mixup_with_neighbour),
            noise_multiplier=1e-6, max_grad_norm=1.0, loss_reduction="sum", sample_rate=1.0)
    for xb, yb in loader:
        optimizer.zero_grad()
        ((private(xb) - (yb + 1.0)) ** 2).sum().backward()
        optimizer.step()
        break
    return model.weight.grad * n  # the release is the noisy sum over q·N = n


def test_why_mixing_collates_are_refused_one_example_moves_the_release_by_more_than_c() -> None:
    assert float((_released_sum(8) - _released_sum(7)).norm()) > 2.0  # sensitivity C = 1 is what ε is charged for


def test_a_batch_level_tensor_beside_the_rows_does_not_hide_mixing() -> None:
    """A collate that also returns one tensor for the whole batch (here the batch's size) is still checked on the
    tensors that hold one row per example."""
    def mixed_with_count(items: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, y = mixup_with_neighbour(items)
        return x, y, torch.tensor([len(items)] * 3)

    with pytest.raises(EngineUsageError, match="combines examples"):
        _make_private(_images(), mixed_with_count, nn.Linear(6, 3))


def test_a_masking_collate_that_draws_over_the_padded_batch_trains() -> None:
    """As transformers' DataCollatorForLanguageModeling: two Bernoulli draws over the whole padded batch, so
    example 0's draws in a batch are not those it gets alone; it was refused as mixing (a probe)."""
    def masked(items: list) -> dict[str, Any]:
        batch = _padded(items, left=False, by_length=False)
        chosen = torch.bernoulli(torch.full(batch["ids"].shape, 0.9)).bool()
        replaced = torch.bernoulli(torch.full(batch["ids"].shape, 0.5)).bool() & chosen
        batch["ids"] = batch["ids"].masked_fill(replaced, 1)
        return batch

    engine, (model, optimizer, loader) = _make_private(Sentences(), masked, Bag())
    batch = next(iter(loader))
    optimizer.zero_grad()
    F.cross_entropy(model(batch["ids"], batch["mask"]), batch["labels"]).backward()
    optimizer.step()
    assert engine.steps == 1
