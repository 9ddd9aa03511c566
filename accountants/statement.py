"""The plain-language privacy statement shared by the budget CLI, the training scripts and the engine."""

from __future__ import annotations

import math

from .errors import PrivacyParameterError

_MECHANISM_NAMES = {
    "gaussian": "Gaussian noise (std = noise multiplier × L2 clipping bound)",
    "laplace": "Laplace noise (scale = noise multiplier × L1 clipping bound)",
}


def format_epsilon(epsilon: float, digits: int = 4) -> str:
    """ε to ``digits`` significant digits, rounded *up* so that the printed value is never optimistic."""
    if epsilon == 0 or not math.isfinite(epsilon):
        return f"{epsilon:g}"
    scale = 10.0 ** (digits - 1 - math.floor(math.log10(abs(epsilon))))
    return f"{math.ceil(epsilon * scale - 1e-9) / scale:.{digits}g}"


def format_delta(delta: float, digits: int = 3) -> str:
    """δ to ``digits`` significant digits, rounded *up* where they do not hold it exactly (ε holds at the δ it
    was computed for and at every larger one, so a δ rounded down would claim a pair the accountant did not
    certify)."""
    text = f"{delta:.{digits}g}"
    return text if float(text) >= delta else format_epsilon(delta, digits)


def accountant_label(name: str, error: float | None = None) -> str:
    """How a statement names the accountant: "RDP", or "PLD (...; numerical error ≤ e)" with its error bound."""
    if name.lower() == "pld":
        bound = "" if error is None or math.isinf(error) else f"; numerical error ≤ {error:.2g}"
        return f"PLD (privacy loss distributions{bound})"
    return name.upper()


def privacy_statement(
    epsilon: float,
    delta: float,
    *,
    steps: int,
    sample_rate: float,
    noise_multiplier: float | None = None,
    mechanism: str = "gaussian",
    order: float | None = None,
    accountant: str = "RDP",
    unit: str = "training example",
    extra: str | None = None,
) -> str:
    """A short statement of what (ε, δ) protects, what it assumes, and that it is an upper bound."""
    if not (isinstance(epsilon, (int, float)) and epsilon >= 0):  # (NaN fails this too)
        raise PrivacyParameterError(f"epsilon must be a number >= 0 (or inf), got {epsilon!r}")
    if not (isinstance(delta, (int, float)) and 0 <= delta < 1):
        raise PrivacyParameterError(f"delta must be a number in [0, 1), got {delta!r}")
    noise = _MECHANISM_NAMES.get(mechanism, mechanism)
    sigma = "" if noise_multiplier is None else f", noise multiplier {noise_multiplier:.6g}"
    where = ""
    if order is not None:
        where = " (pure-DP composition)" if math.isinf(order) else f" (best Rényi order α = {order:g})"
    if math.isinf(epsilon):
        why = "the updates were released without noise (noise multiplier 0)" if noise_multiplier == 0 else \
            "no finite ε bounds this history"
        headline = f"NO privacy guarantee: ε = ∞ at δ = {format_delta(delta)}, because {why}."
    else:
        headline = f"Privacy guarantee: (ε = {format_epsilon(epsilon)}, δ = {format_delta(delta)})-differential privacy for each {unit}."
    lines = [
        headline,
        f"Mechanism: {steps:,} steps of {noise}{sigma}, each on a Poisson sample of the data "
        f"(every {unit} included independently with probability q = {sample_rate:.4g}).",
    ]
    if extra:
        lines.append(extra)
    lines += [
        f"Adjacency: adding or removing one {unit}. Accountant: {accountant}{where}.",
        "This ε is an upper bound on the privacy loss of the mechanism as described; it holds only if batches "
        "really are Poisson-sampled, every release is noised as stated, and the data are not reused elsewhere.",
    ]
    return "\n".join(lines)
