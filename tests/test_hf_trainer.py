"""DPTrainer: private training with transformers.Trainer (dpclip.integrations.transformers), on a tiny BERT on CPU."""

from __future__ import annotations

import copy
import logging
import os
import subprocess
import sys
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments  # noqa: E402

from dpclip import CheckpointError, EngineUsageError, LossNotPerExampleError, PrivacyParameterError  # noqa: E402
from dpclip.integrations.transformers import ENGINE_STATE_NAME, DPTrainer  # noqa: E402

N, LENGTH, VOCAB = 32, 8, 100


def tiny_bert(dropout: float = 0.0, seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=2,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    config._attn_implementation = "eager"
    return BertForSequenceClassification(config)


def dataset(n: int = N, token_labels: bool = False) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (n, LENGTH), generator=g)
    labels = torch.randint(0, 2, (n, LENGTH) if token_labels else (n,), generator=g)
    return [{"input_ids": ids[i], "attention_mask": torch.ones(LENGTH, dtype=torch.long), "labels": labels[i],
             "idx": torch.tensor(i)} for i in range(n)]


class RecordingCollator:
    """Stacks the features and records which examples (``idx``) each collated batch holds."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        self.batches.append([int(f["idx"]) for f in features])
        return {k: torch.stack([f[k] for f in features]) for k in ("input_ids", "attention_mask", "labels")}


def arguments(tmp_path, **overrides) -> TrainingArguments:
    options = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, max_steps=1, logging_steps=1,
                   report_to=[], optim="sgd", learning_rate=0.5, lr_scheduler_type="constant", weight_decay=0.0,
                   save_strategy="no", use_cpu=True, disable_tqdm=True, remove_unused_columns=False, seed=0)
    options.update(overrides)
    return TrainingArguments(**options)


def trainer(tmp_path, model=None, data=None, collator=None, args=None, **privacy) -> DPTrainer:
    privacy.setdefault("target_delta", 1e-5)
    privacy.setdefault("dp_seed", 0)
    if "target_epsilon" not in privacy:
        privacy.setdefault("noise_multiplier", 1.0)
    return DPTrainer(model=model if model is not None else tiny_bert(), args=args or arguments(tmp_path),
                     train_dataset=data if data is not None else dataset(),
                     data_collator=collator or RecordingCollator(), **privacy)


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


# -- one step against a brute-force computation -------------------------------------------------------------
@pytest.mark.parametrize("max_physical_batch_size, ignored", [(None, False), (3, False), (None, True)],
                         ids=["whole batch", "micro-batches", "some labels -100"])
def test_one_step_equals_brute_force_clipped_sum(tmp_path, max_physical_batch_size, ignored):
    """``ignored``: every third example is labelled -100. The stock loss divided by the examples not ignored, so
    each example's weight depended on how many others were (the update was B/(B-k) times the clipped sum's);
    now an ignored example contributes 0 and the others their own clipped gradients."""
    model = tiny_bert()
    initial = copy.deepcopy(model)
    data = dataset()
    if ignored:
        for i in range(0, len(data), 3):
            data[i]["labels"] = torch.tensor(-100)
    collator = RecordingCollator()
    clip, lr, batch = 0.858, 0.5, 8  # per-example norms here are 0.85-0.89: some clipped, some not
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # noise_multiplier=0: dpclip's PrivacyWarning (non-private baseline)
        t = trainer(tmp_path, model, data, collator, noise_multiplier=0.0, max_grad_norm=clip,
                    max_physical_batch_size=max_physical_batch_size)
        t.get_train_dataloader()  # builds the engine: make_private tests the collator on examples 0 and 1
        collator.batches.clear()  # (and DPTrainer collated one example at __init__ to check the labels)
        t.train()
    assert t.engine.steps == 1 and t.state.global_step == 1
    sampled = [i for part in collator.batches for i in part]
    assert len(sampled) > 0 and len(set(sampled)) == len(sampled)
    if max_physical_batch_size is not None:
        assert all(len(part) <= max_physical_batch_size for part in collator.batches)

    # Brute force: each sampled example's gradient alone, clipped to C, summed, / expected batch q·N, SGD step.
    initial.train()
    total, clipped = torch.zeros_like(flat(initial)), 0
    assert not ignored or any(int(data[i]["labels"]) == -100 for i in sampled)
    for i in sampled:
        if int(data[i]["labels"]) == -100:
            continue  # an ignored example's loss is 0: so is its gradient
        initial.zero_grad()
        logits = initial(input_ids=data[i]["input_ids"][None], attention_mask=data[i]["attention_mask"][None]).logits
        torch.nn.functional.cross_entropy(logits, data[i]["labels"][None]).backward()
        g = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in initial.parameters()])
        clipped += int(g.norm() > clip)
        total += g * min(1.0, clip / float(g.norm()))
    assert 0 < clipped < len(sampled)  # the bound binds for some examples, not all
    expected = flat(initial) - lr * total / batch
    torch.testing.assert_close(flat(t.model), expected, rtol=0, atol=1e-6)


# -- epsilon in the logs ---------------------------------------------------------------------------------------
def _dp_accounting_epsilon(q: float, sigma: float, steps: int, delta: float, kind: str) -> float:
    from dp_accounting import dp_event, pld, rdp

    accountant = pld.PLDAccountant() if kind == "pld" else rdp.RdpAccountant()
    accountant.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize("kind", ["pld", "rdp"])
def test_logged_epsilon_matches_dp_accounting(tmp_path, kind):
    pytest.importorskip("dp_accounting")
    t = trainer(tmp_path, args=arguments(tmp_path, max_steps=6), noise_multiplier=1.0, accountant=kind)
    t.train()
    logs = [entry for entry in t.state.log_history if "loss" in entry]
    assert [entry["dp_steps"] for entry in logs] == [1, 2, 3, 4, 5, 6]
    q = 8 / N
    for entry in logs:
        assert entry["delta"] == 1e-5 and entry["noise_multiplier"] == 1.0 and entry["sample_rate"] == q
    # dp_accounting's PLD takes ~1 s per query on this CPU: steps 1, 3 and 6 (RDP: every step)
    for entry in logs if kind == "rdp" else [logs[0], logs[2], logs[5]]:
        reference = _dp_accounting_epsilon(q, 1.0, entry["dp_steps"], 1e-5, kind)
        assert entry["epsilon"] == pytest.approx(reference, rel=0.01)
    assert "grad_norm" not in logs[0]  # measured by the Trainer before the noisy gradient exists: dropped


# -- refusals, all before training starts ------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, match", [
    (dict(gradient_accumulation_steps=2), "max_physical_batch_size"),
    (dict(train_sampling_strategy="group_by_length"), "Poisson sampling"),
    (dict(train_sampling_strategy="sequential"), "Poisson sampling"),
    (dict(auto_find_batch_size=True), "auto_find_batch_size"),
    (dict(neftune_noise_alpha=5.0), "NEFTune"),
    # refused only at the first step before, with a vmap hint that failed too
    (dict(gradient_checkpointing=True), r"TrainingArguments\(gradient_checkpointing=False\)"),
])
def test_refused_training_arguments(tmp_path, overrides, match):
    model = tiny_bert()
    before = flat(model)
    with pytest.raises(EngineUsageError, match=match):
        trainer(tmp_path, model, args=arguments(tmp_path, **overrides))
    assert torch.equal(flat(model), before)


def test_refuses_several_processes(tmp_path, monkeypatch):
    monkeypatch.setattr(TrainingArguments, "world_size", property(lambda self: 2))
    with pytest.raises(EngineUsageError, match="one process on one device"):
        trainer(tmp_path)


def test_refuses_custom_sampler(tmp_path):
    class Sorted(DPTrainer):
        def _get_train_sampler(self, train_dataset=None):
            return torch.utils.data.SequentialSampler(train_dataset or self.train_dataset)

    with pytest.raises(EngineUsageError, match="custom sampler"):
        Sorted(model=tiny_bert(), args=arguments(tmp_path), train_dataset=dataset(), data_collator=RecordingCollator(),
               noise_multiplier=1.0, target_delta=1e-5)


def test_refuses_token_level_loss(tmp_path):
    with pytest.raises(LossNotPerExampleError, match="token-level"):
        trainer(tmp_path, data=dataset(token_labels=True))


def test_refuses_an_overridden_train_dataloader(tmp_path):
    """An override of get_train_dataloader was accepted, then train() failed with 'call trainer.train()' after
    the user's loader had been read."""
    class OwnLoader(DPTrainer):
        def get_train_dataloader(self):
            return torch.utils.data.DataLoader(self.train_dataset, batch_size=8)

    with pytest.raises(EngineUsageError, match=r"overrides get_train_dataloader.*Remove the override"):
        OwnLoader(model=tiny_bert(), args=arguments(tmp_path), train_dataset=dataset(), data_collator=RecordingCollator(),
                  noise_multiplier=1.0, target_delta=1e-5)


