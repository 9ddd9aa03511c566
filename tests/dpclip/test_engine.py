"""PrivacyEngine end to end: the ordinary loop, accounting, median clipping, budget guard, validation,
non-finite gradients, checkpoints, empty and virtual batches, optimizers."""

import copy
import io
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import dpclip
from accountants import Composed, Gaussian, Laplace, PoissonSampled, RDPAccountant
from dpclip import (
    EngineUsageError,
    ModelNotSupportedError,
    NonFiniteGradientError,
    PrivacyBudgetExceeded,
    PrivacyEngine,
)


def data(n=200, d=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    return TensorDataset(x, y)


def mlp(d=10, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 16), nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, 2))


def train(model, optimizer, loader, steps=None, epochs=1):
    """The ordinary PyTorch loop; with ``steps``, run exactly that many steps (across epochs if needed)."""
    criterion = nn.CrossEntropyLoss()
    done = 0
    while (steps is None and epochs > 0) or (steps is not None and done < steps):
        for x, y in loader:
            optimizer.zero_grad()
            criterion(model(x), y).backward()
            optimizer.step()
            done += 1
            if steps is not None and done == steps:
                return
        epochs -= 1


def private(model=None, batch_size=20, lr=0.1, seed=0, **kwargs):
    model = model or mlp()
    engine = PrivacyEngine(seed=seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    kwargs.setdefault("noise_multiplier", 1.0)
    kwargs.setdefault("max_grad_norm", 1.0)
    return (engine, *engine.make_private(model, optimizer, DataLoader(data(), batch_size=batch_size), **kwargs))


def test_ordinary_loop_trains_and_epsilon_matches_opacus():
    from opacus.accountants import RDPAccountant as OpacusRDP

    engine, model, optimizer, loader = private(noise_multiplier=0.8, lr=0.5)
    train(model, optimizer, loader, epochs=3)
    assert engine.steps == 3 * len(loader) == 30
    opacus = OpacusRDP()
    opacus.history = [(0.8, 20 / 200, 30)]
    theirs = opacus.get_epsilon(1e-5)
    same_orders = RDPAccountant(orders=opacus.DEFAULT_ALPHAS)
    for entry in engine.accountant.history:
        same_orders.compose(entry.event, entry.count)
    assert same_orders.get_epsilon(1e-5) == pytest.approx(theirs, rel=1e-6)
    assert engine.get_epsilon(1e-5) <= theirs * (1 + 1e-9)  # more orders: never worse
    model.eval()
    x, y = data().tensors
    assert (model(x).argmax(1) == y).float().mean() > 0.8


@pytest.mark.parametrize("norm", ["l2", "l1"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_noiseless_step_applies_the_hand_computed_clipped_mean(norm, reduction):
    """σ → 0: the update is lr × Σ clip(g_i) / (qN), with g_i from a per-example loop."""
    torch.manual_seed(0)
    model = mlp()
    reference = copy.deepcopy(model)
    engine = PrivacyEngine(seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    model, optimizer, loader = engine.make_private(
        model, optimizer, DataLoader(data(), batch_size=20), noise_multiplier=1e-12, max_grad_norm=0.05,
        norm=norm, loss_reduction=reduction,
    )
    x, y = next(iter(loader))
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y, reduction=reduction).backward()
    optimizer.step()
    order = 2 if norm == "l2" else 1
    total = {name: torch.zeros_like(p) for name, p in reference.named_parameters()}
    for i in range(len(x)):
        reference.zero_grad()
        nn.functional.cross_entropy(reference(x[i : i + 1]), y[i : i + 1]).backward()
        flat = torch.cat([p.grad.flatten() for p in reference.parameters()])
        factor = min(1.0, 0.05 / torch.linalg.vector_norm(flat, ord=order).item())
        for name, p in reference.named_parameters():
            total[name] += factor * p.grad
    for name, p in reference.named_parameters():
        expected = p.detach() - total[name] / 20.0  # expected batch size q·N = 20
        torch.testing.assert_close(model.module.get_parameter(name).detach(), expected, atol=1e-6, rtol=1e-5)


def test_median_clipping_converges_to_the_median_and_costs_a_gaussian():
    """Per-example gradient norms are exactly |a_i|·√d with a_i ~ LogNormal(0, 0.5): median 1·√d.
    With lr = 0 the norms stay put; C must settle within 10% of the true median."""

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(4))

        def forward(self, a):
            return (a[:, None] * self.w).sum(dim=1)

    g = torch.Generator().manual_seed(0)
    a = torch.exp(0.5 * torch.randn(2000, generator=g))
    dataset = TensorDataset(a, torch.zeros(2000))
    model = Scaled()
    engine = PrivacyEngine(accountant="rdp", seed=1)  # its oracle is an RDP accountant
    model, optimizer, loader = engine.make_private(
        model, torch.optim.SGD(model.parameters(), lr=0.0), DataLoader(dataset, batch_size=200),
        noise_multiplier=1.0, max_grad_norm=0.1, clipping="median",
    )
    for _ in range(30):
        for x, _y in loader:
            optimizer.zero_grad()
            model(x).mean().backward()  # loss_i = a_i·Σw: per-example gradient a_i·(1,1,1,1)
            optimizer.step()
    true_median = float(np.median(a.numpy())) * 2.0  # √4 = 2
    trajectory = engine.clip_history
    assert len(trajectory) == engine.steps + 1 == 301
    assert np.mean(trajectory[-50:]) == pytest.approx(true_median, rel=0.10)
    # Accounting: the split σ_grad and count noise 2σ_b make exactly one Gaussian(σ) per step.
    reference = RDPAccountant()
    reference.compose(PoissonSampled(0.1, Gaussian(1.0)), 300)
    assert engine.get_epsilon(1e-5) == pytest.approx(reference.get_epsilon(1e-5), rel=1e-9)
    settings = engine.settings
    assert settings.gradient_noise_multiplier == pytest.approx((1.0 - (2 * 10.0) ** -2) ** -0.5)  # σ_b = 200/20


def test_median_clipping_with_laplace_accounts_the_composite_mechanism():
    engine, model, optimizer, loader = private(norm="l1", clipping="median", noise_multiplier=2.0)
    train(model, optimizer, loader, steps=5)
    (entry,) = engine.accountant.history
    assert "Laplace(b=2)" in str(entry.event) and "Gaussian(σ=2)" in str(entry.event)  # 2σ_b, σ_b = 20/20
    laplace_only = RDPAccountant()
    laplace_only.compose(PoissonSampled(0.1, Laplace(2.0)), 5)
    assert engine.get_epsilon(1e-5) > laplace_only.get_epsilon(1e-5)


def test_budget_guard_stops_before_reading_data_and_leaves_the_model_untouched():
    engine, model, optimizer, loader = private(noise_multiplier=1.0, target_epsilon=4.0, target_delta=1e-5)
    taken = []
    with pytest.raises(PrivacyBudgetExceeded, match="one more step"):
        for epoch in range(100):
            for x, y in loader:
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                optimizer.step()
                taken.append(copy.deepcopy(model.module.state_dict()))
    assert len(taken) > 5
    assert engine.get_epsilon() <= 4.0
    assert engine.accountant.get_epsilon_after(engine.settings.step_event(), 1e-5) > 4.0
    after = model.module.state_dict()
    assert all(torch.equal(after[k], taken[-1][k]) for k in after)
    assert len(taken) == engine.steps


def test_a_checkpoint_after_a_budget_refusal_keeps_the_loader_position(tmp_path):
    """The refusal opened no batch: a checkpoint after it starts where the last released step left off (before,
    it saved the position before that released batch, so a resumed run would release it again)."""
    engine, model, optimizer, loader = private(noise_multiplier=1.0, target_epsilon=2.0, target_delta=1e-5)
    with pytest.raises(PrivacyBudgetExceeded):
        for _ in range(100):
            for x, y in loader:
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                optimizer.step()
                last = engine.state_dict()["loader"]
    after = engine.state_dict()["loader"]
    assert after["steps_done_in_epoch"] == last["steps_done_in_epoch"]
    assert torch.equal(after["generator"], last["generator"])


def test_make_private_with_epsilon_reaches_but_does_not_exceed_the_target():
    model = mlp()
    engine = PrivacyEngine(accountant="rdp", seed=0)  # Opacus calibrates with RDP here
    model, optimizer, loader = engine.make_private_with_epsilon(
        model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(data(), batch_size=20),
        target_epsilon=3.0, target_delta=1e-5, epochs=4, max_grad_norm=1.0,
    )
    train(model, optimizer, loader, epochs=4)
    eps = engine.get_epsilon()
    assert eps <= 3.0 and eps > 2.9
    from opacus.accountants.utils import get_noise_multiplier

    opacus_sigma = get_noise_multiplier(target_epsilon=3.0, target_delta=1e-5, sample_rate=0.1, steps=40, epsilon_tolerance=0.001)
    assert engine.settings.noise_multiplier == pytest.approx(opacus_sigma, rel=5e-3)


def test_batchnorm_is_refused_with_a_fix():
    model = nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16), nn.Linear(16, 2))
    engine = PrivacyEngine()
    with pytest.raises(ModelNotSupportedError, match=r"1 \(BatchNorm1d\).*GroupNorm.*fix_model"):
        engine.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(data(), batch_size=20),
                            noise_multiplier=1.0, max_grad_norm=1.0)
    model[1].eval()  # frozen statistics: still refused (training switches it back), and the message says why
    assert "refused in eval mode too" in dpclip.model_problems(model)[0]
    model[1].train()
    fixed = dpclip.fix_model(model)
    assert isinstance(fixed[1], nn.GroupNorm) and dpclip.model_problems(fixed) == []
    engine, m, o, l = private(model=fixed)
    train(m, o, l, steps=2)


