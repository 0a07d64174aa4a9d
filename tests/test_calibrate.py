"""Joint threshold calibration on synthetic tiers with known accuracy and confidence."""

import numpy as np
import pytest

from cascade.thresholds import NEVER, CalibrationError, TierRun, choose, frontier, pareto, simulate


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
    # what audit sampling's drift flag compares with: the rules' agreement with the last tier, as calibrated
    assert load_config(config).tiers[0].llm_agreement == report["llm_agreement"].get("rules")
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
    from cascade.thresholds import confidence_of

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
    from cascade.thresholds import confidence_of

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


def test_calibrate_limit_is_a_seeded_sample_not_the_head(tmp_path, make_dataset):
    """Splits are often grouped by label (CLINC150's first 1,000 val rows hold 50 of 151 labels):
    `--limit N` measures a seeded sample of the split, the same for the same seed."""
    from cascade.calibrate import run_calibration

    rows = [(f"hello {i}", "greet") for i in range(30)] + [(f"weather {i}", "oos") for i in range(30)]
    data = make_dataset({"train": rows, "val": rows, "test": rows}, oos_label="oos")
    (tmp_path / "c.toml").write_text("[task]\nname='t'\n[[tiers]]\nname='last'\nkind='majority'\npath='ds'\n"
                                     "options={label='greet'}\n")
    first = run_calibration(tmp_path / "c.toml", data, max_llm_share=1.0, limit=20, write=False)
    again = run_calibration(tmp_path / "c.toml", data, max_llm_share=1.0, limit=20, write=False)
    other = run_calibration(tmp_path / "c.toml", data, max_llm_share=1.0, limit=20, write=False, seed=1)
    assert first["n"] == 20 and 0.2 < first["split_oos_share"] < 0.8  # the head would be all greet
    assert again["split_oos_share"] == first["split_oos_share"]
    assert other["n"] == 20
    # `cascade eval --limit` samples the same way: the report's label counts show it
    from cascade.evaluate import run_eval

    report, items = run_eval(tmp_path / "c.toml", data, "test", limit=20)
    golds = [row["gold"] for row in items]
    assert len(items) == 20 and 0 < golds.count("oos") < 20
    assert [row["gold"] for row in run_eval(tmp_path / "c.toml", data, "test", limit=20)[1]] == golds


def test_traffic_weights_make_out_of_scope_the_asked_share():
    from cascade.thresholds import confidence_of, traffic_weights

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


# --- the guarantee: exact tests and Learn then Test (issue 20) ----------------------------------


def test_binomial_helpers_are_exact():
    from math import comb

    from cascade.bounds import binom_cdf, binom_lower, binom_upper

    for k, n, p in [(0, 5, 0.3), (3, 10, 0.2), (40, 1000, 0.05), (7, 7, 0.9)]:
        assert binom_cdf(k, n, p) == pytest.approx(sum(comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k + 1)),
                                                   rel=1e-9)
    # Clopper-Pearson: the bounds are where the tail equals alpha (0 of n: 1 - alpha^(1/n))
    assert binom_upper(0, 100, 0.05) == pytest.approx(1 - 0.05 ** (1 / 100), rel=1e-6)
    u, lo = binom_upper(3, 100, 0.05), binom_lower(3, 100, 0.05)
    assert binom_cdf(3, 100, u) == pytest.approx(0.05, rel=1e-6)
    assert 1 - binom_cdf(2, 100, lo) == pytest.approx(0.05, rel=1e-6) and lo < 0.03 < u


def test_paired_tail_is_the_trinomial_probability():
    """Golden: the sum over the trinomial's outcomes, enumerated by hand for a small n."""
    from math import comb

    from cascade.bounds import paired_statistic, paired_tail

    n, pw, pb, eps, z = 15, 0.2, 0.1, 0.05, -0.5
    want = sum(comb(n, w) * comb(n - w, b) * pw ** w * pb ** b * (1 - pw - pb) ** (n - w - b)
               for w in range(n + 1) for b in range(n + 1 - w) if paired_statistic(w, b, n, eps) <= z + 1e-9)
    assert paired_tail(z, n, pw, pb, eps) == pytest.approx(want, rel=1e-9)