def test_refuses_a_sum_reduction_with_the_stock_mean_loss(tmp_path):
    """The stock loss is a mean over the batch: with loss_reduction="sum" each example reached the clipping divided
    by the sampled batch's size (the update was 1/B of the clipped sum)."""
    with pytest.raises(LossNotPerExampleError, match=r"loss_reduction='sum' with DPTrainer's stock loss"):
        trainer(tmp_path, loss_reduction="sum")


def test_a_refused_resume_leaves_the_model_as_it_was(tmp_path):
    """transformers loaded the checkpoint's weights into the model before DPTrainer refused the folder (no engine
    state, or one of another σ): the model then held weights trained outside the new run's ε."""
    first = trainer(tmp_path, args=arguments(tmp_path, max_steps=2, save_strategy="steps", save_steps=2))
    first.train()
    folder = tmp_path / "out" / "checkpoint-2"
    for damage in ("missing", "other sigma"):
        if damage == "missing":
            (folder / ENGINE_STATE_NAME).rename(folder / "moved.pt")
        else:
            (folder / "moved.pt").rename(folder / ENGINE_STATE_NAME)
        fresh = tiny_bert(seed=1)
        before = flat(fresh)
        t = trainer(tmp_path, model=fresh, args=arguments(tmp_path, max_steps=4),
                    noise_multiplier=1.0 if damage == "missing" else 2.0)
        with pytest.raises(CheckpointError):
            t.train(resume_from_checkpoint=str(folder))
        assert torch.equal(flat(fresh), before), damage


