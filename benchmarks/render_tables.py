"""The markdown tables of the committed benchmark results: written from the results files, never typed by hand.

    python benchmarks/render_tables.py           # rewrite benchmarks/results/*.md and README.md's marked tables
    python benchmarks/render_tables.py --check   # exit 1 (and show the difference) where any of them is stale

Each results file ``benchmarks/results/NAME.json`` gives ``benchmarks/results/NAME.md`` (every row, each repeat's
figure, how the file was made) and the README's summary between ``<!-- table: NAME -->`` and ``<!-- /table -->``.
``benchmarks/compare_opacus.py`` writes its ``.md`` files with the same functions. No torch needed.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import statistics
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
BLOCK = re.compile(r"(<!-- table: (?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)
LIBRARY_ORDER = ["nonprivate", "nonprivate-opacus-model", "dpclip", "dpclip-lowmem", "dpclip-vmap", "opacus-hooks",
                 "opacus-functorch", "opacus-ghost"]


def _prose(text: str) -> str:
    """A paragraph wrapped like the README's source."""
    return textwrap.fill(text, width=115, break_long_words=False, break_on_hyphens=False)


def _ms(value: float) -> str:
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


def _ratio(value: float) -> str:
    return f"{value:.2f}×" if value < 10 else f"{value:.1f}×"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _made_by(settings: dict[str, Any] | None) -> str:
    """How and where a results file was made, in one sentence."""
    if not settings or "command" not in settings:
        return "Made by a command that the results file does not record."
    env = settings.get("thread_env") or {}
    omp = ", ".join(f"{k}={env.get(k) if env.get(k) is not None else 'unset'}" for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY"))
    minutes = f", {settings['duration_s'] / 60:.0f} min" if settings.get("duration_s") else ""
    git = f", git {settings['git']}" if settings.get("git") else ""
    opacus = f", Opacus {settings['opacus']}" if settings.get("opacus") else ""
    gpu = f" and {settings['gpu']}" if settings.get("device") == "cuda" and settings.get("gpu") else ""
    return (f"Made by `{settings['command']}` ({settings['date']}{git}{minutes}) on {settings['cpu']}, "
            f"{_count(settings['cpus'], 'CPU')}{gpu}: {_count(settings['threads'], 'thread')} per run ({omp}), torch {settings['torch']}{opacus}.")


# ------------------------------------------------------------------------------------------------------------
# benchmarks/compare_opacus.py (timing mode)
# ------------------------------------------------------------------------------------------------------------
def _baselines(results: list[dict[str, Any]]) -> dict[str, float]:
    return {r["model"]: r["ms_per_step"] for r in results if r["library"] == "nonprivate" and "error" not in r}


def compare_table(results: list[dict[str, Any]]) -> str:
    """Every (model, library) row."""
    base = _baselines(results)
    faults = any("page_faults_per_step" in r for r in results)  # (results files made before it was counted: none)
    lines = ["| model | library | ms/step | each repeat's median | examples/s | × non-private | peak RSS MB | peak heap MB | "
             + ("page faults/step | " if faults else "") + "ε (δ=1e-5) | note |",
             "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if faults else "")]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['library']} | — | — | — | — | — | — | " + ("— | " if faults else "")
                         + f"— | {r['error']} |")
            continue
        ratio = r["ms_per_step"] / base[r["model"]] if r["model"] in base else float("nan")
        eps = "—" if r["epsilon"] is None else f"{r['epsilon']:.3f}"
        repeats = " / ".join("failed" if "error" in x else _ms(x["ms_per_step"]) for x in r.get("repeats", []))
        lines.append(
            f"| {r['model']} | {r['library']} | {_ms(r['ms_per_step'])} | {repeats or '—'} | {r['examples_per_s']:.0f} | "
            f"{ratio:.2f} | {r['peak_rss_mb']:.0f} | {_heap(r) or '—'} | "
            + (f"{r['page_faults_per_step']:,.0f} | " if faults else "") + f"{eps} | {r['note']} |"
        )
    return "\n".join(lines)


def _heap(r: dict[str, Any]) -> str:
    """The peak heap in use (MB), or "" for results files made before it was measured."""
    return f"{r['peak_heap_mb']:.0f}" if r.get("peak_heap_mb") else ""


def _memory(r: dict[str, Any]) -> str:
    """Peak RSS / peak heap, in MB (RSS alone for older results files)."""
    return f"{r['peak_rss_mb']:.0f} / {_heap(r)} MB" if _heap(r) else f"{r['peak_rss_mb']:.0f} MB"


def _method(s: dict[str, Any]) -> str:
    precision = "forward under bf16 autocast (float32 weights), " if s.get("autocast") == "bf16" else ""
    if s.get("retain_memory"):
        precision += ("every run (every library) first called `dpclip.retain_freed_memory()` (glibc keeps the memory "
                      "a step frees for the next one), ")
    if s.get("in_process"):
        return f"All runs in one process ({precision}smoke mode: times and memory are not comparable)."
    repeats = s.get("repeats", 1)
    return (f"Batch {s['batch']} (expected; Poisson sampling), {precision}σ = {s['sigma']:g}, C = {s['max_grad_norm']:g}; each "
            f"(model, library) in its own process, {_count(repeats, 'repeat')} interleaved; ms/step is the lowest of the repeats' "
            f"median over {s['steps']} timed steps (after {s.get('warmup', '?')} warm-up); peak RSS is the highest"
            + ("; peak heap is the most memory malloc had handed out during the first step (dpclip's verification "
               "included) or one more untimed step, sampled every 0.5 ms" + _heap_scaling(s) + ", the highest of the "
               "repeats (RSS also keeps what the allocator holds after frees, and the libraries' code)." if s.get("heap") else "."))


def _heap_scaling(s: dict[str, Any]) -> str:
    """How the peak heap of a Poisson-sampled step was brought to the expected batch, where it was."""
    if not s.get("heap_scaled"):
        return ""
    return (", what the step added to the heap scaled to the expected batch (Poisson batches vary by about ±√B; the "
            "JSON keeps each measured step's batch and raw figures)")


def compare_markdown(report: dict[str, Any]) -> str:
    """benchmarks/results/compare_opacus_<size>_<device>.md: the full table, then how it was made."""
    s = report["settings"]
    return f"{compare_table(report['results'])}\n\n{_prose(f'{_made_by(s)} {_method(s)}')}\n"


def compare_readme(report: dict[str, Any]) -> str:
    """README's summary: per model, non-private, dpclip (both memory settings and the vmap path), the fastest Opacus
    mode and Opacus hooks."""
    s, results = report["settings"], report["results"]
    base = _baselines(results)
    ok = {(r["model"], r["library"]): r for r in results if "error" not in r}
    models = list(dict.fromkeys(r["model"] for r in results))

    def cell(r: dict[str, Any] | None, bold: bool = False, mode: str = "") -> str:
        if r is None:
            return "—"
        ms = f"**{_ms(r['ms_per_step'])}**" if bold else _ms(r["ms_per_step"])
        if r["library"].startswith("nonprivate"):
            return f"{ms} ({_memory(r)})"
        ratio = f"{_ratio(r['ms_per_step'] / base[r['model']])}, " if r["model"] in base else ""
        return f"{mode}{ms} ({ratio}{_memory(r)})"

    lines = ["| model | non-private | dpclip | dpclip, `memory=\"low\"` | dpclip, vmap path | fastest Opacus mode | Opacus hooks |",
             "|---|---|---|---|---|---|---|"]
    for m in models:
        private = [r for (mm, lib), r in ok.items() if mm == m and not lib.startswith("nonprivate")]
        fastest = min(private, key=lambda r: r["ms_per_step"])["library"] if private else None
        opacus = [r for r in private if r["library"].startswith("opacus-")]
        best = min(opacus, key=lambda r: r["ms_per_step"]) if opacus else None
        row = [
            s.get("models", {}).get(m, m),
            cell(ok.get((m, "nonprivate"))),
            cell(ok.get((m, "dpclip")), fastest == "dpclip"),
            cell(ok.get((m, "dpclip-lowmem")), fastest == "dpclip-lowmem"),
            cell(ok.get((m, "dpclip-vmap")), fastest == "dpclip-vmap"),
            cell(best, best is not None and fastest == best["library"], f"{best['library'][len('opacus-'):]} " if best else ""),
            cell(ok.get((m, "opacus-hooks")), fastest == "opacus-hooks"),
        ]
        lines.append("| " + " | ".join(row) + " |")
    eps = sorted({round(r["epsilon"], 3) for r in ok.values() if r.get("epsilon") is not None})
    eps_text = f"{eps[0]:.3f}" if len(eps) == 1 else f"{eps[0]:.3f}–{eps[-1]:.3f}"
    failed = [f"{r['model']} {r['library']}" for r in results if "error" in r]
    intro = (f"{_made_by(s)} {_method(s)} ε = {eps_text} (δ = {s['delta']:g}) for every private library, each by its "
             f"own tight accountant (dpclip: PLD; Opacus: PRV).")
    memory = "peak RSS / peak heap MB" if s.get("heap") else "peak RSS MB"
    legend = f"ms per step (× non-private, {memory}); bold: the fastest private one" + (
        f"; failed: {', '.join(failed)}" if failed else "") + "."
    own = [r for (m, lib), r in ok.items() if lib == "nonprivate-opacus-model" and r["note"]]
    baseline = "" if not own else "\n" + _prose(
        "Non-private training of the model Opacus trains (`ModuleValidator.fix`), the baseline of its figures: "
        + "; ".join(f"{r['model']} {_ms(r['ms_per_step'])} ms ({_memory(r)})" for r in own) + ".") + "\n"
    return f"{_prose(intro)}\n\n{_prose(legend)}\n\n" + "\n".join(lines) + "\n" + baseline


# ------------------------------------------------------------------------------------------------------------
# benchmarks/compare_opacus.py --accuracy
# ------------------------------------------------------------------------------------------------------------
def _accuracy_groups(runs: list[dict[str, Any]]):
    for eps in sorted({r["target_epsilon"] for r in runs}):
        yield eps, {lib: [r for r in runs if r["target_epsilon"] == eps and r["library"] == lib] for lib in ("dpclip", "opacus")}


def _mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def accuracy_table(runs: list[dict[str, Any]]) -> str:
    lines = ["| ε target | σ | steps | library | test accuracy (mean ± sd over seeds) | ε reported | s per run |",
             "|---|---|---|---|---|---|---|"]
    for eps, by_lib in _accuracy_groups(runs):
        for lib, rs in by_lib.items():
            if rs:
                lines.append(
                    f"| {eps:g} | {rs[0]['sigma']:.3f} | {rs[0]['steps']} | {lib} | {_mean_sd([r['test_accuracy'] for r in rs])} "
                    f"(n={len(rs)}) | {max(r['epsilon'] for r in rs):.3f} | {statistics.mean(r['wall_s'] for r in rs):.1f} |"
                )
    return "\n".join(lines)


def accuracy_markdown(report: dict[str, Any]) -> str:
    return f"{accuracy_table(report['runs'])}\n\n{_prose(_made_by(report.get('settings')))}\n"


def accuracy_readme(report: dict[str, Any]) -> str:
    runs = report["runs"]
    seeds = len({r["seed"] for r in runs})
    q = runs[0]["sample_rate"]
    lines = ["| target ε | σ | dpclip: test accuracy | Opacus (hooks): test accuracy | ε reported: dpclip / Opacus |",
             "|---|---|---|---|---|"]
    for eps, by_lib in _accuracy_groups(runs):
        mine, theirs = by_lib["dpclip"], by_lib["opacus"]
        sigma = (mine or theirs)[0]["sigma"]
        reported = " / ".join(f"{max(r['epsilon'] for r in rs):.3f}" if rs else "—" for rs in (mine, theirs))
        lines.append(f"| {eps:g} | {sigma:.3f} | {_mean_sd([r['test_accuracy'] for r in mine]) if mine else '—'} | "
                     f"{_mean_sd([r['test_accuracy'] for r in theirs]) if theirs else '—'} | {reported} |")
    intro = (f"{_made_by(report.get('settings'))} Digits CNN, {report['epochs']} epochs = {runs[0]['steps']} steps at "
             f"q = {q:.4g}, δ = {report['delta']:g}; test accuracy is the mean ± sd over {seeds} seeds.")
    return f"{_prose(intro)}\n\n" + "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------------
def _loader_setup(report: dict[str, Any]) -> str:
    m, s = report["machine"], report["setup"]
    return (f"Made by `{report['command']}`: {_count(m['cpus'], 'CPU core')}, torch {m['torch']}, main process "
            f"{_count(m['main_threads'], 'thread')}; {s['dataset_size']} images 3×64×64 augmented to 32×32, "
            f"~{s['item_cost_ms_main_process']:.2f} ms per item; small CNN trained privately, expected batch "
            f"{s['expected_batch']}, {s['steps_timed']} timed steps after {s['warmup_steps']} warm-up steps (worker "
            f"start-up included); median of {s['repeats']} interleaved repeats.")


def _loader_verdict(report: dict[str, Any]) -> str:
    w = report["setup"]["workers"]
    return (f"dpclip with {w} workers vs the main-process loader: **×{report[f'dpclip_w{w}_over_w0']:.2f}**; "
            f"dpclip / non-private torch at {w} workers: {report[f'dpclip_over_torch_w{w}']:.2f}.")


def loader_markdown(report: dict[str, Any]) -> str:
    """benchmarks/results/loader_workers.md: every configuration and repeat."""
    lines = ["# Poisson loader with worker processes (augmentation-heavy `__getitem__`)", "",
             _prose(_loader_setup(report)), "",
             "| configuration | examples/s (median) | all repeats | CPU ms/example (all processes, median) | "
             "1-min load average after each |", "|---|---:|---|---:|---|"]
    for name, r in report["results"].items():
        lines.append(f"| {name} | {r['median_examples_per_s']:.0f} | {', '.join(f'{v:.0f}' for v in r['all_examples_per_s'])} "
                     f"| {r['median_cpu_ms_per_example']:.2f} | {', '.join(f'{v:.1f}' for v in r['load_average_1min'])} |")
    return "\n".join(lines + ["", _prose(_loader_verdict(report)), ""])


def loader_readme(report: dict[str, Any]) -> str:
    """The README's summary: examples/s of dpclip and plain torch with and without workers."""
    w = report["setup"]["workers"]
    r = report["results"]
    lines = ["| loader | dpclip (private) | torch (non-private) |", "|---|---:|---:|"]
    for workers in (0, w):
        lines.append(f"| `num_workers={workers}` | {r[f'dpclip-w{workers}']['median_examples_per_s']:.0f} examples/s "
                     f"| {r[f'torch-w{workers}']['median_examples_per_s']:.0f} examples/s |")
    return f"{_prose(_loader_setup(report))}\n\n" + "\n".join(lines) + f"\n\n{_prose(_loader_verdict(report))}\n"


def main_job_markdown(report: dict[str, Any]) -> str:
    """benchmarks/results/main_job.md: the main job's accuracies and privacy statement."""
    return f"# The main job (`{report['command']}`)\n\n{main_job_readme(report)}\n{report['statement']}\n"


def main_job_readme(report: dict[str, Any]) -> str:
    """One paragraph: private vs non-private test accuracy, ε, σ, steps and wall time of the main job."""
    h = report["hyperparameters"]
    return _prose(
        f"With the defaults (seed {h['seed']}, {report['torch_threads']} torch threads), `{report['command']}` gave "
        f"test accuracy **{report['test_accuracy']:.3f}** private vs **{report['non_private_test_accuracy']:.3f}** "
        f"non-private, at ε = {report['epsilon']:.3f} (δ = {report['delta']:g}, {report['accountant'].upper()} "
        f"accountant; σ = {report['noise_multiplier']:.3f}, q = {report['sample_rate']:.4f}, {report['steps']} steps), "
        f"in {report['wall_time_s']:.0f} s for both runs. Results file: `benchmarks/results/main_job.json`."
    ) + "\n"


# ------------------------------------------------------------------------------------------------------------
# benchmarks/utility.py (Fashion-MNIST accuracy at fixed ε)
# ------------------------------------------------------------------------------------------------------------
FASHION_ANCHORS = ROOT / "benchmarks" / "fashion_mnist_anchors.json"
UTILITY_MODELS = {"scatternet": "ScatterNet features + linear", "cnn": "end-to-end CNN (tanh)"}
# When a model's configuration in benchmarks/utility.py last changed (and how): its runs made by invocations started
# before then stay in the results file but are not shown, so every figure is of the configuration listed.
UTILITY_CONFIG_SINCE = {
    "cnn": ("2026-12-02T08:50", "first convolution of width 24, 256 hidden units (width, hidden)"),
    "scatternet": ("2026-12-01T02:19", "the features are now centred on their private mean, center_noise = 20"),
}


def current_utility_runs(report: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The runs of the current configurations, and those set aside (made before their model's configuration
    changed: :data:`UTILITY_CONFIG_SINCE`)."""
    invocations = report.get("invocations", [report["settings"]])
    shown, aside = [], []
    for r in report["runs"]:
        since = UTILITY_CONFIG_SINCE.get(r["model"])
        started = invocations[r.get("invocation", 0)]["date"]
        (aside if since is not None and started < since[0] else shown).append(r)
    return shown, aside


def percent_sd(values: list[float]) -> str:
    """Accuracies (fractions) as "mean ± sd %" over seeds (ddof = 1); one value is marked as one seed."""
    if len(values) == 1:
        return f"{100 * values[0]:.2f} % (1 seed)"
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f} %"


def utility_markdown(report: dict[str, Any]) -> str:
    """benchmarks/results/utility_fashion_mnist.md: utility.py's own table (it imports torch, so it is run here
    only when that file is rendered)."""
    import runpy

    return runpy.run_path(str(ROOT / "benchmarks" / "utility.py"))["render_markdown"](report)


def utility_readme(report: dict[str, Any]) -> str:
    """README's opening table: per model and ε, dpclip and Opacus test accuracy (mean ± sd over seeds), the
    published anchor at that ε, and the wall time of one run."""
    runs, _ = current_utility_runs(report)
    anchors = json.loads(FASHION_ANCHORS.read_text())
    lines = ["| model | ε | dpclip | Opacus (same q, σ, C, steps) | published | wall time per run: dpclip / Opacus | seeds |",
             "|---|---|---|---|---|---|---|"]
    for model, label in UTILITY_MODELS.items():
        for eps in sorted({r["target_epsilon"] for r in runs if r["model"] == model and r["library"] != "nonprivate"}):
            group = {lib: [r for r in runs if (r["model"], r["target_epsilon"], r["library"]) == (model, eps, lib)]
                     for lib in ("dpclip", "opacus")}
            acc = {lib: percent_sd([r["test_accuracy"] for r in rs]) if rs else "—" for lib, rs in group.items()}
            wall = " / ".join(f"{statistics.mean(r['wall_s'] for r in rs):.0f} s" if rs else "—" for rs in group.values())
            published = "; ".join(f"{a['accuracy']:.1f} % ({a['source']}, {a['what']}"
                                  + (f", ε = {a['epsilon']:g}" if a["epsilon"] != eps else "") + ")"
                                  for a in anchors if a["model"] == model and abs(a["epsilon"] - eps) < 0.1) or "—"
            counts = {lib: len({r["seed"] for r in rs}) for lib, rs in group.items() if rs}
            seeds = f"{counts['dpclip']} (Opacus {counts['opacus']})" if len(set(counts.values())) > 1 else \
                str(next(iter(counts.values()), 0))
            lines.append(f"| {label} | {eps:g} | {acc['dpclip']} | {acc['opacus']} | {published} | {wall} | {seeds} |")
        reference = [r for r in runs if (r["model"], r["library"]) == (model, "nonprivate")]
        if reference:
            wall = statistics.mean(r["wall_s"] for r in reference)
            lines.append(f"| {label} | ∞ (non-private, same model: {reference[0]['optimizer']}, {reference[0]['epochs']} "
                         f"epochs) | {percent_sd([r['test_accuracy'] for r in reference])} | — | — | {wall:.0f} s | "
                         f"{len(reference)} |")
    s = report["settings"]
    intro = (f"Fashion-MNIST (60,000 training / 10,000 test images), δ = {report['delta']:g}, test accuracy mean ± sd "
             f"over seeds, each run on {_count(s['threads'], 'CPU thread')}; made by `benchmarks/utility.py` "
             "(hyper-parameters tuned on a validation split carved from the training set, never on the test set; "
             "every run's privacy report is in the results file `benchmarks/results/utility_fashion_mnist.json`).")
    return f"{_prose(intro)}\n\n" + "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------------
# benchmarks/accountant_speed.py (ε and query time: dpclip vs dp_accounting vs Opacus)
# ------------------------------------------------------------------------------------------------------------
def _query_ms(value: float) -> str:
    return f"{value:,.0f}" if value >= 10 else f"{value:.2f}" if value < 1 else f"{value:.1f}"


def _rdp_speed(report: dict[str, Any]) -> str:
    u = report["setup"]
    lines = [_prose(f"ε for {u['steps']:,} steps at q = {u['q']:g}, σ = {u['sigma']:g}, δ = {u['delta']:g}, median "
                    f"of {u['repeats']} calls. {_made_by(report['settings'])}"), "",
             "| library | ε | ms per call |", "|---|---|---|"]
    lines += [f"| {name} | {row['epsilon']:.4f} | {_query_ms(row['ms_median'])} |" for name, row in report["rdp_speed"].items()]
    return "\n".join(lines) + "\n"


def _pld_speed(report: dict[str, Any]) -> str:
    tables = report["pld_speed"]
    labels = list(tables)
    names = list(dict.fromkeys(name for table in tables.values() for name in table))
    lines = [_prose(f"Median ms per ε query (δ = {report['setup']['delta']:g}), same run as the RDP table; the "
                    f"3-phase history is (q, σ, steps) = {', '.join(str(tuple(p)) for p in report['setup']['phases'])}."), "",
             "| ms per ε query | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for name in names:
        cells = []
        for label in labels:
            row = tables[label].get(name)
            cells.append("—" if row is None else _query_ms(row["ms_median"])
                         + (f" (ε = {row['epsilon']:.4f})" if name.startswith("Opacus") else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _agreement(report: dict[str, Any]) -> str:
    lines = [f"ε at δ = {report['setup']['delta']:g} (PLD column: ε and its error bound; dp_accounting: its PLD "
             "accountant, pessimistic, grid 1e-4; from `benchmarks/results/accountant_speed.json`):", "",
             "| setting | RDP | PLD | dp_accounting PLD |", "|---|---|---|---|"]
    lines += [f"| {name} | {row['rdp']:.4f} | {row['pld']:.4f} (−{row['pld_error']:.2g}) | {row['dp_accounting_pld']:.4f} |"
              for name, row in report["agreement"].items()]
    return "\n".join(lines) + "\n"


def _small_delta(report: dict[str, Any]) -> str:
    d = report["small_delta"]
    return _prose(
        "**Small δ.** The mass the PLD truncates (∞ privacy loss) is counted in δ exactly and the tail is refined when "
        "it would exceed δ/1000; PLD's ε and δ are the minimum of the PLD and RDP bounds (both valid), and calibration "
        f"starts from RDP's σ, so PLD is never looser than RDP: at δ = {d['delta']:g}, q = {d['q']:g}, σ = {d['sigma']:g}, "
        f"{d['steps']:,} steps ε = {d['pld']:.2f} (RDP {d['rdp']:.2f}; dp_accounting's PLD {d['dp_accounting_pld']:.2f}; "
        f"the prv_accountant package's bounds [{d['prv_accountant_lower']:.2f}, {d['prv_accountant_upper']:.2f}]; "
        f"Opacus's PRVAccountant reports {d['opacus_prv']:.2f} at its defaults); calibrating ε = {d['target_epsilon']:g} there gives "
        f"σ = {d['sigma_pld']:.3f} (RDP {d['sigma_rdp']:.3f}). From `benchmarks/results/accountant_speed.json`.") + "\n"


def accountant_markdown(report: dict[str, Any]) -> str:
    """benchmarks/results/accountant_speed.md: all four parts."""
    parts = [_rdp_speed(report), _pld_speed(report), _agreement(report), _small_delta(report)]
    return "# Accountants: ε and query time (dpclip, dp_accounting, Opacus)\n\n" + "\n".join(parts)


def accountant_readme(report: dict[str, Any]) -> dict[str, str]:
    """Four README blocks: accountant_speed (RDP speed), .pld (PLD speed), .agreement (ε table), .small_delta."""
    return {"accountant_speed": _rdp_speed(report), "accountant_speed.pld": _pld_speed(report),
            "accountant_speed.agreement": _agreement(report), "accountant_speed.small_delta": _small_delta(report)}


# ------------------------------------------------------------------------------------------------------------
# benchmarks/audit_tightness.py (the audit's lower bound against the claimed and the exact ε)
# ------------------------------------------------------------------------------------------------------------
def audit_readme(report: dict[str, Any]) -> str:
    """One paragraph: the bound as a share of the claim, per mechanism, with the claim and the exact ε."""
    u, g, l = report["setup"], report["summary"]["gaussian"], report["summary"]["laplace"]

    def share(row: dict[str, float]) -> str:
        return f"{100 * row['min_ratio']:.0f}–{100 * row['max_ratio']:.0f} % (median {100 * row['median_ratio']:.0f} %)"

    return _prose(
        f"On the easiest case (one step, q = {u['sample_rate']:g}, σ = {u['noise_multiplier']:g}, {u['trials']:,} "
        f"trials, {_count(g['seeds'], 'seed')}, δ = {u['delta']:g}) the bound reaches {share(g)} of the claim for the "
        f"Gaussian mechanism (claim {g['claimed_epsilon']:.3f} from the engine's PLD accountant; exact ε "
        f"{g['exact_epsilon']:.3f}, Balle & Wang 2018) and {share(l)} for the Laplace mechanism (claim = exact ε = "
        f"{l['exact_epsilon']:.3f}); {l['violations'] + g['violations']} of the {g['seeds'] + l['seeds']} audits "
        f"exceeded their claim. {_planted_sentence(report['planted'])} Made by `python benchmarks/audit_tightness.py` "
        "(results file `benchmarks/results/audit_tightness.json`).") + "\n"


def _planted_sentence(planted: dict[str, Any]) -> str:
    """The planted bug (noise reused at every step) against the unmodified engine, per norm."""
    p = planted["setup"]
    rows = {(r["norm"], r["bug"] is not None): r for r in planted["runs"]}
    parts = [f"{norm.upper()}: bound {rows[norm, True]['lower_bound']:.2f} against a claim of "
             f"{rows[norm, True]['claimed_epsilon']:.2f} (the unmodified engine: {rows[norm, False]['lower_bound']:.2f})"
             for norm in ("l2", "l1")]
    return (f"A planted bug, the noise drawn once and reused at every step (q = {p['sample_rate']:g}, σ = "
            f"{p['noise_multiplier']:g}, {p['steps']} steps, {p['trials']:,} trials), is caught by the per-step "
            f"scores: {'; '.join(parts)}.")


def audit_markdown(report: dict[str, Any]) -> str:
    """benchmarks/results/audit_tightness.md: the summary paragraph and every audit."""
    lines = ["# The audit's lower bound against the claimed ε", "", audit_readme(report), _made_by(report["settings"]), "",
             "| mechanism | seed | lower bound | claimed ε | exact ε | score |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['mechanism']} | {r['seed']} | {r['lower_bound']:.3f} | {r['claimed_epsilon']:.3f} | "
              f"{r['exact_epsilon']:.3f} | {r['score']} |" for r in report["runs"]]
    lines += ["", "Planted bug:", "", "| norm | engine | lower bound | claimed ε | score | violated |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['norm']} | {r['bug'] or 'unmodified'} | {r['lower_bound']:.3f} | {r['claimed_epsilon']:.3f} | "
              f"{r['score']} | {'yes' if r['violated'] else 'no'} |" for r in report["planted"]["runs"]]
    return "\n".join(lines) + "\n"


TABLES: dict[str, tuple[Callable[[dict], str], Callable[[dict], str | dict[str, str]]]] = {
    # results file stem: (its .md, its README block, or several blocks by name)
    "accountant_speed": (accountant_markdown, accountant_readme),
    "audit_tightness": (audit_markdown, audit_readme),
    "compare_opacus_full_cpu": (compare_markdown, compare_readme),
    "compare_opacus_full_cpu_retained": (compare_markdown, compare_readme),
    "compare_opacus_scale_cpu": (compare_markdown, compare_readme),
    "compare_opacus_scale_cpu_retained": (compare_markdown, compare_readme),
    "compare_opacus_embedding_cpu": (compare_markdown, compare_readme),
    "accuracy_digits": (accuracy_markdown, accuracy_readme),
    "loader_workers": (loader_markdown, loader_readme),
    "main_job": (main_job_markdown, main_job_readme),
    "utility_fashion_mnist": (utility_markdown, utility_readme),
}


def replace_blocks(text: str, blocks: dict[str, str]) -> str:
    """``text`` with the body of every ``<!-- table: NAME -->`` … ``<!-- /table -->`` replaced by ``blocks[NAME]``."""
    unknown = [m["name"] for m in BLOCK.finditer(text) if m["name"] not in blocks]
    if unknown:
        raise SystemExit(f"README table(s) {unknown}: no such results file (benchmarks/results/NAME.json)")
    return BLOCK.sub(lambda m: m.group(1) + blocks[m["name"]] + m.group(4), text)


def rendered(readme: Path = README, results: Path = RESULTS) -> dict[Path, str]:
    """What each output file must contain, from the results files."""
    outputs: dict[Path, str] = {}
    blocks: dict[str, str] = {}
    for name, (markdown, summary) in TABLES.items():
        source = results / f"{name}.json"
        if not source.exists():
            continue
        report = json.loads(source.read_text())
        outputs[results / f"{name}.md"] = markdown(report)
        readme_blocks = summary(report)
        blocks.update(readme_blocks if isinstance(readme_blocks, dict) else {name: readme_blocks})
    outputs[readme] = replace_blocks(readme.read_text(), blocks)
    return outputs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 where a file differs from its results")
    parser.add_argument("--readme", type=Path, default=README)
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the results files")
    args = parser.parse_args(argv)
    stale = 0
    for path, text in rendered(args.readme, args.results).items():
        current = path.read_text() if path.exists() else ""
        if current == text:
            continue
        stale += 1
        if args.check:
            sys.stdout.writelines(difflib.unified_diff(current.splitlines(True), text.splitlines(True), f"{path} (now)",
                                                       f"{path} (from the results files)"))
        else:
            path.write_text(text)
            print(f"wrote {path}")
    if args.check and stale:
        print(f"{stale} file(s) differ from the results files: run python benchmarks/render_tables.py", file=sys.stderr)
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