def test_random_forward_is_refused_as_random():
    from tests.dpclip.oracle_models import Reparameterised

    model = Reparameterised()
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    engine = PrivacyEngine(seed=0)
    model_p, optimizer, loader = engine.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                                     DataLoader(TensorDataset(x, y), batch_size=20),
                                                     noise_multiplier=1.0, max_grad_norm=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    xb, yb = next(iter(loader))
    with pytest.raises(ModelNotSupportedError, match=r"Reparameterised's own forward \(outside its layers\) draws random numbers \(torch\.randn_like\)"):
        nn.functional.cross_entropy(model_p(xb), yb).backward()
    assert engine.steps == 0 and all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_noise_added_after_every_layer_names_the_model():
    class NoisyOutput(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(10, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) + torch.randn(x.shape[0], 2)  # in the model's own forward, after its last layer

    model = NoisyOutput()
    engine = PrivacyEngine(seed=0)
    model_p, _, loader = engine.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                             DataLoader(data(), batch_size=20), noise_multiplier=1.0, max_grad_norm=1.0)
    xb, yb = next(iter(loader))
    with pytest.raises(ModelNotSupportedError, match=r"NoisyOutput's own forward \(outside its layers\) draws random numbers \(torch\.randn\)"):
        nn.functional.cross_entropy(model_p(xb), yb).backward()


def test_model_without_trainable_parameters_is_refused():
    model = mlp().requires_grad_(False)
    with pytest.raises(ModelNotSupportedError, match="no trainable parameters"):
        PrivacyEngine().make_private(model, torch.optim.SGD(mlp().parameters(), lr=0.1),
                                     DataLoader(data(), batch_size=20), noise_multiplier=1.0, max_grad_norm=1.0)


def test_nonfinite_gradients_raise_by_default_and_can_be_dropped():
    x, y = data().tensors
    x = x.clone()
    x[::7, 0] = float("nan")
    dataset = TensorDataset(x, y)
    for policy in ["error", "drop"]:
        model = mlp()
        before = copy.deepcopy(model.state_dict())
        engine = PrivacyEngine(seed=0)
        m, o, loader = engine.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                           DataLoader(dataset, batch_size=100), noise_multiplier=1.0,
                                           max_grad_norm=1.0, nonfinite=policy)
        xb, yb = next(iter(loader))
        o.zero_grad()
        loss = nn.functional.cross_entropy(m(xb), yb)
        if policy == "error":
            with pytest.raises(NonFiniteGradientError, match="NaN/inf gradients"):
                loss.backward()
            assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)
            assert engine.steps == 0
            # the refusal itself tells that the batch held such an example: outside ε, and the report says so
            report = engine.privacy_report(1e-5)
            assert report["nonfinite_refusals"] == 1 and "this ε does not cover" in report["statement"]
        else:
            loss.backward()
            o.step()
            assert all(torch.isfinite(p).all() for p in model.parameters())
            assert engine.steps == 1


def test_an_empty_batch_may_skip_its_forward():
    """A model that cannot run on 0 rows: the loop calls optimizer.step() alone on an empty Poisson batch, which
    releases the noise and counts; the next step does not mistake the last update for a forward's state change."""
    model = mlp()
    engine = PrivacyEngine(seed=0)
    m, o, loader = engine.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                       DataLoader(data(), batch_size=2), noise_multiplier=1.0, max_grad_norm=1.0)
    empty = 0
    for xb, yb in loader:
        o.zero_grad()
        if len(yb) == 0:
            empty += 1
        else:
            nn.functional.cross_entropy(m(xb), yb).backward()
        o.step()
    assert empty > 0 and engine.steps == len(loader)


def test_resume_gives_exactly_the_same_model_and_epsilon():
    def setup():
        model = mlp(dropout=0.2, seed=5)
        engine = PrivacyEngine(accountant="rdp", seed=11)
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        m, o, l = engine.make_private(model, optimizer, DataLoader(data(), batch_size=30), noise_multiplier=1.0,
                                      max_grad_norm=0.5, clipping="median")
        return engine, m, o, l

    torch.manual_seed(123)
    engine, m, o, l = setup()
    train(m, o, l, steps=12)  # crosses an epoch boundary (7 steps per epoch)
    straight = copy.deepcopy(m.module.state_dict())

    torch.manual_seed(123)
    engine, m, o, l = setup()
    train(m, o, l, steps=5)
    buffer = io.BytesIO()
    torch.save(engine.state_dict(), buffer)
    torch.manual_seed(999)  # disturb every RNG before resuming
    engine2, m2, o2, l2 = setup()
    buffer.seek(0)
    engine2.load_state_dict(torch.load(buffer, weights_only=True))
    train(m2, o2, l2, steps=7)  # finishes the interrupted epoch, then 5 steps into the next
    resumed = m2.module.state_dict()
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    assert engine2.steps == 12
    reference = RDPAccountant()
    reference.compose(engine2.settings.step_event(), 12)
    assert engine2.get_epsilon(1e-5) == reference.get_epsilon(1e-5)


