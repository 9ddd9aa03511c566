"""Verification beyond its probe: several private steps on scripted batches, each release compared with the
brute force (each example's gradient computed alone, clipped, summed), for models whose behaviour depends on the
batch (its size, its first batch, a loss term stored in forward) — found by an adversarial review.

Each step runs with lr 0, q = 1 and noise 1e-12, so the release is the clipped sum / N up to float rounding."""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import dpclip
from dpclip.errors import ModelNotSupportedError

Loss = Callable[[nn.Module, list[torch.Tensor]], torch.Tensor]
TOL = 1e-5


def _alone(model: nn.Module, tensors: tuple[torch.Tensor, ...], loss: Loss, i: int) -> dict[str, torch.Tensor]:
    copy_ = copy.deepcopy(model)
    loss(copy_, [t[i:i + 1] for t in tensors]).backward()
    return {n: (torch.zeros_like(p) if p.grad is None else p.grad).double() for n, p in copy_.named_parameters()}


def _oracle(grads: list[dict[str, torch.Tensor]], C: float, n: int) -> dict[str, torch.Tensor]:
    total: dict[str, torch.Tensor] = {}
    for g in grads:
        factor = min(1.0, C / max(math.sqrt(sum(float(v.square().sum()) for v in g.values())), 1e-300))
        for name, v in g.items():
            total[name] = total.get(name, 0) + factor * v
    return {name: v / n for name, v in total.items()}


