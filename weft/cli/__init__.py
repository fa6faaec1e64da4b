"""The ``weft`` command line.

Subcommands live in their own modules; this is the only package allowed to compose the
node agent, the control plane and the shared core. A subcommand's module is imported
only when that subcommand runs: the node agent is a long-lived process on every node, and
importing the lab and the benchmarks (pyroute2, rich, their dependencies) into it cost
about 13 MiB of its memory (PSS, measured in the lab) for nothing.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable
from typing import Any, TypeVar

import click

from weft import __version__

SUBCOMMANDS = {
    "agent": "weft.cli.agent",
    "bench": "weft.cli.bench",
    "check": "weft.cli.check",
    "controlplane": "weft.cli.controlplane",
    "identity": "weft.cli.identity",
    "inject": "weft.cli.sidecar",
    "install": "weft.cli.install",
    "lab": "weft.cli.lab",
    "policy": "weft.cli.policy",
    "sidecar": "weft.cli.sidecar",
    "uninstall": "weft.cli.install",
    "viz": "weft.cli.viz",
}
"""Subcommand name -> the module that defines a click command of that name."""

F = TypeVar("F", bound=Callable[..., Any])


def lab_option(help_text: str | None = None) -> Callable[[F], F]:
    """``--lab NAME`` (the ``lab_name`` parameter): which lab, ``$WEFT_LAB`` or ``weft``
    by default — the name ``weft lab up`` gave it."""
    return click.option(
        "--lab",
        "lab_name",
        default=lambda: os.environ.get("WEFT_LAB", "weft"),
        show_default="weft (or $WEFT_LAB)",
        help=help_text,
    )


def output_option(*choices: str, help_text: str | None = None) -> Callable[[F], F]:
    """``-o/--output`` (the ``output`` parameter): one of ``choices``, the first by default."""
    return click.option(
        "-o",
        "--output",
        type=click.Choice(list(choices)),
        default=choices[0],
        show_default=True,
        help=help_text,
    )


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use (``weft --help`` imports all)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(SUBCOMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        module = SUBCOMMANDS.get(cmd_name)
        if module is None:
            return None
        command = getattr(importlib.import_module(module), cmd_name)
        assert isinstance(command, click.Command)
        return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
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


def main() -> None:
    cli(prog_name="weft")
