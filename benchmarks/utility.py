"""Accuracy at fixed ε on Fashion-MNIST (60,000 training / 10,000 test images, δ = 1e-5): dpclip and Opacus.

Two models, after Tramèr & Boneh (2021, "Differentially Private Learning Needs Better Features (or Much More
Data)"):

- ``scatternet``: ScatterNet features (2-D scattering, J = 2, L = 8: 81 channels of 7×7,
  :mod:`dpclip_examples.scattering`, computed once and cached under ``--cache-dir``, keyed by the data files'
  contents), normalised, then a linear classifier trained with DP-SGD. Two normalisations:
  ``groupnorm`` (GroupNorm without affine parameters over groups of channels, per example: a fixed function of
  each example alone, so it costs no privacy — Tramèr & Boneh's choice on Fashion-MNIST) or ``data`` (per-channel
  mean and variance of the features released with the Gaussian mechanism, as their "data normalisation": that
  release is charged to the run's accounting, see :func:`private_normalisation`). With ``center_noise`` > 0 (the
  configuration: 20) the group-normalised features are then centred on their mean, released with the Gaussian
  mechanism at that noise multiplier and charged like the statistics (:func:`private_centre`, DPSGD-F's
  preprocessing): on the validation split at ε = 3 this gave 90.84 % against 90.58 % (3 seeds).
- ``cnn``: an end-to-end CNN of tanh units (Tramèr & Boneh's MNIST/Fashion-MNIST CNN; optional GroupNorm and
  width) trained with DP-SGD on the pixels.

Every run trains with Poisson sampling at q = 1 / ⌈N / batch⌉ (as Opacus samples), σ calibrated by dpclip's PLD
accountant so that *everything* the run releases — the normalisation statistics where there are any, then the T
steps — meets (ε, δ); the same configuration (q, σ, C, T, optimiser, initial weights, released statistics) is
then trained under Opacus (``--libraries dpclip opacus``; ghost clipping for the ScatterNet's 39,700-weight linear
layer, hooks for the CNN), whose own accountant (PRV) reports its ε of the same history, the normalisation
release included. ``nonprivate`` trains the same model on the same inputs without privacy (Adam, cosine learning
rate, :data:`NONPRIVATE`), once per seed: the reference that shows what privacy costs. Hyper-parameters were tuned
on a validation split carved from the training set (``--tune``; the sweeps are in
``benchmarks/results/utility_tuning.json``), never on the test set; the final runs report test accuracy once, at
the end.

    OMP_NUM_THREADS=1 python benchmarks/utility.py                      # all: JSON + markdown + plot
    python benchmarks/utility.py --models scatternet --epsilons 3 --seeds 1
    python benchmarks/utility.py --smoke                                # tiny (a few hundred examples), seconds
    python benchmarks/utility.py --tune --models scatternet --grid lr=2,4,8   # validation sweep (appends to the tuning file)
"""

from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import itertools
import json
import math
import os
import runpy
import statistics
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MODELS = ("scatternet", "cnn")
LIBRARIES = ("dpclip", "opacus", "nonprivate")
PRIVATE_LIBRARIES = ("dpclip", "opacus")
EPSILONS = (1.0, 2.0, 3.0)
DELTA = 1e-5
SEEDS = 3
VALIDATION_SIZE = 10_000  # carved from the 60,000 training images by --tune
SPLIT_SEED = 0
RESULTS = HERE / "results"
REPORT_STEM = "utility_fashion_mnist"
TUNING_FILE = RESULTS / "utility_tuning.json"

# Final configurations (tuned at ε = 3 on the validation split: benchmarks/results/utility_tuning.json holds every
# sweep with its command line). The same hyper-parameters serve every ε; only σ changes with ε.
CONFIGS: dict[str, dict[str, Any]] = {
    "scatternet": {
        "batch": 8192, "epochs": 40, "lr": 16.0, "momentum": 0.9, "max_grad_norm": 0.1, "ema": 0.0, "schedule": "constant",
        "normalization": "groupnorm", "groups": 27, "flip": False,
        "center_noise": 20.0,  # > 0: centre the group-normalised features on their private mean (private_centre)
        "norm_noise": 8.0, "norm_clip_mean": 1.0, "norm_clip_square": 1.0,  # used by normalization="data"
    },
    "cnn": {
        "batch": 2048, "epochs": 40, "lr": 4.0, "momentum": 0.9, "max_grad_norm": 0.1, "ema": 0.99, "schedule": "constant",
        "width": 24, "groupnorm": False, "init": "gabor", "activation": "tanh",  # or "selu", "hardtanh"
        "pixels": "pm1",  # pixel scale (PIXEL_BACKGROUND): "pm1", [-1, 1]; "unit", [0, 1] (background 0, as zero padding)
        "center_noise": 0.0,  # > 0: centre the pixels on the private mean image (private_centre)
        # "flip_views": the logits averaged over the image and its mirror image; "random_flip": each drawn batch's
        # images mirrored at random (data-independent), both evaluated on the two views' mean logits
        # "multiplicity": the loss averaged over `views` random views of each image, each moved by up to `shift`
        # pixels and mirrored at random (augmentation multiplicity, De et al. 2022)
        "augment": "none", "views": 2, "shift": 2,
        "loss": "sse+focal:1",  # or "ce", "sse", "focal", "sse+focal:<weight>" (_criterion)
        "hidden": 256,  # units of the hidden linear layer (Tramèr & Boneh: 32)
        # activations in channels-last order after conv 1: same values, faster pooling (Opacus runs the default order)
        "channels_last": True,
    },
}
# The CNN's pixel scales by name, each with its background (blank pixel) value: [-1, 1] or [0, 1].
PIXEL_BACKGROUND = {"pm1": -1.0, "unit": 0.0}
# Opacus's per-example gradient mode per model: the ScatterNet's linear layer has 39,700 weights, so "hooks" forms
# 8,192 × 39,700 per-example gradients (1.3 GB) every step (~1.7 s); ghost clipping computes their norms without
# forming them (the same clipped sum). The CNN's hidden layer (768 × 256 weights) likewise: at batch 2,048 hooks
# took 5.2 s a step, ghost 1.7 s (one thread, 2026-12-02, beside two other runs); ghost's clipped sum matched a
# brute-force clip loop to 4e-5 (relative) on this CNN.
OPACUS_MODE = {"scatternet": "ghost", "cnn": "ghost"}
# The non-private reference of the same model on the same inputs (what privacy costs): Adam, learning rate decayed
# by a cosine over the run, shuffled batches; checked on the validation split (utility_tuning.json) like the rest.
NONPRIVATE = {"lr": 1e-3, "batch": 256, "epochs": {"scatternet": 15, "cnn": 20}}
SMOKE_OVERRIDES = {"batch": 64, "epochs": 2}
TRACKED_EMA = (0.9, 0.99, 0.995, 0.999)  # --tune also reports these weight averages' validation accuracy
SMOKE_SIZES = (384, 128)  # training, test examples in --smoke

# Published anchors (test accuracy, %) for the table and the plot.
# Published test accuracies on Fashion-MNIST at δ = 1e-5 (one file, also read by render_tables.py for README).
ANCHORS = json.loads((HERE / "fashion_mnist_anchors.json").read_text())


