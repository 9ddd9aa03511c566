"""Where one DP-SGD training step's time goes: per-phase timing of dpclip and of non-private PyTorch (issue 16).

The models, sizes and synthetic data are those of ``benchmarks/compare_opacus.py`` (its ``build``), batch 256 at
``--size full``, SGD (lr 0.05), CrossEntropyLoss, σ = 1, C = 1. One step is split into phases, timed with
``time.perf_counter`` around each call of an ordinary training loop:

- ``load``: ``next(loader)`` — Poisson sampling (dpclip; the engine's step guard and budget check run here too)
  and fetching/collating the batch;
- ``forward``: ``model(x)`` and the loss (dpclip: with the layerwise tape's forward hooks recording each layer);
- ``backward (autograd)``: ``loss.backward()`` less the part below;
- ``norms + clipped sum`` (dpclip): what the tape computes when backward ends (``LayerwiseTape.finish``: each
  layer's per-example norms and the clipping factors; Σ_i c_i g_i too for a micro-batch other than the step's
  last), timed by wrapping that method;
- ``noise`` (dpclip): ``dpclip.aggregation.noisy_release`` (the Gaussian draw, and the step's last batch's
  Σ_i c_i g_i formed inside it: ``ClippedSum.release_in_noise``);
- ``optimizer``: the rest of ``optimizer.step()`` (dpclip: setting .grad, the SGD update, the accountant's step);
- ``other``: ``optimizer.zero_grad()`` and the Python between the timers.

``floor`` (the MLP only): the least work any exact DP-SGD step of that model needs, written by hand in plain
PyTorch (:class:`FloorStep`) — Poisson sampling, the forward, the backward to the layers' outputs only, each
example's norm from ‖g_i a_iᵀ‖ = ‖g_i‖‖a_i‖ (one position per example), and the clipped sum multiplied straight
into the noise buffer (one ``addmm_`` per weight), then SGD. No engine, no checks, no rounding slack: the measured
bar for the MLP on the machine at hand, where the non-private step leaves out the noise and the clipping
altogether. Its phases are timed like dpclip's (the noise draw apart from the clipped sum it is fused with).

The wrappers are installed by this script only (monkeypatching, nothing in dpclip changes); the JSON also keeps
the time of ``LayerwiseGradients.norms``, of the clipped sums (``.weighted_sum`` and ``.add_weighted_sum``,
wherever they ran) and of the forward hooks. One thread (``torch.set_num_threads``), every (model, library) pair run ``--repeats`` times interleaved
(each repeat runs every pair once, starting one pair further along) in this process; each repeat reports the median
of ``--steps`` timed steps (after ``--warmup``; dpclip's first step carries its path verification) per phase, and
the tables give the median over repeats. Then a ``torch.profiler`` run of ``--profile-steps`` dpclip steps per
model gives its top-10 operators by self CPU time.

    OMP_NUM_THREADS=1 python benchmarks/profile_step.py                 # full sizes: JSON + markdown (~4 min)
    OMP_NUM_THREADS=1 PYTHONPATH=/tmp/before python benchmarks/profile_step.py --out benchmarks/results/profile_step_be0be9c.json
    python benchmarks/profile_step.py --compare BEFORE.json AFTER.json    # the before/after table (markdown)
    python benchmarks/profile_step.py --smoke                            # tiny sizes, prints only (the tests)

``PYTHONPATH`` (an environment variable of that run) times another checkout's dpclip, e.g. a ``git worktree`` of
an older revision; the results record ``dpclip.__file__`` and that checkout's git revision.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import hashlib
import json
import os
import platform
import runpy
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

Tensor = torch.Tensor

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
compare_opacus = SimpleNamespace(**runpy.run_path(str(HERE / "compare_opacus.py")))  # a script, not a package: defines only

MODELS = ["mlp", "cnn", "transformer", "resnet"]
LIBRARIES = ["nonprivate", "dpclip", "floor"]
FLOOR_MODELS = {"mlp"}  #: the models FloorStep is written for
SIGMA, CLIP, LR = 1.0, 1.0, 0.05
#: (key, title) of the phases, in step order; their sum is the step's total
PHASES = [
    ("load", "load"),
    ("forward", "forward"),
    ("backward_autograd", "backward (autograd)"),
    ("norms_clipped_sum", "norms + clipped sum"),
    ("noise", "noise"),
    ("optimizer", "optimizer"),
    ("other", "other"),
]
PRIVATE_ONLY = {"norms_clipped_sum", "noise"}
#: parts of the phases above, timed by wrappers too (dpclip's layerwise path)
DETAILS = [
    ("tape_hooks", "forward: the tape's forward hooks"),
    ("norms", "norms + clipped sum: LayerwiseGradients.norms"),
    ("weighted_sum", "the clipped sums: LayerwiseGradients.weighted_sum / .add_weighted_sum (inside noise)"),
]
ENV_RECORDED = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS", "PYTHONPATH")

# -- timers inside dpclip (installed by install_timers; this script only) ----------------------------------------
SPLIT: dict[str, float] = defaultdict(float)  # seconds spent in each wrapped function since the last clear


def _timed(key: str, original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            SPLIT[key] += time.perf_counter() - start

    timed.__profile_step_timer__ = True  # type: ignore[attr-defined]
    return timed


def install_timers() -> None:
    """Wrap the tape's end-of-backward work, its forward hooks, the norms, the weighted sum and the noisy release
    with timers. Looked up at call time by dpclip (``self.finish``, ``self._record``, the engine module's
    ``noisy_release``), so wrapping the class attributes and the engine's global is enough."""
    import dpclip.engine
    from dpclip.grads import tape

    targets = [
        (tape.LayerwiseTape, "finish", "tape"),
        (tape.LayerwiseTape, "_record", "tape_hooks"),
        (tape.LayerwiseGradients, "norms", "norms"),
        (tape.LayerwiseGradients, "weighted_sum", "weighted_sum"),
        (tape.LayerwiseGradients, "add_weighted_sum", "weighted_sum"),
        (dpclip.engine, "noisy_release", "noise"),
    ]
    for owner, name, key in targets:
        original = getattr(owner, name)
        if not getattr(original, "__profile_step_timer__", False):
            setattr(owner, name, _timed(key, original))


