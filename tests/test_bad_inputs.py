"""The bad-input suite (issue 6): every misuse gets a clear error and changes nothing.

Each case asserts (1) the error class, (2) key words of the message: the argument's name and the valid range
or the fix, and (3) that the model, the optimizer, the accountant and the engine are exactly as before (and,
for refused set-ups, that the same engine still accepts a correct call: nothing was half-configured).

What the engine cannot see, and how it is covered instead:
- the loss: the engine never sees it, so a loss that mixes examples (batch statistics, comparisons between
  examples) or a ``loss_reduction`` that does not match the criterion cannot be detected at training time;
  :func:`dpclip.check_loss` checks a loss on one batch before training, and unknown reductions are refused;
- a batch from another loader: detected when its size differs from the batch the private loader just yielded
  (Poisson batch sizes vary, so a fixed-size loader is caught within a few steps, not necessarily at the first);
- the device: only the batch's first tensor (the one that sets the batch size) is compared with the parameters'
  devices, so auxiliary CPU inputs (e.g. sequence lengths) stay allowed. CPU-only: simulated with "meta".
"""

from __future__ import annotations

import copy
import dataclasses
import io
import math
import pickle
import subprocess
import sys
from typing import Any, Callable

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

import dpclip
from accountants import (
    Gaussian,
    Laplace,
    PLDAccountant,
    PoissonSampled,
    PrivacyParameterError,
    PrivacyWarning,
    RDPAccountant,
    calibrate_noise,
    noise_multiplier_for,
)
from dpclip import (
    EngineUsageError,
    LossNotPerExampleError,
    ModelNotSupportedError,
    NonFiniteGradientError,
    NoiseSource,
    PoissonDataLoader,
    PrivacyBudgetExceeded,
    PrivacyEngine,
)


# ------------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------------
def data(n: int = 200, d: int = 10) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long())


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 2))


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # momentum: the optimizer has state


def private(model: nn.Module | None = None, seed: int = 0, **kwargs: Any):
    """(engine, private model, private optimizer, Poisson loader) with σ = 1, C = 1, q = 0.1 by default."""
    model = model or mlp()
    engine = PrivacyEngine(seed=seed)
    kwargs.setdefault("noise_multiplier", 1.0)
    kwargs.setdefault("max_grad_norm", 1.0)
    return (engine, *engine.make_private(model, sgd(model), DataLoader(data(), batch_size=20), **kwargs))


def train(model: nn.Module, optimizer: torch.optim.Optimizer, loader: Any, steps: int) -> None:
    done = 0
    while done < steps:
        for x, y in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            done += 1
            if done == steps:
                return


