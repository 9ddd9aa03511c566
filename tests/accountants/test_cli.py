"""The dpclip-budget CLI, run as a user runs it (subprocesses), and the torch-free guarantee."""

import json
import subprocess
import sys

import dp_accounting as dpa
import pytest
from dp_accounting.rdp import rdp_privacy_accountant as dp_rdp

from accountants import DEFAULT_ORDERS

# Run the CLI with torch made unimportable: any attempt to import it would crash the command.
_NO_TORCH = "import sys; sys.modules['torch'] = None; from accountants.cli import main; sys.exit(main(sys.argv[1:]))"


def run_cli(*args):
    return subprocess.run([sys.executable, "-c", _NO_TORCH, *args], capture_output=True, text=True, timeout=120)


def test_importing_accountants_never_imports_torch():
    code = (
        "import sys, accountants, accountants.cli, accountants.pld, accountants.pld_accountant, accountants.factory; "
        "assert not any(m.split('.')[0] == 'torch' for m in sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_epsilon_json_matches_dp_accounting():
    result = run_cli(
        "epsilon", "--dataset-size", "60000", "--batch-size", "256", "--noise-multiplier", "1.1",
        "--epochs", "10", "--delta", "1e-5", "--json", "--accountant", "rdp",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    for key in ["epsilon", "delta", "order", "noise_multiplier", "sample_rate", "steps", "mechanism"]:
        assert key in report
    assert report["steps"] == 10 * 235 and report["sample_rate"] == 256 / 60000
    oracle = dp_rdp.RdpAccountant(list(DEFAULT_ORDERS))
    oracle.compose(dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(256 / 60000, dpa.GaussianDpEvent(1.1)), 2350))
    assert report["epsilon"] == pytest.approx(oracle.get_epsilon(1e-5), rel=1e-6)
    assert "upper bound" in report["statement"]


def test_text_output_has_a_privacy_statement():
    result = run_cli(
        "epsilon", "--sample-rate", "0.01", "--noise-multiplier", "1.0", "--steps", "10000", "--delta", "1e-5",
        "--accountant", "rdp",
    )
    assert result.returncode == 0
    assert result.stdout.startswith("epsilon = 6.713 at delta = 1e-05")  # dp_accounting: 6.7128 (refdata)
    assert "Poisson" in result.stdout and "adding or removing one training example" in result.stdout


def test_noise_command_finds_the_smallest_sufficient_sigma():
    result = run_cli(
        "noise", "--sample-rate", "0.01", "--target-epsilon", "3", "--steps", "10000", "--delta", "1e-5", "--json",
        "--accountant", "rdp",
    )
    report = json.loads(result.stdout)
    assert report["epsilon"] <= 3.0
    oracle = dp_rdp.RdpAccountant(list(DEFAULT_ORDERS))
    oracle.compose(dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(0.01, dpa.GaussianDpEvent(report["noise_multiplier"])), 10000))
    assert oracle.get_epsilon(1e-5) <= 3.0 * (1 + 1e-6)


def test_printed_noise_multiplier_meets_the_target():
    """The headline's σ is rounded up: copied as printed, it still gives ε ≤ target (dp_accounting's RDP as oracle;
    rounded to nearest it gave 1.000021 here); so is the σ in the privacy statement below it."""
    from accountants.cli import round_up

    result = run_cli("noise", "--sample-rate", "0.01", "--target-epsilon", "1", "--steps", "1000", "--delta", "1e-5",
                     "--accountant", "rdp")
    assert result.returncode == 0, result.stderr
    printed = float(result.stdout.split("noise multiplier = ")[1].split()[0])
    stated = float(result.stdout.split("), noise multiplier ")[1].split(",")[0])  # the privacy statement's σ
    for sigma in (printed, stated):
        oracle = dp_rdp.RdpAccountant(list(DEFAULT_ORDERS))
        oracle.compose(dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(0.01, dpa.GaussianDpEvent(sigma)), 1000))
        assert oracle.get_epsilon(1e-5) <= 1.0, sigma
    assert [round_up(v, 4) for v in (1.51301, 1.5131, 0.1, 2.0000000001)] == [1.5131, 1.5131, 0.1, 2.0001]


def test_steps_command():
    result = run_cli("steps", "--sample-rate", "0.01", "--target-epsilon", "3", "--noise-multiplier", "1.0", "--delta", "1e-5", "--json")
    report = json.loads(result.stdout)
    assert report["epsilon"] <= 3.0 and report["steps"] > 1000
    nothing = run_cli("steps", "--sample-rate", "1", "--target-epsilon", "0.01", "--noise-multiplier", "0.5", "--delta", "1e-5")
    assert nothing.returncode == 2 and "no step fits" in nothing.stderr and "Traceback" not in nothing.stderr
    assert "Raise --noise-multiplier" in nothing.stderr and nothing.stdout == ""


def test_laplace_mechanism():
    result = run_cli("epsilon", "--sample-rate", "1", "--noise-multiplier", "2", "--steps", "1", "--delta", "1e-5",
                     "--mechanism", "laplace", "--json", "--accountant", "rdp")
    assert json.loads(result.stdout)["epsilon"] == pytest.approx(0.5)  # one Laplace(b=2) release is 0.5-DP
    pld = run_cli("epsilon", "--sample-rate", "1", "--noise-multiplier", "2", "--steps", "1", "--delta", "1e-5",
                  "--mechanism", "laplace", "--json")
    assert 0.5 - 1e-4 <= json.loads(pld.stdout)["epsilon"] <= 0.5  # δ > 0 buys a hair below the pure-DP 0.5


