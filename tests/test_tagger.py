"""The tagging student (issue 18): BIO encode/decode, training from gold and from the large
model's extractions, ONNX export with parity, the student tier's fields, batch invariance."""

import json
import random
from pathlib import Path

import numpy as np
import pytest

from cascade.tagging import auroc, decode_tags, encode_tags, item_confidence, locate_spans, risk_coverage_area, tag_set
from tests.helpers import run_docs_recipe

FIELDS = ["artist", "city", "day", "playlist", "reminder", "track"]
ARTISTS = ["adele", "clem burke", "the beatles", "björk", "sigur rós", "miles davis"]
TRACKS = ["hello", "love", "blue in green", "yesterday", "hyperballad", "glósóli"]
CITIES = ["paris", "new york", "são paulo", "köln", "tokyo", "austin"]
DAYS = ["today", "tomorrow", "on monday", "this weekend"]
PLAYLISTS = ["love", "road trip", "chill vibes", "workout"]


def bpe(texts=None):
    from training.large import train_bpe

    return train_bpe(texts or [f"play {t} by {a} in {c} {d} to {p}" for t in TRACKS for a in ARTISTS
                               for c in CITIES[:2] for d in DAYS[:2] for p in PLAYLISTS[:2]], 300)


# --- BIO encoding and decoding ----------------------------------------------------------------

ROUND_TRIPS = [
    # a value at the text's start and one at its end
    ("adele sings hello", {"artist": ["adele"], "track": ["hello"]}),
    # repeated words: the same word as two fields, and one field twice
    ("play love from my love playlist", {"track": ["love"], "playlist": ["love"]}),
    ("play adele and adele", {"artist": ["adele", "adele"]}),
    # adjacent spans of different fields, no word between them
    ("weather paris tomorrow", {"city": ["paris"], "day": ["tomorrow"]}),
    ("play hello adele", {"track": ["hello"], "artist": ["adele"]}),
    # unicode: multi-byte characters split over byte-level tokens
    ("play glósóli by sigur rós in são paulo", {"track": ["glósóli"], "artist": ["sigur rós"], "city": ["são paulo"]}),
    ("日本 weather in köln", {"city": ["köln"]}),
    # two spaces inside a value; punctuation next to a value
    ("play blue  in green, now", {"track": ["blue  in green"]}),
    ("is it raining in (tokyo)?", {"city": ["tokyo"]}),
    ("no fields here", {}),
]


@pytest.mark.parametrize("text,fields", ROUND_TRIPS)
def test_bio_round_trip_on_byte_level_bpe_tokens(text, fields):
    tok = bpe()
    tags = tag_set(FIELDS)
    offsets = tok.encode(text).offsets
    spans, missing = locate_spans(text, fields)
    assert not missing
    ids = encode_tags(text, offsets, spans, tags)
    assert decode_tags(text, offsets, ids, tags) == fields
    assert all(tags[i].startswith("B-") for i in [ids[k] for k in range(len(ids)) if ids[k] and
                                                 (k == 0 or ids[k - 1] == 0)])  # every span opens with B


def test_locate_spans_puts_repeated_words_in_order_and_prefers_whole_words():
    text = "play love from my love playlist"
    assert locate_spans(text, {"track": ["love"], "playlist": ["love"]})[0] == [(5, 9, "track"), (18, 22, "playlist")]
    # "art" as a word, not inside "party"
    assert locate_spans("party art", {"genre": ["art"]})[0] == [(6, 9, "genre")]
    # a value that is not in the text is reported, not placed
    assert locate_spans("play adele", {"artist": ["björk"]}) == ([], [("artist", "björk")])


def test_decoding_rules():
    tags = tag_set(["a", "b"])  # O B-a I-a B-b I-b
    text = "w0 w1 w2 w3 w4"
    offsets = [(0, 2), (2, 5), (5, 8), (8, 11), (11, 14)]  # byte-level style: leading spaces
    # an I without a B starts a span; I of another name starts a new one; B after B splits
    assert decode_tags(text, offsets, [2, 2, 4, 0, 0], tags) == {"a": ["w0 w1"], "b": ["w2"]}
    assert decode_tags(text, offsets, [1, 1, 0, 3, 4], tags) == {"a": ["w0", "w1"], "b": ["w3 w4"]}
    # tags beyond the offsets (the empty text's filler token) are ignored
    assert decode_tags("", [], [1], tags) == {}


