"""DP training over torch.distributed, on two real processes (gloo, CPU), against independent references.

One ``torch.multiprocessing.spawn`` of two ranks runs every distributed scenario (module-scoped fixture, to pay
the process start-up once); each test then checks one scenario's results against

- a single-process run with the same seed (same code path, ``distributed=False``): same global batches,
  same model to 1e-6, same ε, same median-clipping trajectory;
- the closed form of the noise: the update's noise per coordinate is N(0, (lr·σ·C/(qN))²), tested with a
  chi-square statistic over ~18k coordinates (two draws, one per rank, would double the variance);
- the RDP accountant composed by hand for (q, σ, steps);
- the uninterrupted run, for checkpoint/resume.
"""

from __future__ import annotations

import math
import os
import time
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from dpclip import EngineUsageError, ModelNotSupportedError, NonFiniteGradientError, PoissonDataLoader, PrivacyEngine
from dpclip.errors import PrivacyParameterError

from .ranks import (
    assert_same_params, composed_epsilon, expect, free_port, join_group, on_ranks, train_distributed_in_this_process,
    train_distributed_on_two_ranks,
)

WORLD = 2
N, D, K = 96, 12, 4
BATCH = 24  # q = 24/96 = 0.25, expected batch q·N = 24
STEPS = 6


# ---------------------------------------------------------------------------------------------------------------
# The training run shared by the workers and the single-process references
# ---------------------------------------------------------------------------------------------------------------
def dataset(nan_index: int | None = None) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g)
    y = torch.randint(0, K, (N,), generator=g)
    if nan_index is not None:
        x[nan_index] = float("nan")
    return TensorDataset(x, y)


def model(width: int = 32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D, width), nn.Tanh(), nn.Linear(width, K))


def params(net: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in net.named_parameters()}


def run(
    steps: int,
    *,
    distributed: bool,
    ddp: bool = False,
    seed: int | None = 0,
    init_seed: int = 0,
    width: int = 32,
    lr: float = 0.5,
    momentum: float = 0.9,
    zero_loss: bool = False,
    secure_mode: bool = False,
    load: str | None = None,
    save_after: dict[int, str] | None = None,
    nan_index: int | None = None,
    batch_size: int = BATCH,
    accountant: str = "pld",
    rotate: int = 0,
    as_list: bool = False,
    **private: Any,
) -> dict[str, Any]:
    """Train ``steps`` steps with the ordinary loop; returns parameters, per-step updates, batch sizes, ε, C."""
    net = model(width, init_seed)
    if ddp:
        net = nn.parallel.DistributedDataParallel(net)
    engine = PrivacyEngine(accountant=accountant, seed=None if secure_mode else seed, secure_mode=secure_mode)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum)
    private.setdefault("noise_multiplier", 1.0)
    private.setdefault("max_grad_norm", 1.0)
    data: Any = TensorDataset(*(t.roll(rotate, 0) for t in dataset(nan_index).tensors))
    if as_list:  # a map-style data set that is not a TensorDataset: its examples are sampled for the digest
        data = list(data)
    pm, po, loader = engine.make_private(
        net, optimizer, DataLoader(data, batch_size=batch_size), distributed=distributed, **private
    )
    if load is not None:
        engine.load_state_dict(torch.load(load, weights_only=True))
    criterion = nn.CrossEntropyLoss()
    result: dict[str, Any] = {"updates": [], "batch_sizes": [], "micro_batches": []}
    done = 0
    while done < steps:
        for x, y in loader:
            before = params(pm.module)
            out = pm(x)
            result["micro_batches"].append(len(x))
            loss = out.sum() * 0.0 if zero_loss else criterion(out, y)
            po.zero_grad()
            loss.backward()
            po.step()
            if engine.steps == done:  # a micro-batch: the logical step is not over yet
                continue
            done += 1
            after = params(pm.module)
            result["updates"].append({k: after[k] - before[k] for k in after})
            result["batch_sizes"].append(sum(result["micro_batches"]))
            result["micro_batches"] = []
            if save_after and done in save_after:
                torch.save(engine.state_dict(), save_after[done])
            if done == steps:
                break
    result.update(
        params=params(pm.module),
        epsilon=engine.get_epsilon(1e-5) if private["noise_multiplier"] >= 0.5 else None,  # σ=1e-12: ε is huge
        clip_history=engine.clip_history,
        steps=engine.steps,
        ddp_wrapper=net if ddp else None,
        model=pm,
    )
    return result


