import json
from collections import Counter

import pytest

from cascade.app.cli import main
from cascade.data import DataError, Example, load_labels, load_split, prepare, read_table, stratified_split

from .conftest import shared


def test_clinc150_counts_include_out_of_scope(clinc_dir):
    splits = {s: load_split(clinc_dir, s) for s in ("train", "val", "test")}
    assert {s: len(r) for s, r in splits.items()} == {"train": 15100, "val": 3100, "test": 5500}
    oos = {s: sum(ex.label == "oos" for ex in r) for s, r in splits.items()}
    assert oos == {"train": 100, "val": 100, "test": 1000}
    labels = load_labels(clinc_dir)
    assert len(labels.labels) == 151 and labels.oos_label == "oos"
    assert len({ex.id for ex in splits["train"]}) == 15100  # ids are unique


def test_banking77_carves_a_stratified_seeded_val(banking_dir, tmp_path):
    train, val, test = (load_split(banking_dir, s) for s in ("train", "val", "test"))
    assert len(train) + len(val) == 10003 and len(test) == 3080
    assert load_labels(banking_dir).oos_label is None
    tc, vc = Counter(ex.label for ex in train), Counter(ex.label for ex in val)
    assert set(vc) == set(tc) and len(tc) == 77
    for label in tc:  # every label keeps ~10% in val
        assert abs(vc[label] / (tc[label] + vc[label]) - 0.1) < 0.02
    again = tmp_path / "again"
    prepare("banking77", shared("banking77"), again)
    assert (again / "val.jsonl").read_text() == (banking_dir / "val.jsonl").read_text()


def test_stratified_split_keeps_singletons_and_is_seeded():
    exs = [Example(str(i), f"t{i}", "a" if i < 10 else "b") for i in range(11)]
    rest, carved = stratified_split(exs, 0.3, seed=1)
    assert Counter(ex.label for ex in carved) == {"a": 3}  # "b" has one example: stays
    assert len(rest) + len(carved) == 11
    assert stratified_split(exs, 0.3, seed=1)[1] == carved
    with pytest.raises(ValueError):
        stratified_split(exs, 1.5, seed=1)


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_csv_bad_rows_are_reported_with_line_numbers(tmp_path):
    f = write(tmp_path / "d.csv", 'text,label\nhello,greet\n,greet\n"two\nlines",greet\nbye,\n')
    rows, bad = read_table(f)
    assert [r.text for r in rows] == ["hello", "two\nlines"]
    assert [str(b) for b in bad] == [f"{f}:3: empty or missing text", f"{f}:6: missing label"]


def test_prepare_fails_on_bad_rows_unless_skip_bad(tmp_path, capsys):
    src = write(tmp_path / "d.jsonl", "".join(
        json.dumps({"text": f"text {i}", "label": "ab"[i % 2]}) + "\n" for i in range(40)
    ) + '{"text": "", "label": "a"}\nnot json\n{"text": "no label"}\n')
    with pytest.raises(DataError) as err:
        prepare("jsonl", src, tmp_path / "out")
    msg = str(err.value)
    assert "3 bad rows" in msg and f"{src}:41: empty" in msg and f"{src}:42: not valid JSON" in msg
    assert f"{src}:43: missing label" in msg
    assert not (tmp_path / "out" / "train.jsonl").exists()

    assert main(["data", "prepare", "--dataset", "jsonl", "--path", str(src), "--out", str(tmp_path / "o")]) == 2
    assert "--skip-bad" in capsys.readouterr().err

    assert main(["data", "prepare", "--dataset", "jsonl", "--path", str(src), "--out", str(tmp_path / "o"),
                 "--skip-bad"]) == 0
    captured = capsys.readouterr()
    assert "skipped 3 bad rows" in captured.err
    counts = {s: len(load_split(tmp_path / "o", s)) for s in ("train", "val", "test")}
    assert sum(counts.values()) == 40 and counts["val"] == 4 and counts["test"] == 4


def test_csv_dir_with_splits_and_custom_columns(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    rows = "".join(f"q{i},{'xy'[i % 2]}\n" for i in range(20))
    write(src / "train.csv", "query,intent\n" + rows)
    write(src / "test.csv", "query,intent\nq,x\n")
    rep = prepare("csv", src, tmp_path / "out", text_field="query", label_field="intent")
    assert rep.counts == {"train": 18, "val": 2, "test": 1}
    with pytest.raises(DataError, match="no column 'text'"):
        prepare("csv", src, tmp_path / "out2")


def test_loading_a_missing_or_broken_dataset_names_the_file(tmp_path):
    with pytest.raises(DataError, match="labels.json"):
        load_labels(tmp_path)
    write(tmp_path / "val.jsonl", '{"text": "a", "label": "x"}\n{"text": "  ", "label": "x"}\n')
    with pytest.raises(DataError, match=r"val.jsonl:2"):
        load_split(tmp_path, "val")