def test_confidence_estimates_and_auroc_by_hand():
    p = np.array([[0.9, 0.1], [0.6, 0.4], [0.8, 0.2]])
    assert item_confidence(p, "product") == pytest.approx(0.9 * 0.6 * 0.8)
    assert item_confidence(p, "min") == pytest.approx(0.6)
    assert item_confidence(p, "mean") == pytest.approx((0.9 + 0.6 + 0.8) / 3)
    assert item_confidence(p, "min", label_prob=0.5) == pytest.approx(0.3)
    assert auroc([0.9, 0.8, 0.3, 0.1], [True, True, False, False]) == 1.0
    assert auroc([0.1, 0.9], [True, False]) == 0.0
    assert auroc([0.5, 0.5], [True, False]) == 0.5
    assert auroc([0.5, 0.7], [True, True]) is None
    # most confident first: wrong, right -> risks 1, 1/2
    assert risk_coverage_area([0.9, 0.1], [False, True]) == pytest.approx(0.75)


# --- a tiny tagging student --------------------------------------------------------------------

torch = pytest.importorskip("torch")


def _row(rng: random.Random) -> tuple[str, str, dict]:
    kind = rng.randrange(3)
    if kind == 0:
        t, a = rng.choice(TRACKS), rng.choice(ARTISTS)
        return f"play {t} by {a}", "PlayMusic", {"track": [t], "artist": [a]}
    if kind == 1:
        c, d = rng.choice(CITIES), rng.choice(DAYS)
        return f"weather in {c} {d}", "GetWeather", {"city": [c], "day": [d]}
    t, p = rng.choice(TRACKS), rng.choice(PLAYLISTS)
    return f"add {t} to my {p} playlist", "AddToPlaylist", {"track": [t], "playlist": [p]}


def joint_dataset(root: Path) -> Path:
    """A synthetic joint task: 3 intents, 5 fields used (`reminder` is in the schema, never in gold)."""
    rng = random.Random(0)
    root.mkdir(parents=True)
    for split, n in (("train", 240), ("val", 60), ("test", 60)):
        with (root / f"{split}.jsonl").open("w") as f:
            for i in range(n):
                text, label, fields = _row(rng)
                f.write(json.dumps({"id": f"{split}-{i}", "text": text, "label": label, "fields": fields}) + "\n")
    (root / "labels.json").write_text(json.dumps({"labels": ["AddToPlaylist", "GetWeather", "PlayMusic"],
                                                  "oos_label": None, "task": "joint", "fields": FIELDS}))
    return root


