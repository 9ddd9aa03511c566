"""scikit-learn's digits data, the digits CNN of the main job, and the small training helpers shared by the
digits jobs (``scripts/train_digits.py``, ``scripts/train_distributed.py``), the notebooks and the benchmarks.

The digits data (1,797 8x8 grayscale images of handwritten digits, 10 classes) ship with scikit-learn (imported
when the data are loaded), so everything here runs offline.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

__all__ = [
    "SPLIT_SEED",
    "TEST_FRACTION",
    "DigitsCNN",
    "EMA",
    "accuracy",
    "load_data",
    "make_optimizer",
    "make_scheduler",
]

SPLIT_SEED = 0  # the train/test split is fixed, whatever the training seed, so runs are comparable
TEST_FRACTION = 0.2


def load_data(device: torch.device) -> tuple[TensorDataset, TensorDataset]:
    """Stratified 80/20 split of digits, pixels scaled from 0..16 to [0, 1], shaped [N, 1, 8, 8]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=TEST_FRACTION, stratify=y, random_state=SPLIT_SEED
    )

    def tensors(xs: np.ndarray, ys: np.ndarray) -> TensorDataset:
        return TensorDataset(torch.from_numpy(xs).to(device), torch.from_numpy(ys).to(device))

    return tensors(x_train, y_train), tensors(x_test, y_test)


class DigitsCNN(nn.Module):
    """conv(1→16, 3x3) → GroupNorm → tanh → avgpool → conv(16→32, 3x3) → GroupNorm → tanh → avgpool → linear(128→10).

    About 6k parameters; no BatchNorm (it mixes examples, so dpclip refuses it); GroupNorm is per example.
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, kernel_size=3, padding=1),
            nn.GroupNorm(4, 16),
            nn.Tanh(),
            nn.AvgPool2d(2),  # 8x8 → 4x4
            nn.Conv2d(16, 32, kernel_size=3, padding=1),
            nn.GroupNorm(8, 32),
            nn.Tanh(),
            nn.AvgPool2d(2),  # 4x4 → 2x2
        )
        self.classifier = nn.Linear(32 * 2 * 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


def make_optimizer(name: str, params: Any, lr: float) -> torch.optim.Optimizer:
    """``"adam"``: Adam; anything else: SGD with momentum 0.9."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    return torch.optim.SGD(params, lr=lr, momentum=0.9)


def make_scheduler(name: str, optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Stepped once per optimizer step: cosine decay to 0 over ``total_steps``, or constant."""
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


class EMA:
    """Exponential moving average of a model's weights, updated after every optimizer step.

    Averaging the released iterates is post-processing (no privacy cost) and averages out much of the noise.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for mine, theirs in zip(self.model.state_dict().values(), model.state_dict().values()):
            if mine.is_floating_point():
                mine.lerp_(theirs, 1.0 - self.decay)
            else:
                mine.copy_(theirs)


@torch.no_grad()
def accuracy(model: nn.Module, data: TensorDataset) -> float:
    """Accuracy on a whole (in-memory) data set, in eval mode; the model's mode is restored."""
    was_training = model.training
    model.eval()
    x, y = data.tensors
    correct = (model(x).argmax(dim=1) == y).sum().item()
    model.train(was_training)
    return correct / len(y)
