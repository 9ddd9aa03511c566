"""A second model zoo for the oracle of ``oracle_models.py``: models dpclip was not designed for.

Written as an adversarial probe (a reviewer who had not read dpclip's rules picked layers and usages a user might
hand the engine: bilinear and bag embeddings, depthwise, circular and transposed convolutions, fold/unfold, stock
recurrent layers time-major and with initial states, attention variants, parametrizations, raw parameters in
einsum/matmul, hooks and custom autograd Functions, mixing along the batch, half precision, L1 and per-layer
clipping, micro-batches and tiny batches), run through the same harness: each case must be exact against the
brute-force per-example loop or refused by a dpclip exception naming the module. ``test_oracle_models_unseen.py``
runs them; ``python -m tests.dpclip.oracle_models_unseen [case ...] [--modes=auto,vmap,layerwise]`` prints the table.

Losses are the user's (the engine never sees them): a loss that mixes examples or a mismatched ``loss_reduction``
is what ``dpclip.check_loss`` is for, and is not a case here.
"""

from __future__ import annotations

import sys
import warnings
from collections import OrderedDict
from functools import partial as P

import torch
import torch.nn as nn
import torch.nn.functional as F

import dpclip
from tests.dpclip.oracle_models import (
    EXACT, EXACT_OR_REFUSED, REFUSED, N, Case, ConvNet, Setup, TokenModel, _features, ce_loss, cycled, labels, mlp,
    randint, randn, reduce, run_case, seeded, verdict,
)

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------
@seeded
def build_conv_body(body_factory, shape, red="mean", n=None, fix=False):
    n = N if n is None else n
    body = body_factory()
    model = ConvNet(body, _features(body, shape))
    if fix:
        dpclip.fix_model(model)
    return Setup(model, (randn(n, *shape), labels(n)), ce_loss(red))


@seeded
def build_token(block_factory, T=5, red="mean"):
    return Setup(TokenModel(block_factory()), (randn(N, T, 4), labels(N)), ce_loss(red))


# ---------------------------------------------------------------------------------------------------------
# 1. Bilinear
# ---------------------------------------------------------------------------------------------------------
class BilinearModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.bil = nn.Bilinear(4, 5, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, a, b):
        return self.head(torch.tanh(self.bil(a, b)))


@seeded
def build_bilinear(red="mean"):
    return Setup(BilinearModel(), (randn(N, 4), randn(N, 5, seed=8), labels(N)), ce_loss(red))


class BilinearTokens(nn.Module):  # Bilinear on [B, T, d] inputs
    def __init__(self):
        super().__init__()
        self.bil = nn.Bilinear(4, 4, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.bil(x, x.flip(1))).mean(1))


@seeded
def build_bilinear_tokens(red="mean"):
    return Setup(BilinearTokens(), (randn(N, 5, 4), labels(N)), ce_loss(red))


# ---------------------------------------------------------------------------------------------------------
# 2. PReLU
# ---------------------------------------------------------------------------------------------------------
def prelu_conv():
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.PReLU(4))


@seeded
def build_prelu_mlp(red="mean"):
    model = nn.Sequential(nn.Linear(6, 8), nn.PReLU(), nn.Linear(8, 3))  # one shared slope
    return Setup(model, (randn(N, 6), labels(N)), ce_loss(red))


# ---------------------------------------------------------------------------------------------------------
# 3. EmbeddingBag and embedding variants
# ---------------------------------------------------------------------------------------------------------
class BagModel(nn.Module):
    def __init__(self, mode, weighted=False, offsets=False):
        super().__init__()
        self.bag = nn.EmbeddingBag(12, 8, mode=mode)
        self.weighted, self.offsets = weighted, offsets
        self.head = nn.Linear(8, 3)

    def forward(self, ids, w=None, lengths=None):
        if self.offsets:  # flat 1-D ids with offsets built from per-example lengths
            B, L = ids.shape
            keep = torch.arange(L, device=ids.device)[None, :] < lengths[:, None]
            flat = ids[keep]
            offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)[:-1]])
            h = self.bag(flat, offsets, per_sample_weights=(w[keep] if self.weighted else None))
        else:
            h = self.bag(ids, per_sample_weights=w if self.weighted else None)
        return self.head(torch.tanh(h))


@seeded
def build_bag(mode, weighted=False, offsets=False, red="mean"):
    ids = randint(12, N, 5)
    model = BagModel(mode, weighted, offsets)
    if offsets:
        lengths = cycled([5, 2, 4, 1, 3, 5])
        w = randn(N, 5, seed=9).abs()
        if weighted:
            def loss(m, batch):
                ids, w, lengths, y = batch
                return F.cross_entropy(m(ids, w, lengths), y, reduction=red)
            return Setup(model, (ids, w, lengths, labels(N)), loss)

        def loss(m, batch):
            ids, lengths, y = batch
            return F.cross_entropy(m(ids, None, lengths), y, reduction=red)
        return Setup(model, (ids, lengths, labels(N)), loss)
    if weighted:
        return Setup(model, (ids, randn(N, 5, seed=9).abs(), labels(N)), ce_loss(red))
    return Setup(model, (ids, labels(N)), ce_loss(red))


class EmbMeanLinear(nn.Module):  # embedding → mean over tokens → Linear (no nonlinearity)
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, ids):
        return self.head(self.emb(ids).mean(dim=1))


@seeded
def build_emb_mean_linear(red="mean"):
    return Setup(EmbMeanLinear(), (randint(10, N, 7), labels(N)), ce_loss(red))


class Emb1D(nn.Module):  # one token per example: ids [B]
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids)))


@seeded
def build_emb_1d(red="mean"):
    ids = cycled([0, 1, 0, 2, 1, 0])  # repeated ids across examples
    return Setup(Emb1D(), (ids, labels(N)), ce_loss(red))


# ---------------------------------------------------------------------------------------------------------
# 4. Convolution variants
# ---------------------------------------------------------------------------------------------------------
def depthwise():
    return nn.Sequential(nn.Conv2d(3, 3, 3, groups=3, bias=False), nn.Tanh(), nn.Conv2d(3, 4, 1, bias=False))


def convT1d():
    return nn.ConvTranspose1d(2, 3, 3, stride=2, output_padding=1, dilation=2, padding=1)