def snapshot(engine: PrivacyEngine, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Everything a refused call must leave alone."""
    return {
        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "optimizer": copy.deepcopy(optimizer.state_dict()),
        "history": engine.accountant.history,
        "accountant_steps": engine.accountant.steps,
        "steps": engine.steps,
        "settings": engine.settings,
        "budget": engine.budget,
        "bound": None if engine.clipping is None else engine.clipping.max_norm,
        "noise": copy.deepcopy(engine.noise.state_dict()),
    }


def same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def assert_unchanged(before: dict[str, Any], after: dict[str, Any]) -> None:
    for key in before:
        assert same(before[key], after[key]), f"{key} changed"


def refused(call: Callable[[], Any], error: type[BaseException], *words: str) -> str:
    """Run ``call``, expect ``error`` whose message contains every one of ``words``; return the message."""
    with pytest.raises(error) as caught:
        call()
    message = str(caught.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    return message


# ------------------------------------------------------------------------------------------------------
# make_private: arguments (σ, C, q, δ, ε, counts, modes) — refused before anything is touched
# ------------------------------------------------------------------------------------------------------
BAD_ARGUMENTS = [
    ("sigma negative", dict(noise_multiplier=-1.0), ["noise_multiplier", ">= 0"]),
    ("sigma nan", dict(noise_multiplier=math.nan), ["noise_multiplier", "finite"]),
    ("sigma inf", dict(noise_multiplier=math.inf), ["noise_multiplier", "finite"]),
    ("sigma tiny", dict(noise_multiplier=1e-300), ["noise_multiplier", "[1e-100, 1e+100]"]),  # the accountant's event
    ("sigma huge", dict(noise_multiplier=1e200), ["noise_multiplier", "[1e-100, 1e+100]"]),
    ("C zero", dict(max_grad_norm=0.0), ["max_grad_norm", "> 0"]),
    ("C negative", dict(max_grad_norm=-0.5), ["max_grad_norm", "> 0"]),
    ("C nan", dict(max_grad_norm=math.nan), ["max_grad_norm", "finite"]),
    ("per_layer a string", dict(per_layer="no"), ["per_layer must be True or False", "'no'"]),
    ("q zero", dict(sample_rate=0.0), ["sample_rate", "(0, 1]"]),
    ("q above one", dict(sample_rate=1.5), ["sample_rate", "(0, 1]"]),
    ("q negative", dict(sample_rate=-0.1), ["sample_rate", "(0, 1]"]),
    ("q nan with median clipping", dict(sample_rate=math.nan, clipping="median"), ["sample_rate", "finite"]),
    ("delta zero", dict(target_epsilon=1.0, target_delta=0.0), ["target_delta", "(0, 1)"]),
    ("delta one", dict(target_epsilon=1.0, target_delta=1.0), ["target_delta", "(0, 1)"]),
    ("epsilon zero", dict(target_epsilon=0.0, target_delta=1e-5), ["target_epsilon", "> 0"]),
    ("epsilon negative", dict(target_epsilon=-3.0, target_delta=1e-5), ["target_epsilon", "> 0"]),
    ("epsilon without delta", dict(target_epsilon=1.0), ["target_epsilon", "target_delta", "both"]),
    ("chunk_size not an integer", dict(chunk_size=2.5), ["chunk_size", "integer >= 1"]),
    ("physical batch not an integer", dict(max_physical_batch_size=2.5), ["max_physical_batch_size", "integer >= 1"]),
    ("physical batch zero", dict(max_physical_batch_size=0), ["max_physical_batch_size", "integer >= 1"]),
    ("unknown loss reduction", dict(loss_reduction="none"), ["loss_reduction", "'mean' or 'sum'"]),
    ("norm named after a mechanism", dict(norm="gaussian"), ["norm", "'l2'", "Gaussian", "'l1'", "Laplace"]),
    ("unknown norm", dict(norm="linf"), ["norm", "'l2'", "'l1'"]),
    ("unknown clipping", dict(clipping="quantile"), ["clipping", "'fixed' or 'median'"]),
    ("median with per-layer", dict(clipping="median", per_layer=True), ["per_layer", "clipping='fixed'"]),
    ("quantile above one", dict(clipping="median", target_quantile=1.5), ["target_quantile", "(0, 1]"]),
    ("count noise too small", dict(clipping="median", count_noise_multiplier=0.1), ["count_noise_multiplier", "raise"]),
    ("unknown nonfinite policy", dict(nonfinite="ignore"), ["nonfinite", "'error' or 'drop'"]),
    ("unknown grad_sample_mode", dict(grad_sample_mode="fast"), ["grad_sample_mode", "'vmap'"]),
    ("Opacus grad_sample_mode", dict(grad_sample_mode="ghost"), ["Opacus's name", "grad_sample_mode='layerwise'"]),
    ("Opacus clipping name", dict(clipping="adaptive"), ["Opacus's name", "clipping='median'"]),
    ("shuffled batches", dict(poisson_sampling=False), ["poisson_sampling=False", "Chua et al. 2024", "max_physical_batch_size"]),
    ("time-major inputs", dict(batch_first=False), ["batch_first=False", "transpose inside the model"]),
    ("criterion", dict(criterion=nn.CrossEntropyLoss()), ["criterion is not needed", "check_loss"]),
    ("noise generator not a generator", dict(noise_generator=0), ["noise_generator", "torch.Generator"]),
    ("per-layer bounds: too few", dict(max_grad_norm=[1.0, 1.0]), ["one bound per trainable parameter", "0.weight, 0.bias, 2.weight, 2.bias"]),
    ("per-layer bounds: unknown name", dict(max_grad_norm={"0.weight": 1.0, "nope": 1.0}), ["missing", "nope"]),
    ("per-layer bounds: zero", dict(max_grad_norm=[1.0, 0.0, 1.0, 1.0]), ["clipping bound of 0.bias", "> 0"]),
    ("per-layer bounds with median", dict(clipping="median", max_grad_norm=[1.0] * 4), ["per-layer", "clipping='fixed'"]),
    ("no noise with a budget", dict(noise_multiplier=0.0, target_epsilon=3.0, target_delta=1e-5), ["ε = ∞", "target_epsilon"]),
    ("no noise with median clipping", dict(noise_multiplier=0.0, clipping="median"), ["noise_multiplier=0", "clipping='fixed'"]),
]


@pytest.mark.parametrize("overrides, words", [case[1:] for case in BAD_ARGUMENTS], ids=[c[0] for c in BAD_ARGUMENTS])
def test_bad_make_private_arguments_are_refused_before_anything_changes(overrides, words):
    model = mlp()
    optimizer = sgd(model)
    engine = PrivacyEngine(seed=0)
    loader = DataLoader(data(), batch_size=20)
    before = snapshot(engine, model, optimizer)
    kwargs = dict(noise_multiplier=1.0, max_grad_norm=1.0)
    kwargs.update(overrides)
    refused(lambda: engine.make_private(model, optimizer, loader, **kwargs), PrivacyParameterError, *words)
    assert_unchanged(before, snapshot(engine, model, optimizer))
    assert engine.settings is None and engine.clipping is None and engine.budget is None
    assert not getattr(optimizer, "_dpclip_wrapped", False)
    # Nothing half-configured: the same engine, model and optimizer accept a correct call.
    engine.make_private(model, optimizer, loader, noise_multiplier=1.0, max_grad_norm=1.0)
    assert engine.settings.noise_multiplier == 1.0


class _Gate(nn.Module):
    """A layer with data-dependent control flow: vmap cannot run it, and no rule is registered for it."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(16))

    def forward(self, x):
        return x * self.w if float(x.sum()) > 0 else x


class _Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(10, 16)
        self.gate = _Gate()
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        return self.head(self.gate(self.fc(x)))


def test_a_layer_no_path_can_serve_is_refused_at_the_first_step_naming_it_before_anything_changes():
    model = _Gated()
    optimizer = sgd(model)
    engine = PrivacyEngine()
    private_model, private_optimizer, loader = engine.make_private(
        model, optimizer, DataLoader(data(), batch_size=20), noise_multiplier=1.0, max_grad_norm=1.0,
        grad_sample_mode="layerwise", target_epsilon=3.0, target_delta=1e-5,
    )
    before = snapshot(engine, model, optimizer)
    x, y = next(iter(loader))
    message = refused(lambda: private_model(x), dpclip.ModelNotSupportedError, "gate", "_Gate")
    assert "Error" not in message.split(":")[0]  # a dpclip message, not a torch traceback
    assert_unchanged(before, snapshot(engine, model, optimizer))
    assert engine.steps == 0 and all(p.grad is None for p in model.parameters())


def test_engine_constructor_arguments():
    refused(lambda: PrivacyEngine(accountant="moments"), PrivacyParameterError, "accountant must be", "'rdp'")
    refused(lambda: PrivacyEngine(accountant=["pld"]), PrivacyParameterError, "accountant must be", "['pld']")
    refused(lambda: PrivacyEngine(secure_mode=True, seed=3), PrivacyParameterError, "secure_mode=True", "do not pass a seed",
            "drop secure_mode=True for a reproducible run")
    refused(lambda: PrivacyEngine(secure_mode="no"), PrivacyParameterError, "secure_mode must be True or False")
    for seed in (1.5, True, "7", -1, 2**70):  # truncated, a bool, a string, or out of torch's seed range
        refused(lambda: PrivacyEngine(seed=seed), PrivacyParameterError, "seed must be an integer")
    assert PrivacyEngine(seed=2**63 - 2).noise.seed == 2**63 - 2


# ------------------------------------------------------------------------------------------------------
# Data sets and loaders
# ------------------------------------------------------------------------------------------------------
class NoLength(IterableDataset):
    def __iter__(self):
        yield from data()


class IterableWithLength(NoLength):
    def __len__(self) -> int:  # a length, but no indexing: Poisson sampling cannot pick examples from it
        return len(data())


@pytest.mark.parametrize("loader, words", [
    (DataLoader(TensorDataset(torch.zeros(0, 10), torch.zeros(0, dtype=torch.long)), batch_size=4), ["empty"]),
    (DataLoader(NoLength(), batch_size=4), ["must have a length", "Poisson", "map-style"]),
    (DataLoader(IterableWithLength(), batch_size=4), ["IterableWithLength is an IterableDataset", "map-style"]),
    (DataLoader(data(), batch_size=None), ["batch_size", "sample_rate="]),
], ids=["empty data set", "iterable data set", "iterable data set with a length", "loader without batch_size"])
@pytest.mark.parametrize("entry", ["make_private", "make_private_with_epsilon"])
def test_unusable_data_sets_are_refused(loader, words, entry):
    _refused_loader(loader, entry, PrivacyParameterError, words)


@pytest.mark.parametrize("loader, error, words", [
    ((batch for batch in [data()[:8]]), PrivacyParameterError, ["takes a torch.utils.data.DataLoader, got generator",
                                                               "TensorDataset(x, y)"]),
    ([data()[:8]], PrivacyParameterError, ["got list", "needs the data set, not batches"]),
    (private()[3], EngineUsageError, ["already private", "Pass the original torch DataLoader"]),
], ids=["a generator of batches", "a list of batches", "another engine's private loader"])
@pytest.mark.parametrize("entry", ["make_private", "make_private_with_epsilon"])
def test_what_is_not_a_data_loader_is_refused_with_the_fix(loader, error, words, entry):
    """A generator or list of batches raised AttributeError ('no attribute dataset'); another engine's returned
    loader raised AttributeError on batch_size."""
    _refused_loader(loader, entry, error, words)


def _refused_loader(loader: Any, entry: str, error: type[BaseException], words: list[str]) -> None:
    model = mlp()
    optimizer = sgd(model)
    engine = PrivacyEngine()
    before = snapshot(engine, model, optimizer)
    if entry == "make_private":
        call = lambda: engine.make_private(model, optimizer, loader, noise_multiplier=1.0, max_grad_norm=1.0)  # noqa: E731
    else:
        call = lambda: engine.make_private_with_epsilon(  # noqa: E731
            model, optimizer, loader, target_epsilon=3.0, target_delta=1e-5, epochs=1, max_grad_norm=1.0)
    refused(call, error, *words)
    assert_unchanged(before, snapshot(engine, model, optimizer))
    assert engine.settings is None


def test_a_poisson_loader_refuses_a_non_integer_number_of_steps():
    refused(lambda: PoissonDataLoader(data(), 0.1, steps_per_epoch=2.5), PrivacyParameterError,
            "steps_per_epoch", "integer >= 1")


# ------------------------------------------------------------------------------------------------------
# make_private_with_epsilon: targets, epochs, contradictory arguments
# ------------------------------------------------------------------------------------------------------
BAD_TARGETS = [
    ("unreachable epsilon", dict(target_epsilon=1e-8, target_delta=1e-10, epochs=10_000, sample_rate=1.0),
     ["target_epsilon=1e-08 is unreachable", "raise target_epsilon or delta"]),
    ("epsilon zero", dict(target_epsilon=0.0), ["target_epsilon", "> 0"]),
    ("epsilon nan", dict(target_epsilon=math.nan), ["target_epsilon", "finite"]),
    ("delta zero", dict(target_delta=0.0), ["target_delta", "(0, 1)"]),
    ("delta above one", dict(target_delta=2.0), ["target_delta", "(0, 1)"]),
    ("epochs zero", dict(epochs=0), ["epochs", "> 0"]),
    ("epochs nan", dict(epochs=math.nan), ["epochs", "finite"]),
    ("q zero", dict(sample_rate=0.0), ["sample_rate", "(0, 1]"]),
    ("sigma given too", dict(noise_multiplier=1.0), ["noise_multiplier", "do not pass it", "make_private("]),
]


@pytest.mark.parametrize("overrides, words", [c[1:] for c in BAD_TARGETS], ids=[c[0] for c in BAD_TARGETS])
def test_bad_targets_for_make_private_with_epsilon(overrides, words):
    model = mlp()
    optimizer = sgd(model)
    engine = PrivacyEngine(seed=0)
    before = snapshot(engine, model, optimizer)
    kwargs: dict[str, Any] = dict(target_epsilon=3.0, target_delta=1e-5, epochs=1, max_grad_norm=1.0)
    kwargs.update(overrides)
    refused(lambda: engine.make_private_with_epsilon(model, optimizer, DataLoader(data(), batch_size=20), **kwargs),
            PrivacyParameterError, *words)
    assert_unchanged(before, snapshot(engine, model, optimizer))
    assert engine.settings is None and not getattr(optimizer, "_dpclip_wrapped", False)


def test_non_integer_step_counts_are_refused_by_the_accountants():
    event = PoissonSampled(0.1, Gaussian(1.0))
    accountant = RDPAccountant()
    accountant.compose(event, 3)
    history = accountant.history
    refused(lambda: accountant.compose(event, 2.5), PrivacyParameterError, "count must be an integer >= 0", "2.5")
    refused(lambda: accountant.compose(event, -1), PrivacyParameterError, "count must be an integer >= 0")
    refused(lambda: accountant.get_epsilon_after(event, 1e-5, 1.5), PrivacyParameterError, "count", "integer")
    assert accountant.history == history and accountant.steps == 3
    refused(lambda: noise_multiplier_for(3.0, 1e-5, 0.01, 10.0), PrivacyParameterError, "steps must be an integer", "float")
    refused(lambda: calibrate_noise(lambda s: PoissonSampled(0.01, Gaussian(s)), 3.0, 1e-5, 0),
            PrivacyParameterError, "steps must be an integer >= 1")


# ------------------------------------------------------------------------------------------------------
# Models that mix examples or have nothing to train
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model, words", [
    (nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16), nn.Linear(16, 2)), ["BatchNorm1d", "GroupNorm", "fix_model"]),
    (nn.Sequential(nn.Unflatten(1, (1, 10)), nn.InstanceNorm1d(1, track_running_stats=True), nn.Flatten(), nn.Linear(10, 2)),
     ["InstanceNorm1d", "running statistics", "track_running_stats=False"]),
    (mlp().requires_grad_(False), ["no trainable parameters", "requires_grad"]),
], ids=["batchnorm", "instancenorm with running stats", "no trainable parameters"])
def test_models_that_mix_examples_or_cannot_train_are_refused(model, words):
    optimizer = torch.optim.SGD(mlp().parameters(), lr=0.1)
    engine = PrivacyEngine()
    before = snapshot(engine, model, optimizer)
    refused(lambda: engine.make_private(model, optimizer, DataLoader(data(), batch_size=20), noise_multiplier=1.0,
                                        max_grad_norm=1.0), ModelNotSupportedError, *words)
    assert_unchanged(before, snapshot(engine, model, optimizer))
    assert engine.settings is None
    # InstanceNorm without running statistics normalises each example by itself: accepted.
    if "track_running_stats=False" in words:
        dpclip.fix_model(model)
        assert dpclip.model_problems(model) == []


