"""Running cli.py in-process for the end-to-end tests (typer's CliRunner), with the test config.

`cli` is imported on first use, so spawned worker processes that import a test module for its
toy jobs do not pay for timm and LightGBM.
"""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner, Result

REPO = Path(__file__).resolve().parents[1]
TEST_CONFIG = REPO / "configs" / "test.toml"
_runner = CliRunner()


def run_cli(*args: object, **kwargs: object) -> Result:
    """The command's result, whatever its exit code (for tests of refusals)."""
    from conceptclef.cli import app

    return _runner.invoke(app, [str(arg) for arg in args], **kwargs)


def invoke(*args: object) -> str:
    """The command's output; it must succeed."""
    result = run_cli(*args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def train(data: Path, run: Path, *extra: str) -> None:
    """`train-all` with the test config."""
    invoke("train-all", "--data", data, "--out", run, "--config", TEST_CONFIG, *extra)
