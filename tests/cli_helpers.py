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


def cli_error(*args: object) -> str:
    """Run the CLI expecting a user error: exit 2, no traceback, exactly one `error:` line, last."""
    result = run_cli(*args)
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit)  # not an escaped exception
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]  # tqdm may precede it
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    return errors[0]