# -- one run -------------------------------------------------------------------------------------------------------
def setup(model_name: str, library: str, size: str) -> tuple[nn.Module, Any, Any, Any]:
    """(model, optimizer, loader, engine or None) as compare_opacus.py builds them (same seed, data and sizes)."""
    torch.manual_seed(0)
    batch = compare_opacus.SIZES[size]["batch"]
    model, make_batch = compare_opacus.build(model_name, size)
    inputs, labels = make_batch(batch * 50, torch.Generator().manual_seed(0))
    loader = DataLoader(TensorDataset(inputs, labels), batch_size=batch)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    engine = None
    if library == "dpclip":
        import dpclip

        engine = dpclip.PrivacyEngine(seed=0)
        model, optimizer, loader = engine.make_private(model, optimizer, loader, noise_multiplier=SIGMA, max_grad_norm=CLIP)
    return model, optimizer, loader, engine


def timed_steps(model: nn.Module, optimizer: Any, loader: Any, count: int) -> list[dict[str, float]]:
    """``count`` training steps, each as {phase: seconds} (and the details and the batch size)."""
    criterion = nn.CrossEntropyLoss()
    batches = iter(loader)
    steps = []
    clock = time.perf_counter
    for _ in range(count):
        SPLIT.clear()
        t0 = clock()
        try:
            x, y = next(batches)
        except StopIteration:  # (not reached at the default sizes: 50 steps per epoch)
            batches = iter(loader)
            x, y = next(batches)
        t1 = clock()
        optimizer.zero_grad()
        t2 = clock()
        loss = criterion(model(x), y)
        t3 = clock()
        before = dict(SPLIT)
        loss.backward()
        t4 = clock()
        tape_in_backward = SPLIT["tape"] - before.get("tape", 0.0)
        mid = dict(SPLIT)
        optimizer.step()
        t5 = clock()
        tape_in_step = SPLIT["tape"] - mid.get("tape", 0.0)  # the tape's finish() once more: a no-op after backward
        noise = SPLIT["noise"] - mid.get("noise", 0.0)
        steps.append({
            "load": t1 - t0,
            "forward": t3 - t2,
            "backward_autograd": (t4 - t3) - tape_in_backward,
            "norms_clipped_sum": tape_in_backward + tape_in_step,
            "noise": noise,
            "optimizer": (t5 - t4) - noise - tape_in_step,
            "other": t2 - t1,  # zero_grad (the timers' own calls are inside the phases above)
            "total": t5 - t0,
            "tape_hooks": SPLIT["tape_hooks"],
            "norms": SPLIT["norms"],
            "weighted_sum": SPLIT["weighted_sum"],
            "batch": float(len(x)),
        })
    return steps


