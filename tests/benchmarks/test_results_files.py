"""The README's benchmark tables are what benchmarks/render_tables.py makes of the committed results files.

A hand edit of a figure, or a results file regenerated without rerunning the renderer, fails here. The results
files must also record the command that made them, consistent with the settings they report.
"""

from __future__ import annotations

import json
import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[2]
render_tables = SimpleNamespace(**runpy.run_path(str(ROOT / "benchmarks" / "render_tables.py")))  # a script, not a package

FULL = ROOT / "benchmarks" / "results" / "compare_opacus_full_cpu.json"
RETAINED = ROOT / "benchmarks" / "results" / "compare_opacus_full_cpu_retained.json"  # --retain-memory
ACCURACY = ROOT / "benchmarks" / "results" / "accuracy_digits.json"


def _section(text: str, heading: str) -> str:
    start = text.index(f"\n{heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else len(text)]


def test_readme_and_markdown_tables_are_rendered_from_the_results_files() -> None:
    outputs = render_tables.rendered()
    assert ROOT / "README.md" in outputs and len(outputs) == 1 + len(render_tables.TABLES)
    for path, text in outputs.items():
        assert path.read_text() == text, f"{path.relative_to(ROOT)} is stale: run python benchmarks/render_tables.py"


def test_the_comparison_section_holds_no_hand_typed_figures() -> None:
    section = _section((ROOT / "README.md").read_text(), "## dpclip vs Opacus")
    names = [m["name"] for m in render_tables.BLOCK.finditer(section)]
    assert names == ["compare_opacus_full_cpu", "compare_opacus_full_cpu_retained", "compare_opacus_scale_cpu",
                     "compare_opacus_scale_cpu_retained", "compare_opacus_embedding_cpu", "accuracy_digits"]
    prose = render_tables.BLOCK.sub("", section)
    prose = re.sub(r"`[^`]*`", "", prose)  # file names and commands may hold digits
    assert not re.search(r"\d", prose), "figures in this section come from benchmarks/render_tables.py"


def test_check_mode_fails_on_a_hand_edited_table(tmp_path: Path) -> None:
    script = ROOT / "benchmarks" / "render_tables.py"
    ok = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    readme = tmp_path / "README.md"
    text = (ROOT / "README.md").read_text()
    block = next(m for m in render_tables.BLOCK.finditer(text) if m["name"] == "compare_opacus_full_cpu")
    rows = block["body"].splitlines(keepends=True)
    last = max(i for i, row in enumerate(rows) if row.startswith("|"))  # the table's last row (prose may follow)
    rows[last] = rows[last].replace(" |", " | 1.0 (hand-edited) |", 1)  # a figure typed into it
    edited = "".join(rows)
    readme.write_text(text[:block.start("body")] + edited + text[block.end("body"):])
    stale = subprocess.run([sys.executable, str(script), "--check", "--readme", str(readme)], capture_output=True, text=True)
    assert stale.returncode == 1 and "hand-edited" in stale.stdout
    assert readme.read_text() != text  # --check writes nothing


def _parse_command(command: str) -> tuple[dict[str, str], list[str]]:
    words = shlex.split(command)
    env = {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        name, value = words.pop(0).split("=", 1)
        env[name] = value
    assert words[:2] == ["python", "benchmarks/compare_opacus.py"], command
    return env, words[2:]


@pytest.mark.parametrize("path", [FULL, RETAINED, ACCURACY], ids=lambda p: p.stem)
def test_results_files_record_how_they_were_made(path: Path) -> None:
    settings = json.loads(path.read_text())["settings"]
    for key in ("command", "argv", "threads", "thread_env", "torch", "opacus", "cpu", "cpus", "date", "duration_s"):
        assert settings.get(key) is not None, key
    env, argv = _parse_command(settings["command"])
    assert argv == settings["argv"]
    assert all(settings["thread_env"].get(name) == value for name, value in env.items() if name != "OMP_NUM_THREADS")


@pytest.mark.parametrize("path", [FULL, RETAINED], ids=lambda p: p.stem)
def test_full_results_are_what_their_command_makes(path: Path) -> None:
    compare_opacus = SimpleNamespace(**runpy.run_path(str(ROOT / "benchmarks" / "compare_opacus.py")))  # defines only: nothing runs

    report = json.loads(path.read_text())
    s = report["settings"]
    env, argv = _parse_command(s["command"])
    args = compare_opacus.make_parser().parse_args(argv)
    assert not args.smoke and not args.accuracy and not args.worker
    assert args.retain_memory == s.get("retain_memory", False) == path.stem.endswith("_retained")
    assert (args.size, args.device) == (s["size"], s["device"]) == ("full", "cpu")
    assert (args.steps, args.warmup, args.repeats) == (s["steps"], s["warmup"], s["repeats"])
    assert compare_opacus.resolve_threads(args.threads, env) == s["threads"] == 1  # one thread: see benchmarks/README.md
    assert s["thread_env"]["OMP_NUM_THREADS"] == "1"  # what the runs (fresh processes) got
    assert {(r["model"], r["library"]) for r in report["results"]} == {(m, lib) for m in args.models for lib in args.libraries}
    assert set(compare_opacus.MODELS) == set(args.models) and set(compare_opacus.LIBRARIES) == set(args.libraries)
    for r in report["results"]:
        assert "error" not in r, r
        medians = [x["ms_per_step"] for x in r["repeats"]]
        assert len(medians) == s["repeats"] and r["ms_per_step"] == min(medians)
        assert all(len(x["step_ms"]) == s["steps"] for x in r["repeats"])


def test_utility_runs_of_an_earlier_configuration_are_set_aside() -> None:
    """A model's runs made before its configuration last changed are not shown (nor counted in its table)."""
    since = render_tables.UTILITY_CONFIG_SINCE["cnn"][0]
    before, after = "2026-01-01T00:00:00+00:00", since[:10] + "T23:59:59+00:00"
    report = {"settings": {"date": after}, "invocations": [{"date": before}, {"date": after}], "runs": [
        {"model": "cnn", "invocation": 0, "seed": 0}, {"model": "cnn", "invocation": 1, "seed": 1},
        {"model": "no-such-model", "invocation": 0, "seed": 2}]}  # a model never changed: every run shown
    shown, aside = render_tables.current_utility_runs(report)
    assert [r["seed"] for r in shown] == [1, 2] and [r["seed"] for r in aside] == [0]
    # each model has its own date: a run made between the two changes is set aside for the model that changed later
    # and shown for the other
    (earlier, early_since), (later, late_since) = sorted(
        ((m, render_tables.UTILITY_CONFIG_SINCE[m][0]) for m in ("cnn", "scatternet")), key=lambda item: item[1])
    assert early_since[:16] < late_since[:16]
    report["invocations"][1]["date"] = early_since[:16] + ":30+00:00"
    report["runs"] = [{"model": later, "invocation": 1, "seed": 3}, {"model": earlier, "invocation": 1, "seed": 4}]
    shown, aside = render_tables.current_utility_runs(report)
    assert [r["seed"] for r in shown] == [4] and [r["seed"] for r in aside] == [3]
