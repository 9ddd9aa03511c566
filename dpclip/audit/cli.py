"""``python -m dpclip.audit``: the audit's command line (:func:`main`)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

from accountants.errors import PrivacyParameterError

from .runner import audit_config

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dpclip.audit",
        description=(
            "Empirical privacy audit of a DP-SGD configuration: runs dpclip's PrivacyEngine many times with and "
            "without a gradient canary, and turns the best membership test's error rates into a lower bound on ε "
            "that holds with the given confidence (Clopper-Pearson; Jagielski et al. 2020). A lower bound above "
            "the claimed ε means the implementation or its accounting is wrong; a low bound proves nothing. "
            "Exit status 1 on a violation."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--noise-multiplier", type=float, required=True, help="σ (L2/Gaussian) or λ (L1/Laplace), in units of C")
    parser.add_argument("--sample-rate", type=float, required=True, help="Poisson sampling rate q")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="clipping bound C (initial C for median clipping)")
    parser.add_argument("--norm", choices=["l2", "l1"], default="l2", help="l2: Gaussian noise; l1: Laplace noise")
    parser.add_argument("--clipping", choices=["fixed", "median"], default="fixed", help="fixed C or adaptive median clipping")
    parser.add_argument("--steps", type=int, default=1, help="training steps per run (the claim is for the whole run)")
    parser.add_argument("--trials", type=int, default=100_000, help="observations with the canary (and as many without)")
    parser.add_argument("--confidence", type=float, default=0.95, help="probability that the bound is valid")
    parser.add_argument("--delta", type=float, default=1e-5, help="δ of the claim and of the bound")
    parser.add_argument("--seed", type=int, default=0, help="seed of the audit (ignored by engines in --secure-mode)")
    parser.add_argument(
        "--canaries-per-run", type=int, default=None,
        help="canary slots per run: 1 = independent runs (also scores median clipping's count); even K: K/2 with, K/2 "
        "without, treated as independent (default min(2·trials, 200000))",
    )
    parser.add_argument("--canary-norm", type=float, default=1000.0, help="canary gradient norm in units of C (≫1: clipped to C)")
    parser.add_argument("--background", type=int, default=10, help="number of other examples in the data set")
    parser.add_argument("--background-norm", type=float, default=2.0, help="their gradient norm in units of C (orthogonal to canaries)")
    parser.add_argument("--count-noise-multiplier", type=float, default=None, help="σ_b of median clipping (default q·N/20)")
    parser.add_argument("--grad-sample-mode", choices=["auto", "layerwise", "vmap"], default="auto", help="per-example gradient path")
    parser.add_argument("--secure-mode", action="store_true", help="audit the engine with secure_mode=True (OS-seeded, snapped noise)")
    parser.add_argument("--device", default="cpu", help="torch device of the audited model")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dpclip.audit``: print the lower bound next to the claimed ε; exit 1 on a violation, 2 on bad
    arguments (a message, no traceback: a script can tell a typo from a detected privacy bug)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = _run(args)
    except PrivacyParameterError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.summary())
    return 1 if result.violated else 0


def _run(args: argparse.Namespace) -> Any:
    return audit_config(
        args.noise_multiplier,
        args.sample_rate,
        args.max_grad_norm,
        norm=args.norm,
        clipping=args.clipping,
        steps=args.steps,
        trials=args.trials,
        confidence=args.confidence,
        delta=args.delta,
        seed=args.seed,
        canaries_per_run=args.canaries_per_run,
        canary_norm=args.canary_norm,
        background=args.background,
        background_norm=args.background_norm,
        count_noise_multiplier=args.count_noise_multiplier,
        grad_sample_mode=args.grad_sample_mode,
        secure_mode=args.secure_mode,
        device=args.device,
    )
