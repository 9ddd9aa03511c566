"""Mixed precision (issue 18): bf16 autocast in the ordinary loop, half-precision parameters, GradScaler.

Under ``torch.autocast("cpu", dtype=torch.bfloat16)`` the activations and output gradients are bf16, while dpclip
forms the per-example norms, the clipping factors, the clipped sum and the noise in float32 or wider. The references
are independent of dpclip: each example's gradient computed alone under the same autocast, clipped to C in float32,
summed and divided by the expected batch size q·N (README § Mixed precision).

Tolerance TOL = 2^-6 = four bf16 unit roundoffs (u = 2^-8, bf16 keeps 8 significant bits) of the largest entry of
the reference gradient (relatively, for each per-example norm). Both sides round every bf16 activation, but in a
batch and alone the roundings and the bf16 matmuls' accumulation orders differ, and dpclip forms each per-example
gradient in float32 from the bf16 activations and output gradients while autograd forms the reference's in bf16: a
few u relative to the gradient's scale (measured on this machine over the three models and both paths: at most
6.4e-3 = 1.6u against the autocast loop and 4.5e-3 against the float32 loop; the autocast loop itself is 4.3e-3 from
the float32 one). A clipping error is larger: with C at the median norm about half of the batch is clipped, and
clipping with a C only 5% off already moves the sum by 3.3e-2 to 6.2e-2 (measured). Rounding a clipping factor to
bf16 (2^-9) would hide inside TOL, so that the layer rules read float32 tensors only is checked directly.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import dpclip.aggregation
from accountants.errors import PrivacyWarning
from dpclip import EngineUsageError, NonFiniteGradientError, PrivacyEngine
from dpclip.grads import tape as tape_module
from dpclip.noise import NoiseSource

Tensor = torch.Tensor
TOL = 2.0**-6
N, BATCH = 40, 20  # q = 1/2: the noisy sum is divided by q·N = 20 whatever the sampled batch's size


class Gain(nn.Module):
    """y = x ⊙ w + b: a layer without a rule, so the tape runs the per-layer vmap fallback on it."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.w = nn.Parameter(1 + 0.1 * torch.randn(width))
        self.b = nn.Parameter(0.1 * torch.randn(width))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.w + self.b


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.norm = nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4)
        self.conv2, self.fc = nn.Conv2d(4, 8, 3, stride=2), nn.Linear(8 * 2 * 2, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.tanh(self.conv2(torch.tanh(self.norm(self.conv1(x))))).flatten(1))


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 16)
        self.layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(self.layer(self.embed(ids)).mean(dim=1))


def build(name: str) -> tuple[nn.Module, TensorDataset]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 3, (N,), generator=g)
    if name == "mlp":
        model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), Gain(32), nn.Linear(32, 3))
        return model, TensorDataset(torch.randn(N, 10, generator=g), labels)
    if name == "cnn":
        return CNN(), TensorDataset(torch.randn(N, 1, 8, 8, generator=g), labels)
    return Encoder(), TensorDataset(torch.randint(0, 20, (N, 6), generator=g), labels)


def bf16_forward(model: nn.Module, x: Tensor, enabled: bool = True) -> Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
        return model(x)


