"""Fashion-MNIST for the utility benchmark: the IDX reader, the ScatterNet features, and benchmarks/utility.py.

Independent references: IDX files written byte by byte here (hand-written pixel and label values); kymatio 0.3.0's
Scattering2D for the scattering transform; dp_accounting's PLD accountant for the ε of the benchmark's runs
(including the release of the normalisation statistics); hand-computed step counts and sample rates.
"""

from __future__ import annotations

import gzip
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dpclip_examples.fashion_mnist import (
    DEFAULT_DATA_DIR,
    FashionMNISTNotFoundError,
    IDXFormatError,
    load_fashion_mnist,
    read_idx,
    read_idx_images,
    read_idx_labels,
    validation_split,
)
from dpclip_examples.scattering import Scattering2D

ROOT = Path(__file__).resolve().parent.parent
NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


# -- IDX fixtures, written byte by byte ---------------------------------------------------------------------------
def _idx_bytes(magic: int, dims: tuple[int, ...], payload: bytes) -> bytes:
    return magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims) + payload


def _write(path: Path, data: bytes, gz: bool) -> Path:
    path = path.with_name(path.name + ".gz") if gz else path
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def _images(values: list[int]) -> bytes:
    """One 28×28 image per value: every pixel = value, except pixel (row 3, column 5) = 255 − value."""
    out = bytearray()
    for v in values:
        image = bytearray([v] * 784)
        image[3 * 28 + 5] = 255 - v
        out += image
    return bytes(out)


TRAIN_VALUES, TRAIN_LABELS = [0, 17, 200, 255, 42], [9, 0, 3, 3, 7]
TEST_VALUES, TEST_LABELS = [1, 128, 99], [2, 5, 8]


