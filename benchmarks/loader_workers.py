"""Examples/s of private training when ``__getitem__`` is expensive: the Poisson loader in the main process
(``num_workers=0``) vs the same loader with ``num_workers`` worker processes, and plain PyTorch as a reference.

The data set holds 3×64×64 uint8 images; each ``__getitem__`` runs a torch augmentation pipeline (random
resized crop to 32×32 and rotation through ``affine_grid``/``grid_sample``, horizontal flip, colour jitter,
Gaussian blur with a random σ): about 1 ms per item on one core. A small CNN (conv 16 k5 → pool → conv 32 k5 → pool →
linear 10; no normalisation layer) is trained by dpclip (σ = 1, C = 1, SGD) at expected batch 128 (q = 128/N,
20 steps per epoch). The main process runs ``torch.set_num_threads(1)``; workers run one thread each (torch's
default in workers).

Configurations (all built from an ordinary ``DataLoader``; dpclip's Poisson loader is the one ``make_private``
returns, which keeps the loader's workers):

- ``dpclip-w0``: dpclip, ``num_workers=0`` (every item read in the main process between steps);
- ``dpclip-wK``: dpclip, ``num_workers=K`` (default K = 2);
- ``torch-w0`` / ``torch-wK``: non-private training (plain SGD, ``DataLoader(batch_size=128, shuffle=True)``).

Each measurement: a fresh model/optimizer/loader, 2 warm-up steps (dpclip's first step also verifies the
per-example gradients), then the next 18 steps from a fresh ``iter()`` (worker start-up included), timed from
the ``iter()`` call to the end of the 18th optimizer step; examples/s = examples in those steps / seconds. Also
recorded: CPU time per example of the main process and its workers (warm-up included), and the 1-minute load
average after each measurement (wall-clock figures from a machine busy with other work are not comparable). The
configurations are interleaved, ``--repeats`` times (default 5), and the median is reported.

    python benchmarks/loader_workers.py            # writes benchmarks/results/loader_workers.{json,md}
    python benchmarks/loader_workers.py --smoke    # tiny, prints only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import runpy
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from dpclip import PrivacyEngine

RESULTS = Path(__file__).resolve().parent / "results"
BATCH, WARMUP = 128, 2


class AugmentedImages(Dataset):
    """N random 3×64×64 uint8 images with labels; ``__getitem__`` augments one with torch ops (~1 ms)."""

    def __init__(self, n: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randint(0, 256, (n, 3, 64, 64), dtype=torch.uint8, generator=g)
        self.labels = torch.randint(0, 10, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[i].float().div_(255).unsqueeze(0)  # 1×3×64×64
        # random resized crop (scale 0.5–1) + rotation (±15°) to 32×32, in one affine grid
        scale = math.sqrt(0.5 + 0.5 * float(torch.rand(())))
        angle = math.radians(30 * (float(torch.rand(())) - 0.5))
        tx, ty = ((torch.rand(2) - 0.5) * 2 * (1 - scale)).tolist()
        flip = -1.0 if float(torch.rand(())) < 0.5 else 1.0
        theta = torch.tensor([[[scale * math.cos(angle) * flip, -scale * math.sin(angle), tx],
                               [scale * math.sin(angle) * flip, scale * math.cos(angle), ty]]])
        grid = F.affine_grid(theta, [1, 3, 32, 32], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        # colour jitter: brightness, contrast, saturation
        x = x * (0.8 + 0.4 * torch.rand(()))
        mean = x.mean()
        x = (x - mean) * (0.8 + 0.4 * torch.rand(())) + mean
        gray = x.mean(dim=1, keepdim=True)
        x = (x - gray) * (0.8 + 0.4 * torch.rand(())) + gray
        # Gaussian blur, 7×7, σ ∈ [0.1, 2], twice (a sharpen-then-blur style pipeline)
        for _ in range(2):
            sigma = 0.1 + 1.9 * float(torch.rand(()))
            k = torch.exp(-((torch.arange(7) - 3.0) ** 2) / (2 * sigma**2))
            k = (k / k.sum()).view(1, 1, 1, 7).repeat(3, 1, 1, 1)
            x = F.conv2d(F.pad(x, (3, 3, 0, 0), mode="reflect"), k, groups=3)
            x = F.conv2d(F.pad(x, (0, 0, 3, 3), mode="reflect"), k.transpose(2, 3), groups=3)
        x = (x.clamp_(0, 1) - 0.5) / 0.25
        return x[0], self.labels[i]


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 8 * 8, 10),
    )


def dpclip_setup(dataset: Dataset, workers: int, seed: int):
    torch.manual_seed(seed)
    model = make_model()
    engine = PrivacyEngine(seed=seed)
    user_loader = DataLoader(dataset, batch_size=BATCH, num_workers=workers)
    model, optimizer, loader = engine.make_private(
        model, torch.optim.SGD(model.parameters(), lr=0.05), user_loader, noise_multiplier=1.0, max_grad_norm=1.0,
    )
    assert (loader.workers_loader is not None) == (workers > 0), "make_private dropped the loader's workers"
    return model, optimizer, loader


def timed_training(model: nn.Module, optimizer: torch.optim.Optimizer, loader: Any, steps: int) -> dict:
    """``WARMUP`` steps, then examples and seconds of the next ``steps`` from a fresh ``iter()`` (one batch per step:
    no ``max_physical_batch_size``, so dpclip's loader yields one micro-batch per step too)."""

    def train(limit: int) -> int:
        examples = 0
        for done, (x, y) in enumerate(loader, 1):
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
            examples += len(y)
            if done == limit:
                break
        return examples

    train(WARMUP)
    start = time.perf_counter()
    examples = train(steps)
    return {"examples": examples, "seconds": time.perf_counter() - start}


def run_dpclip(dataset: Dataset, workers: int, steps: int, seed: int) -> dict:
    return timed_training(*dpclip_setup(dataset, workers, seed), steps)


def run_torch(dataset: Dataset, workers: int, steps: int, seed: int) -> dict:
    torch.manual_seed(seed)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    return timed_training(model, optimizer, DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=workers), steps)


