"""Clipping against hand-computed references; noise against its distribution (statistical tests)."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from dpclip import NoiseSource, add_noise, clip, clipped_sum, per_example_norms
from dpclip.clipping import MedianClipping


def _grads():
    torch.manual_seed(1)
    return {"w": torch.randn(5, 3, 4) * torch.tensor([0.1, 1, 3, 0.01, 10]).reshape(5, 1, 1), "b": torch.randn(5, 3)}


@pytest.mark.parametrize("norm", ["l2", "l1"])
def test_clipped_sum_matches_a_numpy_reference(norm):
    grads = _grads()
    flat = np.concatenate([grads["w"].reshape(5, -1).numpy(), grads["b"].numpy()], axis=1).astype(np.float64)
    norms = np.linalg.norm(flat, ord=2 if norm == "l2" else 1, axis=1)
    clipped = flat * np.minimum(1.0, 0.8 / norms)[:, None]
    expected = clipped.sum(axis=0)
    got = clipped_sum(grads, 0.8, norm)
    np.testing.assert_allclose(np.concatenate([got["w"].reshape(-1).numpy(), got["b"].numpy()]), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(per_example_norms(grads, norm).numpy(), norms, rtol=1e-5)
    after = per_example_norms(clip(grads, 0.8, norm), norm).numpy()
    assert np.all(after <= 0.8)
    np.testing.assert_allclose(after, np.minimum(norms, 0.8), rtol=1e-5)


@pytest.mark.parametrize("norm", ["l2", "l1"])
def test_per_layer_clipping_bounds_the_whole_gradient(norm):
    grads = _grads()
    clipped = clip(grads, 1.0, norm, per_layer=True)
    bound = 2**-0.5 if norm == "l2" else 0.5  # C_k with Σ C_k² = C² (L2) or Σ C_k = C (L1), two parts
    for g in clipped.values():
        assert torch.all(per_example_norms({"x": g}, norm) <= bound)
    assert torch.all(per_example_norms(clipped, norm) <= 1.0)


def test_zero_and_small_gradients_are_untouched():
    grads = {"w": torch.tensor([[0.0, 0.0], [0.3, 0.4]])}
    torch.testing.assert_close(clip(grads, 1.0)["w"], grads["w"])


@pytest.mark.parametrize("norm, scale", [("l2", 0.7), ("l1", 0.7)])
def test_noise_has_the_calibrated_distribution(norm, scale):
    """200k noise coordinates around a zero sum: Kolmogorov–Smirnov against N(0, (σC)²) or Laplace(0, λC),
    rejecting at the 1e-3 level; moments within 1% (several standard errors at this sample size)."""
    summed = {"w": torch.zeros(400, 500)}
    noisy = add_noise(summed, noise_multiplier=scale, max_norm=2.0, norm=norm, source=NoiseSource(seed=7))["w"]
    values = noisy.double().numpy().ravel()
    spread = scale * 2.0
    if norm == "l2":
        assert stats.kstest(values, "norm", args=(0, spread)).pvalue > 1e-3
        assert values.std() == pytest.approx(spread, rel=0.01)
    else:
        assert stats.kstest(values, "laplace", args=(0, spread)).pvalue > 1e-3
        assert np.abs(values).mean() == pytest.approx(spread, rel=0.01)  # E|X| = b for Laplace(0, b)
    assert abs(values.mean()) < 5 * values.std() / math.sqrt(values.size)


def test_noise_is_drawn_on_the_parameters_device():
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        summed = {"w": torch.zeros(1000, device=device)}
        noisy = add_noise(summed, 1.0, 1.0, "l2", NoiseSource(seed=0))["w"]
        assert noisy.device.type == device
        assert noisy.std().item() == pytest.approx(1.0, rel=0.1)


def test_seeded_noise_is_reproducible_and_secure_mode_is_not():
    a = add_noise({"w": torch.zeros(10)}, 1.0, 1.0, "l2", NoiseSource(seed=3))["w"]
    b = add_noise({"w": torch.zeros(10)}, 1.0, 1.0, "l2", NoiseSource(seed=3))["w"]
    torch.testing.assert_close(a, b)
    secure = NoiseSource(secure_mode=True)
    c = add_noise({"w": torch.zeros(10)}, 1.0, 1.0, "l2", secure)["w"]
    d = add_noise({"w": torch.zeros(10)}, 1.0, 1.0, "l2", secure)["w"]
    assert not torch.equal(c, d)
    with pytest.raises(ValueError, match="secure_mode"):
        NoiseSource(seed=1, secure_mode=True)


def test_median_update_is_the_geometric_rule_of_andrew_et_al():
    clipping = MedianClipping(1.0, target_quantile=0.5, learning_rate=0.2, count_noise_multiplier=1.0)
    norms = torch.tensor([0.5, 0.7, 2.0, 3.0, 4.0])  # 2 of 5 below C
    centred = float(clipping.centred_count(norms))
    assert centred == 2 - 2.5
    new = clipping.update(centred, expected_batch_size=5.0)
    assert new == pytest.approx(math.exp(-0.2 * (0.4 - 0.5)))


def test_complex_gradients_are_refused_by_the_norm_and_the_noise():
    """A complex tensor's .float() keeps its real part, and normal_ on it gives each real coordinate std/√2: both
    the clipping norm and the noise would be too small for the charged σ·C, so both refuse complex input."""
    from dpclip.errors import ModelNotSupportedError

    grads = {"w": torch.full((3, 2), 1 + 1j, dtype=torch.complex64)}  # 3 examples, |g| = 2 each, real part √2
    with pytest.raises(ModelNotSupportedError, match="complex.*view_as_complex"):
        per_example_norms(grads)
    with pytest.raises(ModelNotSupportedError, match="complex.*view_as_complex"):
        NoiseSource(seed=0).noisy(grads["w"][0], 1.0, "gaussian")


@pytest.mark.parametrize("law, secure", [("gaussian", False), ("laplace", False), ("gaussian", True), ("laplace", True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_a_sparse_sum_gets_the_release_of_its_dense_form(law, secure, dtype):
    """A clipped sum handed over as a sparse COO tensor (an embedding's rows, duplicates not added up) is released
    as its dense form would be: the same draws (same seed), the same values up to the order of two additions; in
    secure mode (made dense before clamping and snapping) on the snapping grid."""
    from dpclip.noise import snapping_grid

    torch.manual_seed(0)
    ids = torch.tensor([[0, 3, 3, 7, 1, 3]])
    rows = torch.randn(6, 4, dtype=dtype)
    sparse = torch.sparse_coo_tensor(ids, rows, (9, 4))
    dense = sparse.to_dense()
    source = (lambda: NoiseSource(secure_mode=True)) if secure else (lambda: NoiseSource(seed=5))
    got = source().noisy(sparse, 0.7, law, factor=0.25)
    expected = source().noisy(dense, 0.7, law, factor=0.25)
    assert not got.is_sparse and got.dtype == dtype and got.shape == (9, 4)
    if secure:  # fresh OS draws each time: the release is the snapped sum on the grid Λ, times the factor
        assert bool(torch.isfinite(got).all())
        if dtype != torch.bfloat16:
            steps = got.double() / 0.25 / snapping_grid(0.7)
            torch.testing.assert_close(steps, steps.round(), atol=1e-3, rtol=0)
    else:
        tolerance = {torch.float32: 1e-6, torch.float64: 1e-12, torch.bfloat16: 1e-2}[dtype]
        torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)


def test_a_sparse_sum_without_noise_is_released_dense():
    sparse = torch.sparse_coo_tensor(torch.tensor([[2, 2, 0]]), torch.ones(3, 2), (4, 2))
    released = add_noise({"w": sparse}, 0.0, 1.0, "l2", NoiseSource(seed=0), factor=0.5)["w"]
    assert not released.is_sparse
    torch.testing.assert_close(released, torch.tensor([[0.5, 0.5], [0.0, 0.0], [1.0, 1.0], [0.0, 0.0]]))