# ---------------------------------------------------------------------------------------------------------------
# Data and features
# ---------------------------------------------------------------------------------------------------------------
def _files_digest(files: dict[str, Path]) -> str:
    digest = hashlib.sha256()
    for key in sorted(files):
        digest.update(key.encode())
        digest.update(hashlib.sha256(Path(files[key]).read_bytes()).digest())
    return digest.hexdigest()[:16]


SCATTER = {"J": 2, "L": 8, "max_order": 2}
SCATTER_VERSION = "kymatio-0.3.0-exact-1"  # bump when the transform's numbers change: old caches are then ignored


def scatter_features(data: Any, cache_dir: Path | None, *, progress: bool = True, flip: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """ScatterNet features of the training and test images (mirrored left–right with ``flip``), float32
    [N, 81, 7, 7] each.

    Cached in ``cache_dir`` (None: not cached) under a name keyed by the four data files' contents and the
    transform (so another copy of the data, or another transform, never reads a stale cache).
    """
    from dpclip_examples.scattering import Scattering2D

    if flip:
        data = SimpleNamespace(train_images=np.ascontiguousarray(data.train_images[:, :, ::-1]),
                               test_images=np.ascontiguousarray(data.test_images[:, :, ::-1]), files=data.files)
    path = None
    if cache_dir is not None:
        key = hashlib.sha256(f"{_files_digest(data.files)}|{SCATTER}|{SCATTER_VERSION}".encode()).hexdigest()[:16]
        path = Path(cache_dir) / f"fashion_mnist_scatter_J{SCATTER['J']}_L{SCATTER['L']}{'_flipped' if flip else ''}_{key}.pt"
        if path.exists():
            cached = torch.load(path, weights_only=True)  # tensors and strings only
            return cached["train"], cached["test"]
    transform = Scattering2D(J=SCATTER["J"], shape=tuple(data.train_images.shape[1:]), L=SCATTER["L"], max_order=SCATTER["max_order"])
    start = time.perf_counter()
    train = transform.features(data.train_images, progress=progress)
    test = transform.features(data.test_images, progress=progress)
    if progress:
        print(f"scattering: {len(train) + len(test)} images in {time.perf_counter() - start:.1f} s "
              f"({torch.get_num_threads()} thread(s))", file=sys.stderr, flush=True)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"train": train, "test": test, "files": {k: str(v) for k, v in data.files.items()}}, tmp)
        os.replace(tmp, path)
    return train, test


def pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, 28, 28] → float32 [N, 1, 28, 28] in [-1, 1] (a fixed, data-independent scaling)."""
    return (torch.from_numpy(images).to(torch.float32)[:, None] / 127.5) - 1.0


# ---------------------------------------------------------------------------------------------------------------
# Normalisation of the ScatterNet features
# ---------------------------------------------------------------------------------------------------------------
def group_normalise(x: torch.Tensor, groups: int) -> torch.Tensor:
    """GroupNorm without affine parameters: each example's channels, in ``groups`` groups, to mean 0 and variance 1
    over (channels of the group × positions). Per example, no parameters: no privacy cost."""
    return F.group_norm(x, groups, eps=1e-5)


def _clip_rows(v: torch.Tensor, bound: float) -> torch.Tensor:
    norms = v.norm(dim=1, keepdim=True)
    return v * (bound / norms.clamp_min(1e-12)).clamp(max=1.0)


def private_normalisation(x: torch.Tensor, noise: float, clip_mean: float, clip_square: float,
                          generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Per-channel mean and variance of the features ``x`` [N, C, H, W], released with the Gaussian mechanism.

    Each example contributes its per-channel spatial means m_i ∈ R^C, clipped to L2 norm ≤ ``clip_mean``, and its
    per-channel spatial means of squares s_i, clipped to ≤ ``clip_square``; the two sums get Gaussian noise of std
    ``noise`` × bound and are divided by N (the data-set size, public as in DP-SGD's division by q·N). Variance =
    max(mean of squares − mean², 0). Two Gaussian mechanisms of noise multiplier ``noise`` on the whole data set
    (add/remove adjacency, sensitivity = the bound): the returned ``event`` is what the accountant must charge.
    The bounds are fixed constants (tuned on the validation split like any hyper-parameter), not quantiles of
    the data (Tramèr & Boneh's code took them from the data's median norm, a small unaccounted release).
    """
    from accountants import Composed, Gaussian

    n = len(x)
    flat = x.reshape(n, x.shape[1], -1).to(torch.float64)
    means = _clip_rows(flat.mean(-1), clip_mean)
    squares = _clip_rows((flat * flat).mean(-1), clip_square)
    mean = (means.sum(0) + noise * clip_mean * torch.randn(x.shape[1], generator=generator, dtype=torch.float64)) / n
    square = (squares.sum(0) + noise * clip_square * torch.randn(x.shape[1], generator=generator, dtype=torch.float64)) / n
    var = (square - mean * mean).clamp_min(0.0)
    event = Composed([Gaussian(noise)], count=2)
    info = {"event": event.to_dict(), "noise_multiplier": noise, "clip_mean": clip_mean, "clip_square": clip_square,
            "released_mean": mean.tolist(), "released_variance": var.tolist()}
    return mean.to(torch.float32), var.to(torch.float32), info


def private_centre(x: torch.Tensor, noise: float, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, Any]]:
    """The mean of the features ``x`` [N, ...] (each example's whole feature vector), released with the Gaussian
    mechanism, to subtract from every example: DPSGD-F's private centring (Sun, Suresh & Menon 2023, "The importance
    of feature preprocessing for differentially private linear optimization", Alg. 2).

    DP-SGD's noise on a linear model scales with the features' largest norm, its signal with their spread around
    the mean; centring shrinks the first, not the second. Each example's vector is clipped to L2 norm ≤ √d (d: the
    number of features), the most a group-normalised example can have (each group's squares sum to its size
    times v/(v + eps) < 1) or an image of pixels in [−1, 1], so the clip changes nothing there and bounds the
    sensitivity anywhere. The sum gets
    Gaussian noise of std ``noise`` × √d and is divided by N (public, as :func:`private_normalisation` does):
    one Gaussian mechanism of noise multiplier ``noise`` on the whole data set (add/remove adjacency), the
    returned ``event``.
    """
    from accountants import Gaussian

    n = len(x)
    flat = x.reshape(n, -1).to(torch.float64)
    bound = math.sqrt(flat.shape[1])
    total = _clip_rows(flat, bound).sum(0)
    mean = (total + noise * bound * torch.randn(flat.shape[1], generator=generator, dtype=torch.float64)) / n
    info = {"event": Gaussian(noise).to_dict(), "noise_multiplier": noise, "clip_norm": bound,
            "released_mean_norm": float(mean.norm())}
    return mean.to(torch.float32).view(x.shape[1:]), info