def test_default_accountant_is_pld_and_matches_dp_accounting():
    from dp_accounting.pld import privacy_loss_distribution as dpl

    result = run_cli("epsilon", "--sample-rate", "0.01", "--noise-multiplier", "1.0", "--steps", "10000", "--delta", "1e-5", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["accountant"] == "pld" and report["order"] is None and 0 < report["epsilon_error"] < 0.2
    pessimistic = dpl.from_gaussian_mechanism(1.0, sampling_prob=0.01).self_compose(10000).get_epsilon_for_delta(1e-5)
    assert pessimistic * (1 - 1e-3) <= report["epsilon"] <= pessimistic * 1.01  # dp_accounting: 6.1877
    assert "Accountant: PLD" in report["statement"]
    rdp = json.loads(run_cli("epsilon", "--sample-rate", "0.01", "--noise-multiplier", "1.0", "--steps", "10000",
                             "--delta", "1e-5", "--json", "--accountant", "rdp").stdout)
    assert report["epsilon"] < rdp["epsilon"] and rdp["accountant"] == "rdp" and rdp["epsilon_error"] is None


def test_noise_and_steps_commands_with_pld():
    noise = json.loads(run_cli("noise", "--sample-rate", "0.02", "--target-epsilon", "2", "--steps", "500", "--delta", "1e-5", "--json").stdout)
    assert noise["epsilon"] <= 2.0 and noise["accountant"] == "pld"
    from dp_accounting.pld import privacy_loss_distribution as dpl

    check = dpl.from_gaussian_mechanism(noise["noise_multiplier"], sampling_prob=0.02).self_compose(500)
    assert check.get_epsilon_for_delta(1e-5) <= 2.0 * (1 + 2e-4)
    steps = json.loads(run_cli("steps", "--sample-rate", "0.02", "--target-epsilon", "2", "--noise-multiplier",
                               str(noise["noise_multiplier"] * 1.01), "--delta", "1e-5", "--json").stdout)
    assert steps["steps"] > 500 and steps["epsilon"] <= 2.0


def test_delta_too_large_warns_on_stderr():
    result = run_cli("epsilon", "--dataset-size", "100", "--batch-size", "10", "--noise-multiplier", "1", "--steps", "3", "--delta", "0.02")
    assert result.returncode == 0 and "warning" in result.stderr and "1/dataset_size" in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["epsilon", "--sample-rate", "2", "--noise-multiplier", "1", "--steps", "3", "--delta", "1e-5"], "--sample-rate must lie in (0, 1]"),
        (["epsilon", "--sample-rate", "0.1", "--noise-multiplier", "-1", "--steps", "3", "--delta", "1e-5"], "--noise-multiplier must be"),
        (["epsilon", "--sample-rate", "0.1", "--noise-multiplier", "nan", "--steps", "3", "--delta", "1e-5"], "must be finite"),
        (["epsilon", "--sample-rate", "0.1", "--noise-multiplier", "1", "--steps", "3", "--delta", "1"], "--delta must lie"),
        (["epsilon", "--sample-rate", "0.1", "--noise-multiplier", "1", "--steps", "0", "--delta", "1e-5"], "--steps must be an integer >= 1"),
        (["epsilon", "--sample-rate", "0.1", "--noise-multiplier", "1", "--steps", "2.5", "--delta", "1e-5"], "invalid int value"),
        (["epsilon", "--sample-rate", "0.1", "--batch-size", "3", "--noise-multiplier", "1", "--steps", "3", "--delta", "1e-5"], "contradictory"),
        (["epsilon", "--noise-multiplier", "1", "--steps", "3", "--delta", "1e-5"], "give --sample-rate"),
        (["epsilon", "--sample-rate", "0.1", "--noise-multiplier", "1", "--delta", "1e-5"], "one of the arguments --steps --epochs is required"),
        (["epsilon", "--sample-rate", "0.1", "--noise-multiplier", "1", "--steps", "3", "--epochs", "1", "--delta", "1e-5"], "not allowed with"),
        (["epsilon", "--dataset-size", "10", "--batch-size", "20", "--noise-multiplier", "1", "--steps", "3", "--delta", "1e-5"], "must not exceed"),
        (["noise", "--sample-rate", "0.1", "--target-epsilon", "0", "--steps", "3", "--delta", "1e-5"], "--target-epsilon must be"),
        (["noise", "--sample-rate", "0.1", "--steps", "3", "--delta", "1e-5"], "--target-epsilon"),
        (["steps", "--sample-rate", "0.1", "--target-epsilon", "1", "--noise-multiplier", "1", "--delta", "1e-5", "--mechanism", "cauchy"], "invalid choice"),
        (["epsilon", "--sample-rate", "0.1", "--noise-multiplier", "1", "--steps", "3", "--delta", "1e-5", "--accountant", "moments"], "invalid choice"),
        (["frobnicate"], "invalid choice"),
        ([], "required"),
    ],
)
def test_bad_input_exits_2_with_a_message_and_no_traceback(args, message):
    result = run_cli(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_module_entry_point_and_help():
    result = subprocess.run([sys.executable, "-m", "accountants", "epsilon", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for flag in ["--sample-rate", "--dataset-size", "--batch-size", "--noise-multiplier", "--steps", "--epochs", "--delta", "--mechanism", "--json", "--accountant"]:
        assert flag in result.stdout
