"""Progress of long loops: a tqdm bar on a terminal, plain log lines anywhere else (CI logs, pipes, files).

    with progress(total=32460, desc="decode omniglot 28px", unit="img") as bar:
        for png in pngs:
            ...
            bar.update()

When stderr is a terminal this is a tqdm bar. Otherwise it is a :class:`LogProgress`, which logs one INFO line
(count, rate, ETA) through :mod:`logging` every ``every`` seconds, and one more when it closes, so a log shows
that a long step is alive and how long it will take. ``$METALAB_PROGRESS`` (``bar``, ``plain`` or ``off``)
overrides the choice.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, Literal, Protocol

from tqdm import tqdm

Mode = Literal["auto", "bar", "plain", "off"]
MODES = ("auto", "bar", "plain", "off")
ENV = "METALAB_PROGRESS"

log = logging.getLogger(__name__)


class ProgressBar(Protocol):
    """What both kinds of progress offer: the part of tqdm's interface that metalab uses."""

    def update(self, n: float = 1) -> Any: ...

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None: ...

    def close(self) -> None: ...

    def __enter__(self) -> ProgressBar: ...

    def __exit__(self, *exc: object) -> Any: ...


def _scaled(value: float, scale: bool) -> str:
    """``1234567`` -> ``1.2M`` when ``scale``, else the integer (or one decimal for fractional values)."""
    if scale:
        for prefix in ("", "k", "M", "G", "T"):
            if abs(value) < 1000 or prefix == "T":
                return f"{value:.0f}{prefix}" if prefix == "" else f"{value:.1f}{prefix}"
            value /= 1000
    value = float(value)
    return f"{value:.0f}" if value.is_integer() or abs(value) >= 100 else f"{value:.3g}"


def _duration(seconds: float) -> str:
    """``75.2`` -> ``1m15s``; ``3.4`` -> ``3.4s``."""
    if seconds < 10:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class LogProgress:
    """Progress as plain log lines: one every ``every`` seconds, and a last one on :meth:`close`.

    A line reads ``decode omniglot 28px: 12000/32460 img (37%), 1480 img/s, ETA 14s``; the last one
    ``decode omniglot 28px: 32460/32460 img in 21.9s (1480 img/s)``. ``clock`` is injectable for tests.
    """

    def __init__(
        self,
        total: float | None = None,
        desc: str = "",
        unit: str = "it",
        *,
        every: float = 5.0,
        unit_scale: bool = False,
        logger: logging.Logger | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = total
        self.desc = desc
        self.unit = unit
        self.every = every
        self.unit_scale = unit_scale
        self.n: float = 0
        self.postfix = ""
        self._log = logger or log
        self._clock = clock
        self._start = clock()
        self._last = self._start
        self._closed = False

    def update(self, n: float = 1) -> None:
        """Count ``n`` more units; log a line if ``every`` seconds passed since the last one."""
        self.n += n
        now = self._clock()
        if now - self._last >= self.every:
            self._last = now
            self._log.info("%s", self.line(now))

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        """Text appended to each line (e.g. the current loss), as tqdm's postfix."""
        self.postfix = s

    def set_postfix(self, **values: Any) -> None:
        """``key=value`` pairs appended to each line; floats with 4 significant digits."""
        self.postfix = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()
        )

    def _count(self) -> str:
        done = _scaled(self.n, self.unit_scale)
        if self.total:
            return f"{done}/{_scaled(self.total, self.unit_scale)} {self.unit}"
        return f"{done} {self.unit}"

    def line(self, now: float | None = None) -> str:
        """The progress line as of ``now`` (default: the clock's time)."""
        elapsed = (self._clock() if now is None else now) - self._start
        rate = self.n / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.desc}: {self._count()}" if self.desc else self._count()]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        parts.append(f"{_scaled(rate, self.unit_scale)} {self.unit}/s")
        if self.total and rate > 0 and self.n < self.total:
            parts.append(f"ETA {_duration((self.total - self.n) / rate)}")
        if self.postfix:
            parts.append(self.postfix)
        return ", ".join(parts)

    def close(self) -> None:
        """Log the last line (count, time taken, mean rate) once."""
        if self._closed:
            return
        self._closed = True
        elapsed = self._clock() - self._start
        rate = self.n / elapsed if elapsed > 0 else 0.0
        head = f"{self.desc}: {self._count()}" if self.desc else self._count()
        tail = f", {self.postfix}" if self.postfix else ""
        self._log.info(
            "%s in %s (%s %s/s)%s", head, _duration(elapsed), _scaled(rate, self.unit_scale), self.unit, tail
        )

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()


def _mode(mode: Mode) -> Mode:
    """``auto`` resolved: ``$METALAB_PROGRESS`` if set, else ``bar`` on a terminal and ``plain`` elsewhere."""
    if mode != "auto":
        return mode
    chosen = os.environ.get(ENV, "").strip().lower()
    if chosen in ("bar", "plain", "off"):
        return chosen  # type: ignore[return-value]
    stream = sys.stderr
    return "bar" if stream is not None and hasattr(stream, "isatty") and stream.isatty() else "plain"


def progress(
    total: float | None = None,
    desc: str = "",
    unit: str = "it",
    *,
    every: float = 5.0,
    unit_scale: bool = False,
    mode: Mode = "auto",
    logger: logging.Logger | None = None,
) -> ProgressBar:
    """A progress bar for a loop of ``total`` steps (None: unknown), used as a context manager or closed by hand.

    ``mode``: ``auto`` (a tqdm bar when stderr is a terminal, else :class:`LogProgress` lines every ``every``
    seconds through ``logger``, default ``metalab.progress``; ``$METALAB_PROGRESS`` overrides), ``bar``,
    ``plain`` or ``off`` (nothing shown). ``unit_scale`` writes large counts as 1.2k / 3.4M (e.g. bytes).
    """
    if mode not in MODES:
        raise ValueError(f"progress mode must be one of {', '.join(MODES)}, got {mode!r}")
    chosen = _mode(mode)
    if chosen == "plain":
        return LogProgress(total, desc, unit, every=every, unit_scale=unit_scale, logger=logger)
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit_scale, disable=chosen == "off")
