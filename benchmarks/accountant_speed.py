"""ε for 10,000 Poisson-subsampled Gaussian steps (q=0.01, σ=1, δ=1e-5): dpclip vs dp_accounting vs Opacus.

Two tables. RDP: dpclip's RDPAccountant vs dp_accounting's and Opacus's RDP accountants. PLD: dpclip's
PLDAccountant vs dp_accounting's PLD accountant (pessimistic, grid 1e-4) and Opacus's PRV accountant
(eps_error 0.01), on the same 10,000 steps and on a 3-phase history (σ and q change between phases).

All libraries run in this one process, on the same machine, interleaved; medians over --repeats calls.
dpclip is timed three ways: "cold" (nothing memoised: RDP curves / PLDs computed from scratch), "warm"
(memoised, as when an engine queries ε every step; for PLD a fresh accountant over memoised per-mechanism
PLDs), and "first call" (a fresh interpreter, timed from just after `import accountants`).

    python benchmarks/accountant_speed.py [--repeats 30] [--pld-repeats 5] [--json rdp.json] [--pld-json pld.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import time

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


def dp_accounting_pld(phases) -> float:
    import dp_accounting as dpa

    accountant = dpa.pld.PLDAccountant()
    for q, sigma, steps in phases:
        accountant.compose(dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), steps))
    return accountant.get_epsilon(DELTA)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--pld-repeats", type=int, help="repeats for the slower PLD/PRV libraries (default min(5, repeats))")
    parser.add_argument("--json", help="also write the RDP table to this JSON file")
    parser.add_argument("--pld-json", help="also write the PLD tables to this JSON file")
    args = parser.parse_args()
    if args.pld_repeats is None:
        args.pld_repeats = max(1, min(5, args.repeats))
    logging.getLogger("absl").setLevel(logging.ERROR)

    rows = {}
    for name, fn in [
        ("dpclip RDP (cold: new q, sigma)", dpclip_cold),
        ("dpclip RDP (warm: curve memoised)", dpclip_epsilon),
        ("dp_accounting RDP", dp_accounting_epsilon),
        ("Opacus RDP", opacus_epsilon),
    ]:
        ms, eps = time_ms(fn, args.repeats)
        rows[name] = {"epsilon": eps, "ms_median": ms}
    firsts = []
    for _ in range(5):
        out = subprocess.run(
            [sys.executable, "-c", FIRST_CALL.format(q=Q, s=SIGMA, t_=STEPS, d=DELTA)],
            capture_output=True, text=True, check=True,
        ).stdout.split()
        firsts.append(float(out[0]))
    rows["dpclip RDP (first call in a fresh process)"] = {"epsilon": float(out[1]), "ms_median": statistics.median(firsts)}

    pld_rows: dict[str, dict[str, dict[str, float]]] = {}
    for label, phases in [(f"{STEPS} steps, q={Q}, sigma={SIGMA}", [(Q, SIGMA, STEPS)]), ("3-phase history", PHASES)]:
        table = pld_rows[label] = {}
        for name, fn, repeats in [
            ("dpclip PLD (cold: nothing memoised)", lambda: dpclip_pld_cold(phases), args.pld_repeats * 2),
            ("dpclip PLD (warm: per-mechanism PLDs memoised)", lambda: dpclip_pld(phases), args.repeats),
            ("dp_accounting PLD (pessimistic, grid 1e-4)", lambda: dp_accounting_pld(phases), args.pld_repeats),
            ("Opacus PRV (eps_error 0.01)", lambda: opacus_prv(phases), args.pld_repeats),
        ]:
            ms, eps = time_ms(fn, repeats)
            table[name] = {"epsilon": eps, "ms_median": ms}
    firsts = []
    for _ in range(3):
        out = subprocess.run(
            [sys.executable, "-c", FIRST_CALL.replace("RDPAccountant", "PLDAccountant").format(q=Q, s=SIGMA, t_=STEPS, d=DELTA)],
            capture_output=True, text=True, check=True,
        ).stdout.split()
        firsts.append(float(out[0]))
    first_label = next(iter(pld_rows))
    pld_rows[first_label]["dpclip PLD (first call in a fresh process)"] = {
        "epsilon": float(out[1]), "ms_median": statistics.median(firsts)
    }

    print(f"epsilon for {STEPS} steps, q={Q}, sigma={SIGMA}, delta={DELTA} (median of {args.repeats})\n")
    print("| library | epsilon | ms per call |\n|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['epsilon']:.4f} | {row['ms_median']:.2f} |")
    print(f"\nPLD accountants, delta={DELTA}; 3-phase history (q, sigma, steps) = {PHASES}\n")
    for label, table in pld_rows.items():
        print(f"{label}\n\n| library | epsilon | ms per call |\n|---|---|---|")
        for name, row in table.items():
            print(f"| {name} | {row['epsilon']:.4f} | {row['ms_median']:.1f} |")
        print()
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)
    if args.pld_json:
        with open(args.pld_json, "w") as handle:
            json.dump(pld_rows, handle, indent=1)


if __name__ == "__main__":
    main()
