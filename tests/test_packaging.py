"""The installed package is one import name, `conceptclef`, usable next to other research code.

A wheel is built from the repository, installed (not editable) into a fresh virtual environment
that borrows this environment's dependencies, and its console script trains the demo from a
folder that has its own `data/` and `core/` packages: with nine top-level names, that folder's
packages would shadow ours.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _build_wheel(out: Path) -> Path:
    # Built from a copy: an in-tree build would leave build/ and *.egg-info in the repository.
    source = out / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".venv", ".git", ".typecheck", "demo", "runs", "build", "*.egg-info", "__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(out), str(source)],
        check=True, cwd=out,
    )
    (wheel,) = out.glob("conceptclef-*.whl")
    return wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return _build_wheel(tmp_path_factory.mktemp("wheel"))


def test_wheel_installs_one_top_level_import_name(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"conceptclef"}
    for package in ("router", "category_models", "ensemble", "core", "data", "training", "pipeline", "scoring", "pipeline/run", "pipeline/stages", "pipeline/devices"):
        assert f"conceptclef/{package}/__init__.py" in names
    assert "conceptclef/cli.py" in names
    assert "conceptclef/configs/cpu.toml" in names
    assert not any(name.startswith("conceptclef/tests/") or name.startswith("conceptclef/benchmarks/") for name in names)
    # Generators that serve only tests and benchmarks stay out of what users install.
    assert not any(name.endswith(("synthetic.py", "demo_ceiling.py")) for name in names)


@pytest.mark.slow
def test_console_script_trains_from_a_folder_with_its_own_data_package(wheel, tmp_path):
    env = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    (site,) = env.glob("lib/python*/site-packages")
    # Dependencies (torch, timm, ...) come from this environment; conceptclef itself only from the wheel.
    (site / "borrowed_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(env / "bin" / "python"), "install", "--quiet", "--no-deps", "--no-index", str(wheel)],
        check=True,
    )
    project = tmp_path / "other_research_code"
    for clashing in ("data", "core", "training", "pipeline"):
        (project / clashing).mkdir(parents=True)
        (project / clashing / "__init__.py").write_text(f"raise ImportError('the user project\\'s own {clashing}/ was imported')\n")
    script = env / "bin" / "conceptclef"
    where = subprocess.run(
        [str(env / "bin" / "python"), "-c", "import conceptclef; print(conceptclef.__file__)"],
        cwd=project, check=True, capture_output=True, text=True,
    ).stdout.strip()
    assert Path(where).is_relative_to(site), where
    config = site / "conceptclef" / "configs" / "test.toml"
    for command in (
        ["make-demo", "demo", "--train", "120", "--valid", "60", "--test", "30", "--image-size", "48"],
        ["train-all", "--data", "demo", "--out", "run", "--config", str(config)],
        ["predict", "--run", "run", "--images", "demo/test", "--out", "submission.tsv"],
    ):
        result = subprocess.run([str(script), "-q", *command], cwd=project, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]
    assert (project / "run" / "manifest.json").is_file()
    assert len((project / "submission.tsv").read_text().splitlines()) == 30
