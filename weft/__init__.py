"""Weft: a sidecar-free service mesh for Kubernetes.

The ``weft`` package holds what the control plane and the node agent share (names,
config and wire types) plus the command line, including ``weft lab``.  The shared
modules never import :mod:`nodeagent` or :mod:`controlplane`; only :mod:`weft.cli`
composes them (enforced by import-linter, see ``pyproject.toml``).
"""

__version__ = "0.1.0"