def test_refuses_missing_privacy_arguments(tmp_path):
    with pytest.raises(PrivacyParameterError, match="target_delta"):
        DPTrainer(model=tiny_bert(), args=arguments(tmp_path), train_dataset=dataset(), noise_multiplier=1.0)
    with pytest.raises(PrivacyParameterError, match="noise_multiplier"):
        DPTrainer(model=tiny_bert(), args=arguments(tmp_path), train_dataset=dataset(), target_delta=1e-5)


@pytest.mark.parametrize("options, match", [
    ({"max_physical_batch_size": 2}, r"private_options\['max_physical_batch_size'\] is set by DPTrainer itself: "
                                     r"pass DPTrainer\(max_physical_batch_size=\.\.\.\)"),
    ({"noise_multiplier": 2.0}, r"pass DPTrainer\(noise_multiplier=\.\.\.\)"),
    ({"target_epsilon": 3.0}, r"pass DPTrainer\(target_epsilon=\.\.\.\)"),
    ({"clip": "median"}, r"'clip'\] is not a make_private keyword argument; .*clipping"),
    ([("clipping", "median")], r"must be a dict"),
], ids=["dropped before", "passed twice", "passed twice (calibrated)", "unknown key", "not a dict"])
def test_private_options_that_dptrainer_sets_itself_or_make_private_lacks_are_refused_at_once(tmp_path, options, match):
    """private_options={"max_physical_batch_size": 2} was silently replaced by DPTrainer's own None; a key DPTrainer
    also passes, or an unknown one, failed only at train() with a raw TypeError."""
    with pytest.raises(PrivacyParameterError, match=match):
        trainer(tmp_path, private_options=options)
    trainer(tmp_path, private_options={"clipping": "median"})  # a make_private option DPTrainer does not set


def test_trainer_clipping_is_switched_off_with_a_note(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="dpclip.integrations.transformers"):
        t = trainer(tmp_path, args=arguments(tmp_path, max_grad_norm=1.0))
    assert t.args.max_grad_norm == 0.0
    assert "switched off" in caplog.text


# -- checkpoints: resume = uninterrupted ---------------------------------------------------------------------------
def test_resume_gives_the_uninterrupted_run(tmp_path):
    def run(folder, resume=None):
        args = arguments(tmp_path / folder, max_steps=6, save_strategy="steps", save_steps=1)
        t = trainer(tmp_path, model=tiny_bert(dropout=0.1, seed=0 if resume is None else 7), args=args)
        t.train(resume_from_checkpoint=resume)
        return t

    whole = run("whole")  # q = 1/4: 4 steps per epoch
    for step in (3, 4):  # within the first epoch, and at the epoch boundary
        checkpoint = tmp_path / "whole" / "out" / f"checkpoint-{step}"
        assert (checkpoint / ENGINE_STATE_NAME).is_file()
        resumed = run(f"resumed-{step}", resume=str(checkpoint))
        assert resumed.engine.steps == whole.engine.steps == 6
        torch.testing.assert_close(flat(resumed.model), flat(whole.model), rtol=0, atol=0)
        assert resumed.engine.get_epsilon(1e-5) == whole.engine.get_epsilon(1e-5)
        # the resumed log history (restored from the checkpoint, then continued) is the uninterrupted one
        logged = [(entry["loss"], entry["epsilon"]) for entry in resumed.state.log_history if "loss" in entry]
        assert logged == [(entry["loss"], entry["epsilon"]) for entry in whole.state.log_history if "loss" in entry]