def convT2d_groups():
    return nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2, output_padding=1, bias=False)


class OutputSized(nn.Module):
    """A transposed convolution called with ``output_size=``: torch picks the output padding for the call (1 here,
    the module's own is 0); a grouped 1-d one whose call asks for 2 where the module says 1."""

    def __init__(self, dims: int = 2) -> None:
        super().__init__()
        self.dims = dims
        if dims == 2:
            self.up = nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1)
        else:
            self.up = nn.ConvTranspose1d(2, 4, 3, stride=3, groups=2, output_padding=1)

    def forward(self, x: Tensor) -> Tensor:
        size = [2 * n for n in x.shape[2:]] if self.dims == 2 else [3 * x.shape[-1] + 2]
        return self.up(x, output_size=size)


class LearnedMaskBias(nn.Module):
    """A learned [T, T] relative-position bias passed as nn.MultiheadAttention's float attn_mask (d = 8, T = 5)."""

    def __init__(self, T: int = 5) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.rel_bias = nn.Parameter(0.5 * torch.randn(T, T))

    def forward(self, h: Tensor) -> Tensor:
        return self.attn(h, h, h, attn_mask=self.rel_bias, need_weights=False)[0]


def circular():
    return nn.Conv2d(2, 4, 3, padding=1, padding_mode="circular")


def circular1d_replicate():
    return nn.Sequential(nn.Conv1d(2, 3, 3, padding=2, padding_mode="circular"), nn.Tanh(),
                         nn.Conv1d(3, 3, 3, padding=1, padding_mode="replicate"))


class UnfoldFold(nn.Module):
    """Unfold into 2x2 patches, a Linear on each patch, fold back."""

    def __init__(self):
        super().__init__()
        self.unfold = nn.Unfold(2, stride=2)
        self.patch_fc = nn.Linear(8, 8)
        self.fold = nn.Fold((4, 4), 2, stride=2)

    def forward(self, x):  # x [B, 2, 4, 4]
        p = self.unfold(x)  # [B, 8, 4]
        p = self.patch_fc(p.transpose(1, 2)).transpose(1, 2)
        return self.fold(p)


class ChannelsLast(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.head = nn.Linear(4 * 5 * 5, 3)

    def forward(self, x):
        x = x.contiguous(memory_format=torch.channels_last)
        return self.head(torch.tanh(self.conv(x)).flatten(1))


@seeded
def build_channels_last(red="mean", model_too=False):
    model = ChannelsLast()
    if model_too:
        model = model.to(memory_format=torch.channels_last)
    return Setup(model, (randn(N, 2, 5, 5), labels(N)), ce_loss(red))


class ConvLinearShared(nn.Module):
    """A Conv2d's weight also used (viewed) as a Linear's weight."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, bias=False)  # weight [4, 2, 3, 3] = [4, 18]
        self.head = nn.Linear(4 * 9 + 4, 3)

    def forward(self, img, vec):
        a = torch.tanh(self.conv(img)).flatten(1)  # [B, 36]
        b = torch.tanh(F.linear(vec, self.conv.weight.view(4, -1)))  # [B, 4]
        return self.head(torch.cat([a, b], 1))


@seeded
def build_conv_linear_shared(red="mean"):
    return Setup(ConvLinearShared(), (randn(N, 2, 5, 5), randn(N, 18, seed=8), labels(N)), ce_loss(red))


# ---------------------------------------------------------------------------------------------------------
# 5. Recurrent variants
# ---------------------------------------------------------------------------------------------------------
class TimeMajorRNN(nn.Module):
    def __init__(self, kind, fix):
        super().__init__()
        cls = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[kind]
        kw = dict(nonlinearity="relu") if kind == "rnn" else {}
        self.seq_rnn = cls(4, 5, num_layers=2, bidirectional=True, batch_first=False, **kw)
        self.head = nn.Linear(10, 3)

    def forward(self, x):  # x [B, T, 4] from the loader; transposed for the time-major RNN
        out, _ = self.seq_rnn(x.transpose(0, 1))
        return self.head(out[-1])


@seeded
def build_time_major_rnn(kind, fix=False, T=5, red="mean"):
    model = TimeMajorRNN(kind, fix)
    if fix:
        dpclip.fix_model(model)
    return Setup(model, (randn(N, T, 4), labels(N)), ce_loss(red))


class LSTMWithState(nn.Module):
    """batch_first LSTM given an initial state computed from the input (h0 layout [layers, B, H])."""

    def __init__(self):
        super().__init__()
        self.init_h = nn.Linear(4, 5)
        self.seq_rnn = nn.LSTM(4, 5, batch_first=True)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h0 = torch.tanh(self.init_h(x[:, 0])).unsqueeze(0)  # [1, B, 5]
        out, (hn, cn) = self.seq_rnn(x, (h0, torch.zeros_like(h0)))
        return self.head(hn[-1])


@seeded
def build_lstm_with_state(fix, red="mean"):
    model = LSTMWithState()
    if fix:
        dpclip.fix_model(model)
    return Setup(model, (randn(N, 5, 4), labels(N)), ce_loss(red))


# ---------------------------------------------------------------------------------------------------------
# 6. Attention variants
# ---------------------------------------------------------------------------------------------------------
class MHAVariant(nn.Module):
    def __init__(self, need_weights=False, attn_mask=False, bias_kv=False, zero_attn=False, use_weights=False):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True, add_bias_kv=bias_kv, add_zero_attn=zero_attn)
        self.need_weights, self.use_mask, self.use_weights = need_weights, attn_mask, use_weights

    def forward(self, h):
        T = h.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(T, dtype=h.dtype) if self.use_mask else None
        out, w = self.attn(h, h, h, attn_mask=mask, need_weights=self.need_weights)
        if self.use_weights:
            out = out + w.mean(-1, keepdim=True)  # the averaged attention weights feed the output
        return out


class PerExampleMask(nn.Module):
    """A per-example attention mask [B, T, T], expanded to MHA's [B*heads, T, T] layout."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x, mask):  # mask [B, T, T] bool, True = blocked
        B, T = mask.shape[:2]
        m3 = mask.repeat_interleave(2, dim=0)  # [B*2, T, T]
        h = self.embed(x)
        out, _ = self.attn(h, h, h, attn_mask=m3, need_weights=False)
        return self.head(torch.tanh(out).mean(1))


@seeded
def build_per_example_mask(red="mean"):
    T = 5
    lengths = cycled([5, 2, 4, 1, 3, 5])
    keyok = torch.arange(T)[None, :] < lengths[:, None]
    mask = ~keyok[:, None, :].expand(N, T, T).clone()  # block padded keys
    return Setup(PerExampleMask(), (randn(N, T, 4), mask, labels(N)), ce_loss(red))


class SelfMemoryDecoder(nn.Module):
    def __init__(self, norm_first):
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.dec = nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0, batch_first=True, norm_first=norm_first,
                                              activation="gelu")
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.embed(x)
        return self.head(self.dec(h, h).mean(1))  # memory = the same tensor as the target


