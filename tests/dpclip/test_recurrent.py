"""dpclip.recurrent: DPRNN/DPLSTM/DPGRU against torch's nn.RNN/nn.LSTM/nn.GRU as oracles.

(a) outputs and final states equal torch's over a grid of settings, plain and packed; state dicts interchange;
(b) per-example gradients (vmap path) equal a brute-force loop over examples through the torch layer;
(c) the engine's clipped gradient (vmap and layerwise paths, packed sequences on the layerwise path) equals
    Σ_i clip(g_i, C) / N computed from that loop.
"""

import copy
import io
import itertools

import pytest
import torch
import torch.nn as nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence
from torch.utils.data import DataLoader, TensorDataset

import dpclip
from dpclip import ModelNotSupportedError, PrivacyEngine
from dpclip.recurrent import (
    DPGRU,
    DPLSTM,
    DPRNN,
    DPRNNBase,
    convert,
    dp_parameter_name,
    is_convertible,
    torch_parameter_name,
)

KINDS = ["rnn_tanh", "rnn_relu", "lstm", "gru"]
TOL = dict(atol=1e-5, rtol=1e-5)


def torch_layer(kind: str, input_size: int = 3, hidden_size: int = 5, **kwargs) -> nn.RNNBase:
    if kind == "lstm":
        return nn.LSTM(input_size, hidden_size, **kwargs)
    if kind == "gru":
        return nn.GRU(input_size, hidden_size, **kwargs)
    return nn.RNN(input_size, hidden_size, nonlinearity=kind.removeprefix("rnn_"), **kwargs)


def as_tuple(state):
    return state if isinstance(state, tuple) else (state,)


def close(a, b):
    torch.testing.assert_close(a, b, **TOL)


# ------------------------------------------------------------------------------------------------------
# (a) same function and state dict as torch
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("num_layers, bidirectional, batch_first, bias",
                         list(itertools.product([1, 2], [False, True], [False, True], [True, False])))
def test_outputs_states_and_gradients_equal_torch(kind, num_layers, bidirectional, batch_first, bias):
    torch.manual_seed(0)
    ref = torch_layer(kind, num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first, bias=bias)
    dp = convert(ref)
    assert type(dp) is {"lstm": DPLSTM, "gru": DPGRU}.get(kind, DPRNN)
    assert list(dp.state_dict()) == list(ref.state_dict())  # same keys, same order
    assert all(dp.state_dict()[k].shape == v.shape for k, v in ref.state_dict().items())

    batch, length = 4, 6
    x = torch.randn(batch, length, 3) if batch_first else torch.randn(length, batch, 3)
    states = num_layers * (2 if bidirectional else 1), batch, 5
    hx = tuple(torch.randn(states) for _ in range(2 if kind == "lstm" else 1))
    hx_arg = hx if kind == "lstm" else hx[0]

    for args in ((x,), (x, hx_arg)):
        (out_ref, state_ref), (out_dp, state_dp) = ref(*args), dp(*args)
        close(out_dp, out_ref)
        for s_dp, s_ref in zip(as_tuple(state_dp), as_tuple(state_ref), strict=True):
            close(s_dp, s_ref)

    # Packed sequences of varied lengths, unsorted (enforce_sorted=False) and sorted, with initial states.
    lengths = torch.tensor([2, 6, 1, 4])
    for order in (None, torch.tensor([1, 3, 0, 2])):
        xs, ls, h = x, lengths, hx
        if order is not None:  # already sorted by decreasing length
            xs = x[order] if batch_first else x[:, order]
            ls, h = lengths[order], tuple(s[:, order] for s in hx)
        packed = pack_padded_sequence(xs, ls, batch_first=batch_first, enforce_sorted=order is not None)
        h_arg = h if kind == "lstm" else h[0]
        (out_ref, state_ref), (out_dp, state_dp) = ref(packed, h_arg), dp(packed, h_arg)
        assert isinstance(out_dp, PackedSequence)
        assert torch.equal(out_dp.batch_sizes, out_ref.batch_sizes)
        for a, b in ((out_dp.sorted_indices, out_ref.sorted_indices), (out_dp.unsorted_indices, out_ref.unsorted_indices)):
            assert (a is None and b is None) or torch.equal(a, b)
        close(out_dp.data, out_ref.data)
        for s_dp, s_ref in zip(as_tuple(state_dp), as_tuple(state_ref), strict=True):
            close(s_dp, s_ref)

    # Batch gradients of a loss on output and final states match too (packed input, so masking is exercised).
    def loss(layer):
        out, state = layer(pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False), hx_arg)
        return out.data.square().sum() + sum(s.sin().sum() for s in as_tuple(state))

    g_ref = dict(zip([n for n, _ in ref.named_parameters()], torch.autograd.grad(loss(ref), list(ref.parameters()))))
    g_dp = torch.autograd.grad(loss(dp), list(dp.parameters()))
    for (name, _), g in zip(dp.named_parameters(), g_dp, strict=True):
        close(g, g_ref[torch_parameter_name(name)])


