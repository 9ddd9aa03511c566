"""How close the audit's empirical lower bound comes to the claimed ε on the easiest case: one step, q = 1.

For the Gaussian mechanism (L2 clipping, σ = 1.2) and the Laplace mechanism (L1 clipping, b = 1.2·C), each over
``--seeds`` seeds of ``dpclip.audit.audit_config`` with ``--trials`` trials: the lower bound, the ε the engine's
accountant claims, and, for the Gaussian, the exact ε of the mechanism (Balle & Wang 2018, Theorem 8: the analytic
Gaussian mechanism's δ(ε) = Φ(Δ/2σ − εσ/Δ) − e^ε Φ(−Δ/2σ − εσ/Δ), solved for ε); the Laplace mechanism's exact ε
is its pure-DP ε = Δ/b. Then a planted bug the audit must catch, and the same audit of the unmodified engine:
the noise drawn once and reused at every step (:class:`ReusedNoise`; q = 0.5, σ = 1, 4 steps, each norm), where
every step alone looks right and only the composition is broken. benchmarks/render_tables.py renders the results
file into README § Auditing.

    python benchmarks/audit_tightness.py                          # 16 seeds × 10⁶ trials, about 2 minutes
    python benchmarks/audit_tightness.py --seeds 2 --trials 20000 --out /tmp/audit   # a quick look
"""

from __future__ import annotations

import argparse
import json
import math
import os
import runpy
import statistics
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from scipy.optimize import brentq
from scipy.stats import norm as normal

from dpclip.audit import audit_config
from dpclip.noise import NoiseSource

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
NOISE_MULTIPLIER, DELTA, CONFIDENCE = 1.2, 1e-5, 0.95
MECHANISMS = {"gaussian": "l2", "laplace": "l1"}
PLANTED = {"noise_multiplier": 1.0, "sample_rate": 0.5, "steps": 4, "trials": 50_000, "seed": 1}


def exact_gaussian_epsilon(noise_multiplier: float, delta: float) -> float:
    """ε of one Gaussian mechanism of std σ·Δ at δ (Balle & Wang 2018, Theorem 8), with sensitivity Δ = 1."""
    s = noise_multiplier

    def excess(eps: float) -> float:
        return normal.cdf(0.5 / s - eps * s) - math.exp(eps) * normal.cdf(-0.5 / s - eps * s) - delta

    return brentq(excess, 0.0, 100.0, xtol=1e-12)


def audit_runs(seeds: int, trials: int) -> list[dict[str, Any]]:
    """One audit per mechanism and seed: lower bound, claimed ε, exact ε and the score the audit chose."""
    exact = {"gaussian": exact_gaussian_epsilon(NOISE_MULTIPLIER, DELTA), "laplace": 1.0 / NOISE_MULTIPLIER}
    runs = []
    for mechanism, norm in MECHANISMS.items():
        for seed in range(seeds):
            result = audit_config(NOISE_MULTIPLIER, sample_rate=1.0, norm=norm, trials=trials, confidence=CONFIDENCE,
                                  delta=DELTA, seed=seed)
            runs.append({"mechanism": mechanism, "norm": norm, "seed": seed, "trials": trials,
                         "lower_bound": result.epsilon_lower_bound, "claimed_epsilon": result.claimed_epsilon,
                         "exact_epsilon": exact[mechanism], "score": result.score, "violated": result.violated})
    return runs


class ReusedNoise(NoiseSource):
    """The planted bug: one standard-noise draw per tensor shape, then the same noise at every step (scaled to
    the std/scale asked for). Each coordinate's noise is still N(0, σ²C²) (or Laplace), so one step alone looks
    right; only the composition over steps is broken (the true ε over T > 1 steps is ∞)."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed=seed)
        self.first_draws: dict[tuple, Any] = {}

    def _reused(self, like: Any, draw: Any) -> Any:
        key = (tuple(like.shape), like.dtype, like.device, draw.__name__)
        if key not in self.first_draws:
            self.first_draws[key] = draw(like, 1.0)
        return self.first_draws[key]

    def gaussian(self, like: Any, std: float) -> Any:
        return self._reused(like, super().gaussian) * std

    def laplace(self, like: Any, scale: float) -> Any:
        return self._reused(like, super().laplace) * scale


def reuse_noise(engine: Any) -> None:
    """``tamper=`` of :func:`dpclip.audit.audit_config`: swap the engine's noise source for the reusing one."""
    engine.noise = ReusedNoise(seed=engine.noise.seed)


def planted_runs(trials: int) -> list[dict[str, Any]]:
    """Per norm: the audit of the engine with :class:`ReusedNoise`, then of the unmodified engine."""
    p = PLANTED
    runs = []
    for norm in MECHANISMS.values():
        for bug in (True, False):
            result = audit_config(p["noise_multiplier"], p["sample_rate"], norm=norm, steps=p["steps"], trials=trials,
                                  confidence=CONFIDENCE, delta=DELTA, seed=p["seed"], tamper=reuse_noise if bug else None)
            runs.append({"norm": norm, "bug": "reused noise" if bug else None, "trials": trials,
                         "lower_bound": result.epsilon_lower_bound, "claimed_epsilon": result.claimed_epsilon,
                         "score": result.score, "violated": result.violated})
    return runs


def summary(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per mechanism: the bound's min / median / max as a fraction of the claim, the claim and the exact ε."""
    out = {}
    for mechanism in MECHANISMS:
        rows = [r for r in runs if r["mechanism"] == mechanism]
        ratios = [r["lower_bound"] / r["claimed_epsilon"] for r in rows]
        out[mechanism] = {"seeds": len(rows), "min_ratio": min(ratios), "median_ratio": statistics.median(ratios),
                          "max_ratio": max(ratios), "claimed_epsilon": rows[0]["claimed_epsilon"],
                          "exact_epsilon": rows[0]["exact_epsilon"], "violations": sum(r["violated"] for r in rows)}
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=16)
    parser.add_argument("--trials", type=int, default=1_000_000)
    parser.add_argument("--planted-trials", type=int, default=PLANTED["trials"], help="trials of each planted-bug audit")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of audit_tightness.json and .md")
    args = parser.parse_args(argv)
    compare = SimpleNamespace(**runpy.run_path(str(HERE / "compare_opacus.py")))  # versions, git, command line
    threads = compare.resolve_threads(None, dict(os.environ))
    started = time.perf_counter()
    settings = compare.environment(threads, dict(os.environ))
    if argv is not None:
        settings["command"] = compare.command_line([str(Path(__file__)), *argv], dict(os.environ))
        settings["argv"] = list(argv)
    runs = audit_runs(args.seeds, args.trials)
    planted = planted_runs(args.planted_trials)
    settings["duration_s"] = round(time.perf_counter() - started, 1)
    report = {"settings": settings, "setup": {"noise_multiplier": NOISE_MULTIPLIER, "sample_rate": 1.0, "steps": 1,
                                              "delta": DELTA, "confidence": CONFIDENCE, "trials": args.trials},
              "summary": summary(runs), "runs": runs,
              "planted": {"setup": {**PLANTED, "trials": args.planted_trials}, "runs": planted}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "audit_tightness.json").write_text(json.dumps(report, indent=1) + "\n")
    markdown = SimpleNamespace(**runpy.run_path(str(HERE / "render_tables.py"))).audit_markdown(report)
    (args.out / "audit_tightness.md").write_text(markdown)
    print(markdown)
    return report


if __name__ == "__main__":
    main()