def _fixture(folder: Path, gz: bool, train_labels: list[int] = TRAIN_LABELS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    _write(folder / NAMES[0], _idx_bytes(2051, (5, 28, 28), _images(TRAIN_VALUES)), gz)
    _write(folder / NAMES[1], _idx_bytes(2049, (len(train_labels),), bytes(train_labels)), gz)
    _write(folder / NAMES[2], _idx_bytes(2051, (3, 28, 28), _images(TEST_VALUES)), gz)
    _write(folder / NAMES[3], _idx_bytes(2049, (3,), bytes(TEST_LABELS)), gz)
    return folder


@pytest.mark.parametrize("gz", [True, False], ids=["gzipped", "plain"])
def test_loader_reads_the_fixture_values(tmp_path: Path, gz: bool) -> None:
    data = load_fashion_mnist(_fixture(tmp_path, gz))
    assert data.train_images.dtype == np.uint8 and data.train_images.shape == (5, 28, 28)
    assert data.test_images.shape == (3, 28, 28)
    assert data.train_labels.dtype == np.int64 and data.train_labels.tolist() == TRAIN_LABELS
    assert data.test_labels.tolist() == TEST_LABELS
    for images, values in ((data.train_images, TRAIN_VALUES), (data.test_images, TEST_VALUES)):
        for image, v in zip(images, values):
            assert image[3, 5] == 255 - v
            assert image[0, 0] == v and image[27, 27] == v and image[3, 4] == v and image[4, 5] == v
            assert int(image.astype(np.int64).sum()) == 783 * v + (255 - v)
    assert all(p.name.endswith(".gz") == gz for p in data.files.values())


def test_read_idx_small_array_row_major(tmp_path: Path) -> None:
    path = _write(tmp_path / "small", _idx_bytes(2051, (2, 2, 3), bytes(range(10, 22))), gz=False)
    assert read_idx_images(path).tolist() == [[[10, 11, 12], [13, 14, 15]], [[16, 17, 18], [19, 20, 21]]]
    labels = _write(tmp_path / "labels", _idx_bytes(2049, (4,), bytes([0, 9, 4, 255])), gz=True)
    assert read_idx_labels(labels).tolist() == [0, 9, 4, 255]


def test_bad_magic_numbers_are_refused(tmp_path: Path) -> None:
    images_as_labels = _write(tmp_path / "a", _idx_bytes(2049, (3,), bytes(3)), gz=False)
    with pytest.raises(IDXFormatError, match="magic number 2049, expected 2051"):
        read_idx_images(images_as_labels)
    labels_as_images = _write(tmp_path / "b", _idx_bytes(2051, (1, 1, 1), bytes(1)), gz=True)
    with pytest.raises(IDXFormatError, match="magic number 2051, expected 2049"):
        read_idx_labels(labels_as_images)
    floats = _write(tmp_path / "c", _idx_bytes(0x00000D01, (1,), bytes(4)), gz=False)  # type 0x0D: float32
    with pytest.raises(IDXFormatError, match="not an IDX file of unsigned bytes"):
        read_idx(floats)
    with pytest.raises(IDXFormatError):
        read_idx(_write(tmp_path / "d", b"\x00\x00", gz=False))


def test_lengths_and_counts_must_match(tmp_path: Path) -> None:
    truncated = _write(tmp_path / "t", _idx_bytes(2051, (2, 28, 28), bytes(784 + 10)), gz=True)
    with pytest.raises(IDXFormatError, match=r"\(1568 bytes of data\).*794 bytes"):
        read_idx_images(truncated)
    with pytest.raises(IDXFormatError, match="holds 5 images but .* holds 4 labels"):
        load_fashion_mnist(_fixture(tmp_path / "mismatch", gz=True, train_labels=[1, 2, 3, 4]))
    with pytest.raises(IDXFormatError, match="labels must be in 0..9"):
        load_fashion_mnist(_fixture(tmp_path / "label12", gz=False, train_labels=[1, 2, 12, 4, 5]))


def test_missing_folder_says_what_was_looked_for_and_how_to_get_it(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as info:
        load_fashion_mnist(missing)
    assert isinstance(info.value, FashionMNISTNotFoundError)
    message = str(info.value)
    assert str(missing) in message and "does not exist" in message
    for name in NAMES:
        assert f"{name}.gz" in message
    assert "sudo apt-get install dataset-fashion-mnist" in message and "--data-dir" in message
    # one file missing: named
    folder = _fixture(tmp_path / "three", gz=True)
    (folder / f"{NAMES[3]}.gz").unlink()
    with pytest.raises(FashionMNISTNotFoundError, match=f"lacks {NAMES[3]}.gz"):
        load_fashion_mnist(folder)


def test_validation_split_is_deterministic_disjoint_and_complete() -> None:
    train, held = validation_split(1000, 150, seed=3)
    assert len(train) == 850 and len(held) == 150
    assert np.intersect1d(train, held).size == 0 and np.union1d(train, held).tolist() == list(range(1000))
    again_train, again_held = validation_split(1000, 150, seed=3)
    assert np.array_equal(train, again_train) and np.array_equal(held, again_held)
    assert not np.array_equal(held, validation_split(1000, 150, seed=4)[1])
    with pytest.raises(ValueError):
        validation_split(10, 10)


@pytest.mark.skipif(not DEFAULT_DATA_DIR.is_dir(), reason=f"Fashion-MNIST is not installed in {DEFAULT_DATA_DIR}")
def test_installed_fashion_mnist_has_the_published_sizes() -> None:
    data = load_fashion_mnist()
    assert data.train_images.shape == (60000, 28, 28) and data.test_images.shape == (10000, 28, 28)
    # Fashion-MNIST is balanced: 6,000 training and 1,000 test images per class (Xiao et al. 2017, Table 1)
    assert np.bincount(data.train_labels).tolist() == [6000] * 10
    assert np.bincount(data.test_labels).tolist() == [1000] * 10


# -- the scattering transform against kymatio -----------------------------------------------------------------------
def _kymatio():
    """kymatio 0.3.0's torch frontend. Its package imports its 3-D module, which imports scipy.special.sph_harm,
    removed in scipy 1.17: a shim from sph_harm_y (only the 3-D transform would call it) lets the import through."""
    import scipy.special

    if not hasattr(scipy.special, "sph_harm"):
        scipy.special.sph_harm = lambda m, n, theta, phi: scipy.special.sph_harm_y(n, m, phi, theta)
    try:
        from kymatio.torch import Scattering2D as Kymatio
    except ImportError as error:
        pytest.skip(f"kymatio is not importable ({error}); install the test extra: pip install -e '.[test]'")
    return Kymatio


@pytest.mark.parametrize(
    ("J", "shape", "L", "max_order"),
    [(2, (28, 28), 8, 2), (3, (32, 32), 4, 2), (1, (16, 24), 6, 1)],
    ids=["fashion-mnist", "J3", "J1-order1"],
)
def test_scattering_matches_kymatio(J: int, shape: tuple[int, int], L: int, max_order: int) -> None:
    Kymatio = _kymatio()
    x = torch.rand(7, *shape, generator=torch.Generator().manual_seed(J))
    reference = Kymatio(J=J, shape=shape, L=L, max_order=max_order)(x)
    mine = Scattering2D(J=J, shape=shape, L=L, max_order=max_order, chunk_size=3)(x)  # chunks: 3 + 3 + 1
    assert mine.shape == reference.shape
    assert float((mine - reference).abs().max()) <= 1e-6 * float(reference.abs().max())


def test_scattering_features_of_uint8_images_match_kymatio() -> None:
    Kymatio = _kymatio()
    images = np.random.default_rng(0).integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    reference = Kymatio(J=2, shape=(28, 28), L=8)(torch.from_numpy(images).float() / 255.0)
    features = Scattering2D(J=2, shape=(28, 28), L=8).features(images)
    assert features.shape == (5, 81, 7, 7) and features.dtype == torch.float32
    assert float((features - reference).abs().max()) <= 1e-6
    # leading batch dimensions are kept
    batched = Scattering2D(J=2, shape=(28, 28), L=8)(torch.from_numpy(images[:4]).float().reshape(2, 2, 28, 28) / 255.0)
    assert batched.shape == (2, 2, 81, 7, 7)
    assert float((batched.reshape(4, 81, 7, 7) - reference[:4]).abs().max()) <= 1e-6


# -- benchmarks/utility.py --smoke -------------------------------------------------------------------------------
def _random_fashion(folder: Path, n_train: int, n_test: int) -> Path:
    """A stand-in data set (the real one need not be installed): class k's images are bright in row band k."""
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    for (images_name, labels_name), n in (((NAMES[0], NAMES[1]), n_train), ((NAMES[2], NAMES[3]), n_test)):
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        images = rng.integers(0, 60, size=(n, 28, 28), dtype=np.uint8)
        for i, k in enumerate(labels):
            images[i, 2 + 2 * k: 4 + 2 * k, 4:24] = 230
        _write(folder / images_name, _idx_bytes(2051, (n, 28, 28), images.tobytes()), gz=True)
        _write(folder / labels_name, _idx_bytes(2049, (n,), labels.tobytes()), gz=True)
    return folder


def _oracle_epsilon(run: dict, prior_noise: float | None) -> float:
    """dp_accounting's PLD ε of the run's history: the normalisation release (two Gaussian mechanisms on the whole
    data set), then ``steps`` Poisson-sampled Gaussian steps."""
    dpa = pytest.importorskip("dp_accounting")
    steps = dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(run["q"], dpa.GaussianDpEvent(run["sigma"])), run["steps"])
    events = [steps] if prior_noise is None else [dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(prior_noise), 2), steps]
    oracle = dpa.pld.PLDAccountant(value_discretization_interval=1e-4)
    return oracle.compose(dpa.ComposedDpEvent(events)).get_epsilon(1e-5)


