import pytest

from cascade import Cascade, CascadeError, Prediction, Tier


def test_each_tier_sees_only_open_items_as_one_batch(table_tier):
    rules = table_tier("rules", {"a": ("A", 1.0), "b": ("B", 0.4)})
    student = table_tier("student", {"b": ("B", 0.9), "c": ("C", 0.5), "d": ("D", 0.95)})
    llm = table_tier("llm", {t: ("L", 0.3) for t in "abcd"})
    cascade = Cascade([rules, student, llm], [0.5, 0.8, 0.0])
    preds = cascade.predict_batch(["a", "b", "c", "d"])

    assert [p.label for p in preds] == ["A", "B", "L", "D"]
    assert [p.tier for p in preds] == ["rules", "student", "llm", "student"]
    assert rules.batches == [["a", "b", "c", "d"]]
    assert student.batches == [["b", "c", "d"]]  # "a" answered by rules
    assert llm.batches == [["c"]]  # the last tier answers even at confidence 0.3


def test_threshold_is_inclusive_and_last_threshold_ignored(table_tier):
    first = table_tier("first", {"x": ("X", 0.7)})
    last = table_tier("last", {"x": ("Y", 0.01)})
    assert Cascade([first, last], [0.7, 0.99]).predict("x").tier == "first"
    assert Cascade([first, last], [0.71, 0.99]).predict("x").label == "Y"


def test_no_tier_called_when_nothing_is_open(table_tier):
    first = table_tier("first", {"x": ("X", 1.0)})
    last = table_tier("last", {})
    Cascade([first, last], [0.5, 0.0]).predict_batch(["x", "x"])
    assert last.batches == []


def test_failing_middle_tier_counts_as_abstaining(table_tier):
    broken = table_tier("broken", {}, fail=True)
    last = table_tier("last", {"x": ("X", 0.6)})
    cascade = Cascade([broken, last], [0.5, 0.0])
    pred = cascade.predict("x")
    assert pred.label == "X" and not pred.degraded
    assert cascade.counters["broken"].errors == 1


def test_failing_last_tier_returns_best_earlier_answer_degraded(table_tier):
    first = table_tier("first", {"x": ("X", 0.3), "y": ("Y", 0.2)})
    second = table_tier("second", {"x": ("X2", 0.4)})
    down = table_tier("llm", {}, fail=True)
    preds = Cascade([first, second, down], [0.9, 0.9, 0.0]).predict_batch(["x", "y"])
    assert [(p.label, p.tier, p.degraded) for p in preds] == [("X2", "second", True), ("Y", "first", True)]


def test_failing_last_tier_with_nothing_earlier_raises(table_tier):
    first = table_tier("first", {})
    down = table_tier("llm", {}, fail=True)
    with pytest.raises(CascadeError, match="llm"):
        Cascade([first, down], [0.5, 0.0]).predict("z")


def test_explain_records_every_tier_on_the_way(table_tier):
    first = table_tier("first", {"x": ("X", 0.3)})
    mid = table_tier("mid", {})
    last = table_tier("last", {"x": ("Z", 0.8)})
    pred = Cascade([first, mid, last], [0.5, 0.5, 0.0]).predict("x", explain=True)
    assert [(p.tier, p.label) for p in pred.trail] == [("first", "X"), ("last", "Z")]
    assert pred.to_dict()["trail"][0]["tier"] == "first"


def test_counters_and_latency(table_tier):
    first = table_tier("first", {"a": ("A", 0.9), "b": ("B", 0.1)})
    last = table_tier("last", {"b": ("B", 0.5), "c": ("C", 0.5)})
    cascade = Cascade([first, last], [0.5, 0.0])
    preds = cascade.predict_batch(["a", "b", "c"])
    c1, c2 = cascade.counters["first"], cascade.counters["last"]
    assert (c1.seen, c1.answered, c1.below_threshold, c1.abstained) == (3, 1, 1, 1)
    assert (c2.seen, c2.answered) == (2, 2)
    assert all(p.latency_ms >= 0 for p in preds)


def test_construction_errors(table_tier):
    t = table_tier("t", {})
    with pytest.raises(ValueError, match="thresholds"):
        Cascade([t], [0.1, 0.2])
    with pytest.raises(ValueError, match="unique"):
        Cascade([t, table_tier("t", {})], [0.1, 0.2])
    with pytest.raises(ValueError, match="at least one"):
        Cascade([], [])


def test_tier_protocol_is_structural(table_tier):
    assert isinstance(table_tier("t", {}), Tier)
    assert Prediction("a", 0.5, "t").to_dict() == {
        "label": "a", "confidence": 0.5, "tier": "t", "latency_ms": 0.0, "degraded": False,
    }


def test_a_label_threshold_replaces_the_tier_threshold_for_that_answer(table_tier):
    """Out-of-scope answers at 0.3 stand under a 0.2 label threshold; intents at 0.3 still
    escalate under the tier's 0.5."""
    student = table_tier("student", {"a": ("oos", 0.3), "b": ("B", 0.3), "c": ("oos", 0.1)})
    llm = table_tier("llm", {t: ("L", 0.9) for t in "abc"})
    cascade = Cascade([student, llm], [0.5, 0.0], label_thresholds=[{"oos": 0.2}, {}])
    assert [(p.label, p.tier) for p in cascade.predict_batch(["a", "b", "c"])] == [
        ("oos", "student"), ("L", "llm"), ("L", "llm")]
    assert llm.batches == [["b", "c"]]
    with pytest.raises(ValueError, match="label-threshold maps"):
        Cascade([student, llm], [0.5, 0.0], label_thresholds=[{}])
