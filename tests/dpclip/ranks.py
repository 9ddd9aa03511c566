"""Running test scenarios on real torch.distributed ranks (gloo, CPU): spawn the processes once, collect results.

``on_ranks(scenarios, tmp)`` starts ``world`` processes; each joins a gloo process group, calls
``scenarios(rank, tmp)`` (a module-level function, so that spawn can pickle it) and saves what it returns (or
the traceback it raised) to ``tmp/rank<r>.pt``; the results come back as one dict per rank.
"""

from __future__ import annotations

import os
import socket
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

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