# ------------------------------------------------------------------------------------------------------
# Losses that are not per-example (checked by dpclip.check_loss; the engine never sees the loss)
# ------------------------------------------------------------------------------------------------------
def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = data().tensors
    return x[:8], y[:8]


def _class_weighted(reduction: str):
    """Cross-entropy with class weights 0.5 … 2: with reduction "mean", torch divides by the batch's Σ w_y (a batch
    statistic); with "none", averaged afterwards, each example is weighted alone."""
    def loss(out, y):
        weight = torch.linspace(0.5, 2.0, out.shape[1])
        losses = nn.functional.cross_entropy(out, y, weight=weight, reduction=reduction)
        return losses if reduction == "mean" else losses.mean()
    return loss


def test_check_loss_accepts_per_example_losses():
    x, y = _batch()
    dpclip.check_loss(mlp(), nn.CrossEntropyLoss(), x, y)
    dpclip.check_loss(mlp(), nn.CrossEntropyLoss(reduction="sum"), x, y, loss_reduction="sum")
    dpclip.check_loss(mlp(), _class_weighted("none"), x, y)  # each example weighted alone (README § Private training)
    torch.manual_seed(0)  # padding_idx: under vmap torch gives the padding row gradients; both sides must drop them
    padded = nn.Sequential(nn.Embedding(10, 4, padding_idx=0), nn.Flatten(), nn.Linear(12, 2))
    tokens = torch.randint(0, 10, (6, 3))
    tokens[:, 0] = 0
    dpclip.check_loss(padded, nn.CrossEntropyLoss(), tokens, torch.randint(0, 2, (6,)))


