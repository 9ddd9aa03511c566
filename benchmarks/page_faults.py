"""Page faults per training step, and where the step takes them: glibc handing freed memory back (issue 16).

Each run is a fresh process (the allocator's state is the process's): one model of ``compare_opacus.build``, one
setting, ``--warmup`` untimed steps, then ``--steps`` steps, each split into forward, backward and optimizer step
by ``time.perf_counter`` and the kernel's count of page faults (``getrusage``'s ``ru_minflt``); for dpclip,
``LayerwiseTape.finish`` (the per-example norms and clipped sum, run at the end of backward) is timed apart by
wrapping it. Settings:

- ``nonprivate`` / ``dpclip``: glibc's defaults;
- ``dpclip-whole``: dpclip with the kept per-example gradients formed as one block per layer (``PIECE_BYTES`` set
  beyond any layer's), as before they were formed in pieces;
- ``nonprivate-retained`` / ``dpclip-whole-retained`` / ``dpclip-retained``: the same, the process first calling
  ``dpclip.retain_freed_memory()``.

Settings run interleaved, ``--repeats`` times; the tables give the median over repeats of each run's median.

    OMP_NUM_THREADS=1 python benchmarks/page_faults.py            # results/page_faults.{json,md} (~6 min)
    python benchmarks/page_faults.py --smoke                     # tiny, prints only (the tests)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import runpy
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

HERE = Path(__file__).resolve().parent
SETTINGS = ("nonprivate", "nonprivate-retained", "dpclip-whole", "dpclip", "dpclip-whole-retained", "dpclip-retained")
PHASES = ("forward", "backward", "of which norms + clipped sum", "optimizer", "step")


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def run_one(model_name: str, setting: str, size: str, warmup: int, steps: int) -> dict[str, Any]:
    """One run in this process: per phase, the median over ``steps`` steps of (ms, page faults)."""
    import torch
    import torch.nn as nn
    from torch.utils.data import DataLoader, TensorDataset

    import dpclip
    from dpclip.grads import contributions
    from dpclip.grads.tape import LayerwiseTape

    if setting.endswith("-retained") and not dpclip.retain_freed_memory():
        raise SystemExit("retained settings need glibc")
    if setting.startswith("dpclip-whole"):
        contributions.PIECE_BYTES = 2**62  # one piece per layer: the block as a whole
    compare_opacus = SimpleNamespace(**runpy.run_path(str(HERE / "compare_opacus.py")))
    torch.manual_seed(0)
    torch.set_num_threads(1)
    batch = compare_opacus.SIZES[size]["batch"]
    model, make_batch = compare_opacus.build(model_name, size)
    inputs, labels = make_batch(batch * 50, torch.Generator().manual_seed(0))
    loader = DataLoader(TensorDataset(inputs, labels), batch_size=batch)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    finish: list[tuple[float, int]] = []
    if setting.startswith("dpclip"):
        engine = dpclip.PrivacyEngine(seed=0)
        model, optimizer, loader = engine.make_private(model, optimizer, loader, noise_multiplier=1.0, max_grad_norm=1.0)
        original = LayerwiseTape.finish

        def timed_finish(self: LayerwiseTape) -> None:
            start, faulted = time.perf_counter(), _faults()
            original(self)
            finish.append((time.perf_counter() - start, _faults() - faulted))

        LayerwiseTape.finish = timed_finish  # type: ignore[method-assign]
    criterion = nn.CrossEntropyLoss()
    records: list[dict[str, tuple[float, int]]] = []
    batches = iter(loader)
    while len(records) < warmup + steps:
        try:
            x, y = next(batches)
        except StopIteration:
            batches = iter(loader)
            continue
        marks = [(time.perf_counter(), _faults())]
        optimizer.zero_grad()
        loss = criterion(model(x), y)
        marks.append((time.perf_counter(), _faults()))
        finish.clear()
        loss.backward()
        marks.append((time.perf_counter(), _faults()))
        optimizer.step()
        marks.append((time.perf_counter(), _faults()))
        record = {phase: ((marks[i + 1][0] - marks[i][0]) * 1e3, marks[i + 1][1] - marks[i][1])
                  for i, phase in enumerate(("forward", "backward", "optimizer"))}
        record["step"] = ((marks[-1][0] - marks[0][0]) * 1e3, marks[-1][1] - marks[0][1])
        if finish:
            record["of which norms + clipped sum"] = (sum(t for t, _ in finish) * 1e3, sum(f for _, f in finish))
        records.append(record)
    measured = records[warmup:]
    return {"model": model_name, "setting": setting, "phases": {
        phase: {"ms": statistics.median(r[phase][0] for r in measured), "faults": statistics.median(r[phase][1] for r in measured)}
        for phase in PHASES if phase in measured[0]}}


def markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = ["# Page faults per step, and where the step takes them", "",
             f"Made by `{s['command']}` ({s['date']}, git {s['git']}, {s['duration_s'] / 60:.0f} min) on {s['cpu']}, one "
             f"thread, torch {s['torch']}; batch {s['batch']} (dpclip: Poisson-sampled, expected size); each run a fresh "
             f"process, {s['repeats']} repeats interleaved, each the median of {s['steps']} steps after {s['warmup']} "
             "warm-up; the table gives the median over repeats, as ms / page faults.", "",
             "| model | setting | " + " | ".join(PHASES) + " |", "|---|---|" + "---|" * len(PHASES)]
    for row in report["results"]:
        cells = []
        for phase in PHASES:
            value = row["phases"].get(phase)
            cells.append("—" if value is None else f"{value['ms']:.1f} / {value['faults']:,.0f}")
        lines.append(f"| {row['model']} | {row['setting']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def combine(model: str, setting: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    phases = {phase: {key: statistics.median(r["phases"][phase][key] for r in runs) for key in ("ms", "faults")}
              for phase in runs[0]["phases"]}
    return {"model": model, "setting": setting, "phases": phases, "repeats": [r["phases"] for r in runs]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn", "transformer", "resnet"])
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat of 2 steps, prints only")
    parser.add_argument("--worker", nargs=3, metavar=("MODEL", "SETTING", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_one(*args.worker, args.warmup, args.steps)))
        return
    size = "smoke" if args.smoke else "full"
    if args.smoke:
        args.steps, args.warmup, args.repeats = 2, 1, 1
    started = time.perf_counter()
    pairs = [(m, s) for m in args.models for s in args.settings]
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {pair: [] for pair in pairs}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for repeat in range(args.repeats):
        shift = repeat % len(pairs)
        for model, setting in pairs[shift:] + pairs[:shift]:
            command = [sys.executable, __file__, "--worker", model, setting, size, "--steps", str(args.steps),
                       "--warmup", str(args.warmup)]
            done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
            runs[(model, setting)].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"[{repeat + 1}/{args.repeats}] {model} {setting}: {runs[(model, setting)][-1]['phases']['step']}",
                  file=sys.stderr, flush=True)
    import torch

    compare_opacus = SimpleNamespace(**runpy.run_path(str(HERE / "compare_opacus.py")))
    settings = {
        "command": compare_opacus.command_line(sys.argv, dict(os.environ)), "argv": sys.argv[1:],
        "git": compare_opacus._git_revision(), "cpu": compare_opacus._cpu_model(), "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "batch": compare_opacus.SIZES[size]["batch"], "steps": args.steps, "warmup": args.warmup,
        "repeats": args.repeats, "duration_s": round(time.perf_counter() - started, 1),
    }
    report = {"settings": settings, "results": [combine(m, s, runs[(m, s)]) for m, s in pairs]}
    text = markdown(report)
    print(text)
    if not args.smoke:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "page_faults.json").write_text(json.dumps(report, indent=1) + "\n")
        (args.out / "page_faults.md").write_text(text)


if __name__ == "__main__":
    main()
