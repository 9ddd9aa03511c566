"""Model zoo and brute-force oracle for "every accepted model gets exactly DP-SGD's per-example clipping".

DP-SGD releases, per step, Σᵢ clip(gᵢ, C) + noise, where gᵢ is example i's gradient computed on that example
ALONE. :func:`run_case` drives the public API exactly as a user would —

    engine = dpclip.PrivacyEngine(seed=0)
    model_p, opt_p, loader_p = engine.make_private(model, SGD(model.parameters(), lr=0.0), loader,
        noise_multiplier=1e-12, max_grad_norm=C, sample_rate=1.0, grad_sample_mode=mode, loss_reduction=...)
    for batch in loader_p: opt_p.zero_grad(); loss(model_p, batch).backward(); opt_p.step()   # one step

— and compares the released gradient p.grad = (Σᵢ clip(gᵢ, C) + noise) / (q·N) with the oracle: for each
example i, a fresh deep copy of the original model (same initial weights, train mode, every dropout p = 0) runs
the case's own loss on that example alone (a batch of 1, sliced from the same data-set tensors),
``torch.autograd.grad`` gives gᵢ over all trainable parameters, which is clipped as a whole (L2 or L1, or per
parameter for ``per_layer=True``), summed and divided by q·N. With q = 1 the Poisson loader yields all N
examples in order; the batch the loop received is checked against the data set.

Outcomes of one (case, grad_sample_mode):

- ``exact``: the step went through, the released gradient matches the oracle within ``tol × max(C/N, max|oracle|)``,
  every parameter and buffer is bitwise unchanged (lr = 0), and no parameter outside the released set holds a
  gradient;
- ``refused``: a dpclip exception (a subclass of ModelNotSupportedError, EngineUsageError or
  PrivacyParameterError) was raised; the verdict also checks that its message names the offending module (one of
  the case's ``culprits``) and that no state changed;
- ``WRONG``: the step went through but released something else (error size in the detail), or changed state;
- ``torch error``: any other exception (a torch internal error, or an exception dpclip should have turned into one
  of its own).

Expectations per case (and per path when they differ): ``exact`` (required), ``exact or refused``, ``refused``.

``python -m tests.dpclip.oracle_models`` (or ``python -m tests.dpclip.test_oracle_models``), from the repository
root, prints the table.
"""

from __future__ import annotations

import copy
import importlib
import math
import os
import time
import traceback
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import dpclip

Tensor = torch.Tensor

# The per-example paths every case runs on; DPCLIP_ORACLE_MODES=auto,vmap,layerwise adds the explicit fast path
# (which may refuse any model it has no rule for: on "layerwise" an "exact" case only needs "exact or refused").
MODES = tuple(m for m in os.environ.get("DPCLIP_ORACLE_MODES", "auto,vmap").split(",") if m)
NOISE = 1e-12  # noise multiplier: must be > 0; its noise (σ·C/(qN) ≈ 1e-12·C/N) is far below the tolerance
TOL = 1e-5
PROPER_ERRORS = (dpclip.ModelNotSupportedError, dpclip.EngineUsageError, dpclip.PrivacyParameterError)

EXACT, EXACT_OR_REFUSED, REFUSED = "exact", "exact or refused", "refused"


# ------------------------------------------------------------------------------------------------------------
# Case description
# ------------------------------------------------------------------------------------------------------------
@dataclass
class Setup:
    """What one case's factory builds (fresh for every run)."""

    model: nn.Module  # what the user hands to make_private (and calls through model_p)
    tensors: tuple[Tensor, ...]  # the data set: TensorDataset(*tensors); dim 0 = example
    loss: Callable[[nn.Module, list[Tensor]], Tensor]  # loss(model, batch) with the case's loss_reduction
    module: nn.Module | None = None  # the nn.Module holding the parameters (default: model); the oracle copies it
    optimizer: torch.optim.Optimizer | None = None  # default: SGD(model.parameters(), lr=0.0)
    after_wrap: Callable[[nn.Module], None] | None = None  # applied to `module` after make_private and to oracle copies
    collate_fn: Callable[[list], Any] | None = None  # the DataLoader's collate_fn (the oracle collates one example)
    notes: list[str] = field(default_factory=list)  # facts found while building (shown in the detail)


@dataclass
class Case:
    name: str
    group: str  # A: data released outside the mechanism, B: layout, C: utility, D: used to crash, L: layers that work
    build: Callable[[], Setup]
    expect: str | dict[str, str]  # EXACT / EXACT_OR_REFUSED / REFUSED, or {mode: ...}
    culprits: tuple[str, ...] = ()  # a refusal's message must contain one of these (module qualified/class names)
    notes: str = ""
    loss_reduction: str = "mean"
    options: dict[str, Any] = field(default_factory=dict)  # extra make_private kwargs (norm, per_layer, ...)
    sample_rate: float = 1.0
    drive: str = "standard"  # standard / eval / no_backward / unwrapped / foreign
    refusal_types: tuple[type, ...] = PROPER_ERRORS
    refuse_at: str | None = None  # "make_private": a refusal must come from make_private itself
    tol: float = TOL
    modes: tuple[str, ...] = MODES
    requires: str | None = None  # module that must be importable (else the case is skipped)

    def expected(self, mode: str) -> str:
        if isinstance(self.expect, dict) and mode in self.expect:
            return self.expect[mode]
        expected = self.expect if isinstance(self.expect, str) else EXACT
        if mode == "layerwise" and expected == EXACT:
            return EXACT_OR_REFUSED  # the explicit fast path refuses models it has no rule for (documented)
        return expected


@dataclass
class Result:
    outcome: str  # exact / refused / WRONG / torch error / skipped
    detail: str = ""
    problems: list[str] = field(default_factory=list)  # reasons a refusal or acceptance is not proper
    stage: str = ""
    seconds: float = 0.0
    error: BaseException | None = None

    def summary(self) -> str:
        text = self.outcome
        if self.stage and self.outcome in ("refused", "torch error"):
            text += f" @{self.stage}"
        parts = [p for p in [*self.problems, self.detail] if p]
        return text + (": " + "; ".join(parts) if parts else "")


# ------------------------------------------------------------------------------------------------------------
# Small helpers for the factories
# ------------------------------------------------------------------------------------------------------------
def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int = 1, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=dtype)


def randint(high: int, *shape: int, seed: int = 2, low: int = 0) -> Tensor:
    return torch.randint(low, high, shape, generator=_gen(seed))


def cycled(values: list, dtype: torch.dtype | None = None) -> Tensor:
    """``values`` repeated to N rows (the zoo's hand-picked per-example lengths and switches, at any N)."""
    return torch.tensor(values, dtype=dtype).repeat(-(-N // len(values)))[:N]


def labels(n: int, classes: int = 3, seed: int = 3) -> Tensor:
    return torch.randint(0, classes, (n,), generator=_gen(seed))


def reduce(per_example: Tensor, red: str) -> Tensor:
    return per_example.mean() if red == "mean" else per_example.sum()


def ce_loss(red: str) -> Callable[[nn.Module, list[Tensor]], Tensor]:
    """loss(model, [*inputs, y]) = cross_entropy(model(*inputs), y) with reduction ``red``."""

    def loss(model: nn.Module, batch: list[Tensor]) -> Tensor:
        *inputs, y = batch
        return F.cross_entropy(model(*inputs), y, reduction=red)

    return loss


def token_ce(logits: Tensor, targets: Tensor, red: str) -> Tensor:
    """logits [B, T, V], targets [B, T]: each example's mean token loss, then mean/sum over examples."""
    per_token = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # [B, T]
    return reduce(per_token.mean(dim=1), red)


def mlp(d_in: int = 6, hidden: int = 8, classes: int = 3, dropout: float | None = None) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(d_in, hidden), nn.Tanh()]
    if dropout is not None:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(hidden, classes))
    return nn.Sequential(*layers)


def seeded(factory: Callable[..., Setup]) -> Callable[..., Setup]:
    """Every factory starts from torch.manual_seed(0): the same initial weights on every run."""

    def build(*args: Any, **kwargs: Any) -> Setup:
        torch.manual_seed(0)
        return factory(*args, **kwargs)

    build.__name__ = factory.__name__
    return build


N = 6  # examples in most data sets (q = 1: the whole data set is the batch)


# ------------------------------------------------------------------------------------------------------------
# A. Data released outside the mechanism
# ------------------------------------------------------------------------------------------------------------
class EmbMaxNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.renorm_lookup = nn.Embedding(20, 8, max_norm=1.0)  # renormalises the looked-up rows in place
        self.head = nn.Linear(8, 3)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(self.renorm_lookup(ids).mean(dim=1))


@seeded
def build_emb_max_norm(red: str = "mean") -> Setup:
    return Setup(EmbMaxNorm(), (randint(20, N, 4), labels(N)), ce_loss(red))


class RunningCenter(nn.Module):
    """Subtracts a running mean that forward updates from the batch (as BatchNorm's running stats do)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(d))

    def forward(self, h: Tensor) -> Tensor:
        out = h - self.running_mean
        if self.training:
            with torch.no_grad():
                self.running_mean.mul_(0.9).add_(0.1 * h.mean(dim=0))
        return out


class WithRunningStats(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.stat_tracker = RunningCenter(8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.tanh(self.stat_tracker(self.fc1(x))))


@seeded
def build_running_buffer(red: str = "mean") -> Setup:
    return Setup(WithRunningStats(), (randn(N, 6), labels(N)), ce_loss(red))


class EmaCodebook(nn.Module):
    """A frozen parameter that forward moves towards the batch's mean activation (VQ-VAE style EMA codebook)."""

    def __init__(self) -> None:
        super().__init__()
        self.codes = nn.Parameter(torch.randn(8), requires_grad=False)

    def forward(self, h: Tensor) -> Tensor:
        out = h + self.codes
        if self.training:
            with torch.no_grad():
                self.codes.mul_(0.99).add_(0.01 * h.mean(dim=0))
        return out


