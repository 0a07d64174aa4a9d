"""Rules on extraction tasks: template mining (cascade.rules.mine) and the per-field check."""

import json
import random
from pathlib import Path

import pytest

from cascade.app.cli import main
from cascade.data import Example, read_snips
from cascade.rules.check import check_pack, format_check
from cascade.rules.mine import EXTRACT_LABEL, MineConfig, delexicalise, mine_template_pack, template_pattern, write_pack
from cascade.rules.pack import load_pack, parse_pack
from cascade.tiers.rules import RulesTier

SNIPS = Path(__file__).resolve().parents[2] / "shared" / "data" / "snips"

ARTISTS = ["abba", "miles davis", "the kinks", "nina simone", "prince", "bjork", "queen", "low roar",
           "sade", "tom waits", "can", "air", "blur", "moby"]
DISHES = ["pho", "ramen", "tacos", "dim sum", "paella", "borscht", "goulash", "falafel"]


def ex(i: str, label: str | None, *parts) -> Example:
    """An example from alternating literal text and (field, value) pairs."""
    text, fields = "", {}
    for p in parts:
        if isinstance(p, tuple):
            fields.setdefault(p[0], []).append(p[1])
            p = p[1]
        text += p
    return Example(i, text, label, fields)


def joint_splits() -> dict[str, list[Example]]:
    train, val, test = [], [], []
    for i, artist in enumerate(ARTISTS[:10]):
        service = ("spotify", "deezer")[i % 2]
        train.append(ex(f"p{i}", "PlayMusic", "play ", ("artist", artist.title()), " on ", ("service", service)))
        # Two generic slots side by side: where would the artist end and the album begin?
        train.append(ex(f"a{i}", "PlayMusic", "put on ", ("artist", artist), " ", ("album", f"{artist} live")))
    for i, dish in enumerate(DISHES[:6]):
        # "find X" means a dish or a song: no template of it can be precise.
        train.append(ex(f"f{i}", "FindFood", "find ", ("served_dish", dish)))
        train.append(ex(f"g{i}", "PlayMusic", "find ", ("track", f"song {i}")))
    for i in range(2):  # seen twice only: below the support bar
        train.append(ex(f"r{i}", "RateBook", "rate ", ("object_name", f"book {i}"), " five stars"))
    for i, artist in enumerate(ARTISTS[10:]):
        service = ("deezer", "spotify")[i % 2]
        val.append(ex(f"vp{i}", "PlayMusic", "Play ", ("artist", artist), " on ", ("service", service), "."))
        val.append(ex(f"vf{i}", "FindFood", "find ", ("served_dish", DISHES[6 + i % 2])))
        test.append(ex(f"tp{i}", "PlayMusic", "play ", ("artist", artist), " on ", ("service", service)))
    return {"train": train, "val": val, "test": test}


def write_dir(root: Path, splits: dict[str, list[Example]], task: str) -> Path:
    root.mkdir()
    for split, rows in splits.items():
        (root / f"{split}.jsonl").write_text("".join(json.dumps(e.to_json()) + "\n" for e in rows))
    labels = sorted({e.label for rows in splits.values() for e in rows if e.label})
    names = sorted({n for rows in splits.values() for e in rows for n in e.fields})
    (root / "labels.json").write_text(json.dumps({"labels": labels, "oos_label": None, "task": task,
                                                  "fields": names}))
    return root


CFG = MineConfig(min_train_support=3, min_val_support=2, min_value_repeats=3.0)


def test_delexicalise_and_patterns():
    e = ex("1", "PlayMusic", "Play  ", ("artist", "Abba"), " on ", ("service", "Spotify"), "!")
    pieces = delexicalise(e)
    assert pieces == (("lit", "play "), ("slot", "artist"), ("lit", " on "), ("slot", "service"))
    pattern = template_pattern(pieces, {"service": ["spotify", "last fm"]})
    assert pattern == r"^\s*play\s+(?P<artist>\S(?:.*?\S)?)\s+on\s+(?P<service>spotify|last\s+fm)[\s.!?]*$"
    generic_pair = (("lit", "put on "), ("slot", "artist"), ("lit", " "), ("slot", "album"))
    assert template_pattern(generic_pair, {}) is None  # adjacent generic slots: skipped
    assert template_pattern(generic_pair, {"album": ["live"]}) is not None  # one is a value list: fine
    assert template_pattern((("slot", "track"),), {}) is None  # nothing to anchor it
    assert delexicalise(Example("2", "play it", "x", {"artist": ["abba"]})) is None  # value not in the text


