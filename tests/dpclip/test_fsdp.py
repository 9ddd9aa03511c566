"""DP training of an FSDP2 (``fully_shard``) model on two real processes (gloo, CPU), against independent references.

One ``torch.multiprocessing.spawn`` of two ranks runs every scenario; each test checks one against

- the same model trained in a single process with the same seed (no sharding at all): same global batches,
  same model to 1e-6 with negligible noise, same ε;
- the closed form of the noise: with zero gradients the update is −lr·noise/(qN), N(0, (lr·σ·C/(qN))²) per
  coordinate (chi-square over every coordinate of the gathered model), and the two ranks' shards of one
  parameter are uncorrelated (a stream shared by the shards would make them equal);
- the PLD accountant composed by hand; the uninterrupted run, for checkpoint/resume.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from dpclip import ModelNotSupportedError, PrivacyEngine
from dpclip.checkpoint import CheckpointError
from dpclip.errors import EngineUsageError, PrivacyParameterError
from dpclip.optimizer import DPOptimizer

from .ranks import (
    assert_same_params, composed_epsilon, expect, on_ranks, train_distributed_in_this_process, train_distributed_on_two_ranks,
)

pytest.importorskip("torch.distributed.fsdp")
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

WORLD = 2
N, T, V, K = 96, 6, 40, 5  # examples, tokens per example, vocabulary, classes (5: shards of 3 and 2 rows)
BATCH = 24  # q = 0.25
STEPS = 6


class TokenClassifier(nn.Module):
    """Embedding → (LayerNorm → Linear → Tanh) → mean over tokens → Linear: rows split unevenly across 2 ranks."""

    def __init__(self, width: int = 24) -> None:
        super().__init__()
        self.embed = nn.Embedding(V, 16)
        self.body = nn.Sequential(nn.LayerNorm(16), nn.Linear(16, width), nn.Tanh())
        self.head = nn.Linear(width, K)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.embed(tokens)).mean(dim=1))


def dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randint(0, V, (N, T), generator=g), torch.randint(0, K, (N,), generator=g))


def build(init_seed: int = 0, width: int = 24, mesh: Any = None, root: bool = True, **fsdp: Any) -> nn.Module:
    torch.manual_seed(init_seed)
    net = TokenClassifier(width)
    if mesh is not None:
        fully_shard(net.body, mesh=mesh, **fsdp)
        fully_shard(net.head, mesh=mesh, **fsdp)  # a Linear itself wrapped: its class becomes FSDPLinear
        if root:
            fully_shard(net, mesh=mesh, **fsdp)
    return net


def full_params(net: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter whole (a collective for DTensors: all ranks call it together)."""
    return {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for name, p in net.named_parameters()}


def run(steps: int, *, mesh: Any = None, seed: int | None = 0, init_seed: int = 0, width: int = 24, lr: float = 0.5,
        momentum: float = 0.9, zero_loss: bool = False, secure_mode: bool = False, load: str | None = None,
        save_after: dict[int, str] | None = None, **private: Any) -> dict[str, Any]:
    """Train ``steps`` steps with the ordinary loop (sharded when ``mesh`` is given); parameters, updates, ε, C."""
    net = build(init_seed, width, mesh)
    engine = PrivacyEngine(seed=None if secure_mode else seed, secure_mode=secure_mode)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum)
    private.setdefault("noise_multiplier", 1.0)
    private.setdefault("max_grad_norm", 1.0)
    pm, po, loader = engine.make_private(net, optimizer, DataLoader(dataset(), batch_size=BATCH),
                                         distributed=mesh is not None, **private)
    if load is not None:
        engine.load_state_dict(torch.load(load, weights_only=True))
    criterion = nn.CrossEntropyLoss()
    result: dict[str, Any] = {"updates": [], "batch_sizes": []}
    while engine.steps < steps:
        for x, y in loader:
            before = full_params(pm.module)
            out = pm(x)
            loss = out.sum() * 0.0 if zero_loss else criterion(out, y)
            po.zero_grad()
            loss.backward()
            po.step()
            after = full_params(pm.module)
            result["updates"].append({k: after[k] - before[k] for k in after})
            result["batch_sizes"].append(len(x))
            if save_after and engine.steps in save_after:
                torch.save(engine.state_dict(), save_after[engine.steps])
            if engine.steps == steps:
                break
    result.update(params=full_params(pm.module), epsilon=engine.get_epsilon(1e-5) if private["noise_multiplier"] >= 0.5 else None,
                  clip_history=list(engine.clip_history), steps=engine.steps, path=engine.grad_sample_path)
    if mesh is not None:  # this rank's own rows of the head's weight (the shards of one parameter)
        result["head_rows"] = pm.module.head.weight.to_local().detach().clone()
        result["grads_are_dtensors"] = all(isinstance(p.grad, DTensor) for p in pm.module.parameters())
    return result