def test_checkpoint_of_another_model_or_mechanism_is_refused():
    engine, m, o, l = private()
    train(m, o, l, steps=2)
    state = engine.state_dict()
    other, m2, o2, l2 = private(model=nn.Sequential(nn.Linear(10, 4), nn.Linear(4, 2)))
    with pytest.raises(dpclip.PrivacyParameterError, match="different model"):
        other.load_state_dict(state)
    noisier, *_ = private(noise_multiplier=2.0)
    with pytest.raises(dpclip.PrivacyParameterError, match="different privacy settings"):
        noisier.load_state_dict(state)
    truncated = {k: v for k, v in state.items() if k != "loader"}
    fresh, *_ = private()
    with pytest.raises(dpclip.PrivacyParameterError, match="truncated"):
        fresh.load_state_dict(truncated)
    assert fresh.steps == 0


def test_empty_poisson_batches_still_add_noise_and_count():
    """q = 1/200 over 200 examples: about a third of the batches are empty."""
    engine, model, optimizer, loader = private(batch_size=1, noise_multiplier=1.0, lr=0.1)
    sizes, changed = [], []
    for x, y in loader:
        before = [p.detach().clone() for p in model.parameters()]
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
        optimizer.step()
        sizes.append(len(x))
        changed.append(any(not torch.equal(b, p) for b, p in zip(before, model.parameters())))
    assert sizes.count(0) > 20
    assert all(changed)  # noise moved the model even on empty batches
    assert engine.steps == len(sizes) == 200


def test_virtual_batches_equal_one_big_batch():
    results = []
    for physical in [None, 7]:
        engine, model, optimizer, loader = private(batch_size=50, seed=3, max_physical_batch_size=physical)
        counted = 0
        for x, y in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
            optimizer.step()
            counted += 1
            if engine.steps == 2:
                break
        results.append((copy.deepcopy(model.module.state_dict()), counted, engine.steps))
    (big, n_big, s_big), (small, n_small, s_small) = results
    assert s_big == s_small == 2 and n_small > n_big
    for k in big:
        torch.testing.assert_close(small[k], big[k], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("make_optimizer", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    lambda p: torch.optim.Adam(p, lr=0.01),
    lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.01),
])
def test_any_torch_optimizer_and_lr_scheduler_work(make_optimizer):
    model = mlp()
    engine = PrivacyEngine(seed=0)
    model, optimizer, loader = engine.make_private(model, make_optimizer(model.parameters()),
                                                   DataLoader(data(), batch_size=20), noise_multiplier=0.5, max_grad_norm=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    train(model, optimizer, loader, steps=3)
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(optimizer.defaults["lr"] * 0.5)
    assert engine.steps == 3


@pytest.mark.parametrize("misuse", [
    "forward outside the loader", "two forwards", "step outside the loader", "skipped step", "closure", "wrap twice",
    "parameter penalty in the loss",
])
def test_misuse_of_the_loop_is_refused(misuse):
    engine, model, optimizer, loader = private()
    x = data().tensors[0][:20]
    criterion = nn.CrossEntropyLoss()
    if misuse == "forward outside the loader":
        with pytest.raises(EngineUsageError, match="outside a batch"):
            model(x)
        model.eval()
        model(x)  # evaluation is fine
    elif misuse == "two forwards":
        it = iter(loader)
        xb, _ = next(it)
        model(xb)
        with pytest.raises(EngineUsageError, match="second training-mode forward"):
            model(xb)
    elif misuse == "step outside the loader":
        with pytest.raises(EngineUsageError, match="outside a batch"):
            optimizer.step()
    elif misuse == "skipped step":
        it = iter(loader)
        xb, yb = next(it)
        criterion(model(xb), yb).backward()
        with pytest.raises(EngineUsageError, match="optimizer.step\\(\\) was not called"):
            next(it)
    elif misuse == "closure":
        with pytest.raises(EngineUsageError, match="closure"):
            optimizer.step(lambda: None)
    elif misuse == "wrap twice":
        with pytest.raises(EngineUsageError, match="already wrapped"):
            PrivacyEngine().make_private(model.module, optimizer.original_optimizer, DataLoader(data(), batch_size=20),
                                         noise_multiplier=1.0, max_grad_norm=1.0)
    elif misuse == "parameter penalty in the loss":  # an L2 term outside the forward: a raw, non-private gradient
        xb, yb = next(iter(loader))
        name, weight = next(iter(model.module.named_parameters()))
        before = weight.detach().clone()
        with pytest.raises(EngineUsageError, match=f"parameter {name}:.*weight_decay"):
            (criterion(model(xb), yb) + 0.1 * weight.square().sum()).backward()
        assert weight.grad is None and torch.equal(weight, before)
    assert engine.steps == 0


def test_a_failing_optimizer_step_is_charged_and_closes_the_batch():
    """The torch optimizer's own step() fails after the noisy gradient was written to p.grad: that release is
    charged (before, ε left it out) and the batch's step is closed, so a retry cannot release the batch again."""
    engine, model, optimizer, loader = private()
    failures = []

    def fail_once(opt, args, kwargs):
        if not failures:
            failures.append(1)
            raise ValueError("transient failure inside the torch optimizer")

    optimizer.original_optimizer.register_step_pre_hook(fail_once)
    xb, yb = next(iter(loader))
    nn.functional.cross_entropy(model(xb), yb).backward()
    with pytest.raises(EngineUsageError, match=r"step\(\) failed after this batch's noisy gradient was released.*"
                                               "ValueError: transient failure.*charged"):
        optimizer.step()
    assert engine.steps == 1 and len(engine.accountant.history) == 1
    with pytest.raises(EngineUsageError, match="outside a batch"):  # the retry releases nothing
        optimizer.step()
    assert engine.steps == 1


@pytest.mark.parametrize("make_optimizer", [lambda p: torch.optim.LBFGS(p), lambda p: torch.optim.SparseAdam(p)])
def test_optimizers_that_cannot_step_a_private_gradient_are_refused(make_optimizer):
    model = mlp()
    with pytest.raises(dpclip.PrivacyParameterError, match="cannot step a private gradient"):
        PrivacyEngine().make_private(model, make_optimizer(list(model.parameters())), DataLoader(data(), batch_size=20),
                                     noise_multiplier=1.0, max_grad_norm=1.0)


def test_add_param_group_refuses_a_parameter_outside_the_model():
    """Added after make_private, a loss temperature would train on its raw batch gradient: refused, nothing added;
    a parameter of the model itself (a layer unfrozen mid-run) is accepted."""
    model = mlp()
    head = model[3]
    head.requires_grad_(False)
    engine = PrivacyEngine(seed=0)
    body = [p for p in model.parameters() if p.requires_grad]
    m, optimizer, loader = engine.make_private(model, torch.optim.SGD(body, lr=0.1), DataLoader(data(), batch_size=20),
                                               noise_multiplier=1.0, max_grad_norm=1.0)
    temperature = nn.Parameter(torch.ones(1))
    groups = len(optimizer.param_groups)
    with pytest.raises(EngineUsageError, match="not the model's.*Nothing was added"):
        optimizer.add_param_group({"params": [temperature]})
    assert len(optimizer.param_groups) == groups
    head.requires_grad_(True)
    optimizer.add_param_group({"params": head.parameters(), "lr": 0.05})
    train(m, optimizer, loader, steps=2)
    assert head.weight.grad is not None and engine.steps == 2


@pytest.mark.parametrize("when", ["before the forward", "between backward and step"])
def test_a_parameter_group_appended_by_hand_is_refused_before_anything_changes(when):
    """``optimizer.param_groups.append(...)`` goes around add_param_group: a loss temperature appended so would be
    stepped with its raw batch gradient (it was, before). Refused at the next forward, or at step() if appended
    after the forward, before anything is released, charged or applied."""
    engine, model, optimizer, loader = private()
    train(model, optimizer, loader, steps=1)
    temperature = nn.Parameter(torch.ones(1))
    group = {**{k: v for k, v in optimizer.param_groups[0].items() if k != "params"}, "params": [temperature]}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    x, y = next(iter(loader))
    optimizer.zero_grad()
    with pytest.raises(dpclip.PrivacyParameterError, match="not the model's.*raw, non-private batch gradient"):
        if when == "before the forward":
            optimizer.param_groups.append(group)
        loss = nn.functional.cross_entropy(model(x) / temperature, y)
        loss.backward()
        if when != "before the forward":
            optimizer.param_groups.append(group)
        optimizer.step()
    assert torch.equal(temperature.detach(), torch.ones(1)) and engine.steps == 1
    assert len(engine.accountant.history) == 1
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


def test_a_parameter_replaced_under_its_name_is_refused():
    """A layer's weight replaced by a new Parameter after make_private: the optimizer still steps the old one, so
    the layer would never train (silently, before). Refused at the next forward, naming the parameter."""
    engine, model, optimizer, loader = private()
    train(model, optimizer, loader, steps=1)
    model[0].weight = nn.Parameter(model[0].weight.detach().clone())
    with pytest.raises(dpclip.PrivacyParameterError, match=r"misses the trainable parameter\(s\) 0\.weight"):
        train(model, optimizer, loader, steps=1)
    assert engine.steps == 1


@pytest.mark.parametrize("skip", ["empty batch", "by label"])
def test_skipping_a_batch_the_model_never_read_is_refused(skip):
    """`if len(y) == 0: continue` (or a skip that looks at the labels) left the batch uncharged although the skip
    depends on who was sampled: 80 of 200 batches went uncharged before. Refused at the next batch, nothing read."""
    engine, model, optimizer, loader = private(batch_size=2 if skip == "empty batch" else 20)
    criterion = nn.CrossEntropyLoss()
    with pytest.raises(EngineUsageError, match="went on without optimizer.step\\(\\) for the batch"):
        for xb, yb in loader:
            if (len(yb) == 0) if skip == "empty batch" else bool((yb == 1).any()):
                continue
            optimizer.zero_grad()
            criterion(model(xb), yb).backward()
            optimizer.step()
    assert engine.steps == len(engine.accountant.history)


def test_skipping_the_last_batch_of_an_epoch_is_refused():
    """The skip of an epoch's last batch meets no next batch: the end of the iteration refuses it, and the next
    iteration hands that batch out again."""
    engine, model, optimizer, loader = private()
    criterion = nn.CrossEntropyLoss()
    with pytest.raises(EngineUsageError, match="went on without optimizer.step\\(\\) for the batch"):
        for done, (xb, yb) in enumerate(loader):
            if done == len(loader) - 1:
                skipped = xb
                continue
            optimizer.zero_grad()
            criterion(model(xb), yb).backward()
            optimizer.step()
    assert engine.steps == len(loader) - 1
    again = [xb for xb, _ in [next(iter(loader))]]
    assert torch.equal(again[0], skipped)


def test_secure_mode_refuses_to_hand_out_a_fresh_draw_for_an_unread_batch():
    """In secure mode a draw cannot be repeated: a loop that left a batch unread and starts over would otherwise
    get a fresh draw, and could pick among draws (all 20 released steps held example 0 in the review's repro)."""
    model = mlp()
    engine = PrivacyEngine(secure_mode=True)
    m, optimizer, loader = engine.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                               DataLoader(data(), batch_size=20), noise_multiplier=1.0, max_grad_norm=1.0)
    for xb, yb in loader:
        break
    with pytest.raises(EngineUsageError, match="secure mode its draw cannot be repeated"):
        next(iter(loader))
    with pytest.raises(EngineUsageError, match="secure mode its draw cannot be repeated"):  # nothing changed
        next(iter(loader))
    assert engine.steps == 0