TRAIN_FLAGS = ["--size", "debug", "--max-steps", "150", "--batch-size", "16", "--lr", "5e-3", "--warmup-steps", "5",
               "--precision", "fp32", "--vocab-size", "300", "--max-len", "24", "--no-progress", "--ckpt-every", "0"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models train 8x faster on one thread than on two contended cores (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tagger(tmp_path_factory):
    """(student dir trained from gold alone and exported with --int8, dataset dir)."""
    from cascade.app.cli import main

    root = tmp_path_factory.mktemp("tagger")
    data = joint_dataset(root / "data")
    out = root / "student"
    assert main(["train", "student", "--data", str(data), "--teacher", "none", "--out", str(out), *TRAIN_FLAGS]) == 0
    assert main(["export", "--model", str(out), "--int8"]) == 0
    return out, data


def test_tagging_student_learns_to_extract_and_records_how_to_decode(tagger):
    from cascade.data import load_split
    from cascade.metrics import span_scores
    from training.student import StudentTagger, load_student
    from training.tagging import tagger_answers

    out, data = tagger
    summary = json.loads((out / "train_summary.json").read_text())
    config = json.loads((out / "config.json").read_text())
    calib = json.loads((out / "calibration.json").read_text())
    assert config["cascade"]["tags"] == tag_set(FIELDS) and config["cascade"]["task"] == "joint"
    assert config["architectures"] == ["CascadeStudentTagger"] and config["id2tag"]["1"] == "B-artist"
    assert calib["confidence"]["method"] in ("product", "min", "mean") and calib["tag_temperature"] > 0
    assert set(summary["confidence_auroc"]) == {"product", "min", "mean"}
    model = load_student(out)
    assert isinstance(model, StudentTagger)
    train = load_split(data, "train")
    tok = __import__("tokenizers").Tokenizer.from_file(str(out / "tokenizer.json"))
    answers = tagger_answers(model, tok, [ex.text for ex in train], 24)
    scores = span_scores([ex.fields for ex in train], answers.fields([ex.text for ex in train], tag_set(FIELDS)))
    assert scores["exact_match"] >= 0.9, scores
    assert summary["val_exact_match"] >= 0.8 and summary["val_accuracy"] >= 0.9, summary


def test_export_parity_and_the_tier_returns_torch_decoded_fields(tagger):
    from tokenizers import Tokenizer

    from cascade.data import load_split
    from cascade.tiers.student import load_student_tier
    from training.student import load_student
    from training.tagging import tagger_answers

    out, data = tagger
    report = json.loads((out / "export.json").read_text())
    assert report["parity_max_abs_diff"] < 1e-4 and report["parity_tag_max_abs_diff"] < 1e-4
    assert report["parity_fields_identical"] == 1.0
    assert report["int8"]["fields_agreement"] >= 0.9 and "top1_agreement" in report["int8"]
    texts = [ex.text for ex in load_split(data, "test")] + ["", "play glósóli by björk", "weather"]
    torch_fields = tagger_answers(load_student(out), Tokenizer.from_file(str(out / "tokenizer.json")), texts,
                                  24).fields(texts, tag_set(FIELDS))
    tier = load_student_tier(out, model_file="model.onnx")
    preds = tier.predict_batch(texts)
    assert [p.fields for p in preds] == torch_fields
    assert all(0 < p.confidence <= 1 and p.scores is not None for p in preds)
    int8 = load_student_tier(out).predict_batch(texts)  # the default graph: static int8
    assert np.mean([a.fields == b for a, b in zip(int8, torch_fields)]) >= 0.9


def test_fields_and_confidence_do_not_depend_on_the_batch(tagger):
    from cascade.data import load_split
    from cascade.tiers.student import load_student_tier

    out, data = tagger
    texts = [ex.text for ex in load_split(data, "test")][:40] + ["play " + " ".join(TRACKS * 4)]  # one truncated
    tier = load_student_tier(out)  # static int8
    alone = [tier.predict_batch([t])[0] for t in texts]
    perm = np.random.default_rng(0).permutation(len(texts))
    for batch_size in (32, 7):
        tier.batch_size = batch_size
        mixed = tier.predict_batch([texts[i] for i in perm])
        for p, i in zip(mixed, perm):
            assert p.fields == alone[i].fields and p.label == alone[i].label
            assert abs(p.confidence - alone[i].confidence) <= 1e-6


def test_teacher_fields_rows_are_learnt_and_gold_wins(tagger, tmp_path):
    from tokenizers import Tokenizer

    from cascade.app.cli import main
    from cascade.data import load_split
    from training.student import load_student
    from training.tagging import tagger_answers

    _, data = tagger
    things = ["the dentist", "milk", "mom's birthday", "the keys", "rent", "the game", "taxes", "laundry"]
    rows = [{"text": f"remind me about {t} {d}", "fields": {"reminder": [t], "day": [d]}} for t in things for d in DAYS]
    first = load_split(data, "train")[0]
    rows.append({"text": first.text, "fields": {}})  # a wrong extraction of a gold text: ignored
    teacher = tmp_path / "teacher_fields.jsonl"
    teacher.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "student"
    assert main(["train", "student", "--data", str(data), "--teacher", "none", "--out", str(out),
                 "--teacher-fields", str(teacher), *TRAIN_FLAGS]) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["teacher_fields"]["used"] == len(rows) - 1 and summary["teacher_fields"]["gold_won"] == 1
    texts = [r["text"] for r in rows[:-1]]
    answers = tagger_answers(load_student(out), Tokenizer.from_file(str(out / "tokenizer.json")), texts, 24)
    learnt = answers.fields(texts, tag_set(FIELDS))
    hits = np.mean([f.get("reminder") == r["fields"]["reminder"] for f, r in zip(learnt, rows)])
    assert hits >= 0.8, learnt[:5]
    # the gold-only student never saw the field
    gold_only = tagger_answers(load_student(tagger[0]), Tokenizer.from_file(str(tagger[0] / "tokenizer.json")),
                               texts, 24).fields(texts, tag_set(FIELDS))
    assert not any("reminder" in f for f in gold_only)


def test_teacher_fields_must_be_spans_of_their_text(tagger, tmp_path):
    from training.distill import read_teacher_fields

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "play adele", "fields": {"artist": ["björk"]}}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1: .*does not occur"):
        read_teacher_fields(bad, FIELDS)


def test_a_classify_dataset_still_trains_the_plain_classifier(make_dataset, tmp_path):
    from cascade.app.cli import main
    from training.student import StudentClassifier, StudentTagger, load_student

    rows = [(f"play song {i}", "music") for i in range(24)] + [(f"weather in city {i}", "weather") for i in range(24)]
    data = make_dataset({"train": rows, "val": rows[::4], "test": rows[1::4]})
    out = tmp_path / "student"
    flags = [f for f in TRAIN_FLAGS]
    flags[flags.index("150")] = "30"
    assert main(["train", "student", "--data", str(data), "--teacher", "none", "--out", str(out), *flags]) == 0
    model = load_student(out)
    assert isinstance(model, StudentClassifier) and not isinstance(model, StudentTagger)
    config = json.loads((out / "config.json").read_text())
    assert "n_tags" not in config["cascade"]["config"] and "tags" not in config["cascade"]
    assert config["architectures"] == ["CascadeStudentClassifier"]


def test_a_joint_student_distils_labels_from_the_large_model_beside_teacher_fields(tagger, tmp_path):
    from cascade.app.cli import main

    _, data = tagger
    teacher = tmp_path / "teacher"
    assert main(["train", "large", "--data", str(data), "--out", str(teacher), "--size", "debug", "--max-steps", "20",
                 "--batch-size", "8", "--lr", "3e-3", "--warmup-steps", "3", "--precision", "fp32", "--vocab-size",
                 "300", "--no-progress", "--ckpt-every", "100"]) == 0
    extra = tmp_path / "teacher_fields.jsonl"
    extra.write_text("".join(json.dumps({"text": f"remind me about rent {d}", "fields": {"reminder": ["rent"],
                                                                                         "day": [d]}}) + "\n"
                             for d in DAYS))
    out = tmp_path / "student"
    flags = list(TRAIN_FLAGS)
    flags[flags.index("150")] = "40"
    assert main(["train", "student", "--data", str(data), "--teacher", str(teacher), "--out", str(out),
                 "--teacher-fields", str(extra), *flags]) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    # the teacher labelled the train texts and the teacher-fields texts (KD on both)
    assert summary["teacher"] == str(teacher) and summary["unlabeled_texts"] == len(DAYS)
    assert summary["teacher_fields"]["used"] == len(DAYS)
    assert json.loads((out / "cascade.json").read_text())["teacher"] == "../teacher"


def test_an_extract_task_trains_a_tagger_whose_label_is_empty(tagger, tmp_path):
    from cascade.app.cli import main
    from cascade.tiers.student import load_student_tier

    _, joint = tagger
    data = tmp_path / "extract"
    data.mkdir()
    for split in ("train", "val", "test"):
        rows = [json.loads(line) for line in (joint / f"{split}.jsonl").read_text().splitlines()]
        (data / f"{split}.jsonl").write_text("".join(json.dumps({"id": r["id"], "text": r["text"],
                                                                 "fields": r["fields"]}) + "\n" for r in rows))
    (data / "labels.json").write_text(json.dumps({"labels": [], "oos_label": None, "task": "extract",
                                                  "fields": FIELDS}))
    out = tmp_path / "student"
    assert main(["train", "student", "--data", str(data), "--teacher", "none", "--out", str(out), *TRAIN_FLAGS]) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["val_exact_match"] >= 0.8 and "val_accuracy" not in summary
    assert json.loads((out / "cascade.json").read_text())["labels"] == [""]
    assert main(["export", "--model", str(out)]) == 0
    pred = load_student_tier(out, model_file="model.onnx").predict_batch(["play hello by adele"])[0]
    assert pred.label == "" and pred.scores is None and 0 < pred.confidence <= 1
    assert pred.fields == {"track": ["hello"], "artist": ["adele"]}


def test_onnxruntime_and_tokenizers_alone_reproduce_the_tier(tagger):
    import re

    from cascade.tiers.student import load_student_tier

    out, _ = tagger
    doc = (Path(__file__).resolve().parents[1] / "docs" / "extraction.md").read_text()
    code = re.search(r"```python\n(.*?)```", doc[doc.index("## Student tagger"):], re.S).group(1)
    texts = ["play glósóli by björk", "weather in new york tomorrow", "add love to my love playlist", ""]
    got = run_docs_recipe(code, out, '"models/tagger"', "{'answers': [answer(t) for t in json.loads(sys.argv[1])]}",
                          texts)
    assert got["modules"] == []
    for (label, fields, conf), pred in zip(got["answers"], load_student_tier(out).predict_batch(texts)):
        assert (label, fields) == (pred.label, pred.fields)
        assert abs(conf - pred.confidence) <= 1e-6


def test_decoding_widens_a_half_tagged_word_to_the_whole_word():
    """Seen on SNIPS over HTTP: "beatles" as tokens "beat" + "les", tagged B-music_item and
    B-artist, came back as two invented values. A value is made of whole words."""
    text = "play yesterday by the beatles"
    tags = tag_set(["artist", "music_item"])
    offsets = [(0, 4), (4, 14), (14, 17), (17, 21), (21, 26), (26, 29)]  # " beat", "les"
    ids = [tags.index(t) for t in ("O", "O", "O", "O", "B-artist", "B-music_item")]
    assert decode_tags(text, offsets, ids, tags) == {"artist": ["beatles"]}  # one value, the first one's field
    ids = [tags.index(t) for t in ("O", "O", "O", "B-artist", "B-music_item", "B-artist")]
    assert decode_tags(text, offsets, ids, tags) == {"artist": ["the"], "music_item": ["beatles"]}
    ids = [tags.index(t) for t in ("O", "O", "O", "O", "B-music_item", "O")]
    assert decode_tags(text, offsets, ids, tags) == {"music_item": ["beatles"]}