def test_template_mining_joint_finds_the_precise_template(tmp_path):
    splits = joint_splits()
    data, report = mine_template_pack(splits["train"], splits["val"], "demo", CFG, task="joint")
    assert [(r["label"], r["fields"]) for r in data["rule"]] == [("PlayMusic", ["artist", "service"])]
    rule = data["rule"][0]
    assert "(?P<service>spotify|deezer)" in rule["pattern"] and "(?P<artist>" in rule["pattern"]
    assert rule["confidence"] == round((4 + 1) / (4 + 2), 4)
    assert 'template "play {artist} on {service}" seen 10x' in rule["note"]
    assert report["mining"]["skipped"] == {"templates with adjacent generic slots or no anchor": 1}
    # "find {served_dish}" and "find {track}" are one pattern, right half the time; "rate" seen twice.
    assert report["task_precision"] == 1.0 and report["answered"] == 4

    write_pack(data, tmp_path / "demo.toml")
    pred = RulesTier("rules", load_pack(tmp_path / "demo.toml")).predict_batch(
        ["Play Nina  Simone on Spotify?", "play on deezer", "find pho"])
    assert (pred[0].label, pred[0].fields) == ("PlayMusic", {"artist": ["Nina  Simone"], "service": ["Spotify"]})
    assert pred[1] is None and pred[2] is None


def test_patterns_with_quotes_stay_toml_literal_strings(tmp_path):
    pattern = r"^add\s+(?P<owner>alex's|my)\s+list$"
    data = {"name": "q", "rule": [{"label": "AddToPlaylist", "pattern": pattern, "fields": ["owner"],
                                   "note": 'template "add {owner} list"'}]}
    write_pack(data, tmp_path / "q.toml")
    assert f"pattern = '''{pattern}'''" in (tmp_path / "q.toml").read_text()  # no doubled backslashes
    rule = load_pack(tmp_path / "q.toml").rules[0]
    assert (rule.pattern, rule.note) == (pattern, 'template "add {owner} list"')


def test_templates_below_support_or_precision_are_not_kept():
    splits = joint_splits()
    strict = MineConfig(min_train_support=11, min_val_support=2, min_value_repeats=3.0)
    assert mine_template_pack(splits["train"], splits["val"], "d", strict, task="joint")[0]["rule"] == []
    # The "find" templates pass at a precision bar of 0.5 (6 of the 12 train "find" texts each).
    loose = MineConfig(min_train_support=3, min_val_support=2, min_value_repeats=3.0, min_precision=0.5)
    data, _ = mine_template_pack(splits["train"], splits["val"], "d", loose, task="joint")
    assert {r["label"] for r in data["rule"]} == {"PlayMusic", "FindFood"}
    # Wrong on val: the play template is dropped even though it is perfect on train.
    val = [Example(e.id, e.text, "FindFood", e.fields) if e.label == "PlayMusic" else e for e in splits["val"]]
    data, _ = mine_template_pack(splits["train"], val, "d", CFG, task="joint")
    assert data["rule"] == []


def test_extract_only_task_mines_label_free_rules():
    splits = {k: [Example(e.id, e.text, None, e.fields) for e in v] for k, v in joint_splits().items()}
    data, report = mine_template_pack(splits["train"], splits["val"], "d", CFG, task="extract")
    # Without labels, the "find" texts differ by field only: still not one precise template.
    assert [(r["label"], r["fields"]) for r in data["rule"]] == [(EXTRACT_LABEL, ["artist", "service"])]
    assert report["metric"] == "exact_match" and report["task_precision"] == 1.0
    assert report["precision"] is None and report["rules"][0]["label_precision"] is None