def test_skipping_a_micro_batch_is_refused():
    """With max_physical_batch_size, a micro-batch left without forward and step while the next one trains dropped
    its examples from the release (63 of 221 in the review's repro), a skip like a whole batch's: refused."""
    engine, model, optimizer, loader = private(batch_size=40, max_physical_batch_size=7)
    with pytest.raises(EngineUsageError, match="went on without optimizer.step\\(\\) for the batch"):
        for index, (xb, yb) in enumerate(loader):
            if index == 1:
                continue
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            optimizer.step()
    assert engine.steps == 0


def test_a_budget_refusal_leaves_no_batch_open_in_secure_mode():
    """The budget refusal comes before any batch is drawn: a new iteration in secure mode meets the budget again,
    not a refusal of an unread batch that never existed."""
    model = mlp()
    engine = PrivacyEngine(secure_mode=True)
    m, optimizer, loader = engine.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                               DataLoader(data(), batch_size=20), noise_multiplier=1.0,
                                               max_grad_norm=1.0, target_epsilon=2.0, target_delta=1e-5)
    with pytest.raises(PrivacyBudgetExceeded):
        for _ in range(100):
            train(m, optimizer, loader)
    with pytest.raises(PrivacyBudgetExceeded):
        next(iter(loader))


def test_a_batch_left_unread_goes_back_to_the_loader():
    """The loop leaves at the top of its body (`if done == k: break`) and a new loop goes on: the batch handed out
    but never used comes first again, so the run is the uninterrupted one (same parameters, same ε)."""
    _, straight, optimizer, loader = private()
    train(straight, optimizer, loader, steps=6)

    engine, model, optimizer, loader = private()
    criterion = nn.CrossEntropyLoss()
    for done, (xb, yb) in enumerate(loader):
        if done == 3:
            unread = xb
            break
        optimizer.zero_grad()
        criterion(model(xb), yb).backward()
        optimizer.step()
    assert torch.equal(next(iter(loader))[0], unread)  # handed out again, and again unread: still first
    train(model, optimizer, loader, steps=3)
    assert engine.steps == 6
    for a, b in zip(straight.parameters(), model.parameters()):
        assert torch.equal(a, b)