def loop_reference(model: nn.Module, x: Tensor, y: Tensor, bound: float,
                   autocast: bool = True) -> tuple[list[Tensor], Tensor]:
    """Σ_i clip(g_i, C) / (q·N), each g_i the gradient of example i alone (under bf16 autocast unless told
    otherwise), clipped in float32; and the per-example norms (float64)."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    norms = []
    for i in range(len(x)):
        out = bf16_forward(model, x[i : i + 1], autocast)
        grads = [g.float() for g in torch.autograd.grad(F.cross_entropy(out.float(), y[i : i + 1]), params)]
        norm = torch.sqrt(sum((g * g).sum() for g in grads))
        factor = torch.clamp(bound / norm, max=1.0)
        total = [t + factor * g for t, g in zip(total, grads)]
        norms.append(norm.double())
    return [t / BATCH for t in total], torch.stack(norms)


def median_bound(model: nn.Module, data: TensorDataset) -> float:
    """C at the median per-example norm of the data set (so about half of a batch is clipped)."""
    x, y = data.tensors
    return float(loop_reference(model, x, y, 1.0)[1].median())


def make_private(model: nn.Module, data: TensorDataset, lr: float = 0.0, **kwargs):
    engine = PrivacyEngine(seed=kwargs.pop("seed", 0))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    kwargs.setdefault("max_grad_norm", 1.0)
    if kwargs.get("noise_multiplier", 0.0) == 0.0:
        kwargs["noise_multiplier"] = 0.0
        with pytest.warns(PrivacyWarning):
            return (engine, *engine.make_private(model, optimizer, DataLoader(data, batch_size=BATCH), **kwargs))
    return (engine, *engine.make_private(model, optimizer, DataLoader(data, batch_size=BATCH), **kwargs))


def largest_difference(got: list[Tensor], expected: list[Tensor]) -> float:
    """max |got − expected| over every entry, relative to the largest entry of ``expected``."""
    scale = max(float(e.abs().max()) for e in expected)
    return max(float((g - e).abs().max()) for g, e in zip(got, expected)) / scale


def one_step(model, optimizer, loader, autocast: bool = True) -> tuple[Tensor, Tensor]:
    """One step of the ordinary loop (forward under bf16 autocast); returns the batch."""
    for x, y in loader:
        optimizer.zero_grad()
        F.cross_entropy(bf16_forward(model, x, autocast).float(), y).backward()
        optimizer.step()
        return x, y
    raise AssertionError("the loader yielded no batch")


@pytest.mark.parametrize("mode", ["auto", "vmap"])
@pytest.mark.parametrize("name", ["mlp", "cnn", "encoder"])
def test_bf16_autocast_step_equals_the_per_example_loop(name, mode, monkeypatch):
    module, data = build(name)
    reference = copy.deepcopy(module)
    bound = median_bound(reference, data)
    norms_clipped: list[Tensor] = []  # the per-example norms the engine clips with
    calls: list[torch.dtype] = []  # dtypes of every tensor the layer rules read
    clip_factors = dpclip.aggregation.clip_factors
    monkeypatch.setattr(dpclip.aggregation, "clip_factors",
                        lambda norms, c: norms_clipped.append(norms) or clip_factors(norms, c))
    use_call = tape_module._Use.call

    def recorded_call(use, *args, **kwargs):
        call = use_call(use, *args, **kwargs)
        calls.extend(t.dtype for t in [call.input, *call.output_grads] if t is not None and t.is_floating_point())
        return call

    monkeypatch.setattr(tape_module._Use, "call", recorded_call)

    engine, model, optimizer, loader = make_private(module, data, max_grad_norm=bound, grad_sample_mode=mode)
    x, y = one_step(model, optimizer, loader)

    assert engine.grad_sample_path == ("layerwise" if mode == "auto" else "vmap")  # verified without autocast
    expected, norms = loop_reference(reference, x, y, bound)
    assert bool((norms > bound).any()) and bool((norms < bound).any())  # the batch has clipped and unclipped examples
    released = [p.grad for p in module.parameters()]
    assert all(g.dtype == torch.float32 for g in released)
    assert largest_difference(released, expected) <= TOL
    fp32_expected, _ = loop_reference(reference, x, y, bound, autocast=False)  # the float32 training's gradient
    assert largest_difference(released, fp32_expected) <= TOL
    # The norms that set the clipping factors: float32 or wider, equal to each example's own norm.
    used = torch.cat(norms_clipped)
    assert used.dtype in (torch.float32, torch.float64)
    assert torch.allclose(used.double(), norms, rtol=TOL, atol=0)
    if mode == "auto":  # the layer rules (linear, conv, norms, attention row blocks, fallback) read float32
        assert calls and set(calls) == {torch.float32}
    assert engine.steps == 1


def test_privatized_gradient_with_noise_equals_the_float32_one():
    """σ = 1, one engine seed: the same sampled batch and the same noise; the bf16-autocast release equals the
    float32 run's to bf16 tolerance (the noise is drawn in float32 in both)."""
    releases = []
    for autocast in (True, False):
        module, data = build("mlp")
        engine, model, optimizer, loader = make_private(module, data, noise_multiplier=1.0, max_grad_norm=0.05, seed=7)
        one_step(model, optimizer, loader, autocast)
        releases.append([p.grad for p in module.parameters()])
    assert all(g.dtype == torch.float32 for g in releases[0])
    # The same noise (std σ·C/(q·N) = 2.5e-3) in both; the averaged clipped sum has norm ≤ about C = 0.05: compare
    # on that scale (measured: 8.5e-6). Not 0: the autocast run really computed in bf16.
    difference = max(float((a - b).abs().max()) for a, b in zip(*releases))
    assert 0 < difference <= TOL * 0.05


def test_nonfinite_examples_under_autocast_are_dropped_or_refused():
    module, data = build("mlp")
    x, y = data.tensors
    x[:8] = float("nan")  # examples 0..7 have NaN gradients in bf16 as in float32
    reference = copy.deepcopy(module)
    engine, model, optimizer, loader = make_private(module, data, max_grad_norm=0.1, nonfinite="drop")
    xb, yb = one_step(model, optimizer, loader)
    finite = ~xb.isnan().any(dim=1)
    assert 0 < int(finite.sum()) < len(xb)
    expected, _ = loop_reference(reference, xb[finite], yb[finite], 0.1)
    assert largest_difference([p.grad for p in module.parameters()], expected) <= TOL

    module, data = build("mlp")
    data.tensors[0][:8] = float("nan")
    before = [p.detach().clone() for p in module.parameters()]
    engine, model, optimizer, loader = make_private(module, data, lr=0.1, max_grad_norm=0.1)
    with pytest.raises(NonFiniteGradientError):
        one_step(model, optimizer, loader)
    assert engine.steps == 0 and not engine.accountant.history
    assert all(torch.equal(p, b) for p, b in zip(module.parameters(), before))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_parameters_are_refused_before_anything_runs(dtype):
    module, data = build("mlp")
    module.to(dtype)
    data = TensorDataset(data.tensors[0].to(dtype), data.tensors[1])
    before = [p.detach().clone() for p in module.parameters()]
    engine, model, optimizer, loader = make_private(module, data, lr=0.1, noise_multiplier=1.0)
    x, _ = next(iter(loader))
    with pytest.raises(EngineUsageError, match=rf"{str(dtype)[6:]}.*float32.*torch\.autocast"):
        model(x)
    assert engine.steps == 0 and not engine.accountant.history
    assert all(torch.equal(p, b) for p, b in zip(module.parameters(), before))
    assert all(p.grad is None for p in module.parameters())


