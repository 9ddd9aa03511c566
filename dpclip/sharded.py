"""FSDP2 (``torch.distributed.fsdp.fully_shard``): DP-SGD for a model whose parameters are sharded across ranks.

One private step, as :class:`ShardedContext` runs it with the engine:

1. **Gather.** Before the training forward, every FSDP module all-gathers its parameters
   (``FSDPModule.unshard``) and keeps them gathered until the optimizer step (dpclip turns FSDP2's
   ``reshard_after_forward`` and ``reshard_after_backward`` off while it trains the model). Each rank runs its
   own examples through the whole model.
2. **Per-example norms and clipped sums** on each rank, by the layerwise tape from every layer's inputs and
   output gradients: no per-example weight gradient is formed, and autograd computes activation gradients only,
   so FSDP2's own reduce-scatter of ``.grad`` has nothing to reduce.
3. **Reduce-scatter.** Σ over ranks of the clipped sums; each rank receives the rows it owns (FSDP2's
   ``Shard(0)``: ``torch.chunk`` along dim 0, ⌈rows / world⌉ per rank).
4. **Noise once per coordinate.** Each rank adds N(0, σ²C²) (Laplace for L1) to its own rows only, drawn from a
   generator seeded by (the ranks' shared seed, its rank); in secure mode each rank's OS CSPRNG. The global
   release is Σ_i clip(g_i) + one independent draw per coordinate: the Gaussian mechanism the accountant
   charges. (One shared stream for all shards would be wrong: two shards of equal size would get the same noise,
   and their difference would be released without any.)
5. **Step.** The parameters are resharded, each sharded parameter's ``.grad`` is its rows of the noisy release
   (a DTensor with the parameter's placement), and the user's optimizer steps the shards.

Sampling, the lock-step header, median clipping's count (one shared draw) and non-finite handling are those of
:class:`~dpclip.distributed.DistributedContext`. Refused, each with the reason: FSDP1, DTensor parameters outside
``fully_shard`` (tensor parallelism), meshes other than one dimension over the whole world (HSDP), placements other
than ``Shard(0)``, a model whose root is not ``fully_shard``-ed (its own parameters would be replicated), FSDP2
mixed-precision policies (use ``torch.autocast``) and CPU offloading.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn as nn

from .distributed import DistributedContext
from .errors import ModelNotSupportedError
from .noise import NoiseSource

Tensor = torch.Tensor


def fsdp2_modules(module: nn.Module) -> list[nn.Module]:
    """The submodules of ``module`` (itself included) that ``fully_shard`` wrapped, in ``modules()`` order."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch built without distributed
        return []
    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def is_fsdp2(module: nn.Module) -> bool:
    """Whether ``fully_shard`` wrapped ``module`` itself (the root of an FSDP2 model, as dpclip requires)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return False
    return isinstance(module, FSDPModule)


def _is_dtensor(t: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return False
    return isinstance(t, DTensor)


def local(t: Any) -> Any:
    """A DTensor's local shard (a plain tensor sharing its storage); anything else unchanged."""
    return t.to_local() if _is_dtensor(t) else t


