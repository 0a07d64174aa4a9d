"""Joint threshold calibration on synthetic tiers with known accuracy and confidence."""

import numpy as np
import pytest

from cascade.calibrate import NEVER, CalibrationError, TierRun, choose, frontier, pareto, simulate


def synthetic(n=2000, seed=0):
    """Rules: answer 20%, 99% right. Student: answers all, right with probability = its
    confidence (well calibrated). LLM: 95% right, slow."""
    rng = np.random.default_rng(seed)
    gold = [f"l{i % 10}" for i in range(n)]
    wrong = lambda g: "l" + str((int(g[1:]) + 1) % 10)  # noqa: E731
    rules_hit = rng.random(n) < 0.2
    rules = [g if rng.random() < 0.99 else wrong(g) for g in gold]
    rules = [lab if hit else None for lab, hit in zip(rules, rules_hit)]
    conf = rng.uniform(0.3, 1.0, n)
    student = [g if rng.random() < c else wrong(g) for g, c in zip(gold, conf)]
    llm = [g if rng.random() < 0.95 else wrong(g) for g in gold]
    runs = [TierRun("rules", rules, np.where(rules_hit, 0.99, 0.0), 0.01),
            TierRun("student", student, conf, 1.0),
            TierRun("llm", llm, np.ones(n), 50.0, is_llm=True)]
    return runs, gold


def test_simulation_counts_costs_and_shares_exactly():
    runs = [TierRun("a", ["x", None, "y"], np.array([0.9, 0.0, 0.4]), 1.0),
            TierRun("b", ["x", "x", "x"], np.array([1.0, 1.0, 1.0]), 10.0, is_llm=True)]
    p = simulate(runs, ["x", "x", "x"], (0.5, 0.0))
    assert p.shares == (1 / 3, 2 / 3) and p.llm_share == pytest.approx(2 / 3)
    assert p.accuracy == 1.0 and p.cost_ms == pytest.approx(1.0 + 20.0 / 3)
    never = simulate(runs, ["x", "x", "x"], (NEVER, 0.0))
    assert never.llm_share == 1.0


def test_chosen_thresholds_meet_the_target_at_lower_cost_than_the_llm_alone():
    runs, gold = synthetic()
    points = frontier(runs, gold)
    chosen = choose(points, target_accuracy=0.93)
    assert chosen.accuracy >= 0.93
    assert chosen.llm_share < 0.9 and chosen.cost_ms < 50.0
    # refit-free check: simulating the chosen thresholds gives the reported figures
    again = simulate(runs, gold, chosen.thresholds)
    assert again.accuracy == chosen.accuracy and again.cost_ms == chosen.cost_ms
    # no other grid point reaching the target is cheaper
    assert all(p.cost_ms >= chosen.cost_ms for p in points if p.accuracy >= 0.93)


def test_search_covers_the_joint_grid():
    """Every pair of (rules, student) candidate thresholds is simulated: a tier's best threshold
    depends on the others', so none is fixed first."""
    runs, gold = synthetic()
    points = frontier(runs, gold, candidates=8)
    rules_grid = {p.thresholds[0] for p in points}
    student_grid = {p.thresholds[1] for p in points}
    assert len(points) == len(rules_grid) * len(student_grid)


def test_max_llm_share_picks_the_most_accurate_within_it():
    runs, gold = synthetic()
    points = frontier(runs, gold)
    chosen = choose(points, max_llm_share=0.3)
    assert chosen.llm_share <= 0.3
    assert chosen.accuracy == max(p.accuracy for p in points if p.llm_share <= 0.3)


def test_infeasible_targets_say_what_is_reachable():
    runs, gold = synthetic()
    points = frontier(runs, gold)
    with pytest.raises(CalibrationError, match="not reachable.*best combination reaches"):
        choose(points, target_accuracy=0.999)
    with pytest.raises(CalibrationError, match="exactly one"):
        choose(points)


def test_pareto_front_is_monotone():
    runs, gold = synthetic()
    front = pareto(frontier(runs, gold))
    costs = [p.cost_ms for p in front]
    accs = [p.accuracy for p in front]
    assert costs == sorted(costs) and accs == sorted(accs) and len(front) >= 3


