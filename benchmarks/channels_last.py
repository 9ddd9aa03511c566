"""Channels-last activations: is each example's gradient still clipped exactly, and what does the layout buy?

The model is the Fashion-MNIST CNN of ``benchmarks/utility.py`` (``FashionCNN``), once as it is and once with its
activations in channels-last memory order after the first convolution (``channels_last=True``: the same function,
the same parameters). torch's CPU max-pooling kernel for its 2×2 windows at stride 1 is several times faster in
that order.

- **Exactness.** One step at q = 1 (every example of a batch of 64), noise multiplier 0, C = 0.05 (most examples
  clipped), learning rate 0, in dpclip and in Opacus (``grad_sample_mode="hooks"``, the CNN's mode in
  ``utility.py``). The parameters' ``.grad`` after the step is the mean of the clipped per-example gradients; the
  script compares it with a brute-force loop (each example's gradient alone, clipped, summed, divided by 64) and
  reports the largest error relative to the largest entry.
- **Speed.** The median time of one training step (forward, backward, ``optimizer.step()``) at batch 256 and 2048,
  non-private and with dpclip (Poisson batches of that expected size), ``--repeats`` interleaved repeats of
  ``--steps`` timed steps after 3 warm-up steps; the lowest of the repeats' medians.

    OMP_NUM_THREADS=1 python benchmarks/channels_last.py        # writes benchmarks/results/channels_last.{json,md}
    python benchmarks/channels_last.py --smoke                   # exactness only, prints (what the tests run)
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import runpy
import statistics
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
LAYOUTS = ("default", "channels_last")
CLIP = 0.05
EXACT_BATCH = 64


@functools.cache
def _utility() -> SimpleNamespace:
    """benchmarks/utility.py (a script, not a package), run once for its FashionCNN."""
    return SimpleNamespace(**runpy.run_path(str(HERE / "utility.py")))


def build(layout: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return _utility().FashionCNN(channels_last=layout == "channels_last")


def brute_force_mean(model: nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float) -> list[torch.Tensor]:
    """Σ_i min(1, C/‖g_i‖)·g_i / B, each g_i from example i alone (the definition DP-SGD implements)."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    for i in range(len(x)):
        grads = torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), params)
        norm = torch.sqrt(sum(g.double().pow(2).sum() for g in grads))
        factor = min(1.0, clip / float(norm))
        for t, g in zip(total, grads):
            t.add_(g, alpha=factor)
    return [t / len(x) for t in total]