def causal_lm_run(mode: str, mesh: Any = None, steps: int = 3) -> dict[str, dict[str, torch.Tensor]]:
    """The causal-LM job's tiny GPT-2 (tied input/output embeddings; ``mode`` "full" or "lora" via peft), each
    block and the model ``fully_shard``-ed when ``mesh`` is given, trained ``steps`` steps with negligible noise on
    random byte sequences; the whole parameters before and after."""
    import warnings

    fl = pytest.importorskip("dpclip_examples.finetune_lm")
    args = fl.parse_args(["--quick", "--n-layer", "2", "--n-embd", "32", "--context", "16", "--max-length", "16"])
    model = fl.build_model(fl.new_model(args), args, mode)
    if mesh is not None:
        for block in (model.base_model.model if mode == "lora" else model).transformer.h:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    gen = torch.Generator().manual_seed(1)
    texts = ["".join(chr(97 + int(c)) for c in torch.randint(0, 8, (int(n),), generator=gen))
             for n in torch.randint(3, 20, (48,), generator=gen)]
    data = TensorDataset(*fl.ByteTokenizer().batch(texts, 16))
    engine = PrivacyEngine(seed=0)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    before = full_params(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # σ = 1e-12 (the test compares models, not ε)
        pm, po, loader = engine.make_private(model, optimizer, DataLoader(data, batch_size=16), noise_multiplier=1e-12,
                                             max_grad_norm=0.5, distributed=mesh is not None)
    while engine.steps < steps:
        for ids, mask in loader:
            po.zero_grad()
            fl.sequence_losses(fl.lm_logits(pm, ids), ids, mask).mean().backward()
            po.step()
            if engine.steps == steps:
                break
    return {"before": before, "after": full_params(pm.module)}


def _scenarios(rank: int, tmp: Path) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (WORLD,))
    out: dict[str, Any] = {}
    # (1) negligible noise: the model of one process, step by step
    out["noiseless"] = run(STEPS, mesh=mesh, noise_multiplier=1e-12)
    # (2) noise on; rank 1 passes another seed (rank 0's is used everywhere)
    out["noisy"] = run(STEPS, mesh=mesh, seed=0 if rank == 0 else 100)
    # (3) zero gradients: the update is the noise alone; a wide body for many coordinates
    r = run(3, mesh=mesh, zero_loss=True, width=600, lr=1.0, momentum=0.0, noise_multiplier=2.0, max_grad_norm=1.5, seed=7)
    out["variance"] = {"updates": r["updates"], "head_rows": r["head_rows"]}
    # (4) median clipping: one shared noisy count
    r = run(8, mesh=mesh, clipping="median", noise_multiplier=1.0, max_grad_norm=0.05)
    out["median"] = {"params": r["params"], "clip_history": r["clip_history"]}
    # (5) checkpoint / resume: each rank saves and loads its own file; a fresh model and engine (other seed)
    files = {3: str(tmp / f"step3_rank{rank}.pt")}
    straight = run(6, mesh=mesh, save_after=files)
    dist.barrier()
    resumed = run(6, mesh=mesh, load=files[3], seed=123, init_seed=9)  # steps 4-6 after the 3 loaded
    out["resume"] = {"straight": straight["params"], "resumed": resumed["params"], "steps": resumed["steps"],
                     "straight_eps": straight["epsilon"], "resumed_eps": resumed["epsilon"]}
    swapped = str(tmp / f"step3_rank{1 - rank}.pt")  # both ranks load the other's file: both refuse alone
    out["resume_swapped"] = expect(CheckpointError, lambda: run(0, mesh=mesh, load=swapped))
    # (6) secure mode: each rank's OS-seeded generator for its rows
    r = run(3, mesh=mesh, secure_mode=True, zero_loss=True, width=600, lr=1.0, momentum=0.0)
    out["secure"] = {"updates": r["updates"], "epsilon": r["epsilon"]}
    # (8) the causal-LM job's GPT-2 (tied embeddings, Hugging Face blocks sharded), full and LoRA
    out["causal_lm"] = {mode: causal_lm_run(mode, mesh) for mode in ("full", "lora")}
    # (7) refusals, on both ranks alike, before any collective
    out["vmap"] = expect(PrivacyParameterError, lambda: run(1, mesh=mesh, grad_sample_mode="vmap"))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16)
    out["mixed"] = expect(ModelNotSupportedError, lambda: PrivacyEngine().make_private(
        build(mesh=mesh, mp_policy=policy), torch.optim.SGD([torch.zeros(1)], lr=1), DataLoader(dataset(), batch_size=8),
        noise_multiplier=1.0, max_grad_norm=1.0))
    out["no_root"] = expect(ModelNotSupportedError, lambda: PrivacyEngine().make_private(
        build(mesh=mesh, root=False), torch.optim.SGD([torch.zeros(1)], lr=1), DataLoader(dataset(), batch_size=8),
        noise_multiplier=1.0, max_grad_norm=1.0))
    # (9) ranks disagreeing on C: refused before FSDP2's settings or the parameters change; the model still trains
    net = build(mesh=mesh)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
    out["disagree"] = expect(PrivacyParameterError, lambda: PrivacyEngine(seed=0).make_private(
        net, optimizer, DataLoader(dataset(), batch_size=BATCH), noise_multiplier=1.0, max_grad_norm=1.0 + rank))
    out["after_refusal_dtensors"] = all(isinstance(p, DTensor) for p in net.parameters())
    _, private_optimizer, loader = PrivacyEngine(seed=0).make_private(
        net, optimizer, DataLoader(dataset(), batch_size=BATCH), noise_multiplier=1.0, max_grad_norm=1.0)
    out["retry_accepted"] = isinstance(private_optimizer, DPOptimizer)
    # (10) every rank's shard empty (q tiny), step() without a forward: raised torch's "mixed torch.Tensor and
    # DTensor" out of the reduce-scatter on every rank
    net = build(mesh=mesh)
    _, private_optimizer, loader = PrivacyEngine(seed=0).make_private(
        net, torch.optim.SGD(net.parameters(), lr=0.5), DataLoader(dataset(), batch_size=BATCH), noise_multiplier=1.0,
        max_grad_norm=1.0, sample_rate=1e-6)
    batch = next(iter(loader))
    out["empty_batch"] = len(batch[0])
    out["step_without_forward"] = expect(EngineUsageError, private_optimizer.step)
    # (11) rank 1 skips its second batch: FSDP2's all-gather in rank 0's next forward met rank 1's refusal header,
    # and both ranks hung until the process group's timeout (raw gloo errors)
    out["skip_on_one_rank"] = expect(EngineUsageError, lambda: _skipping_on_rank_1(rank, mesh))
    return out