@pytest.mark.parametrize("loss_fn, reduction, words", [
    (lambda out, y: nn.functional.cross_entropy((out - out.mean(0)) / (out.std(0, correction=0) + 1e-3), y), "mean",
     ["depends on the other examples", "batch statistics", "per example"]),
    (lambda out, y: nn.functional.cross_entropy(out, y) / out.norm(), "mean", ["depends on the other examples"]),
    (nn.CrossEntropyLoss(reduction="sum"), "mean", ["sums over the batch", "loss_reduction='mean'", "loss_reduction='sum'"]),
    (nn.CrossEntropyLoss(), "sum", ["averages over the batch", "loss_reduction='sum'", "loss_reduction='mean'"]),
    (_class_weighted("mean"), "mean", ["depends on the other examples"]),
], ids=["normalised by batch statistics", "divided by a batch norm", "declared mean, sums", "declared sum, averages",
        "class-weighted mean"])
def test_check_loss_detects_losses_that_are_not_per_example(loss_fn, reduction, words):
    model = mlp()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = _batch()
    refused(lambda: dpclip.check_loss(model, loss_fn, x, y, loss_reduction=reduction), LossNotPerExampleError, *words)
    assert same(before, dict(model.state_dict())) and model.training
    assert all(p.grad is None for p in model.parameters())