def test_the_paired_test_holds_its_level_on_every_null_it_was_checked_on():
    """Exact size: the probability, summed over every outcome, that the test rejects, for
    distributions on H0 (loss >= the tolerance) from no discordance to a lot."""
    from math import comb

    from cascade.bounds import paired_loss_pvalue

    n, eps, alpha, nuisance = 40, 0.05, 0.1, 0.01
    rejects = [(w, b) for w in range(n + 1) for b in range(n + 1 - w)
               if paired_loss_pvalue(w, b, n, eps, nuisance) <= alpha]
    assert (0, 0) not in rejects and (0, 10) in rejects  # 40 items cannot show 0-0 is within 5 pt; 0-10 can
    for disc in (eps, 0.08, 0.15, 0.3, 0.6):
        for loss in (eps, eps + 0.02):
            if loss > disc:
                continue
            pw, pb = (disc + loss) / 2, (disc - loss) / 2
            size = sum(comb(n, w) * comb(n - w, b) * pw ** w * pb ** b * (1 - pw - pb) ** (n - w - b)
                       for w, b in rejects)
            assert size <= alpha, (disc, loss, size)


def test_the_stratified_tail_is_the_two_binomials_probability():
    """Golden: enumerated by hand over both strata's counts."""
    from math import comb

    from cascade.bounds import stratified_tail

    (n0, n1), (s0, s1), (q0, q1), t = (7, 12), (0.3, 0.7), (0.2, 0.05), 0.12
    pmf = lambda k, n, q: comb(n, k) * q ** k * (1 - q) ** (n - k)  # noqa: E731
    want = sum(pmf(a, n0, q0) * pmf(b, n1, q1) for a in range(n0 + 1) for b in range(n1 + 1)
               if s0 * a / n0 + s1 * b / n1 <= t + 1e-12)
    assert stratified_tail(t, (n0, n1), (s0, s1), (q0, q1)) == pytest.approx(want, rel=1e-9)


def test_the_stratified_tests_hold_their_level_on_every_null_they_were_checked_on():
    """Exact size, summed over every outcome of both strata, for distributions on H0's boundary
    (the weighted loss or rate at the level) that split it between the strata in different ways."""
    from math import comb

    from cascade.bounds import stratified_loss_pvalue, stratified_rate_pvalue

    alpha, shares = 0.2, (0.3, 0.7)
    # a rate: each stratum's count binomial
    n0, n1, level = 6, 15, 0.1
    rejects = [(a, b) for a in range(n0 + 1) for b in range(n1 + 1)
               if stratified_rate_pvalue((a, b), (n0, n1), shares, level) <= alpha]
    assert (0, 0) in rejects and (n0, n1) not in rejects
    pmf = lambda k, n, q: comb(n, k) * q ** k * (1 - q) ** (n - k)  # noqa: E731
    for q0 in (0.0, 0.05, 0.15, 1 / 3):
        q1 = (level - shares[0] * q0) / shares[1]
        size = sum(pmf(a, n0, q0) * pmf(b, n1, q1) for a, b in rejects)
        assert size <= alpha, (q0, size)
    # the paired loss: each stratum a trinomial of worse, better, neither
    n0, n1, eps, nuisance = 3, 8, 0.1, 0.01
    outcomes = [(w0, b0, w1, b1) for w0 in range(n0 + 1) for b0 in range(n0 + 1 - w0)
                for w1 in range(n1 + 1) for b1 in range(n1 + 1 - w1)]
    rejects = [o for o in outcomes
               if stratified_loss_pvalue((o[0], o[2]), (o[1], o[3]), (n0, n1), shares, eps, nuisance, grid=6) <= alpha]
    assert (0, 0, 0, 2) in rejects and (0, 0, 3, 0) not in rejects  # 11 items: 0-0 is too few to show 10 pt

    def tri(w, b, n, pw, pb):
        return comb(n, w) * comb(n - w, b) * pw ** w * pb ** b * (1 - pw - pb) ** (n - w - b)

    for l0, d0, d1 in [(0.1, 0.1, 0.1), (1 / 3, 0.4, 0.0), (0.0, 0.3, 0.2), (-0.1, 0.5, 0.4), (0.2, 0.2, 0.6)]:
        l1 = (eps - shares[0] * l0) / shares[1]
        d1 = max(d1, abs(l1))  # a stratum's discordance is at least its loss
        size = sum(tri(w0, b0, n0, (d0 + l0) / 2, (d0 - l0) / 2) * tri(w1, b1, n1, (d1 + l1) / 2, (d1 - l1) / 2)
                   for w0, b0, w1, b1 in rejects)
        assert size <= alpha, (l0, d0, d1, size)