@seeded
def build_self_memory_decoder(norm_first, red="mean"):
    return Setup(SelfMemoryDecoder(norm_first), (randn(N, 5, 4), labels(N)), ce_loss(red))


# ---------------------------------------------------------------------------------------------------------
# 7. Norm variants
# ---------------------------------------------------------------------------------------------------------
def ln_variants():
    return nn.Sequential(nn.LayerNorm(8, elementwise_affine=False), nn.Linear(8, 8), nn.LayerNorm(8, bias=False))


def groupnorm_one_group():
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.GroupNorm(1, 4))


@seeded
def build_bn_eval(red="mean"):
    model = nn.Sequential(OrderedDict(fc1=nn.Linear(6, 8), bn_layer=nn.BatchNorm1d(8), act=nn.Tanh(),
                                      fc2=nn.Linear(8, 3)))
    model.bn_layer.running_mean.normal_()  # non-trivial frozen statistics
    model.bn_layer.running_var.uniform_(0.5, 2.0)
    model.bn_layer.eval()  # frozen statistics: per-example separable
    return Setup(model, (randn(N, 6), labels(N)), ce_loss(red))


@seeded
def build_bn_no_running_stats(red="mean"):
    model = nn.Sequential(OrderedDict(fc1=nn.Linear(6, 8), bn_layer=nn.BatchNorm1d(8, track_running_stats=False),
                                      act=nn.Tanh(), fc2=nn.Linear(8, 3)))
    return Setup(model, (randn(N, 6), labels(N)), ce_loss(red))


# ---------------------------------------------------------------------------------------------------------
# 8. Layout / raw parameter use
# ---------------------------------------------------------------------------------------------------------
class Linear4D(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc4 = nn.Linear(4, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):  # [B, A, T, 4]
        return self.head(torch.tanh(self.fc4(x)).mean(dim=(1, 2)))


@seeded
def build_linear_4d(red="mean"):
    return Setup(Linear4D(), (randn(N, 3, 5, 4), labels(N)), ce_loss(red))


class RawParams(nn.Module):
    """Parameters used directly: F.linear, einsum, matmul and a per-feature scale."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(8, 6) * 0.3)
        self.b1 = nn.Parameter(torch.zeros(8))
        self.w2 = nn.Parameter(torch.randn(8, 8) * 0.3)
        self.alpha = nn.Parameter(torch.ones(8) * 1.5)
        self.gain = nn.Parameter(torch.tensor(0.7))
        self.w3 = nn.Parameter(torch.randn(8, 3) * 0.3)

    def forward(self, x):
        h = torch.tanh(F.linear(x, self.w1, self.b1))
        h = torch.tanh(torch.einsum("bi,ji->bj", h, self.w2)) * self.alpha * self.gain
        return torch.matmul(h, self.w3)


@seeded
def build_raw_params(red="mean"):
    return Setup(RawParams(), (randn(N, 6), labels(N)), ce_loss(red))


class RawTokens(nn.Module):  # raw parameter on [B, T, d] via einsum and @
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 8) * 0.3)
        self.pos = nn.Parameter(torch.randn(5, 8) * 0.1)  # a learned [T, d] table added to every example
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(torch.einsum("btd,de->bte", x, self.w) + self.pos)
        return self.head(h.mean(1))


@seeded
def build_raw_tokens(red="mean"):
    return Setup(RawTokens(), (randn(N, 5, 4), labels(N)), ce_loss(red))


class ScaledActivation(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.alpha = nn.Parameter(torch.tensor(2.0))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.fc(x) * self.alpha))


@seeded
def build_scaled_activation(red="mean"):
    return Setup(ScaledActivation(), (randn(N, 6), labels(N)), ce_loss(red))


class DictOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.cls = nn.Linear(8, 3)
        self.aux = nn.Linear(8, 1)

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        return {"logits": self.cls(h), "aux": (self.aux(h), h.shape[0])}


@seeded
def build_dict_out(red="mean"):
    def loss(m, batch):
        x, y = batch
        out = m(x)
        aux, _ = out["aux"]
        return F.cross_entropy(out["logits"], y, reduction=red) + reduce((aux.squeeze(1) ** 2), red)

    return Setup(DictOut(), (randn(N, 6), labels(N)), loss)


class NonContig(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):  # x [B, 4, T]: Linear on the non-contiguous transpose, then a strided slice
        h = torch.tanh(self.fc(x.transpose(1, 2)))  # [B, T, 8]
        return self.head(h[:, ::2].mean(1))


@seeded
def build_noncontig(red="mean"):
    return Setup(NonContig(), (randn(N, 4, 5), labels(N)), ce_loss(red))


class SiameseCat(nn.Module):
    """Both views of each example go through one Linear as one batch of 2B rows (torch.cat along dim 0)."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(4, 8)
        self.head = nn.Linear(16, 3)

    def forward(self, a, b):
        B = a.shape[0]
        h = torch.tanh(self.enc(torch.cat([a, b], 0)))
        return self.head(torch.cat([h[:B], h[B:]], 1))


@seeded
def build_siamese_cat(red="mean"):
    return Setup(SiameseCat(), (randn(N, 4), randn(N, 4, seed=8), labels(N)), ce_loss(red))


class ParamItem(nn.Module):
    """Python control flow on a parameter's value (.item()), not on the data."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.temp = nn.Parameter(torch.tensor(0.5))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        if self.temp.item() > 0:
            h = h * self.temp
        return self.head(h)


@seeded
def build_param_item(red="mean"):
    return Setup(ParamItem(), (randn(N, 6), labels(N)), ce_loss(red))


class DataItem(nn.Module):
    """Python control flow on a batch statistic (.item()): the batch decides what each example computes."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        if x.abs().max().item() > 1.5:  # a single example can flip this for the whole batch
            h = h * 2.0
        return self.head(h)


@seeded
def build_data_item(red="mean"):
    x = randn(N, 6) * 0.2
    x[2, 0] = 3.0  # only example 2 exceeds the threshold
    return Setup(DataItem(), (x, labels(N)), ce_loss(red))


# ---------------------------------------------------------------------------------------------------------
# 9. Batch mixing (must be refused)
# ---------------------------------------------------------------------------------------------------------
class BatchOp(nn.Module):
    def __init__(self, op):
        super().__init__()
        self.op = op

    def forward(self, h):
        if self.op == "flip":
            return h + 0.5 * h.flip(0)
        if self.op == "roll":
            return h + 0.5 * torch.roll(h, 1, dims=0)
        if self.op == "cumsum":
            return torch.cumsum(h, dim=0)
        if self.op == "softmax":
            return h * torch.softmax(h, dim=0)
        raise ValueError(self.op)


class MixModel(nn.Module):
    def __init__(self, op):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.batch_op = BatchOp(op)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.batch_op(self.fc1(x))))


