"""Every input to ``dpclip-budget`` is answered (exit 0) or refused with a message (exit 2), within seconds.

Property tests (hypothesis) over argument lists built from random and extreme numbers written as a user might
type them: huge, tiny, negative, nan, inf, 1e400, 10**400, a 400-digit integer, non-numbers. The CLI's ``main``
runs in-process under a per-call time limit; the library calls behind it (calibration, ε) must raise
PrivacyParameterError, never OverflowError, ZeroDivisionError, RecursionError or MemoryError.
"""

from __future__ import annotations

import contextlib
import io
import math
import signal
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from accountants import PrivacyParameterError, make_accountant, noise_multiplier_for, step_event, steps_for
from accountants.checks import MAX_STEPS
from accountants.cli import main

# "Within seconds": the slowest valid plans (millions of steps at q ~ 1e-5, σ < 0.5) take ~8 s; a calibration to a
# target far below any positive ε at a large δ (e.g. --target-epsilon 1e-125 --delta 0.157, 1.2 M steps) bisects
# the edge where the PLD ε becomes exactly 0, at 1–3 s per PLD evaluation on a loaded 2-core CI machine: ~20 s.
CALL_LIMIT_S = 40.0

EXTREME = [
    "0", "-0", "-1", "1", "2", "0.5", "nan", "NaN", "inf", "-inf", "1e400", "-1e400", "10**400", "1" + "0" * 400,
    "1e21", "1000000000000000000000", "1e12", "1e15", "1e300", "1e-300", "5e-324", "1e-320", "1e-30", "1e-12",
    "0.999999999999", "123456789012345678901234567890", "abc", "", " ", "0x10", "1_000", "1.0.0", "--", "-1e-5",
]
PLAUSIBLE = {
    "--sample-rate": st.floats(1e-5, 1.0),
    "--dataset-size": st.integers(1, 10**7),
    "--batch-size": st.integers(1, 10**4),
    "--steps": st.integers(1, 10**6),
    "--epochs": st.floats(0.01, 100.0),
    "--delta": st.floats(1e-14, 0.5),
    "--noise-multiplier": st.floats(0.05, 50.0),
    "--target-epsilon": st.floats(0.01, 100.0),
}


WILD = st.one_of(
    st.sampled_from(EXTREME),
    st.integers(0, 400).map(lambda n: f"1e{n}"),
    st.integers(0, 400).map(lambda n: f"1e-{n}"),
    st.integers(10, 400).map(lambda n: "1" + "0" * n),
    st.integers(-(10**30), 10**30).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
)


@st.composite
def argument_lists(draw: st.DrawFn) -> list[str]:
    """A plausible plan with 0 to 3 values replaced by wild ones, now and then structurally broken too."""
    command = draw(st.sampled_from(["epsilon", "noise", "steps"]))
    flags = {"epsilon": ["--noise-multiplier"], "noise": ["--target-epsilon"]}.get(
        command, ["--noise-multiplier", "--target-epsilon"]
    ) + ["--delta"]
    if command != "steps":
        flags.append(draw(st.sampled_from(["--steps", "--epochs"])))
    flags += draw(st.sampled_from([["--sample-rate"], ["--dataset-size", "--batch-size"]]))
    chosen = {flag: draw(PLAUSIBLE[flag].map(str)) for flag in flags}
    for flag in draw(st.permutations(flags))[: draw(st.sampled_from([0, 1, 1, 1, 2, 2, 3]))]:
        chosen[flag] = draw(WILD)
    argv = [command] + [item for flag in draw(st.permutations(flags)) for item in (flag, chosen[flag])]
    for flag, options in [("--mechanism", ["gaussian", "laplace", "cauchy"]), ("--accountant", ["pld", "rdp", "moments"])]:
        if draw(st.booleans()):
            argv += [flag, draw(st.sampled_from(options))]
    if draw(st.booleans()):
        argv.append("--json")
    if draw(st.integers(0, 7)) == 0:  # a missing value, an extra or repeated flag, or no command at all
        broken = draw(st.sampled_from(["drop", "extra", "command"]))
        if broken == "drop":
            del argv[draw(st.integers(0, len(argv) - 1))]
        elif broken == "extra":
            extra = draw(st.sampled_from(sorted(PLAUSIBLE)))
            argv += [extra, draw(st.one_of(PLAUSIBLE[extra].map(str), WILD))]
        else:
            argv[0] = draw(st.sampled_from(["", "frobnicate", "--help", "-1"]))
    return argv


