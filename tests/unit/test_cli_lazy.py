"""The ``weft`` group imports a subcommand's module only when that subcommand runs: the
node agent, a long-lived process on every node, must not carry the lab and the
benchmarks (pyroute2, rich, ...) in its memory."""

from __future__ import annotations

import subprocess
import sys

from click.testing import CliRunner

from weft.cli import SUBCOMMANDS, cli


def test_agent_process_does_not_import_the_lab_or_the_benchmarks() -> None:
    code = (
        "import sys\n"
        "from weft.cli import cli\n"
        "ctx = cli.make_context('weft', ['agent', '--help'], resilient_parsing=True)\n"
        "cli.get_command(ctx, 'agent')\n"
        "import nodeagent.agent\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('pyroute2', 'rich', 'matplotlib')\n"
        "    or m.startswith(('weft.lab.lab', 'weft.lab.net', 'weft.bench', 'weft.cli.lab')))\n"
        "print(heavy)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout


def test_every_subcommand_resolves_and_help_lists_them() -> None:
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0, result.output
    for name in SUBCOMMANDS:
        assert name in result.output
        ctx = cli.make_context("weft", [name, "--help"], resilient_parsing=True)
        assert cli.get_command(ctx, name) is not None
    assert CliRunner().invoke(cli, ["no-such-command"]).exit_code == 2
