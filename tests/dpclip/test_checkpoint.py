"""Checkpoints (dpclip.checkpoint): atomic writes, integrity, weights_only, and what a loaded checkpoint may not change.

Each test is the one that would have caught a finding of the adversarial review:
1. a checkpoint overrode the engine's budget and C;
2. checkpoints were written in place (killed mid-write: the previous one lost);
3. no integrity check (corrupted files loaded with silently changed state; history emptied + steps = 0 reset ε);
4. torch.load(weights_only=False) on checkpoints and caches;
5. an SGD checkpoint loaded into an Adam engine, and the next step died with KeyError: 'betas'.
"""

from __future__ import annotations

import copy
import io
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import dpclip
from dpclip import CheckpointError, PrivacyBudgetExceeded, PrivacyEngine, PrivacyParameterError
from dpclip.checkpoint import engine_state, load_engine_state, state_digest

ROOT = Path(__file__).resolve().parents[2]


def data(n: int = 200, d: int = 10, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return TensorDataset(x, (x[:, 0] + 0.5 * x[:, 1] > 0).long())


def private(
    seed: int = 0, init: int = 0, optimizer: Callable[..., torch.optim.Optimizer] | None = None, **kwargs: Any
) -> tuple[PrivacyEngine, nn.Module, torch.optim.Optimizer, Any]:
    torch.manual_seed(init)
    model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 2))
    opt = (optimizer or (lambda p: torch.optim.SGD(p, lr=0.1)))(model.parameters())
    kwargs.setdefault("noise_multiplier", 1.0)
    kwargs.setdefault("max_grad_norm", 1.0)
    engine = PrivacyEngine(seed=seed)
    return (engine, *engine.make_private(model, opt, DataLoader(data(), batch_size=20), **kwargs))


def train(model: nn.Module, optimizer: Any, loader: Any, steps: int) -> None:
    done = 0
    while done < steps:
        for x, y in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            done += 1
            if done == steps:
                return


def fingerprint(engine: PrivacyEngine) -> str:
    """Digest of everything the engine would checkpoint (model, optimizer, accountant, C, budget, steps, RNGs)."""
    return state_digest(engine_state(engine))


# ------------------------------------------------------------------------------------------------------
# Round trip, weights_only, atomic file
# ------------------------------------------------------------------------------------------------------
def test_save_and_load_checkpoint_resume_exactly(tmp_path: Path) -> None:
    adam = lambda p: torch.optim.Adam(p, lr=0.01)  # noqa: E731
    engine, m, o, l = private(optimizer=adam, clipping="median", count_noise_multiplier=5.0)
    train(m, o, l, 12)
    straight = {k: v.clone() for k, v in m.module.state_dict().items()}

    engine, m, o, l = private(optimizer=adam, clipping="median", count_noise_multiplier=5.0)
    train(m, o, l, 5)
    path = dpclip.save_checkpoint(tmp_path / "ckpt.pt", engine, epoch=0, note="five steps", losses=[0.5, 0.25])
    assert isinstance(torch.load(path, weights_only=True), dict)  # loads without unpickling any code
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary file left behind
    torch.manual_seed(999)
    again, m2, o2, l2 = private(seed=7, init=3, optimizer=adam, clipping="median", count_noise_multiplier=5.0)
    extra = dpclip.load_checkpoint(path, again)
    assert extra == {"epoch": 0, "note": "five steps", "losses": [0.5, 0.25]}
    assert again.steps == 5 and again.clip_history == engine.clip_history
    train(m2, o2, l2, 7)
    assert all(torch.equal(m2.module.state_dict()[k], straight[k]) for k in straight)


def test_save_checkpoint_creates_a_missing_folder(tmp_path: Path) -> None:
    engine, m, o, l = private()
    train(m, o, l, 2)
    path = dpclip.save_checkpoint(tmp_path / "run" / "deeper" / "ckpt.pt", engine, epoch=1)
    assert [p.name for p in path.parent.iterdir()] == ["ckpt.pt"]
    again, *_ = private()
    assert dpclip.load_checkpoint(path, again) == {"epoch": 1} and again.steps == 2


