"""Differentially private training of the digits CNN over several processes (torch.distributed + DDP):
``torchrun --nproc_per_node=2 scripts/train_distributed.py`` (or ``torchrun -m dpclip_examples.train_distributed``).

Every rank loads the whole digits training split and wraps the same CNN (:mod:`dpclip_examples.digits`, the
main job's) in DistributedDataParallel; ``PrivacyEngine.make_private`` detects the process group. Each step,
every rank takes its shard (index % world_size == rank) of one global Poisson(q) batch, clips its examples'
gradients, the clipped sums are all-reduced and noised once (same noise on every rank), and every rank applies
the same update, so ε is exactly that of single-process DP-SGD with the same (q, σ, steps). Rank 0 prints the
test accuracy, ε and the privacy statement, and (with --out) writes privacy_report.json, model.pt and
checkpoint.pt (identical on every rank; load it on every rank to resume).

``--fsdp`` shards the CNN with FSDP2 instead of DDP (``fully_shard`` on each layer, then on the model): each rank
holds its rows of every parameter and of the optimizer state; dpclip gathers the parameters for the step,
reduce-scatters the clipped sums to the shards and draws each shard's noise on the rank that owns it
(:mod:`dpclip.sharded`). With --out every rank then writes its own ``checkpoint-rank<r>.pt``.

Run without torchrun it trains in one process (world size 1), which is the reference for the throughput
comparison printed at the end (examples/s of the private training loop, summed over ranks).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader

import dpclip
from dpclip.distributed import assert_in_sync

from .arguments import check_numbers
from .digits import DigitsCNN, accuracy, load_data, make_optimizer

__all__ = ["main", "parse_args", "setup"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Private training of the digits CNN over N processes (launch with torchrun --nproc_per_node=N).",
    )
    parser.add_argument("--epsilon", type=float, default=3.0, help="target privacy budget epsilon for the whole run (the noise multiplier is calibrated to it) (default: %(default)s)")
    parser.add_argument("--delta", type=float, default=1e-5, help="target delta, well below 1/N (N = 1437 training examples) (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=30, help="training epochs, each ceil(1/q) Poisson steps of the global data set (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=256, help="expected GLOBAL batch size B (q = B / N); each rank processes about B / world_size examples per step (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=3e-2, help="learning rate (default: %(default)s)")
    parser.add_argument("--optimizer", choices=["adam", "sgd"], default="adam", help="optimizer; sgd uses momentum 0.9 (default: %(default)s)")
    parser.add_argument("--max-grad-norm", type=float, default=0.3, help="clipping bound C (initial C with --clipping median) (default: %(default)s)")
    parser.add_argument("--clipping", choices=["fixed", "median"], default="fixed", help="fixed C, or median = adapt C towards the median per-example norm (its noisy count is accounted) (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights, the sampling and the noise (rank 0's value is used on every rank) (default: %(default)s)")
    parser.add_argument("--secure-mode", action="store_true", help="OS-seeded sampling and noise (rank 0 draws the noise and broadcasts it); --seed then only sets the initial weights")
    parser.add_argument("--backend", choices=["gloo", "nccl"], default="gloo", help="torch.distributed backend (gloo for CPU; nccl needs one CUDA device per rank and is untested) (default: %(default)s)")
    parser.add_argument("--fsdp", action="store_true", help="shard the model with FSDP2 (fully_shard per layer and on the model) instead of wrapping it in DDP")
    parser.add_argument("--no-ddp", action="store_true", help="pass the plain model instead of a DistributedDataParallel wrapper (dpclip does the same all-reduce either way)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads per process (default: OMP_NUM_THREADS, else torch's default)")
    parser.add_argument("--out", type=Path, default=None, help="if given, rank 0 writes privacy_report.json, model.pt and checkpoint.pt here (default: no files written)")
    parser.add_argument("--no-progress", action="store_true", help="print only the final summary, not the per-epoch lines")
    args = parser.parse_args(argv)
    check_numbers(parser, args, positive=("epsilon", "delta", "lr", "max_grad_norm"), counts=("epochs", "batch_size"))
    return args


def setup(args: argparse.Namespace) -> tuple[int, int, torch.device]:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR/PORT), or run alone."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cpu")
    device = torch.device("cpu")
    if args.backend == "nccl":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    dist.init_process_group(args.backend, timeout=timedelta(minutes=5))
    return dist.get_rank(), dist.get_world_size(), device


def shard(model: nn.Module, device: torch.device) -> None:
    """FSDP2: ``fully_shard`` each layer with parameters, then the whole model (its root)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in model.modules():
        if layer is not model and any(True for _ in layer.parameters(recurse=False)):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    rank, world_size, device = setup(args)
    say = print if rank == 0 else (lambda *a, **k: None)
    train, test = load_data(device)  # every rank holds the whole data set; the loader picks this rank's shard
    torch.manual_seed(args.seed)
    model: nn.Module = DigitsCNN().to(device)
    if world_size > 1 and args.fsdp:
        shard(model, device)
    elif world_size > 1 and not args.no_ddp:
        model = nn.parallel.DistributedDataParallel(model)  # its reducer is bypassed by dpclip (see dpclip.distributed)
    engine = dpclip.PrivacyEngine(seed=None if args.secure_mode else args.seed, secure_mode=args.secure_mode)
    optimizer = make_optimizer(args.optimizer, model.parameters(), args.lr)
    private_model, private_optimizer, loader = engine.make_private_with_epsilon(
        model,
        optimizer,
        DataLoader(train, batch_size=args.batch_size),
        target_epsilon=args.epsilon,
        target_delta=args.delta,
        epochs=args.epochs,
        max_grad_norm=args.max_grad_norm,
        clipping=args.clipping,
    )
    settings = engine.settings
    assert settings is not None
    say(
        f"digits: {len(train)} training / {len(test)} test examples on {world_size} process(es) "
        f"({args.backend if world_size > 1 else 'single process'}, {torch.get_num_threads()} thread(s) each); "
        f"q = {settings.sample_rate:.4f} (expected global batch {settings.expected_batch_size:.0f}), "
        f"{len(loader)} steps/epoch, noise multiplier {settings.noise_multiplier:.4f}"
    )
    criterion = nn.CrossEntropyLoss()
    private_model.train()
    examples = 0
    start = time.perf_counter()
    for epoch in range(args.epochs):
        for xb, yb in loader:
            private_optimizer.zero_grad()
            criterion(private_model(xb), yb).backward()
            private_optimizer.step()
            examples += len(yb)
        if not args.no_progress and (epoch == args.epochs - 1 or (epoch + 1) % 5 == 0):
            say(f"  epoch {epoch + 1:3d}/{args.epochs}: test acc {accuracy(private_model, test):.4f}  eps {engine.get_epsilon(args.delta):.3f}")
    elapsed = time.perf_counter() - start
    if world_size > 1:  # examples processed by all ranks together, and the slowest rank's time
        totals = torch.tensor([float(examples), elapsed], dtype=torch.float64)
        dist.all_reduce(totals[:1])
        dist.all_reduce(totals[1:], op=dist.ReduceOp.MAX)
        examples, elapsed = int(totals[0].item()), float(totals[1].item())
        assert_in_sync(engine)  # every rank ends with the same model, optimizer and accountant

    report = engine.privacy_report(args.delta)
    report.update(
        test_accuracy=accuracy(private_model, test),
        train_accuracy=accuracy(private_model, train),
        world_size=world_size,
        backend=args.backend if world_size > 1 else None,
        threads_per_process=torch.get_num_threads(),
        train_examples_processed=examples,
        train_seconds=elapsed,
        examples_per_second=examples / elapsed,
    )
    say(f"\ntest accuracy {report['test_accuracy']:.4f}   train accuracy {report['train_accuracy']:.4f}")
    say(f"epsilon {report['epsilon']:.4f} at delta {args.delta:g} after {engine.steps} steps (target {args.epsilon:g})")
    say(f"throughput {report['examples_per_second']:.0f} examples/s ({examples} examples in {elapsed:.2f} s, {world_size} process(es))")
    say()
    say(report["statement"])
    if args.out is not None and args.fsdp and world_size > 1:  # each rank its own shard's checkpoint
        full = {name: t.full_tensor() if hasattr(t, "full_tensor") else t for name, t in private_model.state_dict().items()}
        dist.barrier()
        if rank == 0:
            args.out.mkdir(parents=True, exist_ok=True)
            with open(args.out / "privacy_report.json", "w") as f:
                json.dump(report, f, indent=2)
                f.write("\n")
            dpclip.atomic_save(full, args.out / "model.pt")
        dist.barrier()
        dpclip.save_checkpoint(args.out / f"checkpoint-rank{rank}.pt", engine)
        say(f"wrote {args.out / 'privacy_report.json'}, model.pt (whole), checkpoint-rank<r>.pt (one per rank)")
    elif args.out is not None:
        if rank == 0:  # the engine state is identical on every rank; rank 0 writes it
            args.out.mkdir(parents=True, exist_ok=True)
            with open(args.out / "privacy_report.json", "w") as f:
                json.dump(report, f, indent=2)
                f.write("\n")
            dpclip.atomic_save(private_model.state_dict(), args.out / "model.pt")  # temp file + fsync + rename
            dpclip.save_checkpoint(args.out / "checkpoint.pt", engine)  # atomic, with an integrity digest
            say(f"wrote {args.out / 'privacy_report.json'}, model.pt, checkpoint.pt")
    if world_size > 1:
        dist.destroy_process_group()
    return report if rank == 0 else None


if __name__ == "__main__":
    main()
