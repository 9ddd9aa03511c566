"""Checkpoints of a :class:`~dpclip.PrivacyEngine`: build, verify, write atomically, load.

A checkpoint is everything needed to resume exactly (model, optimizer, accountant history, C, budget, step
counts, every RNG state) plus whatever the caller adds (``extra``: the epoch, a config, ...). It holds only types
that ``torch.load(weights_only=True)`` reads (tensors, numbers, strings, None, lists, tuples, dicts), so loading
one never runs code from the file.

Integrity: the state carries a SHA-256 digest of a canonical serialisation of all of it (every tensor's dtype,
shape and bytes; settings, history, RNG states, steps, budget, C, extra). Loading verifies the digest, and the
internal consistency of the state (steps = recorded events, each event = this engine's mechanism, tensors = the
model's signature, ...), *before anything changes*. This detects corruption (bit flips, truncation) and accidental
or naive edits; it does not stop a forger, who can recompute a plain SHA-256. With ``key=`` the digest becomes an
HMAC-SHA256: without the key nobody can produce a state that verifies.

Loading into an engine keeps that engine's constraints: its budget stands (the checkpoint's applies as well, see
:func:`load_engine_state`), a checkpoint of another mechanism, model, optimizer class or (fixed) clipping bound C
is refused.

Writing: :func:`save_checkpoint` writes to a temporary file in the target's folder, flushes and fsyncs it, renames
it over the target (``os.replace``, atomic on POSIX and Windows) and fsyncs the folder: a crash or a kill at any
moment leaves either the previous checkpoint or the new one, never a torn file.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import os
import stat
import struct
import tempfile
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn as nn

from accountants.errors import PrivacyParameterError
from accountants.checks import check_count, check_delta, check_flag, check_positive

from .noise import NoiseSource
from .sharded import ShardedContext, local, local_tree


if TYPE_CHECKING:  # engine.py imports this module lazily; no import cycle at run time
    from .engine import PrivacyEngine

Tensor = torch.Tensor
Key = bytes | str

#: ``state["format"]`` of an engine checkpoint.
FORMAT = "dpclip.PrivacyEngine"
#: Version 2: integrity digest, optimizer class, extra; version 1 (no digest) is refused.
VERSION = 2
_ALGORITHMS = ("sha256", "hmac-sha256")


class CheckpointError(PrivacyParameterError):
    """A checkpoint was refused: corrupt, truncated, edited, unsigned/wrongly signed, or incompatible with the
    engine it is loaded into. Nothing was changed; the message says why and how to fix it."""


# ------------------------------------------------------------------------------------------------------------
# Canonical serialisation and digest
# ------------------------------------------------------------------------------------------------------------
class _Sink(Protocol):
    def update(self, data: bytes | bytearray | memoryview, /) -> None: ...


class _Bytes:
    """A sink that keeps the bytes (to sort dict keys by their encoding)."""

    def __init__(self) -> None:
        self.data = bytearray()

    def update(self, data: bytes | bytearray | memoryview, /) -> None:
        self.data += data


_Q = struct.Struct("<Q").pack


def _scalar(obj: Any) -> bytes | None:
    """The encoding of None, a bool, int, float or str (exact types); None for anything else."""
    kind = type(obj)
    if obj is None:
        return b"N"
    if kind is bool:
        return b"B1" if obj else b"B0"
    if kind is float:
        text = obj.hex().encode()
        return b"F" + _Q(len(text)) + text
    if kind is int:
        text = str(obj).encode()
        return b"I" + _Q(len(text)) + text
    if kind is str:
        text = obj.encode("utf-8", "surrogatepass")
        return b"S" + _Q(len(text)) + text
    return None


class _Encoder:
    """The canonical encoding of a state, fed to a hash: type-tagged and length-prefixed, so distinct states
    never share an encoding; dict items sorted by key encoding; lists and tuples alike (a tuple may come back
    as a list); a tensor's device is left out (``map_location`` moves tensors without changing them), its dtype,
    shape and bytes are in. Small items are buffered; tensor bytes go to the hash without a copy."""

    def __init__(self, sink: _Sink) -> None:
        self.sink = sink
        self.buffer = bytearray()

    def flush(self) -> None:
        if self.buffer:
            self.sink.update(self.buffer)  # the hash copies what it needs
            self.buffer.clear()

    def encode(self, obj: Any, path: tuple[Any, ...]) -> None:
        kind, out = type(obj), self.buffer
        scalar = _scalar(obj)
        if scalar is not None:
            out += scalar
        elif kind is Tensor or kind is nn.Parameter:
            self.tensor(obj, path)
        elif kind is list or kind is tuple or kind is torch.Size:
            out += b"L" + _Q(len(obj))
            for i, item in enumerate(obj):
                scalar = _scalar(item)
                if scalar is None:
                    self.encode(item, (*path, i))
                else:
                    self.buffer += scalar
        elif kind is dict or kind is OrderedDict:
            items = []
            for k, v in obj.items():
                encoded = _scalar(k)
                if encoded is None:
                    key = _Bytes()
                    sub = _Encoder(key)
                    sub.encode(k, (*path, "<key>"))
                    sub.flush()
                    encoded = bytes(key.data)
                items.append((encoded, k, v))
            items.sort(key=lambda item: item[0])
            out += b"D" + _Q(len(items))
            for encoded, k, v in items:
                self.buffer += encoded
                self.encode(v, (*path, k))
            metadata = getattr(obj, "_metadata", None)  # a module state_dict's version info, pickled with it
            if metadata is not None:
                self.buffer += b"M"
                self.encode(metadata, (*path, "_metadata"))
        else:
            where = "state" + "".join(f"[{p!r}]" for p in path)
            raise CheckpointError(
                f"{where} is a {kind.__module__}.{kind.__qualname__}, which a checkpoint cannot hold: only tensors, "
                "int, float, bool, str, None, lists, tuples and dicts load with torch.load(weights_only=True). "
                "Convert it (e.g. str(path), float(x), tensor.tolist()) before saving"
            )
        if len(self.buffer) > 1 << 20:
            self.flush()

    def tensor(self, t: Tensor, path: tuple[Any, ...]) -> None:
        if t.layout != torch.strided or t.is_quantized or t.device.type == "meta":
            where = "state" + "".join(f"[{p!r}]" for p in path)
            raise CheckpointError(
                f"{where} is a {t.layout} / quantized / meta tensor, which a checkpoint cannot hold; convert it to "
                "a dense tensor"
            )
        dtype = str(t.dtype).encode()
        data = t.detach().resolve_conj().resolve_neg().cpu().contiguous().reshape(-1).view(torch.uint8)
        self.buffer += b"T" + _Q(len(dtype)) + dtype + _Q(t.dim()) + b"".join(_Q(s) for s in t.shape) + _Q(data.numel())
        if data.numel():
            self.flush()
            self.sink.update(memoryview(data.numpy()))


def _key_bytes(key: Key) -> bytes:
    if isinstance(key, str):
        key = key.encode("utf-8")
    if not isinstance(key, (bytes, bytearray)) or len(key) == 0:
        raise PrivacyParameterError("key must be non-empty bytes or str (the secret of the HMAC), or None")
    return bytes(key)


def state_digest(state: Mapping[str, Any], key: Key | None = None) -> str:
    """Hex SHA-256 (HMAC-SHA256 with ``key``) of the canonical serialisation of ``state`` without its
    ``"integrity"`` entry: what :func:`engine_state` stores and :func:`load_engine_state` verifies."""
    sink: Any = hashlib.sha256() if key is None else hmac.new(_key_bytes(key), digestmod=hashlib.sha256)
    sink.update(b"dpclip-checkpoint-v%d" % VERSION)
    encoder = _Encoder(sink)
    encoder.encode({k: v for k, v in state.items() if k != "integrity"}, ())
    encoder.flush()
    return sink.hexdigest()


# ------------------------------------------------------------------------------------------------------------
# Building and loading an engine's state
# ------------------------------------------------------------------------------------------------------------
def model_signature(module: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every entry of ``module.state_dict()``: what a checkpoint's model must match."""
    return [(name, tuple(local(t).shape)) for name, t in module.state_dict().items()]  # FSDP2: this rank's shard