def test_an_in_memory_state_stays_loadable_after_training_from_it() -> None:
    """Training after load_state_dict must not write into the loaded dict (torch's Optimizer.load_state_dict keeps
    the dict's tensors: Adam's moments and step counters, SGD's momentum), so it loads again, anywhere."""
    adam = lambda p: torch.optim.Adam(p, lr=0.01)  # noqa: E731
    engine, m, o, l = private(optimizer=adam)
    train(m, o, l, 3)
    state = engine.state_dict()
    pristine = copy.deepcopy(state)
    again, m2, o2, l2 = private(seed=5, init=2, optimizer=adam)
    again.load_state_dict(state)
    train(m2, o2, l2, 2)
    assert state_digest(state) == state_digest(pristine)
    third, *_ = private(seed=6, init=4, optimizer=adam)
    third.load_state_dict(state)  # the same dict, again: accepted
    assert third.steps == 3


def test_rewinding_an_engine_is_refused_and_a_branch_can_take_fresh_randomness() -> None:
    """Loading step k into an engine that released more steps would drop them from ε and replay their noise:
    refused, nothing changed. Two branches from one checkpoint release identical noise unless they ask for fresh
    randomness: then their releases differ by more than the noiseless difference (lr differs only after load)."""
    engine, m, o, l = private()
    train(m, o, l, 3)
    state = copy.deepcopy(engine.state_dict())
    train(m, o, l, 2)
    before = fingerprint(engine)
    with pytest.raises(CheckpointError, match="already released 5 steps and the checkpoint holds 3"):
        engine.load_state_dict(state)
    assert fingerprint(engine) == before and engine.steps == 5

    def branch(fresh: bool) -> torch.Tensor:
        other, m2, o2, l2 = private(seed=9, init=1)
        other.load_state_dict(state, fresh_randomness=fresh)
        train(m2, o2, l2, 1)
        return torch.cat([p.detach().flatten() for p in m2.module.parameters()])

    assert torch.equal(branch(False), branch(False))  # exact resume: the same noise and batch
    assert not torch.equal(branch(True), branch(True))
    with pytest.raises(PrivacyParameterError, match="fresh_randomness must be True or False"):
        private(seed=9)[0].load_state_dict(state, fresh_randomness="yes")


def test_extra_that_weights_only_cannot_load_is_refused_before_writing(tmp_path: Path) -> None:
    engine, m, o, l = private()
    with pytest.raises(CheckpointError, match="weights_only"):
        dpclip.save_checkpoint(tmp_path / "ckpt.pt", engine, out=tmp_path)  # a Path: str(path) it first
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_of_an_earlier_format_is_refused() -> None:
    engine, m, o, l = private()
    state = {**engine.state_dict(), "version": 1}
    with pytest.raises(CheckpointError, match="version 1.*without an integrity digest"):
        engine.load_state_dict(state)


def test_a_secure_mode_engine_continuing_a_seeded_run_keeps_the_seed_caveat_for_its_steps() -> None:
    """The noise of a run without secure_mode comes from seeded generators whose state the checkpoint holds: a
    secure-mode engine that loads it keeps saying, for those steps, that ε assumes the seeds stay secret (it said
    nothing before), and its own steps add none; a checkpoint written before the count was kept counts every step."""
    seeded, m, o, l = private()
    train(m, o, l, 3)
    state = seeded.state_dict()
    assert seeded.privacy_report(1e-5)["seeded_steps"] == 3

    def secure_engine() -> tuple[PrivacyEngine, nn.Module, Any, Any]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 2))
        engine = PrivacyEngine(secure_mode=True)
        return (engine, *engine.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                             DataLoader(data(), batch_size=20), noise_multiplier=1.0, max_grad_norm=1.0))

    secure, m2, o2, l2 = secure_engine()
    train(m2, o2, l2, 1)
    assert "seeds stay secret" not in secure.privacy_report(1e-5)["statement"]  # its own steps: no caveat
    secure, m2, o2, l2 = secure_engine()
    secure.load_state_dict(state)
    train(m2, o2, l2, 1)
    report = secure.privacy_report(1e-5)
    assert (report["steps"], report["seeded_steps"]) == (4, 3)
    assert "3 of the 4 steps come from a checkpoint of a run without secure_mode" in report["statement"]
    assert "seeds stay secret" in report["statement"]
    older = {key: value for key, value in state.items() if key != "seeded_steps"}  # written before the count
    older["integrity"] = {**state["integrity"], "digest": state_digest(older)}
    secure, m2, o2, l2 = secure_engine()
    secure.load_state_dict(older)
    assert secure.privacy_report(1e-5)["seeded_steps"] == 3