def test_the_stratified_test_certifies_a_clinc150_like_weighting_that_betting_cannot():
    """CLINC150's val: 100 out-of-scope items among 3,100, weighted to 20% of traffic. Where the
    cascade routes every item as the large model does, betting on the weighted loss cannot reject
    "0.5 pt worse" (the weights' range costs it); the exact stratified test can, and credits the
    out-of-scope items the cascade gets right where the large model does not."""
    from cascade.bounds import betting_pvalue, stratified_loss_pvalue

    w = np.where(np.arange(3100) < 100, 0.2 / (100 / 3100), 0.8 / (3000 / 3100))
    assert betting_pvalue(np.zeros(3100), 0.005, float(w.max())) > 0.1
    assert stratified_loss_pvalue((0, 0), (0, 0), (100, 3000), (0.2, 0.8), 0.005, 0.005) <= 0.1
    # one worse out-of-scope item is 0.2 pt of traffic, far from shown at 100 items...
    assert stratified_loss_pvalue((1, 0), (0, 0), (100, 3000), (0.2, 0.8), 0.005, 0.005) > 0.1
    # ...unless the cascade is the better one on more of them
    assert stratified_loss_pvalue((1, 0), (5, 0), (100, 3000), (0.2, 0.8), 0.005, 0.005) <= 0.1
    # in scope, better pairs offset worse ones (half credit)
    assert stratified_loss_pvalue((0, 20), (0, 0), (100, 3000), (0.2, 0.8), 0.005, 0.005) > 0.1
    assert stratified_loss_pvalue((0, 20), (10, 20), (100, 3000), (0.2, 0.8), 0.005, 0.005) <= 0.1


def plateau(n, rng):
    """One student and the large model. Items ranked by u (the student's confidence, 1 - 0.5 u);
    per-item loss P(llm right) - P(student right): -0.01 on the top 30%, +0.06 on the next 15%,
    0 on [0.45, 0.8) with both 93% right independently (many discordant pairs), +0.3 below. So
    the loss of answering the top share s rises to 0.006 at s = 0.45 and stays there until 0.8: a
    plateau just above a 0.005 tolerance, where a search that checks its winner afterwards finds
    a lucky point."""
    u = rng.random(n)
    s = np.select([u < 0.3, u < 0.45, u < 0.8], [0.995, 0.90, 0.93], 0.6)
    m = np.select([u < 0.3, u < 0.45, u < 0.8], [0.985, 0.96, 0.93], 0.9)
    student, llm = rng.random(n) < s, rng.random(n) < m
    runs = [TierRun("student", ["a" if r else "b" for r in student], 1 - 0.5 * u, 1.0),
            TierRun("llm", ["a" if r else "b" for r in llm], np.ones(n), 50.0, is_llm=True)]
    return runs, ["a"] * n


def test_learn_then_test_keeps_its_confidence_after_the_search_and_the_old_check_does_not():
    """The share of resamples whose chosen thresholds lose more than the tolerance on the
    population: at most 1 - confidence for `certify` (plus Monte-Carlo slack: 120 resamples, a
    standard error of 0.027 at 0.1, so 0.05), well above it for the old procedure (cheapest grid
    point, then a normal bound on it). The population is 60k items; val 800 is drawn from it with
    replacement, so the population is exactly the distribution the guarantee is about."""
    from cascade.certify import certify, path_from_other_items
    from cascade.thresholds import confidence_of, correct_and_answered, subset

    rng = np.random.default_rng(0)
    pop, pop_gold = plateau(60_000, rng)
    pop_llm = float(np.mean([a == "a" for a in pop[-1].labels]))
    eps, conf = 0.005, 0.9
    masks = correct_and_answered(pop, pop_gold)

    def on_pop(p):  # (loss against the large model, large-model share) on the population
        q = simulate(pop, pop_gold, p.thresholds, *masks)
        return pop_llm - q.accuracy, q.llm_share

    train = rng.integers(0, len(pop_gold), 3000)  # the path's own labelled items
    train_gold = [pop_gold[i] for i in train]
    path = path_from_other_items(subset(pop, train)[:-1], train_gold, pop, candidates=16)
    old, new = [], []
    for _ in range(120):
        idx = rng.integers(0, len(pop_gold), 800)
        runs, gold = subset(pop, idx), [pop_gold[i] for i in idx]
        target = float(np.mean([a == "a" for a in runs[-1].labels])) - eps
        try:
            was = choose(frontier(runs, gold, candidates=16), target,
                         confident=lambda p: confidence_of(runs, gold, p, target, True, max_loss=eps) >= conf)
        except CalibrationError:
            was = simulate(runs, gold, (NEVER, 0.0))
        old.append(on_pop(was))
        cert = certify(runs, gold, conf, max_loss=eps, path=path, path_gold=train_gold, bounds=False)
        new.append(on_pop(cert.point))
    old, new = np.array(old), np.array(new)
    old_rate, new_rate = float((old[:, 0] > eps).mean()), float((new[:, 0] > eps).mean())
    assert new_rate <= (1 - conf) + 0.05, (old_rate, new_rate)
    assert old_rate > 1 - conf and old_rate > new_rate + 0.08, (old_rate, new_rate)
    # and the guarantee is not bought by sending everything to the large model: the oracle
    # (the least share within the tolerance on the population) is about 0.55
    assert new[:, 1].mean() < 0.8