def _skipping_on_rank_1(rank: int, mesh: Any) -> None:
    net = build(mesh=mesh)
    private, optimizer, loader = PrivacyEngine(seed=0).make_private(
        net, torch.optim.SGD(net.parameters(), lr=0.5), DataLoader(dataset(), batch_size=BATCH), noise_multiplier=1.0,
        max_grad_norm=1.0)
    for i, (x, y) in enumerate(loader):
        if rank == 1 and i == 1:
            continue
        out = private(x)
        optimizer.zero_grad()
        nn.functional.cross_entropy(out, y).backward()
        optimizer.step()
        if i == 3:
            break


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return on_ranks(_scenarios, tmp_path_factory.mktemp("fsdp"), WORLD)


def test_noiseless_fsdp2_run_equals_single_process(ranks: list[dict[str, Any]]) -> None:
    ref = run(STEPS, noise_multiplier=1e-12)
    for r in ranks:
        assert r["noiseless"]["path"] == "layerwise" and r["noiseless"]["grads_are_dtensors"]
        assert_same_params(r["noiseless"]["params"], ref["params"], atol=1e-6)
        for mine, theirs in zip(r["noiseless"]["updates"], ref["updates"]):
            assert_same_params(mine, theirs, atol=1e-6)
    shards = [r["noiseless"]["batch_sizes"] for r in ranks]  # the two shards make up the one-process batch
    assert [a + b for a, b in zip(*shards)] == ref["batch_sizes"]
    assert max(float(u.abs().max()) for u in ref["updates"][0].values()) > 1e-3  # the model moved