def standardise(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """(x − mean) / sqrt(var + 1e-5) per channel; channels whose released variance is 0 are set to 0 (as
    Tramèr & Boneh's ``standardize``)."""
    view = (1, -1, 1, 1)
    out = (x - mean.view(view)) / torch.sqrt(var.view(view) + 1e-5)
    return out * (var.view(view) != 0).to(out.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------
class ScatterLinear(nn.Module):
    """A linear classifier on (normalised) ScatterNet features [N, 81, 7, 7]; on [N, V, 81, 7, 7] (V views of each
    image: the image and its mirror image with ``flip``) it returns the mean of the V views' logits — a function
    of each example alone, so DP-SGD still clips one gradient per example."""

    def __init__(self, features: int, classes: int = 10) -> None:
        super().__init__()
        self.fc = nn.Linear(features, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 5:
            return self.fc(x.flatten(2)).mean(1)
        return self.fc(x.flatten(1))


def gabor_bank(out_channels: int, size: int, scales: tuple[float, ...] = (2.0, 3.5)) -> torch.Tensor:
    """``out_channels`` Gabor filters [out_channels, 1, size, size] for a first convolution's initial weights: for
    each envelope width σ in ``scales`` and each of out_channels / (2·len(scales)) orientations θ evenly spread over
    [0, π), the cosine and sine phases of exp(−|u|²/2σ²)·cos(2π·f·⟨u, (cos θ, sin θ)⟩ + φ) with f = 1/(1.6σ), each
    shifted to mean 0 and scaled to unit L2 norm. Fixed, data-independent numbers (no privacy cost): oriented edge
    and texture detectors as a handcrafted prior, the idea behind Tramèr & Boneh 2021's ScatterNet features, here
    only as the starting point of a CNN trained end to end."""
    per_phase = 2 * len(scales)
    if out_channels % per_phase:
        raise ValueError(f"out_channels must be a multiple of {per_phase} (2 phases × {len(scales)} scales)")
    orientations = out_channels // per_phase
    centre = (size - 1) / 2
    yy, xx = torch.meshgrid(torch.arange(size) - centre, torch.arange(size) - centre, indexing="ij")
    filters = []
    for sigma in scales:
        envelope = torch.exp(-(xx**2 + yy**2) / (2 * sigma**2))
        for k in range(orientations):
            theta = math.pi * k / orientations
            along = xx * math.cos(theta) + yy * math.sin(theta)
            for phase in (0.0, math.pi / 2):
                f = envelope * torch.cos(2 * math.pi * along / (1.6 * sigma) + phase)
                f = f - f.mean()
                filters.append(f / f.norm())
    return torch.stack(filters)[:, None]


class ChannelsLast(nn.Module):
    """The identity on values, returning its input in channels-last memory order. Placed after the first
    convolution, it keeps the layers after it in that order, where torch's CPU max-pooling kernel is several times
    faster than in the default order (2×2 windows at stride 1, in a dpclip step at batch 2,048 on one thread:
    79 against 14 ms per pooling call on average, torch.profiler)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last)


class FashionCNN(nn.Module):
    """Tramèr & Boneh's MNIST / Fashion-MNIST CNN (after Papernot et al. 2021): conv(width, 8×8, stride 2,
    pad 2) → tanh → maxpool(2, stride 1) → conv(2·width, 4×4, stride 2) → tanh → maxpool(2, stride 1) →
    linear(``hidden``) → tanh → linear(10); 26k parameters at width 16 and 32 hidden units. ``groupnorm``:
    GroupNorm after each conv; ``channels_last``: the activations after conv 1 in channels-last memory order (:class:`ChannelsLast`);
    ``activation``: tanh (the default), SELU or hardtanh in place of each tanh. On [N, V, 1, 28, 28] (V views of
    each image) it returns the mean of the views' logits, or with ``view_logits`` each view's logits [N, V, 10]."""

    def __init__(self, width: int = 16, groupnorm: bool = False, channels_last: bool = False, hidden: int = 32,
                 view_logits: bool = False, activation: str = "tanh") -> None:
        super().__init__()
        act = {"tanh": nn.Tanh, "selu": nn.SELU, "hardtanh": nn.Hardtanh}[activation]
        self.view_logits = view_logits  # on [N, V, ...]: each view's logits [N, V, 10] (the loss averages them)

        def norm(channels: int) -> nn.Module:
            return nn.GroupNorm(min(4, channels), channels) if groupnorm else nn.Identity()

        self.features = nn.Sequential(
            nn.Conv2d(1, width, 8, stride=2, padding=2), ChannelsLast() if channels_last else nn.Identity(), norm(width), act(), nn.MaxPool2d(2, 1),  # 28 → 13 → 12
            nn.Conv2d(width, 2 * width, 4, stride=2), norm(2 * width), act(), nn.MaxPool2d(2, 1),  # 12 → 5 → 4
        )
        self.classifier = nn.Sequential(nn.Linear(2 * width * 16, hidden), act(), nn.Linear(hidden, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 5:  # one call per view, so every layer call keeps one row per example (dpclip's layerwise path)
            logits = torch.stack([self.forward(x[:, v]) for v in range(x.shape[1])], 1)
            return logits if self.view_logits else logits.mean(1)
        return self.classifier(self.features(x).flatten(1))


def build_model(model: str, config: dict[str, Any], input_shape: tuple[int, ...]) -> nn.Module:
    if model == "scatternet":
        return ScatterLinear(int(np.prod(input_shape[-3:])))
    cnn = FashionCNN(width=int(config["width"]), groupnorm=bool(config["groupnorm"]),
                     channels_last=bool(config["channels_last"]), hidden=int(config["hidden"]),
                     view_logits=config["augment"] == "multiplicity", activation=str(config["activation"]))
    if config["init"] == "gabor":  # the first convolution starts as a Gabor bank, at the default init's mean norm
        conv = cnn.features[0]
        with torch.no_grad():
            norm = conv.weight.flatten(1).norm(dim=1).mean()
            conv.weight.copy_(gabor_bank(conv.out_channels, conv.kernel_size[0]) * norm)
    elif config["init"] != "default":
        raise ValueError(f"unknown init {config['init']!r}")
    return cnn


# ---------------------------------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------------------------------
class _Batches(TensorDataset):
    """A TensorDataset that a DataLoader reads a whole batch at once (``__getitems__``, one index per tensor),
    collated by :func:`_as_batch`: for Opacus, whose loader otherwise reads and stacks one example at a time
    (dpclip's Poisson loader indexes a TensorDataset directly)."""

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, ...]:
        index = torch.as_tensor(indices, dtype=torch.long)
        return tuple(t[index] for t in self.tensors)


def _as_batch(batch: Any) -> Any:
    return batch


class _RandomFlip:
    """A collate function that mirrors each image of a batch left–right with probability 1/2, from its own seeded
    generator: data-independent augmentation, part of the per-example function DP-SGD clips (no privacy cost)."""

    def __init__(self, seed: int, collate: Any) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.collate = collate

    def __call__(self, samples: Any) -> Any:
        x, y = self.collate(samples)
        return _mirrored_at_random(x, self.generator), y


def _mirrored_at_random(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image of ``x`` [N, C, H, W] mirrored left–right with probability 1/2 (one uniform draw per image)."""
    mirror = torch.rand(len(x), generator=generator) < 0.5
    return torch.where(mirror[:, None, None, None], x.flip(-1), x)


class _RandomViews:
    """A collate function that turns each image of a batch [N, C, H, W] into ``views`` random views
    [N, views, C, H, W]: each moved by up to ``shift`` pixels in each direction (the uncovered border filled with
    ``fill``, the background) and mirrored left–right with probability 1/2, from its own seeded generator. Data-
    independent augmentation inside the per-example function DP-SGD clips (no privacy cost)."""

    def __init__(self, seed: int, collate: Any, views: int, shift: int, fill: float = -1.0) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.collate, self.views, self.shift, self.fill = collate, views, shift, fill

    def __call__(self, samples: Any) -> Any:
        x, y = self.collate(samples)
        return torch.stack([self._view(x) for _ in range(self.views)], 1), y

    def _view(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        s = self.shift
        padded = F.pad(x, (s, s, s, s), value=self.fill)
        dy, dx = (torch.randint(0, 2 * s + 1, (n,), generator=self.generator) for _ in range(2))
        rows, cols = dy[:, None] + torch.arange(h), dx[:, None] + torch.arange(w)
        moved = padded[torch.arange(n)[:, None, None], :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
        return _mirrored_at_random(moved, self.generator).contiguous()


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's logits on ``x``; where it returns each view's logits [N, V, classes], their mean over views."""
    logits = model(x)
    return logits.mean(1) if logits.dim() == 3 else logits


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 2048) -> float:
    was = model.training
    model.eval()
    correct = sum(int((_logits(model, x[i:i + batch]).argmax(1) == y[i:i + batch]).sum()) for i in range(0, len(x), batch))
    model.train(was)
    return correct / len(y)


def shifted_views(x: torch.Tensor, pixels: int = 1) -> torch.Tensor:
    """[N, 1, H, W] → [N, 5, 1, H, W]: each image, then its copies moved by ``pixels`` down, up, right and left
    (zero fill). Evaluated through :class:`FashionCNN`'s view averaging: test-time augmentation, which touches no
    training data (no privacy cost)."""
    padded = F.pad(x, (pixels,) * 4)
    h, w = x.shape[-2:]
    crops = [(pixels, pixels), (0, pixels), (2 * pixels, pixels), (pixels, 0), (pixels, 2 * pixels)]
    return torch.stack([padded[..., i:i + h, j:j + w] for i, j in crops], 1)


def plan(epsilon: float, n: int, config: dict[str, Any], prior: Any | None) -> dict[str, Any]:
    """q = 1/⌈n/batch⌉, T = epochs/q steps, and the smallest σ (PLD) with ε(prior, then T steps) ≤ ``epsilon``."""
    from accountants import Composed, PoissonSampled, Gaussian, calibrate_noise, noise_multiplier_for

    batches = math.ceil(n / int(config["batch"]))
    q = 1.0 / batches
    steps = int(config["epochs"]) * batches
    if prior is None:
        sigma = noise_multiplier_for(epsilon, DELTA, q, steps)
    else:
        sigma = calibrate_noise(lambda s: Composed([prior, Composed([PoissonSampled(q, Gaussian(s))], steps)]),
                                epsilon, DELTA, 1)
    return {"sample_rate": q, "steps": steps, "steps_per_epoch": batches, "sigma": sigma,
            "expected_batch": q * n}


def train_one(model_name: str, library: str, epsilon: float, seed: int, config: dict[str, Any],
              train: tuple[torch.Tensor, torch.Tensor], evaluate: tuple[torch.Tensor, torch.Tensor],
              prior: Any | None, planned: dict[str, Any], track_ema: tuple[float, ...] = ()) -> dict[str, Any]:
    """Train ``model_name`` privately with ``library`` at ``planned`` (q, σ, T); ``prior``: an accountants event
    already released about the training data (the normalisation statistics), charged before the first step.
    ``track_ema``: decays of weight averages also evaluated at the end (post-processing; for --tune), where the
    CNN's final and averaged weights are also evaluated on :func:`shifted_views` (test-time augmentation)."""
    from dpclip_examples.digits import EMA  # weight averaging: post-processing, no privacy cost
    x, y = train
    q, sigma, steps = planned["sample_rate"], planned["sigma"], planned["steps"]
    C, lr, momentum = float(config["max_grad_norm"]), float(config["lr"]), float(config["momentum"])
    torch.manual_seed(seed)  # the same initial weights for both libraries
    if library == "opacus" and config.get("channels_last"):
        # the same function in the default memory order: Opacus 1.6's per-sample conv gradients are wrong on
        # channels-last activations (benchmarks/channels_last.py: 12.6 % off a brute-force clip loop)
        config = {**config, "channels_last": False}
    model = build_model(model_name, config, tuple(x.shape[1:]))
    if model_name == "scatternet":
        nn.init.zeros_(model.fc.weight)  # a linear model: start at 0 (Tramèr & Boneh do)
        nn.init.zeros_(model.fc.bias)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    criterion: Any = _criterion(str(config.get("loss", "ce")))  # the ScatterNet has no "loss" entry: cross-entropy
    if config.get("augment") == "multiplicity":
        criterion = _per_view(criterion)
    start = time.perf_counter()
    if library == "dpclip":
        import dpclip

        engine = dpclip.PrivacyEngine(seed=seed)  # PLD, the default
        if prior is not None:
            engine.accountant.compose(prior)  # the normalisation release, charged before any step
        collate = _augmenter(config, seed, torch.utils.data.default_collate)
        loader = DataLoader(TensorDataset(x, y), batch_size=int(config["batch"]), collate_fn=collate)
        model, optimizer, loader = engine.make_private(
            model, optimizer, loader, noise_multiplier=sigma, max_grad_norm=C, sample_rate=q,
            target_epsilon=epsilon, target_delta=DELTA,  # the budget guard: a step past ε would raise
        )
        module = model.module
    else:
        from opacus import PrivacyEngine

        engine = PrivacyEngine(accountant="prv")  # Opacus's default and tightest, as PLD is dpclip's
        if prior is not None:
            for noise, rate, count in _opacus_history(prior):
                engine.accountant.history.append((noise, rate, count))
        collate = _augmenter(config, seed + 7, _as_batch) or _as_batch
        loader = DataLoader(_Batches(x, y), batch_size=int(config["batch"]), collate_fn=collate)
        torch.manual_seed(seed + 1_000_003)  # Opacus draws its noise and batches from the global generator
        mode = OPACUS_MODE[model_name]
        kwargs = dict(module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=sigma, max_grad_norm=C,
                      poisson_sampling=True, grad_sample_mode=mode)
        if mode == "ghost":
            model, optimizer, criterion, loader = engine.make_private(criterion=criterion, **kwargs)
        else:
            model, optimizer, loader = engine.make_private(**kwargs)
        if abs(loader.sample_rate - q) > 1e-12:
            raise RuntimeError(f"Opacus samples at q = {loader.sample_rate}, the plan at {q}")
        module = model._module
    ema = EMA(module, float(config["ema"])) if float(config["ema"]) > 0 else None
    tracked = {decay: EMA(module, decay) for decay in track_ema}
    # a data-independent learning-rate schedule (no privacy cost), stepped once per step; the optimizer shares
    # its param_groups with the library's wrapper
    base = optimizer.original_optimizer if hasattr(optimizer, "original_optimizer") else optimizer
    if config["schedule"] == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(base, T_max=steps)
    elif config["schedule"] == "constant":
        scheduler = None
    else:
        raise ValueError(f"unknown schedule {config['schedule']!r}")
    taken = 0
    model.train()
    while taken < steps:
        for xb, yb in loader:
            optimizer.zero_grad()
            criterion(model(xb), yb).backward()
            optimizer.step()
            taken += 1
            if scheduler is not None:
                scheduler.step()
            if ema is not None:
                ema.update(module)
            for average in tracked.values():
                average.update(module)
            if taken == steps:
                break
    wall = time.perf_counter() - start
    final = module if ema is None else ema.model
    if library == "dpclip":
        report = engine.privacy_report(DELTA)
        reported, accountant = report["epsilon"], "pld"
    else:
        reported, accountant = engine.get_epsilon(DELTA), "prv"
        report = {"epsilon": reported, "delta": DELTA, "accountant": "prv (Opacus)",
                  "history": [list(entry) for entry in engine.accountant.history],
                  "noise_multiplier": sigma, "sample_rate": q, "steps": taken, "max_grad_norm": C}
    return {
        "model": model_name, "library": library, "target_epsilon": epsilon, "seed": seed,
        "q": q, "sigma": sigma, "steps": taken, "planned_steps": steps, "C": C, "lr": lr, "momentum": momentum,
        "batch": int(config["batch"]), "expected_batch": q * len(x), "epochs": int(config["epochs"]),
        "ema": float(config["ema"]), "schedule": config["schedule"], "accountant": accountant, "epsilon": reported,
        "path": engine.grad_sample_path if library == "dpclip" else OPACUS_MODE[model_name],
        "accuracy": accuracy(final, *evaluate), "wall_s": round(wall, 2), "privacy_report": report,
        **({"ema_accuracy": {str(d): accuracy(a.model, *evaluate) for d, a in tracked.items()}} if tracked else {}),
        **(_shift_views_accuracy(final, tracked, evaluate) if tracked and model_name == "cnn" else {}),
    }


def _augmenter(config: dict[str, Any], seed: int, collate: Any) -> Any:
    """The collate function of ``config["augment"]`` on top of ``collate`` (None where it augments nothing)."""
    augment = config.get("augment", "none")
    if augment == "random_flip":
        return _RandomFlip(seed, collate)
    if augment == "multiplicity":
        return _RandomViews(seed, collate, int(config["views"]), int(config["shift"]),
                            fill=PIXEL_BACKGROUND[config["pixels"]])
    return None


def _shift_views_accuracy(final: nn.Module, tracked: dict[float, Any], evaluate: tuple[torch.Tensor, torch.Tensor]) -> dict[str, Any]:
    """The final and averaged weights' accuracy on :func:`shifted_views` of single-view evaluation images (built
    once), under ``shift_views_accuracy``; nothing where the images already carry views."""
    if evaluate[0].dim() != 4:
        return {}
    views = shifted_views(evaluate[0])
    return {"shift_views_accuracy": {"final": accuracy(final, views, evaluate[1]),
                                     **{str(d): accuracy(a.model, views, evaluate[1]) for d, a in tracked.items()}}}


def _per_view(criterion: nn.Module) -> nn.Module:
    """``criterion`` (a torch-style loss with ``reduction``) whose per-example term, on per-view logits
    [N, V, classes], is the mean of the example's V view terms: still one term per example, reduced the same way."""
    per_example = copy.copy(criterion)  # a shallow copy: the same loss, with its own reduction
    per_example.reduction = "none"

    def term(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if logits.dim() == 3:
            n, v = logits.shape[:2]
            return per_example(logits.flatten(0, 1), y.repeat_interleave(v)).view(n, v).mean(1)
        return per_example(logits, y)
    return _PerExampleLoss(term)


class _PerExampleLoss(nn.Module):
    """A loss from its per-example term ``term(logits, y)`` [N], reduced like torch's losses: ``reduction`` "mean"
    (the default), "sum" or "none" (the per-example terms: what Opacus's ghost clipping sets while it runs)."""

    def __init__(self, term: Any, reduction: str = "mean") -> None:
        super().__init__()
        self.term, self.reduction = term, reduction

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        each = self.term(logits, y)
        return {"mean": each.mean, "sum": each.sum, "none": lambda: each}[self.reduction]()


def _criterion(name: str) -> Any:
    """The training loss by name, each the batch mean of a per-example term (so DP-SGD clips one gradient per
    example): "ce", cross-entropy; "sse", the summed squared error between the softmax and the one-hot label;
    "focal", the focal loss −(1 − p_y)^2·log p_y (Lin et al. 2017); "sse+focal:w", SSE + w·focal, after Shamsabadi
    & Papernot 2023 ("Losing Less: A Loss for Differentially Private Deep Learning", without its regulariser)."""
    def sse(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        p = logits.softmax(1)
        return (p - F.one_hot(y, p.shape[1]).to(p.dtype)).pow(2).sum(1)

    def focal(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        log_p = logits.log_softmax(1).gather(1, y[:, None])[:, 0]
        return -(1 - log_p.exp()).pow(2) * log_p

    if name == "ce":
        return nn.CrossEntropyLoss()
    if name == "sse":
        return _PerExampleLoss(sse)
    if name == "focal":
        return _PerExampleLoss(focal)
    if name.startswith("sse+focal:"):
        weight = float(name.split(":", 1)[1])
        return _PerExampleLoss(lambda logits, y: sse(logits, y) + weight * focal(logits, y))
    raise ValueError(f"unknown loss {name!r}: ce, sse, focal or sse+focal:<weight>")


def train_nonprivate(model_name: str, seed: int, config: dict[str, Any], train: tuple[torch.Tensor, torch.Tensor],
                     evaluate: tuple[torch.Tensor, torch.Tensor]) -> dict[str, Any]:
    """Train ``model_name`` without privacy (:data:`NONPRIVATE`): the reference a private run is compared with.
    Same model, initial weights (``seed``) and inputs as the private runs; no clipping, no noise, no accountant."""
    x, y = train
    epochs, batch, lr = int(NONPRIVATE["epochs"][model_name]), int(NONPRIVATE["batch"]), float(NONPRIVATE["lr"])
    torch.manual_seed(seed)
    model = build_model(model_name, config, tuple(x.shape[1:]))
    steps = epochs * math.ceil(len(x) / batch)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    loader = DataLoader(_Batches(x, y), batch_size=batch, shuffle=True, collate_fn=_as_batch,
                        generator=torch.Generator().manual_seed(seed))
    start = time.perf_counter()
    model.train()
    for _ in range(epochs):
        for xb, yb in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            optimizer.step()
            scheduler.step()
    return {"model": model_name, "library": "nonprivate", "target_epsilon": None, "seed": seed, "steps": steps,
            "lr": lr, "batch": batch, "epochs": epochs, "optimizer": "adam, cosine learning rate", "epsilon": None,
            "accountant": None, "accuracy": accuracy(model, *evaluate), "wall_s": round(time.perf_counter() - start, 2),
            "privacy_report": None}


def _opacus_history(event: Any) -> list[tuple[float, float, int]]:
    """An accountants event of Gaussian releases on the whole data set as Opacus history entries
    (noise multiplier, sample rate 1, count)."""
    from accountants import Composed, Gaussian

    if isinstance(event, Gaussian):
        return [(event.noise_multiplier, 1.0, 1)]
    if isinstance(event, Composed):
        inner = [entry for e in event.events for entry in _opacus_history(e)]
        return [(noise, rate, count * event.count) for noise, rate, count in inner]
    raise ValueError(f"no Opacus history for {event}")


# ---------------------------------------------------------------------------------------------------------------
# Data for a model: features or pixels, normalised, on the training / evaluation split
# ---------------------------------------------------------------------------------------------------------------
def prepare(model: str, config: dict[str, Any], split: dict[str, Any], seed: int) -> tuple[tuple, tuple, Any, dict | None]:
    """(train x, y), (evaluation x, y), the prior release event (or None) and its record, for one seed."""
    xt, yt, xe, ye = split[model]
    if model != "scatternet":
        if config["pixels"] not in PIXEL_BACKGROUND:
            raise ValueError(f"unknown pixels {config['pixels']!r}: {' or '.join(PIXEL_BACKGROUND)}")
        if config["pixels"] == "unit":  # a fixed rescaling of [-1, 1] (no privacy cost)
            xt, xe = (xt + 1) / 2, (xe + 1) / 2
        train, evaluate, prior, info = _centred(xt, yt, xe, ye, config, seed)
        if config["augment"] in ("flip_views", "random_flip"):
            views = lambda v: torch.stack([v, v.flip(-1)], 1)  # noqa: E731
            evaluate = (views(evaluate[0]), evaluate[1])
            if config["augment"] == "flip_views":
                train = (views(train[0]), train[1])
        elif config["augment"] not in ("none", "multiplicity"):
            raise ValueError(f"unknown augment {config['augment']!r}")
        return train, evaluate, prior, info
    if config["flip"]:  # each example: [image, mirror image], normalised view by view
        ft, _, fe, _ = split["scatternet-flipped"]
        views = {"groupnorm": lambda v: group_normalise(v, int(config["groups"]))}.get(config["normalization"])
        if views is None or float(config["center_noise"]) > 0:
            raise ValueError("flip is implemented with normalization=groupnorm and center_noise=0")
        return (torch.stack([views(xt), views(ft)], 1), yt), (torch.stack([views(xe), views(fe)], 1), ye), None, None
    if config["normalization"] == "groupnorm":
        return _centred(group_normalise(xt, int(config["groups"])), yt, group_normalise(xe, int(config["groups"])), ye,
                        config, seed)
    if config["normalization"] == "data":
        from accountants import event_from_dict

        generator = torch.Generator().manual_seed(10_007 * seed + 17)
        mean, var, info = private_normalisation(xt, float(config["norm_noise"]), float(config["norm_clip_mean"]),
                                                float(config["norm_clip_square"]), generator)
        return (standardise(xt, mean, var), yt), (standardise(xe, mean, var), ye), event_from_dict(info["event"]), info
    if config["normalization"] == "none":
        return (xt, yt), (xe, ye), None, None
    raise ValueError(f"unknown normalization {config['normalization']!r}")


def _centred(xt: torch.Tensor, yt: torch.Tensor, xe: torch.Tensor, ye: torch.Tensor, config: dict[str, Any],
             seed: int) -> tuple[tuple, tuple, Any, dict | None]:
    """Both splits less the training features' private mean (:func:`private_centre`) when ``center_noise`` > 0,
    with the release's event and record; as they are (no release) otherwise."""
    if float(config["center_noise"]) <= 0:
        return (xt, yt), (xe, ye), None, None
    from accountants import event_from_dict

    generator = torch.Generator().manual_seed(10_007 * seed + 29)
    mean, info = private_centre(xt, float(config["center_noise"]), generator)
    return (xt - mean, yt), (xe - mean, ye), event_from_dict(info["event"]), info


def load_split(models: list[str], args: argparse.Namespace, flip: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """Per model: (train x, train y, evaluation x, evaluation y) — test set, or the validation split with --tune."""
    from dpclip_examples.fashion_mnist import load_fashion_mnist, validation_split

    data = load_fashion_mnist(args.data_dir)
    info: dict[str, Any] = {"files": {k: str(v) for k, v in data.files.items()}, "train_size": len(data.train_labels),
                            "test_size": len(data.test_labels)}
    if args.smoke:
        n_train, n_test = SMOKE_SIZES
        rng = np.random.Generator(np.random.PCG64(SPLIT_SEED))
        tr = np.sort(rng.permutation(len(data.train_labels))[:n_train])
        te = np.sort(rng.permutation(len(data.test_labels))[:n_test])
        data = SimpleNamespace(train_images=data.train_images[tr], train_labels=data.train_labels[tr],
                               test_images=data.test_images[te], test_labels=data.test_labels[te], files=data.files)
        info["smoke_subset"] = {"train": n_train, "test": n_test}
    split: dict[str, Any] = {}
    if "scatternet" in models:
        ftrain, ftest = scatter_features(data, None if args.smoke else args.cache_dir, progress=not args.smoke)
        split["scatternet"] = (ftrain, ftest)
        if flip:
            split["scatternet-flipped"] = scatter_features(data, None if args.smoke else args.cache_dir,
                                                           progress=not args.smoke, flip=True)
    if "cnn" in models:
        split["cnn"] = (pixels(data.train_images), pixels(data.test_images))
    ytrain, ytest = torch.from_numpy(data.train_labels), torch.from_numpy(data.test_labels)
    out: dict[str, Any] = {}
    if args.tune:
        size = min(VALIDATION_SIZE, len(ytrain) // 5) if args.smoke else VALIDATION_SIZE
        keep, held = (torch.from_numpy(i) for i in validation_split(len(ytrain), size, SPLIT_SEED))
        info["validation"] = {"size": size, "seed": SPLIT_SEED, "train_size": len(keep)}
        for m, (xtr, _) in split.items():
            out[m] = (xtr[keep], ytrain[keep], xtr[held], ytrain[held])
    else:
        for m, (xtr, xte) in split.items():
            out[m] = (xtr, ytrain, xte, ytest)
    return out, info


# ---------------------------------------------------------------------------------------------------------------
# Tables and plot
# ---------------------------------------------------------------------------------------------------------------
@functools.cache
def _render_tables() -> dict[str, Any]:
    return runpy.run_path(str(HERE / "render_tables.py"))  # torch-free: the README's formats live there


def _percent_sd(values: list[float]) -> str:
    return _render_tables()["percent_sd"](values)  # one format for every accuracy table


def render_markdown(report: dict[str, Any]) -> str:
    """The table: per model and ε, test accuracy mean ± sd over seeds for each library, with (q, σ, T), the ε each
    library's accountant reports, wall time, and the published anchors. Runs made before their model's
    configuration last changed are left out (render_tables.UTILITY_CONFIG_SINCE), and counted below the table."""
    tables = _render_tables()
    runs, aside = tables["current_utility_runs"](report)
    s = report["settings"]
    made = [f"`{i['command']}` on {i['date'][:10]} (git {i.get('git')}, {i['duration_s']:.0f} s"
            + (", unfinished: the runs it completed are kept)" if i.get("finished") is False else ")")
            for i in report.get("invocations", [s])]
    lines = [f"# Fashion-MNIST: test accuracy at fixed ε (δ = {report['delta']:g})", "",
             f"Made by {'; then '.join(made)}; torch {s['torch']}, Opacus {s['opacus']}, {s['threads']} thread(s), "
             f"{s['cpu']}, {s['cpus']} CPUs. Runs: {len(runs)}.", "",
             "| model | ε | dpclip: test accuracy | Opacus: test accuracy | q | σ | steps | C | lr | batch | epochs | "
             "ε reported: dpclip (PLD) / Opacus (PRV) | wall s / run: dpclip / Opacus | seeds |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    models = [m for m in MODELS if any(r["model"] == m for r in runs)]
    for m in models:
        for eps in sorted({r["target_epsilon"] for r in runs if r["model"] == m and r["library"] != "nonprivate"}):
            group = {lib: [r for r in runs if r["model"] == m and r["target_epsilon"] == eps and r["library"] == lib]
                     for lib in PRIVATE_LIBRARIES}
            first = (group["dpclip"] or group["opacus"])[0]
            acc = {lib: _percent_sd([r["test_accuracy"] for r in rs]) if rs else "—" for lib, rs in group.items()}
            reported = " / ".join(f"{max(r['epsilon'] for r in rs):.3f}" if rs else "—" for rs in group.values())
            walls = " / ".join(f"{statistics.mean(r['wall_s'] for r in rs):.0f}" if rs else "—" for rs in group.values())
            seeds = len({r["seed"] for rs in group.values() for r in rs})
            lines.append(f"| {m} | {eps:g} | {acc['dpclip']} | {acc['opacus']} | {first['q']:.4g} | {first['sigma']:.3f} | "
                         f"{first['steps']} | {first['C']:g} | {first['lr']:g} | {first['batch']} | {first['epochs']} | "
                         f"{reported} | {walls} | {seeds} |")
        reference = [r for r in runs if r["model"] == m and r["library"] == "nonprivate"]
        if reference:
            r = reference[0]
            lines.append(f"| {m} | non-private ({r['optimizer']}) | {_percent_sd([r['test_accuracy'] for r in reference])} | — | — | — | "
                         f"{r['steps']} | — | {r['lr']:g} | {r['batch']} | {r['epochs']} | ∞ | "
                         f"{statistics.mean(r['wall_s'] for r in reference):.0f} / — | {len(reference)} |")
    for m, (since, change) in tables["UTILITY_CONFIG_SINCE"].items():
        if n := sum(r["model"] == m for r in aside):
            lines += ["", f"Not shown: {n} runs of `{m}` made before {since[:10]} {since[11:]} UTC, when its configuration "
                          f"changed ({change}); they stay in the results file."]
    lines += ["", "Published anchors (test accuracy):", ""]
    lines += [f"- {a['source']}: {a['what']}, ε = {a['epsilon']:g}: {a['accuracy']:.1f} %" for a in ANCHORS]
    configs = report.get("configs", {})
    if configs:
        lines += ["", "Configurations (the same for every ε; σ calibrated per ε, a normalisation release, if any, included):", ""]
        lines += [f"- `{m}`: " + ", ".join(f"{k} = {v}" for k, v in configs[m].items()) for m in models if m in configs]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    """Test accuracy against ε: mean ± sd over seeds per model and library, the published anchors as stars, each
    model's non-private reference (where run) as a dotted line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, _ = _render_tables()["current_utility_runs"](report)
    fig, ax = plt.subplots(figsize=(9.5, 4.8))
    colours = {"scatternet": "tab:blue", "cnn": "tab:orange"}
    for m in MODELS:
        for lib, style in (("dpclip", "-o"), ("opacus", "--s")):
            rs = [r for r in runs if r["model"] == m and r["library"] == lib]
            if not rs:
                continue
            eps = sorted({r["target_epsilon"] for r in rs})
            means = [100 * statistics.mean(r["test_accuracy"] for r in rs if r["target_epsilon"] == e) for e in eps]
            sds = [100 * statistics.stdev(vals) if len(vals := [r["test_accuracy"] for r in rs if r["target_epsilon"] == e]) > 1
                   else 0.0 for e in eps]
            ax.errorbar(eps, means, yerr=sds, fmt=style, color=colours[m], capsize=3, label=f"{m} ({lib})")
        reference = [100 * r["test_accuracy"] for r in runs if r["model"] == m and r["library"] == "nonprivate"]
        if reference:
            ax.axhline(statistics.mean(reference), color=colours[m], linestyle=":", linewidth=1.2,
                       label=f"{m} (non-private, same model)")
    offsets = {("scatternet", 3.0): (-10, 6), ("cnn", 3.0): (-10, -12), ("cnn", 2.93): (-10, -26)}
    for a in ANCHORS:
        ax.plot([a["epsilon"]], [a["accuracy"]], marker="*", markersize=12, linestyle="none", color=colours[a["model"]],
                markeredgecolor="black", zorder=5)
        ax.annotate(f"{a['source']} ({a['what']}): {a['accuracy']:.1f}", (a["epsilon"], a["accuracy"]),
                    textcoords="offset points", xytext=offsets.get((a["model"], a["epsilon"]), (-10, 6)), fontsize=7,
                    ha="right")
    ax.set_xlabel(f"ε (δ = {report['delta']:g})")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Fashion-MNIST, DP-SGD: mean ± sd over seeds (stars: published)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))  # outside: no point hidden
    fig.text(0.01, 0.01, plot_footer(report, path.with_suffix(".md").name), fontsize=6)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_footer(report: dict[str, Any], listing: str) -> str:
    """Two lines under the plot, however many ``--append`` invocations made the file: the command (or how many
    commands and their dates, with where they are listed) and the environment."""
    s = report["settings"]
    invocations = report.get("invocations", [s])
    if len(invocations) == 1:
        made = invocations[0]["command"]
    else:
        dates = sorted(i["date"][:10] for i in invocations)
        made = (f"benchmarks/utility.py, {len(invocations)} invocations ({dates[0]} to {dates[-1]}); "
                f"their commands are listed in {listing}")
    return f"{made}\ntorch {s['torch']}, {s['threads']} thread(s) per run, {s['cpu']}, {s['cpus']} CPUs"


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------
def _value(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def _assignments(items: list[str], what: str) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"{what} takes key=value, got {item!r}")
        key, values = item.split("=", 1)
        out[key] = [_value(v) for v in values.split(",")]
    return out


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--epsilons", nargs="+", type=float, default=list(EPSILONS))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(range(SEEDS)), help="seed list (default: 0 1 2)")
    parser.add_argument("--libraries", nargs="+", choices=LIBRARIES, default=list(LIBRARIES))
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="folder holding the four Fashion-MNIST IDX files (default: /usr/share/datasets/fashion-mnist)")
    parser.add_argument("--cache-dir", type=Path, default=ROOT / "runs" / "cache", help="where the ScatterNet features are cached")
    parser.add_argument("--out", type=Path, default=RESULTS, help="output folder")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: $BENCH_THREADS, else $OMP_NUM_THREADS, else 1)")
    parser.add_argument("--smoke", action="store_true",
                        help=f"tiny: {SMOKE_SIZES[0]} training / {SMOKE_SIZES[1]} test examples, {SMOKE_OVERRIDES}, one seed; "
                        "writes utility_fashion_mnist_smoke.*")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override configuration entries of the models run (e.g. lr=2 normalization=data)")
    parser.add_argument("--tune", action="store_true",
                        help=f"validation sweep instead: hold out {VALIDATION_SIZE} training images (seed {SPLIT_SEED}), train on "
                        "the rest for every combination of --grid, report validation accuracy (the test set is not read); "
                        "appends to benchmarks/results/utility_tuning.json")
    parser.add_argument("--grid", nargs="+", default=[], metavar="KEY=V1,V2", help="with --tune: values to sweep")
    parser.add_argument("--tuning-file", type=Path, default=TUNING_FILE)
    parser.add_argument("--render-only", action="store_true",
                        help="train nothing: rewrite the markdown table and the plot from the results file in --out")
    parser.add_argument("--append", action="store_true",
                        help="add these runs to the results file already in --out (replacing runs of the same model, "
                        "library, ε and seed); each command's settings are kept under 'invocations'")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = make_parser().parse_args(argv)
    if args.render_only:
        return render_only(_results_path(args))
    compare = SimpleNamespace(**runpy.run_path(str(HERE / "compare_opacus.py")))  # command line, versions, git
    args.threads = compare.resolve_threads(args.threads, dict(os.environ))
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    settings = compare.environment(args.threads, dict(os.environ))
    # tells this invocation's entry apart in --append: the date has whole seconds and one process may run several
    # invocations (the tests do), so a random token makes it unique
    settings["started"] = f"{settings['date']} pid {os.getpid()} {uuid.uuid4().hex[:12]}"
    if argv is not None:  # called in-process: record these arguments, not the caller's
        settings["command"] = compare.command_line([str(Path(__file__)), *argv], dict(os.environ))
        settings["argv"] = list(argv)
    overrides = {k: v[0] for k, v in _assignments(args.set, "--set").items()}
    grid = _assignments(args.grid, "--grid")
    seeds = args.seeds[:1] if args.smoke else args.seeds
    configs = {}
    for m in args.models:
        config = dict(CONFIGS[m])
        if args.smoke:
            config.update(SMOKE_OVERRIDES)
        config.update({k: v for k, v in overrides.items() if k in config})
        unknown = [k for k in [*overrides, *grid] if not any(k in CONFIGS[x] for x in args.models)]
        if unknown:
            raise SystemExit(f"unknown configuration keys {unknown}; known: {sorted(set().union(*(CONFIGS[x] for x in args.models)))}")
        configs[m] = config
    flip = "scatternet" in configs and (bool(configs["scatternet"]["flip"]) or True in grid.get("flip", []))
    split, data_info = load_split(args.models, args, flip=flip)

    runs: list[dict[str, Any]] = []
    for m in args.models:
        keys = [k for k in grid if k in configs[m]]
        for values in itertools.product(*(grid[k] for k in keys)):
            config = {**configs[m], **dict(zip(keys, values))}
            private = [lib for lib in args.libraries if lib != "nonprivate"]
            # one data preparation and one plan per (ε, seed), shared by the libraries run on it: the same released
            # normalisation statistics and σ for dpclip and Opacus; the non-private reference once per seed (ε None)
            cases = [(eps, seed, private) for eps in args.epsilons for seed in seeds if private]
            cases += [(None, seed, ["nonprivate"]) for seed in seeds if "nonprivate" in args.libraries]
            for eps, seed, libraries in cases:
                train, evaluate, prior, norm_info = prepare(m, config, split, seed)
                planned = None if eps is None else plan(eps, len(train[1]), config, prior)
                for lib in libraries:
                    if planned is None:
                        result = train_nonprivate(m, seed, config, train, evaluate)
                        spent = ""
                    else:
                        result = train_one(m, lib, eps, seed, config, train, evaluate, prior, planned,
                                           track_ema=TRACKED_EMA if args.tune else ())
                        spent = f", ε reported {result['epsilon']:.4f}, σ {planned['sigma']:.4f}"
                    result["normalization_release"] = norm_info
                    result["validation_accuracy" if args.tune else "test_accuracy"] = result.pop("accuracy")
                    if args.tune:
                        result["config"] = config
                    runs.append(result)
                    figure = result.get("validation_accuracy", result.get("test_accuracy"))
                    print(f"[{time.perf_counter() - started:.0f} s] {m} {lib} {'non-private' if eps is None else f'ε={eps:g}'} "
                          f"seed {seed} {dict(zip(keys, values)) or ''}: {'validation' if args.tune else 'test'} accuracy "
                          f"{figure:.4f} {result.get('ema_accuracy', '')}{spent}, "
                          f"{result['steps']} steps, {result['wall_s']:.0f} s", file=sys.stderr, flush=True)
                    if not args.tune:  # after every run: a stopped sweep keeps what it finished
                        settings["duration_s"] = round(time.perf_counter() - started, 1)
                        write_results(args, settings, data_info, configs, runs, final=False)
    settings["duration_s"] = round(time.perf_counter() - started, 1)
    if args.tune:
        path = args.tuning_file
        existing = json.loads(path.read_text()) if path.exists() else {"sweeps": []}
        existing["sweeps"].append({"settings": settings, "data": data_info, "grid": grid, "set": overrides,
                                   "runs": [{k: v for k, v in r.items() if k != "privacy_report"} for r in runs]})
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(existing, indent=1) + "\n")
        return {"delta": DELTA, "settings": settings, "data": data_info, "configs": configs, "runs": runs}
    report = write_results(args, settings, data_info, configs, runs, final=True)
    print(render_markdown(report))
    return report


def render_only(path: Path) -> dict[str, Any]:
    """Rewrite ``path``'s markdown table and plot from its runs (after a change to how they are drawn)."""
    if not path.exists():
        raise SystemExit(f"no results file at {path}: run benchmarks/utility.py first (or pass --out)")
    report = json.loads(path.read_text())
    _draw(report, path)
    return report


def _results_path(args: argparse.Namespace) -> Path:
    """The results file in ``args.out`` (``_smoke`` for smoke runs); its table and plot sit beside it."""
    return args.out / f"{REPORT_STEM}_smoke.json" if args.smoke else args.out / f"{REPORT_STEM}.json"


def _draw(report: dict[str, Any], path: Path) -> None:
    """The markdown table and the plot of ``report``, beside its results file ``path``."""
    path.with_suffix(".md").write_text(render_markdown(report))
    plot(report, path.with_suffix(".png"))


def write_results(args: argparse.Namespace, settings: dict[str, Any], data_info: dict[str, Any],
                  configs: dict[str, Any], runs: list[dict[str, Any]], *, final: bool) -> dict[str, Any]:
    """Write this invocation's ``runs`` so far (JSON, markdown, plot) into ``args.out``.

    With ``--append`` the file on disk is read again at every write: its runs of the same model, library, ε and
    seed are replaced, and this invocation's entry under ``invocations`` (told apart by ``settings["started"]``) is
    updated in place, so writing after every run leaves one entry per invocation. ``final``: the invocation ended
    (a stopped one stays marked ``"finished": false``)."""
    path = _results_path(args)
    settings["finished"] = final
    report: dict[str, Any] = {"delta": DELTA, "settings": settings, "data": data_info, "configs": configs,
                              "runs": list(runs), "invocations": [settings]}
    mine = 0
    if args.append and path.exists():
        old = json.loads(path.read_text())
        invocations = old.get("invocations", [old["settings"]])
        mine = next((n for n, i in enumerate(invocations) if i.get("started") == settings["started"]), len(invocations))
        new = {(r["model"], r["library"], r["target_epsilon"], r["seed"]) for r in runs}
        kept = [r for r in old["runs"] if (r["model"], r["library"], r["target_epsilon"], r["seed"]) not in new]
        report["runs"] = kept + list(runs)
        report["invocations"] = invocations[:mine] + [settings] + invocations[mine + 1:]
        report["configs"] = {**old.get("configs", {}), **configs}
        report["data"] = old.get("data", data_info)
    for r in runs:
        r["invocation"] = mine
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # this process's own: another --append run may write beside it
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(tmp, path)
    _draw(report, path)
    return report


if __name__ == "__main__":
    main()