# ---------------------------------------------------------------------------------------------------------------
# The two ranks
# ---------------------------------------------------------------------------------------------------------------


def _scenarios(rank: int, tmp: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}

    # (1) noise negligible (σ = 1e-12), a DDP-wrapped model, micro-batches of ≤ 5 (a different number per rank)
    r = run(STEPS, distributed=True, ddp=True, noise_multiplier=1e-12, max_physical_batch_size=5)
    wrapper = r.pop("ddp_wrapper")
    x, _ = dataset().tensors
    out["ddp_wrapper_training_call"] = expect(EngineUsageError, lambda: wrapper(x[:3]))
    wrapper.eval()
    private_model = r.pop("model").eval()
    with torch.no_grad():  # evaluation through the wrapper is allowed and sees the trained weights
        out["ddp_wrapper_eval_ok"] = bool(torch.equal(wrapper(x[:3]), private_model(x[:3])))
    out["noiseless_ddp"] = r

    # (2) noise on (σ = 1), plain module with distributed detected automatically, vmap per-example path; rank 1
    # passes another seed: the engine must use rank 0's on every rank (or the noise would differ between ranks)
    r = run(STEPS, distributed=None, noise_multiplier=1.0, grad_sample_mode="vmap", seed=0 if rank == 0 else 100)
    r.pop("model"), r.pop("ddp_wrapper")
    out["noisy"] = r

    # (3) zero gradients: the update is −lr·noise/(qN); wide model for many coordinates
    r = run(3, distributed=True, zero_loss=True, width=1000, lr=1.0, momentum=0.0, noise_multiplier=2.0, max_grad_norm=1.5, seed=7)
    out["variance"] = {"updates": r["updates"]}

    # (4) median clipping
    r = run(8, distributed=True, clipping="median", noise_multiplier=1.0, max_grad_norm=0.05)
    r.pop("model"), r.pop("ddp_wrapper")
    out["median"] = r

    # (5) checkpoint / resume (median clipping, momentum): uninterrupted 6 steps; saved after 3 on every rank
    ckpt = {3: str(tmp / f"step3_rank{rank}.pt"), 1: str(tmp / f"step1_rank{rank}.pt")}
    straight = run(6, distributed=True, clipping="median", noise_multiplier=1.0, max_grad_norm=0.05, save_after=ckpt)
    dist.barrier()
    # a fresh model (other initial weights) and engine (other seed): the checkpoint must restore everything
    common = dict(distributed=True, clipping="median", noise_multiplier=1.0, max_grad_norm=0.05, seed=123, init_seed=9)
    own = run(3, load=ckpt[3], **common)
    shared = run(3, load=str(tmp / "step3_rank0.pt"), **common)
    out["resume"] = {
        "straight": straight["params"], "straight_clip": straight["clip_history"], "straight_eps": straight["epsilon"],
        "own": own["params"], "own_clip": own["clip_history"], "own_eps": own["epsilon"], "own_steps": own["steps"],
        "shared": shared["params"], "shared_clip": shared["clip_history"],
    }
    # ranks resuming from different checkpoints (step 3 on rank 0, step 1 on rank 1) must be refused everywhere
    mismatched = ckpt[3] if rank == 0 else ckpt[1]
    out["resume_mismatch"] = expect(EngineUsageError, lambda: run(1, load=mismatched, **common))
    # only rank 1's copy is damaged (an edited parameter: its digest fails there alone): both ranks refuse at once,
    # rank 0 with the rank that refused, instead of waiting for it in the collective check
    damaged = ckpt[3]
    if rank == 1:
        state = torch.load(ckpt[3], weights_only=True)
        first = next(iter(state["model"]))
        state["model"][first] = state["model"][first] + 1.0
        damaged = str(tmp / "damaged_rank1.pt")
        torch.save(state, damaged)
    out["damaged_on_one_rank"] = expect(PrivacyParameterError if rank == 1 else EngineUsageError,
                                        lambda: run(1, load=damaged, **common))

    # (6) secure mode: OS-seeded sampling per rank, rank 0 draws the noise and broadcasts it
    r = run(3, distributed=True, secure_mode=True, noise_multiplier=1.0)
    out["secure"] = {"params": r["params"], "epsilon": r["epsilon"], "batch_sizes": r["batch_sizes"]}

    # (7) NaN gradients on rank 1's example 1 (q = 1: always sampled): both ranks must raise at the step
    out["nonfinite"] = expect(NonFiniteGradientError, lambda: run(1, distributed=True, nan_index=1, batch_size=N))

    # (9) a tiny q: some steps leave a rank's shard (or the whole batch) empty; still one noisy step each
    r = run(8, distributed=True, sample_rate=0.03, noise_multiplier=1.0)
    out["sparse"] = {"params": r["params"], "batch_sizes": r["batch_sizes"], "steps": r["steps"]}

    # (8) ranks disagreeing on the mechanism are refused on every rank
    out["mismatch"] = expect(PrivacyParameterError, lambda: run(1, distributed=True, max_grad_norm=1.0 + rank))
    # an accountant or optimizer hyper-parameter of its own: per-rank ε, or models drifting apart
    out["mismatch_accountant"] = expect(PrivacyParameterError, lambda: run(1, distributed=True, accountant=("pld", "rdp")[rank]))
    out["mismatch_lr"] = expect(PrivacyParameterError, lambda: run(1, distributed=True, lr=0.5 + rank))
    # the same examples in another order on rank 1 (a per-rank shuffle): each rank takes its share of the sampled
    # positions, so some examples would be counted twice and others never
    out["mismatch_order"] = [expect(PrivacyParameterError, lambda: run(1, distributed=True, rotate=rank, as_list=as_list))
                             for as_list in (False, True)]
    out["frozen_on_one_rank"] = expect(EngineUsageError, lambda: _step_with_first_layer_frozen_on_rank_1(rank))
    out["mismatch_optimizer_state"] = expect(PrivacyParameterError, lambda: _momentum_on_rank_1(rank))
    out["refused_on_one_rank"] = expect(PrivacyParameterError, lambda: run(1, distributed=True, max_grad_norm=(1.0, -1.0)[rank]))
    return out