@pytest.mark.parametrize("kind", KINDS)
def test_unbatched_input(kind):
    torch.manual_seed(1)
    ref = torch_layer(kind, num_layers=2, bidirectional=True)
    dp = convert(ref)
    x = torch.randn(7, 3)
    hx = tuple(torch.randn(4, 5) for _ in range(2 if kind == "lstm" else 1))
    for args in ((x,), (x, hx if kind == "lstm" else hx[0])):
        (out_ref, state_ref), (out_dp, state_dp) = ref(*args), dp(*args)
        close(out_dp, out_ref)
        for s_dp, s_ref in zip(as_tuple(state_dp), as_tuple(state_ref), strict=True):
            assert s_dp.shape == s_ref.shape == (4, 5)
            close(s_dp, s_ref)


@pytest.mark.parametrize("kind", KINDS)
def test_dropout_between_layers(kind):
    torch.manual_seed(2)
    ref = torch_layer(kind, num_layers=3, dropout=1.0, batch_first=True)
    dp = convert(ref)
    x = torch.randn(2, 5, 3)
    # dropout=1 zeroes every layer's input but the first's in training: deterministic, so torch is an exact oracle.
    for training in (True, False):
        ref.train(training), dp.train(training)
        close(dp(x)[0], ref(x)[0])
    dp.dropout = 0.5
    dp.train()
    assert not torch.allclose(dp(x)[0], dp.eval()(x)[0])  # p=0.5 drops something in training...
    one = convert(torch_layer(kind, num_layers=1, batch_first=True)).train()
    one.dropout = 0.5
    close(one(x)[0], one.eval()(x)[0])  # ...but never after the last layer