def test_check_loss_arguments():
    x, y = _batch()
    refused(lambda: dpclip.check_loss(mlp(), nn.CrossEntropyLoss(), x, y, loss_reduction="none"),
            PrivacyParameterError, "loss_reduction", "'mean' or 'sum'")
    refused(lambda: dpclip.check_loss(mlp(), nn.CrossEntropyLoss(), x[:1], y[:1]), PrivacyParameterError,
            "at least 2 examples")


# ------------------------------------------------------------------------------------------------------
# At training time
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["layerwise", "vmap"])
def test_nonfinite_per_example_gradients_abandon_the_step_and_change_nothing(mode):
    x, y = data().tensors
    x = x.clone()
    x[::5, 0] = math.nan
    model = mlp()
    engine = PrivacyEngine(seed=0)
    m, o, loader = engine.make_private(model, sgd(model), DataLoader(TensorDataset(x, y), batch_size=50),
                                       noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=mode)
    before = snapshot(engine, model, o)
    it = iter(loader)
    xb, yb = next(it)
    loss = nn.functional.cross_entropy(m(xb), yb)
    refused(loss.backward, NonFiniteGradientError, "NaN/inf", "nothing was applied", "nonfinite='drop'")
    assert_unchanged(before, snapshot(engine, model, o))
    refused(o.step, EngineUsageError, "outside a batch")  # the abandoned step cannot be released half-done
    next(it)  # ... and does not block the next batch
    assert engine.steps == 0


def test_batch_on_another_device_is_refused_before_it_is_used():
    engine, model, optimizer, loader = private()
    before = snapshot(engine, model.module, optimizer)
    it = iter(loader)
    x, y = next(it)
    refused(lambda: model(x.to("meta")), EngineUsageError, "device meta", "cpu", "x.to(device)")
    assert_unchanged(before, snapshot(engine, model.module, optimizer))
    nn.functional.cross_entropy(model(x), y).backward()  # the batch was not marked as used: the retry works
    optimizer.step()
    assert engine.steps == 1


def test_batches_of_the_original_loader_are_refused():
    """The engine replaces the loader by Poisson sampling; the caller's own loader is not what is accounted."""
    engine, model, optimizer, loader = private()
    original = DataLoader(data(), batch_size=20)
    before = snapshot(engine, model.module, optimizer)
    x, y = next(iter(original))
    refused(lambda: model(x), EngineUsageError, "outside a batch", "loader returned by make_private")
    for (x, y), (xp, yp) in zip(original, loader):  # both loaders in step: a step is open, the batch is foreign
        assert len(xp) != len(x)  # (seeded: the first Poisson batch has 13 examples)
        refused(lambda: model(x), EngineUsageError, "batch of 20 examples", f"has {len(xp)}",
                "loader returned by make_private")
        refused(lambda: model(xp[:-1]), EngineUsageError, f"batch of {len(xp) - 1} examples")  # a slice neither
        assert_unchanged(before, snapshot(engine, model.module, optimizer))
        nn.functional.cross_entropy(model(xp), yp).backward()  # the loader's own batch still works
        optimizer.step()
        break
    assert engine.steps == 1


class CountingDataset(Dataset):
    def __init__(self, base: Dataset) -> None:
        self.base, self.reads = base, 0

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> Any:
        self.reads += 1
        return self.base[i]


@pytest.mark.parametrize("target", [0.05, 3.0], ids=["first step over budget", "budget spent mid-run"])
def test_stepping_past_the_budget_is_refused_before_any_example_is_read(target):
    dataset = CountingDataset(data())
    model = mlp()
    engine = PrivacyEngine(seed=0)
    m, o, loader = engine.make_private(model, sgd(model), DataLoader(dataset, batch_size=20), noise_multiplier=1.0,
                                       max_grad_norm=1.0, target_epsilon=target, target_delta=1e-5)
    def batches():
        while True:
            yield from loader

    it = batches()
    for _ in range(1000):
        before = snapshot(engine, model, o)
        reads, generator = dataset.reads, loader.generator.get_state()
        try:
            x, y = next(it)
        except PrivacyBudgetExceeded as error:
            assert "one more step" in str(error) and f"target {target:g}" in str(error) and "Stop training" in str(error)
            break
        nn.functional.cross_entropy(m(x), y).backward()
        o.step()
    else:
        pytest.fail("the budget never ran out")
    assert dataset.reads == reads and torch.equal(loader.generator.get_state(), generator)  # nothing sampled or read
    assert_unchanged(before, snapshot(engine, model, o))
    assert engine.get_epsilon() <= target
    assert (engine.steps == 0) == (target == 0.05)


@pytest.mark.parametrize("call", [
    lambda e: e.get_epsilon(1e-5), lambda e: e.get_epsilon(), lambda e: e.privacy_report(1e-5),
    lambda e: e.state_dict(), lambda e: e.load_state_dict({}),
], ids=["get_epsilon(delta)", "get_epsilon()", "privacy_report", "state_dict", "load_state_dict"])
def test_using_the_engine_before_make_private_is_refused(call):
    engine = PrivacyEngine()
    refused(lambda: call(engine), EngineUsageError, "make_private")
    assert engine.accountant.steps == 0 and engine.settings is None


def test_bad_delta_in_reports():
    engine, model, optimizer, loader = private()
    train(model, optimizer, loader, steps=2)
    refused(lambda: engine.get_epsilon(0.0), PrivacyParameterError, "delta", "(0, 1)")
    refused(lambda: engine.privacy_report(1.5), PrivacyParameterError, "delta", "(0, 1)")
    refused(engine.get_epsilon, PrivacyParameterError, "delta=", "no target_delta")
    assert engine.steps == 2


