"""The two routes to a convolution's per-example weight gradients, timed on the shapes that decide between them.

For each Conv2d shape (batch 256, one thread by default) it times what dpclip's conv rule can run for the norms:
:class:`~dpclip.grads.ConvWeight` (the convolution's weight backward vmapped over the examples, which torch runs as
one grouped convolution) and :class:`~dpclip.grads.ConvPatches` (the patches of the input, then one batched matrix
product with the output gradients), each from the layer's input and output gradient to the per-example norms.
It records which route the rule picks (positions T ≤ C_out, or a stride-1 layer on one channel whose patches are
built by phases), how the patches are built, and whether the pick was the faster route. The two routes give the
same gradients; the script checks that too.

    OMP_NUM_THREADS=1 python benchmarks/conv_routes.py          # writes benchmarks/results/conv_routes.{json,md}
    python benchmarks/conv_routes.py --repeats 2 --out /tmp/routes --smoke   # a quick look (small batch)
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import torch
import torch.nn as nn

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
BATCH = 256
# (label, C_in, C_out, kernel, stride, padding, input side): the DP CNN's two layers, CIFAR-style 3×3 stages, a
# stem, deep small-resolution layers, and 3×3 first layers on 28×28 (grey) and 32×32 (RGB) images.
SHAPES = [
    ("DP CNN conv 1", 1, 16, 8, 2, 3, 28),
    ("DP CNN conv 2", 16, 32, 4, 2, 0, 13),
    ("CIFAR stage 1", 32, 32, 3, 1, 1, 32),
    ("CIFAR stage 2", 32, 64, 3, 1, 1, 16),
    ("stride-2 64→128", 64, 128, 3, 2, 1, 16),
    ("CIFAR stage 3", 128, 128, 3, 1, 1, 8),
    ("stride-2 128→256", 128, 256, 3, 2, 1, 8),
    ("deep 256→256 at 4×4", 256, 256, 3, 1, 1, 4),
    ("stem 3→64 k7 s2", 3, 64, 7, 2, 3, 32),
    ("first conv 1→16 k3", 1, 16, 3, 1, 1, 28),
    ("first conv 3→32 k3", 3, 32, 3, 1, 1, 32),
]


def median_ms(work: Callable[[], Any], repeats: int, calls: int) -> float:
    """Median over ``repeats`` of the median of ``calls`` timed calls (after one untimed call), in ms."""
    work()
    medians = []
    for _ in range(repeats):
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            work()
            times.append(time.perf_counter() - start)
        medians.append(statistics.median(times))
    return 1e3 * statistics.median(medians)


def measure(shape: tuple, batch: int, repeats: int, calls: int) -> dict[str, Any]:
    from dpclip.grads import ConvPatches, ConvWeight
    from dpclip.grads.contributions import phases_pay
    from dpclip.grads.rules.conv import prefers_patches

    label, c_in, c_out, kernel, stride, padding, side = shape
    torch.manual_seed(0)
    conv = nn.Conv2d(c_in, c_out, kernel, stride, padding)
    x = torch.randn(batch, c_in, side, side)
    with torch.no_grad():
        g = torch.randn_like(conv(x))
    both = [ConvWeight("weight", conv, x, g).materialize(), ConvPatches("weight", conv, x, g).materialize()]
    scale = both[0].abs().max().item()
    agree = (both[0] - both[1]).abs().max().item() <= 1e-4 * max(scale, 1.0)
    times = {
        "weight_backward": median_ms(lambda: ConvWeight("weight", conv, x, g).norm("l2"), repeats, calls),
        "patches": median_ms(lambda: ConvPatches("weight", conv, x, g).norm("l2"), repeats, calls),
    }
    picked = "patches" if prefers_patches(conv, x, g) else "weight_backward"
    faster = min(times, key=times.get)  # type: ignore[arg-type]
    positions = g.shape[2] * g.shape[3]
    return {"label": label, "c_in": c_in, "c_out": c_out, "kernel": kernel, "stride": stride, "padding": padding,
            "side": side, "positions": positions, "ms": times, "picked": picked, "faster": faster,
            "patches_built": "phases" if phases_pay(conv, g) else "channels-last",
            "picked_is_faster": picked == faster, "same_gradients": agree,
            "speedup_of_pick": times["weight_backward" if picked == "patches" else "patches"] / times[picked]}


def render(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [
        "# A convolution's per-example weight gradients: weight backward (vmapped) or patches",
        "",
        f"Made by `{s['command']}` ({s['date']}, git {s['git']}) on {s['cpu']}, {s['threads']} thread(s), torch "
        f"{s['torch']}; batch {report['batch']}, from the layer's input and output gradient to the per-example L2 "
        f"norms, median of {report['repeats']} repeats × {report['calls']} calls, in ms.",
        "",
        "| layer | C_in → C_out | kernel, stride | output positions T | weight backward (vmap) | patches + bmm (patches built by) | rule picks | pick is faster |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["shapes"]:
        ms = r["ms"]
        lines.append(f"| {r['label']} | {r['c_in']} → {r['c_out']} | {r['kernel']}, {r['stride']} | {r['positions']} | "
                     f"{ms['weight_backward']:.2f} | {ms['patches']:.2f} ({r['patches_built']}) | {r['picked'].replace('_', ' ')} | "
                     f"{'yes' if r['picked_is_faster'] else 'no'} ({r['speedup_of_pick']:.2f}×) |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="batch 8, the first two shapes")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    compare = SimpleNamespace(**runpy.run_path(str(HERE / "compare_opacus.py")))  # versions, git, command line
    settings = compare.environment(args.threads, dict(os.environ))
    batch, shapes = (8, SHAPES[:2]) if args.smoke else (BATCH, SHAPES)
    rows = []
    for shape in shapes:
        rows.append(measure(shape, batch, args.repeats, args.calls))
        print(f"{shape[0]}: {rows[-1]['ms']}", file=sys.stderr, flush=True)
    report = {"settings": settings, "batch": batch, "repeats": args.repeats, "calls": args.calls, "shapes": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "conv_routes.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "conv_routes.md").write_text(render(report))
    print(f"wrote {args.out / 'conv_routes.json'} and {args.out / 'conv_routes.md'}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