def test_state_dict_round_trips_both_ways():
    torch.manual_seed(3)
    ref = nn.LSTM(3, 5, num_layers=2, bidirectional=True)
    dp = DPLSTM(3, 5, num_layers=2, bidirectional=True)
    assert not torch.equal(dp.weight_ih_l0, ref.weight_ih_l0)
    assert dp.load_state_dict(ref.state_dict()) is not None  # strict: every key matched
    for key, value in ref.state_dict().items():
        assert torch.equal(dp.state_dict()[key], value)
    assert dp.weight_hh_l1_reverse is dp.hh_l1_reverse.weight and dp.bias_ih_l0 is dp.ih_l0.bias

    # And back: a DP checkpoint loads into torch's module, also through torch.save/torch.load and a parent module.
    torch.nn.init.normal_(dp.hh_l0.weight)
    fresh = nn.LSTM(3, 5, num_layers=2, bidirectional=True)
    fresh.load_state_dict(dp.state_dict())
    assert torch.equal(fresh.weight_hh_l0, dp.hh_l0.weight)
    parent_dp, parent_ref = nn.Sequential(nn.Identity(), dp), nn.Sequential(nn.Identity(), fresh)
    buffer = io.BytesIO()
    torch.save(parent_dp.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    assert list(saved) == list(parent_ref.state_dict())
    assert not any("ih_l0" == k.split(".")[-1] for k in saved._metadata)  # no entries for the inner Linear layers
    parent_ref.load_state_dict(saved)
    parent_dp.load_state_dict(parent_ref.state_dict())
    x = torch.randn(4, 2, 3)
    close(parent_dp[1](x)[0], parent_ref[1](x)[0])

    # The DP layer's own names also load (e.g. a dict built from named_parameters()).
    dp.load_state_dict({name: p.detach().clone() for name, p in dp.named_parameters()})

    # Mismatches are reported under torch's names.
    no_bias = nn.LSTM(3, 5, num_layers=2, bidirectional=True, bias=False)
    result = dp.load_state_dict(no_bias.state_dict(), strict=False)
    assert "bias_ih_l0" in result.missing_keys and not any(".bias" in k for k in result.missing_keys)
    with pytest.raises(RuntimeError, match="bias_hh_l1_reverse"):
        dp.load_state_dict(no_bias.state_dict())
    with pytest.raises(RuntimeError, match="Unexpected key.*bias_ih_l0"):
        DPLSTM(3, 5, num_layers=2, bidirectional=True, bias=False).load_state_dict(ref.state_dict())


def test_names_attributes_and_conversion_helpers():
    assert torch_parameter_name("enc.rnn.ih_l1_reverse.weight") == "enc.rnn.weight_ih_l1_reverse"
    assert torch_parameter_name("hh_l0.bias") == "bias_hh_l0"
    assert torch_parameter_name("head.weight") == "head.weight"
    assert dp_parameter_name("enc.rnn.weight_ih_l1_reverse") == "enc.rnn.ih_l1_reverse.weight"
    assert dp_parameter_name("bias_hh_l0") == "hh_l0.bias"

    ref = nn.GRU(3, 4, num_layers=2, bias=False, dtype=torch.float64).eval()
    ref.weight_hh_l1.requires_grad_(False)
    dp = convert(ref)
    assert dp.hh_l1.weight.dtype == torch.float64 and not dp.training
    assert not dp.weight_hh_l1.requires_grad and dp.weight_ih_l1.requires_grad
    assert [[w.shape for w in group] for group in dp.all_weights] == [[w.shape for w in group] for group in ref.all_weights]
    with pytest.raises(AttributeError):
        dp.bias_ih_l0  # noqa: B018 - no biases with bias=False
    back = dp.to_module()
    assert type(back) is nn.GRU and not back.weight_hh_l1.requires_grad
    for key, value in ref.state_dict().items():
        assert torch.equal(back.state_dict()[key], value)
    copied = copy.deepcopy(dp)
    assert list(copied.state_dict()) == list(ref.state_dict())
    assert "3, 4, num_layers=2, bias=False" in repr(dp)
    dp.flatten_parameters()
    assert is_convertible(nn.LSTM(2, 2)) and not is_convertible(nn.LSTMCell(2, 2))


def test_refusals_are_clear():
    with pytest.raises(ModelNotSupportedError, match=r"encoder\.lstm \(LSTM with proj_size=2\).*proj_size=0"):
        dpclip.fix_model(ProjectedEncoder())
    with pytest.raises(ModelNotSupportedError, match="proj_size=0"):
        DPLSTM(3, 5, proj_size=2)
    with pytest.raises(TypeError, match="convert"):
        DPGRU.from_module(nn.LSTM(3, 5))
    with pytest.raises(TypeError, match="exact types"):
        convert(nn.LSTMCell(3, 5))
    with pytest.raises(ValueError, match="nonlinearity"):
        DPRNN(3, 5, nonlinearity="gelu")
    with pytest.raises(ValueError, match="h0 must have shape"):
        DPRNN(3, 5)(torch.randn(6, 4, 3), torch.zeros(1, 3, 5))
    with pytest.raises(ValueError, match="input has 2 features"):
        DPGRU(3, 5)(torch.randn(6, 4, 2))
    with pytest.raises(ValueError, match="PackedSequence"):
        DPGRU(3, 5)(torch.randn(6))


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh"])
def test_what_torch_refuses_the_replacements_refuse(kind):
    """A sequence of length 0 (torch: "Expected sequence length to be larger than 0"; the replacement returned an
    empty output and h_0 as h_n) and an input whose dtype is not the weights' (torch names the conversion; the
    replacement raised matmul's dtype error)."""
    layer = torch_layer(kind)
    fixed = dpclip.fix_model(copy.deepcopy(layer))
    for bad in (torch.randn(0, 2, 3), torch.randn(0, 3)):
        with pytest.raises(RuntimeError, match="sequence length"):
            layer(bad)
        with pytest.raises(ValueError, match="no time steps"):
            fixed(bad)
    with pytest.raises(ValueError, match="dtype"):
        layer(torch.randn(5, 2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"input dtype torch.float64 differs .*x.to\(torch.float32\)"):
        fixed(torch.randn(5, 2, 3, dtype=torch.float64))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts inside: no dtype refusal
        fixed(torch.randn(5, 2, 3, dtype=torch.bfloat16))


class ProjectedEncoder(nn.Module):
    """A model whose projected LSTM sits at encoder.lstm."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.lstm = nn.LSTM(3, 5, proj_size=2)


# ------------------------------------------------------------------------------------------------------
# fix_model / model_problems
# ------------------------------------------------------------------------------------------------------
def test_model_problems_and_fix_model():
    torch.manual_seed(4)
    model = nn.ModuleDict({"lstm": nn.LSTM(3, 5), "gru": nn.GRU(3, 5), "rnn": nn.RNN(3, 5, nonlinearity="relu")})
    problems = dpclip.model_problems(model)
    assert len(problems) == 3
    assert all("dpclip.fix_model(model)" in p for p in problems)
    assert any(p.startswith("lstm (LSTM)") and "DPLSTM" in p for p in problems)
    x = torch.randn(6, 2, 3)
    before = {k: m(x) for k, m in model.items()}
    keys = list(model.state_dict())
    fixed = dpclip.fix_model(model)
    assert fixed is model and dpclip.model_problems(model) == []
    assert (type(model["lstm"]), type(model["gru"]), type(model["rnn"])) == (DPLSTM, DPGRU, DPRNN)
    assert model["rnn"].nonlinearity == "relu" and list(model.state_dict()) == keys
    assert [model[k].mode for k in ("lstm", "gru", "rnn")] == ["LSTM", "GRU", "RNN_RELU"]
    for k, m in model.items():
        for a, b in zip(as_tuple(m(x)[1]), as_tuple(before[k][1]), strict=True):
            close(a, b)
    # Every parameter is owned by a plain nn.Linear, so the Linear fast path serves the whole layer.
    owners = {type(m) for m in model.modules() if any(True for _ in m.parameters(recurse=False))}
    assert owners == {nn.Linear}

    # A bare layer is returned replaced; subclasses and projected LSTMs are reported, not replaced.
    assert isinstance(dpclip.fix_model(nn.GRU(3, 5)), DPGRU)

    class MyLSTM(nn.LSTM):
        pass

    odd = nn.Sequential(MyLSTM(3, 5))
    assert "subclass of nn.LSTM" in dpclip.model_problems(odd)[0]
    assert type(dpclip.fix_model(odd)[0]) is MyLSTM
    assert "proj_size=2" in dpclip.model_problems(nn.Sequential(nn.LSTM(3, 5, proj_size=2)))[0]
    mixed = nn.Sequential(nn.GRU(3, 5), nn.LSTM(5, 5, proj_size=2))
    with pytest.raises(ModelNotSupportedError, match=r"1 \(LSTM with proj_size=2\)"):
        dpclip.fix_model(mixed)
    assert type(mixed[0]) is nn.GRU  # refused before anything was replaced


def test_engine_refuses_a_torch_lstm_and_points_to_fix_model():
    model = Tagger(nn.LSTM(3, 5, batch_first=True))
    data = TensorDataset(torch.randn(8, 4, 3), torch.randn(8, model.out_features))
    with pytest.raises(ModelNotSupportedError, match=r"rnn \(LSTM\).*dpclip\.fix_model\(model\)"):
        PrivacyEngine().make_private(model, torch.optim.SGD(model.parameters(), lr=0.0), DataLoader(data, batch_size=4),
                                     noise_multiplier=1.0, max_grad_norm=1.0)


# ------------------------------------------------------------------------------------------------------
# (b), (c): per-example gradients against a brute-force loop through the torch layer
# ------------------------------------------------------------------------------------------------------
class Tagger(nn.Module):
    """Recurrent layer → Linear head. Input is batch-first at the model's boundary ([B, T, F]) whatever the layer's
    ``batch_first``; with ``lengths`` the batch is packed before the layer. Output [B, K]: the head summed over each
    example's valid steps, and the final states."""

    def __init__(self, rnn: nn.Module, classes: int = 2) -> None:
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(rnn.hidden_size * (2 if rnn.bidirectional else 1), classes)
        states = rnn.num_layers * (2 if rnn.bidirectional else 1) * rnn.hidden_size
        self.out_features = classes + states * (2 if isinstance(rnn, (nn.LSTM, DPLSTM)) else 1)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        first = self.rnn.batch_first
        seq = x if first else x.transpose(0, 1)
        if lengths is not None:
            seq = pack_padded_sequence(seq, lengths.cpu(), batch_first=first, enforce_sorted=False)
        out, state = self.rnn(seq)
        if lengths is not None:
            out, _ = pad_packed_sequence(out, batch_first=first, total_length=x.shape[1])
        out = out if first else out.transpose(0, 1)
        mask = torch.ones(x.shape[:2]) if lengths is None else (torch.arange(x.shape[1])[None] < lengths[:, None]).float()
        pooled = (self.head(out) * mask[..., None]).sum(dim=1)
        states = [s.transpose(0, 1).flatten(1) for s in as_tuple(state)]
        return torch.cat([pooled, *states], dim=1)


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (out - y).square().sum()


def brute_force(ref: Tagger, x, y, lengths=None) -> dict[str, torch.Tensor]:
    """Each example alone (its valid steps only, no packing) through the torch model: {torch name: [N, *shape]}."""
    names, params = zip(*[(n, p) for n, p in ref.named_parameters()])
    per_example = []
    for i in range(x.shape[0]):
        steps = x.shape[1] if lengths is None else int(lengths[i])
        grads = torch.autograd.grad(loss_fn(ref(x[i : i + 1, :steps]), y[i : i + 1]), params)
        per_example.append(grads)
    return {n: torch.stack(gs) for n, gs in zip(names, zip(*per_example))}


def make_case(kind, seed=5, n=6, length=5, **kwargs):
    torch.manual_seed(seed)
    ref = Tagger(torch_layer(kind, **kwargs))
    x = torch.randn(n, length, 3)
    y = torch.randn(n, ref.out_features)
    model = dpclip.fix_model(copy.deepcopy(ref))
    assert isinstance(model.rnn, DPRNNBase)
    return ref, model, x, y


CASES = [
    ("lstm", dict(num_layers=2, bidirectional=True, batch_first=False)),
    ("lstm", dict(num_layers=1, batch_first=True, bias=False)),
    ("gru", dict(num_layers=2, bidirectional=True, batch_first=True)),
    ("rnn_tanh", dict(num_layers=2, batch_first=False)),
    ("rnn_relu", dict(num_layers=1, bidirectional=True, batch_first=True)),
]


@pytest.mark.parametrize("kind, kwargs", CASES)
def test_per_sample_grads_equal_brute_force(kind, kwargs):
    ref, model, x, y = make_case(kind, **kwargs)
    oracle = brute_force(ref, x, y)
    got = dpclip.per_sample_grads(model, loss_fn, x, y)
    assert {torch_parameter_name(n) for n in got} == set(oracle)  # names map 1:1
    for name, g in got.items():
        close(g, oracle[torch_parameter_name(name)])


def engine_gradient(model, x, y, lengths, mode, max_grad_norm) -> dict[str, torch.Tensor]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    tensors = (x, y) if lengths is None else (x, lengths, y)
    loader = DataLoader(TensorDataset(*tensors), batch_size=len(x))
    private, optimizer, loader = PrivacyEngine().make_private(
        model, optimizer, loader, noise_multiplier=1e-12, max_grad_norm=max_grad_norm, sample_rate=1.0,
        grad_sample_mode=mode, loss_reduction="sum",
    )
    batches = 0
    for batch in loader:
        *inputs, target = batch
        assert len(target) == len(x)  # sample_rate=1: every example, once
        optimizer.zero_grad()
        loss_fn(private(*inputs), target).backward()
        optimizer.step()
        batches += 1
    assert batches == 1
    return {torch_parameter_name(n): p.grad.clone() for n, p in model.named_parameters()}


def clipped_mean(oracle: dict[str, torch.Tensor], max_grad_norm: float) -> dict[str, torch.Tensor]:
    n = next(iter(oracle.values())).shape[0]
    norms = torch.sqrt(sum(g.reshape(n, -1).square().sum(dim=1) for g in oracle.values()))
    factors = (max_grad_norm / norms).clamp(max=1.0)
    return {name: (g * factors.view(-1, *[1] * (g.dim() - 1))).sum(dim=0) / n for name, g in oracle.items()}, norms


@pytest.mark.parametrize("mode", ["vmap", "layerwise"])
@pytest.mark.parametrize("kind, kwargs", CASES[:3] + CASES[4:])
def test_engine_clipped_gradient_equals_brute_force(mode, kind, kwargs):
    ref, model, x, y = make_case(kind, **kwargs)
    oracle = brute_force(ref, x, y)
    norms = clipped_mean(oracle, 1.0)[1]
    bound = float(norms.median())  # about half the examples are clipped
    expected, _ = clipped_mean(oracle, bound)
    got = engine_gradient(model, x, y, None, mode, bound)
    assert set(got) == set(expected)
    for name, g in expected.items():
        torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-5 * float(g.abs().max()))


@pytest.mark.parametrize("kind, kwargs", [CASES[0], CASES[2], CASES[4]])
def test_engine_with_packed_sequences_equals_brute_force(kind, kwargs):
    """A model that packs its padded batch (varied lengths): padded steps change neither output nor gradient."""
    ref, model, x, y = make_case(kind, seed=6, **kwargs)
    lengths = torch.tensor([5, 2, 4, 1, 5, 3])
    x = x * (torch.arange(5)[None] < lengths[:, None])[..., None]  # zero padding, as a collate function makes
    oracle = brute_force(ref, x, y, lengths)
    bound = float(clipped_mean(oracle, 1.0)[1].median())
    expected, _ = clipped_mean(oracle, bound)
    got = engine_gradient(model, x, y, lengths, "layerwise", bound)
    for name, g in expected.items():
        torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-5 * float(g.abs().max()))