# ------------------------------------------------------------------------------------------------------
# 1. The engine's budget and C stand
# ------------------------------------------------------------------------------------------------------
def test_a_budget_less_checkpoint_does_not_lift_the_engines_budget() -> None:
    engine, m, o, l = private()
    train(m, o, l, 30)
    spent = engine.get_epsilon(1e-5)
    state = engine.state_dict()
    strict, m2, o2, l2 = private(target_epsilon=0.5, target_delta=1e-5)
    strict.load_state_dict(state)
    assert strict.budget == (0.5, 1e-5) and spent > 0.5
    with pytest.raises(PrivacyBudgetExceeded):
        train(m2, o2, l2, 1)
    assert strict.steps == 30 and strict.get_epsilon() == spent


def test_the_stricter_budget_wins() -> None:
    engine, m, o, l = private(target_epsilon=3.0, target_delta=1e-5)
    train(m, o, l, 2)
    state = engine.state_dict()
    for own, expected in [
        (None, (3.0, 1e-5)),  # no budget of its own: the checkpoint's applies
        ((8.0, 1e-5), (3.0, 1e-5)),
        ((2.0, 1e-5), (2.0, 1e-5)),
        ((8.0, 1e-6), (3.0, 1e-6)),  # different δs: (min ε, min δ), which implies both constraints
        ((2.0, 1e-4), (2.0, 1e-5)),
    ]:
        budget = {} if own is None else {"target_epsilon": own[0], "target_delta": own[1]}
        other, *_ = private(**budget)
        other.load_state_dict(copy.deepcopy(state))
        assert other.budget == expected, own


def test_fixed_clipping_refuses_another_C_and_median_clipping_restores_it() -> None:
    engine, m, o, l = private(max_grad_norm=1.0)
    train(m, o, l, 2)
    state = engine.state_dict()
    other, *_ = private(max_grad_norm=2.0, seed=3)
    before = fingerprint(other)
    with pytest.raises(CheckpointError, match="max_grad_norm=1.0.*clips to 2.0.*part of the mechanism"):
        other.load_state_dict(state)
    assert fingerprint(other) == before and other.clipping.max_norm == 2.0

    engine, m, o, l = private(max_grad_norm=0.05, clipping="median", count_noise_multiplier=5.0)
    train(m, o, l, 6)
    adapted = engine.clipping.max_norm
    assert adapted != 0.05
    other, m2, o2, l2 = private(max_grad_norm=3.0, clipping="median", count_noise_multiplier=5.0)
    other.load_state_dict(engine.state_dict())
    assert other.clipping.max_norm == adapted and other.clip_history == engine.clip_history
    train(m2, o2, l2, 1)  # the restored C is the engine's own bound now
    assert other.steps == 7


# ------------------------------------------------------------------------------------------------------
# 5. Another optimizer is refused at load, not at the next step
# ------------------------------------------------------------------------------------------------------
def test_a_checkpoint_of_another_optimizer_class_is_refused() -> None:
    engine, m, o, l = private()  # SGD
    train(m, o, l, 2)
    state = engine.state_dict()
    adam, m2, o2, l2 = private(optimizer=lambda p: torch.optim.Adam(p, lr=0.01))
    before = fingerprint(adam)
    with pytest.raises(CheckpointError, match=r"optimizer is 'torch\.optim\.sgd\.SGD'.*'torch\.optim\.adam\.Adam'.*same optimizer class"):
        adam.load_state_dict(state)
    assert fingerprint(adam) == before
    train(m2, o2, l2, 1)  # no KeyError: 'betas'
    assert adam.steps == 1


def test_a_checkpoint_lacking_a_hyper_parameter_the_optimizer_reads_is_refused() -> None:
    engine, m, o, l = private()
    train(m, o, l, 1)
    state = engine.state_dict()

    def tagged(params: Any) -> torch.optim.Optimizer:
        opt = torch.optim.SGD(params, lr=0.1)
        opt.param_groups[0]["lr_floor"] = 0.0  # e.g. read by a custom scheduler
        return opt

    other, *_ = private(optimizer=tagged)
    with pytest.raises(CheckpointError, match=r"lacks the hyper-parameters \['lr_floor'\]"):
        other.load_state_dict(state)
    assert other.steps == 0