def test_calibrate_command_writes_thresholds_frontier_and_plot(clinc_dir, tmp_path, capsys):
    """The real command on CLINC150 val with the shipped rules pack and a one-label fallback:
    the rules tier's threshold is chosen, written back, and the frontier saved and plotted."""
    from cascade.app.cli import main
    from cascade.config import load_config
    from tests.conftest import rules_cascade_config

    config = rules_cascade_config(tmp_path, clinc_dir, threshold=0.0)
    assert main(["calibrate", "--config", str(config), "--data", str(clinc_dir), "--target-accuracy", "0.05",
                 "--limit", "600"]) == 0
    out = capsys.readouterr().out
    assert "<- chosen" in out and "wrote the thresholds" in out
    assert (tmp_path / "cascade.frontier.png").read_bytes()[:4] == b"\x89PNG"
    report = __import__("json").loads((tmp_path / "cascade.frontier.json").read_text())
    assert report["chosen"]["accuracy"] >= 0.05 and report["n"] == 600
    assert load_config(config).tiers[0].threshold == pytest.approx(report["chosen"]["thresholds"][0])
    # an unreachable target fails with the reachable figure, and leaves the config alone
    before = config.read_text()
    assert main(["calibrate", "--config", str(config), "--data", str(clinc_dir), "--target-accuracy", "0.99",
                 "--limit", "600"]) == 2
    assert "not reachable" in capsys.readouterr().err and config.read_text() == before


def test_a_tier_calibrated_off_stays_off_after_the_config_round_trip(tmp_path):
    """NEVER (> 1) is written as is: a rules tier, whose confidence can be 1.0, must not answer."""
    from cascade.config import dump_config, load_config, parse_config
    from cascade.router import Cascade
    from cascade.types import Prediction

    config = parse_config({"task": {"name": "t"}, "tiers": [
        {"name": "a", "kind": "majority", "threshold": NEVER}, {"name": "b", "kind": "majority"}]}, "t")
    dump_config(config, tmp_path / "c.toml")
    threshold = load_config(tmp_path / "c.toml").tiers[0].threshold
    assert threshold > 1.0

    class Sure:
        name, cost = "a", 0.0

        def predict_batch(self, texts):
            return [Prediction("x", 1.0, self.name) for _ in texts]

    class Last(Sure):
        name = "b"

    assert Cascade([Sure(), Last()], [threshold, 0.0]).predict("hi").tier == "b"


def test_a_confidence_bound_buys_a_margin_over_the_bare_target():
    from cascade.calibrate import confidence_of

    runs, gold = synthetic()
    points = frontier(runs, gold)
    bare = choose(points, target_accuracy=0.93)
    sure = choose(points, target_accuracy=0.93, confident=lambda p: confidence_of(runs, gold, p, 0.93) >= 0.95)
    assert confidence_of(runs, gold, bare, 0.93) < 0.95 <= confidence_of(runs, gold, sure, 0.93)
    assert sure.accuracy > bare.accuracy and sure.cost_ms > bare.cost_ms
    # paired with the last tier: the LLM alone (NEVER everywhere) is as good as itself, with certainty
    alone = simulate(runs, gold, (NEVER, NEVER, 0.0))
    assert confidence_of(runs, gold, alone, 0.0, against_last=True) == 1.0
    with pytest.raises(CalibrationError, match="asked confidence"):
        choose(points, target_accuracy=0.93, confident=lambda p: False)


def oos_synthetic(n=3000, seed=1):
    """The CLINC150 pattern: the student's out-of-scope answers are right though unsure (low top
    probability), and the large model is worse than the student on exactly those items."""
    rng = np.random.default_rng(seed)
    gold = ["oos" if i % 5 == 0 else f"l{i % 7}" for i in range(n)]
    conf = np.where([g == "oos" for g in gold], rng.uniform(0.2, 0.5, n), rng.uniform(0.3, 1.0, n))
    student = [g if (g == "oos" or rng.random() < c) else "l9" for g, c in zip(gold, conf)]
    llm = [("l1" if rng.random() < 0.4 else g) if g == "oos" else (g if rng.random() < 0.97 else "l9") for g in gold]
    return [TierRun("student", student, conf, 1.0), TierRun("llm", llm, np.ones(n), 50.0, is_llm=True)], gold


def test_an_out_of_scope_threshold_is_searched_jointly_and_pays():
    from cascade.calibrate import confidence_of

    runs, gold = oos_synthetic()
    plain = choose(frontier(runs, gold), target_accuracy=0.89)
    points = frontier(runs, gold, label="oos")
    with_label = choose(points, target_accuracy=0.89)
    assert plain.label_thresholds == ()
    # the oos answers (confidence <= 0.5) stand under their own threshold below the tier's
    assert with_label.label_thresholds[0] is not None and with_label.label_thresholds[0] < with_label.thresholds[0]
    assert with_label.llm_share < plain.llm_share - 0.1 and with_label.accuracy >= 0.89
    # the reported figures are what simulating the chosen thresholds gives
    is_oos = [np.array([lab == "oos" for lab in r.labels]) for r in runs]
    again = simulate(runs, gold, with_label.thresholds, label_thresholds=with_label.label_thresholds, is_label=is_oos)
    assert again.accuracy == with_label.accuracy and again.llm_share == with_label.llm_share
    assert confidence_of(runs, gold, with_label, 0.89, label="oos") > 0.5
    # a tier that never gives the label gets no extra grid
    assert len(frontier(runs, gold, label="no-such-label")) == len(frontier(runs, gold))


