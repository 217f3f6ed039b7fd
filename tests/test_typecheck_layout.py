"""`.typecheck/conceptclef/` lets mypy and pyright resolve `conceptclef.*` in a clone (the root is the package).

It must mirror the package: a subpackage or top-level module without a link would be reported
as a missing import (or, if nothing imports it, silently go unchecked).
"""

from __future__ import annotations

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MIRROR = REPO / ".typecheck" / "conceptclef"


def _package_entries() -> set[str]:
    settings = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = settings["tool"]["setuptools"]["packages"]
    subpackages = {name.split(".")[1] for name in packages if "." in name}
    python_packages = {name for name in subpackages if (REPO / name / "__init__.py").is_file()}  # not configs/ (data)
    return python_packages | {path.name for path in REPO.glob("*.py")}


def test_mirror_links_every_module_and_subpackage_to_the_root():
    entries = {path.name for path in MIRROR.iterdir()}
    assert entries == _package_entries()
    for name in entries:
        link = MIRROR / name
        assert link.is_symlink(), f"{link} must be a symlink (a copy would go stale)"
        assert not Path(link.readlink()).is_absolute(), f"{link}: relative target, so it works in any clone"
        assert link.resolve() == REPO / name


def test_no_link_points_at_the_root_or_above():
    # A link to the root would be a loop for tools that follow symlinks (shutil.copytree, os.walk(followlinks=True)).
    for link in MIRROR.iterdir():
        target = link.resolve()
        assert target != REPO and target not in REPO.parents, f"{link} -> {target}"


def test_mypy_finds_the_package_through_the_mirror():
    mypy = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["mypy"]
    assert ".typecheck" in mypy["mypy_path"].split(",")
    assert mypy["packages"] == ["conceptclef"]
