"""Running the ``lors`` CLI in-process from tests (typer's CliRunner, stdout and stderr apart)."""

from __future__ import annotations

from typer.testing import CliRunner

from lors_convert.cli import app

runner = CliRunner()


def run_ok(*args):
    """Invoke ``lors ARGS``; fail the test with the exit code and stderr unless it exits 0."""
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, (res.exit_code, res.stderr, repr(res.exception))
    return res