class CallTimedOut(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    def expire(signum, frame):
        raise CallTimedOut(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_main(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), time_limit(CALL_LIMIT_S):
        try:
            code = main(argv)
        except SystemExit as exit_:
            code = exit_.code
    return code, out.getvalue(), err.getvalue()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(argv=argument_lists())
def test_every_input_is_answered_or_refused_with_a_message(argv):
    code, out, err = run_main(argv)  # any exception (Overflow..., CallTimedOut) fails the test with argv shown
    assert code in (0, 2), (argv, code, err)
    assert "Traceback" not in err
    if code == 2:
        assert err.strip() and not out, (argv, out, err)
    else:
        assert out.strip(), argv


@pytest.mark.parametrize(
    "argv, words",
    [
        (["epsilon", "--sample-rate", "0.01", "--noise-multiplier", "1", "--steps", "1" + "0" * 400, "--delta", "1e-5"],
         ["--steps", "<= 1,000,000,000,000", "401 digits"]),
        (["epsilon", "--sample-rate", "0.01", "--noise-multiplier", "1", "--epochs", "1e12", "--delta", "1e-5"],
         ["epochs", "more than the 1,000,000,000,000", "fewer epochs"]),
        (["noise", "--dataset-size", "1" + "0" * 21, "--batch-size", "256", "--target-epsilon", "1", "--epochs", "1",
          "--delta", "1e-5"], ["one epoch", "raise the sample rate"]),
        (["epsilon", "--dataset-size", "1" + "0" * 400, "--batch-size", "1", "--noise-multiplier", "1", "--steps", "9",
          "--delta", "1e-5"], ["--batch-size / --dataset-size", "(0, 1]"]),
        (["epsilon", "--sample-rate", "0.1", "--noise-multiplier", "1e-200", "--steps", "3", "--delta", "1e-5"],
         ["--noise-multiplier must lie in [1e-100, 1e+100]"]),
        (["steps", "--sample-rate", "0.1", "--noise-multiplier", "1e400", "--target-epsilon", "1", "--delta", "1e-5"],
         ["--noise-multiplier must be finite"]),
        (["epsilon", "--sample-rate", "0.1", "--noise-multiplier", "1", "--steps", "10**400", "--delta", "1e-5"],
         ["invalid int value"]),
    ],
)
def test_the_roots_of_the_fuzzed_failures_are_refused_with_the_limit_and_the_fix(argv, words):
    code, out, err = run_main(argv)
    assert code == 2 and not out
    assert all(word in err for word in words), err


@pytest.mark.parametrize(
    "argv",
    [
        ["epsilon", "--sample-rate", "0.5", "--noise-multiplier", "1e-100", "--steps", "1000000000000", "--delta", "1e-5"],
        ["epsilon", "--sample-rate", "5e-324", "--noise-multiplier", "1e100", "--steps", "1000000000000", "--delta", "5e-324"],
        ["epsilon", "--sample-rate", "1", "--noise-multiplier", "1e-100", "--steps", "1", "--delta", "1e-5", "--mechanism", "laplace"],
        ["noise", "--sample-rate", "0.01", "--target-epsilon", "1e300", "--steps", "1000000000000", "--delta", "0.5"],
        ["noise", "--sample-rate", "1e-4", "--target-epsilon", "1e-300", "--steps", "1", "--delta", "1e-300"],
        ["steps", "--sample-rate", "0.5", "--target-epsilon", "1e300", "--noise-multiplier", "1e-3", "--delta", "1e-5"],
        ["steps", "--sample-rate", "1", "--target-epsilon", "1e15", "--noise-multiplier", "5", "--delta", "1e-8"],
        ["epsilon", "--dataset-size", "1" + "0" * 30, "--batch-size", "256", "--noise-multiplier", "1", "--steps", "10",
         "--delta", "1e-5"],
    ],
)
def test_extreme_but_valid_plans_are_answered(argv):
    code, out, err = run_main(argv)
    assert code in (0, 2) and "Traceback" not in err, err
    assert code == 0 or "unreachable" in err, err


WILD_VALUES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(10**30), 10**30),
    st.sampled_from([0.0, -0.0, 5e-324, 1e-300, 1e300, 10**400, -(10**400), 2**1024, MAX_STEPS, MAX_STEPS + 1,
                     True, "3", None]),
)
LIBRARY_PLAUSIBLE = {  # cheap plans: the wild values are the point here
    "target": st.floats(0.1, 100.0),
    "delta": st.floats(1e-14, 0.5),
    "q": st.floats(1e-3, 1.0),
    "sigma": st.floats(0.5, 50.0),
    "steps": st.integers(1, 10**4),
}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), kind=st.sampled_from(["rdp", "pld"]), mechanism=st.sampled_from(["gaussian", "laplace"]))
def test_library_calls_raise_privacy_parameter_error_and_nothing_else(data, kind, mechanism):
    """Plausible arguments with 0 to 2 replaced by wild ones: an answer, or PrivacyParameterError."""
    v = {name: data.draw(strategy, label=name) for name, strategy in LIBRARY_PLAUSIBLE.items()}
    for name in data.draw(st.permutations(sorted(v)))[: data.draw(st.integers(0, 2))]:
        v[name] = data.draw(WILD_VALUES, label=f"wild {name}")
    calls = [
        lambda: noise_multiplier_for(v["target"], v["delta"], v["q"], v["steps"], mechanism, accountant=kind),
        lambda: steps_for(v["target"], v["delta"], v["q"], v["sigma"], mechanism, accountant=kind),
        lambda: _epsilon(kind, v["q"], v["sigma"], v["steps"], v["delta"], mechanism),
    ]
    for call in calls:
        with time_limit(CALL_LIMIT_S):
            try:
                result = call()
            except PrivacyParameterError:
                continue
        assert result >= 0 and not math.isnan(result)


def _epsilon(kind, q, sigma, steps, delta, mechanism):
    accountant = make_accountant(kind)
    accountant.compose(step_event(q, sigma, mechanism), steps)
    return accountant.get_epsilon(delta)
