"""The live progress line: rows done of rows to do, rate, ETA; printed only when rows move."""

from etl.progress import Progress


def test_progress_lines_show_done_rate_and_eta():
    now, lines = [100.0], []
    p = Progress("score m -> silver_scores", 1000, clock=lambda: now[0], out=lines.append)
    now[0] = 110.0
    p.update(250)
    p.update(250)  # nothing new: no line
    now[0] = 120.0
    p.update(500)
    now[0] = 4120.0
    p.update(1000)
    assert lines == [
        "score m -> silver_scores: 250/1000 rows (25%), 25.0 rows/s, ETA 0:30",
        "score m -> silver_scores: 500/1000 rows (50%), 25.0 rows/s, ETA 0:20",
        "score m -> silver_scores: 1000/1000 rows (100%), 0.2 rows/s, ETA 0:00",
    ]


def test_progress_of_nothing_to_do_and_long_etas():
    now, lines = [0.0], []
    assert "ETA -" in Progress("x", 10, clock=lambda: now[0]).line(0)
    p = Progress("x", 100_000, clock=lambda: now[0], out=lines.append)
    now[0] = 10.0
    p.update(1)
    assert lines == ["x: 1/100000 rows (0%), 0.1 rows/s, ETA 277:46:30"]
    assert Progress("y", 0).line(0).startswith("y: 0/0 rows (100%)")
