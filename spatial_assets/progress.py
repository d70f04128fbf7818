"""Rate-limited progress lines for long loops (done / total, elapsed, time left), for any ``log`` callable.

Pure helper: no dagster import. The assets pass ``log=context.log.info`` to the science functions, which hand it to
:class:`Progress`; notebooks pass ``print`` or None (silent).
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["Progress", "format_seconds"]


def format_seconds(seconds: float) -> str:
    """Short human duration: ``"8 s"``, ``"2 min 05 s"``, ``"1 h 03 min"``.

    Parameters
    ----------
    seconds : float
        Duration in seconds (negative values count as 0).

    Returns
    -------
    str
        The duration, rounded to whole seconds (below an hour) or minutes.
    """
    s = max(0, round(float(seconds)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {(s % 3600) // 60:02d} min"


class Progress:
    """Progress of a loop of ``total`` units, logged at most every ``min_interval`` seconds and once at the end.

    Each line reads ``"label: done/total (pct%), elapsed 12 s, ~30 s left"``; the time left is extrapolated from the
    rate since the object was created (units done before ``start`` do not count towards the rate). The last line
    (``done >= total`` or :meth:`close`) reads ``"label: done/total (pct%) in 42 s"``. Nothing is logged when
    ``log`` is None.

    Parameters
    ----------
    total : int
        Units in all (steps, levels, epochs, tiles...); at least 0.
    label : str
        Prefix of every line.
    log : callable, optional
        Receives the lines (e.g. ``print`` or a Dagster ``context.log.info``); None = silent.
    min_interval : float, default 10.0
        Seconds between two lines at least (the final line is always logged).
    start : int, default 0
        Units already done (e.g. a resumed training step).
    clock : callable, default time.monotonic
        Returns the time in seconds (injectable for tests).

    Raises
    ------
    ValueError
        If ``total`` or ``start`` is negative, ``start > total`` or ``min_interval`` is negative.

    Examples
    --------
    >>> lines = []
    >>> p = Progress(4, "demo", lines.append, min_interval=0.0)
    >>> for _ in range(4):
    ...     p.update()
    >>> lines[-1].startswith("demo: 4/4 (100%) in")
    True
    """

    def __init__(
        self,
        total: int,
        label: str,
        log: Callable[[str], None] | None = None,
        min_interval: float = 10.0,
        *,
        start: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if total < 0 or start < 0 or start > total:
            raise ValueError(f"Progress needs 0 <= start <= total, found start={start}, total={total}")
        if min_interval < 0:
            raise ValueError(f"Progress min_interval must be >= 0, found {min_interval}")
        self.total, self.label, self.log, self.min_interval = int(total), str(label), log, float(min_interval)
        self.clock = clock
        self.start = self.done = int(start)
        self.t0 = self._last = clock()
        self.closed = False
        self.lines = 0

    def _pct(self) -> str:
        return f"{100.0 * self.done / self.total:.0f}%" if self.total else "100%"

    def eta(self) -> float | None:
        """Seconds left, extrapolated from the rate since creation; None before any unit is done.

        Returns
        -------
        float or None
            Estimated seconds to ``total``.
        """
        n = self.done - self.start
        if n <= 0:
            return None
        return (self.clock() - self.t0) / n * max(self.total - self.done, 0)

    def _emit(self, line: str) -> None:
        self._last = self.clock()
        self.lines += 1
        if self.log is not None:
            self.log(line)

    def update(self, n: int = 1) -> None:
        """Count ``n`` more units done and log a line if ``min_interval`` has passed (or the loop is finished).

        Parameters
        ----------
        n : int, default 1
            Units just done.
        """
        self.set(self.done + int(n))

    def set(self, done: int) -> None:
        """Set the units done (clipped to ``total``) and log as :meth:`update` does.

        Parameters
        ----------
        done : int
            Units done so far.
        """
        if self.closed:
            return
        self.done = min(int(done), self.total)
        if self.done >= self.total:
            self.close()
            return
        now = self.clock()
        if now - self._last >= self.min_interval:
            eta = self.eta()
            left = "" if eta is None else f", ~{format_seconds(eta)} left"
            self._emit(
                f"{self.label}: {self.done}/{self.total} ({self._pct()}), elapsed {format_seconds(now - self.t0)}{left}"
            )

    def close(self, note: str = "") -> None:
        """Log the final line once (also when the loop stopped early, e.g. by a stop rule).

        Parameters
        ----------
        note : str, optional
            Appended to the line (e.g. why the loop stopped early).
        """
        if self.closed:
            return
        self.closed = True
        extra = f" ({note})" if note else ""
        self._emit(
            f"{self.label}: {self.done}/{self.total} ({self._pct()}) in {format_seconds(self.clock() - self.t0)}{extra}"
        )
