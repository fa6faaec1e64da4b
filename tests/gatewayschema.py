"""Gateway API objects (gateway.networking.k8s.io) checked against the Gateway API's schemas,
as test_manifests checks the core kinds with kubernetes-validate.

Where the schemas come from: no PyPI or Debian package carries the Gateway API CRDs or a
schema of them; the npm package @kubernetes-models/gateway-api does, as validators compiled
(with ajv) from the OpenAPI schema of the Gateway API's own Go types (sigs.k8s.io/gateway-api
v1.5.1 for 2.0.0), the types the CRDs are generated from. `make setup` installs it with
`npm ci` into tests/gatewayapi/node_modules, pinned by tests/gatewayapi/package-lock.json; a
small Node script there (validate.mjs) runs the validators, one process per call.

What these schemas check: types, required fields, enums (path and header match types,
filter types), bounds (weights 0..1,000,000, ports, list lengths), patterns (durations,
names, hostnames). What they do not: unknown fields (they have no additionalProperties; the
API server would prune such a field, or reject it with strict field validation), the CRDs'
CEL rules (x-kubernetes-validations), and they admit the experimental channel's fields as
well as the standard channel's (they come from the Go types, which carry both).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

GROUP = "gateway.networking.k8s.io"
PACKAGE = "@kubernetes-models/gateway-api"
HERE = Path(__file__).resolve().parent / "gatewayapi"
VALIDATOR = HERE / "validate.mjs"


class SchemasMissing(RuntimeError):
    """The schemas (or Node.js to run them) are not installed: the tests cannot validate."""


def is_gateway_api(doc: Mapping[str, Any]) -> bool:
    return str(doc.get("apiVersion", "")).startswith(GROUP + "/")


def pinned_version() -> str:
    return str(json.loads((HERE / "package.json").read_text())["dependencies"][PACKAGE])


def installed_version() -> str | None:
    meta = HERE / "node_modules" / PACKAGE / "package.json"
    return str(json.loads(meta.read_text())["version"]) if meta.exists() else None


def validate(docs: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    """One list of error messages per document ([] when it is valid); a document of a kind
    the package has no schema for gets an error too, never a silent pass."""
    node = shutil.which("node")
    if node is None:
        raise SchemasMissing(
            "node not found: the Gateway API schemas are an npm package run by Node.js; "
            "install Debian's nodejs and npm (sudo make host), then make schemas"
        )
    installed, pinned = installed_version(), pinned_version()
    if installed != pinned:
        found = f"version {installed} is installed" if installed else "it is not installed"
        raise SchemasMissing(
            f"{PACKAGE} {pinned} is pinned in {HERE / 'package.json'} but {found} in "
            f"{HERE / 'node_modules'}; run: make schemas (npm ci in {HERE})"
        )
    out = subprocess.run(
        [node, str(VALIDATOR)],
        input=json.dumps(list(docs)),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{VALIDATOR} failed (exit {out.returncode}):\n{out.stderr}")
    results: list[list[str]] = json.loads(out.stdout)
    assert len(results) == len(docs), (len(results), len(docs))
    return results
