"""Progress output: a bar only on a terminal; plain lines or JSON lines, never carriage returns, elsewhere."""

from __future__ import annotations

import io
import json
import math

import pytest

from hetero_ps.observe.progress import Progress, format_eta


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


class Terminal(io.StringIO):
    def isatty(self):
        return True


def drive(p: Progress, clock: FakeClock, n: int, dt: float = 1.0) -> None:
    for i in range(n):
        clock.t += dt
        p.update(i, i // 4, 2.0 / (i + 1), 500.0 + i, 64)


def test_plain_lines_without_a_terminal_have_no_carriage_returns():
    out, clock = io.StringIO(), FakeClock()
    p = Progress(8, "master", stream=out, interval_s=0, epochs=2, clock=clock)
    assert not p.uses_bar
    drive(p, clock, 8)
    p.close()
    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert len(lines) == 8
    assert " master progress step 3/8 (37.5 %) epoch 1/2 loss 0.6667 502 samples/s batch 64" in lines[2]
    # After 3 steps of 1 s each the rate is 1 step/s over the window: 5 steps left → 5 s.
    assert lines[2].endswith("ETA 0:00:05")
    assert "step 8/8 (100.0 %) epoch 2/2" in lines[-1] and lines[-1].endswith("ETA 0:00:00")


def test_lines_are_periodic_and_close_writes_the_last_state():
    out, clock = io.StringIO(), FakeClock()
    p = Progress(None, "worker-2", stream=out, interval_s=10, clock=clock)
    drive(p, clock, 25)  # updates at t=101..125: lines at 101, 111, 121
    assert [ln.split(" progress ")[1].split()[1] for ln in out.getvalue().splitlines()] == ["1", "11", "21"]
    p.close()
    last = out.getvalue().splitlines()[-1]
    assert "worker-2 progress step 25 epoch 7" in last and "ETA" not in last and "%" not in last
    p.close()  # idempotent: nothing more
    assert len(out.getvalue().splitlines()) == 4


def test_final_step_is_always_written():
    out, clock = io.StringIO(), FakeClock()
    p = Progress(5, "master", stream=out, interval_s=3600, clock=clock)
    drive(p, clock, 5)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "step 5/5" in lines[-1]
    p.close()
    assert len(out.getvalue().splitlines()) == 2


def test_json_mode_emits_one_object_per_line_even_on_a_terminal():
    out, clock = Terminal(), FakeClock()
    p = Progress(6, "master", fmt="json", stream=out, interval_s=0, clock=clock)
    assert not p.uses_bar
    drive(p, clock, 5)
    p.update(5, 1, math.nan, None, 32)
    p.close()
    assert "\r" not in out.getvalue()
    recs = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(recs) == 6
    assert all(r["event"] == "progress" and r["role"] == "master" and r["total_steps"] == 6 for r in recs)
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    assert recs[0]["eta_s"] is None and recs[2]["eta_s"] == pytest.approx(3.0)
    assert recs[-1]["loss"] is None and recs[-1]["samples_per_s"] is None and recs[-1]["batch"] == 32


def test_a_terminal_gets_a_bar():
    out, clock = Terminal(), FakeClock()
    p = Progress(4, "master", stream=out, epochs=1, clock=clock)
    assert p.uses_bar
    with p.redirect_logging():
        drive(p, clock, 4)
    p.close()
    text = out.getvalue()
    assert "\r" in text and "4/4" in text and "loss" in text


def test_bad_arguments():
    with pytest.raises(ValueError, match="format"):
        Progress(3, "m", fmt="xml")
    with pytest.raises(ValueError, match="interval"):
        Progress(3, "m", interval_s=-1)


def test_format_eta():
    assert format_eta(3725.2) == "1:02:05"
    assert format_eta(None) == "?"
    assert format_eta(-3) == "0:00:00"
