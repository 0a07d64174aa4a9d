import time
from pathlib import Path

import pytest

from cascade.data import Example, load_split
from cascade.rules.check import check_pack
from cascade.rules.mine import MineConfig, mine_candidates, mine_pack, oos_weight_for, write_pack
from cascade.rules.pack import RuleError, decide, load_pack, match_text, parse_pack
from cascade.tiers.rules import RulesTier

REPO = Path(__file__).resolve().parents[1]


def pack_of(*rules: dict, name="t"):
    return parse_pack({"rule": list(rules)}, "<test>", name)


def test_catastrophic_pattern_times_out_and_abstains():
    pack = pack_of({"label": "x", "pattern": "(a+)+$"}, {"label": "y", "pattern": "b"})
    text = "a" * 5000 + "!"
    t0 = time.perf_counter()
    result = match_text(pack, text, timeout_s=0.05)
    elapsed = time.perf_counter() - t0
    assert result.timed_out and elapsed < 1.0
    tier = RulesTier("rules", pack, timeout_s=0.05)
    assert tier.predict_batch([text, "abc", "zzz"])[0] is None
    assert tier.stats()["timeouts"] == 1
    assert tier.outcomes == {"timeout": 1, "answered": 1, "no_match": 1}


@pytest.mark.parametrize("toml, where", [
    ("[[rule]]\nlabel='a'\npattern='ok'\n[[rule]]\nlabel='b'\npattern='(unclosed'\n",
     "rule 2 (label 'b'): pattern: invalid regex"),
    ("[[rule]]\nlabel='a'\npattern='x'\nflags=['SHOUTING']\n", "rule 1 (label 'a'): flags: Value error, unknown flag"),
    ("[[rule]]\npattern='x'\n", "rule 1: label: Field required"),
    ("[[rule]]\nlabel='a'\npattern='x'\nlable='b'\n", "rule 1 (label 'a'): lable: Extra inputs"),
    ("[[rule]]\nlabel='a'\npattern='(?P<num>\\d+)'\nfields=['amount']\n",
     "rule 1 (label 'a'): fields: ['amount'] are not named groups"),
    ("[[rule]]\nlabel='a'\npattern='x'\nconfidence=2\n", "rule 1 (label 'a'): confidence: Input should be less"),
    ("rules = 1\n", "unknown top-level keys ['rules']"),
    ("[[rule]\n", "not valid TOML"),
])
def test_bad_rule_files_name_file_and_rule(tmp_path, toml, where):
    f = tmp_path / "pack.toml"
    f.write_text(toml)
    with pytest.raises(RuleError) as err:
        load_pack(f)
    assert str(err.value).startswith(str(f))
    assert where in str(err.value)


def test_priority_conflicts_fields_and_flags():
    pack = pack_of(
        {"label": "refund", "pattern": r"\brefund\b", "flags": ["ignorecase"]},
        {"label": "order", "pattern": r"order (?P<order_id>\d+)", "fields": ["order_id"], "confidence": 0.8},
        {"label": "complaint", "pattern": r"\bangry\b", "priority": 5},
        {"label": "order", "pattern": r"\b(\w+)\s+\1\b"},  # a backreference: checked outside the prefilter
    )
    tier = RulesTier("rules", pack)
    preds = tier.predict_batch(["REFUND please", "where is order 123", "refund order 7",
                                "angry about refund", "the the order 5", "nothing"])
    assert (preds[0].label, preds[0].confidence) == ("refund", 1.0)
    assert (preds[1].label, preds[1].fields, preds[1].confidence) == ("order", {"order_id": ["123"]}, 0.8)
    assert preds[2] is None  # refund vs order at equal priority: abstain
    assert preds[3].label == "complaint"  # priority 5 wins
    assert preds[4].label == "order" and preds[4].fields == {"order_id": ["5"]}
    assert preds[5] is None
    assert tier.outcomes["conflict"] == 1
    assert decide(match_text(pack, "the the", 0.1)).match.rule.index == 4


