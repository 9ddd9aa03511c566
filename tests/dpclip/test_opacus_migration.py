"""What an Opacus user meets when switching (issue 15): one default accountant for the engine and the budget
calculator, Opacus's optimizer attributes, per-layer bounds, the non-private baseline, a user noise generator,
indexable wrapped containers, and messages that name the fix."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import dpclip
from accountants import Gaussian, NonPrivate, PLDAccountant, PoissonSampled, PrivacyWarning, RDPAccountant
from accountants.cli import main as budget_cli
from dpclip import EngineUsageError, PrivacyBudgetExceeded, PrivacyEngine


def data(n: int = 400, features: int = 10, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, features, generator=generator), torch.randint(0, 2, (n,), generator=generator))


def mlp(seed: int = 0, features: int = 10) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(features, 16), nn.Tanh(), nn.Linear(16, 2))


def private(engine: PrivacyEngine | None = None, model: nn.Module | None = None, batch_size: int = 20,
            lr: float = 0.1, dataset: TensorDataset | None = None, **kwargs):
    """(engine, private model, private optimizer, Poisson loader) with σ = 1, C = 1 unless given."""
    engine = engine or PrivacyEngine(seed=0)
    model = model if model is not None else mlp()
    kwargs.setdefault("noise_multiplier", 1.0)
    kwargs.setdefault("max_grad_norm", 1.0)
    loader = DataLoader(dataset if dataset is not None else data(), batch_size=batch_size)
    return (engine, *engine.make_private(model, torch.optim.SGD(model.parameters(), lr=lr), loader, **kwargs))


def cli_json(*args: str) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert budget_cli([*args, "--json"]) == 0
    return json.loads(out.getvalue())


def train(model: nn.Module, optimizer: torch.optim.Optimizer, loader, steps: int | None = None) -> int:
    """Ordinary loop until the loader ends (or ``steps``); returns the steps taken."""
    taken = 0
    for x, y in loader:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        taken += 1
        if steps is not None and taken == steps:
            break
    return taken


# -- one accountant by default, everywhere -----------------------------------------------------------
def test_engine_and_budget_calculator_agree_on_sigma_and_the_planned_run_completes():
    n, batch, epochs, target, delta = 400, 20, 4, 3.0, 1e-5
    planned = cli_json("noise", "--dataset-size", str(n), "--batch-size", str(batch), "--epochs", str(epochs),
                       "--target-epsilon", str(target), "--delta", str(delta))
    assert planned["accountant"] == "pld"
    engine = PrivacyEngine(seed=0)
    assert engine.accountant_name == "pld" and isinstance(engine.accountant, PLDAccountant)
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer, loader = engine.make_private_with_epsilon(
        model, optimizer, DataLoader(data(n), batch_size=batch), target_epsilon=target, target_delta=delta,
        epochs=epochs, max_grad_norm=1.0,
    )
    assert engine.settings.noise_multiplier == pytest.approx(planned["noise_multiplier"], rel=1e-9)
    taken = sum(train(model, optimizer, loader) for _ in range(epochs))  # no PrivacyBudgetExceeded
    assert taken == planned["steps"] == epochs * len(loader)
    # the ε spent, by an independent accountant (Google's dp_accounting PLD) over the same steps
    dp_accounting = pytest.importorskip("dp_accounting")
    oracle = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    oracle.compose(dp_accounting.PoissonSampledDpEvent(batch / n, dp_accounting.GaussianDpEvent(planned["noise_multiplier"])), taken)
    assert engine.get_epsilon(delta) <= target
    assert engine.get_epsilon(delta) == pytest.approx(oracle.get_epsilon(delta), rel=0.02)


def test_budget_guard_stops_exactly_where_the_calculator_says_and_names_the_accountant():
    n, batch, sigma, target, delta = 400, 40, 1.5, 2.0, 1e-5
    fits = cli_json("steps", "--dataset-size", str(n), "--batch-size", str(batch), "--noise-multiplier", str(sigma),
                    "--target-epsilon", str(target), "--delta", str(delta))["steps"]
    engine, model, optimizer, loader = private(batch_size=batch, dataset=data(n), noise_multiplier=sigma,
                                              target_epsilon=target, target_delta=delta)
    taken = 0
    with pytest.raises(PrivacyBudgetExceeded) as stop:
        while True:
            taken += train(model, optimizer, loader)
    assert engine.steps == fits  # the guard's own search agrees with the calculator's steps_for
    message = str(stop.value)
    for words in ("PLD accountant", "dpclip-budget --accountant pld", "accountant='rdp'"):
        assert words in message
    assert engine.get_epsilon(delta) <= target < engine.accountant.get_epsilon_after(engine._step_event, delta)


def test_budget_guard_follows_a_restored_history():
    """After load_state_dict (another history), the guard's count of steps left is recomputed, not reused."""
    source, model, optimizer, loader = private(batch_size=40, noise_multiplier=1.5, target_epsilon=2.0, target_delta=1e-5)
    train(model, optimizer, loader, steps=2)
    state = copy.deepcopy(source.state_dict())
    engine, model, optimizer, loader = private(batch_size=40, noise_multiplier=1.5, target_epsilon=2.0, target_delta=1e-5)
    train(model, optimizer, loader, steps=1)  # its guard has counted the steps left after one step
    engine.load_state_dict(state)  # (rewinding an engine past its own releases is refused: test_checkpoint)
    alone = PLDAccountant()
    alone.compose(engine._step_event, 2)
    left = 0
    while alone.get_epsilon_after(engine._step_event, 1e-5, left + 1) <= 2.0:
        left += 1
    assert engine.budget_guard.steps_left(engine.accountant, engine._step_event) == left