def test_fixed_sequence_starts_at_the_large_model_and_stops_at_its_first_failure():
    from cascade.certify import certify

    runs, gold = plateau(1500, np.random.default_rng(3))
    cert = certify(runs, gold, 0.9, max_loss=0.005, learn_share=0.3, seed=0)
    first = cert.steps[0]
    assert first.point.thresholds[0] == NEVER and first.source == "definition" and first.certified
    tested = [s for s in cert.steps if s.tested]
    assert all(s.certified for s in tested[:-1]) and cert.chosen is not None
    if len(tested) < len(cert.steps):  # stopped at a point not rejected; nothing after it tested
        assert not tested[-1].certified and cert.chosen == len(tested) - 2
        assert tested[-1].p_value > 0.1 >= tested[-2].p_value
    # the answered sets are nested: thresholds only go down along the path
    thr = [s.point.thresholds[0] for s in cert.steps]
    assert thr == sorted(thr, reverse=True)
    assert cert.learn_n == 450 and cert.test_n == 1050 and cert.path_from == "learn split"
    # every certified point's bound is within the tolerance, the chosen one included
    assert all(s.test["loss_bound"] <= 0.005 for s in tested if s.certified and s.source != "definition")


def test_absolute_and_weighted_targets_are_certified_on_the_same_sequence():
    from cascade.certify import certify
    from cascade.thresholds import traffic_weights

    runs, gold = synthetic(3000)
    cert = certify(runs, gold, 0.9, min_accuracy=0.9, learn_share=0.3)
    step = cert.steps[cert.chosen]
    assert cert.goal == "accuracy" and step.test["accuracy_bound"] >= 0.9 and step.point.llm_share < 1.0
    assert "binomial" in cert.method
    with pytest.raises(CalibrationError, match="no point passed"):
        from cascade.calibrate import calibrate_runs
        calibrate_runs(runs, gold, 0.99, confidence=0.9)
    # traffic weights: the exact test on the two strata; more certainty costs share
    runs, gold = oos_synthetic()
    w = traffic_weights(gold, "oos", 0.4)
    loose = certify(runs, gold, 0.8, max_loss=0.01, label="oos", weights=w)
    tight = certify(runs, gold, 0.99, max_loss=0.01, label="oos", weights=w)
    assert "two strata" in loose.method and "0.400" in loose.method
    assert loose.point.llm_share <= tight.point.llm_share
    assert loose.steps[loose.chosen].test["loss_bound"] <= 0.01
    assert sum(loose.steps[loose.chosen].test["stratum_n"]) == loose.test_n == 2100  # a learn split took 30%
    betting = certify(runs, gold, 0.8, max_loss=0.01, label="oos", weights=w, weighted_test="betting")
    assert "betting" in betting.method
    # and an absolute target under the same weights: per-stratum errors, exact, where betting
    # certifies nothing at all
    acc = certify(runs, gold, 0.9, min_accuracy=0.8, label="oos", weights=w)
    assert "errors" in acc.method and acc.steps[acc.chosen].test["accuracy_bound"] >= 0.8
    assert acc.point.llm_share < 0.1
    assert certify(runs, gold, 0.9, min_accuracy=0.8, label="oos", weights=w, weighted_test="betting").chosen is None


