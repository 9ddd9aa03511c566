"""dpclip.retain_freed_memory against the kernel's own count of page faults (getrusage's ru_minflt) per DP step."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import dpclip
from dpclip import allocator

# A DP training loop (the layerwise path: a sequence model whose linear layers keep per-example gradients) that
# prints the median page faults per step after its first 8 steps; argv[1] = "1" retains freed memory first.
_PROBE = """
import json, resource, statistics, sys
import torch, torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset
import dpclip
torch.set_num_threads(1)
applied = dpclip.retain_freed_memory() if sys.argv[1] == "1" else None
torch.manual_seed(0)
class Pooled(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 4))
    def forward(self, x):
        return self.body(x).mean(dim=1)
x, y = torch.randn(512, 32, 256), torch.randint(0, 4, (512,))
engine, model = dpclip.PrivacyEngine(seed=0), Pooled()
model, optimizer, loader = engine.make_private(
    model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(TensorDataset(x, y), batch_size=64),
    noise_multiplier=1.0, max_grad_norm=1.0)
faults = []
for epoch in range(3):
    for xb, yb in loader:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(xb), yb).backward()
        optimizer.step()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": statistics.median(faults[8:]), "path": engine.grad_sample_path}))
"""


def _probe(retain: bool) -> dict:
    done = subprocess.run([sys.executable, "-c", _PROBE, "1" if retain else "0"], capture_output=True, text=True,
                          timeout=300, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(allocator._glibc() is None, reason="needs 64-bit Linux with glibc")
def test_retained_memory_takes_the_page_faults_out_of_the_step():
    """Without it, each step takes ~16,000 fresh pages from the kernel here (the memory the previous step freed
    went back); with it, a step after the first few reuses the heap: (almost) no page faults."""
    default, retained = _probe(False), _probe(True)
    assert default["path"] == retained["path"] == "layerwise"
    assert retained["applied"] is True
    assert default["faults"] >= 1000, default  # the probe does measure the cost it is about
    assert retained["faults"] <= 64, retained


def test_nothing_changes_without_glibc(monkeypatch):
    monkeypatch.setattr(allocator, "_glibc", lambda: None)
    assert dpclip.retain_freed_memory() is False


@pytest.mark.parametrize("trim", [-1, 2**31, 1.5, True, "1"])
def test_bad_trim_threshold_is_refused(trim, monkeypatch):
    def untouched():
        raise AssertionError("mallopt reached")

    monkeypatch.setattr(allocator, "_glibc", untouched)
    with pytest.raises(ValueError, match="trim_bytes"):
        dpclip.retain_freed_memory(trim)