def test_a_checkpoint_at_the_top_of_the_loop_resumes_exactly(tmp_path):
    """Saved after the loader handed out batch k + 1 and before the model ran on it: the checkpoint's loader
    position is before that batch, so the resumed run trains on it as the uninterrupted one does (9.0e-3 apart
    after 6 steps before)."""
    path = tmp_path / "top.pt"
    engine, model, optimizer, loader = private()
    criterion = nn.CrossEntropyLoss()
    for done, (xb, yb) in enumerate(loader):
        if done == 3:
            dpclip.save_checkpoint(path, engine)
        optimizer.zero_grad()
        criterion(model(xb), yb).backward()
        optimizer.step()
        if engine.steps == 6:
            break
    resumed_engine, resumed, optimizer, loader = private()
    dpclip.load_checkpoint(path, resumed_engine)
    assert resumed_engine.steps == 3
    train(resumed, optimizer, loader, steps=3)
    assert resumed_engine.get_epsilon(1e-5) == engine.get_epsilon(1e-5)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_a_step_abandoned_mid_batch_skips_its_other_micro_batches():
    """A non-finite gradient in a logical batch's first micro-batch abandons the step; the loop that catches it
    goes on at the next logical batch (before, each remaining micro-batch was refused as 'outside a batch')."""
    x, y = data().tensors
    x = x.clone()
    x[5, 0] = float("inf")
    model = mlp()
    engine = PrivacyEngine(seed=1)
    m, optimizer, loader = engine.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                               DataLoader(TensorDataset(x, y), batch_size=20), noise_multiplier=1.0,
                                               max_grad_norm=1.0, max_physical_batch_size=7)
    refused = 0
    for xb, yb in loader:
        try:
            optimizer.zero_grad()
            nn.functional.cross_entropy(m(xb), yb).backward()
            optimizer.step()
        except NonFiniteGradientError:
            refused += 1
    assert refused >= 1 and engine.nonfinite_refusals == refused
    assert engine.steps + refused == len(loader)  # every logical batch: released or refused, none half-used


def test_an_engine_that_has_stepped_refuses_another_runs_checkpoint(tmp_path):
    """Engine A has released 4 steps; loading run B's 5-step checkpoint reported B's ε alone (the 4 releases of A
    on the same data were dropped). Refused; A's own checkpoint at its current step still loads."""
    own, other = tmp_path / "own.pt", tmp_path / "other.pt"
    engine_b, model_b, optimizer_b, loader_b = private(seed=1)
    train(model_b, optimizer_b, loader_b, steps=5)
    dpclip.save_checkpoint(other, engine_b)
    engine, model, optimizer, loader = private(seed=0)
    train(model, optimizer, loader, steps=4)
    dpclip.save_checkpoint(own, engine)
    epsilon = engine.get_epsilon(1e-5)
    with pytest.raises(dpclip.CheckpointError, match="already released 4 steps of its own run.*another run"):
        dpclip.load_checkpoint(other, engine)
    assert engine.steps == 4 and engine.get_epsilon(1e-5) == epsilon
    dpclip.load_checkpoint(own, engine)
    assert engine.steps == 4


def test_an_engine_that_has_stepped_refuses_another_branch_of_its_own_run(tmp_path):
    """Engine E saves at step 5 and releases steps 6–8; engine F (same noise seed) resumes E's step-5 checkpoint
    and releases another steps 6–8 (lr 0.5 against 0.1: other weights, so other clipped sums) with the same noise.
    Loading F's step-8 checkpoint into E was accepted (same seed, same step count): E's own releases were dropped
    from ε, and the difference of the two branches' releases carries no noise. Refused now, before anything
    changes, also after E reloaded its own state; E's own step-8 checkpoint still loads, a fresh engine loads F's,
    and an engine that released E's first 5 steps itself loads F's continuation of them."""
    engine, model, optimizer, loader = private(seed=3)
    train(model, optimizer, loader, steps=5)
    start = dpclip.save_checkpoint(tmp_path / "five.pt", engine)
    other, model_f, optimizer_f, loader_f = private(seed=3)
    dpclip.load_checkpoint(start, other)
    for group in optimizer_f.param_groups:  # after the load, which restores the optimizer's own lr
        group["lr"] = 0.5
    train(model, optimizer, loader, steps=3)
    train(model_f, optimizer_f, loader_f, steps=3)
    mine = dpclip.save_checkpoint(tmp_path / "mine.pt", engine)
    branch = dpclip.save_checkpoint(tmp_path / "branch.pt", other)
    assert engine.steps == other.steps == 8 and engine.noise.seed == other.noise.seed
    weights, epsilon = [p.detach().clone() for p in model.parameters()], engine.get_epsilon(1e-5)
    with pytest.raises(dpclip.CheckpointError, match="released 8 steps of its own.*does not continue its current state.*new PrivacyEngine"):
        dpclip.load_checkpoint(branch, engine)
    dpclip.load_checkpoint(mine, engine)  # reloading its own state keeps its releases its own: still refused
    with pytest.raises(dpclip.CheckpointError, match="released 8 steps of its own"):
        dpclip.load_checkpoint(branch, engine)
    assert engine.steps == 8 and engine.get_epsilon(1e-5) == epsilon
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    dpclip.load_checkpoint(mine, engine)  # its own current state
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    fresh, model_n, _, _ = private(seed=3)
    dpclip.load_checkpoint(branch, fresh)
    assert fresh.steps == 8 and fresh.release_trail == other.release_trail != engine.release_trail
    assert fresh.release_trail[:5] == engine.release_trail[:5]  # one line up to the branch point
    # an engine that released the same 5 steps itself (same seed, weights, data) may load a continuation of them
    same, model_s, optimizer_s, loader_s = private(seed=3)
    train(model_s, optimizer_s, loader_s, steps=5)
    dpclip.load_checkpoint(branch, same)
    assert same.steps == 8 and same.release_trail == other.release_trail


def test_leaving_a_logical_batch_mid_way_says_how_to_go_on(tmp_path):
    """A break after the first of several micro-batches: step() waits for the last one, which no iteration will
    yield. The refusal names that and the way out (before, it told to call step(), which did nothing)."""
    engine, model, optimizer, loader = private(batch_size=40, max_physical_batch_size=7)
    path = dpclip.save_checkpoint(tmp_path / "start.pt", engine)
    for xb, yb in loader:
        nn.functional.cross_entropy(model(xb), yb).backward()
        optimizer.step()  # a no-op: not the last micro-batch
        break
    with pytest.raises(EngineUsageError, match="left a logical batch before its last micro-batch.*load the last checkpoint"):
        next(iter(loader))
    dpclip.load_checkpoint(path, engine)
    for xb, yb in loader:  # micro-batches until the logical batch is released
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(xb), yb).backward()
        optimizer.step()
        if engine.steps == 1:
            break
    assert engine.steps == 1


def test_reloading_after_a_fresh_randomness_load_is_not_another_run(tmp_path):
    """load_checkpoint(..., fresh_randomness=True) gives the engine a fresh noise seed; loading the same checkpoint
    again with nothing released since is not "another run" (own releases are counted since the last load)."""
    engine, model, optimizer, loader = private()
    train(model, optimizer, loader, steps=2)
    path = dpclip.save_checkpoint(tmp_path / "two.pt", engine)
    target, m2, o2, l2 = private(seed=7)
    dpclip.load_checkpoint(path, target, fresh_randomness=True)
    dpclip.load_checkpoint(path, target, fresh_randomness=True)
    train(m2, o2, l2, steps=1)  # one release of the fresh-seeded branch
    train(model, optimizer, loader, steps=2)
    later = dpclip.save_checkpoint(tmp_path / "four.pt", engine)  # the original run, past the branch
    with pytest.raises(dpclip.CheckpointError, match="already released 1 steps of its own run"):
        dpclip.load_checkpoint(later, target)