def local_tree(value: Any) -> Any:
    """``value`` (dicts, lists, tuples) with every DTensor replaced by its local shard: a rank's part of a state."""
    if _is_dtensor(value):
        return value.to_local()
    if isinstance(value, Mapping):
        return {k: local_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(local_tree(v) for v in value)
    return value


def _fsdp_state_reason(module: nn.Module, name: str) -> str | None:
    """Why an FSDP2 module's settings cannot be trained privately (mixed precision, offloading), or None."""
    try:
        groups = module._get_fsdp_state()._fsdp_param_groups  # type: ignore[operator]
    except Exception:  # pragma: no cover - internals of another torch version
        return None
    for group in groups:
        policy = getattr(group, "mp_policy", None)
        if policy is not None and (policy.param_dtype is not None or policy.reduce_dtype is not None):
            return (f"{name or 'the model'} has an FSDP2 MixedPrecisionPolicy (param_dtype/reduce_dtype): dpclip forms norms "
                    "and sums itself; drop mp_policy and train under torch.autocast(..., dtype=torch.bfloat16) instead")
        if any(getattr(p, "offload_to_cpu", False) for p in group.fsdp_params):
            return f"{name or 'the model'} offloads parameters to the CPU (CPUOffloadPolicy), which dpclip does not support"
    return None


def sharding_refusal(module: nn.Module, world_size: int) -> str | None:
    """Why ``module``'s sharding cannot be trained privately, or None (no sharding, or FSDP2 that dpclip runs)."""
    if not torch.distributed.is_available():
        return None
    from torch.distributed.fsdp import FullyShardedDataParallel

    if isinstance(module, FullyShardedDataParallel):
        return ("the model is wrapped by FSDP1 (FullyShardedDataParallel): shard it with FSDP2 instead, "
                "torch.distributed.fsdp.fully_shard, which dpclip trains privately")
    for name, sub in module.named_modules():
        if isinstance(sub, FullyShardedDataParallel):
            return (f"{'submodule ' + name if name else 'the model'} is wrapped by FSDP1 (FullyShardedDataParallel): "
                    "shard it with FSDP2 instead, torch.distributed.fsdp.fully_shard, which dpclip trains privately")
    wrapped = fsdp2_modules(module)
    dtensors = {name: p for name, p in module.named_parameters() if _is_dtensor(p)}
    if not wrapped:
        if dtensors:
            return (f"parameter {next(iter(dtensors))} is a DTensor outside fully_shard (tensor parallelism?), which "
                    "dpclip does not support: shard with fully_shard alone, or pass plain parameters")
        return None
    if wrapped[0] is not module:
        return ("fully_shard was applied to submodules but not to the model itself, so its remaining parameters are "
                "plain replicated tensors: call fully_shard(model) on the root too (after its submodules)")
    from torch.distributed.tensor import Shard

    for name, p in module.named_parameters():
        if not _is_dtensor(p):
            return f"parameter {name} is not sharded by fully_shard; call fully_shard on the module that holds it"
        if p.device_mesh.ndim != 1 or p.device_mesh.size() != world_size:
            return (f"parameter {name} is sharded over a device mesh of shape {tuple(p.device_mesh.shape)}; dpclip supports "
                    f"one mesh dimension over all {world_size} ranks (no HSDP)")
        if tuple(p.placements) != (Shard(0),):
            return f"parameter {name} has placements {tuple(p.placements)}; dpclip supports fully_shard's Shard(0)"
        if p.dim() == 0:
            return f"parameter {name} is a scalar, which fully_shard cannot shard by rows; make it a 1-element vector"
    for name, sub in module.named_modules():
        if sub in wrapped and (reason := _fsdp_state_reason(sub, name)):
            return reason
    return None


def rows_of(rows: int, rank: int, world_size: int) -> slice:
    """The rows of a dim-0 size ``rows`` that ``rank`` holds under ``Shard(0)``: torch.chunk's ⌈rows / world⌉ each."""
    chunk = -(-rows // world_size)
    start = min(rank * chunk, rows)
    return slice(start, min(start + chunk, rows))


def shard_seed(seed: int, rank: int) -> int:
    """The seed of ``rank``'s noise generator: SHA-256 of (shared seed, rank), 63 bits. Ranks' streams differ."""
    digest = hashlib.sha256(f"dpclip-shard-noise:{seed}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class ShardedModel:
    """The FSDP2 modules of a model, its sharded parameters (what the optimizer holds) and the gathering around a
    private step."""

    def __init__(self, module: nn.Module, rank: int, world_size: int) -> None:
        self.module, self.rank, self.world_size = module, rank, world_size
        self.fsdp_modules = fsdp2_modules(module)
        self.reshard()  # e.g. the root stays gathered after a forward run before make_private
        self.sharded: dict[str, Tensor] = dict(module.named_parameters())  # the DTensor shards the optimizer holds
        for name, p in self.sharded.items():
            expected = rows_of(p.shape[0], rank, world_size)
            if local(p).shape[0] != expected.stop - expected.start:
                raise ModelNotSupportedError(
                    f"parameter {name}: rank {rank} holds {local(p).shape[0]} of its {p.shape[0]} rows, not the "
                    f"{expected.stop - expected.start} of fully_shard's even split; dpclip supports the default sharding"
                )

    def take_over(self) -> None:
        """Keep parameters gathered from the training forward to the step, and never reduce-scatter ``.grad``."""
        for sub in self.fsdp_modules:
            sub.set_reshard_after_forward(False, recurse=False)  # type: ignore[operator]
            sub.set_reshard_after_backward(False, recurse=False)  # type: ignore[operator]
            sub.set_requires_gradient_sync(False, recurse=False)  # type: ignore[operator]

    def gather(self) -> None:
        """All-gather every FSDP module's parameters (a no-op for those gathered already)."""
        for sub in self.fsdp_modules:
            sub.unshard()  # type: ignore[operator]

    def reshard(self) -> None:
        """Free the gathered parameters; the module holds its DTensor shards again."""
        for sub in self.fsdp_modules:
            sub.reshard()  # type: ignore[operator]

    def rows(self, name: str) -> slice:
        """The rows of parameter ``name`` that this rank holds."""
        return rows_of(self.sharded[name].shape[0], self.rank, self.world_size)

    def as_gradient(self, name: str, rows: Tensor) -> Tensor:
        """This rank's rows of a release as the ``.grad`` of the sharded parameter ``name`` (same placement)."""
        return self.distributed_like(rows, self.sharded[name])

    def copy_gathered_into_shards(self) -> None:
        """Write each gathered parameter's rows into this rank's shard (after the gathered copies were changed)."""
        gathered = dict(self.module.named_parameters())
        with torch.no_grad():
            for name, p in self.sharded.items():
                local(p).copy_(gathered[name][self.rows(name)])

    def distributed_like(self, saved: Tensor, like: Tensor) -> Tensor:
        """A saved local shard as a DTensor placed like the parameter (or state) ``like``; plain tensors pass."""
        if not _is_dtensor(like):
            return saved
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(saved.to(like.device, like.dtype), like.device_mesh, like.placements,
                                  run_check=False, shape=like.shape, stride=like.stride())


class ShardedContext(DistributedContext):
    """The collectives of a private step for an FSDP2 model: reduce-scatter of the clipped sums to the shards,
    noise per shard from each rank's own generator, gradients onto the DTensor shards."""

    sharded_model: ShardedModel
    shard_noise: NoiseSource

    def attach(self, module: nn.Module) -> ShardedModel:
        self.sharded_model = ShardedModel(module, self.rank, self.world_size)
        return self.sharded_model

    def synchronize_setup(self, wrapper: nn.Module, module: nn.Module, loader: Any, fingerprint: Mapping[str, Any],
                          noise_seed: int, steps_released: Callable[[], int], checked: bool = False) -> int | None:
        """As :meth:`DistributedContext.synchronize_setup` (rank 0's model on every rank: gathered, broadcast,
        written back into each rank's shards), then each rank's own noise generator for its rows."""
        model = self.sharded_model
        self._steps_released, self._loader = steps_released, loader
        if not checked:
            self.check_same_setup(module, loader, fingerprint)  # before FSDP2's settings or the parameters change
        model.take_over()
        model.gather()
        shared = super().synchronize_setup(wrapper, module, loader, fingerprint, noise_seed, steps_released, checked=True)
        model.copy_gathered_into_shards()
        model.reshard()
        self.shard_noise = (NoiseSource(secure_mode=True) if shared is None
                            else NoiseSource(seed=shard_seed(shared, self.rank)))
        return shared

    def _reduce_sums(self, summed: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Σ over ranks of the clipped sums, each rank keeping its own rows (one reduce-scatter per dtype and
        device, after the step's header, as in DDP mode)."""
        out: dict[str, Tensor] = {}
        for names in self._groups(summed):
            out.update(self._reduce_scatter_rows({name: summed[name] for name in names}))
        return {name: out[name] for name in summed}

    def _reduce_scatter_rows(self, summed: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """One flat buffer laid out rank by rank (each rank's rows of every tensor, padded to ⌈rows / world⌉),
        reduce-scattered; returns this rank's rows of each sum."""
        world, names = self.world_size, list(summed)
        per_rank = []  # per tensor: padded rows per rank × row size
        for name in names:
            t = summed[name]
            chunk = -(-t.shape[0] // world)
            per_rank.append(chunk * (t.numel() // max(t.shape[0], 1)))
        segment = sum(per_rank)
        first = summed[names[0]]
        flat = torch.zeros(world * segment, dtype=first.dtype, device=first.device)
        offset = 0
        for name, size in zip(names, per_rank):
            t = summed[name].reshape(summed[name].shape[0], -1)
            for rank in range(world):
                rows = t[rows_of(t.shape[0], rank, world)].reshape(-1)
                start = rank * segment + offset
                flat[start : start + rows.numel()] = rows
            offset += size
        mine = self._reduce_scatter(flat, segment)
        result, offset = {}, 0
        for name, size in zip(names, per_rank):
            t = summed[name]
            rows = rows_of(t.shape[0], self.rank, world)
            count = (rows.stop - rows.start) * (t.numel() // max(t.shape[0], 1))
            result[name] = mine[offset : offset + count].view(rows.stop - rows.start, *t.shape[1:])
            offset += size
        return result

    def _reduce_scatter(self, flat: Tensor, segment: int) -> Tensor:
        """This rank's ``segment``-long part of the sum over ranks of ``flat``."""
        out = torch.empty(segment, dtype=flat.dtype, device=flat.device)
        torch.distributed.reduce_scatter_tensor(out, flat)
        return out

    def check_same_state(self, state: Mapping[str, Any] | None, secure_mode: bool, what: str = "load_state_dict",
                         refusal: Exception | None = None) -> None:
        """As in DDP mode, for what the ranks share; the model, the optimizer state and the noise generator are
        each rank's own shard."""
        shared = None if state is None else {key: value for key, value in state.items() if key not in ("model", "optimizer", "shard")}
        super().check_same_state(shared, secure_mode, what, refusal)

    def release_sums(self, add: Callable[[NoiseSource], dict[str, Tensor]], like: Mapping[str, Tensor],
                     noise: NoiseSource) -> dict[str, Tensor]:
        """Each rank adds the noise of its own rows, from its own generator: no broadcast."""
        return add(self.shard_noise)

    def assign_gradients(self, params: Mapping[str, Tensor], noisy: Mapping[str, Tensor]) -> None:
        """Reshard, then give every sharded parameter its rows of the release as ``.grad``."""
        model = self.sharded_model
        model.reshard()
        for name in params:
            model.sharded[name].grad = model.as_gradient(name, noisy[name])
