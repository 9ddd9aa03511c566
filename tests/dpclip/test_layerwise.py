"""Every fast path equals the general vmap path: per-example norms (L2, L1) and weighted sums."""

import pytest
import torch
import torch.nn as nn

from dpclip.example_grads import MaterializedGradients
from dpclip.layerwise import LayerwiseTape
from dpclip.per_sample import per_sample_grads

from test_per_sample import CASES


class SeqModel(nn.Module):
    """Linear on a sequence (ghost norm when T² ≤ d_in·d_out), the same Linear called twice, padded embedding."""

    def __init__(self, width=6):
        super().__init__()
        self.emb = nn.Embedding(12, 8, padding_idx=0)
        self.small = nn.Linear(8, width)  # T = 5: T² = 25 vs 8·width
        self.twice = nn.Linear(width, width)
        self.head = nn.Linear(width, 3)

    def forward(self, tokens):
        h = torch.tanh(self.small(self.emb(tokens)))
        h = self.twice(torch.relu(self.twice(h)))
        return self.head(h.mean(dim=1))


class SeqFirstAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, dropout=0.0)  # batch_first=False
        self.head = nn.Linear(8, 3)

    def forward(self, x, padding):
        out, _ = self.attn(x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1), key_padding_mask=padding)
        return self.head(out.mean(dim=0))


class CausalEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, tokens):
        mask = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1])
        return self.head(self.layer(self.emb(tokens), src_mask=mask, is_causal=True)[:, -1])


class GroupedConv(nn.Module):
    """Grouped, dilated, strided Conv2d layers (per-example weight gradients by vmapped weight backward)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=2, dilation=2)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, groups=2, bias=False)
        self.head = nn.Linear(6 * 9, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.conv2(torch.tanh(self.conv1(x)))).flatten(1))


MORE = {
    "grouped_dilated_conv": (GroupedConv, lambda b: torch.randn(b, 2, 7, 7)),
    "sequence_ghost": (lambda: SeqModel(6), lambda b: torch.randint(0, 12, (b, 5))),
    "sequence_materialized": (lambda: SeqModel(2), lambda b: torch.randint(0, 3, (b, 5))),  # many repeated ids
    "causal_encoder": (CausalEncoder, lambda b: torch.randint(0, 20, (b, 6))),
}


def _both(model, inputs, y):
    batch = len(y)
    reference = MaterializedGradients(per_sample_grads(model, nn.CrossEntropyLoss(reduction="sum"), inputs, y))
    tape = LayerwiseTape(model)
    captured = []
    out = tape.forward(model, inputs if isinstance(inputs, tuple) else (inputs,), {}, batch, captured.append)
    nn.functional.cross_entropy(out, y, reduction="sum").backward()
    assert len(captured) == 1 and all(p.grad is None for p in model.parameters())
    return reference, captured[0]


def _compare(reference, fast):
    assert fast.names == reference.names
    for norm in ["l2", "l1"]:
        torch.testing.assert_close(fast.norms(norm), reference.norms(norm), atol=1e-5, rtol=1e-4)
    factors = torch.rand(reference.norms("l2").shape, generator=torch.Generator().manual_seed(0))
    factors[::3] = 0.0
    expected, got = reference.weighted_sum(factors), fast.weighted_sum(factors)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("case", list(CASES) + list(MORE))
def test_layerwise_equals_vmap(case):
    torch.manual_seed(0)
    make_model, make_input = {**CASES, **MORE}[case]
    model, x = make_model(), make_input(7)
    assert LayerwiseTape.unsupported(model) == []
    _compare(*_both(model, x, torch.randint(0, 3, (7,))))


def test_layerwise_attention_with_padding_mask_and_sequence_first_layout():
    torch.manual_seed(1)
    model = SeqFirstAttention()
    x = torch.randn(6, 5, 8)
    padding = torch.zeros(6, 5, dtype=torch.bool)
    padding[:, -2:] = True
    _compare(*_both(model, (x, padding), torch.randint(0, 3, (6,))))


def test_recorded_attention_computes_the_same_outputs_as_pytorch():
    torch.manual_seed(2)
    model = CausalEncoder()
    tokens = torch.randint(0, 20, (4, 6))
    expected = model(tokens)
    tape = LayerwiseTape(model)
    got = tape.forward(model, (tokens,), {}, 4, lambda g: None)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert "forward" not in model.layer.self_attn.__dict__  # the stock module is restored after the call


def test_unsupported_models_are_named():
    shared = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    shared[1].weight = shared[0].weight
    assert any("shared" in p for p in LayerwiseTape.unsupported(shared))
    assert any("GRU" in p for p in LayerwiseTape.unsupported(nn.Sequential(nn.GRU(4, 4))))
    assert LayerwiseTape.unsupported(nn.Sequential(nn.Conv2d(1, 2, 3, groups=1), nn.Flatten())) == []
    assert LayerwiseTape.unsupported(nn.Sequential(nn.Conv2d(2, 2, 3, groups=2))) == []
    assert LayerwiseTape.unsupported(nn.Sequential(nn.Conv2d(2, 2, 3, padding_mode="reflect", padding=1))) != []


def test_conv_gradients_recomputed_in_chunks_when_too_large_to_keep(monkeypatch):
    from dpclip import layerwise

    monkeypatch.setattr(layerwise._ConvWeight, "cache_bytes", 3 * 4 * 2 * 4 * 9)  # 3 examples per chunk
    torch.manual_seed(3)
    _compare(*_both(GroupedConv(), torch.randn(7, 2, 7, 7), torch.randint(0, 3, (7,))))
