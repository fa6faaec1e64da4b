"""The ``weft`` command line.

Subcommands live in their own modules and are imported here; this is the only
package allowed to compose the node agent, the control plane and the shared core.
"""

from __future__ import annotations

import logging
import os

import click

from weft import __version__
from weft.cli.agent import agent
from weft.cli.bench import bench
from weft.cli.check import check
from weft.cli.controlplane import controlplane
from weft.cli.identity import identity
from weft.cli.lab import lab


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="weft")
@click.option(
    "--log-level",
    default=lambda: os.environ.get("WEFT_LOG_LEVEL", "info"),
    show_default="info (or $WEFT_LOG_LEVEL)",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    help="Log verbosity.",
)
def cli(log_level: str) -> None:
    """Weft: a sidecar-free service mesh for Kubernetes.

    Start with `weft check` to see whether this machine can run the mesh, then
    `weft lab up --demo` to run a whole mesh on this machine.
    """
    logging.basicConfig(
        level=getattr(logging, log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


cli.add_command(agent)
cli.add_command(bench)
cli.add_command(check)
cli.add_command(controlplane)
cli.add_command(identity)
cli.add_command(lab)


def main() -> None:
    cli(prog_name="weft")
