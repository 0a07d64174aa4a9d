import pytest

from cascade.config import ConfigError, build_cascade, dump_config, load_config

GOOD = """
[task]
name = "demo"

[[tiers]]
name = "rules"
kind = "rules"
path = "pack.toml"
threshold = 0.5

[[tiers]]
name = "fallback"
kind = "majority"
path = "data"
"""


@pytest.fixture
def workdir(tmp_path, make_dataset):
    make_dataset({s: [("hello there", "greet"), ("bye now", "bye"), ("hi", "greet")] for s in ("train", "val", "test")},
                 name="data")
    (tmp_path / "pack.toml").write_text("[[rule]]\nlabel = 'bye'\npattern = '\\bbye\\b'\nconfidence = 0.9\n")
    return tmp_path


def test_good_config_builds_a_cascade_with_relative_paths(workdir):
    (workdir / "cascade.toml").write_text(GOOD)
    config = load_config(workdir / "cascade.toml")
    assert [t.name for t in config.tiers] == ["rules", "fallback"]
    assert config.serving.max_text_chars == 4000
    cascade = build_cascade(config, workdir)
    preds = cascade.predict_batch(["bye now", "what"])
    assert [(p.label, p.tier) for p in preds] == [("bye", "rules"), ("greet", "fallback")]


@pytest.mark.parametrize("bad, key", [
    (GOOD.replace("threshold = 0.5", "threshold = 2.5"), "tiers[0].threshold"),
    (GOOD.replace('kind = "majority"', 'kind = "magic"'), "tiers[1].kind"),
    (GOOD.replace('path = "data"', 'path = "data"\ntreshold = 0.2'), "tiers[1].treshold"),
    (GOOD.replace('name = "demo"', ""), "task.name"),
    (GOOD.replace('name = "fallback"', 'name = "rules"'), "tiers[1].name"),
    (GOOD + "\n[serving]\nmax_queue = 0\n", "serving.max_queue"),
])
def test_errors_name_the_file_and_key(tmp_path, bad, key):
    (tmp_path / "cascade.toml").write_text(bad)
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "cascade.toml")
    assert f"{tmp_path / 'cascade.toml'}: {key}" in str(err.value)


def test_unreadable_config(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")
    (tmp_path / "bad.toml").write_text("[task\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(tmp_path / "bad.toml")


def test_dump_roundtrip(workdir):
    (workdir / "cascade.toml").write_text(GOOD)
    config = load_config(workdir / "cascade.toml")
    config.tiers[0].threshold = 0.75
    dump_config(config, workdir / "out.toml")
    assert load_config(workdir / "out.toml") == config


def test_majority_tier_options(workdir):
    text = GOOD.replace('path = "data"', 'path = "data"\noptions = { label = "nope" }')
    (workdir / "cascade.toml").write_text(text)
    with pytest.raises(ValueError, match="options.label 'nope'"):
        build_cascade(load_config(workdir / "cascade.toml"), workdir)
    (workdir / "cascade.toml").write_text(GOOD.replace('path = "data"', 'path = "data"\noptions = { label = "bye" }'))
    cascade = build_cascade(load_config(workdir / "cascade.toml"), workdir)
    assert cascade.predict("hello").label == "bye"