def test_rdp_is_still_one_argument_away():
    engine = PrivacyEngine(accountant="rdp", seed=0)
    assert isinstance(engine.accountant, RDPAccountant)
    with pytest.raises(dpclip.PrivacyParameterError, match="'pld' is the same kind"):
        PrivacyEngine(accountant="prv")


# -- Opacus's names ------------------------------------------------------------------------------------
def test_optimizer_shows_the_engine_settings_read_only():
    _, _, optimizer, _ = private(noise_multiplier=1.3, max_grad_norm=0.7)
    assert optimizer.noise_multiplier == 1.3 and optimizer.max_grad_norm == 0.7
    assert optimizer.sample_rate == 20 / 400 and optimizer.expected_batch_size == pytest.approx(20.0)
    for name in ("noise_multiplier", "max_grad_norm", "sample_rate", "expected_batch_size"):
        with pytest.raises(EngineUsageError, match=f"optimizer.{name} cannot be set"):
            setattr(optimizer, name, 2.0)


def test_noise_generator_draws_the_noise():
    def run(seed: int) -> torch.Tensor:
        # the loader's sampling seed is the same in every run
        _, model, optimizer, loader = private(PrivacyEngine(seed=123), noise_generator=torch.Generator().manual_seed(seed))
        train(model, optimizer, loader, steps=3)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))
    with pytest.raises(dpclip.PrivacyParameterError, match="secure_mode"):
        private(PrivacyEngine(secure_mode=True), noise_generator=torch.Generator())


def test_wrapped_sequential_is_indexable():
    original = mlp()
    _, model, _, _ = private(model=original)
    assert model[0] is original[0] and model[-1] is original[2] and len(model) == 3
    assert list(model) == list(original)


def test_skipping_the_step_to_accumulate_names_max_physical_batch_size():
    _, model, optimizer, loader = private()
    with pytest.raises(EngineUsageError, match="max_physical_batch_size"):
        for x, y in loader:  # accumulating Opacus-style: no optimizer.step() on the first batch
            nn.functional.cross_entropy(model(x), y).backward()


