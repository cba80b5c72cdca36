"""The one funnel type: counted per drop reason, recorded as run-stats metrics, read back, and
printed the same way everywhere (pure: no Spark)."""

from __future__ import annotations

from etl.funnel import Funnel, FunnelStep

COUNTS = {None: 5, "duplicate": 3, "english": 0, "custom": 1, "eval-leak": 2}
ORDER = ["eval-leak", "duplicate", "near-duplicate", "english", "below-threshold"]


def test_counts_follow_the_order_then_other_reasons_and_skip_empty_ones():
    got = Funnel.from_counts(COUNTS, ORDER)
    assert got == Funnel(11, (FunnelStep("eval-leak", 2, 9), FunnelStep("duplicate", 3, 6),
                              FunnelStep("custom", 1, 5)), 5)
    assert got.rows() == [("pool", 0, 11), ("eval-leak", 2, 9), ("duplicate", 3, 6),
                          ("custom", 1, 5), ("kept", 0, 5)]


def test_metrics_round_trip_and_other_metrics_are_ignored():
    funnel = Funnel.from_counts(COUNTS, ORDER)
    metrics = funnel.metrics()
    assert metrics == {"pool": 11, "dropped:eval-leak": 2, "dropped:duplicate": 3,
                       "dropped:custom": 1, "kept": 5}
    assert list(metrics) == ["pool", "dropped:eval-leak", "dropped:duplicate", "dropped:custom",
                             "kept"]
    assert Funnel.from_metrics({**metrics, "threshold_N[keep_fraction]": 7}) == funnel


def test_the_printed_text_is_fixed(capsys):
    funnel = Funnel.from_counts(COUNTS, ORDER)
    expected = ["pool                                11",
                "  - eval-leak                        2   -> 9",
                "  - duplicate                        3   -> 6",
                "  - custom                           1   -> 5",
                "kept                                 5"]
    assert funnel.lines() == expected
    funnel.print()
    assert capsys.readouterr().out == "\n".join(expected) + "\n"


def test_an_empty_selection_has_an_empty_funnel():
    funnel = Funnel.from_counts({}, ORDER)
    assert funnel == Funnel(0, (), 0)
    assert Funnel.from_metrics(funnel.metrics()) == funnel
