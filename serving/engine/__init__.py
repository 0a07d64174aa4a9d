"""The built-in paged-KV engine (CPU default): engine -> scheduler -> KV-cache manager -> runner.

Needs torch; `cascade/` never imports it. See docs/engine.md.
"""
