"""Book-keeping contributions against materialised per-example gradients: Σ_i c_i g_i, with dropped examples."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from dpclip.grads import contributions
from dpclip.grads.contributions import (
    ConvPatches, ConvWeight, LinearWeight, Summed, _reads, conv_patches, phase_patches, phases_pay,
)


def _brute_force(grads: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    return sum(f * g for f, g in zip(factors.tolist(), grads) if f != 0)


@pytest.mark.parametrize("conv", [nn.Conv2d(3, 4, 3, 2, padding=1), nn.Conv1d(2, 5, 4), nn.ConvTranspose2d(3, 2, 3, 2)])
@pytest.mark.parametrize("drop", [False, True])
def test_conv_weighted_sum_drops_exactly(conv, drop):
    torch.manual_seed(0)
    shape = (6, conv.in_channels, *([9] * (conv.weight.dim() - 2)))
    x = torch.randn(shape, dtype=torch.float64)
    conv = conv.double()
    g = torch.randn_like(conv(x))
    factors = torch.rand(6, dtype=torch.float64) + 0.1
    if drop:  # a non-finite example dropped with factor 0: its NaNs must not reach the sum
        factors[2] = 0.0
        x[2, 0].fill_(float("nan"))
        g[2].fill_(float("inf"))
    part = ConvWeight("weight", conv, x, g)
    grads = part.materialize()
    expected = _brute_force(grads, factors)
    torch.testing.assert_close(part.weighted(factors), expected, rtol=1e-10, atol=1e-12)
    kept = factors != 0
    torch.testing.assert_close(part.norm("l2")[kept], grads[kept].flatten(1).norm(dim=1), rtol=1e-12, atol=0)


@pytest.mark.parametrize("conv", [
    nn.Conv2d(1, 16, 8, 2, padding=3),  # the DP CNN's first layer
    nn.Conv1d(1, 4, 3, 2, padding=1, dilation=2), nn.Conv2d(1, 4, (3, 5), (2, 1), (0, 2), dilation=(1, 2), bias=False),
    nn.Conv3d(1, 3, (2, 3, 2), (1, 2, 1), (1, 0, 1), dilation=(2, 1, 1)),
])
@pytest.mark.parametrize("kept", [True, False])
def test_single_channel_convolutions_against_each_examples_own_backward(conv, kept, monkeypatch):
    """Oracle: each example's weight gradient from its own forward and backward (autograd, one at a time). A
    convolution on one input channel forms them as one grouped convolution (single_channel_grads); its norms and
    clipped sum, with a dropped non-finite example, follow from them."""
    from dpclip.grads.contributions import single_channel

    monkeypatch.setattr(contributions, "PIECE_BYTES", 2 * conv.weight.numel() * 8)  # two examples per piece
    if not kept:  # nothing fits: the norms come piece by piece, the clipped sum from a batched backward
        monkeypatch.setattr(ConvWeight, "cache_bytes", 1)
    torch.manual_seed(3)
    conv = conv.double()
    x = torch.randn(5, 1, *([17] * (conv.weight.dim() - 2)), dtype=torch.float64)
    grads, outputs = [], []
    for example in x:
        conv.zero_grad()
        out = conv(example[None])
        out_grad = torch.randn_like(out)
        (out * out_grad).sum().backward()
        grads.append(conv.weight.grad.clone())
        outputs.append(out_grad)
    exact, g = torch.stack(grads), torch.cat(outputs)
    assert single_channel(conv)
    part = ConvWeight("weight", conv, x, g)
    torch.testing.assert_close(part.materialize(), exact, rtol=1e-12, atol=1e-12)
    factors = torch.rand(5, dtype=torch.float64) + 0.1
    factors[1] = 0.0
    x[1, 0].fill_(float("nan"))
    g[1].fill_(float("inf"))
    part = ConvWeight("weight", conv, x, g)
    rows = factors != 0
    torch.testing.assert_close(part.norm("l2")[rows], exact[rows].flatten(1).norm(dim=1), rtol=1e-12, atol=0)
    assert part._kept() == kept
    torch.testing.assert_close(part.weighted(factors), _brute_force(exact, factors), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("conv, size, output_size", [
    (nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1), (5, 5), (10, 10)),  # torch picks output padding 1 for the call
    (nn.ConvTranspose1d(2, 3, 3, stride=3, dilation=2), (4,), (16,)),  # 2, with dilation
    (nn.ConvTranspose2d(4, 6, (3, 2), stride=(2, 3), groups=2, output_padding=(1, 2)), (3, 4), (7, 11)),  # (0, 1): not the module's
    (nn.ConvTranspose3d(1, 2, 2, stride=2), (2, 3, 2), (5, 6, 5)),  # (1, 0, 1)
])
@pytest.mark.parametrize("batch", [1, 6])
@pytest.mark.parametrize("kept", [True, False])
def test_transposed_convolutions_called_with_an_output_size(conv, size, output_size, batch, kept, monkeypatch):
    """A transposed convolution called with ``output_size=`` runs with the output padding that call picks, not
    the module's ``output_padding``: the per-example weight gradients (hence the norms and the clipped sum) take
    it from the recorded sizes. Oracle: each example's own forward with that output size, and autograd."""
    if not kept:  # the norms piece by piece, the clipped sum from one batched backward
        monkeypatch.setattr(ConvWeight, "cache_bytes", 1)
    torch.manual_seed(5)
    conv = conv.double()
    x = torch.randn(batch, conv.in_channels, *size, dtype=torch.float64)
    grads, outputs = [], []
    for example in x:
        conv.zero_grad()
        out = conv(example[None], output_size=output_size)
        out_grad = torch.randn_like(out)
        (out * out_grad).sum().backward()
        grads.append(conv.weight.grad.clone())
        outputs.append(out_grad)
    exact, g = torch.stack(grads), torch.cat(outputs)
    part = ConvWeight("weight", conv, x, g)
    torch.testing.assert_close(part.norm("l2"), exact.flatten(1).norm(dim=1), rtol=1e-12, atol=0)
    factors = torch.rand(batch, dtype=torch.float64) + 0.1
    torch.testing.assert_close(part.weighted(factors), _brute_force(exact, factors), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("drop", [False, True])
def test_linear_and_summed_weighted_sums(drop):
    torch.manual_seed(1)
    a, g = torch.randn(5, 3, 4, dtype=torch.float64), torch.randn(5, 3, 2, dtype=torch.float64)
    factors = torch.rand(5, dtype=torch.float64) + 0.1
    if drop:
        factors[1] = 0.0
        a[1].fill_(float("nan"))
    linear = LinearWeight("w", None, a, g, torch.Size([2, 4]))
    torch.testing.assert_close(linear.weighted(factors), _brute_force(linear.materialize(), factors))
    bias = Summed("b", g)
    torch.testing.assert_close(bias.weighted(factors), _brute_force(g.sum(dim=1), factors))


@pytest.mark.parametrize("cached", [True, False])
@pytest.mark.parametrize("piece", [1, 2, 5])
def test_conv_weighted_sum_from_kept_or_recomputed_gradients(cached, piece, monkeypatch):
    """Both ways to the clipped sum (the kept per-example gradients, or one batched backward) give the brute-force
    sum, and the norms each example's own, however many examples a piece holds."""
    conv = nn.Conv2d(3, 4, 3).double()
    monkeypatch.setattr(contributions, "PIECE_BYTES", piece * conv.weight.numel() * 8)
    if not cached:
        monkeypatch.setattr(ConvWeight, "cache_bytes", 1)  # nothing fits: never kept
    torch.manual_seed(2)
    x = torch.randn(5, 3, 8, 8, dtype=torch.float64)
    g = torch.randn_like(conv(x))
    factors = torch.rand(5, dtype=torch.float64)
    exact = []
    for i in range(5):  # each example's own autograd backward
        conv.zero_grad()
        (conv(x[i : i + 1]) * g[i : i + 1]).sum().backward()
        exact.append(conv.weight.grad.clone())
    exact = torch.stack(exact)
    part = ConvWeight("weight", conv, x, g)
    torch.testing.assert_close(part.norm("l2"), exact.flatten(1).norm(dim=1), rtol=1e-12, atol=0)
    assert (part._cached is not None) == cached
    if cached:
        assert [examples.stop - examples.start for examples, _ in part._cached.pieces] == [piece] * (5 // piece) + [5 % piece] * (5 % piece > 0)
    torch.testing.assert_close(part.weighted(factors), _brute_force(exact, factors), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kept", [True, False])
@pytest.mark.parametrize("piece", [1, 3, 7])
def test_linear_norms_and_sums_with_kept_or_ghost_gradients(kept, piece, monkeypatch):
    """Kept per-example gradients (small layers, in pieces of ``piece`` examples) and the ghost identity (large
    ones) give the norms and sums of the exact per-example gradients."""
    monkeypatch.setattr(contributions, "PIECE_BYTES", piece * 5 * 6 * 4)
    if not kept:
        monkeypatch.setattr(LinearWeight, "cache_bytes", 0)
    torch.manual_seed(3)
    a, g = torch.randn(7, 4, 6), torch.randn(7, 4, 5)
    factors = torch.rand(7)
    linear = LinearWeight("w", None, a, g, torch.Size([5, 6]))
    exact = torch.einsum("bto,bti->boi", g.double(), a.double())
    norms = linear.norm("l2")
    assert (linear._cached is not None) == kept
    if kept:
        assert [len(values) for _, values in linear._cached.pieces] == [piece] * (7 // piece) + [7 % piece] * (7 % piece > 0)
    assert bool((norms >= exact.flatten(1).norm(dim=1)).all())  # an upper bound, never below the exact norm
    torch.testing.assert_close(norms, exact.flatten(1).norm(dim=1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(linear.weighted(factors).double(), torch.tensordot(factors.double(), exact, dims=1), rtol=1e-5, atol=1e-6)
    l1 = linear.norm("l1")  # formed piece by piece for the norms where not kept
    assert bool((l1 >= exact.flatten(1).abs().sum(dim=1)).all())
    torch.testing.assert_close(l1, exact.flatten(1).abs().sum(dim=1), rtol=1e-5, atol=1e-6)


def test_one_budget_for_all_the_layers_kept_gradients():
    """A shared budget keeps the first layers' per-example gradients until it is spent; the rest take the ghost
    identity and batched sums, and every norm and clipped sum still equals the materialised ones."""
    from dpclip.grads.contributions import CacheBudget

    torch.manual_seed(4)
    batch, positions, d_in, d_out = 6, 3, 5, 4
    size = batch * d_in * d_out * 8  # float64 bytes of one layer's per-example gradients
    budget = CacheBudget(2 * size + size // 2)  # room for two layers of three
    layers = []
    for _ in range(3):
        a, g = torch.randn(batch, positions, d_in, dtype=torch.float64), torch.randn(batch, positions, d_out, dtype=torch.float64)
        part = LinearWeight("w", None, a, g, torch.Size([d_out, d_in]))
        part.budget = budget
        layers.append((part, torch.einsum("bto,bti->boi", g, a)))
    factors = torch.rand(batch, dtype=torch.float64)
    norms = [part.norm("l2") for part, _ in layers]
    assert [part._cached is not None for part, _ in layers] == [True, True, False]
    assert budget.left == size // 2
    for (part, exact), norm in zip(layers, norms):
        torch.testing.assert_close(norm, exact.flatten(1).norm(dim=1), rtol=1e-9, atol=0)
        assert bool((norm >= exact.flatten(1).norm(dim=1)).all())
        torch.testing.assert_close(part.weighted(factors), _brute_force(exact, factors), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("conv", [
    nn.Conv2d(3, 4, 3, 2, padding=1), nn.Conv2d(2, 5, (3, 2), stride=(1, 2), padding=(2, 1), dilation=(2, 1)),
    nn.Conv1d(2, 5, 4, padding=3), nn.Conv3d(2, 3, 2, stride=2, padding=1), nn.Conv2d(3, 2, 4, bias=False),
    nn.Conv2d(4, 6, 3, stride=3), nn.Conv1d(3, 4, 5, stride=4, padding=1),  # T² ≤ |W|: the ghost identity
    nn.Conv2d(1, 3, (4, 2), stride=2, padding=1), nn.Conv1d(1, 2, 2),  # patches by phases (phases_pay)
    nn.Conv3d(1, 2, (1, 2, 2), stride=(1, 1, 2), padding=(0, 0, 1)),
])
@pytest.mark.parametrize("route", ["kept", "ghost", "formed per norm"])
def test_conv_patches_against_the_per_example_weight_backward(conv, route, monkeypatch):
    """The patch route's per-example gradients, norms and clipped sums against vmapped per-example weight
    backwards, with a dropped (non-finite) example, whichever way LinearWeight takes to the norm."""
    monkeypatch.setattr(LinearWeight, "cache_bytes", 2**40 if route == "kept" else 0)
    torch.manual_seed(4)
    conv = conv.double()
    x = torch.randn(6, conv.in_channels, *([7] * (conv.weight.dim() - 2)), dtype=torch.float64)
    g = torch.randn_like(conv(x))
    positions, size = g[0, 0].numel(), conv.weight[0].numel() * conv.out_channels
    if route == "ghost" and positions**2 > size or route == "formed per norm" and positions**2 <= size:
        pytest.skip("this layer's shape takes the other route")
    factors = torch.rand(6, dtype=torch.float64) + 0.1
    factors[2] = 0.0
    x[2, 0].fill_(float("nan"))
    g[2].fill_(float("inf"))
    exact = ConvWeight("weight", conv, x, g).materialize()
    part = ConvPatches("weight", conv, x, g)
    kept = factors != 0
    torch.testing.assert_close(part.materialize()[kept], exact[kept], rtol=1e-12, atol=1e-12)
    norms = part.norm("l2")[kept]
    true = exact[kept].flatten(1).norm(dim=1)
    assert bool((norms >= true).all())  # never below the exact norm
    torch.testing.assert_close(norms, true, rtol=1e-9, atol=0)
    assert (part._cached is not None) == (route == "kept")
    torch.testing.assert_close(part.weighted(factors), _brute_force(exact, factors), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(part.norm("l1")[kept], exact[kept].flatten(1).abs().sum(dim=1), rtol=1e-9, atol=0)


@pytest.mark.parametrize("c_in, kernel, stride, padding, side, phased", [
    (1, 8, 2, 3, 28, True),  # the DP CNN's first layer
    (1, 3, 1, 1, 12, True), (2, (4, 2), (2, 1), (1, 2), 11, True), (1, (6, 3), (3, 3), 0, 14, True),
    (16, 4, 2, 0, 13, False),  # the DP CNN's second layer: runs of k·C_in = 64 beat rows of 5
    (1, 3, 2, 1, 12, False),  # kernel not a multiple of the stride
])
def test_phase_patches_are_unfolds_patches_in_another_column_order(c_in, kernel, stride, padding, side, phased):
    """Oracle: F.unfold's patches (columns (channel, kernel row, kernel column)). phase_patches' column
    (channel, r_1, r_2, a_1, a_2) is kernel offset (a_1·s_1 + r_1, a_2·s_2 + r_2); the route choice as documented."""
    conv = nn.Conv2d(c_in, 3, kernel, stride, padding)
    x = torch.randn(3, c_in, side, side + 1, dtype=torch.float64)
    g = torch.randn_like(conv.double()(x))
    assert phases_pay(conv, g) == phased
    if not phased:
        return
    (kh, kw), (sh, sw) = conv.kernel_size, conv.stride
    unfolded = nn.functional.unfold(x, conv.kernel_size, padding=conv.padding, stride=conv.stride)  # [B, C·kh·kw, T]
    columns = [c * kh * kw + (a1 * sh + r1) * kw + (a2 * sw + r2)
               for c in range(c_in) for r1 in range(sh) for r2 in range(sw) for a1 in range(kh // sh) for a2 in range(kw // sw)]
    torch.testing.assert_close(phase_patches(conv, x), unfolded[:, columns].transpose(1, 2), rtol=0, atol=0)


@pytest.mark.parametrize("kernel, stride, dilation, padding", [
    (3, 1, 1, 1), (4, 2, 1, 0), (8, 2, 1, 3), (3, 2, 2, 2), (5, 3, 2, 1), (2, 3, 1, 0), ((3, 4), (1, 3), (2, 1), (1, 2)),
    (7, 2, 3, 4),
])
def test_patch_reads_count_the_patches_that_read_each_input_entry(kernel, stride, dilation, padding):
    """Oracle: fold(unfold(ones)) counts, for every input entry, the patches that read it."""
    conv = nn.Conv2d(1, 1, kernel, stride, padding, dilation=dilation)
    ones = torch.ones(1, 1, 23, 30)
    spec = dict(kernel_size=conv.kernel_size, stride=conv.stride, dilation=conv.dilation, padding=conv.padding)
    counts = nn.functional.fold(nn.functional.unfold(ones, **spec), ones.shape[2:], **spec)[0, 0]
    reads = _reads((23, 30), conv.kernel_size, conv.stride, conv.dilation, conv.padding)
    torch.testing.assert_close(reads, counts.double(), rtol=0, atol=0)


@pytest.mark.parametrize("conv", [
    nn.Conv2d(3, 4, 3, 2, padding=1), nn.Conv2d(2, 5, (3, 2), stride=(1, 2), padding=(2, 1), dilation=(2, 1)),
    nn.Conv1d(2, 5, 4, padding=3), nn.Conv3d(2, 3, 2, stride=2, padding=1), nn.Conv2d(1, 16, 8, 2, padding=3),
])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_patch_norm_from_the_input_is_a_tight_upper_bound(conv, dtype):
    """‖patches‖ (the rounding slack's scale) from the input: never below the patches' own norm (computed in
    float64 from the same values), and above it by no more than the norm's rounding allowance (the former bound,
    √(most patches one entry sits in)·‖x‖, was up to 3× the norm on 3 × 3 kernels)."""
    torch.manual_seed(5)
    x = torch.randn(4, conv.in_channels, *([9] * (conv.weight.dim() - 2)), dtype=dtype) * 1e3
    g = torch.randn_like(conv.to(dtype)(x))
    bound = ConvPatches("weight", conv, x, g)._input_norm()
    exact = conv_patches(conv, x.double()).flatten(1).norm(dim=1)
    assert bool((bound >= exact).all()), (bound, exact)
    allowance = (x[0].numel() + 16) * (2.0**-24 if dtype == torch.float32 else 2.0**-53)  # the norm's own inflation
    assert bool((bound <= exact * (1 + allowance)).all()), (bound / exact - 1, allowance)


@pytest.mark.parametrize("norm", ["l2", "l1"])
def test_kept_float32_norms_cover_their_rounding(norm, monkeypatch):
    """The kept route in float32: each norm at least the float64 norm of the exact per-example gradient (formed
    from the same float32 inputs) and within 1e-4 of it."""
    monkeypatch.setattr(LinearWeight, "cache_bytes", 2**40)
    torch.manual_seed(6)
    a, g = torch.randn(8, 30, 20) * 1e3, torch.randn(8, 30, 6)
    part = LinearWeight("w", None, a, g, torch.Size([6, 20]))
    norms = part.norm(norm)
    assert part._cached is not None
    exact = torch.linalg.vector_norm(torch.bmm(g.double().transpose(1, 2), a.double()).flatten(1), ord=1 if norm == "l1" else 2, dim=1)
    assert bool((norms >= exact).all())
    torch.testing.assert_close(norms, exact, rtol=1e-4, atol=0)


@pytest.mark.parametrize("conv", [nn.Conv2d(3, 4, 3, 2, padding=1), nn.Conv2d(1, 3, (4, 2), stride=2, padding=1),
                                  nn.Conv1d(2, 5, 4)])
@pytest.mark.parametrize("route", ["kept", "ghost or formed per norm"])
def test_calls_of_one_layer_join_into_one_contribution_with_the_summed_gradients(conv, route, monkeypatch):
    """A layer called three times (views of each example): the joined contribution's per-example gradients,
    norms (never below the exact ones) and clipped sums against the three calls' per-example weight backwards
    added up; calls of another kind, or on other rows, are not joined."""
    monkeypatch.setattr(LinearWeight, "cache_bytes", 2**40 if route == "kept" else 0)
    torch.manual_seed(6)
    conv = conv.double()
    xs = [torch.randn(5, conv.in_channels, *([7] * (conv.weight.dim() - 2)), dtype=torch.float64) for _ in range(3)]
    gs = [torch.randn_like(conv(x)) for x in xs]
    exact = sum(ConvWeight("weight", conv, x, g).materialize() for x, g in zip(xs, gs))
    factors = torch.rand(5, dtype=torch.float64) + 0.1
    calls = [ConvPatches("weight", conv, x, g) for x, g in zip(xs, gs)]
    joined = calls[0].joined(calls[1:])
    assert isinstance(joined, ConvPatches) and joined.positions == 3 * calls[0].positions
    torch.testing.assert_close(joined.materialize(), exact, rtol=1e-12, atol=1e-12)
    norms, true = joined.norm("l2"), exact.flatten(1).norm(dim=1)
    assert bool((norms >= true).all())
    torch.testing.assert_close(norms, true, rtol=1e-9, atol=0)
    torch.testing.assert_close(joined.weighted(factors), _brute_force(exact, factors), rtol=1e-10, atol=1e-12)

    a = [torch.randn(5, 2, 4, dtype=torch.float64) for _ in range(2)]
    g = [torch.randn(5, 2, 3, dtype=torch.float64) for _ in range(2)]
    linear = [LinearWeight("w", None, ai, gi, torch.Size([3, 4])) for ai, gi in zip(a, g)]
    summed = sum(torch.einsum("bto,bti->boi", gi, ai) for ai, gi in zip(a, g))
    one = linear[0].joined(linear[1:])
    torch.testing.assert_close(one.norm("l2"), summed.flatten(1).norm(dim=1), rtol=1e-9, atol=0)
    torch.testing.assert_close(one.weighted(factors), _brute_force(summed, factors), rtol=1e-10, atol=1e-12)
    bias = Summed("b", g[0]).joined([Summed("b", g[1])])
    torch.testing.assert_close(bias.materialize(), g[0].sum(1) + g[1].sum(1), rtol=1e-12, atol=1e-12)
    assert linear[0].joined([Summed("w", g[1])]) is None
    assert LinearWeight("w", slice(0, 3), a[0], g[0], torch.Size([3, 4])).joined(
        [LinearWeight("w", slice(3, 6), a[1], g[1], torch.Size([3, 4]))]) is None
    assert calls[0].joined([LinearWeight("weight", None, calls[1].a, calls[1].g, calls[1].shape)]) is None


@pytest.mark.parametrize("scale_grad_by_freq", [False, True])
@pytest.mark.parametrize("drop", [False, True])
def test_embedding_rows_sum_equals_the_materialised_sum(scale_grad_by_freq, drop):
    """EmbeddingWeight.weighted_rows (a sparse COO tensor of the looked-up rows, duplicates not added up) is the
    same Σ_i c_i g_i as the per-example [vocab, E] gradients summed one by one; a dropped example (factor 0) adds
    exactly nothing, even with non-finite rows."""
    from dpclip.grads.contributions import EmbeddingWeight

    torch.manual_seed(4)
    ids = torch.randint(0, 9, (5, 6))
    ids[1, :3] = 2  # an id repeated inside one example and shared with others
    g = torch.randn(5, 6, 3, dtype=torch.float64)
    factors = torch.rand(5, dtype=torch.float64) + 0.1
    if drop:
        factors[3] = 0.0
        g[3].fill_(float("nan"))
    part = EmbeddingWeight("w", ids, g, 11, scale_grad_by_freq)
    per_example = torch.zeros(5, 11, 3, dtype=torch.float64)
    counts = (ids[:, :, None] == ids[:, None, :]).sum(dim=2)
    for i in range(5):
        for t in range(6):
            per_example[i, ids[i, t]] += g[i, t] / (counts[i, t] if scale_grad_by_freq else 1)
    rows = part.weighted_rows(factors)
    assert rows.is_sparse and rows.shape == (11, 3)
    torch.testing.assert_close(rows.to_dense(), _brute_force(per_example, factors), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rows.to_dense(), part.weighted(factors), rtol=1e-12, atol=1e-12)