def test_resume_from_a_checkpoint_without_engine_state_is_refused(tmp_path):
    args = arguments(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    trainer(tmp_path, args=args).train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    os.remove(checkpoint / ENGINE_STATE_NAME)
    with pytest.raises(CheckpointError, match="not written by DPTrainer"):
        trainer(tmp_path, args=arguments(tmp_path, max_steps=4)).train(resume_from_checkpoint=str(checkpoint))


# -- the budget guard ----------------------------------------------------------------------------------------------
def test_budget_guard_stops_at_the_planned_step_count(tmp_path, caplog):
    args = arguments(tmp_path, max_steps=-1, num_train_epochs=5, logging_steps=1)
    t = trainer(tmp_path, args=args, target_epsilon=3.0, epochs=2)  # σ calibrated for 2 epochs = 8 steps
    with caplog.at_level(logging.WARNING, logger="dpclip.integrations.transformers"):
        t.train()
    assert t.engine.steps == t.state.global_step == 8
    assert t.budget_exhausted is not None and "one more step" in t.budget_exhausted
    assert "privacy budget reached" in caplog.text
    assert t.engine.get_epsilon() <= 3.0
    assert t.engine.accountant.get_epsilon_after(t.engine._step_event, 1e-5) > 3.0
    assert max(entry["epsilon"] for entry in t.state.log_history if "epsilon" in entry) <= 3.0


# -- the user's model object stays untouched -----------------------------------------------------------------------
def test_model_object_is_untouched(tmp_path):
    model = tiny_bert()
    t = trainer(tmp_path, model, args=arguments(tmp_path, max_steps=2))
    t.train()
    assert isinstance(t, Trainer) and t.model is model and type(t.model) is BertForSequenceClassification
    t.save_model(str(tmp_path / "saved"))
    reloaded = BertForSequenceClassification.from_pretrained(str(tmp_path / "saved"))
    torch.testing.assert_close(flat(reloaded), flat(model))
    assert "eval_loss" in t.evaluate(dataset(8))


def test_peft_model(tmp_path):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_bert(), peft.LoraConfig(r=2, target_modules=["query", "value"],
                                                              task_type="SEQ_CLS"))
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    t = trainer(tmp_path, model, args=arguments(tmp_path, max_steps=2))
    t.train()
    assert t.model is model and isinstance(t.model, peft.PeftModel) and t.engine.steps == 2
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, trainable[n])]
    assert changed