class SharedRecurrent(nn.Module):
    """One nn.LSTM read by two sub-modules (``aliased``: or registered under two names of the model)."""

    def __init__(self, aliased: bool) -> None:
        super().__init__()
        rnn = nn.LSTM(3, 4, batch_first=True)
        if aliased:
            self.enc = self.dec = rnn
        else:
            self.a, self.b = nn.Module(), nn.Module()
            self.a.rnn = self.b.rnn = rnn
        self.aliased, self.head = aliased, nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, second = (self.enc, self.dec) if self.aliased else (self.a.rnn, self.b.rnn)
        return self.head(torch.cat([first(x)[0][:, -1], second(x.flip(1))[0][:, -1]], dim=-1))


@pytest.mark.parametrize("aliased", [False, True], ids=["two sub-modules", "two names"])
@pytest.mark.parametrize("mode", ["auto", "layerwise"])  # (vmap refuses a module registered twice, by name)
def test_fix_model_keeps_a_shared_recurrent_layer_shared(aliased, mode):
    """fix_model replaced each place an LSTM was registered: shared by two sub-modules it became two independent
    DPLSTMs (162 parameters → 306; the release 14 % of the scale off the tied model's clipped sum); under two names
    of one parent the second name kept the nn.LSTM. Now one DPLSTM, shared the same way; the release equals the
    brute force on the original tied model."""
    torch.manual_seed(0)
    ref = SharedRecurrent(aliased).double()
    model = dpclip.fix_model(copy.deepcopy(ref))
    first, second = (model.enc, model.dec) if aliased else (model.a.rnn, model.b.rnn)
    assert isinstance(first, DPRNNBase) and first is second
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in ref.parameters())
    x, y = torch.randn(6, 5, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    names, params = zip(*ref.named_parameters())
    oracle = {n: torch.stack(gs) for n, gs in zip(names, zip(*[
        torch.autograd.grad(loss_fn(ref(x[i : i + 1]), y[i : i + 1]), params) for i in range(6)]))}
    bound = float(clipped_mean(oracle, 1.0)[1].median())
    expected, _ = clipped_mean(oracle, bound)
    got = engine_gradient(model, x, y, None, mode, bound)
    assert set(got) == set(expected)
    for name, g in expected.items():
        torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-5 * float(g.abs().max()))