def library_mean(library: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float) -> list[torch.Tensor]:
    """The ``.grad`` one noiseless step of ``library`` leaves on the parameters (every example in the batch)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    loader = DataLoader(TensorDataset(x, y), batch_size=len(x))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # both libraries warn loudly about noise multiplier 0
        if library == "dpclip":
            import dpclip

            engine = dpclip.PrivacyEngine(seed=0)
            private, optimizer, loader = engine.make_private(model, optimizer, loader, noise_multiplier=0.0,
                                                             max_grad_norm=clip, sample_rate=1.0)
        else:
            from opacus import PrivacyEngine

            private, optimizer, loader = PrivacyEngine().make_private(
                module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=0.0, max_grad_norm=clip,
                poisson_sampling=False, grad_sample_mode="hooks")
        for xb, yb in loader:
            optimizer.zero_grad()
            F.cross_entropy(private(xb), yb).backward()
            optimizer.step()
            break
    return [p.grad.detach().clone() for p in model.parameters() if p.requires_grad]


def exactness(libraries: list[str]) -> list[dict[str, Any]]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(EXACT_BATCH, 1, 28, 28, generator=generator)
    y = torch.randint(0, 10, (EXACT_BATCH,), generator=generator)
    rows = []
    for layout in LAYOUTS:
        reference = brute_force_mean(build(layout), x, y, CLIP)
        scale = max(float(r.abs().max()) for r in reference)
        for library in libraries:
            got = library_mean(library, build(layout), x, y, CLIP)
            error = max(float((g - r).abs().max()) for g, r in zip(got, reference))
            rows.append({"library": library, "layout": layout, "max_abs_error": error, "max_abs_reference": scale,
                         "relative_error": error / scale})
    return rows


def step_time(layout: str, private: bool, batch: int, steps: int) -> float:
    """Median seconds of ``steps`` training steps (after 3 warm-up steps)."""
    n = 8 * batch
    generator = torch.Generator().manual_seed(2)
    x, y = torch.randn(n, 1, 28, 28, generator=generator), torch.randint(0, 10, (n,), generator=generator)
    model = build(layout)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loader: Any = DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=True)
    if private:
        import dpclip

        engine = dpclip.PrivacyEngine(seed=0)
        model, optimizer, loader = engine.make_private(model, optimizer, loader, noise_multiplier=1.0,
                                                       max_grad_norm=CLIP)
    times: list[float] = []
    while len(times) < steps + 3:
        for xb, yb in loader:
            start = time.perf_counter()
            optimizer.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            optimizer.step()
            times.append(time.perf_counter() - start)
            if len(times) == steps + 3:
                break
    return statistics.median(times[3:])


def speed(batches: list[int], repeats: int, steps: int) -> list[dict[str, Any]]:
    cases = [(b, private, layout) for b in batches for private in (False, True) for layout in LAYOUTS]
    medians: dict[tuple, list[float]] = {case: [] for case in cases}
    for r in range(repeats):  # interleaved: each repeat runs every case once, starting one case further along
        for case in cases[r % len(cases):] + cases[:r % len(cases)]:
            medians[case].append(step_time(case[2], case[1], case[0], steps))
    return [{"batch": b, "run": "dpclip" if private else "non-private", "layout": layout,
             "ms_per_step": round(1e3 * min(medians[(b, private, layout)]), 2)} for b, private, layout in cases]


def markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [f"# Channels-last activations (`{s['command']}`)", "",
             f"{s['date']}, torch {s['torch']}, opacus {s.get('opacus')}, {s['threads']} thread(s).", "",
             f"Exactness: one noiseless step, q = 1, batch {EXACT_BATCH}, C = {CLIP}; the parameters' gradient "
             "against a brute-force per-example loop.", "",
             "| library | layout | max abs error | max abs entry | relative error |", "|---|---|---|---|---|"]
    for row in report["exactness"]:
        lines.append(f"| {row['library']} | {row['layout']} | {row['max_abs_error']:.3g} | "
                     f"{row['max_abs_reference']:.3g} | {row['relative_error']:.3g} |")
    if report.get("speed"):
        lines += ["", "Speed: ms per training step (median of the steps, lowest over repeats).", "",
                  "| batch | run | default | channels-last |", "|---|---|---|---|"]
        by = {(r["batch"], r["run"], r["layout"]): r["ms_per_step"] for r in report["speed"]}
        for b, run in sorted({(r["batch"], r["run"]) for r in report["speed"]}, key=lambda k: (k[0], k[1] != "non-private")):
            lines.append(f"| {b} | {run} | {by[(b, run, 'default')]} | {by[(b, run, 'channels_last')]} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="exactness only, printed (no files)")
    parser.add_argument("--libraries", nargs="+", default=["dpclip", "opacus"], choices=["dpclip", "opacus"])
    parser.add_argument("--batches", nargs="+", type=int, default=[256, 2048])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    compare = SimpleNamespace(**runpy.run_path(str(HERE / "compare_opacus.py")))
    threads = compare.resolve_threads(None, dict(os.environ))
    torch.set_num_threads(threads)
    settings = compare.environment(threads, dict(os.environ))
    settings["command"] = compare.command_line([str(Path(__file__)), *(sys.argv[1:] if argv is None else argv)],
                                               dict(os.environ))
    report: dict[str, Any] = {"settings": settings, "exactness": exactness(args.libraries)}
    if not args.smoke:
        report["speed"] = speed(args.batches, args.repeats, args.steps)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "channels_last.json").write_text(json.dumps(report, indent=1) + "\n")
        (args.out / "channels_last.md").write_text(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