def _momentum_on_rank_1(rank: int) -> None:
    """make_private after rank 1 alone took a plain SGD step (its optimizer holds momentum buffers)."""
    net = model(32, 0)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    if rank == 1:
        x, y = dataset().tensors
        nn.functional.cross_entropy(net(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    PrivacyEngine(seed=0).make_private(net, optimizer, DataLoader(dataset(), batch_size=BATCH), distributed=True,
                                       noise_multiplier=1.0, max_grad_norm=1.0)


def _step_with_first_layer_frozen_on_rank_1(rank: int) -> None:
    """One step after rank 1 alone froze the first layer (requires_grad_(False) after make_private)."""
    net = model(32, 0)
    engine = PrivacyEngine(seed=0)
    private, optimizer, loader = engine.make_private(
        net, torch.optim.SGD(net.parameters(), lr=0.1), DataLoader(dataset(), batch_size=BATCH), distributed=True,
        noise_multiplier=1.0, max_grad_norm=1.0)
    if rank == 1:
        next(iter(net.parameters())).requires_grad_(False)
    x, y = next(iter(loader))
    optimizer.zero_grad()
    nn.functional.cross_entropy(private(x), y).backward()
    optimizer.step()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return on_ranks(_scenarios, tmp_path_factory.mktemp("dist"), WORLD)


def single(steps: int, **kwargs: Any) -> dict[str, Any]:
    return run(steps, distributed=False, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# (1) noise off: same model as one process on the same global batches
# ---------------------------------------------------------------------------------------------------------------
def test_noiseless_ddp_run_equals_single_process(ranks: list[dict[str, Any]]) -> None:
    ref = single(STEPS, noise_multiplier=1e-12, max_physical_batch_size=5)
    for r in ranks:
        assert_same_params(r["noiseless_ddp"]["params"], ref["params"], atol=1e-6)
        for mine, theirs in zip(r["noiseless_ddp"]["updates"], ref["updates"]):
            assert_same_params(mine, theirs, atol=1e-6)
    # the global batch is the single-process batch: shard sizes add up to it, step by step
    shards = [r["noiseless_ddp"]["batch_sizes"] for r in ranks]
    assert [sum(s) for s in zip(*shards)] == ref["batch_sizes"]
    assert all(len(s) == STEPS for s in shards) and min(map(min, shards)) >= 0
    # the ranks hold bitwise the same model (no drift)
    assert all(torch.equal(ranks[0]["noiseless_ddp"]["params"][k], ranks[1]["noiseless_ddp"]["params"][k]) for k in ref["params"])
    # the model moved (the test could fail): the update is not zero
    assert max(float(u.abs().max()) for u in ref["updates"][0].values()) > 1e-3


def test_training_call_of_the_ddp_wrapper_is_refused(ranks: list[dict[str, Any]]) -> None:
    for r in ranks:
        assert r["ddp_wrapper_training_call"].startswith("EngineUsageError") and "reducer" in r["ddp_wrapper_training_call"]
        assert r["ddp_wrapper_eval_ok"] is True


def test_noisy_run_equals_single_process_with_the_same_seed(ranks: list[dict[str, Any]]) -> None:
    """Noise is one shared draw: the same seed gives the same noise as a single process."""
    ref = single(STEPS, noise_multiplier=1.0, grad_sample_mode="vmap")
    for r in ranks:
        assert_same_params(r["noisy"]["params"], ref["params"], atol=1e-5)
    assert all(torch.equal(ranks[0]["noisy"]["params"][k], ranks[1]["noisy"]["params"][k]) for k in ref["params"])
    assert [sum(s) for s in zip(*(r["noisy"]["batch_sizes"] for r in ranks))] == ref["batch_sizes"]


# ---------------------------------------------------------------------------------------------------------------
# (2) noise variance: σ·C/(qN) per coordinate of the update, added once
# ---------------------------------------------------------------------------------------------------------------
def test_update_noise_has_the_single_process_variance(ranks: list[dict[str, Any]]) -> None:
    """Zero gradients, SGD lr = 1, σ = 2, C = 1.5, qN = 24: each coordinate of each update is N(0, s²), s = σC/(qN).

    S = Σ (Δ/s)² over n ≈ 54k values is χ²_n under that law; we require |S − n| < 5·√(2n) (a 5-sigma band,
    ±3% of n). Noise drawn on each of the two ranks and summed would give S ≈ 2n (z ≈ 160); noise of σ/√2 per
    rank summed would pass this test but makes the ranks differ, which the equality check below refuses.
    """
    s = 2.0 * 1.5 / (0.25 * N)
    values = torch.cat([u.flatten() for step in ranks[0]["variance"]["updates"] for u in step.values()]).double() / s
    n = values.numel()
    assert n > 50_000
    chi2 = float(values.square().sum())
    assert abs(chi2 - n) < 5 * math.sqrt(2 * n), (chi2, n)
    assert abs(float(values.mean())) < 5 / math.sqrt(n)
    for a, b in zip(ranks[0]["variance"]["updates"], ranks[1]["variance"]["updates"]):
        assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------------------------
# (3) ε: identical to single process and to the accountant composed by hand
# ---------------------------------------------------------------------------------------------------------------
def test_epsilon_equals_single_process(ranks: list[dict[str, Any]]) -> None:
    ref = single(STEPS, noise_multiplier=1.0, grad_sample_mode="vmap")
    expected = composed_epsilon(0.25, 1.0, STEPS)
    assert ref["epsilon"] == pytest.approx(expected, rel=1e-12)
    for r in ranks:
        assert r["noisy"]["steps"] == STEPS
        assert r["noisy"]["epsilon"] == ref["epsilon"]
        assert r["secure"]["epsilon"] == pytest.approx(composed_epsilon(0.25, 1.0, 3), rel=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# (4) median clipping: the same C trajectory on every rank and as one process
# ---------------------------------------------------------------------------------------------------------------
def test_median_clipping_trajectory_is_shared_and_equals_single_process(ranks: list[dict[str, Any]]) -> None:
    ref = single(8, clipping="median", noise_multiplier=1.0, max_grad_norm=0.05)
    histories = [r["median"]["clip_history"] for r in ranks]
    assert histories[0] == histories[1]
    assert len(histories[0]) == 9
    assert histories[0] == pytest.approx(ref["clip_history"], rel=1e-12)
    assert len(set(histories[0])) > 5  # C actually moved
    for r in ranks:
        assert_same_params(r["median"]["params"], ref["params"], atol=1e-5)
        assert r["median"]["epsilon"] == ref["epsilon"]


# ---------------------------------------------------------------------------------------------------------------
# (5) checkpoint / resume
# ---------------------------------------------------------------------------------------------------------------
def test_resume_in_two_processes_equals_uninterrupted(ranks: list[dict[str, Any]]) -> None:
    for r in ranks:
        res = r["resume"]
        assert res["own_steps"] == 6
        for key in ("own", "shared"):  # each rank's own checkpoint, or rank 0's loaded everywhere
            assert all(torch.equal(res[key][k], res["straight"][k]) for k in res["straight"]), key
            assert res[f"{key}_clip"] == res["straight_clip"]
        assert res["own_eps"] == res["straight_eps"]
    assert all(torch.equal(ranks[0]["resume"]["own"][k], ranks[1]["resume"]["own"][k]) for k in ranks[0]["resume"]["own"])


def test_ranks_resuming_from_different_checkpoints_are_refused(ranks: list[dict[str, Any]]) -> None:
    for r in ranks:
        assert r["resume_mismatch"].startswith("EngineUsageError"), r["resume_mismatch"]
        assert "differs from rank 0" in r["resume_mismatch"]
    assert ranks[1]["damaged_on_one_rank"].startswith("CheckpointError: corrupt checkpoint"), ranks[1]["damaged_on_one_rank"]
    assert ranks[0]["damaged_on_one_rank"].startswith("EngineUsageError: load_state_dict was refused on rank(s) [1]")


def test_steps_with_an_empty_shard_equal_single_process(ranks: list[dict[str, Any]]) -> None:
    ref = single(8, sample_rate=0.03, noise_multiplier=1.0)
    shards = [r["sparse"]["batch_sizes"] for r in ranks]
    assert 0 in shards[0] or 0 in shards[1]  # the case under test happened
    assert [sum(s) for s in zip(*shards)] == ref["batch_sizes"]
    for r in ranks:
        assert r["sparse"]["steps"] == 8
        assert_same_params(r["sparse"]["params"], ref["params"], atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Secure mode, non-finite gradients, mismatched settings
# ---------------------------------------------------------------------------------------------------------------
def test_secure_mode_broadcasts_one_release(ranks: list[dict[str, Any]]) -> None:
    a, b = (r["secure"]["params"] for r in ranks)
    assert all(torch.equal(a[k], b[k]) for k in a)
    initial = params(model())
    assert any(not torch.equal(a[k], initial[k]) for k in a)


def test_nonfinite_gradient_on_one_rank_raises_on_every_rank(ranks: list[dict[str, Any]]) -> None:
    for r in ranks:
        assert r["nonfinite"].startswith("NonFiniteGradientError"), r["nonfinite"]
        assert "rank(s) [1]" in r["nonfinite"]


def test_ranks_with_different_settings_are_refused(ranks: list[dict[str, Any]]) -> None:
    for r in ranks:
        assert r["mismatch"].startswith("PrivacyParameterError"), r["mismatch"]
        assert "clipping" in r["mismatch"]
        assert r["mismatch_accountant"].startswith("PrivacyParameterError") and "accountant" in r["mismatch_accountant"]
        assert r["mismatch_lr"].startswith("PrivacyParameterError") and "optimizer" in r["mismatch_lr"]
        # a data set in another order on one rank was accepted: the release counted every even example twice and
        # every odd one never (2·Σ_even clip(g_i) to 2e-7), while ε was charged as usual
        for refusal in r["mismatch_order"]:
            assert refusal.startswith("PrivacyParameterError") and "other data than rank 0" in refusal
            assert "in the same order" in refusal
        # a layer frozen on one rank only: the ranks' sums were reduced into other parameters (two layers of one
        # shape frozen one per rank: silently cross-wired) or gloo aborted the process
        assert r["frozen_on_one_rank"].startswith("EngineUsageError") and "train other parameters" in r["frozen_on_one_rank"]
        # momentum buffers on one rank only: accepted before, the models drifted apart from the first step
        assert r["mismatch_optimizer_state"].startswith("PrivacyParameterError")
        assert "other optimizer_state than rank 0" in r["mismatch_optimizer_state"]
    # an argument rank 1 alone refuses: rank 0 waited in the setup's collective until rank 1's process ended
    assert "rank(s) [1] refused make_private's arguments on their own" in ranks[0]["refused_on_one_rank"]
    assert "max_grad_norm must be a finite number > 0" in ranks[1]["refused_on_one_rank"]


# ---------------------------------------------------------------------------------------------------------------
# In-process checks: sharded sampling, refusals
# ---------------------------------------------------------------------------------------------------------------
def test_sharded_sampling_partitions_the_single_process_poisson_batch() -> None:
    data = dataset()
    whole = PoissonDataLoader(data, 0.25, seed=5)
    shards = [PoissonDataLoader(data, 0.25, seed=5, shard=(r, 3)) for r in range(3)]
    for _ in range(50):
        expected = whole.sample_indices()
        parts = [loader.sample_indices() for loader in shards]
        for r, part in enumerate(parts):
            assert bool((part % 3 == r).all())
        assert sorted(torch.cat(parts).tolist()) == expected.tolist()


def test_secure_sharded_sampling_includes_each_example_with_probability_q() -> None:
    """Independent OS seeds per rank: each example is still included with probability q (z-test, 5 sigma)."""
    data, q, steps = dataset(), 0.3, 300
    shards = [PoissonDataLoader(data, q, secure_mode=True, shard=(r, 2)) for r in range(2)]
    counts = torch.zeros(N)
    for _ in range(steps):
        for loader in shards:
            counts[loader.sample_indices()] += 1
    total, trials = float(counts.sum()), steps * N
    assert abs(total - q * trials) < 5 * math.sqrt(trials * q * (1 - q))
    # per example: Binomial(steps, q); none far off (5.5 sigma over 96 examples)
    assert float((counts - q * steps).abs().max()) < 5.5 * math.sqrt(steps * q * (1 - q))


def test_fsdp_is_refused_and_distributed_needs_a_process_group() -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel

    fake = FullyShardedDataParallel.__new__(FullyShardedDataParallel)
    engine = PrivacyEngine(seed=0)
    net = model()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(ModelNotSupportedError, match="FSDP"):
        engine.make_private(fake, optimizer, DataLoader(dataset(), batch_size=BATCH), noise_multiplier=1.0, max_grad_norm=1.0)
    with pytest.raises(EngineUsageError, match="init_process_group"):
        engine.make_private(net, optimizer, DataLoader(dataset(), batch_size=BATCH), noise_multiplier=1.0, max_grad_norm=1.0, distributed=True)
    assert engine.settings is None  # refused calls changed nothing


def test_train_distributed_script_under_torchrun_matches_one_process(tmp_path: Path) -> None:
    """scripts/train_distributed.py: 2 ranks under torchrun and 1 plain process give the same model (same global
    batches and noise), the same ε ≤ target, and the privacy statement."""
    import json

    two = train_distributed_on_two_ranks(tmp_path / "two")
    train_distributed_in_this_process(tmp_path / "one")
    reports = [json.loads((tmp_path / name / "privacy_report.json").read_text()) for name in ("two", "one")]
    assert [r["world_size"] for r in reports] == [2, 1]
    assert reports[0]["epsilon"] == reports[1]["epsilon"] <= 3.0
    assert reports[0]["steps"] == reports[1]["steps"] == 6
    assert reports[0]["test_accuracy"] == reports[1]["test_accuracy"]
    a, b = (torch.load(tmp_path / name / "model.pt") for name in ("two", "one"))
    for k in b:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0)
    assert "Privacy guarantee" in two.stdout and "2 process(es)" in two.stdout
    assert "RANK" not in os.environ


# ---------------------------------------------------------------------------------------------------------------
# Lock-step check: a rank that skips a batch fails fast, on every rank (its own two processes, short timeout)
# ---------------------------------------------------------------------------------------------------------------
PG_TIMEOUT_S = 20  # the safety net: without the check, rank 0 would wait this long in a collective, then fail


def _train_skipping(rank: int, skip_on_rank1: int, epochs: int) -> tuple[str, float]:
    """Train ``epochs`` epochs (4 logical batches each); rank 1 skips its batch ``skip_on_rank1`` (a bare
    ``continue``, as for an "unwanted" batch). Returns the error raised on this rank and the seconds it took."""
    net = model(8)
    engine = PrivacyEngine(seed=0)
    pm, po, loader = engine.make_private(
        net, torch.optim.SGD(net.parameters(), lr=0.1), DataLoader(dataset(), batch_size=BATCH),
        noise_multiplier=1.0, max_grad_norm=1.0, distributed=True,
    )
    criterion = nn.CrossEntropyLoss()
    start = time.perf_counter()
    try:
        for _ in range(epochs):
            for i, (x, y) in enumerate(loader):
                if rank == 1 and i == skip_on_rank1:
                    continue
                po.zero_grad()
                criterion(pm(x), y).backward()
                po.step()
    except EngineUsageError as caught:
        return f"EngineUsageError: {caught}", time.perf_counter() - start
    return "no error", time.perf_counter() - start


def _skip_worker(rank: int, port: int, tmp: str) -> None:
    join_group(rank, port, WORLD, timeout_s=PG_TIMEOUT_S)
    out: dict[str, Any] = {}
    try:
        out["middle"] = _train_skipping(rank, skip_on_rank1=1, epochs=2)  # mismatch at the next step
        out["last"] = _train_skipping(rank, skip_on_rank1=3, epochs=1)  # rank 1 ends the epoch, rank 0 steps
    except BaseException:
        out = {"error": traceback.format_exc()}
        raise
    finally:
        torch.save(out, Path(tmp) / f"skip{rank}.pt")
        dist.barrier()  # both ranks are done with gloo before either tears it down (else, rarely, an abort)
        dist.destroy_process_group()


def test_a_rank_skipping_a_batch_fails_fast_on_every_rank(tmp_path: Path) -> None:
    """Rank 1 skips a batch: before the lock-step check, rank 0's step t was silently all-reduced with rank 1's
    step t+1, and rank 0 then hung in its last all-reduce until the process-group timeout. Now rank 1 refuses the
    skip itself (in the middle of the epoch when its loop asks for the next batch, at the end when the epoch's
    iteration ends) and says so in a header exchange, so rank 0 raises at its next collective, well within the
    timeout, naming both ranks' positions."""
    mp.spawn(_skip_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"skip{r}.pt", weights_only=True) for r in range(WORLD)]
    for rank, r in enumerate(ranks):
        assert "error" not in r, r.get("error")
        for case in ("middle", "last"):
            message, seconds = r[case]
            assert message.startswith("EngineUsageError"), (case, message)
            assert seconds < 5.0 < PG_TIMEOUT_S, (case, seconds)  # the check, not the timeout, ended the run
            if rank == 1:  # refused where the skip happened, before another batch was read
                assert "went on without optimizer.step() for the batch the private loader handed out" in message
            else:
                assert "out of step" in message and "ranks [1] differ from rank 0" in message, (case, message)
                assert "rank 1 is refusing a batch its loop skipped without optimizer.step()" in message
    # skipped batch 1 (the 2nd): rank 0 is in the step of batch 2; skipped the last batch: in its 4th step
    assert ("rank 0 is in optimizer.step() after its loader drew 2 logical batch(es) and its engine released 1 "
            in ranks[0]["middle"][0])
    assert "rank 0 is in optimizer.step() after its loader drew 4" in ranks[0]["last"][0]

