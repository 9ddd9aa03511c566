"""FrozenBatchNorm and fix_model(batchnorm="freeze"): a pretrained BatchNorm's eval-mode function in every mode."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import dpclip
from dpclip import FrozenBatchNorm, ModelNotSupportedError


def _pretrained(layer: nn.modules.batchnorm._BatchNorm, shape: tuple[int, ...]) -> nn.modules.batchnorm._BatchNorm:
    torch.manual_seed(0)
    layer.train()
    with torch.no_grad():
        for _ in range(4):
            layer(torch.randn(16, *shape) * 2.5 + 0.7)
        if layer.affine:
            layer.weight.uniform_(0.5, 1.5)
            layer.bias.uniform_(-0.5, 0.5)
    return layer


@pytest.mark.parametrize("layer,shape", [
    (nn.BatchNorm1d(5), (5,)),
    (nn.BatchNorm1d(5, affine=False), (5, 7)),
    (nn.BatchNorm2d(3, eps=1e-3), (3, 4, 4)),
    (nn.BatchNorm3d(2), (2, 3, 3, 3)),
])
def test_frozen_batchnorm_is_the_eval_mode_layer_in_every_mode(layer, shape):
    layer = _pretrained(layer, shape)
    x = torch.randn(6, *shape)
    layer.eval()
    expected = layer(x)
    frozen = FrozenBatchNorm.from_batchnorm(layer)
    statistics = (frozen.running_mean.clone(), frozen.running_var.clone())
    for mode in (True, False):
        frozen.train(mode)
        assert torch.equal(frozen(x), expected)
    # the statistics never move, and the state dict loads into a BatchNorm of the same shape and back
    assert torch.equal(frozen.running_mean, statistics[0]) and torch.equal(frozen.running_var, statistics[1])
    twin = type(layer)(layer.num_features, eps=layer.eps, affine=layer.affine)
    twin.load_state_dict(frozen.state_dict())
    twin.eval()
    assert torch.equal(twin(x), expected)
    if layer.affine:  # the affine parameters are the layer's own tensors, still trainable
        assert frozen.weight is layer.weight and frozen.weight.requires_grad


def test_fix_model_freeze_keeps_statistics_and_trains_privately():
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))
    _pretrained(model[1], (8,))
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    model.eval()
    expected = model(x)
    assert "batchnorm='freeze'" in dpclip.model_problems(model)[0]
    fixed = dpclip.fix_model(model, batchnorm="freeze")
    assert fixed is model and isinstance(model[1], FrozenBatchNorm) and dpclip.model_problems(model) == []
    model.train()
    assert torch.equal(model(x), expected)
    engine = dpclip.PrivacyEngine(seed=0)
    model_p, optimizer, loader = engine.make_private(
        model, torch.optim.SGD(model.parameters(), lr=0.1),
        torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=20),
        noise_multiplier=1.0, max_grad_norm=1.0)
    statistics = model[1].running_mean.clone()
    for xb, yb in loader:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model_p(xb), yb).backward()
        optimizer.step()
    assert engine.steps == 2 and torch.equal(model[1].running_mean, statistics)


def test_freeze_refuses_a_batchnorm_without_statistics_and_changes_nothing():
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 4), nn.BatchNorm1d(4, track_running_stats=False))
    with pytest.raises(ModelNotSupportedError, match=r"3 \(BatchNorm1d, track_running_stats=False\).*groupnorm"):
        dpclip.fix_model(model, batchnorm="freeze")
    assert isinstance(model[1], nn.BatchNorm1d) and isinstance(model[3], nn.BatchNorm1d)
    with pytest.raises(ValueError, match="'groupnorm' or 'freeze'"):
        dpclip.fix_model(model, batchnorm="frozen")


def test_a_lazy_batchnorm_is_told_to_run_a_forward_first():
    model = nn.Sequential(nn.Linear(3, 4), nn.LazyBatchNorm1d())
    assert "run one forward pass first" in dpclip.model_problems(model)[0]
    model(torch.randn(5, 3))  # built: now a BatchNorm1d, which fix_model freezes
    dpclip.fix_model(model, batchnorm="freeze")
    assert isinstance(model[1], FrozenBatchNorm) and dpclip.model_problems(model) == []


def test_a_lazy_layer_without_parameters_yet_is_refused_by_name_with_the_fix():
    """make_private let torch's raw ValueError (an uninitialised parameter) escape; now dpclip's refusal names the
    layer and says to run a forward first, after which the model trains."""
    model = nn.Sequential(nn.LazyLinear(4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    with pytest.raises(ModelNotSupportedError, match=r"0 \(LazyLinear\) is a lazy layer.*run one forward pass"):
        dpclip.PrivacyEngine(seed=0).make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), loader,
                                                  noise_multiplier=1.0, max_grad_norm=1.0)
    with torch.no_grad():
        model(x[:2])
    engine = dpclip.PrivacyEngine(seed=0)
    private, optimizer, batches = engine.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), loader,
                                                      noise_multiplier=1.0, max_grad_norm=1.0)
    for xb, yb in batches:
        optimizer.zero_grad()
        nn.functional.cross_entropy(private(xb), yb).backward()
        optimizer.step()
    assert engine.steps == 2