def distilled(n, rng, agree=0.995):
    """A student distilled from the large model: on the items it is sure of it says what the large
    model says (`agree` of the time), whether or not that is right."""
    u = rng.random(n)
    gold = ["a"] * n
    llm_right = rng.random(n) < 0.93
    llm = ["a" if r else "b" for r in llm_right]
    sure = u < 0.6
    copies = np.where(sure, rng.random(n) < agree, rng.random(n) < 0.8)
    student = [x if c else ("b" if x == "a" else "a") for x, c in zip(llm, copies)]
    runs = [TierRun("student", student, np.where(sure, 0.99 - 0.1 * u, 0.5 - 0.4 * u), 1.0),
            TierRun("llm", llm, np.ones(n), 50.0, is_llm=True)]
    return runs, gold


def test_label_free_evidence_buys_share_where_val_is_small_and_keeps_the_level():
    """300 labelled items cannot show a 0.5 pt tolerance; 20k items the large model answered
    (no gold) bound the loss by the disagreement, which is about 0.3% on the student's sure items."""
    from cascade.certify import certify
    from cascade.thresholds import correct_and_answered

    rng = np.random.default_rng(0)
    val, val_gold = distilled(300, rng)
    extra, _ = distilled(20_000, rng)
    alone = certify(val, val_gold, 0.9, max_loss=0.005, learn_share=0.3)
    both = certify(val, val_gold, 0.9, max_loss=0.005, learn_share=0.3, unlabelled=extra)
    assert both.point.llm_share < alone.point.llm_share - 0.3
    assert both.unlabelled_n == 20_000 and {s.source for s in both.steps if s.tested} - {"definition"}
    with pytest.raises(CalibrationError, match="large model only"):
        certify(val, val_gold, 0.9, min_accuracy=0.9, unlabelled=extra)
    # the level: on fresh draws the chosen point's true loss (population of 100k) stays within it
    pop, pop_gold = distilled(100_000, np.random.default_rng(1))
    pop_llm = float(np.mean([a == "a" for a in pop[-1].labels]))
    masks = correct_and_answered(pop, pop_gold)
    bad = 0
    for r in range(30):
        v, vg = distilled(300, np.random.default_rng(100 + r))
        e, _ = distilled(20_000, np.random.default_rng(200 + r))
        p = certify(v, vg, 0.9, max_loss=0.005, learn_share=0.3, unlabelled=e, seed=r, bounds=False).point
        bad += pop_llm - simulate(pop, pop_gold, p.thresholds, *masks).accuracy > 0.005
    assert bad <= 6  # 30 draws: at most 10% + slack


def test_weak_label_free_evidence_costs_at_most_its_share_of_delta():
    """With the path learnt on other items, val's and the label-free test share delta by a split
    fixed beforehand: evidence whose disagreement is far above the tolerance (a student agreeing
    90% on its sure items) leaves what val alone certifies at 1 - 0.8 delta, where
    Fisher's combination fell below val alone; strong evidence still buys share."""
    from cascade.bounds import bonferroni_pvalue
    from cascade.certify import certify

    rng = np.random.default_rng(3)
    path_runs, path_gold = distilled(2000, rng)
    val, val_gold = distilled(3000, rng)
    weak, _ = distilled(6000, rng, agree=0.9)
    both = certify(val, val_gold, 0.9, max_loss=0.005, path_runs=path_runs[:1], path_gold=path_gold,
                   unlabelled=weak, unlabelled_share=0.2)
    val_at_share = certify(val, val_gold, 1 - 0.8 * 0.1, max_loss=0.005, path_runs=path_runs[:1],
                           path_gold=path_gold)
    alone = certify(val, val_gold, 0.9, max_loss=0.005, path_runs=path_runs[:1], path_gold=path_gold)
    assert val_at_share.point.llm_share < 1.0  # val alone certifies something: the case is not trivial
    assert both.point == val_at_share.point and alone.point.llm_share <= both.point.llm_share
    tested = [s for s in both.steps if s.tested and s.source != "definition"]
    assert tested and all(s.source == "val+unlabelled" for s in tested)
    assert tested[-1].test["p_unlabelled"] > 0.02  # where the walk stopped, the label-free test did not reject
    # strong evidence (99.5% agreement on the sure items) with only 300 labelled items
    small, small_gold = distilled(300, rng)
    strong, _ = distilled(20_000, rng)
    lf = certify(small, small_gold, 0.9, max_loss=0.005, path_runs=path_runs[:1], path_gold=path_gold,
                 unlabelled=strong)
    assert lf.point.llm_share < certify(small, small_gold, 0.9, max_loss=0.005, path_runs=path_runs[:1],
                                        path_gold=path_gold).point.llm_share - 0.3
    # the combination: the smaller p-value over its share, whichever source it is
    assert bonferroni_pvalue(0.08, 1.0, 0.2) == pytest.approx(0.1)
    assert bonferroni_pvalue(1.0, 0.01, 0.2) == pytest.approx(0.05)
    with pytest.raises(CalibrationError, match="label-free-share"):
        certify(val, val_gold, 0.9, max_loss=0.005, unlabelled=weak, unlabelled_share=1.0)


