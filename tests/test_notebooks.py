"""The tutorials in notebooks/ run from top to bottom without an error (quick sizes: DPCLIP_NOTEBOOK_QUICK=1).

Each notebook is executed by nbclient in a fresh ``python3`` kernel with notebooks/ as its working directory,
as Jupyter would run it. Outputs are not written back: the committed notebooks stay without outputs.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _ensure_python3_kernel() -> None:
    """nbclient needs a kernel spec named python3; ipykernel ships one, but install it into the venv if absent."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec("python3")
    except NoSuchKernel:
        subprocess.run([sys.executable, "-m", "ipykernel", "install", "--sys-prefix", "--name", "python3"], check=True)


def test_every_tutorial_is_collected() -> None:
    names = [path.name for path in NOTEBOOKS]
    assert names == [
        "01_quickstart.ipynb",
        "02_planning_a_budget.ipynb",
        "03_clipping.ipynb",
        "04_private_finetuning.ipynb",
        "05_dpclip_vs_opacus.ipynb",
        "06_private_lm_finetuning.ipynb",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_notebook_runs(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nb = nbformat.read(path, as_version=4)
    assert all(not cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"), "commit notebooks without outputs"
    _ensure_python3_kernel()
    monkeypatch.setenv("DPCLIP_NOTEBOOK_QUICK", "1")  # inherited by the kernel
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    start = time.perf_counter()
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT / "notebooks")}}
    )
    client.execute()  # raises CellExecutionError (with the cell and its traceback) on the first failing cell
    print(f"{path.name}: {time.perf_counter() - start:.1f} s")
    errors = [o for cell in nb.cells for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    images = sum("image/png" in o.get("data", {}) for cell in nb.cells for o in cell.get("outputs", []))
    assert images >= 1, "every tutorial shows at least one plot"