@pytest.mark.parametrize("law", ["gaussian", "laplace"])
def test_noise_on_a_half_precision_sum_is_formed_in_float32(law):
    """A bf16 sum (e.g. from dpclip.functional on bf16 gradients) is noised in float32 and cast once at the end:
    the release is exactly the float32 release rounded to bf16 (a bf16 noise draw rounds the noise first)."""
    values = (torch.randn(4096, generator=torch.Generator().manual_seed(5)) * 3).bfloat16()
    released = NoiseSource(seed=1).noisy(values, 0.5, law, factor=1 / 20)
    in_float32 = NoiseSource(seed=1).noisy(values.float(), 0.5, law, factor=1 / 20)
    assert released.dtype == torch.bfloat16
    assert torch.equal(released, in_float32.bfloat16())


def test_grad_scaler_is_refused_and_changes_nothing():
    module, data = build("mlp")
    engine, model, optimizer, loader = make_private(module, data, lr=0.5, noise_multiplier=1.0)
    scaler = torch.amp.GradScaler("cpu")
    assert scaler.is_enabled()
    before = [p.detach().clone() for p in module.parameters()]
    batches = (batch for _ in range(2) for batch in loader)  # two epochs of two batches
    for unscale_first in (False, True):
        x, y = next(batches)
        optimizer.zero_grad()
        scaler.scale(F.cross_entropy(bf16_forward(model, x).float(), y)).backward()
        if unscale_first:
            scaler.unscale_(optimizer)
        with pytest.raises(EngineUsageError, match=r"GradScaler.*bf16.*nothing was released, charged or applied"):
            scaler.step(optimizer)
        assert engine.steps == 0 and not engine.accountant.history
        assert all(torch.equal(p, b) for p, b in zip(module.parameters(), before))
        assert "found_inf" not in vars(optimizer) and "grad_scale" not in vars(optimizer)
    # The abandoned steps left the loop consistent: the next batch trains and is charged once.
    x, y = next(batches)
    optimizer.zero_grad()
    F.cross_entropy(bf16_forward(model, x).float(), y).backward()
    optimizer.step()
    assert engine.steps == 1 and len(engine.accountant.history) == 1
    assert any(not torch.equal(p, b) for p, b in zip(module.parameters(), before))


def test_a_disabled_grad_scaler_is_a_plain_step():
    releases = []
    for scaler in (torch.amp.GradScaler("cpu", enabled=False), None):
        module, data = build("mlp")
        engine, model, optimizer, loader = make_private(module, data, noise_multiplier=1.0, seed=3)
        x, y = next(iter(loader))
        optimizer.zero_grad()
        loss = F.cross_entropy(bf16_forward(model, x).float(), y)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        assert engine.steps == 1
        releases.append([p.grad for p in module.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*releases))


class AutocastInForward(nn.Module):
    """A model that turns bf16 autocast on inside its own forward (not in the training loop)."""

    def __init__(self, inside: bool) -> None:
        super().__init__()
        self.inside = inside
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.hidden = nn.Linear(4, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.inside):
            h = torch.tanh(self.hidden(F.relu(self.conv(x)).mean((2, 3))))
        return self.head(h.float())


@pytest.mark.parametrize("mode", ["auto", "layerwise", "vmap"])
def test_autocast_inside_the_forward_is_refused_with_the_fix(mode):
    """Verification compares the batch with each example alone with autocast off; a forward that turns it on
    itself rounds both in bf16, so they differ: refused, naming the first layer that ran under autocast and the
    fix (autocast in the training loop), before anything is applied. The same model with autocast in the loop
    trains."""
    data = TensorDataset(torch.randn(12, 2, 5, 5), torch.randint(0, 3, (12,)))

    def step(inside: bool) -> PrivacyEngine:
        torch.manual_seed(0)
        model = AutocastInForward(inside)
        engine = PrivacyEngine(seed=0)
        private, optimizer, loader = engine.make_private(
            model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(data, batch_size=12),
            noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=mode)
        x, y = next(iter(loader))
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not inside):
            loss = F.cross_entropy(private(x), y)
        loss.backward()
        optimizer.step()
        return engine

    with pytest.raises(dpclip.ModelNotSupportedError,
                       match=r"(?s)turns autocast on itself \(conv \(Conv2d\) ran under it\).*Take torch.autocast out of forward"):
        step(inside=True)
    assert len(step(inside=False).accountant.history) == 1
