"""Command-line checks shared by the example jobs: refused with the parser's message (exit 2), never a traceback."""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterable
from pathlib import Path


def check_numbers(parser: argparse.ArgumentParser, args: argparse.Namespace, positive: Iterable[str],
                  counts: Iterable[str]) -> None:
    """``positive``: finite numbers > 0 (``delta`` also < 1); ``counts``: integers ≥ 1."""
    for name in positive:
        value = getattr(args, name)
        flag = f"--{name.replace('_', '-')}"
        if not (value > 0 and math.isfinite(value)):
            parser.error(f"{flag} must be a finite number > 0, got {value}")
        if name == "delta" and value >= 1:
            parser.error(f"{flag} must be below 1 (and well below 1/N for a meaningful guarantee), got {value}")
    for name in counts:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")


def check_paths(parser: argparse.ArgumentParser, **paths: Path | None) -> None:
    """Each given path (flag name → path, None: not given) must exist."""
    for name, path in paths.items():
        if path is not None and not Path(path).exists():
            parser.error(f"--{name.replace('_', '-')} {path}: no such file or folder")