# ------------------------------------------------------------------------------------------------------
# 3. Integrity: a keyed MAC, and a corruption fuzz
# ------------------------------------------------------------------------------------------------------
def test_a_keyed_checkpoint_needs_its_key_and_resists_a_forger() -> None:
    engine, m, o, l = private()
    train(m, o, l, 3)
    signed = engine.state_dict(key=b"secret")
    other, *_ = private(seed=5)
    with pytest.raises(CheckpointError, match="signed.*key="):
        other.load_state_dict(copy.deepcopy(signed))
    with pytest.raises(CheckpointError, match="HMAC does not verify"):
        other.load_state_dict(copy.deepcopy(signed), key="wrong")
    with pytest.raises(CheckpointError, match="not signed"):
        other.load_state_dict(engine.state_dict(), key=b"secret")
    assert other.steps == 0

    # A forger who empties the history (ε → 0) and recomputes a plain SHA-256: the unkeyed check cannot tell,
    # which is why the threat model (README "Checkpoints") is corruption and accidental edits; the key can.
    forged = copy.deepcopy(signed)
    forged.update(steps=0, accountant={**forged["accountant"], "history": []}, release_trail=[])
    forged["clipping"]["history"] = forged["clipping"]["history"][:1]
    forged["integrity"] = {"algorithm": "sha256", "digest": state_digest(forged)}
    with pytest.raises(CheckpointError, match="not signed"):
        other.load_state_dict(copy.deepcopy(forged), key=b"secret")
    forged["integrity"] = {"algorithm": "hmac-sha256", "digest": state_digest(forged)}
    with pytest.raises(CheckpointError, match="HMAC does not verify"):
        other.load_state_dict(forged, key=b"secret")
    assert other.steps == 0
    other.load_state_dict(signed, key=b"secret")
    assert other.steps == 3


def _leaves(obj: Any, path: tuple = ()) -> list[tuple[tuple, Any]]:
    """(path, value) of every node below the root (containers and leaves alike)."""
    out = []
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else []
    for k, v in items:
        out.append(((*path, k), v))
        out.extend(_leaves(v, (*path, k)))
    return out


def _edited(state: dict[str, Any], path: tuple, change: Callable[[Any], Any] | None) -> dict[str, Any]:
    """A deep copy of ``state`` with the node at ``path`` replaced by ``change(node)`` (removed if None)."""
    state = copy.deepcopy(state)
    parent = state
    for k in path[:-1]:
        if isinstance(parent[k], tuple):
            parent[k] = list(parent[k])
        parent = parent[k]
    if change is None:
        del parent[path[-1]]
    else:
        parent[path[-1]] = change(parent[path[-1]])
    return state


