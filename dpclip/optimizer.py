"""The wrapped optimizer: the user's own ``torch.optim`` optimizer, stepped with the private gradient."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .errors import EngineUsageError

# Attributes that set σ, C or q on other DP libraries' optimizers; here the engine owns them.
_ENGINE_SETTINGS = frozenset({"noise_multiplier", "max_grad_norm", "sample_rate", "expected_batch_size"})


def outside_parameters_message(who: str, outside: list[torch.Tensor], fix: str) -> str:
    """Why parameters outside the model may not be stepped by the private optimizer, and the fix."""
    shapes = ", ".join(str(tuple(p.shape)) for p in outside[:3])
    return (f"{who} {len(outside)} parameter(s) that are not the model's (shapes {shapes}), e.g. a learnable "
            "temperature in the loss: they would be stepped with their raw, non-private batch gradient. Make them "
            f"parameters of the model (then they are clipped and noised with the rest) {fix}")


_COPY_MESSAGE = (
    "the private optimizer cannot be copied or pickled: it is a view of your optimizer bound to its PrivacyEngine. "
    "Copy or save its state with optimizer.state_dict() (load it with load_state_dict), or the whole run with "
    "dpclip.save_checkpoint."
)


class DPOptimizer(torch.optim.Optimizer):
    """Shares the wrapped optimizer's parameter groups and state (so LR schedulers work) and routes
    ``step()`` through the engine: noise is added once per logical batch, then the original optimizer steps."""

    #: torch.amp.GradScaler.step(optimizer) calls step() directly on an optimizer that declares this, after setting
    #: ``grad_scale`` and ``found_inf`` on it, instead of unscaling ``.grad`` and perhaps skipping the step itself;
    #: so step() sees that a scaler drives it and refuses before anything happens (:meth:`_refuse_loss_scaling`).
    _step_supports_amp_scaling = True

    def __init__(self, optimizer: torch.optim.Optimizer, private_step: Callable[[], None], engine: Any = None) -> None:
        # No super().__init__: this object is a view of ``optimizer``, not a second optimizer.
        self.original_optimizer = optimizer
        self._private_step = private_step
        self._engine = engine  # the PrivacyEngine whose settings the read-only attributes below show
        self._optimizer_step_pre_hooks = optimizer._optimizer_step_pre_hooks
        self._optimizer_step_post_hooks = optimizer._optimizer_step_post_hooks

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _ENGINE_SETTINGS:
            raise EngineUsageError(
                f"optimizer.{name} cannot be set: σ, C and q are fixed by engine.make_private and charged by its "
                "accountant at every step; a change here would not be applied. To train with other settings, "
                "start a new PrivacyEngine."
            )
        super().__setattr__(name, value)

    def _settings(self) -> Any:
        if self._engine is None or self._engine.settings is None:
            raise AttributeError("this DPOptimizer is not attached to a PrivacyEngine")
        return self._engine.settings

    # Read-only views of what the engine runs and charges (Opacus users read these on the optimizer).
    @property
    def noise_multiplier(self) -> float:
        """σ: noise std (L2) or scale (L1) per coordinate, in units of the clipping bound C."""
        return float(self._settings().noise_multiplier)

    @property
    def max_grad_norm(self) -> float:
        """The clipping bound C now (median clipping adapts it; per-layer bounds: their combined C)."""
        self._settings()
        return float(self._engine.clipping.max_norm)

    @property
    def sample_rate(self) -> float:
        """q: the probability that each example joins a step's batch."""
        return float(self._settings().sample_rate)

    @property
    def expected_batch_size(self) -> float:
        """q·N: the noisy sum is divided by it (whatever the sampled batch's size)."""
        return float(self._settings().expected_batch_size)

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.original_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.original_optimizer.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.original_optimizer.state

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.original_optimizer.defaults

    def step(self, closure: Callable[[], Any] | None = None) -> None:  # type: ignore[override]
        """Release the private gradient of the current logical batch and step (a no-op between micro-batches)."""
        if closure is not None:
            raise EngineUsageError(
                "optimizer.step(closure) is not supported: a closure re-runs the forward pass on the same batch, "
                "which would count its examples more than once. Compute the loss, call backward(), then step()."
            )
        if "found_inf" in vars(self) or "grad_scale" in vars(self):  # set by an enabled GradScaler.step(self)
            self._refuse_loss_scaling()
        self._private_step()

    def _refuse_loss_scaling(self) -> None:
        """Refuse a step driven by an enabled ``torch.amp.GradScaler`` before anything is released, charged or
        applied, and abandon the batch's step (its clipped sum is of scaled gradients): the loader's next batch
        starts a new step. A disabled scaler calls step() plainly and is not refused."""
        vars(self).pop("grad_scale", None)  # the scaler removes them only after a step() that returns
        vars(self).pop("found_inf", None)
        abandon = getattr(self._engine, "_abandon_step", None)
        if abandon is not None:
            abandon()
        raise EngineUsageError(
            "optimizer.step() was called by torch.amp.GradScaler: loss scaling is not supported. dpclip clips each "
            "example's gradient inside backward, so it would clip the scaled gradients (to C times the scale), and the "
            "scaler skips the steps in which a gradient overflowed, a decision that depends on the examples and is "
            "not accounted. Use bf16 autocast, torch.autocast(device_type, dtype=torch.bfloat16), which needs no loss "
            "scaling (bf16 has float32's exponent range), or float32, and call loss.backward() and optimizer.step() "
            "without the scaler (README § Mixed precision). This batch's step was abandoned: nothing was released, "
            "charged or applied, and the data loader's next batch starts a new step."
        )

    def virtual_step(self) -> None:
        """Opacus 0.x's gradient accumulation: refused with what to do instead."""
        raise EngineUsageError(
            "optimizer.virtual_step() (Opacus 0.x gradient accumulation) does not exist here: pass "
            "max_physical_batch_size= to make_private, and the loader cuts each logical batch into micro-batches; call "
            "optimizer.step() after every micro-batch (a no-op until the batch's last one). README § Large batches and "
            "gradient accumulation."
        )

    def __deepcopy__(self, memo: dict) -> Any:
        raise EngineUsageError(_COPY_MESSAGE)

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise EngineUsageError(_COPY_MESSAGE)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.original_optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.original_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.original_optimizer.load_state_dict(state_dict)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group of the model's own parameters (e.g. a layer unfrozen mid-run); a parameter outside the
        model is refused before anything is added: nothing would clip or noise its gradient."""
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        module = getattr(self._engine, "_module", None)
        if module is not None:
            model_ids = {id(p) for p in module.parameters()}
            outside = [p for p in params if id(p) not in model_ids]
            if outside:
                raise EngineUsageError(outside_parameters_message("add_param_group was given", outside,
                                                                  "before make_private. Nothing was added."))
        self.original_optimizer.add_param_group({**param_group, "params": params})

    def __repr__(self) -> str:
        return f"DPOptimizer({self.original_optimizer!r})"