@seeded
def build_mix(op, red="mean"):
    return Setup(MixModel(op), (randn(N, 6), labels(N)), ce_loss(red))


# ---------------------------------------------------------------------------------------------------------
# 10. Parametrizations
# ---------------------------------------------------------------------------------------------------------
@seeded
def build_param_orthogonal(red="mean"):
    fc = torch.nn.utils.parametrizations.orthogonal(nn.Linear(6, 6))
    model = nn.Sequential(OrderedDict(orth_fc=fc, act=nn.Tanh(), head=nn.Linear(6, 3)))
    return Setup(model, (randn(N, 6), labels(N)), ce_loss(red))


@seeded
def build_param_spectral(red="mean"):
    fc = torch.nn.utils.parametrizations.spectral_norm(nn.Linear(6, 8))
    model = nn.Sequential(OrderedDict(sn_fc=fc, act=nn.Tanh(), head=nn.Linear(8, 3)))
    return Setup(model, (randn(N, 6), labels(N)), ce_loss(red))


class Symmetric(nn.Module):
    def forward(self, X):
        return X.triu() + X.triu(1).transpose(-1, -2)


@seeded
def build_param_custom(red="mean"):
    fc = nn.Linear(6, 6)
    torch.nn.utils.parametrize.register_parametrization(fc, "weight", Symmetric())
    model = nn.Sequential(OrderedDict(sym_fc=fc, act=nn.Tanh(), head=nn.Linear(6, 3)))
    return Setup(model, (randn(N, 6), labels(N)), ce_loss(red))


# ---------------------------------------------------------------------------------------------------------
# 11. dtypes
# ---------------------------------------------------------------------------------------------------------
@seeded
def build_mlp_dtype(dtype, red="mean"):
    model = mlp().to(dtype)
    return Setup(model, (randn(N, 6).to(dtype), labels(N)), ce_loss(red))


@seeded
def build_conv_dtype(dtype, red="mean"):
    body = nn.Conv2d(2, 4, 3, padding=1)
    model = ConvNet(body, 4 * 25).to(dtype)
    return Setup(model, (randn(N, 2, 5, 5).to(dtype), labels(N)), ce_loss(red))


# ---------------------------------------------------------------------------------------------------------
# 12. A parameter in the loss, outside the model
# ---------------------------------------------------------------------------------------------------------
@seeded
def build_weight_decay_in_loss(red="mean"):
    model = mlp()

    def loss(m, batch):
        x, y = batch
        reg = 0.1 * sum(p.square().sum() for p in model.parameters())  # L2 penalty added to the loss
        return F.cross_entropy(m(x), y, reduction=red) + reg

    return Setup(model, (randn(N, 6), labels(N)), loss)


@seeded
def build_unused_param(red="mean"):
    model = UnusedParam()
    return Setup(model, (randn(N, 6), labels(N)), ce_loss(red))


class UnusedParam(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = mlp()
        self.spare = nn.Linear(6, 2)  # trainable, never called

    def forward(self, x):
        return self.net(x)


# ---------------------------------------------------------------------------------------------------------
# 13. More
# ---------------------------------------------------------------------------------------------------------
@seeded
def build_channels_last_in_loss(red="mean"):
    body = nn.Conv2d(2, 4, 3, padding=1)
    model = ConvNet(body, 4 * 25)

    def loss(m, batch):
        x, y = batch
        return F.cross_entropy(m(x.contiguous(memory_format=torch.channels_last)), y, reduction=red)

    return Setup(model, (randn(N, 2, 5, 5), labels(N)), loss)


class DictTensors(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.cls = nn.Linear(8, 3)
        self.aux = nn.Linear(8, 1)

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        return {"logits": self.cls(h), "aux": (self.aux(h), h)}


@seeded
def build_dict_tensors(red="mean"):
    def loss(m, batch):
        x, y = batch
        out = m(x)
        aux, _ = out["aux"]
        return F.cross_entropy(out["logits"], y, reduction=red) + reduce((aux.squeeze(1) ** 2), red)

    return Setup(DictTensors(), (randn(N, 6), labels(N)), loss)


class GradReverse(torch.autograd.Function):  # old-style (forward with ctx) gradient reversal layer
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return -0.5 * g


class GRLModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(GradReverse.apply(self.fc1(x))))


@seeded
def build_grl(red="mean"):
    return Setup(GRLModel(), (randn(N, 6), labels(N)), ce_loss(red))


class TensorHook(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        if h.requires_grad:
            h.register_hook(lambda g: g * 3.0)
        return self.fc2(h)


@seeded
def build_tensor_hook(red="mean"):
    return Setup(TensorHook(), (randn(N, 6), labels(N)), ce_loss(red))


@seeded
def build_backward_hook(red="mean"):
    model = nn.Sequential(OrderedDict(fc1=nn.Linear(6, 8), act=nn.Tanh(), fc2=nn.Linear(8, 3)))
    model.act.register_full_backward_hook(lambda m, gin, gout: (gin[0] * 3.0,))
    return Setup(model, (randn(N, 6), labels(N)), ce_loss(red))


class DetachMid(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        return self.head(torch.tanh(self.fc2(h.detach())) + h)


@seeded
def build_detach_mid(red="mean"):
    return Setup(DetachMid(), (randn(N, 6), labels(N)), ce_loss(red))


class DivByBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)) * (4.0 / x.shape[0]))