def _tensor_edits(t: torch.Tensor) -> list[Callable[[Any], Any]]:
    edits: list[Callable[[Any], Any]] = [lambda t: t.to(torch.float64 if t.dtype != torch.float64 else torch.float32)]
    if t.numel():
        def bump(t: torch.Tensor) -> torch.Tensor:
            t = t.clone()
            flat = t.view(-1)
            flat[len(flat) // 2] = (flat[len(flat) // 2] + 1) if t.dtype != torch.bool else ~flat[len(flat) // 2]
            return t
        edits += [bump, lambda t: t.reshape(-1)[:-1].clone()]
    return edits


def _value_edits(v: Any) -> list[Callable[[Any], Any]]:
    if isinstance(v, torch.Tensor):
        return _tensor_edits(v)
    if isinstance(v, bool):
        return [lambda v: not v]
    if isinstance(v, (int, float)):
        return [lambda v: v + 1, lambda v: -v if v else 1, lambda v: None]
    if isinstance(v, str):
        return [lambda v: v + "x", lambda v: ""]
    if v is None:
        return [lambda v: 0]
    if isinstance(v, (list, tuple)):
        return [lambda v: list(v)[:-1], lambda v: []] if len(v) else [lambda v: [0]]
    if isinstance(v, dict):
        return [lambda v: {**v, "unexpected": 1}]
    return []


def _structured_variants(state: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    variants = []
    for path, value in _leaves(state):
        if path[:2] == ("accountant", "orders") and len(path) == 3 and path[2] % 20:
            continue  # 179 RDP orders alike: every 20th is enough
        for i, edit in enumerate(_value_edits(value)):
            variants.append((f"{'/'.join(map(str, path))} edit {i}", _edited(state, path, edit)))
        if isinstance(path[-1], str):  # a dict entry: remove it
            variants.append((f"{'/'.join(map(str, path))} removed", _edited(state, path, None)))
    history_reset = _edited(_edited(state, ("accountant", "history"), lambda h: []), ("steps",), lambda s: 0)
    variants.append(("history emptied + steps = 0", history_reset))
    consistent = _edited(history_reset, ("clipping", "history"), lambda h: h[:1])
    variants.append(("history emptied + steps = 0 + clip history cut (consistent)", consistent))
    variants.append(("budget removed", _edited(state, ("budget",), lambda b: None)))
    variants.append(("budget raised", _edited(state, ("budget",), lambda b: (b[0] * 10, b[1]))))
    variants.append(("RNG state replaced", _edited(state, ("torch_rng",), lambda t: torch.get_rng_state())))
    return variants


def _byte_variants(blob: bytes, rng: random.Random) -> list[tuple[str, bytes]]:
    variants = []
    for _ in range(160):
        i = rng.randrange(len(blob))
        variants.append((f"byte {i} replaced", blob[:i] + bytes([(blob[i] + rng.randrange(1, 256)) % 256]) + blob[i + 1:]))
    for _ in range(60):
        i, bit = rng.randrange(len(blob)), rng.randrange(8)
        variants.append((f"bit {bit} of byte {i} flipped", blob[:i] + bytes([blob[i] ^ (1 << bit)]) + blob[i + 1:]))
    for n in [0, 1, 10, len(blob) - 1, *(rng.randrange(len(blob)) for _ in range(45))]:
        variants.append((f"truncated to {n} bytes", blob[:n]))
    for _ in range(10):
        i = rng.randrange(len(blob) - 64)
        variants.append((f"64 bytes zeroed at {i}", blob[:i] + bytes(64) + blob[i + 64:]))
    variants.append(("garbage appended", blob + b"\x00garbage" * 10))
    return variants


def test_corruption_fuzz_every_variant_is_refused_cleanly_or_loads_identically(tmp_path: Path) -> None:
    adam = lambda p: torch.optim.Adam(p, lr=0.01)  # noqa: E731
    budget = dict(target_epsilon=50.0, target_delta=1e-5)
    source, m, o, l = private(optimizer=adam, **budget)
    train(m, o, l, 3)
    path = dpclip.save_checkpoint(tmp_path / "ckpt.pt", source, epoch=1)
    blob = path.read_bytes()
    original = torch.load(path, weights_only=True)
    expected = original["integrity"]["digest"]

    def fresh_target() -> PrivacyEngine:
        # other weights and seed, so "unchanged" and "loaded" differ; no step taken (an engine that has released
        # steps refuses another run's checkpoint)
        engine, m2, o2, l2 = private(seed=9, init=4, optimizer=adam, **budget)
        return engine

    target = fresh_target()
    unchanged = fingerprint(target)

    counts = {"tried": 0, "refused cleanly": 0, "loaded identical": 0}
    failures: list[str] = []

    def attempt(name: str, load: Callable[[PrivacyEngine], dict[str, Any]]) -> None:
        nonlocal target
        counts["tried"] += 1
        try:
            extra = load(target)
        except PrivacyParameterError:
            counts["refused cleanly"] += 1
            if fingerprint(target) != unchanged:
                failures.append(f"{name}: refused, but the engine changed")
            return
        except Exception as error:  # anything else is a failure of the loader
            failures.append(f"{name}: {type(error).__name__}: {error}"[:300])
            return
        if state_digest(engine_state(target, extra=extra)) == expected:
            counts["loaded identical"] += 1
        else:
            failures.append(f"{name}: loaded with a changed state")
        target = fresh_target()  # back to the target's own state (loading it would rewind the engine: refused)
        assert fingerprint(target) == unchanged

    corrupt = tmp_path / "corrupt.pt"
    for name, variant in _byte_variants(blob, random.Random(0)):
        corrupt.write_bytes(variant)
        attempt(name, lambda engine: dpclip.load_checkpoint(corrupt, engine))
    for index, (name, state) in enumerate(_structured_variants(original)):
        attempt(name, lambda engine: load_engine_state(engine, state))
        if index % 2:
            continue
        buffer = io.BytesIO()  # every 2nd edit also written to a file and read back through load_checkpoint
        try:
            torch.save(state, buffer)
        except Exception:
            continue
        corrupt.write_bytes(buffer.getvalue())
        attempt(name + " (file)", lambda engine: dpclip.load_checkpoint(corrupt, engine))

    print(f"\ncheckpoint corruption fuzz: {counts}")
    assert not failures, failures[:10]
    assert counts["tried"] >= 300 and counts["refused cleanly"] + counts["loaded identical"] == counts["tried"]
    assert counts["refused cleanly"] > 0.8 * counts["tried"]
    dpclip.load_checkpoint(path, target)  # the genuine file still loads
    assert target.steps == 3


# ------------------------------------------------------------------------------------------------------
# 2. Atomic writes: a writer killed mid-write leaves the previous checkpoint intact
# ------------------------------------------------------------------------------------------------------
BUILD = """
import torch, torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset
import dpclip

def build():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2048, 2048))  # 4.2 M parameters: a ~17 MB checkpoint
    engine = dpclip.PrivacyEngine(seed=0)
    x = torch.zeros(8, 2048)
    engine.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                        DataLoader(TensorDataset(x, torch.zeros(8, dtype=torch.long)), batch_size=4),
                        noise_multiplier=1.0, max_grad_norm=1.0)
    return engine, model
"""

WRITER = BUILD + """
import sys
engine, model = build()
path = sys.argv[1]
dpclip.save_checkpoint(path, engine, iteration=0)
print("ready", flush=True)
for i in range(1, 10**6):
    dpclip.save_checkpoint(path, engine, iteration=i)
"""


def test_a_writer_killed_mid_write_leaves_the_previous_checkpoint_loadable(tmp_path: Path) -> None:
    namespace: dict[str, Any] = {}
    exec(BUILD, namespace)
    engine, model = namespace["build"]()
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # so that loading visibly restores the weights
    path = tmp_path / "checkpoint.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    rng = random.Random(1)
    caught = attempts = 0
    while caught < 1 and attempts < 6:  # each attempt starts a Python process (a few seconds)
        attempts += 1
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, env=env, cwd=tmp_path)
        try:
            assert writer.stdout is not None and writer.stdout.readline().strip() == b"ready"
            deadline = time.monotonic() + 30
            while not list(tmp_path.glob(".checkpoint.pt.*.tmp")) and time.monotonic() < deadline:
                time.sleep(0.001)  # wait until a write is under way
            time.sleep(rng.uniform(0.0, 0.03))
        finally:
            writer.send_signal(signal.SIGKILL)
            writer.wait()
        torn = list(tmp_path.glob(".checkpoint.pt.*.tmp"))
        if torn:  # killed mid-write: the half-written temporary file is still there
            caught += 1
            assert torn[0].stat().st_size < path.stat().st_size
            for leftover in torn:
                leftover.unlink()
        extra = dpclip.load_checkpoint(path, engine)  # verifies the digest: a complete, untorn file
        assert isinstance(extra["iteration"], int)
        assert all(torch.equal(model.state_dict()[k], reference[k]) for k in reference)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
    print(f"\nwriter killed {attempts} times, {caught} of them mid-write")
    assert caught >= 1, f"no kill landed mid-write in {attempts} attempts"


# ------------------------------------------------------------------------------------------------------
# 4. No torch.load without weights_only=True in the shipped code
# ------------------------------------------------------------------------------------------------------
def _calls(source: str, name: str) -> list[str]:
    """The argument text of every ``name(`` call in ``source`` (also inside strings, e.g. notebook cells)."""
    out = []
    for match in re.finditer(re.escape(name) + r"\s*\(", source):
        depth, i = 1, match.end()
        while depth and i < len(source):
            depth += {"(": 1, ")": -1}.get(source[i], 0)
            i += 1
        out.append(source[match.end():i - 1])
    return out


def test_no_torch_load_without_weights_only() -> None:
    files = [p for folder in ("dpclip", "accountants", "scripts", "notebooks", "benchmarks") for p in (ROOT / folder).rglob("*.py")]
    files += list(ROOT.glob("*.py"))
    assert any(p.name == "finetune_text.py" for p in files)
    bad = [
        f"{p.relative_to(ROOT)}: torch.load({args})"
        for p in files
        for args in _calls(p.read_text(), "torch.load")
        if not re.search(r"weights_only\s*=\s*True", args)
    ]
    assert not bad, "torch.load must pass weights_only=True (a pickle can run code):\n" + "\n".join(bad)
