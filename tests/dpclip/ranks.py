"""Running test scenarios on real torch.distributed ranks (gloo, CPU): spawn the processes once, collect results;
and the checks the multi-rank tests share.

``on_ranks(scenarios, tmp)`` starts ``world`` processes; each joins a gloo process group, calls
``scenarios(rank, tmp)`` (a module-level function, so that spawn can pickle it) and saves what it returns (or
the traceback it raised) to ``tmp/rank<r>.pt``; the results come back as one dict per rank.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from accountants import Gaussian, PLDAccountant, PoissonSampled

Scenarios = Callable[[int, Path], dict[str, Any]]


def free_port() -> int:
    """A TCP port free on this machine right now (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_group(rank: int, port: int, world: int, timeout_s: float = 60) -> None:
    """One thread; join the gloo group on 127.0.0.1:``port``."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))


def _worker(rank: int, port: int, tmp: str, world: int, scenarios: Scenarios) -> None:
    join_group(rank, port, world)
    try:
        results = scenarios(rank, Path(tmp))
    except BaseException:
        torch.save({"error": traceback.format_exc()}, Path(tmp) / f"rank{rank}.pt")
        raise
    finally:
        dist.destroy_process_group()
    torch.save(results, Path(tmp) / f"rank{rank}.pt")


def on_ranks(scenarios: Scenarios, tmp: Path, world: int = 2) -> list[dict[str, Any]]:
    """Run ``scenarios`` on ``world`` spawned ranks; their results, rank by rank."""
    mp.spawn(_worker, args=(free_port(), str(tmp), world, scenarios), nprocs=world, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(world)]


def expect(error: type[BaseException], fn: Callable[[], Any]) -> str:
    """What ``fn()`` raised of type ``error`` ("Type: message"), or "no error": a refusal, as a picklable result."""
    try:
        fn()
    except error as caught:
        return f"{type(caught).__name__}: {caught}"
    return "no error"


def assert_same_params(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0)


def composed_epsilon(q: float, sigma: float, steps: int, delta: float = 1e-5) -> float:
    """ε of ``steps`` Poisson(q)-sampled Gaussian(σ) steps by the PLD accountant composed by hand (the engine's default)."""
    reference = PLDAccountant()
    reference.compose(PoissonSampled(q, Gaussian(sigma)), steps)
    return reference.get_epsilon(delta)


TRAIN_DISTRIBUTED = Path(__file__).resolve().parents[2] / "scripts" / "train_distributed.py"
SCRIPT_FLAGS = ["--epochs", "1", "--no-progress", "--threads", "1"]  # 6 steps of the digits CNN


def train_distributed_on_two_ranks(out: Path, *extra: str) -> subprocess.CompletedProcess:
    """``scripts/train_distributed.py`` under ``torchrun --nproc_per_node=2`` (one thread each), writing to ``out``."""
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
         f"--master_port={free_port()}", str(TRAIN_DISTRIBUTED), *SCRIPT_FLAGS, *extra, "--out", str(out)],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=240,
    )
    assert two.returncode == 0, two.stdout + two.stderr
    return two


def train_distributed_in_this_process(out: Path) -> None:
    """The same script's one-process reference, in this process (no RANK in the environment: world size 1)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_distributed", TRAIN_DISTRIBUTED)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    try:
        module.main([*SCRIPT_FLAGS, "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
