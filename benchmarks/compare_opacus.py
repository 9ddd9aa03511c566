"""dpclip vs Opacus vs non-private PyTorch: step time, memory and ε, side by side in one run.

Every (model, library) pair runs in a fresh subprocess (so peak RSS is its own), with the same model, data,
seed, expected batch size, (q, σ, C) and number of steps. Libraries: non-private PyTorch; dpclip (default
"auto" mode: the layerwise fast path where every layer has one), dpclip-lowmem (the same with ``memory="low"``: no
per-example gradients kept between the norms and the clipped sum), dpclip's general vmap path; Opacus
grad_sample_mode "hooks", "functorch" and "ghost". Opacus refuses nn.MultiheadAttention, so for the
transformer it runs on ModuleValidator.fix(model) (DPMultiheadAttention); dpclip runs the stock model.

Two suites of models: the default one (mlp, cnn, transformer, resnet: compare_opacus_<size>_<device>.json) and
``--suite scale`` (a 6-layer d = 256 transformer on sequences of 128, and an embedding-heavy model with a
30,000-word vocabulary: compare_opacus_scale_<device>.json at full size), which takes hours on one CPU thread.

Timing is made robust to the stalls of shared machines: one thread by default (several OpenMP threads on shared
virtual cores stall for ~200 ms now and then while they spin-wait), every pair runs ``--repeats`` times,
interleaved (each repeat runs every pair once, in a rotated order), and the reported step time is the lowest of
the repeats' median step times; each repeat's figures (and every step time) are kept in the JSON, with the
command line, threads, OpenMP settings, versions, CPU and date of the run.

    OMP_NUM_THREADS=1 python benchmarks/compare_opacus.py   # full sizes, CPU: JSON + markdown + plot (~20 min)
    python benchmarks/compare_opacus.py --size small     # a quick look
    python benchmarks/compare_opacus.py --device cuda    # on a GPU
    python benchmarks/compare_opacus.py --smoke          # tiny, checks that everything runs (used by the tests)
    OMP_NUM_THREADS=1 python benchmarks/compare_opacus.py --suite scale   # the larger models (hours on CPU)
    python benchmarks/compare_opacus.py --suite scale --smoke             # the same, tiny
    python benchmarks/render_tables.py                   # then: README's tables from the results files
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import json
import os
import platform
import resource
import runpy
import shlex
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn as nn

#: ``nonprivate-opacus-model``: non-private training of the model Opacus trains (``ModuleValidator.fix``: its
#: ``DPMultiheadAttention`` in the transformers), the baseline Opacus's figures are really measured against.
LIBRARIES = ["nonprivate", "nonprivate-opacus-model", "dpclip", "dpclip-lowmem", "dpclip-vmap", "opacus-hooks",
             "opacus-functorch", "opacus-ghost"]
MODELS = ["mlp", "cnn", "transformer", "resnet"]  # the default suite (the committed compare_opacus_full_cpu.json)
SCALE_MODELS = ["transformer-large", "embedding"]  # --suite scale: not in the default run (hours on CPU)
SUITES = {"default": MODELS, "scale": SCALE_MODELS}
SUITE_TIMEOUTS = {"default": 900, "scale": 7200}  # seconds per run: a full-size transformer-large step takes ~1 min
ALL_MODELS = MODELS + SCALE_MODELS
SIGMA, CLIP, DELTA = 1.0, 1.0, 1e-5

# (batch, {model: size parameters}) per --size. transformer and transformer-large: (vocab, width, layers, sequence);
# embedding: (vocab, width, sequence).
SIZES = {
    "full": {"batch": 256, "mlp": 512, "cnn": 28, "transformer": (5000, 128, 2, 64), "resnet": (32, 16),
             "transformer-large": (5000, 256, 6, 128), "embedding": (30000, 128, 64)},
    "small": {"batch": 64, "mlp": 256, "cnn": 28, "transformer": (2000, 64, 2, 32), "resnet": (32, 8),
              "transformer-large": (5000, 128, 6, 64), "embedding": (30000, 64, 32)},
    "smoke": {"batch": 8, "mlp": 32, "cnn": 28, "transformer": (100, 16, 1, 8), "resnet": (16, 4),
              "transformer-large": (100, 16, 2, 8), "embedding": (1000, 16, 8)},
}
# transformer-large: a BERT-mini-like layer (d = 256: 4 heads of 64, feed-forward 4·d), where transformer keeps
# its 4 heads and feed-forward 2·d
LARGE_HEADS, LARGE_FF = 4, 4
ROOT = Path(__file__).resolve().parents[1]
# environment variables that change CPU timings: recorded with the results (and in the command line when set);
# glibc's MALLOC_* decide whether freed memory goes back to the OS, i.e. whether the next step page-faults it in
THREAD_ENV = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS", "BENCH_THREADS",
              "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def describe(model: str, size: str) -> str:
    """A short description of ``model`` at ``size`` (for the tables)."""
    cfg = SIZES[size]
    if model == "mlp":
        return f"MLP 784-{cfg['mlp']}-{cfg['mlp']}-10"
    if model == "cnn":
        return "DP CNN (conv 16 k8 s2, conv 32 k4 s2, 2 linear) on 1×28×28"
    if model == "transformer":
        vocab, width, layers, seq = cfg["transformer"]
        return f"transformer: embedding {vocab}×{width}, {layers} stock nn.TransformerEncoderLayer, sequence {seq}"
    if model == "transformer-large":
        vocab, width, layers, seq = cfg["transformer-large"]
        return (f"transformer: embedding {vocab}×{width}, {layers} stock nn.TransformerEncoderLayer ({LARGE_HEADS} heads, "
                f"feed-forward {LARGE_FF * width}), sequence {seq}")
    if model == "embedding":
        vocab, width, seq = cfg["embedding"]
        return f"embedding {vocab}×{width}, mean over sequence {seq}, linear head"
    side, width = cfg["resnet"]
    return f"GroupNorm ResNet (width {width}, 2 residual blocks) on 3×{side}×{side}"


def resolve_threads(threads: int | None, environ: dict[str, str]) -> int:
    """Threads per run: --threads, else $BENCH_THREADS, else $OMP_NUM_THREADS, else 1."""
    if threads is not None:
        return threads
    for name in ("BENCH_THREADS", "OMP_NUM_THREADS"):
        if environ.get(name, "").strip():
            return int(environ[name])
    return 1


def command_line(argv: list[str], environ: dict[str, str], recorded: tuple[str, ...] = THREAD_ENV) -> str:
    """The command that made a results file, as one would type it in the repository root (with the ``recorded``
    environment variables that were set)."""
    script = Path(argv[0]).resolve()
    try:
        script_text = str(script.relative_to(ROOT))
    except ValueError:
        script_text = argv[0]
    assignments = [f"{name}={shlex.quote(environ[name])}" for name in recorded if name in environ]
    return " ".join([*assignments, "python", script_text, *map(shlex.quote, argv[1:])])


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_revision() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=30)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                               text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+uncommitted changes" if dirty.stdout.strip() else "")


def environment(threads: int, worker_env: dict[str, str]) -> dict[str, Any]:
    """What a results file records about how and where it was made."""
    try:
        import opacus

        opacus_version = opacus.__version__
    except ImportError:
        opacus_version = None
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "command": command_line(sys.argv, dict(os.environ)),
        "argv": sys.argv[1:],
        "threads": threads,
        "thread_env": {name: worker_env.get(name) for name in THREAD_ENV},  # as the runs saw it (None: unset)
        "torch": torch.__version__,
        "opacus": opacus_version,
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpus": affinity,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git": _git_revision(),
    }



class TextClassifier(nn.Module):
    """Embedding + stock nn.TransformerEncoder (nn.MultiheadAttention inside) + linear head."""

    def __init__(self, vocab: int, width: int, layers: int, heads: int = 4, feedforward: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        layer = nn.TransformerEncoderLayer(width, heads, feedforward * width, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)).mean(dim=1))


class MeanEmbedding(nn.Module):
    """Embedding-heavy bag of words: an embedding table, the mean over the sequence, a linear head."""

    def __init__(self, vocab: int, width: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.head = nn.Linear(width, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(tokens).mean(dim=1))


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
    if model == "transformer-large":
        vocab, width, layers, seq = cfg["transformer-large"]
        net = TextClassifier(vocab, width, layers, LARGE_HEADS, LARGE_FF)
        return net, lambda n, g: (torch.randint(0, vocab, (n, seq), generator=g), torch.randint(0, 2, (n,), generator=g))
    if model == "embedding":
        vocab, width, seq = cfg["embedding"]
        return MeanEmbedding(vocab, width), lambda n, g: (torch.randint(0, vocab, (n, seq), generator=g), torch.randint(0, 2, (n,), generator=g))
    if model == "resnet":
        side, width = cfg["resnet"]

        net = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.GroupNorm(4, width), nn.ReLU(),
            ResidualBlock(width), nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.GroupNorm(4, 2 * width), nn.ReLU(),
            ResidualBlock(2 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 10),
        )
        return net, lambda n, g: (torch.randn(n, 3, side, side, generator=g), torch.randint(0, 10, (n,), generator=g))
    raise ValueError(model)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _heap_in_use() -> Any:
    """A function giving the bytes malloc has handed out and not taken back (glibc's mallinfo2: heap chunks in use
    plus mmapped blocks), or None where there is no glibc ≥ 2.33."""
    try:
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _MallInfo2

    def in_use() -> int:
        info = mallinfo2()
        return info.uordblks + info.hblkhd

    return in_use


class HeapPeak:
    """The most heap memory in use while the block runs, sampled every 0.5 ms by a thread (MB; None without glibc).

    Peak RSS also counts what the allocator keeps after a free and never returns to the system, so it depends on
    the order of allocations as much as on what a step needs; the heap in use does not. Sampling misses peaks
    shorter than 0.5 ms, and the thread costs time, so it only runs around untimed steps."""

    def __init__(self) -> None:
        self.in_use = _heap_in_use()
        self.start_mb: float | None = None
        self.peak_mb: float | None = None
        self._stop = threading.Event()

    def _sample(self) -> None:
        assert self.in_use is not None and self.start_mb is not None
        peak = max(self.in_use(), self.start_mb * 2**20)  # the block's start is part of it (memory freed before
        while not self._stop.wait(0.0005):               # the thread's first sample left peak < start once)
            peak = max(peak, self.in_use())
        self.peak_mb = max(peak, self.in_use()) / 2**20

    def __enter__(self) -> HeapPeak:
        if self.in_use is not None:
            self.start_mb = self.in_use() / 2**20
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.in_use is not None:
            self._stop.set()
            self._thread.join()


def opacus_model(model: nn.Module) -> tuple[nn.Module, str]:
    """The model as Opacus trains it (``ModuleValidator.fix`` where it refuses a layer), and the note saying so."""
    from opacus.validators import ModuleValidator

    if ModuleValidator.is_valid(model):
        return model, ""
    return ModuleValidator.fix(model), "ModuleValidator.fix"


def scaled_peak(step: dict[str, Any], expected: int) -> float:
    """A measured step's peak heap at the expected batch: what the step added to the heap in use at its start,
    scaled by expected / its batch (Poisson batches vary by ±√B; activations, gradients and per-example
    statistics grow with the batch), plus that start. Unscaled for a step of the expected size (non-private)."""
    return step["start_mb"] + (step["peak_mb"] - step["start_mb"]) * expected / step["batch"]


def run_one(model_name: str, library: str, size: str, device: str, steps: int, warmup: int, threads: int = 1,
            autocast: str = "off", retain_memory: bool = False) -> dict[str, Any]:
    """Time ``steps`` training steps (after ``warmup``) of one library on one model, in this process; ``autocast``
    "bf16" runs each forward and loss under torch.autocast(device, bfloat16) (float32 weights); ``retain_memory``
    first calls dpclip.retain_freed_memory() (glibc keeps freed memory for the next step), whatever the library."""
    from torch.utils.data import DataLoader, TensorDataset

    if retain_memory:
        from dpclip.allocator import retain_freed_memory

        if not retain_freed_memory():
            raise SystemExit("--retain-memory: this C library is not glibc (nothing to set)")

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    batch = SIZES[size]["batch"]
    model, make_batch = build(model_name, size)
    dataset_size = batch * 50
    inputs, labels = make_batch(dataset_size, torch.Generator().manual_seed(0))
    loader = DataLoader(TensorDataset(inputs, labels), batch_size=batch)
    criterion = nn.CrossEntropyLoss()
    epsilon = None
    note = ""
    if library.startswith("nonprivate"):
        if library == "nonprivate-opacus-model":
            model, note = opacus_model(model)
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
            memory="low" if library == "dpclip-lowmem" else "fast",
        )
    else:
        from opacus import PrivacyEngine

        mode = library.split("-")[1]
        model, note = opacus_model(model)
        model = model.to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        engine = PrivacyEngine(accountant="prv")  # Opacus's default and tightest, as PLD is dpclip's
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
    faults: list[int] = []  # page faults per step (the kernel's count: fresh pages the step took)
    heap: list[dict[str, Any]] = []  # the measured steps: batch size, heap in use at the start, peak
    seen = 0
    while len(times) < warmup + steps + 1:  # the first and the last step (untimed) run under HeapPeak
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            untimed = len(times) in (0, warmup + steps)
            with HeapPeak() if untimed and device == "cpu" else contextlib.nullcontext() as sampler:
                faulted = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                start = time.perf_counter()
                optimizer.zero_grad()
                with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast == "bf16"):
                    loss = criterion(model(x), y)
                loss.backward()
                optimizer.step()
                if device == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
                faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faulted)
            if sampler is not None and sampler.peak_mb is not None:
                heap.append({"batch": len(x), "start_mb": sampler.start_mb, "peak_mb": sampler.peak_mb})
            seen += len(x)
            if len(times) == warmup + steps + 1:
                break
    times.pop()  # the last step only measured the heap
    if not library.startswith("nonprivate"):
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
        "peak_heap_mb": max((scaled_peak(h, batch) for h in heap), default=None),  # None: no glibc, or on a GPU
        "heap_steps": heap,
        "epsilon": epsilon,
        "steps_timed": len(measured),
        "first_step_ms": times[0] * 1e3,  # dpclip: includes the first-step verification
        "note": note,
        "threads": torch.get_num_threads(),
        "page_faults_per_step": statistics.median(faults[warmup:warmup + len(measured)]),
        "step_ms": [round(t * 1e3, 3) for t in measured],
    }
    if device == "cuda":
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


ACCURACY_EPSILONS = (1.0, 3.0, 8.0)


def accuracy_run(library: str, epsilon: float, seed: int, epochs: int, threads: int = 1) -> dict[str, Any]:
    """Train the main job's digits CNN privately with ``library`` at the σ dpclip calibrates for ``epsilon``.

    Both libraries get the same initial weights, data split, (q, σ, C, steps), optimizer and learning rate; each
    samples its own Poisson batches and noise, so accuracies differ by training noise only. ε is what each
    library's own accountant reports for the run.
    """
    from torch.utils.data import DataLoader

    from accountants import noise_multiplier_for
    from dpclip_examples.digits import DigitsCNN, accuracy, load_data
    from dpclip_examples.train_digits import DEFAULTS

    torch.set_num_threads(threads)
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

        engine = PrivacyEngine(accountant="prv")  # Opacus's default and tightest, as PLD is dpclip's
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


def spawn(model: str, library: str, args: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
    command = [sys.executable, __file__, "--worker", model, library, "--size", args.size, "--device", args.device,
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads),
               "--autocast", args.autocast] + (["--retain-memory"] if args.retain_memory else [])
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"model": model, "library": library, "error": f"over --timeout {args.timeout} s"}
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or ["failed"])[-1][:300]
        return {"model": model, "library": library, "error": reason}
    return json.loads(done.stdout.strip().splitlines()[-1])


REPEAT_KEYS = ("ms_per_step", "first_step_ms", "peak_rss_mb", "peak_heap_mb", "heap_steps", "steps_timed", "threads", "step_ms",
               "page_faults_per_step", "started_s")


def combine(model: str, library: str, runs: list[dict[str, Any]], batch: int) -> dict[str, Any]:
    """One row from a pair's repeats: the lowest of the repeats' median step times (a stall or a busy neighbour
    only ever slows a repeat down); peak RSS and peak heap are the highest of the repeats', page faults per step
    their median; each repeat's figures are kept."""
    repeats = [{k: r[k] for k in REPEAT_KEYS if k in r} if "error" not in r else {"error": r["error"]} for r in runs]
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"model": model, "library": library, "error": runs[-1]["error"], "repeats": repeats}
    ms = min(r["ms_per_step"] for r in ok)
    return {
        "model": model,
        "library": library,
        "ms_per_step": ms,
        "examples_per_s": batch / (ms / 1e3),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in ok),
        "peak_heap_mb": max(r["peak_heap_mb"] for r in ok) if all(r.get("peak_heap_mb") for r in ok) else None,
        "epsilon": ok[0]["epsilon"],
        "steps_timed": ok[0]["steps_timed"],
        "first_step_ms": statistics.median(r["first_step_ms"] for r in ok),
        "page_faults_per_step": statistics.median(r["page_faults_per_step"] for r in ok),
        "note": ok[0]["note"],
        "repeats": repeats,
    }