def test_wrapping_twice_is_refused():
    engine, model, optimizer, loader = private()
    before = snapshot(engine, model.module, optimizer)
    fresh = lambda: DataLoader(data(), batch_size=20)  # noqa: E731
    args = dict(noise_multiplier=1.0, max_grad_norm=1.0)
    refused(lambda: PrivacyEngine().make_private(mlp(), optimizer.original_optimizer, fresh(), **args),
            EngineUsageError, "optimizer is already wrapped", "original optimizer once")
    refused(lambda: PrivacyEngine().make_private(mlp(), optimizer, fresh(), **args), EngineUsageError, "already wrapped")
    refused(lambda: PrivacyEngine().make_private(model, sgd(mlp()), fresh(), **args), EngineUsageError,
            "model is already wrapped", "original model")
    other = mlp()
    refused(lambda: engine.make_private(other, sgd(other), fresh(), **args), EngineUsageError,
            "already manages a model", "one engine per model")
    assert_unchanged(before, snapshot(engine, model.module, optimizer))


@pytest.mark.parametrize("mode", ["layerwise", "vmap"])
def test_pickling_or_copying_what_the_engine_holds_is_refused_with_the_fix(mode):
    """pickle / torch.save of the private model (and, on the layerwise path, of the model it wraps) raised pickle's
    "Can't pickle local object"; copy.deepcopy of the private model silently cloned the engine with its noise and
    sampling generators; copy.deepcopy of the private optimizer raised AttributeError; optimizer.virtual_step()
    (Opacus 0.x) raised AttributeError. A deep copy of the plain model (an EMA or teacher) works and pickles."""
    engine, model, optimizer, loader = private(grad_sample_mode=mode)
    train(model, optimizer, loader, steps=1)
    before = snapshot(engine, model.module, optimizer)
    for target in [model] + ([model.module] if mode == "layerwise" else []):
        refused(lambda: pickle.dumps(target), EngineUsageError, "cannot be pickled whole", "model.state_dict()")
        refused(lambda: torch.save(target, io.BytesIO()), EngineUsageError, "cannot be pickled whole")
    refused(lambda: copy.deepcopy(model), EngineUsageError, "copy.deepcopy(model.module)")
    for call in (lambda: copy.deepcopy(optimizer), lambda: pickle.dumps(optimizer)):
        refused(call, EngineUsageError, "cannot be copied or pickled", "optimizer.state_dict()")
    refused(optimizer.virtual_step, EngineUsageError, "max_physical_batch_size=", "optimizer.step() after every micro-batch")
    teacher = copy.deepcopy(model.module)
    assert isinstance(pickle.loads(pickle.dumps(teacher)), nn.Module)
    x, y = next(iter(DataLoader(data(), batch_size=8)))
    teacher_optimizer = sgd(teacher)
    nn.functional.cross_entropy(teacher(x), y).backward()  # plain training of the copy touches nothing of the engine
    teacher_optimizer.step()
    assert_unchanged(before, snapshot(engine, model.module, optimizer))
    train(model, optimizer, loader, steps=1)
    assert engine.steps == 2


def test_a_second_live_engine_on_the_same_model_or_its_parameters_is_refused():
    import gc

    engine, model, optimizer, loader = private()
    train(model, optimizer, loader, steps=1)
    raw = model.module
    before = snapshot(engine, raw, optimizer)
    args = dict(noise_multiplier=1.0, max_grad_norm=1.0)
    fresh = lambda: DataLoader(data(), batch_size=20)  # noqa: E731
    second = PrivacyEngine()
    refused(lambda: second.make_private(raw, sgd(raw), fresh(), **args), EngineUsageError,
            "already trained by another live PrivacyEngine", "one engine per model")
    sharing = nn.Sequential(raw[0], nn.ReLU(), nn.Linear(16, 2))  # a new model around one of its layers
    refused(lambda: PrivacyEngine().make_private(sharing, sgd(sharing), fresh(), **args), EngineUsageError,
            "0.weight", "another live PrivacyEngine")
    assert_unchanged(before, snapshot(engine, raw, optimizer))
    assert second.settings is None and engine.steps == 1
    del engine, model, optimizer, loader
    gc.collect()
    again = PrivacyEngine()
    again.make_private(raw, sgd(raw), fresh(), **args)  # the first engine is gone: its model may be trained anew
    assert again.settings is not None


def test_changing_sigma_mid_run_is_refused():
    engine, model, optimizer, loader = private()
    train(model, optimizer, loader, steps=2)
    before = snapshot(engine, model.module, optimizer)
    refused(lambda: setattr(engine, "settings", dataclasses.replace(engine.settings, noise_multiplier=0.1)),
            EngineUsageError, "engine.settings cannot be changed", "new PrivacyEngine")
    refused(lambda: setattr(engine.settings, "noise_multiplier", 0.1), dataclasses.FrozenInstanceError, "noise_multiplier")
    for name in ["noise_multiplier", "max_grad_norm", "sample_rate"]:  # Opacus-style attributes: would be ignored
        refused(lambda: setattr(optimizer, name, 0.1), EngineUsageError, f"optimizer.{name} cannot be set", "make_private")
    assert_unchanged(before, snapshot(engine, model.module, optimizer))
    optimizer.param_groups[0]["lr"] = 0.05  # the optimizer's own hyper-parameters stay the user's
    train(model, optimizer, loader, steps=1)
    reference = PLDAccountant()  # the engine's default accountant
    reference.compose(PoissonSampled(0.1, Gaussian(1.0)), 3)
    assert engine.get_epsilon(1e-5) == reference.get_epsilon(1e-5)


