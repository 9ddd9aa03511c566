#!/usr/bin/env python
"""Differentially private training of the digits CNN over several processes (torch.distributed + DDP).

Launch (CPU, gloo; one process per core is sensible):

    torchrun --nproc_per_node=2 scripts/train_distributed.py
    OMP_NUM_THREADS=1 torchrun --nproc_per_node=2 scripts/train_distributed.py --epochs 10 --no-progress

Every rank loads the whole digits training split and wraps the same CNN (the main job's,
``dpclip_examples.digits``) in DistributedDataParallel; ``PrivacyEngine.make_private`` detects the process group.
Each step, every rank takes its shard (index % world_size == rank) of one global Poisson(q) batch, clips its
examples' gradients, the clipped sums are all-reduced and noised once (same noise on every rank), and every rank
applies the same update, so ε is exactly that of single-process DP-SGD with the same (q, σ, steps). Rank 0 prints
the test accuracy, ε and the privacy statement, and (with --out) writes privacy_report.json, model.pt and
checkpoint.pt (identical on every rank; load it on every rank to resume).

Run without torchrun it trains in one process (world size 1), which is the reference for the throughput
comparison printed at the end (examples/s of the private training loop, summed over ranks).

The code lives in the installed package ``dpclip_examples`` (``pip install -e .``):
:mod:`dpclip_examples.train_distributed`.
"""

from dpclip_examples.train_distributed import main

if __name__ == "__main__":
    main()
