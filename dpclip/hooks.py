"""The hooks dpclip puts on a user's model while an engine trains it, as objects that refuse to be pickled."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .errors import EngineUsageError

PICKLE_MESSAGE = (
    "a model that a dpclip PrivacyEngine trains cannot be pickled whole (pickle, torch.save(model)): its layers "
    "carry the engine's hooks, bound to the engine's state and generators. Save the weights with "
    "torch.save(model.state_dict(), path) (load them into a fresh copy of the architecture), or the whole run with "
    "dpclip.save_checkpoint to resume it."
)


DEEPCOPY_MESSAGE = (
    "copy.deepcopy of the private model is not supported: the copy would carry a clone of the engine, with the same "
    "noise and sampling generators. For a copy of the weights (an EMA or teacher model, the best checkpoint so far), "
    "deep-copy the plain model, copy.deepcopy(model.module): it trains nothing privately and holds none of the "
    "engine's hooks; or copy model.state_dict()."
)


def _inert(*args: Any, **kwargs: Any) -> None:
    return None


class EngineHook:
    """A module hook of the engine: called like the function it wraps; refused by pickle with
    :data:`PICKLE_MESSAGE` (a closure failed with pickle's "Can't pickle local object"); a deep copy of the model
    gets an inert hook, so that the copy (an EMA or teacher model) never records into this engine's tape."""

    __slots__ = ("function",)

    def __init__(self, function: Callable[..., Any]) -> None:
        self.function = function

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.function(*args, **kwargs)

    def __deepcopy__(self, memo: dict) -> EngineHook:
        return EngineHook(_inert)

    def __reduce__(self) -> Any:
        if self.function is _inert:  # a copy's: pickled like any model
            return EngineHook, (_inert,)
        raise EngineUsageError(PICKLE_MESSAGE)
