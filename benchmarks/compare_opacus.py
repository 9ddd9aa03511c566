"""dpclip vs Opacus vs non-private PyTorch: step time, memory and ε, side by side in one run.

Every (model, library) pair runs in a fresh subprocess (so peak RSS is its own), with the same model, data,
seed, expected batch size, (q, σ, C) and number of steps. Libraries: non-private PyTorch; dpclip (default
"auto" mode: the layerwise fast path where every layer has one) and dpclip's general vmap path; Opacus
grad_sample_mode "hooks", "functorch" and "ghost". Opacus refuses nn.MultiheadAttention, so for the
transformer it runs on ModuleValidator.fix(model) (DPMultiheadAttention); dpclip runs the stock model.

    python benchmarks/compare_opacus.py                  # full sizes, CPU: JSON + markdown + plot
    python benchmarks/compare_opacus.py --size small     # a quick look
    python benchmarks/compare_opacus.py --device cuda    # on a GPU (adds the largest batch that fits)
    python benchmarks/compare_opacus.py --smoke          # tiny, checks that everything runs (used by the tests)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

LIBRARIES = ["nonprivate", "dpclip", "dpclip-vmap", "opacus-hooks", "opacus-functorch", "opacus-ghost"]
MODELS = ["mlp", "cnn", "transformer", "resnet"]
SIGMA, CLIP, DELTA = 1.0, 1.0, 1e-5

# (batch, {model: size parameters}) per --size
SIZES = {
    "full": {"batch": 256, "mlp": 512, "cnn": 28, "transformer": (5000, 128, 2, 64), "resnet": (32, 16)},
    "small": {"batch": 64, "mlp": 256, "cnn": 28, "transformer": (2000, 64, 2, 32), "resnet": (32, 8)},
    "smoke": {"batch": 8, "mlp": 32, "cnn": 28, "transformer": (100, 16, 1, 8), "resnet": (16, 4)},
}



class TextClassifier(nn.Module):
    """Embedding + stock nn.TransformerEncoder (nn.MultiheadAttention inside) + linear head."""

    def __init__(self, vocab: int, width: int, layers: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        layer = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)).mean(dim=1))


class ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm1 = nn.GroupNorm(4, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(4, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.norm2(self.conv2(torch.relu(self.norm1(self.conv1(x))))))


def build(model: str, size: str):
    """(model, make_batch(n) -> (inputs, labels)) for a model name."""
    cfg = SIZES[size]
    if model == "mlp":
        width = cfg["mlp"]
        net = nn.Sequential(nn.Linear(784, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))
        return net, lambda n, g: (torch.randn(n, 784, generator=g), torch.randint(0, 10, (n,), generator=g))
    if model == "cnn":  # the classic DP-SGD CNN (Papernot et al. 2020; Opacus MNIST example)
        net = nn.Sequential(
            nn.Conv2d(1, 16, 8, 2, padding=3), nn.Tanh(), nn.MaxPool2d(2, 1),
            nn.Conv2d(16, 32, 4, 2), nn.Tanh(), nn.MaxPool2d(2, 1),
            nn.Flatten(), nn.Linear(32 * 4 * 4, 32), nn.Tanh(), nn.Linear(32, 10),
        )
        return net, lambda n, g: (torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g))
    if model == "transformer":
        vocab, width, layers, seq = cfg["transformer"]

        return TextClassifier(vocab, width, layers), lambda n, g: (torch.randint(0, vocab, (n, seq), generator=g), torch.randint(0, 2, (n,), generator=g))
    if model == "resnet":
        side, width = cfg["resnet"]

        net = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.GroupNorm(4, width), nn.ReLU(),
            ResidualBlock(width), nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.GroupNorm(4, 2 * width), nn.ReLU(),
            ResidualBlock(2 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 10),
        )
        return net, lambda n, g: (torch.randn(n, 3, side, side, generator=g), torch.randint(0, 10, (n,), generator=g))
    raise ValueError(model)


def run_one(model_name: str, library: str, size: str, device: str, steps: int, warmup: int) -> dict[str, Any]:
    """Time ``steps`` training steps (after ``warmup``) of one library on one model, in this process."""
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    batch = SIZES[size]["batch"]
    model, make_batch = build(model_name, size)
    dataset_size = batch * 50
    inputs, labels = make_batch(dataset_size, torch.Generator().manual_seed(0))
    loader = DataLoader(TensorDataset(inputs, labels), batch_size=batch)
    criterion = nn.CrossEntropyLoss()
    epsilon = None
    note = ""
    if library == "nonprivate":
        model = model.to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    elif library.startswith("dpclip"):
        import dpclip

        engine = dpclip.PrivacyEngine(seed=0)
        model = model.to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        model, optimizer, loader = engine.make_private(
            model, optimizer, loader, noise_multiplier=SIGMA, max_grad_norm=CLIP,
            grad_sample_mode="vmap" if library == "dpclip-vmap" else "auto",
        )
    else:
        from opacus import PrivacyEngine
        from opacus.validators import ModuleValidator

        mode = library.split("-")[1]
        if not ModuleValidator.is_valid(model):
            model = ModuleValidator.fix(model)
            note = "ModuleValidator.fix"
        model = model.to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        engine = PrivacyEngine(accountant="rdp")
        kwargs = dict(noise_multiplier=SIGMA, max_grad_norm=CLIP, grad_sample_mode=mode, poisson_sampling=True)
        if mode == "ghost":
            model, optimizer, criterion, loader = engine.make_private(
                module=model, optimizer=optimizer, data_loader=loader, criterion=criterion, **kwargs
            )
        else:
            model, optimizer, loader = engine.make_private(module=model, optimizer=optimizer, data_loader=loader, **kwargs)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times: list[float] = []
    seen = 0
    while len(times) < warmup + steps:
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            start = time.perf_counter()
            optimizer.zero_grad()
            loss = criterion(model(x), y)
            loss.backward()
            optimizer.step()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            seen += len(x)
            if len(times) == warmup + steps:
                break
    if library != "nonprivate":
        epsilon = engine.get_epsilon(DELTA)
    if library.startswith("dpclip"):
        note = engine.grad_sample_path  # the path verification chose on the first step
    measured = times[warmup:]
    ms = statistics.median(measured) * 1e3
    result = {
        "model": model_name,
        "library": library,
        "ms_per_step": ms,
        "examples_per_s": batch / (ms / 1e3),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "epsilon": epsilon,
        "steps_timed": len(measured),
        "first_step_ms": times[0] * 1e3,  # dpclip: includes the first-step verification
        "note": note,
    }
    if device == "cuda":
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


ACCURACY_EPSILONS = (1.0, 3.0, 8.0)


def accuracy_run(library: str, epsilon: float, seed: int, epochs: int) -> dict[str, Any]:
    """Train the main job's digits CNN privately with ``library`` at the σ dpclip calibrates for ``epsilon``.

    Both libraries get the same initial weights, data split, (q, σ, C, steps), optimizer and learning rate; each
    samples its own Poisson batches and noise, so accuracies differ by training noise only. ε is what each
    library's own accountant reports for the run.
    """
    from torch.utils.data import DataLoader

    from accountants import noise_multiplier_for
    from dpclip_examples.digits import DigitsCNN, accuracy, load_data
    from dpclip_examples.train_digits import DEFAULTS

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    train, test = load_data(torch.device("cpu"))
    batch, clip, lr = DEFAULTS["batch_size"], DEFAULTS["max_grad_norm"], DEFAULTS["lr"]
    loader = DataLoader(train, batch_size=batch)
    # Opacus samples at q = 1 / len(loader) (not batch / N); both libraries use that q here.
    q = 1 / len(loader)
    steps = epochs * len(loader)
    sigma = noise_multiplier_for(epsilon, DELTA, q, steps)
    torch.manual_seed(seed)
    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    start = time.perf_counter()
    if library == "dpclip":
        import dpclip

        engine = dpclip.PrivacyEngine(seed=seed)
        model, optimizer, loader = engine.make_private(
            model, optimizer, loader, noise_multiplier=sigma, max_grad_norm=clip, sample_rate=q
        )
    else:
        from opacus import PrivacyEngine

        engine = PrivacyEngine(accountant="rdp")
        model, optimizer, loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=sigma, max_grad_norm=clip,
            poisson_sampling=True, grad_sample_mode="hooks",
        )
    criterion = nn.CrossEntropyLoss()
    taken = 0
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            criterion(model(x), y).backward()
            optimizer.step()
            taken += 1
    wall = time.perf_counter() - start
    module = model._module if hasattr(model, "_module") else model.module
    return {"library": library, "target_epsilon": epsilon, "seed": seed, "sigma": sigma, "sample_rate": q,
            "steps": taken, "planned_steps": steps, "epsilon": engine.get_epsilon(DELTA),
            "test_accuracy": accuracy(module, test), "wall_s": wall}


def accuracy_table(runs: list[dict[str, Any]]) -> str:
    lines = ["| ε target | σ | steps | library | test accuracy (mean ± sd over seeds) | ε reported | s per run |",
             "|---|---|---|---|---|---|---|"]
    for eps in sorted({r["target_epsilon"] for r in runs}):
        for lib in ("dpclip", "opacus"):
            rs = [r for r in runs if r["target_epsilon"] == eps and r["library"] == lib]
            if not rs:
                continue
            accs = [r["test_accuracy"] for r in rs]
            sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
            lines.append(
                f"| {eps:g} | {rs[0]['sigma']:.3f} | {rs[0]['steps']} | {lib} | {statistics.mean(accs):.3f} ± {sd:.3f} "
                f"(n={len(accs)}) | {max(r['epsilon'] for r in rs):.3f} | {statistics.mean(r['wall_s'] for r in rs):.1f} |"
            )
    return "\n".join(lines)


def spawn(model: str, library: str, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, __file__, "--worker", model, library, "--size", args.size, "--device", args.device,
               "--steps", str(args.steps), "--warmup", str(args.warmup)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or ["failed"])[-1][:300]
        return {"model": model, "library": library, "error": reason}
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(results: list[dict[str, Any]]) -> str:
    base = {r["model"]: r["ms_per_step"] for r in results if r["library"] == "nonprivate" and "error" not in r}
    lines = ["| model | library | ms/step | examples/s | × non-private | peak RSS MB | ε (δ=1e-5) | note |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['library']} | — | — | — | — | — | {r['error']} |")
            continue
        ratio = r["ms_per_step"] / base[r["model"]] if r["model"] in base else float("nan")
        eps = "—" if r["epsilon"] is None else f"{r['epsilon']:.3f}"
        lines.append(
            f"| {r['model']} | {r['library']} | {r['ms_per_step']:.1f} | {r['examples_per_s']:.0f} | {ratio:.2f} | "
            f"{r['peak_rss_mb']:.0f} | {eps} | {r['note']} |"
        )
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if "error" not in r]
    if not ok:
        return
    models = sorted({r["model"] for r in ok}, key=MODELS.index)
    libraries = [lib for lib in LIBRARIES if any(r["library"] == lib for r in ok)]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / len(libraries)
    for i, lib in enumerate(libraries):
        for ax, key in zip(axes, ["ms_per_step", "peak_rss_mb"]):
            values = [next((r[key] for r in ok if r["model"] == m and r["library"] == lib), 0.0) for m in models]
            ax.bar([j + i * width for j in range(len(models))], values, width, label=lib)
    for ax, title in zip(axes, ["step time (ms, lower is better)", "peak memory (RSS MB, lower is better)"]):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(models))], models)
        ax.set_title(title)
        ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(SIZES), default="full", help="smoke is what --smoke uses")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=MODELS)
    parser.add_argument("--libraries", nargs="+", choices=LIBRARIES, default=LIBRARIES)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per configuration (after warm-up)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--timeout", type=int, default=900, help="seconds allowed per configuration")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="output folder")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 2 steps: checks that everything runs")
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "LIBRARY"), help=argparse.SUPPRESS)
    parser.add_argument(
        "--accuracy", action="store_true",
        help="instead of timing: train the digits CNN of the main job (dpclip_examples.digits) with dpclip and Opacus at the same "
        "(q, sigma, C, steps) for each --epsilons, over --seeds seeds, and compare test accuracy and reported epsilon",
    )
    parser.add_argument("--epsilons", nargs="+", type=float, default=list(ACCURACY_EPSILONS))
    parser.add_argument("--seeds", type=int, default=3, help="seeds per (epsilon, library) in --accuracy")
    parser.add_argument("--epochs", type=int, default=None, help="epochs in --accuracy (default: the main job's)")
    args = parser.parse_args()
    if args.accuracy:
        from dpclip_examples.train_digits import DEFAULTS

        epochs = args.epochs or (1 if args.smoke else DEFAULTS["epochs"])
        seeds = 1 if args.smoke else args.seeds
        runs = [accuracy_run(lib, eps, seed, epochs) for eps in args.epsilons for lib in ("dpclip", "opacus") for seed in range(seeds)]
        args.out.mkdir(parents=True, exist_ok=True)
        stem = "accuracy_digits_smoke" if args.smoke else "accuracy_digits"
        (args.out / f"{stem}.json").write_text(json.dumps({"delta": DELTA, "epochs": epochs, "runs": runs}, indent=1))
        markdown = accuracy_table(runs)
        (args.out / f"{stem}.md").write_text(markdown + "\n")
        print(markdown)
        return
    if args.smoke:
        args.size, args.steps, args.warmup = "smoke", 2, 1
    if args.worker:
        print(json.dumps(run_one(*args.worker, args.size, args.device, args.steps, args.warmup)))
        return
    if args.smoke:  # in this process: checks that every library runs, not what it costs
        results = [run_one(m, lib, args.size, args.device, args.steps, args.warmup) for m in args.models for lib in args.libraries]
    else:
        results = [spawn(m, lib, args) for m in args.models for lib in args.libraries]
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"compare_opacus_{args.size}_{args.device}"
    meta = {"size": args.size, "device": args.device, "batch": SIZES[args.size]["batch"], "sigma": SIGMA,
            "max_grad_norm": CLIP, "delta": DELTA, "steps": args.steps, "threads": int(os.environ.get("BENCH_THREADS", "2"))}
    (args.out / f"{stem}.json").write_text(json.dumps({"settings": meta, "results": results}, indent=1))
    markdown = table(results)
    (args.out / f"{stem}.md").write_text(markdown + "\n")
    plot(results, args.out / f"{stem}.png")
    print(markdown)


if __name__ == "__main__":
    main()
