"""Progress with the privacy spent so far: a tqdm bar on a terminal, periodic plain lines in logs.

A tqdm bar redraws itself many times a second; written to a file, a pipe, CI output or ``nohup.out`` that is one
line (or carriage-return fragment) per redraw. :class:`PrivacyProgress` therefore picks its form from where it
writes: a terminal (or a Jupyter kernel) gets the bar, anything else gets at most one plain line every
``every_seconds`` and one at the end, e.g. ``private epoch 1/30: step 120/500, eps=1.234, loss=0.51``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any, Literal

from tqdm.auto import tqdm

Mode = Literal["auto", "bar", "lines", "off"]
MODES = ("auto", "bar", "lines", "off")


def _is_interactive(stream: Any) -> bool:
    """A terminal, or the console streams of a Jupyter kernel (which render a bar although they are not TTYs)."""
    try:
        if stream.isatty():
            return True
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
    return stream in (sys.stdout, sys.stderr) and "ipykernel" in sys.modules


class PrivacyProgress:
    """Iterate like ``iterable`` and show ε spent (recomputed only when a step was taken) and the values given to ``.log``.

    ``mode`` chooses the form:

    - ``"auto"`` (default): a tqdm bar if the output stream (``file``, else ``sys.stderr``) is a terminal or a
      Jupyter kernel's, else ``"lines"``; with ``disable=True`` nothing (tqdm's ``disable=None``, "off when not
      a terminal", gives nothing in logs too).
    - ``"bar"``: always the tqdm bar (as tqdm itself would draw it);
    - ``"lines"``: plain lines, ``"<desc>: step n/total, eps=…, loss=…"``: the first once ``every_seconds``
      (default 30) have passed, then at most one per ``every_seconds`` (with ``done``, a logical batch's line
      waits for its release), and one at the end of the iteration (or at :meth:`close`, if the loop was left
      early). ``step`` is where the iteration stands, like the bar.
    - ``"off"``: nothing is printed, and ε is never computed.

    ``disable=True`` means ``"off"`` whatever ``mode`` says. The other keywords (``desc``, ``total``, ``file``,
    ``leave``, …) go to tqdm; ``clock`` (default :func:`time.monotonic`) is there for tests.

    ``done``: where the iteration stands, in the units of ``len(iterable)`` (the bar's total), read after each
    item; by default the number of items handed out. A loader that hands out several micro-batches per logical
    batch counts logical batches (``engine.progress`` passes the loader's own count), so the bar reads
    ``10/10`` at the end of such an epoch, not one count per micro-batch.

    Call ``.log(loss=...)`` to show more values. Note: a training loss shown here is computed without noise;
    do not publish it as if it were private.
    """

    def __init__(
        self,
        iterable: Iterable,
        epsilon: Callable[[], float],
        steps: Callable[[], int],
        *,
        mode: Mode = "auto",
        every_seconds: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        done: Callable[[], int] | None = None,
        **tqdm_kwargs: Any,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(map(repr, MODES))}, not {mode!r}")
        if not every_seconds >= 0:
            raise ValueError(f"every_seconds must be >= 0, not {every_seconds!r}")
        stream: IO[str] = tqdm_kwargs.get("file") or sys.stderr
        disable = tqdm_kwargs.pop("disable", False)
        if disable is True:
            mode = "off"
        elif mode == "auto":
            if _is_interactive(stream):
                mode = "bar"
            else:
                mode = "off" if disable is None else "lines"
        self.mode: str = mode
        self.every_seconds = float(every_seconds)
        # Always a tqdm object (``.bar``, with its postfix), but a disabled one that draws nothing unless mode is "bar".
        # With ``done`` the bar is moved by hand to that count, so it wraps no iterable (it would count items).
        self._iterable = iterable
        self._done = done
        if done is None:
            self.bar = tqdm(iterable, disable=mode != "bar", **tqdm_kwargs)
        else:
            tqdm_kwargs.setdefault("total", len(iterable) if hasattr(iterable, "__len__") else None)
            self.bar = tqdm(disable=mode != "bar", **tqdm_kwargs)
        self._stream = stream
        self._desc = tqdm_kwargs.get("desc")
        self._epsilon = epsilon
        self._steps = steps
        self._values: dict[str, Any] = {}
        self._seen_steps = -1
        self._eps = 0.0
        self._clock = clock
        self._last_print = clock()
        self._count = 0  # where the iteration stands (items handed out, or ``done``)
        self._printed_count = -1  # the count at the last plain line
        self._printed_steps = steps()  # the engine's steps at the last plain line (or at the start)
        self._closed = False

    def log(self, **values: Any) -> None:
        self._values.update({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in values.items()})

    @property
    def epsilon(self) -> float:
        """ε spent so far (recomputed only if a step was taken since the last call)."""
        if self._steps() != self._seen_steps:
            self._seen_steps = self._steps()
            self._eps = self._epsilon()
        return self._eps

    def _postfix(self) -> dict[str, Any]:
        return {**self._values, "eps": f"{self.epsilon:.3f}"}

    def _refresh(self) -> None:
        self.bar.set_postfix(self._postfix(), refresh=False)

    def _print_line(self) -> None:
        postfix = self._postfix()
        self.bar.set_postfix(postfix, refresh=False)
        total = self.bar.total  # None for an iterable without a length (unless total= was given)
        where = f"step {self._count}" + ("" if total is None else f"/{total}")
        values = ", ".join([where, f"eps={postfix.pop('eps')}", *(f"{k}={v}" for k, v in postfix.items())])
        print(values if not self._desc else f"{self._desc}: {values}", file=self._stream, flush=True)
        self._printed_count, self._printed_steps = self._count, self._seen_steps
        self._last_print = self._clock()

    def _released_since_line(self) -> bool:
        """Counting logical batches (``done``), whose micro-batches share a count: whether a step was released since
        the last line, so that a batch's line waits for its release and its ε counts it. Counting items: always."""
        return self._done is None or self._steps() != self._printed_steps

    def _final_line(self) -> None:
        # also when only ε moved: a line printed after a logical batch's first micro-batch, before its release
        if self.mode == "lines" and (self._printed_count != self._count or self._printed_steps != self._steps()):
            self._print_line()

    def __iter__(self) -> Iterator[Any]:
        for item in self.bar if self._done is None else self._iterable:
            # counted when handed out: a loop left with break still counts its last item
            if self._done is None:
                self._count += 1
            else:
                self._count = self._done()
                self.bar.update(self._count - self.bar.n)
            yield item
            if self.mode == "bar":
                self._refresh()
            elif (self.mode == "lines" and self._count != self._printed_count and self._released_since_line()
                  and self._clock() - self._last_print >= self.every_seconds):
                self._print_line()
        self._final_line()

    def __len__(self) -> int:
        return len(self.bar) if self._done is None else len(self._iterable)  # type: ignore[arg-type]

    def close(self) -> None:
        """Close the bar; in ``"lines"`` mode print the last line if the loop was left before its end."""
        if not self._closed:
            self._closed = True
            self._final_line()
        self.bar.close()
