"""PrivacyProgress: a tqdm bar on a terminal, bounded plain lines elsewhere, nothing with disable=True."""

from __future__ import annotations

import io
import re

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from dpclip import PrivacyEngine
from dpclip.progress import PrivacyProgress

LINE = re.compile(r"^(?:(?P<desc>.+): )?step (?P<n>\d+)(?:/(?P<total>\d+))?, eps=(?P<eps>[0-9.]+)(?P<rest>.*)$")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


class Run:
    """A fake training run: ``steps`` counts optimizer steps, ε grows with them, and every call is counted."""

    def __init__(self) -> None:
        self.steps = 0
        self.calls = 0

    def epsilon(self) -> float:
        self.calls += 1
        return 0.0123 * self.steps


def lines_of(stream: io.StringIO) -> list[re.Match]:
    text = stream.getvalue()
    assert "\r" not in text
    matches = [LINE.match(line) for line in text.splitlines()]
    assert all(matches), text
    return matches  # type: ignore[return-value]


def test_non_tty_prints_a_bounded_number_of_correct_lines() -> None:
    run, clock, out = Run(), Clock(), io.StringIO()
    bar = PrivacyProgress(range(500), run.epsilon, lambda: run.steps, desc="epoch 1/3", file=out, clock=clock)
    assert bar.mode == "lines" and len(bar) == 500
    for i in bar:
        clock.now += 1.0  # one second per batch: 500 s in all, default every_seconds=30
        run.steps += 1
        bar.log(loss=1.0 / (i + 1))
    bar.close()
    lines = lines_of(out)
    assert 500 // 30 <= len(lines) <= 500 // 30 + 2
    for m in lines:
        n = int(m["n"])
        assert m["desc"] == "epoch 1/3" and m["total"] == "500"
        assert float(m["eps"]) == pytest.approx(0.0123 * n, abs=5e-4)  # the callable's value at that step
        assert m["rest"] == f", loss={1.0 / n:.4g}"
    assert [int(m["n"]) for m in lines][-1] == 500  # a last line at the end, printed once (close adds none)
    assert len({int(m["n"]) for m in lines}) == len(lines)
    # ε is computed only for the lines printed, not at every item
    assert run.calls == len(lines)


def test_every_seconds_and_a_loop_left_early() -> None:
    run, clock, out = Run(), Clock(), io.StringIO()
    bar = PrivacyProgress(iter(range(100)), run.epsilon, lambda: run.steps, file=out, clock=clock, every_seconds=10)
    for i in bar:
        clock.now += 2.5
        run.steps += 1
        if i == 49:
            break
    bar.close()
    bar.close()
    lines = lines_of(out)
    # 50 batches × 2.5 s = 125 s: a line every 10 s (every 4th batch) and the last one at close
    assert [int(m["n"]) for m in lines] == [*range(4, 49, 4), 50]
    assert all(m["total"] is None and m["desc"] is None for m in lines)  # a generator has no length
    assert float(lines[-1]["eps"]) == pytest.approx(0.0123 * 50, abs=5e-4)


def test_epsilon_is_recomputed_only_after_a_step() -> None:
    run, clock, out = Run(), Clock(), io.StringIO()
    bar = PrivacyProgress(range(40), run.epsilon, lambda: run.steps, file=out, clock=clock, every_seconds=0)
    for i in bar:
        if i % 4 == 3:  # gradient accumulation: one step per 4 batches
            run.steps += 1
    lines = lines_of(out)
    assert len(lines) == 40  # every_seconds=0: a line per item
    assert run.calls == 11  # steps 0..10
    assert [float(m["eps"]) for m in lines] == [round(0.0123 * ((n + 1) // 4), 3) for n in range(40)]


def test_tty_stream_gets_the_tqdm_bar() -> None:
    run, out = Run(), TTY()
    bar = PrivacyProgress(range(20), run.epsilon, lambda: run.steps, desc="private", file=out, mininterval=0)
    assert bar.mode == "bar" and not bar.bar.disable
    for _ in bar:
        run.steps += 1
        bar.log(loss=0.5)
    bar.close()
    text = out.getvalue()
    assert "\r" in text and "private" in text and "20/20" in text
    assert "eps=0.246" in text and "loss=0.5" in text
    assert run.calls == 20  # the bar recomputes ε after each step, as before
    assert "eps=0.246" in bar.bar.postfix


@pytest.mark.parametrize("stream", [io.StringIO, TTY])
def test_disable_prints_nothing_and_computes_nothing(stream: type) -> None:
    run, out = Run(), stream()
    bar = PrivacyProgress(range(10), run.epsilon, lambda: run.steps, file=out, disable=True, mode="lines")
    assert bar.mode == "off" and list(bar) == list(range(10)) and len(bar) == 10
    bar.close()
    assert out.getvalue() == "" and run.calls == 0


def test_tqdm_disable_none_means_nothing_in_logs() -> None:
    run, out = Run(), io.StringIO()
    bar = PrivacyProgress(range(10), run.epsilon, lambda: run.steps, file=out, disable=None)
    assert bar.mode == "off" and list(bar) == list(range(10))
    assert out.getvalue() == ""


def test_modes_can_be_forced() -> None:
    run, clock = Run(), Clock()
    tty = TTY()
    lines = PrivacyProgress(range(5), run.epsilon, lambda: run.steps, file=tty, mode="lines", clock=clock)
    assert list(lines) == list(range(5)) and lines.mode == "lines"
    assert [int(m["n"]) for m in lines_of(tty)] == [5]  # no clock advance: only the last line
    log = io.StringIO()
    bar = PrivacyProgress(range(5), run.epsilon, lambda: run.steps, file=log, mode="bar")
    assert list(bar) == list(range(5)) and bar.mode == "bar"
    bar.close()
    assert "5/5" in log.getvalue() and "\r" in log.getvalue()
    with pytest.raises(ValueError, match="mode must be one of"):
        PrivacyProgress(range(5), run.epsilon, lambda: run.steps, mode="quiet")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="every_seconds"):
        PrivacyProgress(range(5), run.epsilon, lambda: run.steps, every_seconds=-1)


def test_engine_progress_in_a_log_shows_the_engines_epsilon() -> None:
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,)))
    model = nn.Linear(4, 2)
    engine = PrivacyEngine(accountant="rdp", seed=0)
    model, optimizer, loader = engine.make_private(
        model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(data, batch_size=16), noise_multiplier=1.0, max_grad_norm=1.0
    )
    out = io.StringIO()
    bar = engine.progress(loader, delta=1e-5, desc="epoch 1", file=out, every_seconds=3600)
    for x, y in bar:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        bar.log(loss=loss.item())
    bar.close()
    (line,) = lines_of(out)
    assert line["desc"] == "epoch 1" and int(line["n"]) == len(loader) == engine.steps
    assert float(line["eps"]) == pytest.approx(engine.get_epsilon(1e-5), abs=1e-3)
    assert line["rest"].startswith(", loss=")


