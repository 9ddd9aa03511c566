"""dpclip: differentially private training (DP-SGD) for PyTorch.

The data path — per-example gradients → clip → sum → noise → optimizer step — is available as plain
functions (:mod:`dpclip.functional`) and wired for the ordinary PyTorch loop by :class:`PrivacyEngine`.
Privacy accounting lives in the torch-free sibling package :mod:`accountants`.
"""

from .allocator import retain_freed_memory
from .checkpoint import CheckpointError, atomic_save, load_checkpoint, save_checkpoint
from .clipping import FixedClipping, MedianClipping, clip, clipped_sum, per_example_norms
from .engine import PrivacyEngine, PrivacySettings
from .errors import (
    EngineUsageError,
    LossNotPerExampleError,
    ModelNotSupportedError,
    NonFiniteGradientError,
    PrivacyBudgetExceeded,
    PrivacyParameterError,
)
from .functional import private_step
from .grads import LayerRule, register_layer
from .module import PrivateModule
from .noise import NoiseSource, add_noise
from .optimizer import DPOptimizer
from .per_sample import per_sample_grads
from .sampling import PoissonDataLoader
from .frozen_norm import FrozenBatchNorm
from .validation import check_loss, fix_model, model_problems, validate_model

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "DPOptimizer",
    "EngineUsageError",
    "FixedClipping",
    "FrozenBatchNorm",
    "LayerRule",
    "LossNotPerExampleError",
    "MedianClipping",
    "ModelNotSupportedError",
    "NoiseSource",
    "NonFiniteGradientError",
    "PoissonDataLoader",
    "PrivacyBudgetExceeded",
    "PrivacyEngine",
    "PrivacyParameterError",
    "PrivacySettings",
    "PrivateModule",
    "add_noise",
    "atomic_save",
    "check_loss",
    "clip",
    "clipped_sum",
    "fix_model",
    "load_checkpoint",
    "model_problems",
    "per_example_norms",
    "per_sample_grads",
    "private_step",
    "register_layer",
    "retain_freed_memory",
    "save_checkpoint",
    "validate_model",
]