def _optimizer_class(optimizer: torch.optim.Optimizer) -> str:
    cls = type(optimizer)
    return f"{cls.__module__}.{cls.__qualname__}"


def _group_keys(groups: Any) -> list[list[str]]:
    return [sorted(str(k) for k in group if k != "params") for group in groups]


def engine_state(engine: PrivacyEngine, *, key: Key | None = None, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The state :meth:`PrivacyEngine.state_dict` returns: take it after ``optimizer.step()``.

    Tensors are shared with the live model and optimizer (as in ``nn.Module.state_dict``): save it right away,
    or ``copy.deepcopy`` it to keep it in memory while training goes on (otherwise its digest no longer matches).
    ``extra`` (str keys; tensors, numbers, strings, None, lists, dicts) is stored and covered by the digest.
    """
    settings = engine._require_setup()
    assert engine._module is not None and engine._optimizer is not None and engine._loader is not None
    engine.guard.before_checkpoint()
    extra = dict(extra or {})
    bad = [k for k in extra if type(k) is not str]
    if bad:
        raise PrivacyParameterError(f"extra checkpoint entries need str names, got {bad[0]!r}")
    assert engine.clipping is not None
    state: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "settings": asdict(settings),
        "signature": model_signature(engine._module),
        "model": local_tree(engine._module.state_dict()),  # FSDP2 (DTensors): this rank's shards
        "optimizer_class": _optimizer_class(engine._optimizer),
        "optimizer": local_tree(engine._optimizer.state_dict()),
        "accountant": engine.accountant.state_dict(),
        "clipping": {"max_norm": engine.clipping.max_norm, "history": [float(c) for c in engine.clip_history]},
        "budget": engine.budget,
        "steps": engine.steps,
        "release_trail": list(engine.release_trail),
        "nonfinite_refusals": engine.nonfinite_refusals,
        "seeded_steps": engine.seeded_steps,
        "noise": engine.noise.state_dict(),
        # open here: handed out, not used yet (a secure-mode draw cannot be repeated: it stays consumed)
        "loader": engine._loader.state_dict(unread_step_returns=engine.guard.open and not engine.secure_mode),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "extra": extra,
    }
    if engine._sharded is not None:  # FSDP2: which shard this file holds, and that rank's noise generator
        assert isinstance(engine.distributed, ShardedContext)
        state["shard"] = {"rank": engine._sharded.rank, "world_size": engine._sharded.world_size,
                          "noise": engine.distributed.shard_noise.state_dict()}
    state["integrity"] = {
        "algorithm": "sha256" if key is None else "hmac-sha256",
        "digest": state_digest(state, key),
    }
    return state


def _combined_budget(own: tuple[float, float] | None, saved: tuple[float, float] | None) -> tuple[float, float] | None:
    """The budget that enforces both constraints: (min ε, min δ).

    ε(δ) of an accountant is non-increasing in δ, so ε(min δ) ≤ min ε implies ε(δ₁) ≤ ε₁ and ε(δ₂) ≤ ε₂. With
    equal δs this is simply the smaller ε; with different δs it is stricter than each (conservative).
    """
    if own is None or saved is None:
        return own if saved is None else saved
    return (min(own[0], saved[0]), min(own[1], saved[1]))


def _cpu_byte_state(t: Any, what: str) -> Tensor:
    if not isinstance(t, Tensor) or t.dtype != torch.uint8 or t.dim() != 1:
        raise CheckpointError(f"corrupt checkpoint: the {what} RNG state is not a 1-d uint8 tensor")
    return t.cpu()


@dataclass
class _Parsed:
    """A checkpoint's parts, parsed and validated on their own (before they are compared with the engine)."""

    accountant: Any
    saved: Any
    signature: list[tuple[str, tuple[int, ...]]]
    tensors: list[tuple[str, tuple[int, ...]]]
    optimizer_class: str
    optimizer_state: Any
    max_norm: float
    clip_history: list[float]
    budget: tuple[float, float] | None
    steps: int
    release_trail: list[float]
    nonfinite_refusals: int
    seeded_steps: int
    loader_generator: Tensor
    steps_in_epoch: int
    torch_rng: Tensor
    cuda_rng: list[Tensor] | None
    extra: Any
    algorithm: Any
    digest: Any


def load_engine_state(engine: PrivacyEngine, state: Mapping[str, Any], *, key: Key | None = None,
                      fresh_randomness: bool = False) -> dict[str, Any]:
    """Restore ``engine`` from :func:`engine_state`; returns the checkpoint's ``extra`` dict.

    The noise and Poisson-sampling generators continue from their saved states, so k steps + save + load + m steps
    release exactly what k + m steps would. Two continuations of one checkpoint therefore draw the same noise and
    batches, and releasing both (a hyper-parameter branch) cancels the noise between them: with
    ``fresh_randomness=True`` both continue from fresh OS seeds instead (not bitwise reproducible; the ε of the
    branches together is that of all their steps, composed). An engine that has already released more steps than
    the checkpoint holds is refused: the load would drop those releases from ε and replay their noise.

    Everything is parsed, checked against the engine and against its own digest first; a refusal raises
    :class:`CheckpointError` (a :class:`~dpclip.PrivacyParameterError`) and changes nothing. Refused: another
    format/version, a digest that does not verify (or a signed state loaded without ``key`` and vice versa),
    other privacy settings, another model, optimizer class or parameter-group layout, a fixed clipping bound C
    other than the engine's (with median clipping C is adaptive state and is restored), an accountant history
    that does not match the step count or this engine's mechanism.

    The budget: the engine's own budget stands, and the checkpoint's applies too: the engine keeps
    (min ε, min δ) of the two, which implies both (equal δs: the smaller ε). A checkpoint without a budget
    never removes the engine's.
    """
    engine._require_setup()
    try:
        parsed, fresh_randomness = _check_locally(engine, state, key, fresh_randomness)
    except PrivacyParameterError as refusal:
        if engine.distributed is not None:  # every rank learns of it (raises there too), none waits for the others
            engine.distributed.check_same_state(None, engine.secure_mode, refusal=refusal)
        raise
    if engine.distributed is not None:  # every rank must resume from the same state (see dpclip.distributed)
        engine.distributed.check_same_state(state, engine.secure_mode)
    _apply(engine, parsed, state)
    if fresh_randomness:
        engine.noise.reseed_from_os()
        engine._loader.generator.manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
    return dict(parsed.extra)


def _check_locally(engine: PrivacyEngine, state: Mapping[str, Any], key: Key | None,
                   fresh_randomness: Any) -> tuple[_Parsed, bool]:
    """Every check :func:`load_engine_state` makes on this rank alone: the parsed state, or a refusal."""
    fresh_randomness = check_flag("fresh_randomness", fresh_randomness)
    _check_format(state)
    parsed = _parse(engine, state)
    _check_against_engine(engine, parsed, state)
    _verify(state, parsed.algorithm, parsed.digest, key)
    if engine.steps > parsed.steps:
        raise CheckpointError(
            f"this engine has already released {engine.steps} steps and the checkpoint holds {parsed.steps}: loading "
            f"it would drop {engine.steps - parsed.steps} released steps from ε and replay their noise and batches, "
            "so the two continuations would cancel each other's noise. Keep training this engine, or resume in a new "
            "engine once nothing the later steps released is kept (load_state_dict(..., fresh_randomness=True) for "
            "a branch whose releases you keep: its ε then composes with theirs)"
        )
    own = engine.steps - engine.steps_at_load  # on this engine's line since it was made or loaded another line
    if own > 0 and int(state["noise"]["seed"]) != engine.noise.seed:
        raise CheckpointError(
            f"this engine has already released {own} steps of its own run and the checkpoint is of another "
            "run (its noise seed differs): loading it would drop those releases from ε although they were computed "
            "on the same data. Resume the checkpoint in a new PrivacyEngine (one that has not stepped yet), or keep "
            "training this one"
        )
    if own > 0 and not _continues_this_engine(engine, parsed):
        raise CheckpointError(
            f"this engine has already released {own} steps of its own line (since it was made or loaded another "
            "line), and the "
            f"checkpoint (step {parsed.steps}) does not continue its current state (step {engine.steps}): its "
            "releases up to that step differ from this engine's (or it was written by a dpclip without release "
            "fingerprints), so it may be another run or another branch of this one (another engine that resumed an "
            "earlier checkpoint with the same noise seed). Loading it would drop "
            "this engine's releases from ε, while branches of one run draw the same noise (their difference then "
            "carries none). Resume the checkpoint in a new PrivacyEngine (one that has not stepped yet), or keep "
            "training this one"
        )
    if fresh_randomness and (engine.distributed is not None or engine._sharded is not None):
        raise CheckpointError("fresh_randomness is for one process: in distributed training every rank must draw the "
                              "shared noise and batches from one seed")
    return parsed, fresh_randomness


def _continues_this_engine(engine: PrivacyEngine, parsed: _Parsed) -> bool:
    """Whether the checkpoint is of the engine's current state or of a later state of the same line: it agrees
    with the engine's running release checksum at the engine's step (the releases so far are the same, but for
    exact ties of measure zero)."""
    mine = engine.release_trail
    if not mine or len(parsed.release_trail) < len(mine):
        return False
    return parsed.release_trail[len(mine) - 1] == mine[-1]


def _release_trail(state: Mapping[str, Any], steps: int) -> list[float]:
    """The checkpoint's running release checksums, one per step; zeros for a checkpoint written before dpclip kept
    them (the line then starts there: an engine with releases of its own has nonzero checksums, so it refuses such
    a checkpoint, and branches continued from it still differ from their first own step)."""
    if "release_trail" not in state:
        return [0.0] * steps
    trail = state["release_trail"]
    if not isinstance(trail, list) or not all(isinstance(v, float) for v in trail):
        raise ValueError("release_trail must be a list of floats (one per step)")
    return list(trail)


def _check_format(state: Any) -> None:
    if not isinstance(state, Mapping) or state.get("format") != FORMAT:
        raise CheckpointError("not a dpclip PrivacyEngine checkpoint (no format entry 'dpclip.PrivacyEngine')")
    if state.get("version") != VERSION:
        version = state.get("version")
        hint = (
            " (version 1 was written by an earlier dpclip, without an integrity digest; resume that run with the "
            "dpclip that wrote it, or restart it)"
            if version == 1
            else f"; this dpclip reads version {VERSION}"
        )
        raise CheckpointError(f"unsupported checkpoint version {version!r}{hint}")


def _parse(engine: PrivacyEngine, state: Mapping[str, Any]) -> _Parsed:
    """Every part of the checkpoint parsed and validated on its own; CheckpointError for anything damaged."""
    try:
        accountant = type(engine.accountant).from_state_dict(state["accountant"])
    except PrivacyParameterError as error:  # another accountant ('rdp' vs 'pld'), or a damaged history
        raise CheckpointError(
            f"the checkpoint's accountant state is refused: {error}. Create the PrivacyEngine with the accountant= "
            "of the run you resume, from an intact checkpoint"
        ) from None
    except Exception as error:
        raise CheckpointError(f"corrupt or truncated checkpoint: accountant: {error!r}") from None
    try:
        budget = state["budget"]
        if budget is not None:
            if len(budget) != 2:
                raise ValueError(f"budget must be (epsilon, delta), got {budget!r}")
            budget = (check_positive("target_epsilon", budget[0]), check_delta(budget[1], "target_delta"))
        NoiseSource(secure_mode=engine.secure_mode).load_state_dict(state["noise"])
        loader_generator = _cpu_byte_state(state["loader"]["generator"], "sampling")
        torch.Generator().set_state(loader_generator)
        torch_rng = _cpu_byte_state(state["torch_rng"], "torch")
        torch.Generator().set_state(torch_rng)
        cuda_rng = state["cuda_rng"]
        steps = check_count("steps", state["steps"], minimum=0)
        integrity = state["integrity"]
        if set(integrity) != {"algorithm", "digest"}:
            raise ValueError(f"the integrity entry must hold exactly 'algorithm' and 'digest', got {sorted(integrity)}")
        return _Parsed(
            accountant=accountant,
            saved=type(engine.settings)(**state["settings"]),  # the engine's mechanism (a frozen dataclass)
            signature=[(str(name), tuple(int(s) for s in shape)) for name, shape in state["signature"]],
            tensors=[(name, tuple(t.shape)) for name, t in state["model"].items()],
            optimizer_class=state["optimizer_class"],
            optimizer_state=state["optimizer"],
            max_norm=check_positive("max_grad_norm", state["clipping"]["max_norm"]),
            clip_history=[check_positive("clip_history entry", c) for c in state["clipping"]["history"]],
            budget=budget,
            steps=steps,
            release_trail=_release_trail(state, steps),
            # written by dpclip since it kept the count (0 before: the earlier file's statement named its refusals)
            nonfinite_refusals=check_count("nonfinite_refusals", state.get("nonfinite_refusals", 0), minimum=0),
            # written by dpclip since it kept the count; before, every step is taken as seeded (the caveat stays)
            seeded_steps=min(check_count("seeded_steps", state.get("seeded_steps", steps), minimum=0), steps),
            loader_generator=loader_generator,
            steps_in_epoch=check_count("steps_done_in_epoch", state["loader"]["steps_done_in_epoch"], minimum=0),
            torch_rng=torch_rng,
            cuda_rng=None if cuda_rng is None else [_cpu_byte_state(t, "CUDA") for t in cuda_rng],
            extra=state["extra"],
            algorithm=integrity["algorithm"],
            digest=integrity["digest"],
        )
    except PrivacyParameterError as error:
        if isinstance(error, CheckpointError):
            raise
        raise CheckpointError(f"corrupt checkpoint: {error}") from None
    except Exception as error:
        raise CheckpointError(
            f"corrupt or truncated checkpoint: {error!r}; resume from an intact (earlier) checkpoint"
        ) from None


def _check_against_engine(engine: PrivacyEngine, parsed: _Parsed, state: Mapping[str, Any]) -> None:
    """The checkpoint must come from this model, optimizer and mechanism, and be consistent in itself."""
    assert engine._module is not None and engine._optimizer is not None and engine._loader is not None
    assert engine.clipping is not None
    if parsed.saved != engine.settings:
        raise CheckpointError(
            f"the checkpoint was made with different privacy settings:\n  saved:   {parsed.saved}\n  current: "
            f"{engine.settings}\ncall make_private with the same arguments as the run you resume"
        )
    _check_shard(engine, state)  # before the shapes: another rank's shard has other shapes
    if parsed.signature != model_signature(engine._module):
        raise CheckpointError(
            "the checkpoint belongs to a different model (parameter names or shapes differ); build the model as in "
            "the run you resume"
        )
    if parsed.tensors != parsed.signature or not all(isinstance(t, Tensor) for t in state["model"].values()):
        raise CheckpointError("corrupt checkpoint: its model tensors do not match its own signature")
    _check_optimizer(engine._optimizer, parsed)
    _check_history(engine, parsed)
    if parsed.steps_in_epoch > engine._loader.steps_per_epoch:
        raise CheckpointError(
            f"corrupt checkpoint: {parsed.steps_in_epoch} steps done in the epoch, but an epoch has "
            f"{engine._loader.steps_per_epoch}"
        )
    if not isinstance(parsed.extra, dict) or not all(type(k) is str for k in parsed.extra):
        raise CheckpointError("corrupt checkpoint: its extra entries are not a dict with str names")


def _check_shard(engine: PrivacyEngine, state: Mapping[str, Any]) -> None:
    """An FSDP2 rank resumes from its own shard's file, of a run with as many ranks; other engines from unsharded state."""
    saved = state.get("shard")
    if engine._sharded is None:
        if saved is not None:
            raise CheckpointError("this checkpoint holds one rank's shard of an FSDP2 model; load it into the same "
                                  "fully_shard model on the same rank of as many processes")
        return
    mine = (engine._sharded.rank, engine._sharded.world_size)
    if not isinstance(saved, Mapping) or (saved.get("rank"), saved.get("world_size")) != mine:
        where = "no shard" if not isinstance(saved, Mapping) else f"rank {saved.get('rank')} of {saved.get('world_size')}"
        raise CheckpointError(
            f"this rank is rank {mine[0]} of {mine[1]} of an FSDP2 model, but the checkpoint holds {where}: every rank "
            "loads the file it saved itself (e.g. checkpoint-rank{rank}.pt), with the same number of processes"
        )
    try:
        NoiseSource(secure_mode=engine.secure_mode).load_state_dict(saved["noise"])
    except Exception as error:
        raise CheckpointError(f"corrupt checkpoint: the shard's noise generator: {error!r}") from None


def _check_optimizer(optimizer: torch.optim.Optimizer, parsed: _Parsed) -> None:
    try:
        saved_groups = parsed.optimizer_state["param_groups"]
        saved_group_state = parsed.optimizer_state["state"]
        groups = [len(group["params"]) for group in saved_groups]
    except Exception as error:
        raise CheckpointError(f"corrupt or truncated checkpoint: optimizer: {error!r}") from None
    current_class = _optimizer_class(optimizer)
    if parsed.optimizer_class != current_class:
        raise CheckpointError(
            f"the checkpoint's optimizer is {parsed.optimizer_class!r} but this engine's is {current_class!r}; its "
            "state (e.g. momentum or Adam's moments) would not fit. Create the same optimizer class as in the run you "
            "resume"
        )
    if groups != [len(group["params"]) for group in optimizer.param_groups]:
        raise CheckpointError(
            "the checkpoint's optimizer has other parameter groups than this one; build the optimizer as in the "
            "run you resume"
        )
    for index, (saved_keys, current_keys) in enumerate(zip(_group_keys(saved_groups), _group_keys(optimizer.param_groups))):
        missing = sorted(set(current_keys) - set(saved_keys))  # extra saved keys (e.g. a scheduler's initial_lr) are harmless
        if missing:
            raise CheckpointError(
                f"the checkpoint's optimizer parameter group {index} lacks the hyper-parameters {missing} that this "
                f"optimizer reads (saved: {saved_keys}); it comes from another optimizer or configuration (or an "
                "older torch). Create the optimizer as in the run you resume"
            )
    _check_optimizer_state(optimizer, saved_groups, saved_group_state)


def _check_history(engine: PrivacyEngine, parsed: _Parsed) -> None:
    """Steps, accountant history and clipping history must agree with each other and with this mechanism."""
    assert engine.clipping is not None
    accountant, steps, max_norm, clip_history = parsed.accountant, parsed.steps, parsed.max_norm, parsed.clip_history
    if accountant.steps != steps:
        raise CheckpointError(
            f"corrupt checkpoint: the accountant history does not match the step count ({accountant.steps} recorded "
            f"events, steps = {steps})"
        )
    if len(parsed.release_trail) != steps:
        raise CheckpointError(
            f"corrupt checkpoint: the release trail does not match the step count ({len(parsed.release_trail)} "
            f"entries, steps = {steps})"
        )
    foreign = [str(entry.event) for entry in accountant.history if entry.event != engine._step_event]
    if foreign:
        raise CheckpointError(
            f"corrupt checkpoint: its accountant history records {foreign[0]}, but every step of this engine is "
            f"{engine._step_event}; the history was edited or comes from another run"
        )
    median = engine.clipping.adaptive
    if not median and max_norm != engine._bound:
        raise CheckpointError(
            f"the checkpoint was made with max_grad_norm={max_norm!r} but this engine clips to {engine._bound!r}: "
            "with fixed clipping C is part of the mechanism. Call make_private with the max_grad_norm of the run "
            "you resume"
        )
    if len(clip_history) != steps + 1 or clip_history[-1] != max_norm or (not median and set(clip_history) != {max_norm}):
        raise CheckpointError(
            f"corrupt checkpoint: the clipping history ({len(clip_history)} entries) does not match the step count "
            f"({steps}) and the bound C = {max_norm!r}"
        )


def _apply(engine: PrivacyEngine, parsed: _Parsed, state: Mapping[str, Any]) -> None:
    """Change the engine, model, optimizer, RNGs and loader to the (fully checked) checkpoint."""
    assert engine._module is not None and engine._optimizer is not None and engine._loader is not None
    assert engine.clipping is not None
    released_own = engine.steps > engine.steps_at_load
    # the optimizer would keep the checkpoint's own tensors (torch copies only the outer dict) and training would
    # then change the caller's checkpoint: it gets a copy
    parsed.optimizer_state = copy.deepcopy(parsed.optimizer_state)
    if engine._sharded is None:
        engine._module.load_state_dict(state["model"])
        engine._optimizer.load_state_dict(parsed.optimizer_state)
    else:
        _apply_shard(engine, parsed, state)
    engine.accountant = parsed.accountant
    engine.clipping.max_norm = engine._bound = parsed.max_norm
    engine.clipping.restore(parsed.max_norm, parsed.clip_history)
    engine.budget = _combined_budget(engine.budget, parsed.budget)
    engine.steps = parsed.steps
    engine.release_trail = list(parsed.release_trail)
    # refusals told something of this data set without noise; a load does not undo that (the checkpoint's line
    # may include this engine's own): the larger count stays, so the report keeps saying ε does not cover them
    engine.nonfinite_refusals = max(engine.nonfinite_refusals, parsed.nonfinite_refusals)
    # steps drawn from seeded generators stay so in a secure-mode engine that continues them
    engine.seeded_steps = max(engine.seeded_steps, parsed.seeded_steps)
    engine.noise.load_state_dict(state["noise"])
    engine._loader.load_state_dict({"generator": parsed.loader_generator, "steps_done_in_epoch": parsed.steps_in_epoch})
    torch.set_rng_state(parsed.torch_rng)
    if parsed.cuda_rng is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(parsed.cuda_rng)
    if not released_own:  # an engine with releases of its own loaded its own line (checked): they stay its own
        engine.steps_at_load = engine.steps
    engine._abandon_step()


def _apply_shard(engine: PrivacyEngine, parsed: _Parsed, state: Mapping[str, Any]) -> None:
    """FSDP2: this rank's saved rows into its shards (resharded first), its optimizer state as DTensors placed
    like the parameters, its noise generator."""
    sharded, module, optimizer = engine._sharded, engine._module, engine._optimizer
    assert sharded is not None and module is not None and optimizer is not None
    assert isinstance(engine.distributed, ShardedContext)
    sharded.reshard()
    with torch.no_grad():
        for name, t in module.state_dict().items():
            local(t).copy_(state["model"][name])
    params = [p for group in optimizer.param_groups for p in group["params"]]
    ids = [i for group in parsed.optimizer_state["param_groups"] for i in group["params"]]
    by_id = dict(zip(ids, params))
    placed = {index: {key: sharded.distributed_like(value, by_id[index])
                      if isinstance(value, Tensor) and value.dim() > 0 else value for key, value in entry.items()}
              for index, entry in parsed.optimizer_state["state"].items()}
    optimizer.load_state_dict({**parsed.optimizer_state, "state": placed})
    engine.distributed.shard_noise.load_state_dict(state["shard"]["noise"])


def _check_optimizer_state(optimizer: torch.optim.Optimizer, saved_groups: Any, saved_state: Any) -> None:
    """Each saved per-parameter state tensor (momentum, moments) must have its parameter's shape."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    ids = [i for group in saved_groups for i in group["params"]]
    if len(ids) != len(params) or len(set(ids)) != len(ids) or not isinstance(saved_state, Mapping):
        raise CheckpointError("corrupt checkpoint: the optimizer's parameter indices do not match its parameter groups")
    by_id = dict(zip(ids, params))
    for index, entry in saved_state.items():
        if index not in by_id or not isinstance(entry, Mapping):
            raise CheckpointError(f"corrupt checkpoint: optimizer state for an unknown parameter {index!r}")
        for name, value in entry.items():
            if isinstance(value, Tensor) and value.dim() > 0 and value.shape != local(by_id[index]).shape:
                raise CheckpointError(
                    f"corrupt checkpoint: optimizer state {name!r} of parameter {index} has shape "
                    f"{tuple(value.shape)}, the parameter {tuple(local(by_id[index]).shape)}"
                )


def _verify(state: Mapping[str, Any], algorithm: Any, digest: Any, key: Key | None) -> None:
    if algorithm not in _ALGORITHMS or not isinstance(digest, str):
        raise CheckpointError(f"corrupt checkpoint: unknown integrity algorithm {algorithm!r}")
    if algorithm == "hmac-sha256" and key is None:
        raise CheckpointError("this checkpoint is signed (HMAC-SHA256): pass the key it was saved with (key=...)")
    if algorithm == "sha256" and key is not None:
        raise CheckpointError(
            "a key was given but this checkpoint is not signed (plain SHA-256 digest): anyone could have written "
            "it. Load it without key= only if you trust where it comes from"
        )
    expected = state_digest(state, key)
    if not hmac.compare_digest(expected, digest):
        what = "its HMAC does not verify with this key (wrong key, or" if key is not None else "its SHA-256 digest does not match (the"
        raise CheckpointError(
            f"corrupt checkpoint: {what} file is damaged or was edited; nothing was changed. Resume from an intact "
            "(earlier) checkpoint. (A state_dict() kept in memory while training goes on also changes: state_dict() "
            "shares tensors with the model, so copy.deepcopy it or save it right away.)"
        )


# ------------------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------------------
def _default_mode() -> int:
    """0o666 minus the process umask (what ``open(path, "w")`` would give)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def _fsync_directory(directory: Path) -> None:
    """Make the rename durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save(obj, path)``, atomically: written to a temporary file in the same folder, flushed and
    fsynced, renamed over ``path`` with ``os.replace``, then the folder is fsynced. Killed at any moment, ``path``
    holds either its previous content or the new one (a stray ``.<name>.*.tmp`` file may remain). Keeps the
    permissions of the file it replaces. Creates the folder (and its parents) if missing. Returns ``path``."""
    path = Path(path)
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    mode = stat.S_IMODE(path.stat().st_mode) if path.exists() else _default_mode()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_directory(directory)
    return path


def save_checkpoint(path: str | os.PathLike[str], engine: PrivacyEngine, *, key: Key | None = None, **extra: Any) -> Path:
    """Write ``engine``'s checkpoint (and ``extra``, e.g. ``epoch=3``) to ``path`` atomically; returns ``path``.

    Call it between steps (after ``optimizer.step()``). A missing folder is created. ``extra`` values must be
    tensors, numbers, strings, None, lists, tuples or dicts (what ``torch.load(weights_only=True)`` reads); :func:`load_checkpoint` returns them.
    ``key`` (bytes or str) signs the checkpoint with HMAC-SHA256 instead of a plain SHA-256 digest: then only
    someone holding the key can write a checkpoint that loads. A crash or kill during the write leaves the
    previous file intact (see :func:`atomic_save`).
    """
    return atomic_save(engine_state(engine, key=key, extra=extra), path)


def load_checkpoint(path: str | os.PathLike[str], engine: PrivacyEngine, *, key: Key | None = None,
                    fresh_randomness: bool = False) -> dict[str, Any]:
    """Resume ``engine`` from a file written by :func:`save_checkpoint` (or ``torch.save(engine.state_dict())``);
    returns the ``extra`` entries saved with it.

    The file is read with ``torch.load(weights_only=True, map_location="cpu")`` (no code from the file runs; the
    model and optimizer put the tensors back on their own devices), then checked as by
    :func:`load_engine_state`. An unreadable, corrupt, edited or incompatible file raises
    :class:`CheckpointError` and changes nothing. A missing file raises ``FileNotFoundError``.
    """
    engine._require_setup()
    path = Path(path)
    with open(path, "rb") as f:
        try:
            state = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise CheckpointError(
                f"cannot read the checkpoint {path}: {first[:300]} (the file is damaged, truncated or not a dpclip "
                "checkpoint). Nothing was changed; resume from an intact (earlier) checkpoint"
            ) from None
    return load_engine_state(engine, state, key=key, fresh_randomness=fresh_randomness)


__all__ = [
    "FORMAT",
    "VERSION",
    "CheckpointError",
    "atomic_save",
    "engine_state",
    "load_checkpoint",
    "load_engine_state",
    "model_signature",
    "save_checkpoint",
    "state_digest",
]


class Checkpointing:
    """The engine's checkpoint methods (``torch.save``-able state dicts with an integrity digest)."""

    def state_dict(self: Any, *, key: bytes | str | None = None) -> dict[str, Any]:
        """Everything needed to resume exactly, with an integrity digest (:func:`engine_state`)."""
        return engine_state(self, key=key)

    def load_state_dict(self: Any, state: Mapping[str, Any], *, key: bytes | str | None = None,
                        fresh_randomness: bool = False) -> None:
        """Resume from :meth:`state_dict`, or refuse, changing nothing (:func:`load_engine_state`)."""
        load_engine_state(self, state, key=key, fresh_randomness=fresh_randomness)
