"""Rule packs: the format and matcher (`pack.py`), per-rule precision and conflicts on a labelled
split (`check.py`, `cascade rules check`), and mining a pack from train (`mine.py`, `cascade
rules mine`). The packs themselves are TOML files in the repo's top-level `rules/`."""
