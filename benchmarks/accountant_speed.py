"""The accountants against dp_accounting and Opacus: ε and the time an ε query takes, into one results file.

- Speed, RDP: ε for 10,000 Poisson-subsampled Gaussian steps (q = 0.01, σ = 1, δ = 1e-5), dpclip's RDPAccountant
  vs dp_accounting's and Opacus's RDP accountants.
- Speed, PLD: dpclip's PLDAccountant vs dp_accounting's PLD accountant (pessimistic, grid 1e-4) and Opacus's PRV
  accountant (eps_error 0.01), on the same 10,000 steps and on a 3-phase history (σ and q change between phases).
- Agreement: ε at δ = 1e-5 of four DP-SGD histories by dpclip's RDP and PLD (with its error bound) and by
  dp_accounting's PLD.
- Small δ: ε at δ = 1e-12 by dpclip's PLD and RDP, dp_accounting's PLD, the prv_accountant package's bounds and
  Opacus's PRVAccountant, and σ calibrated for ε = 3 there.

All libraries run in this one process, interleaved; medians over --repeats calls. dpclip is timed three ways:
"cold" (nothing memoised: RDP curves / PLDs computed from scratch), "warm" (memoised, as when an engine queries ε
every step; for PLD a fresh accountant over memoised per-mechanism PLDs), and "first call" (a fresh interpreter,
timed from just after `import accountants`). benchmarks/render_tables.py renders the results file into README.md.

    OMP_NUM_THREADS=1 python benchmarks/accountant_speed.py     # writes benchmarks/results/accountant_speed.{json,md}
    python benchmarks/accountant_speed.py --repeats 2 --out /tmp/speed   # a quick look
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import runpy
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

Q, SIGMA, STEPS, DELTA = 0.01, 1.0, 10_000, 1e-5
PHASES = [(0.01, 1.0, 3000), (0.02, 0.8, 2000), (0.005, 1.5, 5000)]  # (q, σ, steps): a 3-phase history


def dpclip_epsilon() -> float:
    from accountants import Gaussian, PoissonSampled, RDPAccountant

    accountant = RDPAccountant()
    accountant.compose(PoissonSampled(Q, Gaussian(SIGMA)), STEPS)
    return accountant.get_epsilon(DELTA)


def dpclip_cold() -> float:
    from accountants import rdp

    rdp.clear_cache()
    return dpclip_epsilon()


def dp_accounting_epsilon() -> float:
    import dp_accounting as dpa
    from dp_accounting.rdp import rdp_privacy_accountant

    accountant = rdp_privacy_accountant.RdpAccountant()
    accountant.compose(dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(Q, dpa.GaussianDpEvent(SIGMA)), STEPS))
    return accountant.get_epsilon(DELTA)


def opacus_epsilon() -> float:
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(SIGMA, Q, STEPS)]
    return accountant.get_epsilon(DELTA)


def dpclip_pld(phases) -> float:
    from accountants import Gaussian, PLDAccountant, PoissonSampled

    accountant = PLDAccountant()
    for q, sigma, steps in phases:
        accountant.compose(PoissonSampled(q, Gaussian(sigma)), steps)
    return accountant.get_epsilon(DELTA)


def dpclip_pld_cold(phases) -> float:
    from accountants import pld

    pld.clear_cache()
    return dpclip_pld(phases)


def dp_accounting_pld(phases, delta: float = DELTA) -> float:
    import dp_accounting as dpa

    accountant = dpa.pld.PLDAccountant()
    for q, sigma, steps in phases:
        accountant.compose(dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), steps))
    return accountant.get_epsilon(delta)


def opacus_prv(phases) -> float:
    from opacus.accountants import PRVAccountant

    accountant = PRVAccountant()
    accountant.history = [(sigma, q, steps) for q, sigma, steps in phases]
    return accountant.get_epsilon(DELTA)


FIRST_CALL = """
import time, accountants
t = time.perf_counter()
a = accountants.RDPAccountant(); a.compose(accountants.PoissonSampled({q}, accountants.Gaussian({s})), {t_})
eps = a.get_epsilon({d})
print((time.perf_counter() - t) * 1e3, eps)
"""


def time_ms(fn, repeats: int) -> tuple[float, float]:
    fn()  # imports and one-off set-up are not part of a call
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), value


HISTORIES = {  # name: (q, σ, steps) phases, for the agreement table at δ = 1e-5
    "q = 256/60000, σ = 1.1, 2,350 steps (10 epochs)": [(256 / 60000, 1.1, 2350)],
    "q = 0.01, σ = 1.0, 10,000 steps": [(0.01, 1.0, 10_000)],
    "q = 0.001, σ = 0.5, 100,000 steps": [(0.001, 0.5, 100_000)],
    "3 phases: (q, σ, steps) = (0.01, 1, 3000), (0.02, 0.8, 2000), (0.005, 1.5, 5000)": PHASES,
}
SMALL_DELTA, SMALL_DELTA_TARGET = 1e-12, 3.0
PLD_SINGLE, PLD_PHASES = f"{STEPS:,} steps (q = {Q:g}, σ = {SIGMA:g})", "3-phase history"  # the PLD speed tables


def _dpclip_accountant(kind: str, phases):
    from accountants import Gaussian, PoissonSampled, make_accountant

    accountant = make_accountant(kind)
    for q, sigma, steps in phases:
        accountant.compose(PoissonSampled(q, Gaussian(sigma)), steps)
    return accountant


def agreement() -> dict[str, dict[str, float]]:
    """ε at δ = 1e-5 of each history in HISTORIES: dpclip RDP, dpclip PLD (ε and its error bound), dp_accounting PLD."""
    rows = {}
    for name, phases in HISTORIES.items():
        pld_epsilon, pld_error = _dpclip_accountant("pld", phases).get_epsilon_and_error(DELTA)
        rows[name] = {"rdp": _dpclip_accountant("rdp", phases).get_epsilon(DELTA), "pld": pld_epsilon,
                      "pld_error": pld_error, "dp_accounting_pld": dp_accounting_pld(phases)}
    return rows


def small_delta() -> dict[str, float]:
    """At δ = 1e-12, 10,000 steps of (q = 0.01, σ = 1): ε by dpclip's PLD and RDP, by dp_accounting's PLD
    (pessimistic, grid 1e-4: an upper bound), by the prv_accountant package (Gopi et al. 2021's reference
    implementation: lower and upper bounds, eps_error 0.01, delta_error δ/1000) and Opacus's PRVAccountant at its
    defaults (what its ``get_epsilon`` reports); and the σ each dpclip accountant calibrates for ε = 3 there."""
    from accountants import noise_multiplier_for
    from opacus.accountants import PRVAccountant
    from prv_accountant.dpsgd import DPSGDAccountant

    phases = [(Q, SIGMA, STEPS)]
    reference = DPSGDAccountant(noise_multiplier=SIGMA, sampling_probability=Q, eps_error=0.01,
                                delta_error=SMALL_DELTA / 1000, max_steps=STEPS)
    low, _, high = reference.compute_epsilon(delta=SMALL_DELTA, num_steps=STEPS)
    opacus = PRVAccountant()
    opacus.history = [(SIGMA, Q, STEPS)]
    return {
        "delta": SMALL_DELTA, "q": Q, "sigma": SIGMA, "steps": STEPS,
        "pld": _dpclip_accountant("pld", phases).get_epsilon(SMALL_DELTA),
        "rdp": _dpclip_accountant("rdp", phases).get_epsilon(SMALL_DELTA),
        "dp_accounting_pld": dp_accounting_pld(phases, SMALL_DELTA),
        "prv_accountant_lower": low, "prv_accountant_upper": high,
        "opacus_prv": opacus.get_epsilon(SMALL_DELTA),
        "target_epsilon": SMALL_DELTA_TARGET,
        "sigma_pld": noise_multiplier_for(SMALL_DELTA_TARGET, SMALL_DELTA, Q, STEPS, accountant="pld"),
        "sigma_rdp": noise_multiplier_for(SMALL_DELTA_TARGET, SMALL_DELTA, Q, STEPS, accountant="rdp"),
    }


def _first_calls(kind: str, count: int) -> tuple[float, float]:
    """Median ms of the first ε query in a fresh interpreter (``kind``: RDPAccountant or PLDAccountant), and its ε."""
    times = []
    for _ in range(count):
        out = subprocess.run([sys.executable, "-c", FIRST_CALL.replace("RDPAccountant", kind).format(q=Q, s=SIGMA, t_=STEPS, d=DELTA)],
                             capture_output=True, text=True, check=True).stdout.split()
        times.append(float(out[0]))
    return statistics.median(times), float(out[1])


def speed(repeats: int, pld_repeats: int) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, dict[str, float]]]]:
    """The RDP rows and the PLD tables (per history): ε and median ms per call."""
    rdp_rows = {}
    for name, fn in [
        ("dpclip RDP (cold: new q, sigma)", dpclip_cold),
        ("dpclip RDP (warm: curve memoised)", dpclip_epsilon),
        ("dp_accounting RDP", dp_accounting_epsilon),
        ("Opacus RDP", opacus_epsilon),
    ]:
        ms, eps = time_ms(fn, repeats)
        rdp_rows[name] = {"epsilon": eps, "ms_median": ms}
    ms, eps = _first_calls("RDPAccountant", 5)
    rdp_rows["dpclip RDP (first call in a fresh process)"] = {"epsilon": eps, "ms_median": ms}
    pld_tables: dict[str, dict[str, dict[str, float]]] = {}
    for label, phases in [(PLD_SINGLE, [(Q, SIGMA, STEPS)]), (PLD_PHASES, PHASES)]:
        table = pld_tables[label] = {}
        for name, fn, count in [
            ("dpclip PLD (cold: nothing memoised)", lambda: dpclip_pld_cold(phases), pld_repeats * 2),
            ("dpclip PLD (warm: per-mechanism PLDs memoised)", lambda: dpclip_pld(phases), repeats),
            ("dp_accounting PLD (pessimistic, grid 1e-4)", lambda: dp_accounting_pld(phases), pld_repeats),
            ("Opacus PRV (eps_error 0.01)", lambda: opacus_prv(phases), pld_repeats),
        ]:
            ms, eps = time_ms(fn, count)
            table[name] = {"epsilon": eps, "ms_median": ms}
    ms, eps = _first_calls("PLDAccountant", 3)
    pld_tables[PLD_SINGLE]["dpclip PLD (first call in a fresh process)"] = {"epsilon": eps, "ms_median": ms}
    return rdp_rows, pld_tables


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--pld-repeats", type=int, help="repeats for the slower PLD/PRV libraries (default min(5, repeats))")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of accountant_speed.json and .md")
    args = parser.parse_args(argv)
    if args.pld_repeats is None:
        args.pld_repeats = max(1, min(5, args.repeats))
    logging.getLogger("absl").setLevel(logging.ERROR)
    compare = SimpleNamespace(**runpy.run_path(str(HERE / "compare_opacus.py")))  # versions, git, command line
    threads = compare.resolve_threads(None, dict(os.environ))
    torch.set_num_threads(threads)
    started = time.perf_counter()
    settings = compare.environment(threads, dict(os.environ))
    if argv is not None:
        settings["command"] = compare.command_line([str(Path(__file__)), *argv], dict(os.environ))
        settings["argv"] = list(argv)
    rdp_rows, pld_tables = speed(args.repeats, args.pld_repeats)
    report = {
        "setup": {"q": Q, "sigma": SIGMA, "steps": STEPS, "delta": DELTA, "phases": PHASES, "repeats": args.repeats,
                  "pld_repeats": args.pld_repeats},
        "rdp_speed": rdp_rows, "pld_speed": pld_tables, "agreement": agreement(), "small_delta": small_delta(),
    }
    settings["duration_s"] = round(time.perf_counter() - started, 1)
    report = {"settings": settings, **report}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "accountant_speed.json").write_text(json.dumps(report, indent=1) + "\n")
    render = SimpleNamespace(**runpy.run_path(str(HERE / "render_tables.py")))
    markdown = render.accountant_markdown(report)
    (args.out / "accountant_speed.md").write_text(markdown)
    print(markdown)
    return report


if __name__ == "__main__":
    main()