def test_utility_smoke_run(tmp_path: Path) -> None:
    data = _random_fashion(tmp_path / "data", 400, 150)
    out = tmp_path / "out"
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "utility.py"), "--smoke", "--data-dir", str(data), "--out", str(out),
         "--epsilons", "3", "--set", "normalization=data", "norm_noise=8"],
        check=True, capture_output=True, text=True, timeout=300,
    )
    report = json.loads((out / "utility_fashion_mnist_smoke.json").read_text())
    runs = {(r["model"], r["library"]): r for r in report["runs"]}
    assert set(runs) == {(m, lib) for m in ("scatternet", "cnn") for lib in ("dpclip", "opacus", "nonprivate")}
    assert report["data"]["smoke_subset"] == {"train": 384, "test": 128}
    for m in ("scatternet", "cnn"):  # the non-private reference: once per seed, no ε, no accountant, its own recipe
        reference = runs.pop((m, "nonprivate"))
        assert reference["target_epsilon"] is None and reference["epsilon"] is None and reference["privacy_report"] is None
        # 384 training examples in shuffled batches of 256: 2 per epoch
        assert reference["steps"] == 2 * reference["epochs"] and reference["batch"] == 256
        assert 0.0 <= reference["test_accuracy"] <= 1.0
    for r in runs.values():
        # 384 training examples, batch 64: 6 batches per epoch, q = 1/6, 2 epochs = 12 steps
        assert r["q"] == pytest.approx(1 / 6) and r["steps"] == r["planned_steps"] == 12
        assert 0.0 <= r["test_accuracy"] <= 1.0 and r["wall_s"] >= 0
        assert r["accountant"] == ("pld" if r["library"] == "dpclip" else "prv")
        assert r["privacy_report"]["epsilon"] == r["epsilon"]
    for m, prior in (("scatternet", 8.0), ("cnn", None)):
        mine, theirs = runs[(m, "dpclip")], runs[(m, "opacus")]
        assert mine["sigma"] == theirs["sigma"]  # the same configuration under both libraries
        oracle = _oracle_epsilon(mine, prior)
        assert mine["epsilon"] <= 3.0 and oracle == pytest.approx(3.0, abs=0.02)
        assert mine["epsilon"] == pytest.approx(oracle, rel=0.01)
        assert theirs["epsilon"] == pytest.approx(oracle, rel=0.02)  # Opacus's PRV, with the release in its history
    # the normalisation release is charged: without it, the same σ and steps would spend clearly less than ε = 3
    scatter = runs[("scatternet", "dpclip")]
    assert scatter["sigma"] > runs[("cnn", "dpclip")]["sigma"]
    assert _oracle_epsilon(scatter, None) < 2.95
    release = scatter["normalization_release"]
    assert release["event"] == {"type": "composed", "events": [{"type": "gaussian", "noise_multiplier": 8.0}], "count": 2}
    assert len(release["released_mean"]) == 81 and min(release["released_variance"]) >= 0.0
    assert any("Gaussian(σ=8)" in entry for entry in scatter["privacy_report"]["history"])
    table = (out / "utility_fashion_mnist_smoke.md").read_text()
    assert table.startswith("# Fashion-MNIST") and "| cnn | non-private (adam, cosine learning rate) |" in table
    assert (out / "utility_fashion_mnist_smoke.png").stat().st_size > 1000
    assert math.isfinite(report["settings"]["duration_s"])
    # --render-only redraws the table and the plot from the results file alone, the same table as the run wrote
    (out / "utility_fashion_mnist_smoke.md").unlink()
    (out / "utility_fashion_mnist_smoke.png").unlink()
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "utility.py"), "--smoke", "--render-only", "--out", str(out)],
                   check=True, capture_output=True, text=True, timeout=120)
    assert (out / "utility_fashion_mnist_smoke.md").read_text() == table
    assert (out / "utility_fashion_mnist_smoke.png").stat().st_size > 1000


