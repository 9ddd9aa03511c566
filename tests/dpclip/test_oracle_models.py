"""Acceptance test of "Never silently wrong: every accepted model gets exactly DP-SGD's per-example clipping".

For every model/setting of the zoo in ``oracle_models.py`` and every per-example path (grad_sample_mode), one
private step through the public API (σ = 1e-12, q = 1, lr = 0) must either release exactly the brute-force
oracle's Σᵢ clip(gᵢ, C) / N — gᵢ computed on example i alone — without changing any parameter or buffer, or be
refused by a dpclip exception that names the offending module. Never a torch internal error, never a silently
different result. See ``oracle_models.py`` for the harness and each case's notes.

``python -m tests.dpclip.test_oracle_models [case ...] [--modes auto,vmap]`` (from the repository root) prints the
outcome table; ``DPCLIP_ORACLE_TABLE=1 pytest tests/dpclip/test_oracle_models.py`` prints it after the tests.
"""

from __future__ import annotations

import os

import pytest

from tests.dpclip.oracle_models import CASES, REFUSED, Result, format_table, run_case, verdict

RESULTS: dict[tuple[str, str], Result] = {}


@pytest.fixture(scope="module", autouse=True)
def _outcome_table(request: pytest.FixtureRequest):
    yield
    if not os.environ.get("DPCLIP_ORACLE_TABLE") or not RESULTS:
        return
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line("")
        reporter.write_line("oracle outcome table (group case mode expected ok seconds outcome):")
        for line in format_table(RESULTS):
            reporter.write_line(line)


@pytest.mark.parametrize(
    "case,mode", [pytest.param(case, mode, id=f"{case.name}-{mode}") for case in CASES for mode in case.modes]
)
def test_step_is_exact_or_refused(case, mode):
    if case.requires is not None:
        pytest.importorskip(case.requires)
    result = run_case(case, mode)
    RESULTS[(case.name, mode)] = result
    failure = verdict(case, mode, result)
    if failure is not None:
        pytest.fail(failure, pytrace=False)


def test_zoo_is_large_and_covers_every_group():
    assert len(CASES) >= 60
    assert {case.group for case in CASES} == {"A", "B", "C", "D", "L"}
    for case in CASES:
        if case.expected("auto") == REFUSED or any(case.expected(m) != "exact" for m in case.modes):
            assert case.notes, f"{case.name}: a case that may be refused must say why in its notes"


@pytest.mark.parametrize(
    "options",
    [dict(max_physical_batch_size=4), dict(norm="l1"), dict(max_physical_batch_size=4, norm="l1", per_layer=True)],
    ids=["micro_batches", "l1", "micro_batches_l1_per_layer"],
)
def test_embedding_rows_released_as_sparse_sums_are_exact(options):
    """An embedding's clipped sum travels from the layerwise path to the noisy release as a sparse COO tensor of
    its looked-up rows (``weighted_sum(sparse_rows=True)``): added up over micro-batches (sparse + sparse, and with
    the dense sums of other micro-batches), through the Laplace release, per-layer clipping: the step still releases
    exactly the brute-force oracle's Σ clip(g_i, C) / N."""
    from functools import partial

    from tests.dpclip.oracle_models import EXACT, Case, build_embedding

    case = Case("embedding_rows", "L", partial(build_embedding), EXACT, options=options)
    result = run_case(case, "layerwise")
    failure = verdict(case, "layerwise", result)
    assert failure is None, failure


if __name__ == "__main__":
    from tests.dpclip.oracle_models import main

    raise SystemExit(main())