def test_noisy_fsdp2_run_has_the_single_process_epsilon(ranks: list[dict[str, Any]]) -> None:
    expected = composed_epsilon(BATCH / N, 1.0, STEPS)
    ref = run(STEPS)
    for r in ranks:
        assert r["noisy"]["epsilon"] == pytest.approx(expected, rel=1e-9)
        assert r["noisy"]["epsilon"] == pytest.approx(ref["epsilon"], rel=1e-12)
        assert all(torch.isfinite(t).all() for t in r["noisy"]["params"].values())
    assert_same_params(ranks[0]["noisy"]["params"], ranks[1]["noisy"]["params"], atol=0)  # one model on both ranks


def _pure_noise(updates: list[dict[str, torch.Tensor]], std: float) -> tuple[float, int]:
    values = torch.cat([u.reshape(-1) for step in updates for u in step.values()]).double() / std
    return float((values**2).sum()), values.numel()


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_sharded_causal_lm_equals_single_process(ranks: list[dict[str, Any]], mode: str) -> None:
    """A GPT-2 with tied input/output embeddings (one parameter, two uses, both sharded), its blocks and the model
    fully_shard-ed, trains like the unsharded model in one process (noise negligible), in full and with LoRA."""
    ref = causal_lm_run(mode)
    for r in ranks:
        assert_same_params(r["causal_lm"][mode]["before"], ref["before"], atol=0)
        assert_same_params(r["causal_lm"][mode]["after"], ref["after"], atol=1e-6)
    moved = max(float((ref["after"][k] - ref["before"][k]).abs().max()) for k in ref["after"])
    assert moved > 1e-2


def test_update_noise_has_the_calibrated_variance(ranks: list[dict[str, Any]]) -> None:
    std = 1.0 * 2.0 * 1.5 / (BATCH / N * N)  # lr·σ·C/(qN)
    for r in ranks:
        chi2, n = _pure_noise(r["variance"]["updates"], std)
        # chi-square with n degrees of freedom: mean n, sd √(2n); 5 sd either side (two draws: 2n; none: 0)
        assert abs(chi2 - n) < 5 * math.sqrt(2 * n), (chi2, n)
    assert_same_params(ranks[0]["variance"]["updates"][0], ranks[1]["variance"]["updates"][0], atol=0)


def test_the_shards_noise_is_independent(ranks: list[dict[str, Any]]) -> None:
    """The head's weight (5 × 600) is split 3 + 2 rows: the ranks' rows of the pure-noise update are
    uncorrelated (a stream shared by both ranks would repeat rank 0's first rows on rank 1)."""
    update = ranks[0]["variance"]["updates"][0]["head.weight"]
    first, second = update[:2].reshape(-1).double(), update[3:5].reshape(-1).double()
    r = float(torch.corrcoef(torch.stack([first, second]))[0, 1])
    assert abs(r) < 5 / math.sqrt(first.numel()), r
    assert ranks[0]["variance"]["head_rows"].shape[0] == 3 and ranks[1]["variance"]["head_rows"].shape[0] == 2