class WithEmaCodebook(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.ema_codes = EmaCodebook()
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.tanh(self.ema_codes(self.fc1(x))))


@seeded
def build_ema_codebook(red: str = "mean") -> Setup:
    return Setup(WithEmaCodebook(), (randn(N, 6), labels(N)), ce_loss(red))


@seeded
def build_optimizer_extra_param(red: str = "mean") -> Setup:
    model = mlp()
    temperature = nn.Parameter(torch.tensor(1.5))  # learnable, used in the loss, not part of the model

    def loss(m: nn.Module, batch: list[Tensor]) -> Tensor:
        x, y = batch
        return F.cross_entropy(m(x) / temperature, y, reduction=red)

    optimizer = torch.optim.SGD([*model.parameters(), temperature], lr=0.0)
    return Setup(model, (randn(N, 6), labels(N)), loss, optimizer=optimizer)


@seeded
def build_mlp(red: str = "mean", n: int | None = None, dtype: torch.dtype = torch.float32, dropout: float | None = None) -> Setup:
    n = N if n is None else n
    model = mlp(dropout=dropout).to(dtype)
    return Setup(model, (randn(n, 6, dtype=dtype), labels(n)), ce_loss(red))


def _bn_model() -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(fc1=nn.Linear(6, 8), bn_layer=nn.BatchNorm1d(8), act=nn.Tanh(), fc2=nn.Linear(8, 3))
    )


@seeded
def build_bn_fixed_after_optimizer(red: str = "mean") -> Setup:
    model = _bn_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # holds BatchNorm's weight and bias
    dpclip.fix_model(model)  # BatchNorm → GroupNorm: new parameters the optimizer does not hold
    return Setup(model, (randn(N, 6), labels(N)), ce_loss(red), optimizer=optimizer)


@seeded
def build_bn_raw(red: str = "mean") -> Setup:
    return Setup(_bn_model(), (randn(N, 6), labels(N)), ce_loss(red))


class PretrainedConvBN(nn.Module):
    """Conv → BatchNorm2d → ReLU → BatchNorm1d-on-features head, with running statistics from earlier (non-private)
    training, as a pretrained network brings them."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.bn2d = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, 8)
        self.bn1d = nn.BatchNorm1d(8, affine=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.bn2d(self.conv(x)))
        return self.head(torch.tanh(self.bn1d(self.fc(h.flatten(1)))))


@seeded
def build_frozen_batchnorm(red: str = "mean") -> Setup:
    model = PretrainedConvBN()
    with torch.no_grad():  # "pretraining": running statistics far from the defaults
        for _ in range(3):
            model(torch.randn(32, 2, 6, 6) * 3 + 1)
    dpclip.fix_model(model, batchnorm="freeze")
    return Setup(model, (randn(N, 2, 6, 6), labels(N)), ce_loss(red))


# ------------------------------------------------------------------------------------------------------------
# B. Per-example layout
# ------------------------------------------------------------------------------------------------------------
class TimeMajorEncoder(nn.Module):
    """Stock nn.TransformerEncoder with batch_first=False: takes [T, B, 4]."""

    def __init__(self) -> None:
        super().__init__()
        self.embed_tm = nn.Linear(4, 8)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=False)
        self.encoder_tm = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head_tm = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:  # x: [T, B, 4]
        return self.head_tm(self.encoder_tm(self.embed_tm(x)).mean(dim=0))


def time_major_ce(red: str) -> Callable[[nn.Module, list[Tensor]], Tensor]:
    def loss(m: nn.Module, batch: list[Tensor]) -> Tensor:
        x, y = batch  # the data set is batch-first; the model wants time-major
        return F.cross_entropy(m(x.transpose(0, 1)), y, reduction=red)

    return loss


@seeded
def build_tenc_time_major(T: int, red: str = "mean") -> Setup:
    return Setup(TimeMajorEncoder(), (randn(N, T, 4), labels(N)), time_major_ce(red))


def time_major_collate(items: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """The loader itself yields time-major batches: x [T, B, d], y [B]."""
    return torch.stack([x for x, _ in items], dim=1), torch.stack([y for _, y in items])


@seeded
def build_tenc_time_major_collate(T: int, red: str = "mean") -> Setup:
    def loss(m: nn.Module, batch: list[Tensor]) -> Tensor:
        x, y = batch  # already [T, B, 4]: the model is called on exactly what the loader yielded
        return F.cross_entropy(m(x), y, reduction=red)

    return Setup(TimeMajorEncoder(), (randn(N, T, 4), labels(N)), loss, collate_fn=time_major_collate)


class TransposeThenLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc_t = nn.Linear(4, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:  # x: [B, T, 4]
        h = self.fc_t(x.transpose(0, 1))  # [T, B, 8]
        return self.head(torch.tanh(h).mean(dim=0))


@seeded
def build_linear_after_transpose(T: int, red: str = "mean") -> Setup:
    return Setup(TransposeThenLinear(), (randn(N, T, 4), labels(N)), ce_loss(red))


class GPTStyle(nn.Module):
    """Token embeddings + learned position embeddings over torch.arange(T)."""

    def __init__(self, T: int) -> None:
        super().__init__()
        self.tok_table = nn.Embedding(20, 8)
        self.pos_table = nn.Embedding(T, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, ids: Tensor) -> Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        h = self.tok_table(ids) + self.pos_table(positions)
        return self.head(torch.tanh(h).mean(dim=1))


@seeded
def build_gpt_positions(T: int, red: str = "mean") -> Setup:
    return Setup(GPTStyle(T), (randint(20, N, T), labels(N)), ce_loss(red))


class BertStylePositions(nn.Module):
    """position_ids buffer of shape [1, max_len] sliced to [1, T] (as in Hugging Face BERT)."""

    def __init__(self, max_len: int = 8) -> None:
        super().__init__()
        self.tok_table = nn.Embedding(20, 8)
        self.pos_table = nn.Embedding(max_len, 8)
        self.register_buffer("position_ids", torch.arange(max_len).expand(1, -1), persistent=False)
        self.head = nn.Linear(8, 3)

    def forward(self, ids: Tensor, position_ids: Tensor | None = None) -> Tensor:
        if position_ids is None:
            position_ids = self.position_ids[:, : ids.shape[1]]  # [1, T]
        h = self.tok_table(ids) + self.pos_table(position_ids)
        return self.head(torch.tanh(h).mean(dim=1))


@seeded
def build_bert_positions(as_argument: bool, red: str = "mean") -> Setup:
    T = 5

    def loss(m: nn.Module, batch: list[Tensor]) -> Tensor:
        ids, y = batch
        if as_argument:
            return F.cross_entropy(m(ids, torch.arange(T)[None, :]), y, reduction=red)
        return F.cross_entropy(m(ids), y, reduction=red)

    return Setup(BertStylePositions(), (randint(20, N, T), labels(N)), loss)


class TableProj(nn.Module):
    """A Linear applied to a learned [T, d] position table (not to the batch)."""

    def __init__(self, T: int) -> None:
        super().__init__()
        self.tok_table = nn.Embedding(20, 8)
        self.table = nn.Parameter(torch.randn(T, 8))
        self.pos_proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, ids: Tensor) -> Tensor:
        h = self.tok_table(ids) + self.pos_proj(self.table)  # pos_proj's input is [T, 8]
        return self.head(torch.tanh(h).mean(dim=1))


@seeded
def build_table_proj(T: int, red: str = "mean") -> Setup:
    return Setup(TableProj(T), (randint(20, N, T), labels(N)), ce_loss(red))


class RoutedSubset(nn.Module):
    """A layer applied to part of the batch only (the examples routed to it, as in mixture-of-experts)."""

    def __init__(self) -> None:
        super().__init__()
        self.base = nn.Linear(4, 3)
        self.routed = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)
        chosen = x[:, 0] > 0
        extra = torch.zeros_like(out)
        extra[chosen] = self.routed(x[chosen])  # the layer sees only the chosen rows
        return out + extra


@seeded
def build_routed_subset(red: str = "mean") -> Setup:
    x = randn(N, 4)
    x[:, 0] = cycled([1.0, -1.0, 0.5, -0.5, 2.0, -2.0])  # half the examples take the routed layer
    return Setup(RoutedSubset(), (x, labels(N)), ce_loss(red))


class SelectedTokenHead(nn.Module):
    """A head on the tokens a mask selects (h[mask]: rows that are not the examples), the logits summed back into
    their example with index_add. Per example, nothing mixed."""

    def __init__(self) -> None:
        super().__init__()
        self.enc, self.head = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        rows = self.head(torch.tanh(self.enc(x))[mask])
        return torch.zeros(x.shape[0], 3).index_add(0, mask.nonzero()[:, 0], rows)


@seeded
def build_selected_tokens(red: str = "mean") -> Setup:
    """One selected token per example for the first 8 (so the rows line up with the examples on the probe), then
    pairs that select 2 and 0: past the probe the rows no longer line up."""
    mask = torch.zeros(N, 4, dtype=torch.bool)
    mask[:, 0] = True
    for i in range(8, N - 1, 2):
        mask[i, 2], mask[i + 1, 0] = True, False
    return Setup(SelectedTokenHead(), (randn(N, 4, 4), mask, labels(N)), ce_loss(red))


class ClsPooling(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Linear(4, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.tok(x))[:, 0])  # first position only


@seeded
def build_cls_pooling(red: str = "mean") -> Setup:
    return Setup(ClsPooling(), (randn(N, 5, 4), labels(N)), ce_loss(red))


class LastTokenGather(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Linear(4, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        h = torch.tanh(self.tok(x))
        last = h[torch.arange(x.shape[0], device=x.device), lengths - 1]  # GPT-2 style pooling
        return self.head(last)


@seeded
def build_last_token(red: str = "mean") -> Setup:
    lengths = cycled([5, 3, 1, 4, 2, 5])
    return Setup(LastTokenGather(), (randn(N, 5, 4), lengths, labels(N)), ce_loss(red))


class TrimmedTokens(nn.Module):
    """Drops the trailing padding positions of the batch before its layers (a shape that depends on the data):
    every example here has 7 real tokens, so each probe is trimmed to 7 positions, the first probe size."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.tok = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        length = int(mask.sum(dim=1).max())
        ids, weights = ids[:, :length], mask[:, :length, None].to(torch.float32)
        h = torch.tanh(self.tok(self.emb(ids)))
        return self.head((h * weights).sum(1) / weights.sum(1))


