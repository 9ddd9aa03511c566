"""``dpclip-budget``: the privacy budget calculator (also ``python -m accountants``).

    dpclip-budget epsilon --dataset-size 60000 --batch-size 256 --noise-multiplier 1.1 --epochs 10 --delta 1e-5
    dpclip-budget noise   --sample-rate 0.01 --target-epsilon 3 --steps 10000 --delta 1e-5
    dpclip-budget steps   --sample-rate 0.01 --target-epsilon 3 --noise-multiplier 1.0 --delta 1e-5 --json
    dpclip-budget epsilon ... --accountant rdp      # the RDP bound instead of the (default) PLD one

Bad input prints a message on stderr and exits with status 2 (no traceback); every input is answered
(status 0) or refused (status 2) within seconds. Limits are stated in ``--help`` (see LIMITS).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from .checks import (
    MAX_STEPS,
    NOISE_MULTIPLIER_RANGE,
    check_count,
    check_delta,
    check_noise_multiplier,
    check_positive,
    check_sample_rate,
    warn_if_delta_too_large,
)
from .errors import PrivacyParameterError, PrivacyWarning
from .calibration import SIGMA_FLOOR, epochs_to_steps, noise_multiplier_for, step_event, steps_for
from .factory import make_accountant
from .statement import accountant_label, format_delta, format_epsilon, privacy_statement

ACCOUNTANT_HELP = (
    "pld (default): privacy loss distributions, near-exact and never optimistic - the smallest epsilon a "
    "rigorous accountant can certify, typically 8-16%% below RDP for DP-SGD; a query takes ~0.1 s. "
    "rdp: Renyi DP, ~1 ms per query but looser. Plan with the accountant your training run will report "
    "(dpclip's PrivacyEngine also uses pld unless told otherwise), or its budget guard may stop training earlier "
    "than planned."
)


LIMITS = (
    f"limits: at most {MAX_STEPS:,} steps (given by --steps, or --epochs x ceil(1/q)); noise multiplier in "
    f"[{NOISE_MULTIPLIER_RANGE[0]:g}, {NOISE_MULTIPLIER_RANGE[1]:g}]; q = --sample-rate or "
    "--batch-size/--dataset-size in (0, 1]; --delta in (0, 1); --target-epsilon and --epochs finite and > 0. "
    "Anything else is refused with a message (exit status 2)."
)


def _add_common(parser: argparse.ArgumentParser, *, steps: bool) -> None:
    sampling = parser.add_argument_group("sampling (give --sample-rate, or --dataset-size with --batch-size)")
    sampling.add_argument("--sample-rate", type=float, metavar="Q", help="Poisson sampling rate q in (0, 1]")
    sampling.add_argument("--dataset-size", type=int, metavar="N", help="number of training examples")
    sampling.add_argument("--batch-size", type=int, metavar="B", help="expected batch size; q = B / N")
    if steps:
        length = parser.add_mutually_exclusive_group(required=True)
        length.add_argument("--steps", type=int, metavar="T", help=f"number of training steps (at most {MAX_STEPS:,})")
        length.add_argument("--epochs", type=float, metavar="E", help="number of epochs; steps = ceil(E * ceil(1/q))")
    parser.add_argument("--delta", type=float, required=True, metavar="D", help="target delta in (0, 1)")
    parser.add_argument(
        "--mechanism",
        choices=["gaussian", "laplace"],
        default="gaussian",
        help="gaussian: L2 clipping + Gaussian noise (default); laplace: L1 clipping + Laplace noise",
    )
    parser.add_argument("--accountant", choices=["pld", "rdp"], default="pld", help=ACCOUNTANT_HELP)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dpclip-budget",
        description="Privacy budget calculator for DP-SGD with Poisson sampling (PLD or RDP accountant).",
        epilog=LIMITS,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{epsilon,noise,steps}")

    eps = commands.add_parser("epsilon", help="epsilon spent by a training plan", epilog=LIMITS)
    eps.add_argument("--noise-multiplier", type=float, required=True, metavar="S", help="noise multiplier sigma")
    _add_common(eps, steps=True)

    noise = commands.add_parser("noise", help="smallest noise multiplier that meets a target epsilon", epilog=LIMITS)
    noise.add_argument("--target-epsilon", type=float, required=True, metavar="EPS", help="privacy budget")
    _add_common(noise, steps=True)

    steps = commands.add_parser(
        "steps", help=f"largest number of steps (up to {MAX_STEPS:,}) that fits a target epsilon", epilog=LIMITS
    )
    steps.add_argument("--target-epsilon", type=float, required=True, metavar="EPS", help="privacy budget")
    steps.add_argument("--noise-multiplier", type=float, required=True, metavar="S", help="noise multiplier sigma")
    _add_common(steps, steps=False)
    return parser


def _sample_rate(args: argparse.Namespace) -> float:
    if args.sample_rate is not None:
        if args.batch_size is not None:
            raise PrivacyParameterError(
                "contradictory flags: give either --sample-rate or --dataset-size with --batch-size, not both"
            )
        return check_sample_rate(args.sample_rate, "--sample-rate")
    if args.dataset_size is None or args.batch_size is None:
        raise PrivacyParameterError("give --sample-rate, or both --dataset-size and --batch-size")
    n = check_count("--dataset-size", args.dataset_size)
    b = check_count("--batch-size", args.batch_size)
    if b > n:
        raise PrivacyParameterError(f"--batch-size ({b}) must not exceed --dataset-size ({n})")
    return check_sample_rate(b / n, "q = --batch-size / --dataset-size")  # b/n is exact, but may underflow to 0


def _steps(args: argparse.Namespace, q: float) -> int:
    if args.steps is not None:
        return check_count("--steps", args.steps, maximum=MAX_STEPS)
    return epochs_to_steps(check_positive("--epochs", args.epochs), q)


def _report(args: argparse.Namespace, q: float, sigma: float, steps: int, delta: float) -> dict[str, Any]:
    accountant = make_accountant(args.accountant)
    accountant.compose(step_event(q, sigma, args.mechanism), steps)
    found = accountant.epsilon_result(delta)
    eps, order, error = found.epsilon, found.order, found.error
    return {
        "epsilon": eps,
        "delta": delta,
        "order": None if order is None or math.isinf(order) else order,
        "epsilon_error": error,
        "noise_multiplier": sigma,
        "sample_rate": q,
        "steps": steps,
        "epochs": steps * q,
        "mechanism": args.mechanism,
        "accountant": args.accountant,
        "dataset_size": args.dataset_size,
        "batch_size": args.batch_size,
        "statement": privacy_statement(
            eps, delta, steps=steps, sample_rate=q, noise_multiplier=sigma, mechanism=args.mechanism, order=order,
            accountant=accountant_label(args.accountant, error),
        ),
    }


DECIMALS = 4  # of the noise multiplier in the text headline


def round_up(value: float, decimals: int) -> float:
    """The smallest number with ``decimals`` decimals whose float is ≥ ``value`` (so the printed σ, parsed back,
    is never below the calibrated one: ε decreases in σ)."""
    scale = 10**decimals
    units = math.ceil(value * scale)
    while units / scale < value:
        units += 1
    return units / scale


def _run(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    q = _sample_rate(args)
    delta = check_delta(args.delta, "--delta")
    if args.dataset_size is not None:
        warn_if_delta_too_large(delta, check_count("--dataset-size", args.dataset_size))
    if args.command == "epsilon":
        sigma = check_noise_multiplier("--noise-multiplier", args.noise_multiplier)
        result = _report(args, q, sigma, _steps(args, q), delta)
        headline = f"epsilon = {format_epsilon(result['epsilon'])} at delta = {format_delta(delta, 6)}"
    elif args.command == "noise":
        target = check_positive("--target-epsilon", args.target_epsilon)
        steps = _steps(args, q)
        sigma = noise_multiplier_for(target, delta, q, steps, args.mechanism, accountant=args.accountant)
        result = _report(args, q, sigma, steps, delta)
        shown = round_up(sigma, DECIMALS)  # what a user copies must still meet the target: never rounded down
        at_shown = _report(args, q, shown, steps, delta)
        # the statement describes the σ the user is told to use (and its ε), not the unrounded one
        result.update(target_epsilon=target, noise_multiplier_shown=shown, epsilon_at_shown=at_shown["epsilon"],
                      statement=at_shown["statement"])
        smallest = "the smallest" if sigma >= 4 * SIGMA_FLOOR else f"the search stops below {SIGMA_FLOOR:g}: one"
        headline = (
            f"noise multiplier = {shown:.{DECIMALS}f} ({smallest} meeting epsilon <= {target:g}, {sigma:.6f}, rounded "
            f"up; it gives epsilon = {format_epsilon(result['epsilon_at_shown'])} at delta = {format_delta(delta, 6)})"
        )
    else:
        target = check_positive("--target-epsilon", args.target_epsilon)
        sigma = check_noise_multiplier("--noise-multiplier", args.noise_multiplier)
        steps = steps_for(target, delta, q, sigma, args.mechanism, accountant=args.accountant)
        if steps == 0:
            one = _report(args, q, sigma, 1, delta)["epsilon"]
            raise PrivacyParameterError(
                f"no step fits epsilon <= {target:g} at delta = {format_delta(delta, 6)}: one step already spends epsilon = "
                f"{format_epsilon(one)}. Raise --noise-multiplier (dpclip-budget noise finds the smallest that "
                "fits a number of steps), lower --sample-rate, or raise --target-epsilon"
            )
        result = _report(args, q, sigma, steps, delta)
        result["target_epsilon"] = target
        headline = (
            f"steps = {steps:,} ({steps * q:.2f} epochs) fit epsilon <= {target:g}; "
            f"they give epsilon = {format_epsilon(result['epsilon'])} at delta = {format_delta(delta, 6)}"
        )
    return result, headline


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result, headline = _run(args)
        except PrivacyParameterError as error:
            parser.exit(2, f"dpclip-budget {args.command}: error: {error}\n")
    for warning in caught:
        if issubclass(warning.category, PrivacyWarning):  # numerical RuntimeWarnings are not the user's concern
            print(f"dpclip-budget: warning: {warning.message}", file=sys.stderr)
    if args.json:  # strict JSON: an infinite epsilon (no finite bound) is written as null, with a flag
        infinite = [key for key, value in result.items() if isinstance(value, float) and math.isinf(value)]
        result.update({key: None for key in infinite})
        if infinite:
            result["infinite"] = infinite
        print(json.dumps(result, indent=2, allow_nan=False))
    else:
        print(headline)
        print(result["statement"])
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