def test_median_clipping_count_is_one_shared_draw(ranks: list[dict[str, Any]]) -> None:
    """Both ranks follow one trajectory of C (the global count, noised once from the shared generator) and
    hold one model. (It is not the single-process trajectory: there the same generator also drew the gradient
    noise before the count's, here each shard's generator draws its own.)"""
    first, second = (r["median"] for r in ranks)
    assert first["clip_history"] == second["clip_history"] and len(first["clip_history"]) == 9
    assert first["clip_history"][-1] > 0.05 * 1.3  # C moved towards the median norm (all norms are > 0.05)
    assert_same_params(first["params"], second["params"], atol=0)


def test_resume_from_each_ranks_checkpoint_equals_uninterrupted(ranks: list[dict[str, Any]]) -> None:
    for r in ranks:
        assert r["resume"]["steps"] == 6
        assert_same_params(r["resume"]["resumed"], r["resume"]["straight"], atol=0)
        assert r["resume"]["resumed_eps"] == pytest.approx(r["resume"]["straight_eps"], rel=1e-12)
        assert "rank" in r["resume_swapped"] and "holds rank" in r["resume_swapped"]


def test_secure_mode_noise_has_the_calibrated_variance(ranks: list[dict[str, Any]]) -> None:
    std = 1.0 * 1.0 * 1.0 / BATCH
    chi2, n = _pure_noise(ranks[0]["secure"]["updates"], std)
    assert abs(chi2 - n) < 5 * math.sqrt(2 * n), (chi2, n)
    assert ranks[0]["secure"]["epsilon"] == pytest.approx(composed_epsilon(BATCH / N, 1.0, 3), rel=1e-9)
    assert_same_params(ranks[0]["secure"]["updates"][-1], ranks[1]["secure"]["updates"][-1], atol=0)


def test_unsupported_fsdp2_setups_are_refused_with_the_fix(ranks: list[dict[str, Any]]) -> None:
    for r in ranks:
        assert "grad_sample_mode='vmap' is not available for FSDP2" in r["vmap"]
        assert "MixedPrecisionPolicy" in r["mixed"] and "torch.autocast" in r["mixed"]
        assert "fully_shard(model) on the root" in r["no_root"]
        # the refusal came after the parameters were gathered and FSDP2's resharding and gradient sync switched off:
        # plain tensors after it, a plain FSDP step moving nothing, and a retry refused as 'not sharded'
        assert r["disagree"].startswith("PrivacyParameterError") and "other" in r["disagree"], r["disagree"]
        assert r["after_refusal_dtensors"] and r["retry_accepted"]
        assert r["empty_batch"] == 0 and "every rank must run the model on every batch" in r["step_without_forward"]
    assert "out of step" in ranks[0]["skip_on_one_rank"]
    assert "without optimizer.step()" in ranks[1]["skip_on_one_rank"]


def test_train_distributed_script_with_fsdp_under_torchrun(tmp_path: Path) -> None:
    """scripts/train_distributed.py --fsdp on 2 ranks: the ε and steps of the one-process run, a whole model
    gathered from the shards with the one-process model's names and shapes, and one checkpoint per rank holding
    that rank's rows."""
    import json

    two = train_distributed_on_two_ranks(tmp_path / "two", "--fsdp")
    train_distributed_in_this_process(tmp_path / "one")
    sharded, single = (json.loads((tmp_path / name / "privacy_report.json").read_text()) for name in ("two", "one"))
    assert sharded["world_size"] == 2 and sharded["epsilon"] == single["epsilon"] <= 3.0
    assert sharded["steps"] == single["steps"] == 6
    whole, reference = (torch.load(tmp_path / name / "model.pt") for name in ("two", "one"))
    assert {k: tuple(v.shape) for k, v in whole.items()} == {k: tuple(v.shape) for k, v in reference.items()}
    for rank in range(2):
        state = torch.load(tmp_path / "two" / f"checkpoint-rank{rank}.pt", weights_only=True)
        assert state["shard"]["rank"] == rank and state["shard"]["world_size"] == 2
        for name, rows in state["model"].items():  # each rank's rows of the whole model (torch.chunk split)
            torch.testing.assert_close(rows, whole[name].chunk(2)[rank], atol=0, rtol=0)
    assert "Privacy guarantee" in two.stdout