def test_the_plot_footer_stays_two_lines_however_many_invocations() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("utility_footer", ROOT / "benchmarks" / "utility.py")
    utility = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utility)
    settings = {"command": "python benchmarks/utility.py --models cnn", "date": "2026-12-02T10:00:00+00:00",
                "torch": "2.13.0+cpu", "threads": 1, "cpu": "AMD EPYC", "cpus": 2}
    one = utility.plot_footer({"settings": settings, "invocations": [settings]}, "table.md")
    assert one.splitlines() == ["python benchmarks/utility.py --models cnn", "torch 2.13.0+cpu, 1 thread(s) per run, AMD EPYC, 2 CPUs"]
    many = [dict(settings, date=f"2026-11-{day:02d}T08:00:00+00:00") for day in range(30, 0, -1)]
    footer = utility.plot_footer({"settings": settings, "invocations": many}, "table.md")
    assert footer.splitlines()[0] == "benchmarks/utility.py, 30 invocations (2026-11-01 to 2026-11-30); their commands are listed in table.md"
    assert len(footer.splitlines()) == 2


def test_a_stopped_sweep_keeps_the_runs_it_finished(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("utility_under_test", ROOT / "benchmarks" / "utility.py")
    utility = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utility)
    data = _random_fashion(tmp_path / "data", 400, 150)
    out = tmp_path / "out"
    common = ["--smoke", "--data-dir", str(data), "--out", str(out), "--models", "cnn", "--libraries", "dpclip"]
    real_train_one, calls = utility.train_one, []

    def stopped_at_second_run(*args, **kwargs):
        calls.append(args[2])
        if len(calls) == 2:
            raise KeyboardInterrupt  # the sweep is stopped during its second run
        return real_train_one(*args, **kwargs)

    monkeypatch.setattr(utility, "train_one", stopped_at_second_run)
    with pytest.raises(KeyboardInterrupt):
        utility.main([*common, "--epsilons", "3", "2"])
    report = json.loads((out / "utility_fashion_mnist_smoke.json").read_text())
    assert [(r["target_epsilon"], r["invocation"]) for r in report["runs"]] == [(3.0, 0)]
    assert [i["finished"] for i in report["invocations"]] == [False]
    table = (out / "utility_fashion_mnist_smoke.md").read_text()
    assert "| cnn | 3 |" in table and "unfinished: the runs it completed are kept" in table

    # a later --append run adds its own invocation entry (one, though it writes after every run) and keeps the first
    monkeypatch.setattr(utility, "train_one", real_train_one)
    utility.main([*common, "--epsilons", "2", "1", "--append"])
    report = json.loads((out / "utility_fashion_mnist_smoke.json").read_text())
    assert sorted((r["target_epsilon"], r["invocation"]) for r in report["runs"]) == [(1.0, 1), (2.0, 1), (3.0, 0)]
    assert [i["finished"] for i in report["invocations"]] == [False, True]
    assert len({i["started"] for i in report["invocations"]}) == 2
    assert (out / "utility_fashion_mnist_smoke.md").read_text().count("unfinished") == 1