class FloorStep:
    """A hand-written exact DP-SGD step for an ``nn.Sequential`` of ``nn.Linear`` layers and elementwise
    activations, doing only the work the algorithm needs (Abadi et al. 2016, Alg. 1, with Poisson sampling):
    per-example gradients of a linear layer with one position per example are rank one, g_i a_iᵀ (and g_i for the
    bias), so ‖∇_i‖² = Σ_layers ‖g_i‖²(‖a_i‖² + 1) (Goodfellow 2015) costs O(B·width), and
    Σ_i c_i g_i a_iᵀ is one matrix product, as in the non-private weight gradient, here accumulated into the
    Gaussian noise drawn first. The release is divided by the expected batch B, as dpclip's is, without a pass of
    its own: the noise is drawn with std σC/B and the products are scaled by 1/B."""

    def __init__(self, model: nn.Sequential, inputs: Tensor, labels: Tensor, batch: int, sigma: float, clip: float,
                 lr: float, seed: int = 0) -> None:
        if not all(isinstance(m, nn.Linear) or not any(True for _ in m.parameters()) for m in model):
            raise ValueError("FloorStep handles nn.Sequential stacks of nn.Linear and parameter-free layers only")
        self.model, self.inputs, self.labels = model, inputs, labels
        self.sample_rate, self.batch = batch / len(inputs), batch
        self.sigma, self.clip = sigma, clip
        self.optimizer = torch.optim.SGD(model.parameters(), lr=lr)
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self) -> tuple[Tensor, Tensor]:
        """A Poisson batch: each example independently with probability q (dpclip's sampler function, no loader)."""
        from dpclip.sampling import bernoulli_indices

        chosen = bernoulli_indices(len(self.inputs), self.sample_rate, self.generator)
        return self.inputs[chosen], self.labels[chosen]

    def gradients(self, x: Tensor, y: Tensor, clock: Callable[[], float] = time.perf_counter) -> tuple[dict[str, Tensor], dict[str, float]]:
        """The noisy clipped mean gradient of the batch ({parameter name: tensor}) and the seconds per phase."""
        t0 = clock()
        inputs, outputs, layers, h = [], [], [], x
        for module in self.model:
            if isinstance(module, nn.Linear):
                inputs.append(h)
                h = F.linear(h, module.weight.detach(), module.bias.detach() if module.bias is not None else None)
                if not h.requires_grad:
                    h.requires_grad_()
                outputs.append(h)
                layers.append(module)
            else:
                h = module(h)
        loss = F.cross_entropy(h, y, reduction="sum")  # each example's own loss: its gradient is its own
        t1 = clock()
        grads = torch.autograd.grad(loss, outputs)
        t2 = clock()
        inputs = [a.detach() for a in inputs]
        squares = sum(g.square().sum(dim=1) * (a.square().sum(dim=1) + (m.bias is not None))
                      for g, a, m in zip(grads, inputs, layers))
        factors = (self.clip / squares.sqrt()).clamp(max=1.0)
        t3 = clock()
        scale = 1.0 / self.batch  # the release's factor, taken into the noise's std and the products' alpha
        names = {id(p): n for n, p in self.model.named_parameters()}
        noise = {}
        for module in layers:
            for p in (module.weight, module.bias):
                if p is not None:
                    noise[names[id(p)]] = torch.empty_like(p).normal_(0.0, self.sigma * self.clip * scale,
                                                                      generator=self.generator)
        t4 = clock()
        for module, a, g in zip(layers, inputs, grads):
            clipped = g * factors[:, None]
            noise[names[id(module.weight)]].addmm_(clipped.t(), a, alpha=scale)
            if module.bias is not None:
                noise[names[id(module.bias)]].add_(clipped.sum(dim=0), alpha=scale)
        t5 = clock()
        return noise, {"forward": t1 - t0, "backward_autograd": t2 - t1, "norms": t3 - t2, "noise": t4 - t3,
                       "weighted_sum": t5 - t4}

    def step(self, x: Tensor, y: Tensor, clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
        """One training step on the batch: the noisy gradient, then SGD; the seconds per phase."""
        released, phases = self.gradients(x, y, clock)
        t0 = clock()
        for name, p in self.model.named_parameters():
            p.grad = released[name]
        self.optimizer.step()
        phases["optimizer"] = clock() - t0
        return phases


def floor_steps(model_name: str, size: str, count: int) -> list[dict[str, float]]:
    """``count`` FloorStep steps of ``model_name`` on compare_opacus.py's model and data, as {phase: seconds}."""
    torch.manual_seed(0)
    batch = compare_opacus.SIZES[size]["batch"]
    model, make_batch = compare_opacus.build(model_name, size)
    inputs, labels = make_batch(batch * 50, torch.Generator().manual_seed(0))
    floor = FloorStep(model, inputs, labels, batch, SIGMA, CLIP, LR)
    clock = time.perf_counter
    steps = []
    for _ in range(count):
        t0 = clock()
        x, y = floor.sample()
        t1 = clock()
        floor.optimizer.zero_grad()
        t2 = clock()
        phases = floor.step(x, y, clock)
        t3 = clock()
        steps.append({
            "load": t1 - t0, "forward": phases["forward"], "backward_autograd": phases["backward_autograd"],
            "norms_clipped_sum": phases["norms"] + phases["weighted_sum"], "noise": phases["noise"],
            "optimizer": phases["optimizer"], "other": t2 - t1, "total": t3 - t0, "tape_hooks": 0.0,
            "norms": phases["norms"], "weighted_sum": phases["weighted_sum"], "batch": float(len(x)),
        })
    return steps


def run_one(model_name: str, library: str, size: str, warmup: int, steps: int) -> dict[str, Any]:
    """One (model, library) run: ``warmup`` untimed steps, then ``steps`` timed ones; medians per phase, in ms."""
    start = time.perf_counter()
    if library == "floor":
        model = optimizer = loader = engine = None
        first = floor_steps(model_name, size, warmup + steps)
    else:
        model, optimizer, loader, engine = setup(model_name, library, size)
        first = timed_steps(model, optimizer, loader, warmup + steps)
    measured = first[warmup:]
    keys = [k for k, _ in PHASES] + ["total"] + [k for k, _ in DETAILS]
    result = {
        "phases_ms": {k: statistics.median(s[k] for s in measured) * 1e3 for k in keys},
        "step_ms": {k: [round(s[k] * 1e3, 3) for s in measured] for k in keys},
        "first_step_ms": first[0]["total"] * 1e3,
        "batch_sizes": [int(s["batch"]) for s in measured],
        "wall_s": time.perf_counter() - start,
        "path": None if engine is None else engine.grad_sample_path,  # type: ignore[attr-defined]
    }
    del model, optimizer, loader, engine
    gc.collect()
    return result


def combine(model_name: str, library: str, size: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from a pair's repeats: per phase, the median over repeats of each repeat's median."""
    keys = list(runs[0]["phases_ms"])
    phases = {k: statistics.median(r["phases_ms"][k] for r in runs) for k in keys}
    return {
        "model": model_name,
        "library": library,
        "description": compare_opacus.describe(model_name, size),
        "path": runs[0]["path"],
        "phases_ms": {k: phases[k] for k in [k for k, _ in PHASES] + ["total"]},
        "detail_ms": {k: phases[k] for k, _ in DETAILS},
        "first_step_ms": statistics.median(r["first_step_ms"] for r in runs),
        "repeats": runs,
    }


# -- torch.profiler ----------------------------------------------------------------------------------------------
def profile_model(model_name: str, size: str, warmup: int, steps: int, rows: int = 10) -> dict[str, Any]:
    """dpclip's top operators by self CPU time over ``steps`` profiled steps (after ``warmup``), per step."""
    from torch.profiler import ProfilerActivity, profile

    model, optimizer, loader, _ = setup(model_name, "dpclip", size)
    criterion = nn.CrossEntropyLoss()
    batches = iter(loader)

    def step() -> None:
        x, y = next(batches)
        optimizer.zero_grad()
        criterion(model(x), y).backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    events = prof.key_averages()
    total_us = sum(e.self_cpu_time_total for e in events)
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:rows]
    del model, optimizer, loader
    gc.collect()
    return {
        "model": model_name,
        "library": "dpclip",
        "steps": steps,
        "self_cpu_ms_per_step": total_us / steps / 1e3,
        "top": [
            {"op": e.key, "self_cpu_ms": e.self_cpu_time_total / steps / 1e3,
             "share": e.self_cpu_time_total / total_us if total_us else 0.0, "calls": e.count / steps,
             "cpu_total_ms": e.cpu_time_total / steps / 1e3}
            for e in top
        ],
    }


# -- how and where ---------------------------------------------------------------------------------------------------
def command_line(argv: list[str], environ: dict[str, str]) -> str:
    """The command that made a results file (compare_opacus.py's, with this script's environment variables)."""
    return compare_opacus.command_line(argv, environ, ENV_RECORDED)


def _git(folder: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def dpclip_source() -> dict[str, Any]:
    """Which dpclip was timed: its file, its checkout's git revision, and a digest of its uncommitted changes."""
    import dpclip

    package = Path(dpclip.__file__).resolve().parent
    head = _git(package, "rev-parse", "--short", "HEAD")
    diff = _git(package, "diff", "HEAD", "--", ".")
    revision = None if head is None else head.strip() + ("+uncommitted changes" if diff else "")
    return {
        "dpclip_file": str(Path(dpclip.__file__).resolve()),
        "dpclip_git": revision,
        "dpclip_diff_sha1": hashlib.sha1(diff.encode()).hexdigest()[:12] if diff else None,
    }


def settings_of(args: argparse.Namespace, size: str, threads: int) -> dict[str, Any]:
    source = dpclip_source()
    return {
        "label": args.label or source["dpclip_git"],
        "command": command_line(sys.argv, dict(os.environ)),
        "argv": sys.argv[1:],
        **source,
        "size": size,
        "batch": compare_opacus.SIZES[size]["batch"],
        "models": args.models,
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "profile_steps": args.profile_steps,
        "threads": threads,
        "retain_memory": args.retain_memory,
        "env": {name: os.environ.get(name) for name in ENV_RECORDED},
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": compare_opacus._cpu_model(),
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


# -- markdown ------------------------------------------------------------------------------------------------------
def _ms(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.2f}" if value < 10 else (f"{value:.1f}" if value < 100 else f"{value:.0f}")


def _phase_cells(row: dict[str, Any]) -> list[str]:
    private = row["library"] != "nonprivate"
    return [_ms(row["phases_ms"][k]) if private or k not in PRIVATE_ONLY else "—" for k, _ in PHASES]


def phase_table(results: list[dict[str, Any]]) -> str:
    base = {r["model"]: r["phases_ms"]["total"] for r in results if r["library"] == "nonprivate"}
    lines = ["| model | library | " + " | ".join(t for _, t in PHASES) + " | total | × non-private |",
             "|---|---|" + "---|" * (len(PHASES) + 2)]
    for r in results:
        ratio = r["phases_ms"]["total"] / base[r["model"]] if r["model"] in base else None
        lines.append(f"| {r['model']} | {r['library']} | " + " | ".join(_phase_cells(r)) +
                     f" | {_ms(r['phases_ms']['total'])} | {'—' if ratio is None else f'{ratio:.2f}×'} |")
    return "\n".join(lines)


def overhead_table(results: list[dict[str, Any]]) -> str:
    """dpclip − non-private per phase (ms): where the DP step's extra time goes."""
    by = {(r["model"], r["library"]): r for r in results}
    lines = ["| model | " + " | ".join(t for _, t in PHASES) + " | total | of which norms / weighted sum / forward hooks |",
             "|---|" + "---|" * (len(PHASES) + 2)]
    for model in dict.fromkeys(r["model"] for r in results):
        if (model, "dpclip") not in by or (model, "nonprivate") not in by:
            continue
        dp, np_ = by[(model, "dpclip")]["phases_ms"], by[(model, "nonprivate")]["phases_ms"]
        d = by[(model, "dpclip")]["detail_ms"]
        cells = [f"{dp[k] - np_[k]:+.1f}" for k, _ in PHASES] + [f"{dp['total'] - np_['total']:+.1f}"]
        lines.append(f"| {model} | " + " | ".join(cells) +
                     f" | {_ms(d['norms'])} / {_ms(d['weighted_sum'])} / {_ms(d['tape_hooks'])} |")
    return "\n".join(lines)


def profile_tables(profiles: list[dict[str, Any]]) -> str:
    parts = []
    for p in profiles:
        parts.append(f"**{p['model']}** (dpclip; {p['self_cpu_ms_per_step']:.1f} ms self CPU per step over "
                     f"{p['steps']} profiled steps, profiler overhead included)\n")
        parts.append("| operator | self CPU ms/step | share | calls/step | CPU total ms/step |\n|---|---|---|---|---|")
        for e in p["top"]:
            parts.append(f"| `{e['op']}` | {_ms(e['self_cpu_ms'])} | {100 * e['share']:.1f}% | {e['calls']:.4g} | "
                         f"{_ms(e['cpu_total_ms'])} |")
        parts.append("")
    return "\n".join(parts)


def made_by(s: dict[str, Any]) -> str:
    minutes = f", {s['duration_s'] / 60:.1f} min" if s.get("duration_s") else ""
    load = ""
    if s.get("loadavg_start") and s.get("loadavg_end"):
        load = f"; 1-min load average {s['loadavg_start'][0]:.2f} at the start, {s['loadavg_end'][0]:.2f} at the end"
    return (f"Made by `{s['command']}` ({s['date']}{minutes}), label `{s['label']}`, dpclip from `{s['dpclip_file']}` "
            f"(git {s['dpclip_git']}{', diff ' + s['dpclip_diff_sha1'] if s.get('dpclip_diff_sha1') else ''}), on "
            f"{s['cpu']}, {s['cpus']} CPUs, {s['threads']} thread, torch {s['torch']}{load}. "
            + ("The process first called `dpclip.retain_freed_memory()` (glibc keeps the memory a step frees for the "
               "next one; every library alike). " if s.get("retain_memory") else "") + f"Batch {s['batch']} "
            f"(dpclip: Poisson-sampled, expected size), {s['repeats']} repeats interleaved, each the median of "
            f"{s['steps']} timed steps after {s['warmup']} warm-up; figures are medians over repeats, in ms (the "
            "total is the median of the step totals, so the phases need not add up to it exactly).")


def floor_lines(results: list[dict[str, Any]]) -> list[str]:
    """Per model with a ``floor`` row: how far dpclip's step is from it, and it from the non-private step."""
    totals = {(r["model"], r["library"]): r["phases_ms"]["total"] for r in results}
    lines = []
    for model in dict.fromkeys(r["model"] for r in results):
        floor, dp, base = (totals.get((model, lib)) for lib in ("floor", "dpclip", "nonprivate"))
        if floor is None or dp is None or base is None:
            continue
        lines.append(f"- {model}: the floor (the least work an exact DP-SGD step of it needs, `FloorStep`) takes "
                     f"{floor / base:.2f}× the non-private step; dpclip's step takes {dp / floor:.2f}× the floor's "
                     f"({dp - floor:+.1f} ms).")
    return lines


def markdown(report: dict[str, Any]) -> str:
    s, results = report["settings"], report["results"]
    return "\n".join([
        f"# Where the DP step's time goes ({s['label']})", "",
        "Per phase, ms per step (median over repeats of each repeat's median):", "", phase_table(results), "",
        *floor_lines(results), "",
        "dpclip minus non-private, per phase (ms), and the parts timed inside dpclip's phases:", "",
        overhead_table(results), "", made_by(s), "",
        "## torch.profiler: top operators by self CPU time", "", profile_tables(report["profiles"]),
    ])


def before_after_table(before: dict[str, Any], after: dict[str, Any]) -> str:
    """Per model: phase ms of non-private and dpclip, before and after (two results files)."""
    tag = lambda r: r["settings"]["label"]  # noqa: E731
    lines = ["| model | run | " + " | ".join(t for _, t in PHASES) + " | total | × non-private |",
             "|---|---|" + "---|" * (len(PHASES) + 2)]
    rows = {(r["model"], r["library"], which): r for which, rep in (("before", before), ("after", after)) for r in rep["results"]}
    for model in dict.fromkeys(r["model"] for r in after["results"]):
        for library in LIBRARIES:
            for which, rep in (("before", before), ("after", after)):
                r = rows.get((model, library, which))
                if r is None:
                    continue
                base = rows.get((model, "nonprivate", which))
                ratio = f"{r['phases_ms']['total'] / base['phases_ms']['total']:.2f}×" if base else "—"
                name = {"nonprivate": "non-private"}.get(library, library)
                lines.append(f"| {model} | {name}, {tag(rep)} | " + " | ".join(_phase_cells(r)) +
                             f" | {_ms(r['phases_ms']['total'])} | {ratio} |")
    return "\n".join(lines)


# -- main ----------------------------------------------------------------------------------------------------------
def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=MODELS)
    parser.add_argument("--size", choices=["full", "small"], default="full")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run, after --warmup")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (dpclip's first step verifies its path)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each (model, library) pair, interleaved")
    parser.add_argument("--profile-steps", type=int, default=3, help="dpclip steps under torch.profiler per model (0: none)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: timings on shared cores stall less)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results",
                        help="a folder (writes profile_step.json and .md there) or a .json path (and the .md beside it)")
    parser.add_argument("--label", default=None, help="a name stored in the results (default: the timed dpclip's git revision)")
    parser.add_argument("--retain-memory", action="store_true",
                        help="call dpclip.retain_freed_memory() first (glibc keeps the memory a step frees for the next one)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 1 repeat of 2 steps; prints, writes nothing")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"),
                        help="print the before/after markdown table of two results files, and exit")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = make_parser().parse_args(argv)
    if args.compare:
        before, after = (json.loads(p.read_text()) for p in args.compare)
        print(before_after_table(before, after))
        return
    size = args.size
    if args.smoke:
        size, args.steps, args.warmup, args.repeats, args.profile_steps = "smoke", 2, 1, 1, 1
    torch.set_num_threads(args.threads)
    if args.retain_memory:
        import dpclip

        if not dpclip.retain_freed_memory():
            raise SystemExit("--retain-memory: this C library is not glibc (nothing to set)")
    install_timers()
    settings = settings_of(args, size, torch.get_num_threads())
    start = time.perf_counter()
    pairs = [(m, lib) for m in args.models for lib in LIBRARIES if lib != "floor" or m in FLOOR_MODELS]
    runs: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for repeat in range(args.repeats):
        shift = repeat % len(pairs)
        for model, library in pairs[shift:] + pairs[:shift]:
            run = run_one(model, library, size, args.warmup, args.steps)
            runs[(model, library)].append(run)
            print(f"repeat {repeat + 1}/{args.repeats} {model:11s} {library:10s} total {run['phases_ms']['total']:8.2f} ms",
                  file=sys.stderr, flush=True)
    results = [combine(m, lib, size, runs[(m, lib)]) for m, lib in pairs]
    profiles = [profile_model(m, size, args.warmup, args.profile_steps) for m in args.models] if args.profile_steps > 0 else []
    settings["duration_s"] = time.perf_counter() - start
    settings["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    report = {"settings": settings, "phases": dict(PHASES), "details": dict(DETAILS), "results": results, "profiles": profiles}
    text = markdown(report)
    if args.smoke:
        print(text)
        print(json.dumps(report))  # the last line: the results as JSON (the tests read it)
        return
    json_path = args.out if args.out.suffix == ".json" else args.out / "profile_step.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    json_path.with_suffix(".md").write_text(text)
    print(text)
    print(f"wrote {json_path} and {json_path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