def test_calibrate_writes_the_out_of_scope_threshold_into_the_config(tmp_path, make_dataset):
    """Rules answer "hello" wrongly and "weather" (out of scope) rightly, both at confidence 0.3;
    the fallback says greet. Only an oos threshold of 0.3 with the rules' own threshold off is
    right everywhere, and that is what lands in the config."""
    from cascade.calibrate import run_calibration
    from cascade.config import load_config

    rows = [(f"hello {i}", "greet") for i in range(30)] + [(f"weather {i}", "oos") for i in range(30)]
    data = make_dataset({"train": rows + [("bye", "bye")], "val": rows, "test": rows}, oos_label="oos")
    (tmp_path / "pack.toml").write_text("[[rule]]\nlabel = 'bye'\npattern = 'hello'\nconfidence = 0.3\n"
                                        "[[rule]]\nlabel = 'oos'\npattern = 'weather'\nconfidence = 0.3\n")
    (tmp_path / "c.toml").write_text(
        "[task]\nname='t'\n[[tiers]]\nname='rules'\nkind='rules'\npath='pack.toml'\n"
        "[[tiers]]\nname='last'\nkind='majority'\npath='ds'\noptions={label='greet'}\n")
    report = run_calibration(tmp_path / "c.toml", data, target_accuracy=1.0)
    spec = load_config(tmp_path / "c.toml").tiers[0]
    assert report["label_threshold_label"] == "oos" and "rules:oos" in report["table"]
    assert spec.threshold > 1.0 and spec.label_thresholds == {"oos": pytest.approx(0.3)}
    assert report["chosen"]["llm_share"] == 0.0 and report["chosen"]["accuracy"] == 1.0
    # without it, 1.0 is out of reach, and a rerun that turns it off clears the stored one
    with pytest.raises(CalibrationError, match="not reachable"):
        run_calibration(tmp_path / "c.toml", data, target_accuracy=1.0, oos_threshold=False)
    run_calibration(tmp_path / "c.toml", data, max_llm_share=1.0, oos_threshold=False)
    assert load_config(tmp_path / "c.toml").tiers[0].label_thresholds == {}


def test_traffic_weights_make_out_of_scope_the_asked_share():
    from cascade.calibrate import confidence_of, traffic_weights

    runs, gold = oos_synthetic()  # 20% out of scope as sampled
    w = traffic_weights(gold, "oos", 0.5)
    is_oos = np.array([g == "oos" for g in gold])
    assert w.mean() == pytest.approx(1.0) and w[is_oos].sum() / w.sum() == pytest.approx(0.5)
    assert traffic_weights(gold, None, 0.5) is None and traffic_weights(gold, "oos", None) is None
    assert traffic_weights(["a", "b"], "oos", 0.5) is None  # no such item: nothing to weight
    with pytest.raises(CalibrationError, match="oos-share"):
        traffic_weights(gold, "oos", 1.0)
    # every figure is the mean over the two strata at 50/50, computed here by hand
    thr = (0.6, 0.0)
    p = simulate(runs, gold, thr, weights=w)
    per = [simulate([TierRun(r.name, [r.labels[i] for i in idx], r.confidences[idx], r.mean_ms, r.is_llm)
                     for r in runs], [gold[i] for i in idx], thr)
           for idx in (np.flatnonzero(is_oos), np.flatnonzero(~is_oos))]
    assert p.accuracy == pytest.approx((per[0].accuracy + per[1].accuracy) / 2)
    assert p.llm_share == pytest.approx((per[0].llm_share + per[1].llm_share) / 2)
    assert p.cost_ms == pytest.approx((per[0].cost_ms + per[1].cost_ms) / 2)
    # more out-of-scope traffic (where the large model is worse) needs less of the large model
    pick = lambda w: choose(frontier(runs, gold, label="oos", weights=w), target_accuracy=0.89)  # noqa: E731
    assert pick(traffic_weights(gold, "oos", 0.4)).llm_share < pick(None).llm_share
    # weights at the sample's own out-of-scope share change nothing, the bound included
    point = pick(None)
    assert simulate(runs, gold, point.thresholds, weights=traffic_weights(gold, "oos", 0.2)).accuracy == \
        pytest.approx(simulate(runs, gold, point.thresholds).accuracy)
    assert confidence_of(runs, gold, point, 0.88, weights=traffic_weights(gold, "oos", 0.2)) == \
        pytest.approx(confidence_of(runs, gold, point, 0.88))