def plot(results: list[dict[str, Any]], path: Path, settings: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if "error" not in r]
    if not ok:
        return
    models = sorted({r["model"] for r in ok}, key=ALL_MODELS.index)
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
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.text(0.01, 0.01, f"{settings['command']}  ·  {settings['threads']} thread(s), {settings['repeats']} repeats, "
             f"torch {settings['torch']}, {settings['cpu']} ({settings['cpus']} CPUs), {settings['date'][:10]}", fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


class _Parser(argparse.ArgumentParser):
    """--models and --timeout default to those of --suite."""

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        parsed = super().parse_args(args, namespace)
        if parsed.models is None:
            parsed.models = list(SUITES[parsed.suite])
        if parsed.timeout is None:
            parsed.timeout = SUITE_TIMEOUTS[parsed.suite]
        return parsed


def make_parser() -> argparse.ArgumentParser:
    parser = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(SIZES), default="full", help="smoke is what --smoke uses")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--suite", choices=list(SUITES), default="default",
                        help=f"the models run: default {' '.join(MODELS)}; scale {' '.join(SCALE_MODELS)} (hours on CPU), "
                        "written to compare_opacus_scale_<device>.json (compare_opacus_scale_<size>_<device>.json below full size)")
    parser.add_argument("--models", nargs="+", choices=ALL_MODELS, default=None, help="instead of the models of --suite")
    parser.add_argument("--libraries", nargs="+", choices=LIBRARIES, default=LIBRARIES)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run (after warm-up); a run reports their median")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (dpclip's first step verifies its path)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of each pair, interleaved; the table reports the lowest of their median step times")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch/OpenMP threads per run (default: $BENCH_THREADS, else $OMP_NUM_THREADS, else 1)")
    parser.add_argument("--timeout", type=int, default=None,
                        help=f"seconds allowed per run (default: {SUITE_TIMEOUTS['default']}; {SUITE_TIMEOUTS['scale']} with --suite scale)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="output folder")
    parser.add_argument("--autocast", choices=["off", "bf16"], default="off",
                        help="bf16: forward and loss under torch.autocast(device, bfloat16), float32 weights (results: *_bf16)")
    parser.add_argument("--retain-memory", action="store_true",
                        help="every run (every library) first calls dpclip.retain_freed_memory(): glibc keeps the memory a "
                        "step frees for the next one (results: *_retained)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 2 steps, one repeat, in this process: checks that everything runs")
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "LIBRARY"), help=argparse.SUPPRESS)
    parser.add_argument(
        "--accuracy", action="store_true",
        help="instead of timing: train the digits CNN of the main job (dpclip_examples.digits) with dpclip and Opacus at the same "
        "(q, sigma, C, steps) for each --epsilons, over --seeds seeds, and compare test accuracy and reported epsilon",
    )
    parser.add_argument("--epsilons", nargs="+", type=float, default=list(ACCURACY_EPSILONS))
    parser.add_argument("--seeds", type=int, default=3, help="seeds per (epsilon, library) in --accuracy")
    parser.add_argument("--epochs", type=int, default=None, help="epochs in --accuracy (default: the main job's)")
    return parser