# -- dpclip does not need transformers -----------------------------------------------------------------------------
def test_dpclip_imports_without_transformers():
    code = ("import sys; sys.modules['transformers'] = None; import dpclip\n"
            "try:\n    import dpclip.integrations.transformers\nexcept ImportError as e:\n    print('ERR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "ERR" in out and "pip install" in out


# -- bf16 and empty batches ---------------------------------------------------------------------------------------
def test_bf16_trains_close_to_float32(tmp_path):
    """bf16=True (what the fp16 refusal recommends): accelerate wraps the model's forward in autocast, where the
    first-step check (float32) cannot switch it off; DPTrainer runs the autocast itself, around the private model."""
    updates = {}
    for bf16 in (False, True):
        model = tiny_bert()
        start = flat(model).clone()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # noise_multiplier=0: the non-private baseline's warning
            t = trainer(tmp_path / str(bf16), model, args=arguments(tmp_path / str(bf16), bf16=bf16),
                        noise_multiplier=0.0, max_grad_norm=0.858)
            t.train()
        assert t.engine.steps == 1 and "_original_forward" not in model.__dict__
        updates[bf16] = flat(model) - start
    scale = updates[False].abs().max()  # bf16 keeps 8 bits per activation, through every layer: a few % off at worst
    assert scale > 0 and (updates[True] - updates[False]).abs().max() <= 0.05 * scale
    assert torch.nn.functional.cosine_similarity(updates[True], updates[False], dim=0) > 0.999


def test_empty_poisson_batches_release_noise_without_a_forward(tmp_path):
    """Expected batch 1 of 32: most batches are empty; BERT cannot run on 0 rows, so DPTrainer skips their forward
    and the engine releases the noise alone, charging every step."""
    t = trainer(tmp_path, args=arguments(tmp_path, per_device_train_batch_size=1, max_steps=12))
    t.train()
    assert t.engine.steps == 12 and t.state.global_step == 12
    assert t.engine.accountant.steps == 12


# -- compute_loss_func: checked on the first training batch, before anything is released -------------------------
def _varying_lengths(data: list[dict]) -> list[dict]:
    """Token labels: example i keeps its first 1 + i % LENGTH tokens, the others are -100 (padding)."""
    for i, example in enumerate(data):
        example["labels"][1 + i % LENGTH:] = -100
    return data


def _token_logits(outputs, labels):  # the sequence logits repeated at every token, with token labels
    return outputs.logits[:, None, :].expand(-1, labels.shape[1], -1)


def _ce_mean(outputs, labels, num_items_in_batch=None):
    return torch.nn.functional.cross_entropy(outputs.logits, labels)


def _ce_sum(outputs, labels, num_items_in_batch=None):
    return torch.nn.functional.cross_entropy(outputs.logits, labels, reduction="sum")


def _per_example_token_mean(outputs, labels, num_items_in_batch=None):
    logits = _token_logits(outputs, labels)
    per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
    kept = (labels != -100).float()
    return ((per_token * kept).sum(1) / kept.sum(1)).mean()


def _batch_token_mean(outputs, labels, num_items_in_batch=None):
    logits = _token_logits(outputs, labels)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def _minus_batch_mean(outputs, labels, num_items_in_batch=None):
    logits = outputs.logits
    return torch.nn.functional.cross_entropy(logits - logits.mean(0, keepdim=True), labels)


@pytest.mark.parametrize("loss, reduction, token_labels", [
    (_ce_mean, "mean", False), (_ce_sum, "sum", False), (_per_example_token_mean, "mean", True),
], ids=["mean of cross-entropies", "sum with loss_reduction='sum'", "mean of per-example token means"])
def test_a_per_example_compute_loss_func_trains(tmp_path, caplog, loss, reduction, token_labels):
    data = _varying_lengths(dataset(token_labels=True)) if token_labels else dataset()
    t = trainer(tmp_path, data=data, compute_loss_func=loss, loss_reduction=reduction)
    with caplog.at_level(logging.WARNING, logger="dpclip.integrations.transformers"):
        t.train()
    assert t.engine.steps == 1 and t._loss_func_checked and "not checked" not in caplog.text
    if loss is _ce_mean:  # the stock loss, by hand: the same step
        stock = trainer(tmp_path / "stock")
        stock.train()
        torch.testing.assert_close(flat(t.model), flat(stock.model), rtol=0, atol=1e-6)


@pytest.mark.parametrize("loss, token_labels, match", [
    (_minus_batch_mean, False, r"compute_loss_func, the loss of one example depends on the other examples of the batch.*per example"),
    (_batch_token_mean, True, r"compute_loss_func, the loss of one example depends on the other examples of the batch.*per example"),
    (_ce_sum, False, r"sums over the batch's examples but loss_reduction='mean': pass DPTrainer\(loss_reduction='sum'\)"),
], ids=["minus the batch mean of the logits", "token mean over the whole batch", "sum with loss_reduction='mean'"])
def test_a_compute_loss_func_that_is_not_per_example_is_refused_before_any_step(tmp_path, loss, token_labels, match):
    """compute_loss_func was never checked: a loss mixing the batch's examples, or summing under
    loss_reduction='mean', trained silently, and the reported ε was not an upper bound."""
    model = tiny_bert()
    before = flat(model).clone()
    data = _varying_lengths(dataset(token_labels=True)) if token_labels else dataset()
    t = trainer(tmp_path, model, data=data, compute_loss_func=loss)
    with pytest.raises(LossNotPerExampleError, match=match):
        t.train()
    assert t.engine.steps == 0 and not t._loss_func_checked
    assert torch.equal(flat(model), before)


def test_a_batch_of_one_is_not_checked_but_the_next_batch_is():
    from transformers.modeling_outputs import SequenceClassifierOutput

    from dpclip.integrations.transformers import _check_loss_func

    logits, labels = torch.randn(3, 2), torch.tensor([0, 1, 1])
    assert _check_loss_func(_minus_batch_mean, SequenceClassifierOutput(logits=logits[:1]), labels[:1], 1, "mean") is False
    with pytest.raises(LossNotPerExampleError):
        _check_loss_func(_minus_batch_mean, SequenceClassifierOutput(logits=logits), labels, 3, "mean")
    assert _check_loss_func(_ce_mean, SequenceClassifierOutput(logits=logits), labels, 3, "mean") is True
