"""The distribution: one import name, package data installed, and the import layers that hold it up.

ReconQ's folders (gateway/, workers/, recon/, ...) install under the single top-level name ``reconq``,
so nothing generic lands in a user's environment. The layers of pyproject.toml's ``[tool.importlinter]``
are checked here on an installed copy (the tree ``lint-imports`` reads), and shown to catch an upward
import.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from a copy of the source (setuptools would pack stale files left in ./build)."""
    source, out = tmp_path_factory.mktemp("source") / "reconq", tmp_path_factory.mktemp("wheel")
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", ".*_cache", "reconq-data", "reconq-demo"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(out), str(source)], check=True, capture_output=True, timeout=300)
    (built,) = out.glob("reconq-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel unpacked as pip would install it into site-packages."""
    target = tmp_path_factory.mktemp("site")
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(target)
    return target


def lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", str(ROOT / "pyproject.toml")], cwd=tree,
                          capture_output=True, text=True, timeout=300)


def test_the_wheel_installs_one_top_level_name(wheel: Path):
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        top_level = zf.read(f"{dist_info}/top_level.txt").decode().split()
    assert top_level == ["reconq"]
    assert {n.split("/")[0] for n in names} == {"reconq", dist_info}
    for needed in ("reconq/gateway/protocol.py", "reconq/api/dashboard/index.html",
                   "reconq/parametermaps/default_map.yaml", "reconq/core/lua/job_update.lua",
                   "reconq/recon/__init__.py", "reconq/scheduler/admission.py", "reconq/workers/tasks.py"):
        assert needed in names, needed


def test_the_layers_hold_and_an_upward_import_breaks_them(installed: Path, tmp_path: Path):
    """One upward import added to the installed tree: lint-imports reports that one and nothing else, so
    the tree as built keeps every contract, and a new upward import fails the check."""
    tree = tmp_path / "site"
    shutil.copytree(installed, tree)
    with (tree / "reconq" / "core" / "storage.py").open("a") as f:
        f.write("\nfrom reconq.scheduler import routing  # noqa: E402,F401 - an upward import\n")
    result = lint_imports(tree)
    assert result.returncode == 1, result.stdout
    assert "1 kept, 1 broken" in result.stdout, result.stdout
    assert "reconq.core is not allowed to import reconq.scheduler" in result.stdout
    broken = [line.split(" (l.")[0] for line in result.stdout.splitlines() if " -> " in line]
    assert broken == ["- reconq.core.storage -> reconq.scheduler.routing"], result.stdout
