"""The README's main job, scripts/train_digits.py: it runs, learns, and its privacy report is right.

The report's ε is checked against dp_accounting (an independent PLD or RDP accountant, as the report names) for the
(q, σ, steps) the report states, so a wrong report cannot pass by agreeing with itself.
"""

import json
import subprocess
import sys
from pathlib import Path

import dp_accounting as dpa
import pytest
import torch

from accountants import PLDAccountant
from dpclip_examples import digits, train_digits

ROOT = Path(__file__).resolve().parent.parent


def dp_accounting_epsilon(report: dict) -> float:
    event = dpa.SelfComposedDpEvent(
        dpa.PoissonSampledDpEvent(report["sample_rate"], dpa.GaussianDpEvent(report["noise_multiplier"])),
        report["steps"],
    )
    oracle = dpa.pld.PLDAccountant(value_discretization_interval=1e-4) if report["accountant"] == "pld" else dpa.rdp.RdpAccountant()
    return oracle.compose(event).get_epsilon(report["delta"])


@pytest.fixture(scope="module")
def default_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("digits")
    report = train_digits.main(["--no-progress", "--out", str(out)])
    return report, out


def test_default_run_learns_privately_near_non_private(default_run: tuple[dict, Path]) -> None:
    report, _ = default_run
    # Measured 0.903 private vs 0.969 non-private (seed 0, benchmarks/results/main_job.json); thresholds leave room for platforms.
    assert report["non_private_test_accuracy"] >= 0.93
    assert report["test_accuracy"] >= 0.80
    assert report["non_private_test_accuracy"] - report["test_accuracy"] <= 0.12


def test_default_report_epsilon_matches_dp_accounting_and_budget(default_run: tuple[dict, Path]) -> None:
    report, out = default_run
    assert report["epsilon"] <= report["target_epsilon"] == 3.0
    assert report["delta"] == 1e-5
    assert report["steps"] == 30 * 6  # 30 epochs of ceil(1437 / 256) Poisson steps
    assert report["sample_rate"] == pytest.approx(256 / 1437)
    assert report["accountant"] == "pld"  # the default, as dpclip-budget's
    # Both PLD accountants discretise pessimistically, on different grids: their ε agree to within 2 %.
    assert dp_accounting_epsilon(report) == pytest.approx(report["epsilon"], rel=0.02)
    assert json.loads((out / "privacy_report.json").read_text())["epsilon"] == report["epsilon"]


def test_saved_model_and_checkpoint_reload(default_run: tuple[dict, Path]) -> None:
    report, out = default_run
    model = digits.DigitsCNN()
    model.load_state_dict(torch.load(out / "model.pt"))
    _, test = digits.load_data(torch.device("cpu"))
    assert digits.accuracy(model, test) == pytest.approx(report["test_accuracy"])
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["steps"] == report["steps"]
    accountant = PLDAccountant()
    accountant.load_state_dict(checkpoint["accountant"])
    assert accountant.get_epsilon(report["delta"]) == report["epsilon"]


def test_l1_median_reports_the_composite_mechanism(tmp_path: Path) -> None:
    report = train_digits.main(
        ["--quick", "--no-baseline", "--no-progress", "--norm", "l1", "--clipping", "median", "--out", str(tmp_path)]
    )
    assert report["mechanism"] == "laplace" and report["clipping"] == "median"
    assert report["epsilon"] <= 3.0
    assert len(report["clip_history"]) == report["steps"] + 1
    assert "Laplace" in report["history"][0] and "Gaussian" in report["history"][0]
    assert "noisy count" in report["statement"]


def test_help_and_bad_flags() -> None:
    script = str(ROOT / "scripts" / "train_digits.py")
    shown = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, check=True)
    assert "--epsilon" in shown.stdout and "--clipping" in shown.stdout
    for flags, message in ((["--epsilon", "-1"], "--epsilon must be a finite number > 0"),
                           (["--epsilon", "inf"], "--epsilon must be a finite number > 0"),
                           (["--delta", "1"], "--delta must be below 1")):
        refused = subprocess.run([sys.executable, script, *flags], capture_output=True, text=True)
        assert refused.returncode == 2 and message in refused.stderr and "Traceback" not in refused.stderr