@seeded
def build_div_batch(red="mean"):
    return Setup(DivByBatch(), (randn(N, 6), labels(N)), ce_loss(red))


class TwoRanks(nn.Module):
    """One Linear applied to [B, d] and to [B, T, d] in the same forward."""

    def __init__(self):
        super().__init__()
        self.shared_fc = nn.Linear(4, 4)
        self.head = nn.Linear(8, 3)

    def forward(self, x):  # [B, T, 4]
        a = torch.tanh(self.shared_fc(x)).mean(1)
        b = torch.tanh(self.shared_fc(x[:, 0]))
        return self.head(torch.cat([a, b], 1))


@seeded
def build_two_ranks(red="mean"):
    return Setup(TwoRanks(), (randn(N, 5, 4), labels(N)), ce_loss(red))


class TwoLayouts(nn.Module):
    """One Linear applied batch-first and time-major ([T, B, d]) in the same forward."""

    def __init__(self):
        super().__init__()
        self.shared_fc = nn.Linear(4, 4)
        self.head = nn.Linear(8, 3)

    def forward(self, x):  # [B, T, 4]
        a = torch.tanh(self.shared_fc(x)).mean(1)
        b = torch.tanh(self.shared_fc(x.transpose(0, 1))).mean(0)
        return self.head(torch.cat([a, b], 1))


@seeded
def build_two_layouts(red="mean"):
    return Setup(TwoLayouts(), (randn(N, 5, 4), labels(N)), ce_loss(red))


@seeded
def build_tokens_linear(red="mean"):
    return Setup(TokenModel(nn.Identity()), (randn(N, 5, 4), labels(N)), ce_loss(red))


@seeded
def build_lstm_fix_n(n, red="mean"):
    model = LSTMWithState()
    dpclip.fix_model(model)
    return Setup(model, (randn(n, 5, 4), labels(n)), ce_loss(red))


@seeded
def build_token_n(block_factory, n, T=5, red="mean"):
    return Setup(TokenModel(block_factory()), (randn(n, T, 4), labels(n)), ce_loss(red))


@seeded
def build_embedding_rep(red="mean", **kw):
    from tests.dpclip.oracle_models import EmbeddingClassifier
    ids = randint(6, N, 7)
    ids[:, -2:] = 0
    return Setup(EmbeddingClassifier(6, **kw), (ids, labels(N)), ce_loss(red))


# ---------------------------------------------------------------------------------------------------------
# 14. Complex parameters and TorchScript (round 7)
# ---------------------------------------------------------------------------------------------------------
class ComplexSpectrum(nn.Module):
    """x (real) @ a complex weight, then |.| and a real head. ``as_pairs``: the weight is stored as a real
    parameter [6, 8, 2] and read with torch.view_as_complex (the form dpclip's refusal proposes)."""

    def __init__(self, as_pairs: bool):
        super().__init__()
        self.as_pairs = as_pairs
        weight = torch.randn(6, 8, 2) * 0.3
        self.spectrum = nn.Parameter(weight if as_pairs else torch.view_as_complex(weight).clone())
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        w = torch.view_as_complex(self.spectrum) if self.as_pairs else self.spectrum
        return self.head(torch.matmul(x.to(torch.complex64), w).abs())


def build_complex(as_pairs: bool, red="mean"):
    return Setup(ComplexSpectrum(as_pairs), (randn(N, 6), labels(N)), ce_loss(red))


class ScriptedPart(nn.Module):
    def __init__(self):
        super().__init__()
        self.scripted = torch.jit.script(nn.Sequential(nn.Linear(6, 8), nn.Tanh()))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.scripted(x))


class ScriptedMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = mlp()

    def forward(self, x):
        return self.body(x)


class TracedPart(nn.Module):
    """A torch.jit.trace'd Sequential inside an eager model (a deep copy of it has non-leaf parameters)."""

    def __init__(self):
        super().__init__()
        self.traced = torch.jit.trace(nn.Sequential(nn.Linear(6, 8), nn.Tanh()), randn(2, 6, seed=9))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.traced(x))


def build_traced(red="mean"):
    return Setup(TracedPart(), (randn(N, 6), labels(N)), ce_loss(red))


class DropPath(nn.Module):
    """Drop-path as torchvision's StochasticDepth ("row") and timm's DropPath write it: one Bernoulli draw per row
    of x.shape[0], which under vmap becomes one per channel."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)


class ResidualDropPath(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        self.inp, self.branch, self.drop, self.head = nn.Linear(6, 8), nn.Linear(8, 8), DropPath(p), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        return self.head(h + self.drop(torch.tanh(self.branch(h))))


def build_drop_path(p: float, red="mean"):
    return Setup(ResidualDropPath(p), (randn(N, 6), labels(N)), ce_loss(red))


class FractionalPoolNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.pool, self.head = nn.Conv2d(2, 3, 3, padding=1), nn.FractionalMaxPool2d(2, output_size=3), nn.Linear(27, 3)

    def forward(self, x):
        return self.head(self.pool(torch.tanh(self.conv(x))).flatten(1))


class GumbelHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(6, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(nn.functional.gumbel_softmax(self.fc(x), tau=0.5))


class RReLUEval(nn.Module):
    """An RReLU in eval mode (a fixed slope, no draw) inside a model that trains."""

    def __init__(self):
        super().__init__()
        self.fc, self.act, self.head = nn.Linear(6, 8), nn.RReLU(0.1, 0.3).eval(), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.act(self.fc(x)))


class DefaultGeneratorDraw(nn.Module):
    """A rare drop-path drawn with generator=torch.default_generator: the global generator, so still a draw."""

    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        keep = torch.bernoulli(torch.full((h.shape[0], 1), 1 - 1e-6), generator=torch.default_generator)
        return self.head(h * keep)


class DrawAfterCaughtError(nn.Module):
    """A layer that raises on batches (caught by the forward), then a draw in the model's own forward: the
    refusal must name the model's forward, not the layer that raised."""

    class Fragile(nn.Module):
        def forward(self, h):
            if h.shape[0] > 1:
                raise RuntimeError("batch too big")
            return h

    def __init__(self):
        super().__init__()
        self.fc, self.fragile, self.head = nn.Linear(6, 8), self.Fragile(), nn.Linear(8, 3)

    def forward(self, x):
        h = self.fc(x)
        try:
            h = self.fragile(h)
        except RuntimeError:
            pass
        return self.head(h + 1e-9 * torch.randn_like(h))