def cpu_seconds() -> float:
    """CPU time of this process and of its reaped children (the workers, once shut down)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def item_cost_ms(dataset: Dataset, items: int = 200) -> float:
    start = time.perf_counter()
    for i in range(items):
        dataset[i]
    return 1000 * (time.perf_counter() - start) / items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, prints only")
    args = parser.parse_args()
    global BATCH
    if args.smoke:
        BATCH = 16
    torch.set_num_threads(1)
    steps_per_epoch = 20
    n = BATCH * steps_per_epoch if not args.smoke else BATCH * 10
    timed = steps_per_epoch - WARMUP if not args.smoke else 3
    dataset = AugmentedImages(n)
    configs = [("dpclip", 0), ("dpclip", args.workers), ("torch", 0), ("torch", args.workers)]
    cost = item_cost_ms(dataset, 50 if args.smoke else 300)
    runs: dict[str, list[dict]] = {f"{lib}-w{w}": [] for lib, w in configs}
    if args.smoke:
        args.repeats = 1
    for repeat in range(args.repeats):
        for lib, workers in configs:  # interleaved
            cpu = cpu_seconds()
            result = (run_dpclip if lib == "dpclip" else run_torch)(dataset, workers, timed, seed=repeat)
            result["examples_per_s"] = result["examples"] / result["seconds"]
            result["cpu_ms_per_example"] = 1000 * (cpu_seconds() - cpu) / result["examples"]  # warm-up included
            result["load_average_1min"] = os.getloadavg()[0]
            runs[f"{lib}-w{workers}"].append(result)
    summary = {
        name: {
            "median_examples_per_s": statistics.median(r["examples_per_s"] for r in rs),
            "all_examples_per_s": [round(r["examples_per_s"], 1) for r in rs],
            "median_cpu_ms_per_example": round(statistics.median(r["cpu_ms_per_example"] for r in rs), 3),
            "load_average_1min": [round(r["load_average_1min"], 2) for r in rs],
        }
        for name, rs in runs.items()
    }
    w = args.workers
    speedup = summary[f"dpclip-w{w}"]["median_examples_per_s"] / summary["dpclip-w0"]["median_examples_per_s"]
    vs_torch = summary[f"dpclip-w{w}"]["median_examples_per_s"] / summary[f"torch-w{w}"]["median_examples_per_s"]
    report = {
        "command": "python benchmarks/loader_workers.py" + (f" --workers {w}" if w != 2 else "")
        + (f" --repeats {args.repeats}" if args.repeats != 5 else ""),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "main_threads": torch.get_num_threads()},
        "setup": {"dataset_size": n, "expected_batch": BATCH, "steps_timed": timed, "warmup_steps": WARMUP,
                  "item_cost_ms_main_process": round(cost, 3), "repeats": args.repeats, "workers": w},
        "results": summary,
        f"dpclip_w{w}_over_w0": round(speedup, 3),
        f"dpclip_over_torch_w{w}": round(vs_torch, 3),
    }
    print(json.dumps(report, indent=2))
    if args.smoke:
        return
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "loader_workers.json").write_text(json.dumps(report, indent=2) + "\n")
    tables = runpy.run_path(str(Path(__file__).resolve().parent / "render_tables.py"))  # no torch, no import path edits
    (RESULTS / "loader_workers.md").write_text(tables["loader_markdown"](report))
    print("README table: python benchmarks/render_tables.py")


if __name__ == "__main__":
    main()