def test_progress_bar_shows_epsilon():
    engine, model, optimizer, loader = private()
    bar = engine.progress(loader, delta=1e-5, disable=False, file=io.StringIO())
    for x, y in bar:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        bar.log(loss=loss.item())
    assert "eps" in bar.bar.postfix and "loss" in bar.bar.postfix
    assert float(bar.bar.postfix.split("eps=")[1].split(",")[0]) == pytest.approx(engine.get_epsilon(1e-5), abs=1e-3)


def test_functional_private_step_matches_the_engine():
    """The functional core and the engine implement the same step: same batch, same noise seed → same model."""
    x, y = data().tensors[0][:20], data().tensors[1][:20]
    model_a, model_b = mlp(), mlp()
    accountant = RDPAccountant()
    opt_a = torch.optim.SGD(model_a.parameters(), lr=0.3)
    dpclip.private_step(model_a, opt_a, nn.CrossEntropyLoss(), x, y, noise_multiplier=0.7, max_grad_norm=0.5,
                        sample_rate=0.1, dataset_size=200, accountant=accountant, source=dpclip.NoiseSource(seed=4))
    engine = PrivacyEngine(accountant="rdp", seed=4)  # the functional step uses an RDPAccountant
    m, o, _ = engine.make_private(model_b, torch.optim.SGD(model_b.parameters(), lr=0.3),
                                  DataLoader(data(), batch_size=20), noise_multiplier=0.7, max_grad_norm=0.5)
    engine.begin_step()
    engine.begin_micro_batch(0, last=True)
    nn.functional.cross_entropy(m(x), y).backward()
    o.step()
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=1e-5)
    assert accountant.get_epsilon(1e-5) == engine.get_epsilon(1e-5)


def test_functional_private_step_drops_nonfinite_examples_and_charges_median_clipping():
    x, y = data().tensors[0][:20].clone(), data().tensors[1][:20]
    x_nan = x.clone()
    x_nan[3] = float("nan")
    keep = torch.arange(20) != 3
    updated = []
    for inputs, targets in [(x_nan, y), (x[keep], y[keep])]:  # oracle: the same step without that example
        model = mlp()
        dpclip.private_step(model, torch.optim.SGD(model.parameters(), lr=0.3), nn.CrossEntropyLoss(reduction="sum"),
                            inputs, targets, noise_multiplier=0.7, max_grad_norm=0.5, sample_rate=0.1, dataset_size=200,
                            accountant=RDPAccountant(), source=dpclip.NoiseSource(seed=4), nonfinite="drop")
        updated.append(list(model.parameters()))
    for pa, pb in zip(*updated):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=1e-5)

    model, accountant = mlp(), RDPAccountant()
    median = dpclip.MedianClipping(0.5, count_noise_multiplier=1.0)
    dpclip.private_step(model, torch.optim.SGD(model.parameters(), lr=0.3), nn.CrossEntropyLoss(reduction="sum"), x, y,
                        noise_multiplier=0.7, max_grad_norm=0.5, sample_rate=0.1, dataset_size=200,
                        accountant=accountant, source=dpclip.NoiseSource(seed=4), clipping=median)
    sigma_grad = (0.7**-2 - 2.0**-2) ** -0.5  # Andrew et al. 2021, Thm. 1: gradient and count share σ
    expected = RDPAccountant()
    expected.compose(PoissonSampled(0.1, Composed([Gaussian(sigma_grad), Gaussian(2.0)])))
    (entry,) = accountant.history
    assert f"{sigma_grad:.6g}" in str(entry.event) and "Gaussian(σ=2)" in str(entry.event)
    assert len(median.history) == 2 and median.max_norm != 0.5  # C moved after the released count
    assert accountant.get_epsilon(1e-5) == pytest.approx(expected.get_epsilon(1e-5), rel=1e-12)


def test_pld_accountant_in_the_engine_matches_dp_accounting_and_calibrates_less_noise(tmp_path):
    import dp_accounting as dpa

    model = mlp()
    engine = PrivacyEngine(accountant="pld", seed=0)
    model, optimizer, loader = engine.make_private_with_epsilon(
        model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(data(), batch_size=20),
        target_epsilon=3.0, target_delta=1e-5, epochs=4, max_grad_norm=1.0,
    )
    rdp_engine = PrivacyEngine(accountant="rdp", seed=0)
    rdp_model = mlp()
    rdp_engine.make_private_with_epsilon(
        rdp_model, torch.optim.SGD(rdp_model.parameters(), lr=0.1), DataLoader(data(), batch_size=20),
        target_epsilon=3.0, target_delta=1e-5, epochs=4, max_grad_norm=1.0,
    )
    sigma = engine.settings.noise_multiplier
    assert sigma < rdp_engine.settings.noise_multiplier  # the tighter accountant buys the same ε with less noise
    train(model, optimizer, loader, epochs=4)
    reference = dpa.pld.PLDAccountant(value_discretization_interval=1e-4).compose(
        dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(0.1, dpa.GaussianDpEvent(sigma)), 40)
    ).get_epsilon(1e-5)
    eps = engine.get_epsilon(1e-5)
    assert eps <= 3.0 and eps == pytest.approx(reference, rel=1e-2)
    report = engine.privacy_report()
    assert report["accountant"] == "pld" and report["epsilon_error"] >= 0 and "Accountant: PLD" in report["statement"]
    state = engine.state_dict()
    again = PrivacyEngine(accountant="rdp", seed=0)
    again_model = mlp()
    again.make_private(again_model, torch.optim.SGD(again_model.parameters(), lr=0.1), DataLoader(data(), batch_size=20),
                       noise_multiplier=sigma, max_grad_norm=1.0)
    with pytest.raises(dpclip.PrivacyParameterError, match="another accountant"):
        again.load_state_dict(state)  # an RDP engine refuses a PLD history; nothing changed
    assert again.steps == 0
    with pytest.raises(dpclip.PrivacyParameterError, match="'pld'.*'rdp'"):
        PrivacyEngine(accountant="prv")


@pytest.mark.parametrize("layer", [
    nn.Embedding(10, 4, max_norm=1.0), nn.Embedding(10, 4, sparse=True),
    nn.EmbeddingBag(10, 8, max_norm=1.0), nn.EmbeddingBag(10, 8, mode="sum", sparse=True),
], ids=["max_norm", "sparse", "bag_max_norm", "bag_sparse"])
def test_model_problems_reports_what_make_private_refuses(layer: nn.Module) -> None:
    """model_problems / validate_model (Opacus's ModuleValidator) name the same layer that make_private refuses,
    with the fix (an EmbeddingBag, which has no rule of its own, as an Embedding)."""
    kind = type(layer).__name__
    model = nn.Sequential(layer, nn.Flatten(), nn.Linear(8, 2))
    problems = dpclip.model_problems(model)
    assert len(problems) == 1 and problems[0].startswith(f"0 ({kind})")
    assert ("Use max_norm=None" if layer.max_norm is not None else "use sparse=False") in problems[0]
    with pytest.raises(dpclip.ModelNotSupportedError, match=rf"0 \({kind}\)"):
        dpclip.validate_model(model)
    loader = DataLoader(TensorDataset(torch.randint(0, 10, (16, 2)), torch.zeros(16, dtype=torch.long)), batch_size=4)
    with pytest.raises(dpclip.ModelNotSupportedError, match=rf"0 \({kind}\)"):
        dpclip.PrivacyEngine(seed=0).make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), loader,
                                                  noise_multiplier=1.0, max_grad_norm=1.0)