def build_plain(model_class, red="mean"):
    return Setup(model_class(), (randn(N, 6), labels(N)), ce_loss(red))


def build_fractional_pool(red="mean"):
    return Setup(FractionalPoolNet(), (randn(N, 2, 6, 6), labels(N)), ce_loss(red))


def build_gumbel(red="mean"):
    return Setup(GumbelHead(), (randn(N, 6), labels(N)), ce_loss(red))


def build_scripted(whole: bool, red="mean"):
    model = torch.jit.script(ScriptedMLP()) if whole else ScriptedPart()
    return Setup(model, (randn(N, 6), labels(N)), ce_loss(red))


def _more_cases():
    tenc = lambda: nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 1,
                                         enable_nested_tensor=False)
    return [
        Case("unused_trainable_param", "N", build_unused_param, EXACT, notes="a trainable Linear never called"),
        Case("channels_last_input_from_loop", "N", build_channels_last_in_loss, EXACT,
             notes="the loop passes x.contiguous(memory_format=channels_last) to a Conv2d model"),
        Case("dict_of_tensors_output", "N", build_dict_tensors, EXACT,
             notes="forward returns {'logits': t, 'aux': (t, h)} (tensors only)"),
        Case("grad_reversal_function", "N", build_grl, EXACT_OR_REFUSED, ("GradReverse", "GRLModel"),
             "old-style autograd.Function (gradient reversal, backward = -0.5 g) inside forward"),
        Case("tensor_hook_in_forward", "N", build_tensor_hook, EXACT_OR_REFUSED, ("TensorHook",),
             "h.register_hook(lambda g: 3 g) inside forward"),
        Case("full_backward_hook", "N", build_backward_hook, EXACT_OR_REFUSED, ("act", "Tanh"),
             "register_full_backward_hook on Tanh scaling grad_input by 3"),
        Case("detach_mid", "N", build_detach_mid, EXACT, notes="fc2(h.detach()) + h"),
        Case("divide_by_batch_size", "N", build_div_batch, REFUSED, ("DivByBatch",),
             "h * 4 / x.shape[0]: each example's output depends on the batch size"),
        Case("linear_two_ranks", "N", build_two_ranks, EXACT, notes="one Linear on [B, T, d] and on [B, d]"),
        Case("linear_two_layouts", "N", build_two_layouts, EXACT_OR_REFUSED, ("shared_fc", "TwoLayouts"),
             "one Linear batch-first and time-major in one forward"),
        Case("embedding_l1", "N", build_embedding_rep, EXACT, options=dict(norm="l1"),
             notes="Embedding with repeated tokens, norm='l1'"),
        Case("embedding_freq_padding_l1", "N", P(build_embedding_rep, scale_grad_by_freq=True, padding_idx=0), EXACT,
             options=dict(norm="l1"), notes="scale_grad_by_freq + padding_idx with norm='l1'"),
        Case("embedding_per_layer", "N", build_embedding_rep, EXACT, options=dict(per_layer=True)),
        Case("embbag_l1", "N", P(build_bag, "sum", weighted=True), EXACT, options=dict(norm="l1")),
        Case("tokens_linear_l1", "N", build_tokens_linear, EXACT, options=dict(norm="l1"),
             notes="Linear over [B, T, d] with norm='l1' (no ghost shortcut)"),
        Case("tokens_linear_per_layer_l1", "N", build_tokens_linear, EXACT, options=dict(per_layer=True, norm="l1")),
        Case("transformer_l1", "N", P(build_token, tenc), EXACT, options=dict(norm="l1")),
        Case("conv_per_layer", "N", P(build_conv_body, depthwise, (3, 5, 5)), EXACT, options=dict(per_layer=True)),
        Case("bilinear_tokens_l1", "N", build_bilinear_tokens, EXACT, options=dict(norm="l1")),
        Case("lstm_fix_micro_batches", "N", P(build_lstm_fix_n, 10), EXACT, options=dict(max_physical_batch_size=4),
             notes="fix_model LSTM with h0 from the input, N = 10 in micro-batches of 4"),
        Case("lstm_fix_size1", "N", P(build_lstm_fix_n, 1), EXACT),
        Case("transformer_size1", "N", P(build_token_n, tenc, 1), EXACT),
        Case("transformer_size2_T2", "N", P(build_token_n, tenc, 2, T=2), EXACT, notes="B == T == 2"),
        Case("complex_parameter", "N", P(build_complex, False), REFUSED, ("spectrum",), refuse_at="make_private",
             notes="a complex64 weight: its norm and noise were counted on the real part only (0.12 of the scale off)"),
        Case("complex_parameter_as_real_pairs", "N", P(build_complex, True), EXACT,
             notes="the same weight stored as real [6, 8, 2], read with torch.view_as_complex"),
        Case("jit_script_submodule", "N", P(build_scripted, False), REFUSED, ("scripted",), refuse_at="make_private",
             notes="torch.jit.script(Sequential) inside an eager model (torch's hook error escaped)"),
        Case("jit_script_whole_model", "N", P(build_scripted, True), REFUSED, ("ScriptedMLP",),
             refuse_at="make_private"),
        Case("drop_path_rare", "N", P(build_drop_path, 1e-6), REFUSED, ("DropPath",),
             notes="a drop-path that almost never drops (p = 1e-6): two passes agree, so only watching the RNG "
                   "calls refuses it (before: accepted, and under vmap its mask is one per channel, not per example)"),
        Case("drop_path", "N", P(build_drop_path, 0.5), REFUSED, ("DropPath",)),
        Case("fractional_max_pool", "N", build_fractional_pool, REFUSED, ("FractionalMaxPool2d",),
             notes="nn.FractionalMaxPool2d draws its pooling regions in every forward"),
        Case("gumbel_softmax_in_forward", "N", build_gumbel, REFUSED, ("GumbelHead",),
             notes="F.gumbel_softmax draws Gumbel noise inside (seen as the one call)"),
        Case("rrelu_eval_in_training_model", "N", P(build_plain, RReLUEval), {"auto": EXACT, "vmap": EXACT_OR_REFUSED},
             notes="nn.RReLU in eval mode draws nothing (refused as a draw by the first version of the watch)"),
        Case("bernoulli_default_generator", "N", P(build_plain, DefaultGeneratorDraw), REFUSED, ("DefaultGeneratorDraw",),
             notes="generator=torch.default_generator is the global generator: a draw like no generator"),
        Case("draw_after_caught_layer_error", "N", P(build_plain, DrawAfterCaughtError), REFUSED,
             ("DrawAfterCaughtError's own forward",),
             notes="the layer that raised is left (always_call hook), so the draw is placed in the model's forward"),
        Case("jit_trace_submodule", "N", build_traced, EXACT, ("traced", "TracedPart"),
             notes="torch.jit.trace(Sequential) inside an eager model: its weights get gradients only through the "
                   "traced graph (the oracle's deep copy has non-leaf parameters, read with retain_grad)"),
    ]