@pytest.mark.parametrize("when", ["between steps", "after backward", "replaced strategy"])
def test_changing_the_clipping_bound_behind_the_engine_is_refused(when):
    engine, model, optimizer, loader = private()
    train(model, optimizer, loader, steps=1)
    it = iter(loader)
    x, y = next(it)
    original = engine.clipping
    if when == "after backward":
        nn.functional.cross_entropy(model(x), y).backward()
    before = snapshot(engine, model.module, optimizer)
    if when == "replaced strategy":
        engine.clipping = dpclip.FixedClipping(5.0)
    else:
        engine.clipping.max_norm = 5.0
    call = optimizer.step if when == "after backward" else lambda: model(x)
    refused(call, EngineUsageError, "max_grad_norm", "changed from 1.0 to 5.0", "new PrivacyEngine")
    engine.clipping = original
    engine.clipping.max_norm = 1.0
    assert_unchanged(before, snapshot(engine, model.module, optimizer))
    if when != "after backward":
        nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()  # with C restored the step goes through
    assert engine.steps == 2 and engine.clip_history == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("norm, drawn, refused_sampler", [("l1", "laplace", "gaussian"), ("l2", "gaussian", "laplace")])
def test_the_noise_always_matches_the_clipping_norm(monkeypatch, norm, drawn, refused_sampler):
    """L1 clipping with Gaussian noise (or L2 with Laplace) is not what the accountant charges: the engine has no
    way to ask for it (``norm`` picks both), and never draws the other sampler."""

    def wrong(self, like, scale):
        raise AssertionError(f"{refused_sampler} noise drawn for norm={norm!r}")

    monkeypatch.setattr(NoiseSource, refused_sampler, wrong)
    engine, model, optimizer, loader = private(norm=norm)
    train(model, optimizer, loader, steps=2)
    (entry,) = engine.accountant.history
    expected = Laplace(1.0) if norm == "l1" else Gaussian(1.0)
    assert entry.event == PoissonSampled(0.1, expected) and entry.count == 2
    assert engine.privacy_report(1e-5)["mechanism"] == ("laplace" if norm == "l1" else "gaussian")
    refused(lambda: private(norm=drawn), PrivacyParameterError, "norm must be 'l2'", "'l1'")


# ------------------------------------------------------------------------------------------------------
# Checkpoints and accountant states
# ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint() -> dict[str, Any]:
    engine, model, optimizer, loader = private(seed=1)
    train(model, optimizer, loader, steps=3)
    return engine.state_dict()


def _tampered_history(state: dict[str, Any]) -> dict[str, Any]:
    weaker = PLDAccountant()  # the engine's default accountant
    weaker.compose(PoissonSampled(0.1, Gaussian(100.0)), state["steps"])  # same count, far less ε
    return {**state, "accountant": weaker.state_dict()}


def _tampered_tensor(state: dict[str, Any]) -> dict[str, Any]:
    model = dict(state["model"])
    model["2.weight"] = torch.zeros(3, 16)  # the signature still says (2, 16)
    return {**state, "model": model}


TAMPERED = [
    ("not a checkpoint", lambda s: {"model": s["model"]}, ["not a dpclip PrivacyEngine checkpoint"]),
    ("other version", lambda s: {**s, "version": 99}, ["unsupported checkpoint version 99"]),
    ("truncated: no loader", lambda s: {k: v for k, v in s.items() if k != "loader"}, ["truncated", "loader"]),
    ("truncated: no budget", lambda s: {k: v for k, v in s.items() if k != "budget"}, ["truncated", "budget"]),
    ("steps edited", lambda s: {**s, "steps": 0}, ["accountant history does not match the step count"]),
    ("steps not a number", lambda s: {**s, "steps": "three"}, ["corrupt", "steps must be an integer"]),
    ("history of another mechanism", _tampered_history, ["corrupt checkpoint", "Gaussian(σ=100)", "another run"]),
    ("model tensor resized", _tampered_tensor, ["corrupt checkpoint", "model tensors do not match"]),
    ("clipping bound nan", lambda s: {**s, "clipping": {"max_norm": math.nan, "history": []}}, ["max_grad_norm", "finite"]),
    ("RNG state garbage", lambda s: {**s, "torch_rng": torch.zeros(3, dtype=torch.uint8)}, ["corrupt", "RNG"]),
    ("other privacy settings", lambda s: {**s, "settings": {**s["settings"], "noise_multiplier": 0.5}},
     ["different privacy settings", "same arguments"]),
]


@pytest.mark.parametrize("tamper, words", [c[1:] for c in TAMPERED], ids=[c[0] for c in TAMPERED])
def test_tampered_or_truncated_checkpoints_are_refused_and_change_nothing(checkpoint, tamper, words):
    checkpoint = copy.deepcopy(checkpoint)
    engine, model, optimizer, loader = private(seed=1)  # the checkpoint's run, one step behind it
    train(model, optimizer, loader, steps=2)
    before = snapshot(engine, model.module, optimizer)
    refused(lambda: engine.load_state_dict(tamper(checkpoint)), PrivacyParameterError, *words)
    assert_unchanged(before, snapshot(engine, model.module, optimizer))
    engine.load_state_dict(checkpoint)  # the genuine checkpoint still loads
    assert engine.steps == 3


def test_checkpoint_of_another_model_or_optimizer_is_refused(checkpoint):
    engine, model, optimizer, loader = private(model=nn.Sequential(nn.Linear(10, 4), nn.Tanh(), nn.Linear(4, 2)))
    before = snapshot(engine, model.module, optimizer)
    refused(lambda: engine.load_state_dict(checkpoint), PrivacyParameterError, "different model")
    assert_unchanged(before, snapshot(engine, model.module, optimizer))

    net = mlp()
    two_groups = torch.optim.SGD([{"params": net[0].parameters()}, {"params": net[2].parameters(), "lr": 0.01}], lr=0.1)
    engine = PrivacyEngine(seed=0)
    model, optimizer, _ = engine.make_private(net, two_groups, DataLoader(data(), batch_size=20), noise_multiplier=1.0,
                                              max_grad_norm=1.0)
    before = snapshot(engine, net, optimizer)
    refused(lambda: engine.load_state_dict(checkpoint), PrivacyParameterError, "parameter groups")
    assert_unchanged(before, snapshot(engine, net, optimizer))


