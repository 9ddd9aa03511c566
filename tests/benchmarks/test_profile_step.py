"""benchmarks/profile_step.py runs and reports every phase of the step (tiny sizes; no timing is asserted)."""

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

ROOT = Path(__file__).parents[2]
SCRIPT = ROOT / "benchmarks" / "profile_step.py"
PHASES = ["load", "forward", "backward_autograd", "norms_clipped_sum", "noise", "optimizer", "other"]
MODELS = ["mlp", "cnn", "transformer", "resnet"]


def test_profile_step_smoke(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke"], check=True, capture_output=True, text=True,
                          timeout=300, env=env)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert list(report["phases"]) == PHASES
    results = {(r["model"], r["library"]): r for r in report["results"]}
    assert set(results) == {(m, lib) for m in MODELS for lib in ["nonprivate", "dpclip"]} | {("mlp", "floor")}
    for (model, library), r in results.items():
        phases = r["phases_ms"]
        assert list(phases) == [*PHASES, "total"]
        timed = [p for p in PHASES if library != "nonprivate" or p not in ("norms_clipped_sum", "noise")]
        assert all(phases[p] > 0 for p in timed), (model, library, phases)
        assert phases["total"] > 0 and len(r["repeats"]) == 1
        assert sum(phases[p] for p in PHASES) > 0.5 * phases["total"]  # the phases make up the step
        if library == "dpclip":
            assert r["path"] == "layerwise"
            assert r["detail_ms"]["norms"] > 0 and r["detail_ms"]["weighted_sum"] > 0
            assert r["detail_ms"]["norms"] + r["detail_ms"]["weighted_sum"] <= phases["norms_clipped_sum"]
        elif library == "floor":
            assert r["path"] is None and r["detail_ms"]["tape_hooks"] == 0
            assert r["detail_ms"]["norms"] + r["detail_ms"]["weighted_sum"] == pytest.approx(phases["norms_clipped_sum"])
        else:
            assert phases["norms_clipped_sum"] == phases["noise"] == 0
    assert [p["model"] for p in report["profiles"]] == MODELS
    for p in report["profiles"]:
        assert 0 < len(p["top"]) <= 10 and all(e["self_cpu_ms"] > 0 and e["op"] for e in p["top"])
    s = report["settings"]
    assert s["command"].endswith("python benchmarks/profile_step.py --smoke") and s["size"] == "smoke"
    assert Path(s["dpclip_file"]).is_file() and s["threads"] == 1
    for title in ["norms + clipped sum", "noise", "torch.profiler", "| mlp | dpclip |", "| mlp | floor |", "the floor's"]:
        assert title in done.stdout

    # --compare renders the before/after table from two results files
    for name in ("a.json", "b.json"):
        (tmp_path / name).write_text(json.dumps(report))
    table = subprocess.run([sys.executable, str(SCRIPT), "--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")],
                           check=True, capture_output=True, text=True, timeout=60).stdout
    assert table.startswith("| model | run |") and table.count("| resnet | dpclip,") == 2
    assert table.count("| mlp | floor,") == 2


def _brute_force_clipped_mean(model, x, y, clip, batch):
    """Σ_i min(1, C/‖∇ℓ_i‖) ∇ℓ_i / batch, each example's gradient by its own backward (the oracle)."""
    params = list(model.parameters())
    total = [torch.zeros_like(p) for p in params]
    for i in range(len(x)):
        loss = nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1], reduction="sum")
        grads = torch.autograd.grad(loss, params)
        norm = torch.sqrt(sum(g.double().square().sum() for g in grads))
        factor = min(1.0, clip / float(norm))
        for t, g in zip(total, grads):
            t += factor * g
    return {name: t / batch for (name, _), t in zip(model.named_parameters(), total)}


@pytest.mark.parametrize("bias", [True, False])
def test_floor_step_is_exact_dp_sgd(bias):
    """The floor (profile_step.FloorStep) releases what DP-SGD does: the brute-force clipped sum of per-example
    gradients plus N(0, σ²C²) noise, divided by the expected batch (noise checked draw for draw)."""
    floor_module = runpy.run_path(str(SCRIPT))
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 5, bias=bias), nn.ReLU(), nn.Linear(5, 4, bias=bias), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(9, 6, dtype=torch.float64), torch.randint(0, 3, (9,))
    model = model.double()
    norms = []
    for i in range(len(x)):
        grads = torch.autograd.grad(nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1], reduction="sum"),
                                    list(model.parameters()))
        norms.append(float(torch.sqrt(sum(g.square().sum() for g in grads))))
    clip = sorted(norms)[4]  # about half the examples are clipped
    assert min(norms) < clip < max(norms)
    sigma, batch = 0.7, 8
    floor = floor_module["FloorStep"](model, x, y, batch, sigma, clip, lr=0.1, seed=11)
    released, phases = floor.gradients(x, y)
    expected = _brute_force_clipped_mean(model, x, y, clip, batch)
    generator = torch.Generator().manual_seed(11)  # the same draws, in the same order (no sampling drew before)
    for name, p in model.named_parameters():
        noise = torch.empty_like(p).normal_(0.0, sigma * clip, generator=generator) / batch
        torch.testing.assert_close(released[name], expected[name] + noise, rtol=1e-10, atol=1e-12)
    assert set(phases) == {"forward", "backward_autograd", "norms", "noise", "weighted_sum"}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    floor.optimizer.zero_grad()
    floor.step(x, y)
    assert all(not torch.equal(before[name], p) for name, p in model.named_parameters())


def test_floor_step_refuses_layers_it_does_not_handle():
    floor_module = runpy.run_path(str(SCRIPT))
    model = nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="nn.Linear"):
        floor_module["FloorStep"](model, torch.randn(4, 1, 4), torch.zeros(4, dtype=torch.long), 2, 1.0, 1.0, 0.1)