def main() -> None:
    args = make_parser().parse_args()
    args.threads = resolve_threads(args.threads, dict(os.environ))
    # the runs' OpenMP pool is sized before torch starts: the workers get the thread count in their environment
    worker_env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    if args.smoke:
        args.size, args.steps, args.warmup, args.repeats = "smoke", 2, 1, 1
    if args.worker:
        print(json.dumps(run_one(*args.worker, args.size, args.device, args.steps, args.warmup, args.threads, args.autocast,
                                 args.retain_memory)))
        return
    render_tables = SimpleNamespace(**runpy.run_path(str(Path(__file__).resolve().parent / "render_tables.py")))

    started = time.perf_counter()
    in_process = args.accuracy or args.smoke  # else the runs are workers, with worker_env
    settings = environment(args.threads, dict(os.environ) if in_process else worker_env)
    if args.accuracy:
        from dpclip_examples.train_digits import DEFAULTS

        epochs = args.epochs or (1 if args.smoke else DEFAULTS["epochs"])
        seeds = 1 if args.smoke else args.seeds
        runs = [accuracy_run(lib, eps, seed, epochs, args.threads)
                for eps in args.epsilons for lib in ("dpclip", "opacus") for seed in range(seeds)]
        args.out.mkdir(parents=True, exist_ok=True)
        stem = "accuracy_digits_smoke" if args.smoke else "accuracy_digits"
        settings["duration_s"] = round(time.perf_counter() - started, 1)
        report = {"delta": DELTA, "epochs": epochs, "settings": settings, "runs": runs}
        (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
        markdown = render_tables.accuracy_markdown(report)
        (args.out / f"{stem}.md").write_text(markdown)
        print(markdown)
        return
    pairs = [(m, lib) for m in args.models for lib in args.libraries]
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {pair: [] for pair in pairs}
    for rep in range(args.repeats):
        # interleaved: every pair once per repeat, starting one further along each time, so that a noisy stretch
        # of the run falls on different pairs in different repeats
        shift = rep % len(pairs)
        for i, (m, lib) in enumerate(pairs[shift:] + pairs[:shift]):
            at = time.perf_counter() - started
            if args.smoke:  # in this process: checks that every library runs, not what it costs
                result = run_one(m, lib, args.size, args.device, args.steps, args.warmup, args.threads, args.autocast,
                                 args.retain_memory)
            else:
                result = spawn(m, lib, args, worker_env)
            result["started_s"] = round(at, 1)
            runs[(m, lib)].append(result)
            figure = result.get("error") or f"{result['ms_per_step']:.1f} ms/step"
            print(f"[repeat {rep + 1}/{args.repeats}, {i + 1}/{len(pairs)}, {at:.0f} s] {m} {lib}: {figure}",
                  file=sys.stderr, flush=True)
    batch = SIZES[args.size]["batch"]
    results = [combine(m, lib, runs[(m, lib)], batch) for m, lib in pairs]
    args.out.mkdir(parents=True, exist_ok=True)
    if args.suite == "default":
        stem = f"compare_opacus_{args.size}_{args.device}"
    else:
        stem = f"compare_opacus_{args.suite}_{args.device}" if args.size == "full" else f"compare_opacus_{args.suite}_{args.size}_{args.device}"
    if args.autocast != "off":
        stem += f"_{args.autocast}"
    if args.retain_memory:
        stem += "_retained"
    settings.update({
        "suite": args.suite, "size": args.size, "device": args.device, "batch": batch, "sigma": SIGMA, "max_grad_norm": CLIP,
        "delta": DELTA, "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats, "autocast": args.autocast,
        "retain_memory": args.retain_memory,
        "in_process": args.smoke, "models": {m: describe(m, args.size) for m in args.models},
        "heap": any(r.get("peak_heap_mb") for r in results), "heap_scaled": True,
        "duration_s": round(time.perf_counter() - started, 1),
    })
    report = {"settings": settings, "results": results}
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    markdown = render_tables.compare_markdown(report)
    (args.out / f"{stem}.md").write_text(markdown)
    plot(results, args.out / f"{stem}.png", settings)
    print(markdown)


if __name__ == "__main__":
    main()