def _micro_batched(max_physical_batch_size: int):
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(96, 4), torch.randint(0, 2, (96,)))
    model = nn.Linear(4, 2)
    engine = PrivacyEngine(accountant="rdp", seed=0)
    model, optimizer, loader = engine.make_private(
        model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(data, batch_size=24), noise_multiplier=1.0,
        max_grad_norm=1.0, max_physical_batch_size=max_physical_batch_size)
    return engine, model, optimizer, loader


def _train_micro(model, optimizer, bar) -> int:
    """One epoch through ``bar`` with micro-batches (step after the last one of each logical batch); returns
    how many micro-batches it saw."""
    seen = 0
    for x, y in bar:
        seen += 1
        nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
        optimizer.step()
        optimizer.zero_grad()
    return seen


@pytest.mark.parametrize("mode", ["lines", "bar"])
def test_micro_batches_of_one_logical_batch_count_once(mode: str) -> None:
    """With max_physical_batch_size the loader hands out several micro-batches per logical batch; the bar's count
    is logical batches out of len(loader) (it read "step 37/10" before: one count per micro-batch)."""
    engine, model, optimizer, loader = _micro_batched(max_physical_batch_size=5)
    out = TTY() if mode == "bar" else io.StringIO()
    bar = engine.progress(loader, delta=1e-5, file=out, mode=mode, every_seconds=3600)
    seen = _train_micro(model, optimizer, bar)
    bar.close()
    assert seen > len(loader) == engine.steps == 4  # several micro-batches per step, 4 steps
    if mode == "lines":
        (line,) = lines_of(out)
        assert (int(line["n"]), int(line["total"])) == (4, 4)
    else:
        assert bar.bar.n == 4 and "4/4" in out.getvalue() and f"{seen}/4" not in out.getvalue()


def test_an_epoch_resumed_from_a_checkpoint_counts_from_where_it_stands() -> None:
    """Two of four logical batches trained, checkpointed, loaded into a fresh engine: its bar goes 3/4, 4/4."""
    engine, model, optimizer, loader = _micro_batched(max_physical_batch_size=5)
    for x, y in loader:
        nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
        optimizer.step()
        optimizer.zero_grad()
        if engine.steps == 2:
            break
    state = engine.state_dict()
    engine2, model2, optimizer2, loader2 = _micro_batched(max_physical_batch_size=5)
    engine2.load_state_dict(state)
    counts = []
    out = io.StringIO()
    bar = engine2.progress(loader2, delta=1e-5, file=out, mode="lines", every_seconds=3600)
    for x, y in bar:
        counts.append(bar._count)
        nn.functional.cross_entropy(model2(x), y, reduction="sum").backward()
        optimizer2.step()
        optimizer2.zero_grad()
    bar.close()
    assert engine2.steps == 4 and sorted(set(counts)) == [3, 4]
    (line,) = lines_of(out)
    assert (int(line["n"]), int(line["total"])) == (4, 4)


def test_micro_batches_print_one_line_per_logical_batch() -> None:
    """every_seconds=0 prints at every count; the micro-batches of one logical batch share a count, so one line
    each (it printed the same "step n/4" once per micro-batch)."""
    engine, model, optimizer, loader = _micro_batched(max_physical_batch_size=2)
    out = io.StringIO()
    bar = engine.progress(loader, delta=1e-5, file=out, mode="lines", every_seconds=0)
    seen, spent = 0, {}
    for x, y in bar:
        seen += 1
        nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
        optimizer.step()
        optimizer.zero_grad()
        spent[engine.steps] = engine.get_epsilon(1e-5)
    bar.close()
    lines = lines_of(out)
    assert seen > 4 and [int(line["n"]) for line in lines] == [1, 2, 3, 4]
    # each line once its logical batch was released: the epoch's last line read the ε of 3 steps, not 4, before
    assert [float(line["eps"]) for line in lines] == [round(spent[n], 3) for n in (1, 2, 3, 4)]
