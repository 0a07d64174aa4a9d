"""Extraction as a task: SNIPS and fields columns in `cascade data prepare`, span metrics,
calibration and eval under the task's metric, the large model's training sequences and its
tier's constrained-JSON answers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from cascade.app.cli import main
from cascade.data import DataError, load_labels, load_split, prepare, read_table
from cascade.fields import (
    candidate_spans,
    check_fields,
    fields_from_json,
    fields_json_schema,
    normalize_value,
    same_fields,
)
from cascade.metrics import answer_key, item_correct, span_scores
from cascade.types import Prediction

from .conftest import shared


@pytest.fixture(scope="session")
def snips_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("snips")
    prepare("snips", shared("snips"), out)
    return out


def test_snips_prepares_a_joint_dataset_with_spans_that_occur(snips_dir):
    labels = load_labels(snips_dir)
    assert labels.task == "joint" and len(labels.labels) == 7 and len(labels.fields) == 39
    splits = {s: load_split(snips_dir, s) for s in ("train", "val", "test")}
    assert len(splits["test"]) == 700 and len(splits["train"]) + len(splits["val"]) == 13784
    for rows in splits.values():
        for ex in rows:
            assert ex.fields is not None and check_fields(ex.text, ex.fields, labels.fields) is None
    # A known validate utterance, values in text order; the Latin-1 train file is decoded.
    row = next(ex for ex in splits["test"] if ex.text == "add digging now to my Young at Heart playlist")
    assert row.label == "AddToPlaylist"
    assert row.fields == {"playlist": ["digging now"], "playlist_owner": ["my"], "entity_name": ["Young at Heart"]}
    assert any(not ex.text.isascii() for ex in splits["train"] if ex.label == "PlayMusic")
    # train is shuffled (the source is one file per intent): its head is a fair sample
    assert len({ex.label for ex in splits["train"][:100]}) == 7


def test_fields_column_is_checked_and_bad_rows_name_their_line(tmp_path):
    src = tmp_path / "rows.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in [
        {"text": "order A-17 to Paris", "label": "ship", "fields": {"order": ["A-17"], "city": "Paris"}},
        {"text": "order B-2 to Rome", "label": "ship", "fields": {"order": ["B-3"]}},
        {"text": "order C-1", "label": "ship", "fields": ["C-1"]},
        {"text": "order D-4", "label": "ship", "fields": "{not json"},
    ]) + "\n")
    rows, bad = read_table(src)
    assert [r.fields for r in rows] == [{"order": ["A-17"], "city": ["Paris"]}]
    assert [str(b) for b in bad] == [
        f"{src}:2: fields.order[0]: 'B-3' does not occur in the text",
        f"{src}:3: fields: expected an object of name -> [values], got list",
        f"{src}:4: fields: not a JSON object (Expecting property name enclosed in double quotes)",
    ]
    with pytest.raises(DataError, match=r"rows.jsonl:2: fields.order\[0\]"):
        prepare("jsonl", src, tmp_path / "out")


def test_csv_extract_only_task_needs_no_label_column(tmp_path, capsys):
    import csv

    src = tmp_path / "rows.csv"
    with src.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "fields"])
        w.writerows([f"mail me at u{i}@x.org", json.dumps({"email": [f"u{i}@x.org"]})] for i in range(30))
    assert main(["data", "prepare", "--dataset", "csv", "--path", str(src), "--out", str(tmp_path / "ds"),
                 "--task", "extract"]) == 0
    assert "extract: 0 labels, 1 fields" in capsys.readouterr().out
    labels = load_labels(tmp_path / "ds")
    assert labels.task == "extract" and labels.fields == ["email"] and labels.labels == []
    test = load_split(tmp_path / "ds", "test")
    assert test and all(ex.label is None and ex.fields["email"][0] in ex.text for ex in test)


def test_normalisation_and_candidate_spans():
    assert normalize_value("  Paris, ") == normalize_value("paris") == "paris"
    assert normalize_value("New  York") == "new york" != normalize_value("York")
    spans = candidate_spans("book a table at 8 pm, in Paris", max_words=3)
    assert "8 pm" in spans and "Paris" in spans and "table at 8" in spans and "at 8 pm" in spans
    assert "a table at 8" not in spans  # four words
    assert all(s in "book a table at 8 pm, in Paris" for s in spans)


def test_span_scores_exact_numbers():
    gold = [{"city": ["Paris"], "date": ["today"]}, {"city": ["Rome", "Oslo"]}, {}]
    pred = [{"city": ["paris"], "date": ["tomorrow"]}, {"city": ["Oslo"]}, {"city": ["Nice"]}]
    s = span_scores(gold, pred, ["city", "date", "time"])
    # city: tp 2 (paris, Oslo), predicted 4, gold 3; date: tp 0, 1, 1
    assert s["per_field"]["city"]["precision"] == pytest.approx(2 / 3)  # paris, Oslo of paris, Oslo, Nice
    assert s["per_field"]["city"]["recall"] == pytest.approx(2 / 3)
    assert s["per_field"]["date"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1, "predicted": 1}
    assert s["per_field"]["time"]["support"] == 0
    assert s["span_precision"] == pytest.approx(2 / 4) and s["span_recall"] == pytest.approx(2 / 4)
    assert s["exact_match"] == 0.0
    assert span_scores([{"a": ["x", "y"]}], [{"a": ["Y", "x."]}])["exact_match"] == 1.0
    # a repeated gold value is matched once per occurrence
    assert span_scores([{"a": ["x"]}], [{"a": ["x", "x"]}])["span_precision"] == 0.5


def test_answer_keys_compare_under_the_metric():
    p = Prediction("book", 0.9, "t", fields={"city": ["Paris"]})
    assert item_correct("accuracy", "book", {"city": ["Rome"]}, p)
    assert not item_correct("exact_match", "book", {"city": ["Rome"]}, p)
    assert item_correct("exact_match", "other", {"city": ["paris"]}, p)
    assert not item_correct("joint", "other", {"city": ["paris"]}, p)
    assert item_correct("joint", "book", {"city": ["paris,"]}, p)
    assert answer_key("joint", "a", {}) == answer_key("joint", "a", None)
    assert same_fields({"a": ["x", "y"]}, {"a": ["y", "x"]})


def test_json_schema_keeps_answers_to_spans_and_names():
    text = "play yesterday by the beatles"
    schema = fields_json_schema(text, ["artist", "track"])
    assert set(schema["properties"]) == {"artist", "track"} and schema["additionalProperties"] is False
    assert "the beatles" in schema["$defs"]["span"]["enum"]
    got = fields_from_json(text, {"artist": ["the beatles", "the rolling stones"], "genre": ["pop"],
                                  "track": "yesterday"}, ["artist", "track"])
    assert got == {"track": ["yesterday"], "artist": ["the beatles"]}  # text order; invented value and name dropped
    assert fields_from_json(text, ["not", "an", "object"], ["artist"]) == {}


def test_task_metric_is_checked_against_the_kind(tmp_path):
    from cascade.config import ConfigError, load_config

    cfg = tmp_path / "cascade.toml"
    cfg.write_text('[task]\nname = "x"\nkind = "classify"\nmetric = "exact_match"\n\n'
                   '[[tiers]]\nname = "m"\nkind = "majority"\nthreshold = 0.0\n')
    with pytest.raises(ConfigError, match="metric: 'exact_match' does not apply to a classify task"):
        load_config(cfg)


class FieldsTier:
    """A tier with fake capacity answering label and fields from a table."""

    def __init__(self, name, table):
        self.name, self.table = name, table

    def predict_batch(self, texts):
        out = []
        for t in texts:
            if t in self.table:
                label, fields, conf = self.table[t]
                out.append(Prediction(label, conf, self.name, fields=fields))
            else:
                out.append(None)
        return out

    @property
    def cost(self):
        return 0.0


def test_calibration_and_eval_score_joint_answers(tmp_path):
    """The calibration replay compares answers under the joint metric: a cheap tier that has
    the label right but the fields wrong is wrong, so the threshold must keep it out."""
    from cascade.calibrate import calibrate_runs, measure_tiers
    from cascade.config import load_config
    from cascade.evaluate import evaluate
    from cascade.router import Cascade

    texts = [f"fly to city{i}" for i in range(40)]
    gold_fields = [{"city": [f"city{i}"]} for i in range(40)]
    # the cheap tier: sure and fully right on the first 20; sure-ish, right label, wrong fields on the rest
    cheap = FieldsTier("cheap", {t: ("fly", ({"city": [f"city{i}"]} if i < 20 else {}), 0.99 if i < 20 else 0.8)
                                 for i, t in enumerate(texts)})
    big = FieldsTier("big", {t: ("fly", gf, 0.9) for t, gf in zip(texts, gold_fields)})
    gold = [answer_key("joint", "fly", gf) for gf in gold_fields]
    runs = measure_tiers(Cascade([cheap, big], [0.5, 0.0]), [False, True], texts, metric="joint")
    decision = calibrate_runs(runs, gold, target_accuracy=1.0)
    assert 0.8 < decision["chosen"].thresholds[0] <= 0.99 and decision["chosen"].accuracy == 1.0
    # the label metric would let the cheap tier answer everything
    runs_acc = measure_tiers(Cascade([cheap, big], [0.5, 0.0]), [False, True], texts, metric="accuracy")
    assert calibrate_runs(runs_acc, ["fly"] * 40, target_accuracy=1.0)["chosen"].llm_share == 0.0

    cfg = tmp_path / "cascade.toml"
    cfg.write_text('[task]\nname = "x"\nkind = "joint"\n\n[[tiers]]\nname = "cheap"\nkind = "majority"\n'
                   'threshold = 0.9\n\n[[tiers]]\nname = "big"\nkind = "majority"\nthreshold = 0.0\n')
    config = load_config(cfg)
    report, items = evaluate(Cascade([cheap, big], [0.5, 0.0]), config, texts, ["fly"] * 40,
                             gold_fields=gold_fields, field_names=["city"])
    ext = report["extraction"]
    assert report["accuracy"] == 1.0 and ext["metric"] == "joint" and ext["score"] == 0.5
    assert ext["exact_match"] == 0.5 and ext["span_precision"] == 1.0 and ext["span_recall"] == 0.5
    cheap_row = next(r for r in report["tiers"] if r["name"] == "cheap")
    assert cheap_row["exact_match"] == 0.5 and cheap_row["share"] == 1.0
    assert items[25]["correct"] is False and items[25]["fields"] == {} and items[25]["gold_fields"] == gold_fields[25]


def test_large_model_sequences_learn_label_then_fields_json():
    from tokenizers import Tokenizer, models, pre_tokenizers

    from training.large import build_sequences
    from training.task import FIELDS_CUE, TaskFormat, fields_json
    from training.trainer import IGNORE

    vocab = {c: i for i, c in enumerate(sorted(set("abcdefghijklmnopqrstuvwxyz{}[]\":, \nRFIq<|>_")))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="q"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    fmt = TaskFormat(["a"], [40], "R {text}\nI:", task_kind="joint", fields=["b", "c"])
    seq = build_sequences(tok, fmt, ["xy"], ["a"], True, eos_id=41, fields=[{"c": ["y"], "b": ["x"]}])[0]
    prompt = tok.encode("R xy\nI:").ids
    answer = tok.encode(FIELDS_CUE).ids + tok.encode('{"b": ["x"], "c": ["y"]}').ids + [41]
    assert fields_json({"c": ["y"], "b": ["x"]}, ["b", "c"]) == '{"b": ["x"], "c": ["y"]}'  # schema order
    assert seq.ids == prompt + [40] + answer
    assert seq.targets == [IGNORE] * (len(prompt) - 1) + [40] + answer + [IGNORE]


class JsonBackend:
    """A backend with fake capacity: label choice and constrained JSON from tables, recording
    the prompts and schemas it was sent."""

    name = "fake"

    def __init__(self, label_index, json_answers):
        self.label_index, self.json_answers, self.calls = label_index, json_answers, []

    def choose(self, prompts, choices):
        from serving.backends.base import ChoiceResult

        return [ChoiceResult(self.label_index, 0.8, [0.8 if i == self.label_index else 0.2 / (len(choices) - 1)
                                                     for i in range(len(choices))]) for _ in prompts]

    def generate_json(self, prompts, schemas, max_tokens):
        from serving.backends.base import JsonResult

        self.calls.append((prompts, schemas))
        return [JsonResult(json.dumps(v), v, math.log(0.5)) for v in self.json_answers[:len(prompts)]]

    def close(self):
        pass


def test_llm_tier_asks_for_schema_json_after_the_label():
    from serving.llm_tier import LLMTier

    backend = JsonBackend(1, [{"city": ["Oslo"], "dish": ["pizza"]}])
    tier = LLMTier("llm", backend, ["eat", "fly"], ["<|eat|>", "<|fly|>"], "R: {text}\nI:", task_kind="joint",
                   fields=["city", "dish"], label_fields={"fly": ["city"], "eat": ["dish"]})
    (pred,) = tier.predict_batch(["fly to Oslo for pizza"])
    assert pred.label == "fly" and pred.fields == {"city": ["Oslo"]}  # "dish" is not a field of "fly"
    assert pred.confidence == pytest.approx(0.8 * 0.5)
    (prompts, schemas), = backend.calls
    assert prompts == ["R: fly to Oslo for pizza\nI:<|fly|>\nFields:"]
    assert list(schemas[0]["properties"]) == ["city"] and "Oslo" in schemas[0]["$defs"]["span"]["enum"]
    # "dish" is outside the label's schema: a backend that did not constrain is counted
    assert tier.stats() == {"json": {"answers": 1, "cut": 0, "invalid": 1}}
    extract = LLMTier("llm", JsonBackend(0, [{"city": ["Oslo"]}]), [], [], "R: {text}\nI:", task_kind="extract",
                      fields=["city"])
    (pred,) = extract.predict_batch(["fly to Oslo"])
    assert pred.label == "" and pred.fields == {"city": ["Oslo"]} and pred.confidence == pytest.approx(0.5)


def test_calibration_replay_shares_match_the_router_on_joint_keys():
    from cascade.thresholds import TierRun, simulate

    gold = [answer_key("joint", "a", {"x": ["1"]}), answer_key("joint", "a", {"x": ["2"]})]
    cheap = TierRun("c", [gold[0], answer_key("joint", "a", {})], np.array([0.9, 0.9]), 0.1, False)
    big = TierRun("b", gold, np.array([0.5, 0.5]), 10.0, True)
    assert simulate([cheap, big], gold, (0.5, 0.0)).accuracy == 0.5
    assert simulate([cheap, big], gold, (0.95, 0.0)).accuracy == 1.0


def write_extract_cascade(tmp_path):
    """A joint cascade: a rules pack with named groups (order ids, e-mail addresses), then the
    majority tier as the fallback; a dataset dir for the majority tier to read."""
    (tmp_path / "rules.toml").write_text(r'''
[[rule]]
label = "track_order"
pattern = '\border (?P<order_id>[A-Z]{2}-\d{4})\b'
fields = ["order_id"]
confidence = 0.95

[[rule]]
label = "change_email"
pattern = '\bemail to (?P<email>[\w.+-]+@[\w-]+(?:\.[\w-]+)+)'
fields = ["email"]
confidence = 0.9
''')
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "val", "test"):
        (data / f"{split}.jsonl").write_text(json.dumps(
            {"id": "1", "text": "hello", "label": "talk_to_human", "fields": {}}) + "\n")
    (data / "labels.json").write_text(json.dumps({"labels": ["change_email", "talk_to_human", "track_order"],
                                                  "task": "joint", "fields": ["email", "order_id"]}))
    cfg = tmp_path / "cascade.toml"
    cfg.write_text(f'''[task]
name = "demo"
kind = "joint"

[[tiers]]
name = "rules"
kind = "rules"
path = "rules.toml"
threshold = 0.5

[[tiers]]
name = "fallback"
kind = "majority"
path = "{data}"
threshold = 0.0
''')
    return cfg


def test_fields_come_back_over_http_and_from_cascade_batch(tmp_path, serve_app):
    import httpx

    from serving.app import create_app

    cfg = write_extract_cascade(tmp_path)
    texts = ["where is order AB-1234 now", "change my email to ann.lee@mail.example.org please", "hi"]
    with serve_app(create_app(cfg)) as url:
        body = httpx.post(url + "/v1/classify", json={"texts": texts}).json()
    results = body["results"]
    assert [r["tier"] for r in results] == ["rules", "rules", "fallback"]
    assert results[0]["label"] == "track_order" and results[0]["fields"] == {"order_id": ["AB-1234"]}
    assert results[1]["fields"] == {"email": ["ann.lee@mail.example.org"]}
    assert results[2]["fields"] == {}
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps({"id": str(i), "text": t}) for i, t in enumerate(texts)) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["batch", str(src), "--config", str(cfg), "--out", str(out), "--no-progress"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r.get("fields") for r in rows[:2]] == [{"order_id": ["AB-1234"]}, {"email": ["ann.lee@mail.example.org"]}]


def test_rule_groups_that_repeat_give_every_value(tmp_path):
    from cascade.rules.pack import decide, load_pack, match_text

    (tmp_path / "r.toml").write_text(r'''
[[rule]]
label = "play"
pattern = 'play (?P<artist>\w+)(?: and (?P<artist>\w+))?'
fields = ["artist"]
''')
    decision = decide(match_text(load_pack(tmp_path / "r.toml"), "play abba and queen", 0.1))
    assert decision.match.fields == {"artist": ["abba", "queen"]}


def test_demo_task_with_fields(tmp_path):
    from cascade.app.demo import make_demo
    from cascade.app.quickstart import fields_by_tier

    make_demo(tmp_path / "x", per_label=(30, 5, 5), extract=True)
    make_demo(tmp_path / "c", per_label=(30, 5, 5))
    assert load_labels(tmp_path / "x").fields == ["date", "email", "order_id"]
    assert load_labels(tmp_path / "c").task == "classify"
    rows = load_split(tmp_path / "x", "train")
    with_fields = [ex for ex in rows if ex.fields]
    assert len(with_fields) > 100 and any("email" in ex.fields for ex in rows)
    for ex in with_fields:
        assert check_fields(ex.text, ex.fields, ["date", "email", "order_id"]) is None
        assert all(not v.startswith("#") for v in ex.fields.get("order_id", []))
    assert all(ex.fields is None for ex in load_split(tmp_path / "c", "train"))
    from cascade.router import Cascade

    rules = FieldsTier("rules", {"b": ("l", {"x": ["b"]}, 0.4)})
    llm = FieldsTier("llm", {"a": ("l", {}, 1.0), "c": ("l", {"x": ["c"]}, 0.9)})
    shown = fields_by_tier(Cascade([rules, llm], [0.5, 0.0]), ["a", "b", "c"])
    assert "rules: 'b' -> {'x': ['b']} (confidence 0.400, would escalate)" in shown
    assert "llm: 'c' -> {'x': ['c']} (confidence 0.900, answers)" in shown


def test_traffic_log_entries_keep_every_tiers_fields():
    from serving.traffic_log import entry_of

    llm = Prediction("fly", 0.9, "llm", fields={"city": ["Oslo"]})
    cheap = Prediction("fly", 0.4, "student", fields={})
    final = Prediction("fly", 0.9, "llm", fields={"city": ["Oslo"]}, trail=[cheap, llm])
    entry = entry_of(final, "fly to Oslo", "r1", 0, "llm", "keep")
    assert entry["fields"] == {"city": ["Oslo"]} and entry["llm"]["fields"] == {"city": ["Oslo"]}
    assert [t.get("fields") for t in entry["trail"]] == [{}, {"city": ["Oslo"]}]
    plain = entry_of(Prediction("a", 0.9, "llm"), "t", None, 0, "llm", "keep")
    assert "fields" not in plain and "fields" not in plain["llm"]