def test_a_refusal_on_the_layerwise_path_alone_points_to_auto():
    """grad_sample_mode='layerwise' on a model only the vmap path handles (a raw parameter used outside any layer
    with a dropout inside the layer that owns it): the refusal says that 'auto' also tries vmap, and 'auto'
    accepts the model."""

    class RawScale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(10))
            self.fc = nn.Linear(10, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(nn.functional.dropout(x * self.scale, 0.1, self.training))

    with pytest.raises(ModelNotSupportedError, match=r"Only the layerwise path was tried.*grad_sample_mode='auto'"):
        _one_step(RawScale, data(), "layerwise")
    assert _one_step(RawScale, data(), "auto").grad_sample_path == "vmap"


def _one_step(build: Callable[[], nn.Module], dataset: TensorDataset, mode: str, batch: int = 20) -> PrivacyEngine:
    """One private step (expected batch ``batch``) with ``grad_sample_mode=mode``; the engine."""
    torch.manual_seed(0)
    model = build()
    engine = PrivacyEngine(seed=0)
    model_p, optimizer, loader = engine.make_private(
        model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(dataset, batch_size=batch),
        noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=mode)
    xb, yb = next(iter(loader))
    nn.functional.cross_entropy(model_p(xb), yb).backward()
    optimizer.step()
    return engine


def test_a_refusal_on_the_vmap_path_alone_points_to_auto():
    """grad_sample_mode='vmap' on a model torch.func cannot differentiate (a learned relative-position bias passed
    as nn.MultiheadAttention's attn_mask: CPU's fused attention is not differentiable in the mask under its
    transforms): the refusal says that 'auto' also tries the layerwise path, and 'auto' accepts the model and
    trains it on that path."""

    class BiasedAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.rel_bias = nn.Parameter(0.5 * torch.randn(5, 5))
            self.head = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out, _ = self.attn(x, x, x, attn_mask=self.rel_bias, need_weights=False)
            return self.head(out.mean(dim=1))

    data = TensorDataset(torch.randn(12, 5, 8), torch.randint(0, 3, (12,)))
    with pytest.raises(ModelNotSupportedError, match=r"(?s)vmap path: .*Only the vmap path was tried.*grad_sample_mode='auto'"):
        _one_step(BiasedAttention, data, "vmap", batch=12)
    assert _one_step(BiasedAttention, data, "auto", batch=12).grad_sample_path == "layerwise"


def test_a_small_float32_norm_difference_gets_the_rounding_hint():
    from dpclip.grads.verify import _NormMismatch, _rounding_hint

    small = _NormMismatch("norms differ", relative=7e-4, float32=True)
    assert "at most 0.0007 of the norms" in _rounding_hint({"vmap": small, "layerwise": "a torch error"})
    assert "model.double()" in _rounding_hint({"vmap": small})
    # a large difference is mixing, not rounding; a float64 check has no rounding excuse; a plain reason neither
    assert _rounding_hint({"vmap": _NormMismatch("x", relative=0.3, float32=True)}) == ""
    assert _rounding_hint({"vmap": _NormMismatch("x", relative=7e-4, float32=False)}) == ""
    assert _rounding_hint({"vmap": "per-example gradient norms differ"}) == ""


@pytest.mark.parametrize("workers", [0, 2])
def test_a_loop_left_right_after_an_epochs_last_batch_gets_a_full_next_epoch(workers: int) -> None:
    """``break`` after the epoch's last step (a max-steps check) left the epoch marked unfinished, so the next
    ``for batch in loader`` handed out nothing: a whole epoch lost without a word. Now that iteration is the next
    epoch, and the run equals an uninterrupted one."""
    def run(leave_at_last: bool) -> tuple[list[int], list[torch.Tensor], int]:
        torch.manual_seed(0)
        model = mlp()
        engine = PrivacyEngine(seed=0)
        loader = DataLoader(data(), batch_size=50, num_workers=workers)
        model, optimizer, loader = engine.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), loader,
                                                       noise_multiplier=1.0, max_grad_norm=1.0)
        counts = []
        for _ in range(3):
            seen = 0
            for x, y in loader:
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                optimizer.step()
                seen += 1
                if leave_at_last and seen == len(loader):
                    break
            counts.append(seen)
        return counts, [p.detach().clone() for p in model.parameters()], engine.steps

    counts, weights, steps = run(leave_at_last=True)
    plain_counts, plain_weights, plain_steps = run(leave_at_last=False)
    assert counts == plain_counts == [4, 4, 4] and steps == plain_steps == 12
    assert all(torch.equal(a, b) for a, b in zip(weights, plain_weights))


def _indexed_private(n: int, batch_size: int, workers: int, **options: Any) -> tuple[PrivacyEngine, Any, Any, Any]:
    """An engine over n examples (x, y, index), a linear model, SGD, and the private loader."""
    g = torch.Generator().manual_seed(1)
    dataset = TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 2, (n,), generator=g), torch.arange(n))
    model = nn.Linear(4, 2)
    engine = PrivacyEngine(seed=0)
    return (engine, *engine.make_private(
        model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(dataset, batch_size=batch_size, num_workers=workers),
        noise_multiplier=1.0, max_grad_norm=1.0, **options))


def _indexed_run(workers: int, loop: Callable[[Any, Callable[[Any], None]], None]) -> tuple[list[list[int]], int]:
    """The example indices of each step a loop (``loop(loader, train)``) trains on, and the engine's steps."""
    torch.manual_seed(0)
    engine, model, optimizer, loader = _indexed_private(24, 6, workers)
    seen: list[list[int]] = []

    def train(batch: Any) -> None:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(batch[0]), batch[1]).backward()
        optimizer.step()
        seen.append(batch[2].tolist())

    loop(loader, train)
    return seen, engine.steps


def _kept_iterator(loader: Any, train: Callable[[Any], None]) -> None:
    it = iter(loader)  # kept alive by the user (a warm-up of two steps)
    train(next(it))
    train(next(it))
    for batch in loader:
        train(batch)


def _nested(loader: Any, train: Callable[[Any], None]) -> None:
    for i, batch in enumerate(loader):
        train(batch)
        if i == 0:
            for inner in loader:  # the outer iteration stays suspended meanwhile
                train(inner)
            break


def _alternated(loader: Any, train: Callable[[Any], None]) -> None:
    iterators = [iter(loader), iter(loader)]  # used in turn, across the end of the epoch (4 steps)
    for k in range(7):
        batch = next(iterators[k % 2], None)
        if batch is not None:
            train(batch)


@pytest.mark.parametrize("loop", [_kept_iterator, _nested, _alternated])
def test_a_live_earlier_iteration_does_not_shift_the_batches_with_workers(loop: Callable) -> None:
    """With workers, a new iteration while an earlier one was still alive (an iterator kept by hand, a nested loop)
    dropped the steps the earlier one's workers had read ahead: the run went on with later draws (the steps of the
    uninterrupted run 2 further on), unlike the main-process loader and the engine's own checkpoint. Iterators
    used in turn failed past the epoch's end ('generator raised StopIteration')."""
    main_process = _indexed_run(0, loop)
    with_workers = _indexed_run(2, loop)
    assert with_workers == main_process and main_process[1] == len(main_process[0]) >= 4