def test_checkpoint_in_the_middle_of_a_batch_is_refused():
    engine, model, optimizer, loader = private()
    x, y = next(iter(loader))
    nn.functional.cross_entropy(model(x), y).backward()
    refused(engine.state_dict, EngineUsageError, "after optimizer.step()")


@pytest.mark.parametrize("state, words", [
    ({"format": "dpclip.accountants.PLDAccountant", "version": 1, "history": []}, ["not an RDPAccountant state", "another accountant"]),
    ({"format": "dpclip.accountants.RDPAccountant", "version": 1, "orders": [2.0, 4.0],
      "history": [{"event": {"type": "gaussian", "noise_multiplier": 1.0}, "count": 1},
                  {"event": {"type": "cauchy", "scale": 1.0}, "count": 1}]}, ["unknown event type 'cauchy'"]),
    ({"format": "dpclip.accountants.RDPAccountant", "version": 1, "orders": [2.0],
      "history": [{"event": {"type": "gaussian", "noise_multiplier": 1.0}, "count": 2.5}]}, ["count must be an integer"]),
    ({"format": "dpclip.accountants.RDPAccountant", "version": 1, "orders": [0.5],
      "history": []}, ["orders", "> 1"]),
    ({"format": "dpclip.accountants.RDPAccountant", "version": 1, "orders": [2.0]}, ["corrupt", "history"]),
], ids=["another accountant", "unknown mechanism", "non-integer count", "bad orders", "truncated"])
def test_accountant_state_of_another_mechanism_or_accountant_is_refused(state, words):
    accountant = RDPAccountant()
    accountant.compose(PoissonSampled(0.1, Gaussian(1.0)), 5)
    history, orders = accountant.history, accountant.orders
    refused(lambda: accountant.load_state_dict(state), PrivacyParameterError, *words)
    assert accountant.history == history and accountant.orders == orders and accountant.steps == 5


# ------------------------------------------------------------------------------------------------------
# The budget CLI (python -m accountants): missing or contradictory flags exit 2, no traceback
# ------------------------------------------------------------------------------------------------------
CLI_CASES = [
    (["epsilon", "--dataset-size", "100", "--noise-multiplier", "1", "--steps", "3", "--delta", "1e-5"],
     "give --sample-rate, or both --dataset-size and --batch-size"),
    (["epsilon", "--dataset-size", "100", "--batch-size", "0", "--noise-multiplier", "1", "--steps", "3",
      "--delta", "1e-5"], "--batch-size must be an integer >= 1"),
    (["epsilon", "--sample-rate", "0.1", "--noise-multiplier", "inf", "--steps", "3", "--delta", "1e-5"],
     "--noise-multiplier must be finite"),
    (["epsilon", "--sample-rate", "0.1", "--noise-multiplier", "1", "--epochs", "-1", "--delta", "1e-5"],
     "--epochs must be a finite number > 0"),
    (["epsilon", "--sample-rate", "0.1", "--noise-multiplier", "1", "--steps", "3"], "the following arguments are required: --delta"),
    (["steps", "--sample-rate", "0.1", "--target-epsilon", "1", "--noise-multiplier", "1", "--delta", "1e-5", "--steps", "3"],
     "unrecognized arguments: --steps 3"),
    (["noise", "--sample-rate", "0.1", "--target-epsilon", "1", "--noise-multiplier", "1", "--steps", "100",
      "--delta", "1e-5"], "unrecognized arguments: --noise-multiplier 1"),  # noise computes σ: giving it contradicts
    (["noise", "--sample-rate", "0", "--target-epsilon", "1", "--steps", "100", "--delta", "1e-5"],
     "--sample-rate must lie in (0, 1]"),
]


@pytest.mark.parametrize("args, message", CLI_CASES, ids=[" ".join(a[:3]) + f" #{i}" for i, (a, _) in enumerate(CLI_CASES)])
def test_cli_missing_or_contradictory_flags_exit_2_without_traceback(args, message):
    result = subprocess.run([sys.executable, "-m", "accountants", *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_a_batch_larger_than_the_data_set_warns_that_q_is_1():
    model = mlp()
    engine = PrivacyEngine(seed=0)
    with pytest.warns(PrivacyWarning, match="exceeds the data set's 200 examples.*q = 1"):
        engine.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(data(), batch_size=500),
                            noise_multiplier=1.0, max_grad_norm=1.0)
    assert engine.settings.sample_rate == 1.0


@pytest.mark.parametrize("returned", [None, 1.5], ids=["None", "a float"])
def test_a_forward_that_returns_no_tensor_is_refused_with_the_cause(returned):
    """A forward that forgets its `return` (or returns a Python number): refused naming the cause and the fix, not
    with the error the empty output met inside the check; nothing charged."""

    class NoOutput(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(10, 2)

        def forward(self, x: torch.Tensor) -> Any:
            self.fc(x)
            return returned

    torch.manual_seed(0)
    model = NoOutput()
    engine = PrivacyEngine(seed=0)
    private_model, optimizer, loader = engine.make_private(model, sgd(model), DataLoader(data(), batch_size=20),
                                                           noise_multiplier=1.0, max_grad_norm=1.0)
    x, _ = next(iter(loader))
    refused(lambda: private_model(x), dpclip.ModelNotSupportedError,
            "returned no floating-point tensor", f"returned {type(returned).__name__}", "without `return`")
    assert engine.steps == 0 and len(engine.accountant.history) == 0
