"""What one step's noise costs: the Gaussian draw for every trainable parameter, by generator, beside the model's
non-private step (issue 16: "the generator's speed — measure Philox vs Mersenne Twister on CPU").

For each benchmark model of ``compare_opacus.py`` (same sizes) it times, on one thread by default:

- ``dpclip``: the engine's own release, :func:`dpclip.noise.add_noise` (σ = 1, C = 1, divided by the batch): one
  ``normal_`` per parameter from torch's CPU generator (Mersenne Twister) and the add, in place;
- ``dpclip secure_mode``: the same call with ``secure_mode=True`` (float64 draws, two per value, snapped to a grid);
- ``torch, one fused draw``: one ``normal_`` for all parameters together, then the adds (what fusing would save);
- ``numpy PCG64 / Philox / SFC64 / MT19937``: ``Generator.standard_normal`` (ziggurat, float32) for the same count,
  the draw alone (no add, no copy), the fastest a numpy generator could make the draw;
- the model's non-private training step (forward, backward, SGD; batch 256, median over steps).

From these, ``1 + dpclip noise / non-private step`` is the least DP-SGD's step can cost relative to the
non-private one with this generator, even if clipping were free: the noise floor of the ratio.

    OMP_NUM_THREADS=1 python benchmarks/noise_draw.py          # writes benchmarks/results/noise_draw.{json,md}
    python benchmarks/noise_draw.py --smoke --out /tmp/noise   # a quick look (small models, few calls)
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import statistics
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
MODELS = ["mlp", "cnn", "transformer", "resnet"]
NUMPY_GENERATORS = ["PCG64", "Philox", "SFC64", "MT19937"]
# Scripts, not a package (they define only): profile_step.py's set-up (and through it compare_opacus.py's models,
# versions, git, command line) and conv_routes.py's timer.
profile = SimpleNamespace(**runpy.run_path(str(HERE / "profile_step.py")))
median_ms = runpy.run_path(str(HERE / "conv_routes.py"))["median_ms"]


def noise_methods(params: list[torch.Tensor], batch: int) -> dict[str, Callable[[], Any]]:
    """Each way to draw the step's noise for ``params`` (zero sums shaped like them), as a callable."""
    from dpclip.noise import NoiseSource, add_noise

    sums = {f"p{i}": torch.zeros_like(p) for i, p in enumerate(params)}
    total = sum(p.numel() for p in params)
    plain, secure = NoiseSource(seed=0), NoiseSource(secure_mode=True)
    generator = torch.Generator().manual_seed(0)

    def fused() -> None:
        flat = torch.empty(total).normal_(0.0, 1.0 / batch, generator=generator)
        for piece, s in zip(flat.split([s.numel() for s in sums.values()]), sums.values()):
            piece.view_as(s).add_(s, alpha=1.0 / batch)

    methods: dict[str, Callable[[], Any]] = {
        "dpclip": lambda: add_noise(sums, 1.0, 1.0, "l2", plain, 1.0 / batch),
        "dpclip secure_mode": lambda: add_noise(sums, 1.0, 1.0, "l2", secure, 1.0 / batch),
        "torch, one fused draw": fused,
    }
    for name in NUMPY_GENERATORS:
        rng = np.random.Generator(getattr(np.random, name)(0))
        methods[f"numpy {name}"] = lambda rng=rng: rng.standard_normal(total, dtype=np.float32)
    return methods


def nonprivate_step_ms(model: torch.nn.Module, optimizer: Any, loader: Any, steps: int) -> tuple[float, int]:
    """Median ms of the model's ordinary training step on one batch, and that batch's size."""
    criterion = torch.nn.CrossEntropyLoss()
    inputs, labels = next(iter(loader))

    def step() -> None:
        optimizer.zero_grad()
        criterion(model(inputs), labels).backward()
        optimizer.step()

    step()
    return median_ms(step, 1, steps), inputs.shape[0]


def measure(model_name: str, size: str, repeats: int, calls: int, steps: int) -> dict[str, Any]:
    model, optimizer, loader, _ = profile.setup(model_name, "nonprivate", size)  # compare_opacus.py's model and data
    params = [p.detach() for p in model.parameters() if p.requires_grad]  # shapes only: the sums are zeros
    step_ms, batch = nonprivate_step_ms(model, optimizer, loader, steps)
    methods = noise_methods(params, batch)
    medians: dict[str, list[float]] = {name: [] for name in methods}
    for repeat in range(repeats):  # interleaved: each repeat times every method once, starting one further along
        names = list(methods)
        for name in names[repeat % len(names):] + names[:repeat % len(names)]:
            medians[name].append(median_ms(methods[name], 1, calls))
    ms = {name: statistics.median(values) for name, values in medians.items()}
    return {"model": model_name, "parameters": sum(p.numel() for p in params), "tensors": len(params),
            "nonprivate_step_ms": step_ms, "ms": ms, "each_repeat": medians,
            "noise_floor_ratio": 1 + ms["dpclip"] / step_ms}


def render(report: dict[str, Any]) -> str:
    s = report["settings"]
    names = list(report["models"][0]["ms"])
    lines = [
        "# One step's Gaussian noise, by generator, beside the non-private step",
        "",
        f"Made by `{s['command']}` ({s['date']}, git {s['git']}) on {s['cpu']}, {s['threads']} thread(s), torch "
        f"{s['torch']}, numpy {report['numpy']}; ms per draw of every trainable parameter's noise, median over "
        f"{report['repeats']} interleaved repeats of the median of {report['calls']} calls; the non-private step "
        f"is the median of {report['steps']} steps. Noise floor: 1 + dpclip's noise / the non-private step.",
        "",
        "| model | parameters | non-private step | " + " | ".join(names) + " | noise floor of the ratio |",
        "|---|---|---|" + "---|" * len(names) + "---|",
    ]
    for r in report["models"]:
        cells = " | ".join(f"{r['ms'][name]:.2f}" for name in names)
        lines.append(f"| {r['model']} | {r['parameters']:,} | {r['nonprivate_step_ms']:.1f} | {cells} | "
                     f"{r['noise_floor_ratio']:.2f}× |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=MODELS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--steps", type=int, default=10, help="timed non-private steps per model")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="the small model sizes")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = profile.compare_opacus.environment(args.threads, dict(os.environ))
    size = "small" if args.smoke else "full"
    rows = []
    for name in args.models:
        rows.append(measure(name, size, args.repeats, args.calls, args.steps))
        print(f"{name}: step {rows[-1]['nonprivate_step_ms']:.1f} ms, noise {rows[-1]['ms']}", file=sys.stderr, flush=True)
    report = {"settings": settings, "numpy": np.__version__, "size": size, "repeats": args.repeats,
              "calls": args.calls, "steps": args.steps, "models": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "noise_draw.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "noise_draw.md").write_text(render(report))
    print(f"wrote {args.out / 'noise_draw.json'} and {args.out / 'noise_draw.md'}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