@seeded
def build_trimmed_tokens(red: str = "mean") -> Setup:
    mask = torch.zeros(N, 16, dtype=torch.bool)
    mask[:, :7] = True
    return Setup(TrimmedTokens(), (randint(20, N, 16), mask, labels(N)), ce_loss(red))


class FlattenedTokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.flat_fc = nn.Linear(4, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        B, T, d = x.shape
        h = self.flat_fc(x.reshape(B * T, d)).reshape(B, T, -1)
        return self.head(torch.tanh(h).mean(dim=1))


@seeded
def build_reshape_bt(red: str = "mean") -> Setup:
    return Setup(FlattenedTokens(), (randn(N, 5, 4), labels(N)), ce_loss(red))


class BatchCentre(nn.Module):
    def forward(self, h: Tensor) -> Tensor:
        return h - h.mean(dim=0, keepdim=True)  # every example's activation depends on the others


class BatchFlip(nn.Module):
    def forward(self, h: Tensor) -> Tensor:
        return h.flip(0)  # example i gets example B-1-i's activation (the middle row of an odd probe keeps its own)


class MixesBatch(nn.Module):
    def __init__(self, mixer: type[nn.Module] = BatchCentre) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.batch_centre = mixer()
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.tanh(self.batch_centre(self.fc1(x))))


@seeded
def build_batch_mixing(red: str = "mean", mixer: type[nn.Module] = BatchCentre) -> Setup:
    return Setup(MixesBatch(mixer), (randn(N, 6), labels(N)), ce_loss(red))


class Reparameterised(nn.Module):
    """A VAE-style latent sample z = μ + ε·σ with ε drawn in forward: random outside dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(6, 8)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        mu, log_var = self.enc(x).chunk(2, dim=-1)
        return self.head(mu + torch.randn_like(mu) * torch.exp(0.5 * log_var))


@seeded
def build_reparameterised(red: str = "mean") -> Setup:
    return Setup(Reparameterised(), (randn(N, 6), labels(N)), ce_loss(red))


class TimeMajorOut(nn.Module):
    """Takes [B, T, 4], returns time-major [T, B, 3]."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x).transpose(0, 1)


@seeded
def build_time_major_out(T: int, red: str = "mean") -> Setup:
    def loss(m: nn.Module, batch: list[Tensor]) -> Tensor:
        x, y = batch
        return token_ce(m(x).transpose(0, 1), y, red)  # the loss transposes back to [B, T, 3]

    return Setup(TimeMajorOut(), (randn(N, T, 4), randint(3, N, T, seed=5)), loss)


