"""Code is shared through the installed packages (dpclip, accountants, dpclip_examples): no script, notebook,
benchmark or test edits the import path."""

import os
from pathlib import Path

import dpclip_examples

ROOT = Path(__file__).resolve().parent.parent
SKIP = {"runs", "build", "dist", "node_modules", "__pycache__"}  # besides hidden folders (.venv, .git, ...)


def _sources() -> list[Path]:
    found = []
    for folder, subfolders, files in os.walk(ROOT):
        subfolders[:] = [d for d in subfolders if not d.startswith(".") and d not in SKIP and not d.endswith(".egg-info")]
        found += [Path(folder) / f for f in files if f.endswith((".py", ".ipynb"))]
    return found


def test_nothing_edits_the_import_path() -> None:
    needle = "sys." + "path"  # spelled apart, so this file does not match itself
    sources = _sources()
    assert any(p.name == "train_digits.py" for p in sources) and any(p.suffix == ".ipynb" for p in sources)
    offenders = [str(p.relative_to(ROOT)) for p in sources if needle in p.read_text(encoding="utf-8")]
    assert not offenders, f"{needle} in {offenders}: import from the installed packages instead (pip install -e .)"


def test_the_examples_package_is_the_checkout() -> None:
    """``pip install -e .`` maps dpclip_examples to this checkout (the scripts, notebooks and tests import it)."""
    assert Path(dpclip_examples.__file__).resolve().parent == ROOT / "dpclip_examples"