@pytest.mark.parametrize("workers", [0, 1])
def test_an_iterator_whose_batch_a_newer_iteration_took_back_hands_out_no_more_micro_batches(workers: int) -> None:
    """it1 hands out a step's first micro-batch, unused; iter(loader) takes that draw back unread and hands it out
    again. it1 then handed out the rest of its copy of the draw into the step it2 opened: 20 rows in one released
    step, only 17 distinct (sensitivity 2C, charged C); with workers it raised TypeError. Refused now, and the
    step it2 trains on holds each of its examples once."""
    engine, model, optimizer, loader = _indexed_private(40, 20, workers, max_physical_batch_size=3)
    fed: list[int] = []

    def step(batch: Any) -> None:
        fed.extend(batch[2].tolist())
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(batch[0]), batch[1]).backward()
        optimizer.step()

    it1 = iter(loader)
    next(it1)  # the step's first micro-batch, never trained on
    it2 = iter(loader)
    step(next(it2))  # the same draw, handed out again
    with pytest.raises(EngineUsageError, match=r"in the middle of a logical batch .* handed out again .*one loop at a time"):
        next(it1)
    while engine.steps == 0:
        step(next(it2))
    assert len(fed) == len(set(fed)) > 3


def test_the_loaders_sample_rate_cannot_be_changed_behind_the_accountant():
    """Setting loader.sample_rate = 0.5 after make_private drew batches of ~100 of 200 examples while every step
    was charged at q = 0.1 (ε 0.45 reported against 15 at the q that ran). Refused now; the loader keeps q."""
    engine, model, optimizer, loader = private()
    with pytest.raises(EngineUsageError, match=r"loader.sample_rate cannot be set.*q = 0.1.*new PrivacyEngine"):
        loader.sample_rate = 0.5
    assert loader.sample_rate == 0.1 and loader.expected_batch_size == pytest.approx(20.0)
    sizes = []
    for x, y in loader:
        sizes.append(len(x))
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    assert sum(sizes) / len(sizes) <= 40  # Poisson(q = 0.1) batches of 200 examples (mean 20), not q = 0.5's ~100
    assert engine.accountant.history[-1].event == PoissonSampled(0.1, Gaussian(1.0))


def test_an_unseeded_noise_generator_is_refused():
    """torch.Generator() always starts from torch's public default seed, so noise drawn from it can be regenerated
    by anyone and subtracted from the release (two runs drew bit-identical noise). Refused, naming the fix; a
    seeded generator is accepted, and the report then says ε assumes the seeds stay secret."""
    with pytest.raises(dpclip.PrivacyParameterError, match=r"never seeded.*public seed.*\.seed\(\)"):
        private(noise_generator=torch.Generator())
    generator = torch.Generator()
    generator.seed()  # from the OS
    engine, model, optimizer, loader = private(noise_generator=generator)
    train(model, optimizer, loader, steps=1)
    assert "assumes those seeds stay secret" in engine.privacy_report(1e-5)["statement"]


def test_the_report_names_the_seed_assumption_outside_secure_mode():
    """Outside secure mode the noise and the batches come from seeded generators (the caller's seed, or one drawn
    from the OS and kept in checkpoints): the statement says ε assumes the seeds stay secret. In secure mode, where
    every value comes from the OS, it does not."""
    for seed, secure, caveat in ((0, False, True), (None, False, True), (None, True, False)):
        model = mlp()
        engine = PrivacyEngine(seed=seed, secure_mode=secure)
        m, optimizer, loader = engine.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                                   DataLoader(data(), batch_size=20), noise_multiplier=1.0,
                                                   max_grad_norm=1.0)
        train(m, optimizer, loader, steps=1)
        assert ("assumes those seeds stay secret" in engine.privacy_report(1e-5)["statement"]) == caveat, (seed, secure)


def test_a_checkpoint_written_before_the_release_trail_resumes_and_starts_its_line_there(tmp_path):
    """A checkpoint without "release_trail" (an earlier dpclip; its digest recomputed) loads into a new engine,
    which then saves and reloads its own checkpoints (its line starts at the old step) and still refuses another
    branch continued from the same old checkpoint; an engine with releases of its own refuses the old file."""
    from dpclip.checkpoint import state_digest

    engine, model, optimizer, loader = private(seed=4)
    train(model, optimizer, loader, steps=3)
    old = engine.state_dict()
    del old["release_trail"]
    old["integrity"] = {"algorithm": "sha256", "digest": state_digest({k: v for k, v in old.items() if k != "integrity"})}
    resumed, model_r, optimizer_r, loader_r = private(seed=4)
    resumed.load_state_dict(copy.deepcopy(old))
    assert resumed.release_trail == [0.0, 0.0, 0.0]
    train(model_r, optimizer_r, loader_r, steps=2)
    resumed.load_state_dict(resumed.state_dict())  # its own state
    branch, model_b, optimizer_b, loader_b = private(seed=4)
    branch.load_state_dict(copy.deepcopy(old))
    for group in optimizer_b.param_groups:
        group["lr"] = 0.7
    train(model_b, optimizer_b, loader_b, steps=2)
    with pytest.raises(dpclip.CheckpointError, match="does not continue its current state"):
        resumed.load_state_dict(branch.state_dict())
    with pytest.raises(dpclip.CheckpointError, match="does not continue its current state"):
        engine.load_state_dict(copy.deepcopy(old))  # engine released 3 steps itself; the old file's trail is unknown


def test_a_data_set_that_changes_size_is_refused_before_a_draw():
    """Shrinking the TensorDataset after make_private let torch's IndexError escape from the loader (a list-backed
    one that grew was sampled over its first N only). Refused now with dpclip's message, nothing drawn."""
    engine, model, optimizer, loader = private()
    train(model, optimizer, loader, steps=1)
    dataset = loader.dataset
    dataset.tensors = tuple(t[:100] for t in dataset.tensors)
    state = loader.generator.get_state()
    with pytest.raises(EngineUsageError, match=r"changed size after make_private \(200 examples then, 100 now\)"):
        next(iter(loader))
    assert torch.equal(loader.generator.get_state(), state) and engine.steps == 1


def test_nonfinite_refusals_survive_a_checkpoint():
    """A refusal for non-finite gradients tells, without noise, that its batch held such an example; the report
    says ε does not cover it. A checkpoint dropped the count, so a resumed run's report no longer said so. It is
    kept now, in the resumed engine and in one that reloads its own line."""
    x, y = data().tensors
    x = x.clone()
    x[::7, 0] = float("nan")
    model = mlp()
    engine = PrivacyEngine(seed=0)
    m, optimizer, loader = engine.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                               DataLoader(TensorDataset(x, y), batch_size=100),
                                               noise_multiplier=1.0, max_grad_norm=1.0)
    xb, yb = next(iter(loader))
    with pytest.raises(NonFiniteGradientError):
        nn.functional.cross_entropy(m(xb), yb).backward()
    state = engine.state_dict()
    fresh, *_ = private(seed=0, batch_size=100)
    fresh.load_state_dict(state)
    report = fresh.privacy_report(1e-5)
    assert report["nonfinite_refusals"] == 1 and "this ε does not cover" in report["statement"]
    engine.load_state_dict(state)
    assert engine.nonfinite_refusals == 1
