"""The layering, checked from the source (ast, nothing executed): the router core — `cascade/`
outside the application package — imports nothing of `training`, `serving`, the application
(`cascade.app`) or torch, at module level or inside functions. Tier kinds and backends that
live above it are named in its lazy registries (`cascade.tiers.TIER_KINDS`) as strings."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = ("training", "serving", "torch", "cascade.app")
# The application sits on top: `cascade/app/`, and `python -m cascade` (which runs it).
ABOVE_THE_CORE = ("cascade/app/", "cascade/__main__.py")


def imported_modules(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def core_modules() -> list[Path]:
    return [p for p in sorted((REPO / "cascade").rglob("*.py"))
            if not str(p.relative_to(REPO)).startswith(ABOVE_THE_CORE)]


def test_the_core_imports_nothing_above_it():
    files = core_modules()
    assert len(files) > 15 and REPO / "cascade" / "router.py" in files
    bad = [f"{p.relative_to(REPO)}:{line}: imports {name}" for p in files for line, name in imported_modules(p)
           if any(name == f or name.startswith(f + ".") for f in FORBIDDEN)]
    assert not bad, "the router core reaches above itself:\n" + "\n".join(bad)


def test_the_check_sees_imports_inside_functions(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def build():\n    from serving.backends import build_backend\n    import torch.nn\n")
    assert [name for _, name in imported_modules(f)] == ["serving.backends", "torch.nn"]


def test_one_cpu_probe_agrees_with_itself_and_imports_no_torch():
    import subprocess
    import sys

    from cascade.cpu import cpu_class, cpu_flags, cpu_report, has_fast_bf16

    report = cpu_report()
    assert report["class"] == cpu_class() in ("AMX", "AVX512-BF16", "AVX2-only", "other")
    assert has_fast_bf16() == (report["class"] in ("AMX", "AVX512-BF16"))
    assert set(report["flags"]) <= cpu_flags()
    code = "import sys, cascade.cpu; cascade.cpu.cpu_report(); assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0
