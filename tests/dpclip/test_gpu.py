"""On a CUDA machine (skipped elsewhere; `benchmarks/gpu.sh` runs them): the private step stays on the device.

- the noise is drawn on the device by its own generator: no operation makes a host tensor of the parameters'
  size, and nothing of that size is copied between host and device (a TorchDispatchMode sees every op);
- one private step on CUDA equals the same step on the CPU (σ = 0: the per-example clipping; a seeded σ = 1:
  the noise law, by its sample standard deviation), in float32 and under bf16 autocast.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.data import DataLoader, TensorDataset

import dpclip
from accountants.errors import PrivacyWarning
from dpclip.noise import NoiseSource, add_noise

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (benchmarks/gpu.sh runs these)")


class OpDevices(TorchDispatchMode):
    """Records (op, devices of its tensor outputs, largest output numel) and host↔device copies of each op."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, set[str], int]] = []
        self.copies: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        devices = {t.device.type for t in outs}
        self.ops.append((str(func), devices, max((t.numel() for t in outs), default=0)))
        if {t.device.type for t in ins} | devices >= {"cpu", "cuda"}:
            self.copies.append((str(func), max((t.numel() for t in ins + outs), default=0)))
        return out


@pytest.mark.parametrize("norm", ["l2", "l1"])
def test_noise_is_drawn_on_the_device_without_a_host_round_trip(norm):
    summed = {"w": torch.zeros(4096, 64, device="cuda"), "b": torch.zeros(64, device="cuda")}
    with OpDevices() as seen:
        noisy = add_noise(summed, 1.0, 1.0, norm, NoiseSource(seed=0), factor=0.5)
    assert all(t.device.type == "cuda" for t in noisy.values())
    big_host = [(op, n) for op, devices, n in seen.ops if "cpu" in devices and n >= 64]
    assert not big_host, f"noise made on the host: {big_host}"
    assert not [(op, n) for op, n in seen.copies if n >= 64], f"host↔device copies: {seen.copies}"
    expected_std = 0.5 * (1.0 if norm == "l2" else 2**0.5)  # Gaussian σC·factor; Laplace b·√2·factor
    assert noisy["w"].std().item() == pytest.approx(expected_std, rel=0.02)


def _step(device: str, sigma: float, autocast: bool) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.GroupNorm(2, 8), nn.Tanh(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,))
    model = model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    engine = dpclip.PrivacyEngine(seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrivacyWarning)
        private, optimizer, loader = engine.make_private(
            model, optimizer, DataLoader(TensorDataset(x, y), batch_size=32), noise_multiplier=sigma, max_grad_norm=0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    xb, yb = next(iter(loader))
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
        loss = nn.functional.cross_entropy(private(xb.to(device)), yb.to(device))
    loss.backward()
    optimizer.step()
    return {n: (p.detach() - before[n]).cpu() for n, p in model.named_parameters()}


@pytest.mark.parametrize("autocast", [False, True])
def test_a_cuda_step_equals_the_cpu_step(autocast):
    """σ = 0: the same batch (the loader samples on the host with the same seed) clipped on either device."""
    cpu, cuda = _step("cpu", 0.0, autocast), _step("cuda", 0.0, autocast)
    tol = 2**-6 if autocast else 1e-4
    for name in cpu:
        scale = cpu[name].abs().max().item() or 1.0
        assert (cuda[name] - cpu[name]).abs().max().item() <= tol * scale, name


def test_cuda_noise_has_the_calibrated_std():
    update = _step("cuda", 1.0, False)
    noise = torch.cat([u.flatten() for u in update.values()])
    # lr 1, expected batch 32: the noise on each coordinate is N(0, (σC/32)²), the clipped sum adds at most C/32
    assert noise.std().item() == pytest.approx(1.0 * 0.5 / 32, rel=0.15)
