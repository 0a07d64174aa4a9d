"""The application on top of the three layers: the `cascade` command (`cli.py`), the
quickstart and its demo task. The router core (`cascade/` outside this package) imports none
of it, nor `training` or `serving` (tests/test_architecture.py checks the imports)."""