class PacksSorted(nn.Module):
    """Packs its padded batch with enforce_sorted=True (the batch must come sorted by length)."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn, self.head = dpclip.fix_model(nn.GRU(3, 4, batch_first=True)), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        _, h = self.rnn(pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=True))
        return self.head(h[-1])


def test_packed_batches_the_engine_cannot_cut_are_refused_with_the_fix():
    """A PackedSequence from the collate_fn was refused as "a batch of 25 examples" (its packed time steps) with a
    hint about transposes; packing with enforce_sorted=True was refused with torch's sorting error and no word on
    why the sorted batch failed (verification's own batches are not sorted). Both now say what to do."""
    g = torch.Generator().manual_seed(2)
    sequences = [(torch.randn(n, 3, generator=g), torch.randn(2, generator=g)) for n in (5, 1, 3, 5, 2, 4, 1, 4)]

    def packed(items):
        return torch.nn.utils.rnn.pack_sequence([x for x, _ in items], enforce_sorted=False), torch.stack([y for _, y in items])

    model = dpclip.fix_model(Tagger(nn.GRU(3, 4)))
    private, optimizer, loader = PrivacyEngine(seed=0).make_private(
        model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(sequences, batch_size=8, collate_fn=packed),
        noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=1.0)
    x, y = next(iter(loader))
    with pytest.raises(dpclip.EngineUsageError, match=r"called on a PackedSequence.*enforce_sorted=False"):
        private(x)
    lengths = torch.tensor([5, 5, 4, 4, 3, 2, 1, 1])
    padded = torch.randn(8, 5, 3, generator=g) * (torch.arange(5)[None, :, None] < lengths[:, None, None])
    model = PacksSorted()
    private, optimizer, loader = PrivacyEngine(seed=0).make_private(
        model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(TensorDataset(padded, lengths, torch.randn(8, 2)), batch_size=8),
        noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=1.0)
    x, n, y = next(iter(loader))
    with pytest.raises(ModelNotSupportedError, match=r"verification runs the model on batches it makes itself.*enforce_sorted=False"):
        loss_fn(private(x, n), y).backward()
