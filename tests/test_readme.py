"""The README's "Code design" table names every module of the package, and nothing that is not there."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("reconq", "core", "gateway", "api", "workers", "scheduler", "recon", "parametermaps")


def design_table_paths() -> set[str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Code design\n", 1)[1].split("\n## ", 1)[0]
    paths = set()
    for row in section.splitlines():
        if row.startswith("| `"):
            first_cell = row.split(" | ")[0]
            paths.update(re.findall(r"`([^`]+)`", first_cell))
    return paths


def test_the_code_design_table_names_what_exists():
    missing = sorted(p for p in design_table_paths() if not (ROOT / p).exists())
    assert not missing, f"named in the README's Code design table but not in the tree: {missing}"


def test_every_module_is_in_the_code_design_table():
    named = design_table_paths()
    folders = {p.rstrip("/") for p in named if p.endswith("/")}
    modules = [p.relative_to(ROOT).as_posix() for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")
               if p.name != "__init__.py" and "__pycache__" not in p.parts]
    unnamed = sorted(m for m in modules if m not in named and not any(m.startswith(f + "/") for f in folders))
    assert not unnamed, f"modules missing from the README's Code design table: {unnamed}"