def test_pld_privacy_statement_carries_its_error_bound():
    engine, model, optimizer, loader = private()
    train(model, optimizer, loader, steps=5)
    report = engine.privacy_report(delta=1e-5)
    assert report["accountant"] == "pld" and report["epsilon_error"] > 0
    assert f"numerical error ≤ {report['epsilon_error']:.2g}" in report["statement"]


# -- per-layer bounds ------------------------------------------------------------------------------------
def _brute_force_update(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bounds: list[float], expected: float) -> list[torch.Tensor]:
    """Σ_i clip_k(g_ik, C_k) / (qN) per parameter k, each example's gradient computed alone."""
    params = list(model.parameters())
    total = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    for i in range(len(x)):
        grads = torch.autograd.grad(nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), params)
        for k, (g, bound) in enumerate(zip(grads, bounds)):
            total[k] += g.double() * min(1.0, bound / float(g.double().norm()))
    return [t / expected for t in total]


@pytest.mark.parametrize("as_dict", [False, True])
def test_per_layer_bounds_clip_each_parameter_like_a_brute_force_loop(as_dict):
    bounds = [0.05, 0.01, 0.2, 0.02]
    original = mlp()
    reference = mlp()
    names = [name for name, _ in original.named_parameters()]
    with pytest.warns(PrivacyWarning, match="NOT differentially private"):
        engine, model, optimizer, loader = private(
            model=original, batch_size=40, lr=1.0, noise_multiplier=0.0,
            max_grad_norm=dict(zip(names, bounds)) if as_dict else bounds,
        )
    assert optimizer.max_grad_norm == pytest.approx(math.sqrt(sum(b * b for b in bounds)))
    for x, y in loader:
        expected = _brute_force_update(reference, x, y, bounds, 40.0)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        break
    for p, q, update in zip(original.parameters(), reference.parameters(), expected):
        torch.testing.assert_close((q.detach().double() - p.detach().double()), update, rtol=1e-5, atol=1e-7)
    report = engine.privacy_report(delta=1e-5)
    assert report["layer_bounds"] == dict(zip(names, bounds)) and report["per_layer_clipping"]


def test_per_layer_noise_is_calibrated_to_the_combined_bound():
    """Std of the noise on a parameter whose gradient is 0 (zero inputs): σ·√Σ C_k² / (qN), within 3 %."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(200, 50), nn.Linear(50, 2))
    before = model[0].weight.detach().clone()
    n, batch, sigma, bounds = 400, 40, 2.0, [0.3, 0.4, 1.0, 0.5]
    dataset = TensorDataset(torch.zeros(n, 200), torch.randint(0, 2, (n,)))
    engine, model, optimizer, loader = private(model=model, batch_size=batch, lr=1.0, dataset=dataset,
                                              noise_multiplier=sigma, max_grad_norm=bounds)
    train(model, optimizer, loader, steps=1)
    noise = (model[0].weight.detach() - before).flatten()  # the weight's gradient is 0 for zero inputs
    expected_std = sigma * math.sqrt(sum(b * b for b in bounds)) / batch
    assert abs(float(noise.std()) / expected_std - 1) < 0.03
    assert engine.accountant.history[0].event == PoissonSampled(batch / n, Gaussian(sigma))


# -- the non-private baseline -----------------------------------------------------------------------------
def test_noise_multiplier_zero_is_a_loud_non_private_baseline():
    with pytest.warns(PrivacyWarning, match="NOT differentially private") as record:
        engine, model, optimizer, loader = private(noise_multiplier=0.0)
    assert record[0].filename == __file__  # the warning points at the caller's line, not into dpclip
    train(model, optimizer, loader, steps=3)
    assert engine.accountant.history[0].event == PoissonSampled(0.05, NonPrivate())
    assert engine.get_epsilon(1e-5) == math.inf
    report = engine.privacy_report(delta=1e-5)
    assert report["non_private"] and report["statement"].startswith("NO privacy guarantee")