class TableArg(nn.Module):
    """Mixes positions with a shared [T, T] table passed as a forward argument."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor, table: Tensor) -> Tensor:
        h = table @ self.fc(x)  # [T, T] @ [B, T, 8]
        return self.head(torch.tanh(h).mean(dim=1))


@seeded
def build_table_arg(T: int, red: str = "mean") -> Setup:
    table = torch.tril(torch.ones(T, T))
    table = table / table.sum(dim=1, keepdim=True)  # causal running average

    def loss(m: nn.Module, batch: list[Tensor]) -> Tensor:
        x, y = batch
        return F.cross_entropy(m(x, table), y, reduction=red)

    return Setup(TableArg(), (randn(N, T, 4), labels(N)), loss)


# ------------------------------------------------------------------------------------------------------------
# C. Utility correctness
# ------------------------------------------------------------------------------------------------------------
class ManualTie(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.word_emb = nn.Embedding(20, 8)
        self.mix = nn.Linear(8, 8)

    def forward(self, ids: Tensor) -> Tensor:
        h = torch.tanh(self.mix(self.word_emb(ids)))
        return h @ self.word_emb.weight.T  # [B, T, 20], the embedding used as the output layer by hand


def token_loss(red: str) -> Callable[[nn.Module, list[Tensor]], Tensor]:
    def loss(m: nn.Module, batch: list[Tensor]) -> Tensor:
        *inputs, y = batch
        return token_ce(m(*inputs), y, red)

    return loss


@seeded
def build_manual_tie(red: str = "mean") -> Setup:
    return Setup(ManualTie(), (randint(20, N, 5), randint(20, N, 5, seed=7)), token_loss(red))


class ParentReadsBias(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x) + 2.0 * self.fc.bias  # the parent uses the child's bias directly


@seeded
def build_parent_reads_bias(red: str = "mean") -> Setup:
    return Setup(ParentReadsBias(), (randn(N, 6), labels(N)), ce_loss(red))


class NoGradInside(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 3)
        self.side = nn.Linear(6, 3)  # trainable, but run under torch.no_grad(): its gradient is zero

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            t = self.side(x)
        return self.fc(x) * torch.sigmoid(t)


@seeded
def build_no_grad_inside(red: str = "mean") -> Setup:
    return Setup(NoGradInside(), (randn(N, 6), labels(N)), ce_loss(red))


class InplaceRelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(x)
        h.relu_()
        return self.fc2(h)


@seeded
def build_inplace_relu(red: str = "mean") -> Setup:
    return Setup(InplaceRelu(), (randn(N, 6), labels(N)), ce_loss(red))


@seeded
def build_user_hook(red: str = "mean") -> Setup:
    model = mlp()
    model[0].register_forward_hook(lambda module, args, out: out * 2.0)  # rescales the first layer's output
    return Setup(model, (randn(N, 6), labels(N)), ce_loss(red))


class KeywordCall(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(input=torch.tanh(self.fc(input=x)))


@seeded
def build_keyword_call(red: str = "mean") -> Setup:
    return Setup(KeywordCall(), (randn(N, 6), labels(N)), ce_loss(red))


class EmbeddingClassifier(nn.Module):
    def __init__(self, vocab: int = 20, **embedding_kwargs: Any) -> None:
        super().__init__()
        self.lookup = nn.Embedding(vocab, 8, **embedding_kwargs)
        self.head = nn.Linear(8, 3)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(torch.tanh(self.lookup(ids)).mean(dim=1))


@seeded
def build_embedding(red: str = "mean", **embedding_kwargs: Any) -> Setup:
    vocab = 6
    ids = randint(vocab, N, 7)  # repeated tokens within and across examples
    if embedding_kwargs.get("padding_idx") is not None:
        ids[:, -2:] = 0  # padding at the end of every example
    return Setup(EmbeddingClassifier(vocab, **embedding_kwargs), (ids, labels(N)), ce_loss(red))


@seeded
def build_requires_grad_toggle(turn_on: bool, red: str = "mean") -> Setup:
    model = nn.Sequential(OrderedDict(fc1=nn.Linear(6, 8), act=nn.Tanh(), fc2=nn.Linear(8, 3)))
    if turn_on:
        model.fc1.weight.requires_grad_(False)

    def after_wrap(m: nn.Module) -> None:
        m.fc1.weight.requires_grad_(turn_on)

    return Setup(model, (randn(N, 6), labels(N)), ce_loss(red), after_wrap=after_wrap)


class Checkpointed(nn.Module):
    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.reentrant = reentrant
        self.pre = nn.Linear(6, 8)  # so the checkpoint's input requires grad (reentrant checkpoint needs it)
        self.ckpt_block = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.pre(x))
        h = torch.utils.checkpoint.checkpoint(self.ckpt_block, h, use_reentrant=self.reentrant)
        return self.head(torch.tanh(h))


@seeded
def build_checkpoint(reentrant: bool, red: str = "mean") -> Setup:
    return Setup(Checkpointed(reentrant), (randn(N, 6), labels(N)), ce_loss(red))


@seeded
def build_weight_norm(red: str = "mean") -> Setup:
    model = nn.Sequential(
        OrderedDict(
            wn_fc=torch.nn.utils.parametrizations.weight_norm(nn.Linear(6, 8)), act=nn.Tanh(), head=nn.Linear(8, 3)
        )
    )
    return Setup(model, (randn(N, 6), labels(N)), ce_loss(red))


class UsedTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.shared = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.shared(torch.tanh(self.shared(h))))
        return self.head(h)


@seeded
def build_used_twice(red: str = "mean") -> Setup:
    return Setup(UsedTwice(), (randn(N, 6), labels(N)), ce_loss(red))


@seeded
def build_frozen_layer(red: str = "mean") -> Setup:
    model = mlp()
    for p in model[0].parameters():
        p.requires_grad_(False)
    return Setup(model, (randn(N, 6), labels(N)), ce_loss(red))


# ------------------------------------------------------------------------------------------------------------
# D. Things that used to raise torch-internal errors
# ------------------------------------------------------------------------------------------------------------
_RNN_TYPES = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


class RecurrentClassifier(nn.Module):
    def __init__(self, kind: str, packed: bool) -> None:
        super().__init__()
        extra = dict(num_layers=2, bidirectional=True) if kind == "lstm" else {}
        self.seq_rnn = _RNN_TYPES[kind](4, 6, batch_first=True, **extra)
        self.packed = packed
        directions = 2 if kind == "lstm" else 1
        self.head = nn.Linear(6 * directions, 3)

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        if self.packed:
            packed = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
            out, _ = self.seq_rnn(packed)
            out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
            last = out[torch.arange(x.shape[0], device=x.device), lengths - 1]
        else:
            out, _ = self.seq_rnn(x)
            last = out[:, -1]
        return self.head(last)


_CELL_TYPES = {"lstm": nn.LSTMCell, "gru": nn.GRUCell, "rnn": nn.RNNCell}


class CellLoop(nn.Module):
    """A recurrent cell stepped over time in forward: the first step gets no state (hx=None) or one made by a
    Linear from the input, later steps the previous state (an LSTMCell's as the pair (h, c), by keyword)."""

    def __init__(self, kind: str, initial_state: bool, **cell: Any) -> None:
        super().__init__()
        self.kind = kind
        self.init_h = nn.Linear(4, 6) if initial_state else None
        self.cell = PairStateCell() if kind == "pair" else _CELL_TYPES[kind](4, 6, **cell)
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        state: Any = None
        if self.init_h is not None:
            h0 = torch.tanh(self.init_h(x[:, 0]))
            state = (h0, torch.zeros_like(h0)) if self.kind in ("lstm", "pair") else h0
        for t in range(x.shape[1]):
            state = self.cell(x[:, t], hx=state)
        return self.head(state[0] * state[1] if self.kind == "pair" else state[0] if self.kind == "lstm" else state)


class PairStateCell(nn.Module):
    """A user's cell (no layer rule: the per-layer vmap fallback) whose state is a pair (h, c), None at first."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 6) * 0.5)
        self.u = nn.Parameter(torch.randn(6, 6) * 0.5)
        self.v = nn.Parameter(torch.randn(4, 6) * 0.5)

    def forward(self, x: Tensor, hx: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        h, c = (x.new_zeros(x.shape[0], 6), x.new_ones(x.shape[0], 6)) if hx is None else hx
        return torch.tanh(x @ self.w + h @ self.u), torch.sigmoid(x @ self.v) * c


@seeded
def build_cell_loop(kind: str, initial_state: bool = False, red: str = "mean", **cell: Any) -> Setup:
    return Setup(CellLoop(kind, initial_state, **cell), (randn(N, 4, 4), labels(N)), ce_loss(red))


@seeded
def build_recurrent(kind: str, packed: bool = False, fix: bool = False, red: str = "mean") -> Setup:
    model = RecurrentClassifier(kind, packed)
    notes = []
    if fix:
        dpclip.fix_model(model)
        left = [name for name, m in model.named_modules() if isinstance(m, nn.RNNBase)]
        if left:
            notes.append(f"fix_model left torch recurrent layers: {', '.join(left)}")
    x = randn(N, 5, 4)
    if packed:
        lengths = cycled([5, 2, 4, 1, 3, 5])
        x = x * (torch.arange(5)[None, :, None] < lengths[:, None, None])  # zero padding
        return Setup(model, (x, lengths, labels(N)), ce_loss(red), notes=notes)
    return Setup(model, (x, labels(N)), ce_loss(red), notes=notes)


def _hf_ids(vocab: int, T: int) -> Tensor:
    return randint(vocab, N, T, seed=11, low=1)


def _lora(model: nn.Module, targets: list[str], fan_in_fan_out: bool = False) -> nn.Module:
    import peft

    config = peft.LoraConfig(
        r=2, lora_alpha=4, lora_dropout=0.0, target_modules=targets, init_lora_weights=False,
        fan_in_fan_out=fan_in_fan_out,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, config)


@seeded
def build_bert(lora: bool, red: str = "mean") -> Setup:
    import transformers

    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3,
    )
    config._attn_implementation = "eager"
    model: nn.Module = transformers.BertForSequenceClassification(config).double().train()
    if lora:
        model = _lora(model, ["query", "value"])
    T = 7
    ids = _hf_ids(50, T)
    lengths = cycled([7, 4, 6, 3, 7, 5])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()  # 2-D attention mask with padding

    def loss(m: nn.Module, batch: list[Tensor]) -> Tensor:
        ids, mask, y = batch
        return F.cross_entropy(m(input_ids=ids, attention_mask=mask).logits, y, reduction=red)

    return Setup(model, (ids, mask, labels(N)), loss)


def _causal_lm_loss(red: str) -> Callable[[nn.Module, list[Tensor]], Tensor]:
    def loss(m: nn.Module, batch: list[Tensor]) -> Tensor:
        (ids,) = batch
        logits = m(input_ids=ids).logits  # [B, T, V]; the LM loss per example is computed here, not by the model
        return token_ce(logits[:, :-1], ids[:, 1:], red)

    return loss


@seeded
def build_gpt2(lora: bool, use_cache: bool = True, red: str = "mean") -> Setup:
    import transformers

    config = transformers.GPT2Config(
        vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2, n_inner=32,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, use_cache=use_cache,
    )
    config._attn_implementation = "eager"
    model: nn.Module = transformers.GPT2LMHeadModel(config).double().train()
    if lora:
        model = _lora(model, ["c_attn"], fan_in_fan_out=True)
    return Setup(model, (_hf_ids(50, 6),), _causal_lm_loss(red))


@seeded
def build_llama(lora: bool, red: str = "mean") -> Setup:
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32, use_cache=False, attention_dropout=0.0,
    )
    config._attn_implementation = "eager"
    model: nn.Module = transformers.LlamaForCausalLM(config).double().train()
    if lora:
        model = _lora(model, ["q_proj", "v_proj"])
    return Setup(model, (_hf_ids(50, 6),), _causal_lm_loss(red))


@seeded
def build_autocast(red: str = "mean") -> Setup:
    def loss(m: nn.Module, batch: list[Tensor]) -> Tensor:
        x, y = batch
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x)
        return F.cross_entropy(out.float(), y, reduction=red)

    return Setup(mlp(), (randn(N, 6), labels(N)), loss)


# ------------------------------------------------------------------------------------------------------------
# L. Layers and settings that already work
# ------------------------------------------------------------------------------------------------------------
class ConvNet(nn.Module):
    def __init__(self, body: nn.Module, features: int) -> None:
        super().__init__()
        self.body = body
        self.head = nn.Linear(features, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.body(x)).flatten(1))


def _features(body: nn.Module, shape: tuple[int, ...]) -> int:
    with torch.no_grad():
        return body(torch.zeros(1, *shape)).flatten(1).shape[1]


@seeded
def build_conv(body_factory: Callable[[], nn.Module], shape: tuple[int, ...], red: str = "mean", n: int | None = None) -> Setup:
    n = N if n is None else n
    body = body_factory()
    model = ConvNet(body, _features(body, shape))
    return Setup(model, (randn(n, *shape), labels(n)), ce_loss(red))


class TokenModel(nn.Module):
    """Linear token embedding → ``block`` → mean over positions → head; inputs [B, T, 4]."""

    def __init__(self, block: nn.Module, d: int = 8) -> None:
        super().__init__()
        self.embed = nn.Linear(4, d)
        self.block = block
        self.head = nn.Linear(d, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.block(self.embed(x))).mean(dim=1))


@seeded
def build_token_model(block_factory: Callable[[], nn.Module], T: int = 5, red: str = "mean") -> Setup:
    return Setup(TokenModel(block_factory()), (randn(N, T, 4), labels(N)), ce_loss(red))


class SelfAttention(nn.Module):
    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first)

    def forward(self, h: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:  # h: [B, T, 8]
        if not self.batch_first:
            h = h.transpose(0, 1)
        out, _ = self.attn(h, h, h, key_padding_mask=key_padding_mask, need_weights=False)
        return out if self.batch_first else out.transpose(0, 1)


class MaskedAttentionModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor, pad: Tensor) -> Tensor:
        h = self.embed(x)
        out, _ = self.attn(h, h, h, key_padding_mask=pad, need_weights=False)
        keep = (~pad).unsqueeze(-1).to(out.dtype)
        return self.head((torch.tanh(out) * keep).sum(dim=1) / keep.sum(dim=1))


@seeded
def build_mha_padding(red: str = "mean") -> Setup:
    lengths = cycled([5, 2, 4, 1, 3, 5])
    pad = torch.arange(5)[None, :] >= lengths[:, None]  # True = padding
    return Setup(MaskedAttentionModel(), (randn(N, 5, 4), pad, labels(N)), ce_loss(red))


class CrossAttentionModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.attn = nn.MultiheadAttention(8, 2, kdim=5, vdim=6, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor, k: Tensor, v: Tensor) -> Tensor:
        out, _ = self.attn(self.embed(x), k, v, need_weights=False)
        return self.head(torch.tanh(out).mean(dim=1))


@seeded
def build_mha_kdim_vdim(red: str = "mean") -> Setup:
    tensors = (randn(N, 4, 4), randn(N, 3, 5, seed=8), randn(N, 3, 6, seed=9), labels(N))
    return Setup(CrossAttentionModel(), tensors, ce_loss(red))


class DecoderModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.mem = nn.Linear(5, 8)
        layer = nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.decoder = nn.TransformerDecoder(layer, 1)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor, memory: Tensor) -> Tensor:
        T = x.shape[1]
        causal = nn.Transformer.generate_square_subsequent_mask(T, dtype=x.dtype)
        h = self.decoder(self.embed(x), self.mem(memory), tgt_mask=causal, tgt_is_causal=True)
        return self.head(h.mean(dim=1))


@seeded
def build_decoder(red: str = "mean") -> Setup:
    return Setup(DecoderModel(), (randn(N, 5, 4), randn(N, 3, 5, seed=8), labels(N)), ce_loss(red))


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.mix = nn.Linear(8, 8)
        self.decoder = nn.Linear(8, 20, bias=False)
        self.decoder.weight = self.emb.weight  # the same Parameter object

    def forward(self, ids: Tensor) -> Tensor:
        return self.decoder(torch.tanh(self.mix(self.emb(ids))))


@seeded
def build_tied(red: str = "mean") -> Setup:
    return Setup(TiedLM(), (randint(20, N, 5), randint(20, N, 5, seed=7)), token_loss(red))


@seeded
def build_compiled(red: str = "mean") -> Setup:
    module = mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = torch.compile(module, backend="eager")  # dynamo's wrapper and tracing; no inductor compile time
    return Setup(compiled, (randn(N, 6), labels(N)), ce_loss(red), module=module)


class SparseEmbeddingClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.sparse_lookup = nn.Embedding(20, 8, sparse=True)
        self.head = nn.Linear(8, 3)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(torch.tanh(self.sparse_lookup(ids)).mean(dim=1))


@seeded
def build_sparse(red: str = "mean") -> Setup:
    return Setup(SparseEmbeddingClassifier(), (randint(20, N, 5), labels(N)), ce_loss(red))


# ------------------------------------------------------------------------------------------------------------
# The zoo
# ------------------------------------------------------------------------------------------------------------
def _cases() -> list[Case]:
    P = partial
    cases = [
        # -- A. data released outside the mechanism -----------------------------------------------------
        Case("emb_max_norm", "A", build_emb_max_norm, EXACT_OR_REFUSED, ("renorm_lookup", "Embedding"),
             "Embedding(max_norm=1) renormalises looked-up rows in place: refuse, or be exact without changing the weight"),
        Case("running_mean_buffer", "A", build_running_buffer, REFUSED, ("stat_tracker", "RunningCenter"),
             "a buffer updated from the batch in forward releases batch statistics outside the mechanism; refuse with no state change"),
        Case("frozen_param_updated_from_batch", "A", build_ema_codebook, REFUSED, ("ema_codes", "EmaCodebook"),
             "a frozen parameter moved towards the batch mean inside forward (EMA codebook): refuse with no state change"),
        Case("optimizer_extra_param", "A", build_optimizer_extra_param, REFUSED, (),
             "the optimizer holds a learnable temperature used in the loss but absent from the model: its gradient would be non-private",
             refuse_at="make_private"),
        Case("eval_mode_during_step", "A", P(build_mlp), REFUSED, (),
             "model_p.eval() during the step: no private gradient was computed; optimizer.step() must refuse",
             drive="eval", refusal_types=(dpclip.EngineUsageError,)),
        Case("step_without_backward", "A", P(build_mlp), REFUSED, (),
             "forward, no loss.backward(), optimizer.step(): must refuse (not release zeros + noise as if clipped)",
             drive="no_backward"),
        Case("bn_fixed_after_optimizer", "A", build_bn_fixed_after_optimizer, REFUSED, ("bn_layer", "GroupNorm"),
             "optimizer built before fix_model replaced BatchNorm: it lacks GroupNorm's parameters (and holds BatchNorm's)",
             refuse_at="make_private"),
        Case("bn_raw", "A", build_bn_raw, REFUSED, ("bn_layer", "BatchNorm1d"),
             "BatchNorm mixes examples: refused at make_private", refuse_at="make_private"),
        Case("bn_frozen_pretrained", "A", build_frozen_batchnorm, EXACT, (),
             "BatchNorm2d and BatchNorm1d(affine=False) with pretrained statistics after "
             "fix_model(batchnorm='freeze'): fixed per-channel affine maps, trained in training mode"),
        Case("unwrapped_module_forward", "A", P(build_mlp), EXACT_OR_REFUSED, (),
             "model_p.module(x) in train mode then backward: refused, or p.grad stays None (no non-private gradient)",
             drive="unwrapped"),
        Case("foreign_tensor_same_size", "A", P(build_mlp), REFUSED, (),
             "model_p(torch.randn_like(x)) instead of the loader's batch: must refuse", drive="foreign",
             refusal_types=(dpclip.EngineUsageError,)),
        # -- B. per-example layout -------------------------------------------------------------------------
        Case("tenc_time_major_T_eq_B", "B", P(build_tenc_time_major, 6), EXACT_OR_REFUSED,
             ("embed_tm", "encoder_tm", "TransformerEncoder", "TimeMajorEncoder"),
             "stock TransformerEncoder(batch_first=False), inputs [T, B, d] with T == B = 6"),
        Case("tenc_time_major_T_ne_B", "B", P(build_tenc_time_major, 4), EXACT_OR_REFUSED,
             ("embed_tm", "encoder_tm", "TransformerEncoder", "TimeMajorEncoder"),
             "stock TransformerEncoder(batch_first=False), inputs [T, B, d] with T = 4 != B = 6"),
        Case("tenc_time_major_collate_T_eq_B", "B", P(build_tenc_time_major_collate, 6), EXACT_OR_REFUSED,
             ("embed_tm", "encoder_tm", "TransformerEncoder", "TimeMajorEncoder"),
             "the loader's collate_fn yields time-major [T, B, d]; the model gets exactly that batch; T == B = 6"),
        Case("tenc_time_major_collate_T_ne_B", "B", P(build_tenc_time_major_collate, 4), EXACT_OR_REFUSED,
             ("embed_tm", "encoder_tm", "TransformerEncoder", "TimeMajorEncoder"),
             "the loader's collate_fn yields time-major [T, B, d]; T = 4 != B = 6"),
        Case("linear_after_transpose_T_eq_B", "B", P(build_linear_after_transpose, 6), EXACT_OR_REFUSED,
             ("fc_t", "TransposeThenLinear"), "Linear on x.transpose(0, 1) ([T, B, d]), T == B"),
        Case("linear_after_transpose_T_ne_B", "B", P(build_linear_after_transpose, 4), EXACT_OR_REFUSED,
             ("fc_t", "TransposeThenLinear"), "Linear on x.transpose(0, 1) ([T, B, d]), T != B"),
        Case("gpt_positions_T_eq_B", "B", P(build_gpt_positions, 6), EXACT_OR_REFUSED, ("pos_table", "GPTStyle"),
             "learned position embeddings over torch.arange(T) added to token embeddings, T == B"),
        Case("gpt_positions_T_ne_B", "B", P(build_gpt_positions, 4), EXACT_OR_REFUSED, ("pos_table", "GPTStyle"),
             "learned position embeddings over torch.arange(T) added to token embeddings, T != B"),
        Case("bert_position_ids_buffer", "B", P(build_bert_positions, False), EXACT_OR_REFUSED,
             ("pos_table", "BertStylePositions"), "position_ids buffer of shape [1, T] (BERT style)"),
        Case("bert_position_ids_argument", "B", P(build_bert_positions, True), EXACT_OR_REFUSED,
             ("pos_table", "BertStylePositions"), "position_ids [1, T] passed as a forward argument"),
        Case("linear_on_position_table_T_eq_B", "B", P(build_table_proj, 6), EXACT_OR_REFUSED,
             ("pos_proj", "TableProj"), "a Linear applied to a learned [T, d] table (not the batch), T == B"),
        Case("layer_on_part_of_batch", "B", build_routed_subset, EXACT_OR_REFUSED, ("routed", "RoutedSubset"),
             "a Linear applied to the rows x[chosen] only (routing); per-example function, batch-dependent layer input"),
        Case("rows_selected_by_mask", "B", build_selected_tokens, EXACT_OR_REFUSED, ("head", "SelectedTokenHead"),
             "head(h[mask]) summed back with index_add: rows line up with the examples on the probe only "
             "(test_oracle_models_wide runs it past the probe, where the every-row check must refuse it)"),
        Case("cls_pooling", "B", build_cls_pooling, EXACT, (), "head(h[:, 0])"),
        Case("last_token_gather", "B", build_last_token, EXACT, (), "h[torch.arange(B), lengths - 1]"),
        Case("trimmed_to_probe_size", "B", build_trimmed_tokens, {"vmap": EXACT_OR_REFUSED}, ("TrimmedTokens",),
             "trims the padded batch to its longest sequence, 7 tokens, the first probe size (vmap cannot batch "
             "the data-dependent length; the probe size avoids the shapes the layers see)"),
        Case("linear_on_reshape_BT", "B", build_reshape_bt, EXACT_OR_REFUSED, ("flat_fc", "FlattenedTokens"),
             "Linear on x.reshape(B*T, d), reshaped back"),
        Case("batch_mean_mixing", "B", build_batch_mixing, REFUSED, ("batch_centre", "BatchCentre", "MixesBatch"),
             "subtracts the batch mean of an activation (mixes examples without BatchNorm): must be refused"),
        Case("random_forward_reparameterised", "B", build_reparameterised, REFUSED, ("Reparameterised",),
             "draws torch.randn_like in forward (a VAE's latent sample): refused as random, naming where the draw "
             "is (the model's own forward) and the op"),
        Case("batch_flip_mixing", "B", P(build_batch_mixing, mixer=BatchFlip), REFUSED, ("batch_centre", "BatchFlip"),
             "reverses the batch order of an activation (leaves example 0's row as it was on a cycled probe): "
             "refused, naming the layer"),
        Case("time_major_outputs_T_eq_B", "B", P(build_time_major_out, 6), EXACT_OR_REFUSED, ("TimeMajorOut",),
             "returns [T, B, C]; the loss transposes back; T == B"),
        Case("time_major_outputs_T_ne_B", "B", P(build_time_major_out, 4), EXACT_OR_REFUSED, ("TimeMajorOut",),
             "returns [T, B, C]; the loss transposes back; T != B"),
        Case("shared_table_arg_T_eq_B", "B", P(build_table_arg, 6), EXACT_OR_REFUSED, ("TableArg",),
             "a shared [T, T] table passed as a forward argument, T == B"),
        Case("shared_table_arg_T_ne_B", "B", P(build_table_arg, 4), EXACT_OR_REFUSED, ("TableArg",),
             "a shared [T, T] table passed as a forward argument, T != B"),
        # -- C. utility correctness -------------------------------------------------------------------------
        Case("manual_weight_tying", "C", build_manual_tie, EXACT, (), "logits = h @ emb.weight.T in the parent's forward"),
        Case("parent_reads_bias", "C", build_parent_reads_bias, EXACT, (), "fc(x) + 2 * fc.bias in the parent"),
        Case("no_grad_layer_inside_forward", "C", build_no_grad_inside, EXACT, (),
             "a trainable Linear run under torch.no_grad() inside forward (its gradient is 0)"),
        Case("inplace_relu_after_first_layer", "C", build_inplace_relu, EXACT, (), "h = fc1(x); h.relu_()"),
        Case("user_forward_hook_rescale", "C", build_user_hook, EXACT, (),
             "register_forward_hook(lambda m, i, o: o * 2) on the first layer, before make_private"),
        Case("keyword_call", "C", build_keyword_call, EXACT, (), "fc(input=x)"),
        Case("embedding_scale_grad_by_freq", "C", P(build_embedding, scale_grad_by_freq=True), EXACT, (),
             "the gradient is scaled by each token's frequency in the example alone"),
        Case("embedding_padding_idx", "C", P(build_embedding, padding_idx=0), EXACT, (),
             "padding row 0 gets no gradient"),
        Case("requires_grad_off_after_make_private", "C", P(build_requires_grad_toggle, False), EXACT_OR_REFUSED,
             ("fc1",), "fc1.weight frozen after make_private: the oracle uses the new trainable set"),
        Case("requires_grad_on_after_make_private", "C", P(build_requires_grad_toggle, True), EXACT_OR_REFUSED,
             ("fc1",), "fc1.weight unfrozen after make_private: the oracle uses the new trainable set"),
        Case("checkpoint_reentrant", "C", P(build_checkpoint, True), EXACT_OR_REFUSED, ("ckpt_block", "Checkpointed"),
             "torch.utils.checkpoint(use_reentrant=True) inside forward"),
        Case("checkpoint_non_reentrant", "C", P(build_checkpoint, False), EXACT_OR_REFUSED,
             ("ckpt_block", "Checkpointed"), "torch.utils.checkpoint(use_reentrant=False) inside forward"),
        Case("weight_norm_parametrization", "C", build_weight_norm, EXACT, (),
             "torch.nn.utils.parametrizations.weight_norm(Linear)"),
        Case("linear_used_twice", "C", build_used_twice, EXACT, (), "one Linear applied twice in forward"),
        Case("frozen_first_layer", "C", build_frozen_layer, EXACT, (), "requires_grad=False on the first layer"),
        # -- D. used to raise torch-internal errors ------------------------------------------------------
        *[
            Case(f"{kind}_raw", "D", P(build_recurrent, kind), EXACT_OR_REFUSED, ("seq_rnn", cls.__name__),
                 f"stock nn.{cls.__name__}" + (" (2 layers, bidirectional)" if kind == "lstm" else ""))
            for kind, cls in _RNN_TYPES.items()
        ],
        *[
            Case(f"{kind}_fix_model", "D", P(build_recurrent, kind, fix=True), EXACT, (),
                 f"nn.{cls.__name__} after dpclip.fix_model (dpclip.recurrent)", requires="dpclip.recurrent")
            for kind, cls in _RNN_TYPES.items()
        ],
        *[
            Case(f"{kind}_cell_loop", "D", P(build_cell_loop, kind), {"vmap": EXACT_OR_REFUSED} if kind == "lstm" else EXACT,
                 ("cell", cls.__name__), f"nn.{cls.__name__} stepped in forward (hx=None first)"
                 + ("; torch has no vmap batching rule for lstm_cell" if kind == "lstm" else ""))
            for kind, cls in _CELL_TYPES.items()
        ],
        Case("lstm_cell_initial_state_no_bias", "D", P(build_cell_loop, "lstm", True, bias=False),
             {"auto": EXACT, "layerwise": EXACT, "vmap": EXACT_OR_REFUSED}, ("cell", "LSTMCell"),
             "nn.LSTMCell(bias=False) from a state a Linear makes (hx=(h0, c0))"),
        Case("pair_state_cell_loop", "D", P(build_cell_loop, "pair"), {"layerwise": EXACT}, ("cell", "PairStateCell"),
             "a user's cell taking its state as a tuple (h, c), None on the first step: the fast path's per-layer "
             "fallback runs it (each tensor inside the tuple cut per example)", modes=(*MODES, "layerwise")),
        Case("rnn_relu_cell_initial_state", "D", P(build_cell_loop, "rnn", True, nonlinearity="relu"), EXACT,
             ("cell", "RNNCell"), "nn.RNNCell(nonlinearity='relu') from a state a Linear makes"),
        Case("packed_lstm_raw", "D", P(build_recurrent, "lstm", packed=True), EXACT_OR_REFUSED, ("seq_rnn", "LSTM"),
             "pack_padded_sequence → nn.LSTM inside forward"),
        Case("packed_lstm_fix_model", "D", P(build_recurrent, "lstm", packed=True, fix=True),
             {"auto": EXACT, "vmap": EXACT_OR_REFUSED, "layerwise": EXACT}, ("seq_rnn", "LSTM", "pack_padded_sequence"),
             "packed LSTM after fix_model: the vmap path may refuse packing inside the model (documented)",
             requires="dpclip.recurrent"),
        Case("bert_full", "D", P(build_bert, False), EXACT_OR_REFUSED, ("Bert", "bert."),
             "tiny BertForSequenceClassification (eager attention, float64), 2-D attention_mask, full fine-tuning"),
        Case("bert_lora", "D", P(build_bert, True), EXACT_OR_REFUSED, ("Bert", "bert.", "lora", "Lora"),
             "tiny BERT with peft LoRA on query/value"),
        Case("gpt2_full", "D", P(build_gpt2, False), EXACT_OR_REFUSED, ("GPT2", "Conv1D", "transformer.", "lm_head"),
             "tiny GPT2LMHeadModel (transformers Conv1D), default config (use_cache=True: the output holds a DynamicCache), LM loss per example from the logits"),
        Case("gpt2_full_no_cache", "D", P(build_gpt2, False, use_cache=False), EXACT_OR_REFUSED,
             ("GPT2", "Conv1D", "transformer.", "lm_head"), "as gpt2_full with use_cache=False (no DynamicCache output)"),
        Case("gpt2_lora", "D", P(build_gpt2, True), EXACT_OR_REFUSED,
             ("GPT2", "Conv1D", "transformer.", "lm_head", "lora", "Lora"), "tiny GPT-2 with peft LoRA on c_attn"),
        Case("llama_full", "D", P(build_llama, False), EXACT_OR_REFUSED, ("Llama", "model.layers", "lm_head"),
             "tiny LlamaForCausalLM (RMSNorm, rotary, GQA), use_cache=False"),
        Case("llama_lora", "D", P(build_llama, True), EXACT_OR_REFUSED,
             ("Llama", "model.layers", "lm_head", "lora", "Lora"), "tiny Llama with peft LoRA on q_proj/v_proj"),
        Case("sparse_embedding", "D", build_sparse, EXACT_OR_REFUSED, ("sparse_lookup", "Embedding"),
             "nn.Embedding(sparse=True)"),
        Case("autocast_bf16", "D", build_autocast, EXACT_OR_REFUSED, (),
             "torch.autocast('cpu', bfloat16) around the forward; tolerance 3e-2 (bf16)", tol=3e-2),
        # -- L. layers and settings that already work --------------------------------------------------------
        Case("conv1d", "L", P(build_conv, lambda: nn.Conv1d(3, 4, 3), (3, 10)), EXACT),
        Case("conv2d", "L", P(build_conv, lambda: nn.Conv2d(2, 4, 3, padding=1), (2, 6, 6)), EXACT),
        Case("conv3d", "L", P(build_conv, lambda: nn.Conv3d(2, 3, 3), (2, 4, 4, 4)), EXACT),
        Case("conv_transpose2d", "L", P(build_conv, lambda: nn.ConvTranspose2d(2, 3, 3, stride=2), (2, 4, 4)), EXACT),
        Case("conv2d_grouped", "L", P(build_conv, lambda: nn.Conv2d(4, 6, 3, groups=2), (4, 5, 5)), EXACT),
        Case("conv2d_dilated_strided", "L",
             P(build_conv, lambda: nn.Conv2d(2, 4, 3, stride=2, dilation=2, padding=2), (2, 7, 7)), EXACT),
        Case("conv_on_patches", "L",  # T ≤ C_out: the weight gradient on the input's patches (ConvPatches)
             P(build_conv, lambda: nn.Sequential(nn.Conv2d(2, 10, 3, stride=2), nn.Tanh(),
                                                 nn.Conv2d(10, 12, 2, padding=1, dilation=2)), (2, 7, 7)), EXACT),
        Case("conv2d_reflect", "L",
             P(build_conv, lambda: nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect"), (2, 5, 5)), EXACT),
        Case("conv2d_padding_same", "L", P(build_conv, lambda: nn.Conv2d(2, 4, 3, padding="same"), (2, 5, 5)), EXACT),
        Case("layernorm", "L", P(build_token_model, lambda: nn.LayerNorm(8)), EXACT),
        Case("groupnorm", "L",
             P(build_conv, lambda: nn.Sequential(nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4)), (2, 5, 5)), EXACT),
        Case("rmsnorm", "L", P(build_token_model, lambda: nn.RMSNorm(8)), EXACT),
        Case("instancenorm_affine", "L",
             P(build_conv, lambda: nn.Sequential(nn.Conv2d(2, 4, 3), nn.InstanceNorm2d(4, affine=True)), (2, 5, 5)),
             EXACT, notes="InstanceNorm2d(affine=True, track_running_stats=False)"),
        Case("mha_batch_first", "L", P(build_token_model, lambda: SelfAttention(True)), EXACT),
        Case("mha_time_major_internal_T_ne_B", "L", P(build_token_model, lambda: SelfAttention(False), T=5), EXACT,
             notes="MultiheadAttention(batch_first=False); the model transposes to [T, B, d] around it"),
        Case("mha_time_major_internal_T_eq_B", "L", P(build_token_model, lambda: SelfAttention(False), T=6), EXACT,
             notes="as above with T == B"),
        Case("mha_key_padding_mask", "L", build_mha_padding, EXACT),
        Case("mha_kdim_vdim", "L", build_mha_kdim_vdim, EXACT),
        Case("transformer_encoder_batch_first", "L", P(build_token_model, lambda: nn.TransformerEncoder(
            nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 2, enable_nested_tensor=False)), EXACT),
        Case("transformer_decoder_batch_first", "L", build_decoder, EXACT,
             notes="TransformerDecoder(batch_first=True) with a causal tgt_mask built inside forward"),
        Case("tied_embedding_decoder", "L", build_tied, EXACT, notes="decoder.weight is emb.weight (same Parameter)"),
        Case("mlp_dropout_p0", "L", P(build_mlp, dropout=0.0), EXACT, notes="nn.Dropout(p=0.0) in the model"),
        Case("mlp_mean", "L", P(build_mlp), EXACT),
        Case("mlp_sum", "L", P(build_mlp, "sum"), EXACT, loss_reduction="sum"),
        Case("conv2d_sum", "L", P(build_conv, lambda: nn.Conv2d(2, 4, 3, padding=1), (2, 6, 6), "sum"), EXACT,
             loss_reduction="sum"),
        Case("embedding_plain", "L", P(build_embedding), EXACT),
        Case("mlp_l1", "L", P(build_mlp), EXACT, options=dict(norm="l1"), notes="norm='l1': the oracle clips the L1 norm"),
        Case("conv_l1", "L", P(build_conv, lambda: nn.Conv2d(2, 4, 3, padding=1), (2, 6, 6)), EXACT,
             options=dict(norm="l1")),
        Case("mlp_per_layer", "L", P(build_mlp), EXACT, options=dict(per_layer=True),
             notes="per_layer=True: each parameter clipped to C/sqrt(#params)"),
        Case("attention_per_layer", "L", P(build_token_model, lambda: SelfAttention(True)), EXACT,
             options=dict(per_layer=True)),
        Case("mlp_per_layer_l1", "L", P(build_mlp), EXACT, options=dict(per_layer=True, norm="l1"),
             notes="per_layer with L1: each parameter clipped to C/#params in L1"),
        Case("mlp_median_clipping", "L", P(build_mlp), EXACT, options=dict(clipping="median"),
             notes="clipping='median': the first step clips at the initial C"),
        Case("mlp_micro_batches", "L", P(build_mlp, n=10), EXACT, options=dict(max_physical_batch_size=4),
             notes="N = 10 in micro-batches of 4, 4, 2; one noisy step"),
        Case("transformer_micro_batches", "L", P(build_token_model, lambda: nn.TransformerEncoder(
            nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 1, enable_nested_tensor=False)),
             EXACT, options=dict(max_physical_batch_size=4)),
        Case("empty_batch_sum", "L", P(build_mlp, "sum"), EXACT, loss_reduction="sum", sample_rate=1e-5,
             notes="q = 1e-5: the batch is empty; the release is noise only (σ·C/(qN) = 1e-7·C/N per unit normal)"),
        Case("empty_batch_mean", "L", P(build_mlp), EXACT, sample_rate=1e-5,
             notes="as above with loss_reduction='mean' (the user's loss is NaN on an empty batch)"),
        Case("size1_batch", "L", P(build_mlp, n=1), EXACT, notes="N = 1"),
        Case("conv_size1_batch", "L", P(build_conv, lambda: nn.Conv2d(2, 4, 3, padding=1), (2, 6, 6), n=1), EXACT),
        Case("mlp_float64", "L", P(build_mlp, dtype=torch.float64), EXACT),
        Case("torch_compile", "L", build_compiled, EXACT_OR_REFUSED, ("OptimizedModule", "_orig_mod", "compile"),
             "torch.compile(model, backend='eager') handed to make_private (OptimizedModule; inductor left out for time)"),
    ]
    names = [c.name for c in cases]
    assert len(names) == len(set(names)), "duplicate case names"
    return cases


CASES = _cases()
CASES_BY_NAME = {c.name: c for c in CASES}


# ------------------------------------------------------------------------------------------------------------
# Oracle
# ------------------------------------------------------------------------------------------------------------
def _trainable(module: nn.Module) -> dict[str, Tensor]:
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


def oracle_per_example(setup: Setup) -> list[dict[str, Tensor]]:
    """gᵢ for every example of the data set: a fresh deep copy of the original model per example, batch of 1."""
    source = setup.module if setup.module is not None else setup.model
    grads = []
    n = setup.tensors[0].shape[0]
    for i in range(n):
        model = copy.deepcopy(source)
        if setup.after_wrap is not None:
            setup.after_wrap(model)
        params = _trainable(model)
        for p in params.values():
            if not p.is_leaf:  # a deep-copied torch.jit.trace module's parameters: .grad only when retained
                p.retain_grad()
        if setup.collate_fn is not None:
            batch = list(setup.collate_fn([tuple(t[i] for t in setup.tensors)]))
        else:
            batch = [t[i : i + 1] for t in setup.tensors]
        loss = setup.loss(model, batch)
        loss.backward()  # not autograd.grad: a reentrant checkpoint refuses it; the copy's .grad starts empty
        grads.append(
            {
                name: (torch.zeros_like(p) if p.grad is None else (p.grad.to_dense() if p.grad.is_sparse else p.grad))
                .detach()
                .double()
                for name, p in params.items()
            }
        )
    if setup.optimizer is not None:  # tensors shared with the loss (not deep-copied) may have received a gradient
        for group in setup.optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
    return grads


def _norm(values: list[Tensor], norm: str) -> float:
    if norm == "l2":
        return math.sqrt(sum(float(v.square().sum()) for v in values))
    return sum(float(v.abs().sum()) for v in values)


def choose_bound(per_example: list[dict[str, Tensor]], norm: str) -> float:
    """C between the two middle per-example norms (about half the examples clipped, no ties at C)."""
    norms = sorted(_norm(list(g.values()), norm) for g in per_example)
    norms = [n for n in norms if math.isfinite(n) and n > 0]
    if not norms:
        return 1.0
    if len(norms) == 1:
        return norms[0] / 2
    k = len(norms) // 2
    return math.sqrt(norms[k - 1] * norms[k]) if norms[k - 1] > 0 else norms[k] / 2


def oracle_release(per_example: list[dict[str, Tensor]], C: float, norm: str, per_layer: bool) -> dict[str, Tensor]:
    """Σᵢ clip(gᵢ, C) over the given examples (float64); the caller divides by q·N."""
    total: dict[str, Tensor] = {}
    for g in per_example:
        if per_layer:
            k = len(g)
            bound = C / math.sqrt(k) if norm == "l2" else C / k
            clipped = {name: v * min(1.0, bound / max(_norm([v], norm), 1e-300)) for name, v in g.items()}
        else:
            factor = min(1.0, C / max(_norm(list(g.values()), norm), 1e-300))
            clipped = {name: v * factor for name, v in g.items()}
        for name, v in clipped.items():
            total[name] = total[name] + v if name in total else v.clone()
    return total


# ------------------------------------------------------------------------------------------------------------
# Running one case
# ------------------------------------------------------------------------------------------------------------
def _state(module: nn.Module) -> dict[str, Tensor]:
    state = {f"param:{n}": p.detach().clone() for n, p in module.named_parameters(remove_duplicate=False)}
    state.update({f"buffer:{n}": b.detach().clone() for n, b in module.named_buffers(remove_duplicate=False)})
    return state


def _state_changes(before: dict[str, Tensor], module: nn.Module) -> list[str]:
    after = _state(module)
    changed = sorted(set(before) ^ set(after))
    for key in sorted(set(before) & set(after)):
        a, b = before[key], after[key]
        if a.shape != b.shape or a.dtype != b.dtype or not torch.equal(a, b):
            changed.append(key)
    return changed


def _first_line(error: BaseException, limit: int = 160) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:limit]}{'…' if len(text) > limit else ''}"


def classify_error(case: Case, error: BaseException, stage: str) -> Result:
    if isinstance(error, case.refusal_types):
        problems = []
        message = str(error)
        if case.culprits and not any(c in message for c in case.culprits):
            problems.append(f"the refusal does not name the module (any of {', '.join(case.culprits)})")
        if case.refuse_at == "make_private" and stage != "make_private":
            problems.append("should be refused by make_private itself")
        return Result("refused", _first_line(error), problems, stage=stage, error=error)
    if isinstance(error, PROPER_ERRORS):  # a dpclip refusal of another type than this case requires
        return Result("refused", _first_line(error), [f"expected {', '.join(t.__name__ for t in case.refusal_types)}"],
                      stage=stage, error=error)
    where = ""
    tb = traceback.extract_tb(error.__traceback__)
    if tb:
        frame = tb[-1]
        where = f" [{frame.filename.split('site-packages/')[-1].split('/work/main/')[-1]}:{frame.lineno}]"
    return Result("torch error", _first_line(error) + where, stage=stage, error=error)


def _foreign(batch: list[Tensor]) -> list[Tensor]:
    return [torch.randn_like(t) if t.is_floating_point() else t for t in batch]


def run_case(case: Case, mode: str) -> Result:
    """Run ``case`` through the public API on grad_sample_mode ``mode``; compare with the oracle."""
    start = time.perf_counter()
    try:
        setup = case.build()
    except Exception as error:  # noqa: BLE001
        return Result("harness error", f"the factory failed: {_first_line(error)}", seconds=time.perf_counter() - start)
    try:
        result = _run_case(case, mode, setup)
    except _HarnessError as error:
        result = Result("harness error", str(error))
    if setup.notes:
        result.detail = "; ".join([*setup.notes, result.detail]) if result.detail else "; ".join(setup.notes)
    result.seconds = time.perf_counter() - start
    return result


class _HarnessError(Exception):
    pass


def _run_case(case: Case, mode: str, setup: Setup) -> Result:
    module = setup.module if setup.module is not None else setup.model
    norm = case.options.get("norm", "l2")
    per_layer = bool(case.options.get("per_layer", False))
    n = setup.tensors[0].shape[0]
    q = case.sample_rate
    expected_indices = list(range(n)) if q == 1.0 else []
    try:
        per_example = oracle_per_example(setup)
    except Exception as error:  # noqa: BLE001
        if case.expected(mode) != REFUSED:
            raise _HarnessError(f"the oracle failed: {_first_line(error)}") from error
        # A case that must be refused may not even run on one example (BatchNorm in train mode): no oracle.
        per_example, oracle, C = None, None, 1.0
    if per_example is not None:
        C = choose_bound(per_example, norm)
        oracle_sum = oracle_release([per_example[i] for i in expected_indices], C, norm, per_layer)
        oracle = {name: v / (q * n) for name, v in oracle_sum.items()}
        if not expected_indices:
            oracle = {name: torch.zeros_like(v) for name, v in per_example[0].items()}
    before = _state(module)

    engine = dpclip.PrivacyEngine(seed=0)
    optimizer = setup.optimizer if setup.optimizer is not None else torch.optim.SGD(setup.model.parameters(), lr=0.0)
    dataset = TensorDataset(*setup.tensors)
    loader = DataLoader(dataset, batch_size=n, **({} if setup.collate_fn is None else {"collate_fn": setup.collate_fn}))
    stage = "make_private"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model_p, opt_p, loader_p = engine.make_private(
                setup.model, optimizer, loader, noise_multiplier=NOISE, max_grad_norm=C, sample_rate=q,
                grad_sample_mode=mode, loss_reduction=case.loss_reduction, **case.options,
            )
        if setup.after_wrap is not None:
            setup.after_wrap(module)
        received: list[list[Tensor]] = []
        problems: list[str] = []
        unwrapped_clean = False
        for batch in loader_p:
            received.append(list(batch))
            stage = "forward"
            opt_p.zero_grad()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if case.drive == "eval":
                    model_p.eval()
                    loss = setup.loss(model_p, list(batch))
                elif case.drive == "unwrapped":
                    loss = setup.loss(model_p.module, list(batch))
                elif case.drive == "foreign":
                    loss = setup.loss(model_p, _foreign(list(batch)))
                else:
                    loss = setup.loss(model_p, list(batch))
                if case.drive != "no_backward":
                    stage = "backward"
                    loss.backward()
                if case.drive == "unwrapped":
                    leaked = [name for name, p in module.named_parameters() if p.grad is not None]
                    if leaked:
                        return Result("WRONG", "non-private gradient left in p.grad after model_p.module(x).backward(): "
                                      + ", ".join(leaked[:4]), stage="backward")
                    unwrapped_clean = True
                stage = "step"
                opt_p.step()
            if engine.steps >= 1:
                break
            if len(received) > 64:
                raise _HarnessError("no step after 64 batches")
    except _HarnessError:
        raise
    except Exception as error:  # noqa: BLE001
        result = classify_error(case, error, stage)
        changes = _state_changes(before, module)
        if changes:
            result.problems.append("state changed: " + ", ".join(changes[:4]))
        return result

    # -- accepted: compare -------------------------------------------------------------------------------
    changes = _state_changes(before, module)
    if changes:
        problems.append("state changed at lr=0: " + ", ".join(changes[:4]))
    if setup.collate_fn is not None:  # one micro-batch: compare with the collated examples
        got = received[0] if len(received) == 1 else []
        want = list(setup.collate_fn([dataset[i] for i in expected_indices])) if expected_indices else got
    else:
        got = [torch.cat([b[j] for b in received]) for j in range(len(setup.tensors))] if received else []
        want = [t[expected_indices] for t in setup.tensors]
    if not got or not all(g.shape == w.shape and torch.equal(g, w) for g, w in zip(got, want)):
        raise _HarnessError("the loop did not receive the expected batch (q = 1: the whole data set in order)")
    if case.drive == "unwrapped" and unwrapped_clean:
        return Result("exact", "p.grad stayed None; the step released noise only", problems)
    if oracle is None:
        return Result("WRONG", "accepted a model that must be refused (no oracle: it does not run on one example)",
                      problems)
    released = {name: p.grad for name, p in module.named_parameters() if p.requires_grad}
    names = set(oracle) | set(released)
    if set(oracle) != set(released):
        problems.append(f"trainable set differs from the oracle's: {sorted(set(oracle) ^ set(released))[:4]}")
    stray = [name for name, p in module.named_parameters() if not p.requires_grad and p.grad is not None]
    in_model = {id(p) for p in module.parameters()}
    stray += [f"optimizer param {tuple(p.shape)}" for group in optimizer.param_groups for p in group["params"]
              if id(p) not in in_model and p.grad is not None]
    if stray:
        problems.append("gradient on a parameter outside the release: " + ", ".join(stray[:4]))
    scale = max([C / n] + [float(v.abs().max()) for v in oracle.values() if v.numel()])
    worst, worst_name, missing = 0.0, "", []
    for name in sorted(names):
        g = released.get(name)
        if g is None or name not in oracle:
            missing.append(name)
            continue
        g = g.to_dense() if g.is_sparse else g
        if g.shape != oracle[name].shape:
            missing.append(f"{name} (shape {tuple(g.shape)})")
            continue
        err = float((g.double() - oracle[name]).abs().max()) if g.numel() else 0.0
        if not math.isfinite(err):
            err = math.inf
        if err > worst or worst_name == "":
            worst, worst_name = err, name
    if missing:
        problems.append("no released gradient for " + ", ".join(missing[:4]))
    detail = f"max err {worst / scale:.2g}×scale at {worst_name} (scale {scale:.3g}, C {C:.3g})"
    if case.expected(mode) == REFUSED:
        detail = "accepted; " + detail
    if worst > case.tol * scale or missing or problems:
        return Result("WRONG", detail, [p for p in problems if not p.startswith("no released")] + (
            ["no released gradient for " + ", ".join(missing[:4])] if missing else []))
    return Result("exact", detail, problems)


def verdict(case: Case, mode: str, result: Result) -> str | None:
    """None if ``result`` meets the case's expectation on ``mode``, else the reason it does not."""
    expected = case.expected(mode)
    allowed = {EXACT: ("exact",), EXACT_OR_REFUSED: ("exact", "refused"), REFUSED: ("refused",)}[expected]
    if result.outcome not in allowed or result.problems:
        return f"{case.name} [{mode}]: expected {expected}, got {result.summary()}  ({case.notes})"
    return None


# ------------------------------------------------------------------------------------------------------------
# Table
# ------------------------------------------------------------------------------------------------------------
def format_table(results: dict[tuple[str, str], Result]) -> list[str]:
    lines = []
    width = max((len(name) for name, _ in results), default=10)
    for (name, mode), result in results.items():
        case = CASES_BY_NAME[name]
        ok = "skip" if result.outcome == "skipped" else ("ok" if verdict(case, mode, result) is None else "FAIL")
        lines.append(
            f"{case.group} {name:<{width}} {mode:<9} {case.expected(mode):<16} {ok:<4} {result.seconds:5.2f}s  "
            f"{result.summary()}"
        )
    return lines


def run_all(modes: tuple[str, ...] | None = None, names: list[str] | None = None) -> dict[tuple[str, str], Result]:
    results = {}
    for case in CASES:
        if names and case.name not in names:
            continue
        for mode in modes or case.modes:
            if case.requires is not None:
                try:
                    importlib.import_module(case.requires)
                except ImportError:
                    results[(case.name, mode)] = Result("skipped", f"needs {case.requires}")
                    continue
            results[(case.name, mode)] = run_case(case, mode)
    return results


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="case names (default: all)")
    parser.add_argument("--modes", default=None, help="comma-separated grad_sample_modes (default: each case's)")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    start = time.perf_counter()
    results = run_all(tuple(args.modes.split(",")) if args.modes else None, args.names or None)
    for line in format_table(results):
        print(line)
    counts: dict[str, int] = {}
    for r in results.values():
        counts[r.outcome] = counts.get(r.outcome, 0) + 1
    failing = sum(
        1 for (name, mode), r in results.items() if r.outcome != "skipped" and verdict(CASES_BY_NAME[name], mode, r)
    )
    print(f"\n{len(results)} runs ({len({n for n, _ in results})} cases): "
          + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
          + f"; {failing} failing; {time.perf_counter() - start:.1f} s", file=sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