def run_steps(model: nn.Module, tensors: tuple[torch.Tensor, ...], loss: Loss, schedule: list[list[int]],
              mode: str = "auto", verify: str = "first-step", before_step: Callable[[int], None] | None = None) -> list[float]:
    """Run one private step per batch of ``schedule`` (example indices); return each step's largest difference
    from the oracle, relative to max(C/N, the oracle's largest entry). Raises what the engine raises."""
    n = tensors[0].shape[0]
    reference = copy.deepcopy(model)
    grads = [_alone(reference, tensors, loss, i) for i in range(n)]
    norms = sorted(math.sqrt(sum(float(v.square().sum()) for v in g.values())) for g in grads)
    C = norms[len(norms) // 2]  # about half of the examples are clipped
    engine = dpclip.PrivacyEngine(seed=0)
    loader = DataLoader(TensorDataset(*tensors), batch_size=n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        private, optimizer, batches = engine.make_private(
            model, torch.optim.SGD(model.parameters(), lr=0.0), loader, noise_multiplier=1e-12, max_grad_norm=C,
            sample_rate=1.0, grad_sample_mode=mode, verify=verify)
    order = iter([torch.tensor(s) for s in schedule])
    batches.sample_indices = lambda: next(order)
    batches.steps_per_epoch = len(schedule)
    errors = []
    for step, batch in enumerate(batches):
        if before_step is not None:
            before_step(step)
            grads = [_alone(reference, tensors, loss, i) for i in range(n)]
        optimizer.zero_grad()
        loss(private, list(batch)).backward()
        optimizer.step()
        oracle = _oracle([grads[i] for i in schedule[step]], C, n)
        scale = max([C / n] + [float(v.abs().max()) for v in oracle.values()])
        errors.append(max(float((p.grad.double() - oracle[name]).abs().max()) for name, p in model.named_parameters()) / scale)
    return errors


def _data(n: int = 40, d: int = 6, classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)


def _ce(model: nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


class MixesLargeBatches(nn.Module):
    """Centres the hidden layer over the batch, but only in batches of more than 8: a probe of 7 sees no mixing."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 10), nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.fc1(x))
        if x.shape[0] > 8:
            h = h - h.mean(0, keepdim=True)
        return self.fc2(h)


def test_mixing_only_in_large_batches_is_caught_on_the_whole_batch() -> None:
    torch.manual_seed(0)
    errors = run_steps(MixesLargeBatches(), _data(), _ce, [list(range(12)), list(range(40))])  # auto: vmap, exact
    assert max(errors) < TOL, errors
    torch.manual_seed(0)
    with pytest.raises(ModelNotSupportedError, match="whole batch of 12"):
        run_steps(MixesLargeBatches(), _data(), _ce, [list(range(12))], mode="layerwise")


class SortsOverBatch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.sort(torch.tanh(self.fc1(x)), dim=0).values)


def test_a_first_batch_of_one_example_is_verified_again_on_the_next_batch() -> None:
    """One example cannot show a sort over the batch (the probe repeats it): the first step is exact, the next
    batch of 12 is verified and refused before its release."""
    torch.manual_seed(0)
    model = SortsOverBatch()
    released: list[float] = []
    with pytest.raises(ModelNotSupportedError, match="differs when it runs alone"):
        released.extend(run_steps(model, _data(), _ce, [[0], list(range(1, 13))], before_step=lambda step: released.append(step)))
    assert released == [0, 1]  # the second step's forward was refused


class StoresAuxiliaryLoss(nn.Module):
    """Keeps a regulariser computed in forward from a layer's weight used directly (outside its forward)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.c = nn.Linear(6, 8), nn.Linear(8, 3)
        self.aux = torch.zeros(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.aux = (x @ self.a.weight.T).pow(2).sum(1)
        return self.c(torch.tanh(self.a(x)))


def _ce_plus_aux(model: nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
    out = model(batch[0])
    inner = model.module if isinstance(model, dpclip.PrivateModule) else model
    return (F.cross_entropy(out, batch[1], reduction="none") + 0.1 * inner.aux).mean()


def test_a_parameter_used_outside_its_layer_for_a_stored_loss_term_is_refused() -> None:
    torch.manual_seed(0)
    with pytest.raises(ModelNotSupportedError, match=r"a\.weight.*outside their layers"):
        run_steps(StoresAuxiliaryLoss(), _data(), _ce_plus_aux, [list(range(12))], mode="layerwise")
    torch.manual_seed(0)  # auto falls back to vmap, where the stored tensor is caught before the loss reads it
    with pytest.raises(ModelNotSupportedError, match=r"stored a tensor on the model \(aux"):
        run_steps(StoresAuxiliaryLoss(), _data(), _ce_plus_aux, [list(range(12))])


class StoresLayerTerm(nn.Module):
    """A stored loss term computed from a layer's output: the layerwise path sees its gradient at that output."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.c = nn.Linear(6, 8), nn.Linear(8, 3)
        self.aux = torch.zeros(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        self.aux = h.pow(2).sum(1)
        return self.c(h)


def test_a_stored_term_built_on_layer_outputs_is_exact_on_the_layerwise_path() -> None:
    torch.manual_seed(0)
    errors = run_steps(StoresLayerTerm(), _data(), _ce_plus_aux, [list(range(12)), list(range(12, 30))], mode="layerwise")
    assert max(errors) < TOL, errors


class LeNetTail(nn.Module):
    """LeNet-5's C5: a convolution whose output has a single position (kernel 5 on a 5×5 input)."""

    def __init__(self) -> None:
        super().__init__()
        self.c5, self.f6 = nn.Conv2d(16, 120, 5), nn.Linear(120, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.f6(torch.tanh(self.c5(x)).flatten(1))


@pytest.mark.parametrize("verify", ["first-step", "off"])
def test_a_convolution_with_one_output_position_gets_exact_norms(verify: str) -> None:
    """The patch rule's one-position case took √overlap·‖x‖ for the patch norm (5× too large here): verification
    refused it, and without verification every example was over-clipped."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    data = (torch.randn(20, 16, 5, 5, generator=g), torch.randint(0, 10, (20,), generator=g))
    errors = run_steps(LeNetTail(), data, _ce, [list(range(12)), list(range(20))], mode="layerwise", verify=verify)
    assert max(errors) < TOL, errors


class TakesContainer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, inputs: Any) -> torch.Tensor:
        return self.fc(inputs["x"] if isinstance(inputs, dict) else inputs[0])


@pytest.mark.parametrize("mode", ["auto", "vmap"])
@pytest.mark.parametrize("wrap", [lambda x: (x,), lambda x: [x], lambda x: {"x": x}], ids=["tuple", "list", "dict"])
def test_a_batch_passed_inside_a_container_is_found(mode: str, wrap: Callable[[torch.Tensor], Any]) -> None:
    torch.manual_seed(0)
    errors = run_steps(TakesContainer(), _data(), lambda m, b: F.cross_entropy(m(wrap(b[0])), b[1]),
                       [list(range(12)), list(range(5, 30))], mode=mode)
    assert max(errors) < TOL, errors


def test_a_model_called_without_tensors_is_refused_by_dpclip() -> None:
    x, y = _data()
    engine = dpclip.PrivacyEngine(seed=0)
    model = TakesContainer()
    private, optimizer, loader = engine.make_private(
        model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(TensorDataset(x, y), batch_size=8),
        noise_multiplier=1.0, max_grad_norm=1.0)
    before = copy.deepcopy(model.state_dict())
    batch_x, _ = next(iter(loader))
    with pytest.raises(ModelNotSupportedError, match="without any tensor argument"):
        private({"x": batch_x.tolist()})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_torch_error_on_a_later_batch_of_the_vmap_path_is_refused_by_dpclip() -> None:
    """Packed sequences: the verified first batch has equal lengths, a later one not; vmap cannot stack the
    examples' differently shaped states. dpclip's exception, with the hint, before that step's release."""
    from tests.dpclip.oracle_models import RecurrentClassifier

    torch.manual_seed(0)
    model = RecurrentClassifier("lstm", True)
    dpclip.fix_model(model)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(30, 5, 4, generator=g)
    lengths = torch.randint(1, 6, (30,), generator=g)
    lengths[:12] = 5
    x = x * (torch.arange(5)[None, :, None] < lengths[:, None, None])
    y = torch.randint(0, 3, (30,), generator=g)
    steps: list[int] = []
    with pytest.raises(ModelNotSupportedError, match="vmap path failed on this batch of 18.*pack_padded_sequence"):
        run_steps(model, (x, lengths, y), lambda m, b: F.cross_entropy(m(b[0], b[1]), b[2]),
                  [list(range(12)), list(range(12, 30))], mode="vmap", before_step=steps.append)
    assert steps == [0, 1]