def test_check_pack_by_hand():
    pack = pack_of({"label": "a", "pattern": "apple"}, {"label": "b", "pattern": "pie"})
    examples = [Example("1", "apple", "a"), Example("2", "apple pie", "b"), Example("3", "pie", "b"),
                Example("4", "apple tart", "b"), Example("5", "soup", "a")]
    r = check_pack(pack, examples)
    assert (r["n"], r["answered"], r["conflict_texts"]) == (5, 3, 1)
    assert r["coverage"] == pytest.approx(0.6) and r["precision"] == pytest.approx(2 / 3)
    rows = {row["label"]: row for row in r["rules"]}
    assert (rows["a"]["support"], rows["a"]["precision"]) == (3, pytest.approx(1 / 3))
    assert rows["a"]["wrong_labels"] == {"b": 2}
    assert r["conflicts"] == [{"rules": [1, 2], "labels": ["a", "b"], "texts": 1, "same_priority": True}]


def synthetic():
    train, val = [], []
    for i in range(30):
        train.append(Example(f"t{i}", f"please check my credit score {i}", "score"))
        train.append(Example(f"u{i}", f"book a flight to city {i}", "flight"))
        # "my account" is shared between labels: must never become a rule
        train.append(Example(f"v{i}", f"close my account now {i}", "close" if i % 2 else "score"))
    for i in range(6):
        val.append(Example(f"a{i}", f"what is my credit score {i}", "score"))
        val.append(Example(f"b{i}", f"i want to book a flight {i}", "flight"))
    # "a flight" occurs in an out-of-scope train text: weighted up, it sinks that phrase
    train.append(Example("o1", "watch a flight simulator video", "oos"))
    return train, val


def test_mining_finds_precise_phrases_and_writes_an_editable_pack(tmp_path):
    train, val = synthetic()
    cfg = MineConfig(min_train_support=5, min_val_support=3, oos_label="oos",
                     oos_weight=oos_weight_for(train, "oos", 0.2))
    assert cfg.oos_weight > 10
    grams = {c.ngram for c in mine_candidates(train, val, cfg)}
    assert ("credit", "score") in grams and ("book", "a") in grams
    assert ("my", "account") not in grams and ("a", "flight") not in grams
    assert all(len(g) >= 2 for g in grams)

    data, report = mine_pack(train, val, "demo", cfg)
    assert report["precision"] == 1.0 and report["coverage"] == 1.0
    assert {r["label"] for r in data["rule"]} == {"score", "flight"}
    assert len(data["rule"]) == 2  # the greedy cover needs one phrase per label here
    write_pack(data, tmp_path / "demo.toml")
    text = (tmp_path / "demo.toml").read_text()
    assert "pattern = '\\b" in text  # literal strings: no doubled backslashes
    pack = load_pack(tmp_path / "demo.toml")
    assert len(pack.rules) == 2 and pack.rules[0].flags == ["IGNORECASE"]
    assert RulesTier("r", pack).predict_batch(["BOOK A flight"])[0].label == "flight"


def test_mined_rules_below_the_bar_on_val_are_dropped():
    train, val = synthetic()
    # Every phrase of the "score" texts also shows up, wrongly labelled, on val.
    val += [Example(f"x{i}", f"please check my credit score {i}", "flight") for i in range(6)]
    cfg = MineConfig(min_train_support=5, min_val_support=3)
    data, _ = mine_pack(train, val, "demo", cfg)
    assert {r["label"] for r in data["rule"]} == {"flight"}


@pytest.mark.parametrize("pack_file", sorted((REPO / "rules").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_pack_loads(pack_file):
    pack = load_pack(pack_file)
    assert len(pack.rules) >= 10 and pack.name == pack_file.stem


@pytest.mark.parametrize("name, fixture", [("clinc150", "clinc_dir"), ("banking77", "banking_dir")])
def test_shipped_packs_are_precise_on_test(name, fixture, request):
    data_dir = request.getfixturevalue(fixture)
    report = check_pack(load_pack(REPO / "rules" / f"{name}.toml"), load_split(data_dir, "test"), timeout_s=0.5)
    assert report["precision"] >= 0.98
    assert report["coverage"] >= 0.10
