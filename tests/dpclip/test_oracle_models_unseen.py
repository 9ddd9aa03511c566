"""The oracle's acceptance test (see ``test_oracle_models.py``) on the second zoo, ``oracle_models_unseen.py``:
models dpclip was not designed for, each exact against the brute-force per-example loop or refused by name."""

from __future__ import annotations

import pytest

from tests.dpclip.oracle_models import run_case, verdict
from tests.dpclip.oracle_models_unseen import CASES


@pytest.mark.parametrize(
    "case,mode", [pytest.param(case, mode, id=f"{case.name}-{mode}") for case in CASES for mode in case.modes]
)
def test_unseen_model_step_is_exact_or_refused(case, mode):
    if case.requires is not None:
        pytest.importorskip(case.requires)
    failure = verdict(case, mode, run_case(case, mode))
    if failure is not None:
        pytest.fail(failure, pytrace=False)