def test_calibrate_command_certifies_against_the_large_model_with_a_tolerance(clinc_dir, tmp_path, capsys):
    """`--target-accuracy llm --max-loss --confidence`: the path learnt on train (the cheap tiers
    only), every val item testing it; the certificate in the report, its table printed, and the
    plot titled."""
    from cascade.app.cli import main
    from tests.conftest import rules_cascade_config

    config = rules_cascade_config(tmp_path, clinc_dir, threshold=0.0)
    assert main(["calibrate", "--config", str(config), "--data", str(clinc_dir), "--target-accuracy", "llm",
                 "--max-loss", "0.01", "--confidence", "0.9", "--limit", "600"]) == 0
    out = capsys.readouterr().out
    assert "p-value" in out and "definition" in out and "with 90% confidence" in out
    report = __import__("json").loads((tmp_path / "cascade.frontier.json").read_text())
    g = report["guarantee"]
    assert g["goal"] == "llm" and g["level"] == 0.01 and g["path_from"] == "other items" and g["test_n"] == 600
    chosen = g["steps"][g["chosen"]]
    assert chosen["certified"] and report["max_loss"] == 0.01
    assert report["chosen"]["thresholds"] == chosen["point"]["thresholds"]
    # a tolerance goes with the large model's own accuracy only
    assert main(["calibrate", "--config", str(config), "--data", str(clinc_dir), "--target-accuracy", "0.5",
                 "--max-loss", "0.01", "--limit", "600"]) == 2
    assert "--max-loss" in capsys.readouterr().err


def test_llm_agreement_is_each_cheap_tiers_agreement_on_the_items_it_answers():
    from cascade.calibrate import llm_agreement
    from cascade.thresholds import Point

    rules = TierRun("rules", ["a", None, "b", None, None, None], np.array([1.0, 0, 1.0, 0, 0, 0]), 0.01)
    student = TierRun("student", ["a", "a", "b", "c", "c", "a"], np.array([0.99, 0.95, 0.9, 0.5, 0.97, 0.2]), 1.0)
    llm = TierRun("llm", ["a", "a", "c", "c", "b", "a"], np.ones(6), 50.0, is_llm=True)
    point = Point((0.9, 0.9, 0.0), 0.0, 0.0, 0.0, ())
    # rules answer items 0 and 2 (agree on 0); the student answers 1 and 4 (agrees on 1); the rest go on
    assert llm_agreement([rules, student, llm], point, None) == {"rules": 0.5, "student": 0.5}
    assert llm_agreement([rules, student, llm], Point((2.0, 0.9, 0.0), 0.0, 0.0, 0.0, ()), None) == {
        "student": 0.5}  # rules off: they answer nothing, so they have no figure


def test_the_walk_skips_points_where_no_cheap_tier_can_answer():
    """A path point whose thresholds (the out-of-scope label's too) are all above 1 routes
    everything to the large model, as the walk's first point does; the betting test of weighted
    losses cannot reject its zero loss at this size, so it would end the walk there."""
    from cascade.certify import answers_nothing, certify, greedy_path
    from cascade.thresholds import NEVER, Point, traffic_weights

    runs, gold = oos_synthetic()
    w = traffic_weights(gold, "oos", 0.4)
    path = greedy_path(runs, gold, 24, "oos", weights=w)
    noop = Point((NEVER, 0.0), 0.0, 1.0, 50.0, (0.0, 1.0), (NEVER, None))
    assert answers_nothing(noop, 1) and not answers_nothing(Point((NEVER, 0.0), 0, 1, 50, (0, 1), (0.9, None)), 1)
    plain = certify(runs, gold, 0.9, max_loss=0.01, label="oos", weights=w, path=path, bounds=False)
    padded = certify(runs, gold, 0.9, max_loss=0.01, label="oos", weights=w, path=[noop] + path, bounds=False)
    assert plain.point.llm_share < 1.0 and padded.point == plain.point
    assert all(not answers_nothing(s.point, 1) for s in padded.steps[1:])
