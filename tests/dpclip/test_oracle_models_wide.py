"""Both acceptance zoos again, at 20 examples per batch instead of 6, on ``grad_sample_mode="auto"``.

Verification runs the candidate paths on a probe of k = 7 examples; only a larger batch reaches its whole-batch
checks (outputs and norms on the probe's rows again, and every row's attribution: Σᵢ wᵢ·gᵢ against autograd's
gradient of Σᵢ wᵢ·⟨outᵢ, vᵢ⟩). The zoos' 6 examples never do, so a model that is exact on 6 rows and wrong past the
probe (rows routed by data, ``h[mask]``) would pass them; here every case runs past the probe, through the
public API, against the same brute-force oracle and the same expectations.

Tolerance: each case's, in units of C/6 (the 6-example zoo's scale) instead of C/20. The layerwise path's norms
are upper bounds that cover their own float32 rounding (about 1e-6 of an example's norm), so every clipped
example is scaled down by the same tiny amount and the error of the average is a fraction of C, not of C/N. A row
credited to the wrong example errs by about C/N = 0.05·C, far above it.
"""

from __future__ import annotations

import dataclasses

import pytest

import tests.dpclip.oracle_models as seen
import tests.dpclip.oracle_models_unseen as unseen
from tests.dpclip.oracle_models import Case, run_case, verdict

WIDE = 20
NARROW = seen.N  # the zoos' own batch size (6)
ZOO = [(case, name) for name, module in (("seen", seen), ("unseen", unseen)) for case in module.CASES
       if "auto" in case.modes]


@pytest.fixture
def wide_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both zoos' builders read N when they build: 20 examples per data set (hand-picked per-example lengths
    and switches cycle, see ``oracle_models.cycled``)."""
    monkeypatch.setattr(seen, "N", WIDE)
    monkeypatch.setattr(unseen, "N", WIDE)


@pytest.mark.parametrize("case", [pytest.param(case, id=f"{zoo}-{case.name}") for case, zoo in ZOO])
def test_auto_is_exact_or_refused_past_the_probe(case: Case, wide_batches: None) -> None:
    if case.requires is not None:
        pytest.importorskip(case.requires)
    case = dataclasses.replace(case, tol=case.tol * WIDE / NARROW)
    result = run_case(case, "auto")
    failure = verdict(case, "auto", result)
    if failure is not None:
        pytest.fail(failure, pytrace=False)


def test_the_wide_zoo_really_runs_past_the_probe(wide_batches: None) -> None:
    """All but the cases that fix their own size (one example, micro-batches of 10) build 20 examples, more than
    the largest probe verification takes on them (7, or 11 where a layer's dims hold 7)."""
    sizes = {}
    for case, zoo in ZOO:
        if case.requires is not None:
            try:
                __import__(case.requires)
            except ImportError:
                continue
        sizes[(zoo, case.name)] = case.build().tensors[0].shape[0]
    wide = [name for name, size in sizes.items() if size == WIDE]
    assert len(wide) >= len(sizes) - 10 and len(wide) >= 170, sorted(set(sizes) - set(wide))