# ---------------------------------------------------------------------------------------------------------
# The list
# ---------------------------------------------------------------------------------------------------------
def _cases():
    return [
        Case("bilinear", "N", build_bilinear, EXACT, notes="nn.Bilinear(4, 5, 6) on two inputs"),
        Case("bilinear_tokens", "N", build_bilinear_tokens, EXACT, notes="nn.Bilinear on [B, T, d]"),
        Case("prelu_per_channel_conv", "N", P(build_conv_body, prelu_conv, (2, 5, 5)), EXACT,
             notes="Conv2d → PReLU(4)"),
        Case("prelu_shared_mlp", "N", build_prelu_mlp, EXACT, notes="Linear → PReLU() (one slope) → Linear"),
        Case("embbag_mean_2d", "N", P(build_bag, "mean"), EXACT, notes="EmbeddingBag(mode='mean'), ids [B, L]"),
        Case("embbag_sum_weighted_2d", "N", P(build_bag, "sum", weighted=True), EXACT,
             notes="EmbeddingBag(mode='sum') with per_sample_weights, ids [B, L]"),
        Case("embbag_max_2d", "N", P(build_bag, "max"), EXACT, notes="EmbeddingBag(mode='max'), ids [B, L]"),
        Case("embbag_sum_offsets", "N", P(build_bag, "sum", offsets=True), EXACT_OR_REFUSED, ("bag", "EmbeddingBag", "BagModel"),
             "EmbeddingBag(sum) on flat 1-D ids + offsets built from lengths (variable bag sizes)"),
        Case("embbag_sum_offsets_weighted", "N", P(build_bag, "sum", weighted=True, offsets=True), EXACT_OR_REFUSED,
             ("bag", "EmbeddingBag", "BagModel"), "as above with per_sample_weights"),
        Case("emb_mean_then_linear", "N", build_emb_mean_linear, EXACT, notes="Embedding → mean(1) → Linear"),
        Case("emb_1d_ids", "N", build_emb_1d, EXACT, notes="Embedding on ids [B] (one token per example)"),
        Case("conv_depthwise_nobias", "N", P(build_conv_body, depthwise, (3, 5, 5)), EXACT,
             notes="Conv2d(groups=in_channels, bias=False) then pointwise 1x1"),
        Case("conv_transpose1d_stride_dil_outpad", "N", P(build_conv_body, convT1d, (2, 6)), EXACT),
        Case("conv_transpose2d_groups_outpad", "N", P(build_conv_body, convT2d_groups, (4, 3, 3)), EXACT),
        Case("conv_transpose2d_output_size", "N", P(build_conv_body, OutputSized, (2, 4, 4)), EXACT,
             notes="up(x, output_size=...): the call's output padding (1), not the module's (0)"),
        Case("conv_transpose1d_groups_output_size", "N", P(build_conv_body, P(OutputSized, 1), (2, 5)), EXACT,
             notes="grouped, stride 3, output_size asks for padding 2 where the module says 1"),
        Case("conv2d_circular", "N", P(build_conv_body, circular, (2, 5, 5)), EXACT),
        Case("conv1d_circular_replicate", "N", P(build_conv_body, circular1d_replicate, (2, 6)), EXACT),
        Case("unfold_linear_fold", "N", P(build_conv_body, UnfoldFold, (2, 4, 4)), EXACT,
             notes="nn.Unfold → Linear on patches → nn.Fold"),
        Case("channels_last_input", "N", build_channels_last, {"vmap": EXACT_OR_REFUSED}, (),
             "input made channels_last in forward (torch cannot query that memory format under vmap)"),
        Case("channels_last_model", "N", P(build_channels_last, model_too=True), {"vmap": EXACT_OR_REFUSED}, (),
             "model.to(memory_format=channels_last) and channels_last input (not under vmap, as above)"),
        Case("conv_weight_viewed_as_linear", "N", build_conv_linear_shared, EXACT,
             notes="F.linear(v, conv.weight.view(4, -1)) as well as conv(img)"),
        Case("gru_time_major_bidir_2l_fix", "N", P(build_time_major_rnn, "gru", True), EXACT,
             notes="fix_model(GRU(batch_first=False, bidirectional, 2 layers)), model transposes"),
        Case("rnn_relu_time_major_bidir_2l_fix", "N", P(build_time_major_rnn, "rnn", True), EXACT,
             notes="fix_model(RNN(relu, batch_first=False, bidirectional, 2 layers))"),
        Case("lstm_time_major_T_eq_B_fix", "N", P(build_time_major_rnn, "lstm", True, T=6), EXACT,
             notes="fix_model(LSTM(batch_first=False)), T == B"),
        Case("lstm_time_major_raw", "N", P(build_time_major_rnn, "lstm", False), EXACT_OR_REFUSED,
             ("seq_rnn", "LSTM")),
        Case("lstm_initial_state_fix", "N", P(build_lstm_with_state, True), EXACT,
             notes="fix_model; h0 [1, B, H] computed from the input"),
        Case("mha_need_weights_causal", "N", P(build_token, lambda: MHAVariant(True, True)), EXACT,
             notes="MHA(need_weights=True) with a float causal attn_mask"),
        Case("mha_learned_attn_mask", "N", P(build_token, LearnedMaskBias), {"vmap": EXACT_OR_REFUSED}, ("TokenModel",),
             "a learned relative-position bias as attn_mask (torch.func cannot differentiate the fused CPU attention in it)"),
        Case("mha_weights_used", "N", P(build_token, lambda: MHAVariant(True, False, use_weights=True)), EXACT,
             notes="the returned averaged attention weights feed the output"),
        Case("mha_bias_kv_zero_attn", "N", P(build_token, lambda: MHAVariant(False, False, True, True)), EXACT,
             notes="MHA(add_bias_kv=True, add_zero_attn=True)"),
        Case("mha_per_example_3d_mask", "N", build_per_example_mask, EXACT,
             notes="attn_mask [B*heads, T, T] built from a per-example [B, T, T] mask"),
        Case("decoder_self_memory_post", "N", P(build_self_memory_decoder, False), EXACT,
             notes="TransformerDecoderLayer(h, h) (memory is the target), gelu"),
        Case("decoder_self_memory_norm_first", "N", P(build_self_memory_decoder, True), EXACT),
        Case("layernorm_noaffine_nobias", "N", P(build_token, ln_variants), EXACT,
             notes="LayerNorm(elementwise_affine=False), LayerNorm(bias=False)"),
        Case("groupnorm_one_group", "N", P(build_conv_body, groupnorm_one_group, (2, 5, 5)), EXACT),
        Case("batchnorm_eval_frozen", "N", build_bn_eval, EXACT_OR_REFUSED, ("bn_layer", "BatchNorm1d"),
             "BatchNorm1d submodule in eval mode (running stats frozen): per-example separable"),
        Case("batchnorm_no_running_stats_train", "N", build_bn_no_running_stats, REFUSED, ("bn_layer", "BatchNorm1d"),
             "BatchNorm1d(track_running_stats=False) in train mode: mixes examples"),
        Case("linear_4d_input", "N", build_linear_4d, EXACT, notes="Linear on [B, A, T, D]"),
        Case("raw_params_flinear_einsum_matmul", "N", build_raw_params, EXACT,
             notes="nn.Parameters used with F.linear, einsum, *alpha, *gain, matmul"),
        Case("raw_params_tokens_pos_table", "N", build_raw_tokens, EXACT,
             notes="einsum over [B, T, d] with a raw weight + a learned [T, d] table"),
        Case("scalar_scale_param", "N", build_scaled_activation, EXACT, notes="tanh(fc(x) * self.alpha)"),
        Case("dict_tuple_output", "N", build_dict_out, {"vmap": EXACT_OR_REFUSED}, (),
             "forward returns {'logits', 'aux': (t, int)} (vmap returns tensors only)"),
        Case("noncontiguous_linear_input", "N", build_noncontig, EXACT,
             notes="Linear on x.transpose(1, 2) and a ::2 strided slice"),
        Case("siamese_cat_batch", "N", build_siamese_cat, EXACT_OR_REFUSED, ("enc", "SiameseCat"),
             "one Linear on torch.cat([a, b], 0) (2B rows), split back"),
        Case("param_item_control_flow", "N", build_param_item, EXACT_OR_REFUSED, ("ParamItem", "temp"),
             "if self.temp.item() > 0 (control flow on a parameter)"),
        Case("data_item_control_flow", "N", build_data_item, REFUSED, ("DataItem",),
             "if x.abs().max().item() > 1.5: a batch statistic decides every example's function"),
        Case("batch_roll", "N", P(build_mix, "roll"), REFUSED, ("batch_op", "BatchOp", "MixModel")),
        Case("batch_cumsum", "N", P(build_mix, "cumsum"), REFUSED, ("batch_op", "BatchOp", "MixModel")),
        Case("batch_softmax", "N", P(build_mix, "softmax"), REFUSED, ("batch_op", "BatchOp", "MixModel")),
        Case("parametrize_orthogonal", "N", build_param_orthogonal, EXACT_OR_REFUSED, ("orth_fc",),
             "parametrizations.orthogonal(Linear)"),
        Case("parametrize_spectral_norm", "N", build_param_spectral, EXACT_OR_REFUSED, ("sn_fc",),
             "parametrizations.spectral_norm(Linear): power iteration updates buffers in train mode"),
        Case("parametrize_custom_symmetric", "N", build_param_custom, EXACT, (),
             "register_parametrization(Linear, 'weight', Symmetric())"),
        Case("mlp_bfloat16", "N", P(build_mlp_dtype, torch.bfloat16), EXACT_OR_REFUSED, (), "bf16 params", tol=3e-2),
        Case("mlp_float16", "N", P(build_mlp_dtype, torch.float16), EXACT_OR_REFUSED, (), "fp16 params", tol=3e-2),
        Case("conv_bfloat16", "N", P(build_conv_dtype, torch.bfloat16), EXACT_OR_REFUSED, (), "bf16 conv", tol=3e-2),
        Case("weight_decay_in_loss", "N", build_weight_decay_in_loss, REFUSED, ("weight_decay",),
             "loss + 0.1 * Σ||p||² (a parameter term outside the model's forward): refused, pointing to weight_decay",
             refusal_types=(dpclip.EngineUsageError,)),
    ] + _more_cases()


CASES = _cases()
BY_NAME = {c.name: c for c in CASES}
assert len(BY_NAME) == len(CASES)


def main(argv: list[str]) -> None:
    modes: tuple[str, ...] = ("auto", "vmap")
    names = []
    for a in argv:
        if a.startswith("--modes="):
            modes = tuple(a.split("=", 1)[1].split(","))
        else:
            names.append(a)
    torch.set_num_threads(1)
    for case in CASES:
        if names and case.name not in names:
            continue
        for mode in modes:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                r = run_case(case, mode)
            bad = verdict(case, mode, r)
            print(f"{case.name:<36} {mode:<9} {case.expected(mode):<16} {'ok' if bad is None else 'FAIL':<4} "
                  f"{r.seconds:5.2f}s  {r.summary()}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