def _utility():
    import importlib.util

    spec = importlib.util.spec_from_file_location("utility_gabor", ROOT / "benchmarks" / "utility.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gabor_bank_filters_are_oriented_detectors_with_zero_mean_and_unit_norm() -> None:
    """Each filter has mean 0 and norm 1, and a grating at orientation θ_k and the bank's frequency excites the
    filters of orientation θ_k most (at either phase), for every k and both scales: the bank is what it says."""
    utility = _utility()
    bank = utility.gabor_bank(16, 8).squeeze(1).double()
    assert bank.shape == (16, 8, 8)
    assert bank.flatten(1).mean(1).abs().max() < 1e-6
    assert torch.allclose(bank.flatten(1).norm(dim=1), torch.ones(16, dtype=torch.float64), atol=1e-6)
    centre = 3.5
    yy, xx = torch.meshgrid(torch.arange(8.0) - centre, torch.arange(8.0) - centre, indexing="ij")
    for s, sigma in enumerate((2.0, 3.5)):
        for k in range(4):
            theta = math.pi * k / 4
            along = (xx * math.cos(theta) + yy * math.sin(theta)).double()
            responses = []
            for phase in np.linspace(0, 2 * math.pi, 16, endpoint=False):
                grating = torch.cos(2 * math.pi * along / (1.6 * sigma) + phase)
                responses.append((bank * grating).sum(dim=(1, 2)).abs())
            best = torch.stack(responses).max(0).values.view(2, 4, 2).amax(2)  # [scale, orientation]
            assert int(best[s].argmax()) == k, (sigma, k, best)


def test_gabor_init_sets_only_the_first_convolution() -> None:
    utility = _utility()
    config = dict(utility.CONFIGS["cnn"])
    torch.manual_seed(0)
    default = utility.build_model("cnn", {**config, "init": "default"}, (1, 28, 28))
    torch.manual_seed(0)
    gabor = utility.build_model("cnn", {**config, "init": "gabor"}, (1, 28, 28))
    first, same = gabor.features[0].weight, default.features[0].weight
    scale = same.flatten(1).norm(dim=1).mean()
    assert torch.allclose(first, utility.gabor_bank(int(config["width"]), 8) * scale)
    others = [(n, p) for n, p in gabor.named_parameters() if n != "features.0.weight"]
    assert all(torch.equal(p, dict(default.named_parameters())[n]) for n, p in others)
    with pytest.raises(ValueError, match="unknown init"):
        utility.build_model("cnn", {**config, "init": "orthogonal"}, (1, 28, 28))


def test_private_centre_clips_to_root_d_and_adds_the_stated_noise() -> None:
    """The released mean: the exact mean of rows clipped to norm √d (here two rows of norm 2√d are halved), plus
    Gaussian noise whose per-coordinate std is noise·√d/N (checked over 20,000 coordinates, a ±3 % band)."""
    utility = _utility()
    n, d = 50, 20_000
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = x / x.norm(dim=1, keepdim=True) * math.sqrt(d) * 0.5  # inside the bound: kept as they are
    x[:2] *= 4.0  # norm 2√d: clipped to √d, i.e. halved
    expected = (x[2:].sum(0) + x[:2].sum(0) / 2) / n
    mean, info = utility.private_centre(x.float(), 5.0, torch.Generator().manual_seed(1))
    noise = (mean.double() - expected) * n / math.sqrt(d)
    assert float(noise.mean()) == pytest.approx(0.0, abs=0.15)
    assert float(noise.std()) == pytest.approx(5.0, rel=0.03)
    assert info["event"] == {"type": "gaussian", "noise_multiplier": 5.0} and info["clip_norm"] == math.sqrt(d)


def test_group_normalised_features_never_reach_the_centring_bound() -> None:
    """The sensitivity √d holds without clipping anything: a group-normalised example's squared norm is below d."""
    utility = _utility()
    x = torch.rand(64, 81, 7, 7, generator=torch.Generator().manual_seed(2)) ** 4 * 3
    x[0] = 0.0  # a blank example: all zeros after normalisation
    normalised = utility.group_normalise(x, 27).flatten(1).double()
    assert float(normalised.norm(dim=1).max()) <= math.sqrt(81 * 49)


def test_centred_features_charge_their_release_before_the_steps() -> None:
    """prepare() with center_noise: the training and evaluation features lose the same released mean, the release
    is one Gaussian mechanism, and plan() calibrates σ so that dp_accounting's PLD ε of (release, then T
    Poisson-sampled steps) is the target."""
    dpa = pytest.importorskip("dp_accounting")
    utility = _utility()
    g = torch.Generator().manual_seed(3)
    xt, xe = torch.rand(600, 81, 7, 7, generator=g), torch.rand(100, 81, 7, 7, generator=g)
    yt, ye = torch.randint(0, 10, (600,), generator=g), torch.randint(0, 10, (100,), generator=g)
    config = {**utility.CONFIGS["scatternet"], "center_noise": 4.0, "batch": 64, "epochs": 2}
    (ct, _), (ce, _), prior, info = utility.prepare("scatternet", config, {"scatternet": (xt, yt, xe, ye)}, seed=0)
    shift_train = utility.group_normalise(xt, 27) - ct
    shift_eval = utility.group_normalise(xe, 27) - ce
    assert torch.allclose(shift_train, shift_train[:1].expand_as(shift_train), atol=1e-5)
    assert torch.allclose(shift_eval[:1], shift_train[:1], atol=1e-5)  # one released mean for both
    assert info["event"] == {"type": "gaussian", "noise_multiplier": 4.0}
    planned = utility.plan(3.0, 600, config, prior)
    steps = dpa.SelfComposedDpEvent(
        dpa.PoissonSampledDpEvent(planned["sample_rate"], dpa.GaussianDpEvent(planned["sigma"])), planned["steps"])
    oracle = dpa.pld.PLDAccountant(value_discretization_interval=1e-4)
    assert oracle.compose(dpa.ComposedDpEvent([dpa.GaussianDpEvent(4.0), steps])).get_epsilon(1e-5) == pytest.approx(3.0, abs=0.02)
    plain = dpa.pld.PLDAccountant(value_discretization_interval=1e-4).compose(steps).get_epsilon(1e-5)
    assert plain < 2.9  # the release is charged: without it the same σ spends clearly less


def test_cnn_losses_match_closed_forms_and_are_per_example() -> None:
    """The CNN's optional losses at uniform logits over 10 classes: SSE = (1 − 0.1)² + 9·0.1² = 0.9, focal =
    −(1 − 0.1)²·ln 0.1; a batch's loss is the mean of its examples' (so DP-SGD clips one gradient per example)."""
    utility = _utility()
    zeros, labels = torch.zeros(4, 10), torch.tensor([0, 3, 5, 9])
    assert float(utility._criterion("sse")(zeros, labels)) == pytest.approx(0.9, rel=1e-6)
    assert float(utility._criterion("focal")(zeros, labels)) == pytest.approx(0.81 * math.log(10), rel=1e-6)
    assert float(utility._criterion("sse+focal:2")(zeros, labels)) == pytest.approx(0.9 + 1.62 * math.log(10), rel=1e-6)
    logits = torch.randn(6, 10, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(6)
    for name in ("ce", "sse", "focal", "sse+focal:1"):
        loss = utility._criterion(name)
        each = torch.stack([loss(logits[i:i + 1], labels[i:i + 1]) for i in range(6)])
        assert float(loss(logits, labels)) == pytest.approx(float(each.mean()), rel=1e-6)
        loss.reduction = "none"  # as Opacus's ghost clipping sets it: the per-example terms
        torch.testing.assert_close(loss(logits, labels), each)
        loss.reduction = "sum"
        assert float(loss(logits, labels)) == pytest.approx(float(each.sum()), rel=1e-6)
    with pytest.raises(ValueError, match="unknown loss"):
        utility._criterion("hinge")


def test_cnn_views_and_random_flip() -> None:
    """On [N, 2, 1, 28, 28] the CNN returns the mean of the image's and the mirror's logits; the random-flip collate
    mirrors about half the images of a batch, each either unchanged or exactly mirrored, labels untouched."""
    utility = _utility()
    torch.manual_seed(0)
    cnn = utility.FashionCNN()
    x = torch.randn(5, 1, 28, 28)
    views = torch.stack([x, x.flip(-1)], 1)
    torch.testing.assert_close(cnn(views), (cnn(x) + cnn(x.flip(-1))) / 2)
    flip = utility._RandomFlip(0, lambda batch: batch)
    images, labels = torch.randn(400, 1, 28, 28), torch.arange(400)
    out, out_labels = flip((images, labels))
    mirrored = torch.tensor([torch.equal(o, i.flip(-1)) for o, i in zip(out, images)])
    kept = torch.tensor([torch.equal(o, i) for o, i in zip(out, images)])
    assert bool((mirrored | kept).all()) and 150 < int(mirrored.sum()) < 250
    assert torch.equal(out_labels, labels)


@pytest.mark.parametrize("averaged", ["logits", "loss"])
def test_cnn_on_views_is_clipped_per_example_like_a_brute_force_loop(averaged: str) -> None:
    """The CNN on views of each image (channels-last, SSE + focal loss) under dpclip without noise — the mean of
    the image's and its mirror's logits, or the loss averaged over three random views (augmentation multiplicity):
    one step moves the weights by exactly Σ_i clip(g_i, C) / (qN), each g_i computed on example i's views alone,
    and on the layerwise path (one layer call per view, every call one row per example)."""
    import warnings

    import dpclip
    from torch.utils.data import DataLoader, TensorDataset

    utility = _utility()
    torch.manual_seed(0)
    cnn, reference = (utility.FashionCNN(width=4, hidden=8, channels_last=True, view_logits=averaged == "loss")
                      for _ in range(2))
    reference.load_state_dict(cnn.state_dict())
    x, y = torch.randn(12, 1, 28, 28), torch.arange(12) % 10
    if averaged == "logits":
        views = torch.stack([x, x.flip(-1)], 1)
        loss = utility._criterion("sse+focal:1")
    else:
        views, _ = utility._RandomViews(0, lambda batch: batch, views=3, shift=2)((x, y))
        loss = utility._per_view(utility._criterion("sse+focal:1"))
    C, batch = 0.05, 12
    params = list(reference.parameters())
    expected = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    for i in range(len(y)):
        grads = torch.autograd.grad(loss(reference(views[i:i + 1]), y[i:i + 1]), params)
        norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))
        for total, g in zip(expected, grads):
            total += g.double() * min(1.0, C / norm) / batch
    engine = dpclip.PrivacyEngine(seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # noise 0: the loud non-private warning
        model, optimizer, loader = engine.make_private(
            cnn, torch.optim.SGD(cnn.parameters(), lr=1.0), DataLoader(TensorDataset(views, y), batch_size=batch),
            noise_multiplier=0.0, max_grad_norm=C, sample_rate=1.0)
    for xb, yb in loader:  # q = 1: every example
        assert len(yb) == batch
        optimizer.zero_grad()
        loss(model(xb), yb).backward()
        optimizer.step()
        break
    assert engine.grad_sample_path == "layerwise"
    for p, q, update in zip(cnn.parameters(), reference.parameters(), expected):
        torch.testing.assert_close(q.detach().double() - p.detach().double(), update, rtol=1e-4, atol=1e-7)


def test_random_views_are_moves_and_mirrors_of_the_image_within_the_shift() -> None:
    """Every view of the multiplicity collate is the image moved by (dy, dx) with |dy|, |dx| ≤ shift (border filled
    with the background −1), mirrored or not, checked against hand-indexed moves; across a batch every move and
    both orientations occur, and the labels are untouched."""
    utility = _utility()
    images, labels = torch.rand(300, 1, 6, 7), torch.arange(300)
    views, out_labels = utility._RandomViews(3, lambda batch: batch, views=2, shift=1)((images, labels))
    assert views.shape == (300, 2, 1, 6, 7) and torch.equal(out_labels, labels)

    def moved(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
        out = torch.full_like(image, -1.0)
        h, w = image.shape[-2:]
        out[..., max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
            image[..., max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
        return out

    seen = set()
    for image, pair in zip(images, views):
        for view in pair:
            found = [(dy, dx, m) for dy in (-1, 0, 1) for dx in (-1, 0, 1) for m in (False, True)
                     if torch.equal(view, moved(image, dy, dx).flip(-1) if m else moved(image, dy, dx))]
            assert len(found) == 1
            seen.add(found[0])
    assert len(seen) == 18


def test_per_view_loss_is_the_batch_mean_of_each_examples_mean_over_its_views() -> None:
    """Against a loop over examples and views of cross-entropy (log-softmax by hand), reduced by mean and
    per example; 2-D logits pass through."""
    utility = _utility()
    logits, y = torch.randn(5, 3, 4, dtype=torch.float64), torch.tensor([0, 3, 1, 2, 3])
    per_view = utility._per_view(torch.nn.CrossEntropyLoss())
    each = torch.tensor([sum(float(-(logits[i, v] - logits[i, v].exp().sum().log())[y[i]]) for v in range(3)) / 3
                         for i in range(5)], dtype=torch.float64)  # one term per example: the mean of its views'
    assert float(per_view(logits, y)) == pytest.approx(float(each.mean()), rel=1e-12)
    assert float(per_view(logits[:, 0], y)) == pytest.approx(float(torch.nn.functional.cross_entropy(logits[:, 0], y)))
    per_view.reduction = "none"  # as Opacus's ghost clipping sets it
    torch.testing.assert_close(per_view(logits, y), each)


def test_shifted_views_are_the_image_and_its_four_one_pixel_moves() -> None:
    """Against hand-indexed shifts of a 4 × 5 image (zero fill): up, down, left, right by one pixel."""
    utility = _utility()
    x = torch.arange(1.0, 21.0).view(1, 1, 4, 5)
    views = utility.shifted_views(x)
    assert views.shape == (1, 5, 1, 4, 5)
    image = x[0, 0]
    expected = torch.zeros(5, 4, 5)
    expected[0] = image
    expected[1, 1:] = image[:-1]  # content moved down: row r shows row r - 1
    expected[2, :-1] = image[1:]  # moved up
    expected[3, :, 1:] = image[:, :-1]  # moved right
    expected[4, :, :-1] = image[:, 1:]  # moved left
    assert torch.equal(views[0, :, 0], expected)
