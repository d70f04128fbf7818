"""The rate-limited progress helper: interval, final line, time left, silence without a log."""

from __future__ import annotations

import pytest

from spatial_assets.progress import Progress, format_seconds


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_lines_are_rate_limited_and_final_line_always_logged():
    clock, lines = Clock(), []
    p = Progress(100, "tiles", lines.append, min_interval=10.0, clock=clock)
    for _ in range(99):
        clock.t += 1.0  # 1 s per unit: a line every 10 units at most
        p.update()
    assert lines == [
        f"tiles: {k}/100 ({k}%), elapsed {format_seconds(k)}, ~{format_seconds(100 - k)} left"
        for k in range(10, 100, 10)
    ]
    clock.t += 1.0
    p.update()
    assert lines[-1] == "tiles: 100/100 (100%) in 1 min 40 s"
    p.update()
    p.close()
    assert len(lines) == 10  # closed: nothing more


def test_eta_uses_rate_since_start_of_resumed_loop_and_early_close_note():
    clock, lines = Clock(), []
    p = Progress(1000, "steps", lines.append, min_interval=0.0, start=600, clock=clock)
    assert p.eta() is None
    clock.t += 40.0
    p.set(700)  # 100 units in 40 s -> 300 left = 120 s
    assert p.eta() == pytest.approx(120.0)
    assert lines == ["steps: 700/1000 (70%), elapsed 40 s, ~2 min 00 s left"]
    clock.t += 5.0
    p.close("early_stop")
    assert lines[-1] == "steps: 700/1000 (70%) in 45 s (early_stop)"


def test_none_log_is_silent_and_bad_arguments_named(capsys):
    p = Progress(3, "quiet", None, min_interval=0.0)
    for _ in range(3):
        p.update()
    assert p.closed and p.lines == 3  # 2 progress lines + the final one were due, none printed
    assert capsys.readouterr() == ("", "")
    with pytest.raises(ValueError, match=r"0 <= start <= total, found start=5, total=3"):
        Progress(3, "x", start=5)
    with pytest.raises(ValueError, match="min_interval must be >= 0"):
        Progress(3, "x", min_interval=-1)


def test_zero_total_and_format_seconds():
    lines = []
    Progress(0, "empty", lines.append).close()
    assert lines[0].startswith("empty: 0/0 (100%) in ")
    assert [format_seconds(s) for s in (0.4, 59.6, 61, 3599, 3600 + 125)] == [
        "0 s",
        "1 min 00 s",
        "1 min 01 s",
        "59 min 59 s",
        "1 h 02 min",
    ]