def test_check_pack_per_field_numbers_by_hand():
    pack = parse_pack({"rule": [
        {"label": "Play", "pattern": r"^play (?P<artist>.+?) on (?P<service>spotify|deezer)$",
         "fields": ["artist", "service"], "priority": 1},
        {"label": "Play", "pattern": r"^play (?P<track>.+)$", "fields": ["track"]},
    ]}, "<test>")
    examples = [
        ex("1", "Play", "play ", ("artist", "abba"), " on ", ("service", "spotify")),  # rule 1 right
        ex("2", "Play", "play ", ("track", "hello"), " on ", ("service", "deezer")),  # rule 1: artist wrong
        ex("3", "Play", "play ", ("track", "yesterday")),  # rule 2 right
        ex("4", "Genre", "play ", ("genre", "jazz")),  # rule 2: label and field wrong
        ex("5", "Weather", "weather in ", ("city", "paris")),  # no answer
    ]
    r = check_pack(pack, examples, task="joint", field_names=["artist", "city", "genre", "service", "track"])
    assert (r["answered"], r["metric"], r["conflicts"]) == (4, "joint", [])
    assert r["task_precision"] == 0.5 and r["precision"] == 0.75
    rows = {row["index"]: row for row in r["rules"]}
    assert (rows[1]["support"], rows[1]["task_precision"], rows[1]["label_precision"]) == (2, 0.5, 1.0)
    assert (rows[2]["support"], rows[2]["task_precision"], rows[2]["label_precision"]) == (4, 0.25, 0.75)
    f = r["fields"]
    assert (f["span_precision"], f["span_recall"], f["span_recall_all"]) == (4 / 6, 4 / 6, 4 / 7)
    assert f["exact_match"] == 0.5
    got = {name: (s["predicted"], s["precision"], s["recall"], s["support"], s["recall_all"], s["support_all"])
           for name, s in f["per_field"].items()}
    assert got == {"artist": (2, 0.5, 1.0, 1, 1.0, 1), "service": (2, 1.0, 1.0, 2, 1.0, 2),
                   "track": (2, 0.5, 0.5, 2, 0.5, 2), "genre": (0, None, 0.0, 1, 0.0, 1),
                   "city": (0, None, 0.0, 0, 0.0, 1)}
    text = format_check(r)
    assert "joint precision 0.5000, label precision 0.7500" in text and "recall over all texts 0.5714" in text
    # The same pack on a classify task: the report has no extraction keys.
    assert "fields" not in check_pack(pack, examples) and "metric" not in check_pack(pack, examples)


def test_cli_mine_and_check_end_to_end(tmp_path, capsys):
    d = write_dir(tmp_path / "ds", joint_splits(), "joint")
    out = tmp_path / "mined.toml"
    assert main(["rules", "mine", "--data", str(d), "--out", str(out), "--min-val-support", "2"]) == 0
    said = capsys.readouterr().out
    assert "template rules" in said and "joint precision 1.0000" in said
    assert main(["rules", "check", str(out), "--data", str(d), "--split", "test", "--json", "-"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["task"], report["answered"], report["task_precision"]) == ("joint", 4, 1.0)
    assert report["fields"]["per_field"]["service"]["recall_all"] == 1.0
    assert main(["rules", "check", str(out), "--data", str(d), "--split", "test"]) == 0
    assert "fields on answered texts" in capsys.readouterr().out


@pytest.mark.skipif(not SNIPS.exists(), reason="../shared/data/snips not present")
def test_mined_snips_slice_is_precise_on_test():
    raw = read_snips(SNIPS).splits
    rows = raw["train"][:]
    random.Random(0).shuffle(rows)
    train, val = rows[:4000], rows[4000:6000]
    data, _ = mine_template_pack(train, val, "snips", MineConfig(min_train_support=3, min_val_support=1),
                                 task="joint")
    report = check_pack(parse_pack(data, "<mined>"), raw["test"], task="joint")
    assert report["answered"] >= 5 and report["task_precision"] >= 0.9
