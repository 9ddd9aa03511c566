"""Empirical privacy audit: a statistically valid *lower* bound on ε for a DP-SGD configuration.

Membership inference on gradient canaries, run through the real dpclip code path — :class:`PrivacyEngine`,
its Poisson loader, per-example gradients, clipping, noise, the division by q·N, the optimizer step and the
accountant (Jagielski, Ullman & Oprea 2020, "Auditing Differentially Private Machine Learning: How Private is
Private SGD?"; Nasr et al. 2021, "Adversary Instantiation: Lower Bounds for Differentially Private Machine
Learning").

    from dpclip.audit import audit_config
    result = audit_config(1.2, sample_rate=1.0, trials=1_000_000)   # an AuditResult
    python -m dpclip.audit --noise-multiplier 1.2 --sample-rate 1     # the same from a shell

What the number means: if ``epsilon_lower_bound`` exceeds the ε the engine's accountant claims, the
implementation or the accounting is wrong (up to the audit's 1 − confidence chance of a false alarm). A low
bound proves nothing: the audit is one adversary among many.

The package has three parts:

- :mod:`dpclip.audit.statistics` — torch-free (numpy and scipy only): Clopper–Pearson bounds, the ε lower
  bound, the choice of score and threshold on a calibration part and its held-out evaluation, :class:`AuditResult`;
- :mod:`dpclip.audit.runner` — :func:`audit_config`: the canary runs through the real engine (set-up, scores,
  independence, and how to plant a bug with ``tamper=`` are described there);
- :mod:`dpclip.audit.cli` — :func:`main`, ``python -m dpclip.audit``.
"""

from __future__ import annotations

from .cli import main
from .runner import audit_config
from .statistics import AuditResult, clopper_pearson, epsilon_lower_bound

__all__ = ["AuditResult", "audit_config", "clopper_pearson", "epsilon_lower_bound", "main"]
