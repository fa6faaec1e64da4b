"""``AuthorizationPolicy`` objects into the model (`weft.policy.model`), every field
checked and the first bad one named."""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from weft.identity import DEFAULT_TRUST_DOMAIN, IdentityError, SpiffeId
from weft.policy.model import (
    API_VERSION,
    KIND,
    Action,
    HeaderMatch,
    IdentityPattern,
    Network,
    Operation,
    PathPattern,
    Policy,
    PolicyError,
    Rule,
    Source,
)
from weft.policy.paths import PathError, normalize_path

MAX_RULES = 64
MAX_ENTRIES = 64
MAX_VALUES = 256
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+\-.^_`|~]{1,256}$")
_METHOD = re.compile(r"^[A-Za-z0-9!#$%&'*+\-.^_`|~]{1,64}$")
_SPIFFE_CHARS = re.compile(r"^[A-Za-z0-9._\-/:*]+$")


def _list(value: Any, where: str, limit: int = MAX_VALUES) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise PolicyError(f"{where} must be a list")
    if len(value) > limit:
        raise PolicyError(f"{where} has {len(value)} entries (at most {limit})")
    return value


def _strings(value: Any, where: str) -> tuple[str, ...]:
    items = _list(value, where)
    for i, v in enumerate(items):
        if not isinstance(v, str) or not v:
            raise PolicyError(f"{where}[{i}] must be a non-empty string")
    return tuple(items)


def _only(obj: Mapping[str, Any], allowed: Iterable[str], where: str) -> None:
    unknown = sorted(set(obj) - set(allowed))
    if unknown:
        raise PolicyError(f"{where}: unknown field {unknown[0]!r} (known: {', '.join(allowed)})")


def parse_principal(text: str, where: str) -> IdentityPattern:
    """A principal pattern; `PolicyError` for anything that is not a SPIFFE ID (or one
    with a wildcard at a path boundary)."""
    if not _SPIFFE_CHARS.match(text):
        raise PolicyError(f"{where}: {text!r} has characters a SPIFFE ID cannot have "
                          "(no percent-encoding, spaces or query)")  # fmt: skip
    if text == "*":
        return IdentityPattern(text)
    body = text if text.startswith(("spiffe://", "*/")) else "spiffe://" + text
    if body.startswith("*/"):
        suffix = body[1:]
        if "*" in suffix or not suffix.startswith("/ns/"):
            raise PolicyError(f"{where}: {text!r}: a leading wildcard is '*/ns/<ns>/sa/<sa>'")
        _identity(DEFAULT_TRUST_DOMAIN + suffix, text, where)
        return IdentityPattern(text, suffix=suffix)
    if body.endswith("/*"):
        prefix = body[:-1]
        parts = prefix[len("spiffe://") : -1].split("/")
        shapes = (len(parts) == 1, len(parts) == 3 and parts[1] == "ns",
                  len(parts) == 4 and parts[1] == "ns" and parts[3] == "sa")  # fmt: skip
        if "*" in prefix or not any(shapes):
            raise PolicyError(f"{where}: {text!r}: a trailing wildcard goes after the trust "
                              "domain, /ns/<ns> or /ns/<ns>/sa")  # fmt: skip
        ns = parts[2] if len(parts) > 2 else "x"
        _identity(f"{parts[0]}/ns/{ns}/sa/x", text, where)
        return IdentityPattern(text, prefix=prefix)
    if "*" in body:
        raise PolicyError(f"{where}: {text!r}: a wildcard goes only at the start ('*/...') "
                          "or end ('.../*')")  # fmt: skip
    return IdentityPattern(text, exact=str(_identity(body[len("spiffe://") :], text, where)))


def _identity(without_scheme: str, text: str, where: str) -> SpiffeId:
    domain, slash, path = without_scheme.partition("/")
    try:
        ident = SpiffeId(domain, slash + path)
    except IdentityError as e:
        raise PolicyError(f"{where}: {text!r} is not a workload SPIFFE ID: {e}") from None
    if not path.startswith("ns/"):
        raise PolicyError(f"{where}: {text!r} is not a workload identity (/ns/<ns>/sa/<sa>)")
    return ident


def _cidrs(values: Sequence[str], where: str) -> tuple[Network, ...]:
    out = []
    for i, v in enumerate(values):
        try:
            out.append(ipaddress.ip_network(v, strict=False))
        except ValueError:
            raise PolicyError(f"{where}[{i}]: {v!r} is not an address or CIDR") from None
    return tuple(out)


def _source(raw: Any, ns: str, where: str) -> Source:
    if not isinstance(raw, dict) or not isinstance(raw.get("source"), dict):
        raise PolicyError(f"{where} must be {{source: {{...}}}}")
    _only(raw, ("source",), where)
    src = raw["source"]
    where = f"{where}.source"
    keys = ("principals", "notPrincipals", "namespaces", "notNamespaces", "serviceAccounts",
            "ipBlocks", "notIpBlocks")  # fmt: skip
    _only(src, keys, where)
    if not any(src.get(k) for k in keys):
        raise PolicyError(f"{where} is empty (omit `from` to match any caller)")

    def names(key: str) -> tuple[str, ...]:
        values = _strings(src.get(key), f"{where}.{key}")
        for i, v in enumerate(values):
            if not _DNS_LABEL.match(v):
                raise PolicyError(f"{where}.{key}[{i}]: {v!r} is not a namespace name")
        return values

    sas = []
    for i, v in enumerate(_strings(src.get("serviceAccounts"), f"{where}.serviceAccounts")):
        sa_ns, _, sa = v.rpartition("/")
        sa_ns = sa_ns or ns
        if not (_DNS_LABEL.match(sa_ns) and _DNS_LABEL.match(sa)):
            raise PolicyError(f"{where}.serviceAccounts[{i}]: {v!r} is not 'sa' or 'ns/sa'")
        sas.append(f"{sa_ns}/{sa}")
    return Source(
        principals=tuple(parse_principal(p, f"{where}.principals[{i}]")
                         for i, p in enumerate(_strings(src.get("principals"),
                                                        f"{where}.principals"))),
        not_principals=tuple(parse_principal(p, f"{where}.notPrincipals[{i}]")
                             for i, p in enumerate(_strings(src.get("notPrincipals"),
                                                            f"{where}.notPrincipals"))),
        namespaces=frozenset(names("namespaces")) if src.get("namespaces") else None,
        not_namespaces=frozenset(names("notNamespaces")),
        service_accounts=frozenset(sas) if sas else None,
        ip_blocks=_cidrs(_strings(src.get("ipBlocks"), f"{where}.ipBlocks"), f"{where}.ipBlocks"),
        not_ip_blocks=_cidrs(_strings(src.get("notIpBlocks"), f"{where}.notIpBlocks"),
                             f"{where}.notIpBlocks"),
    )  # fmt: skip


def _path_pattern(text: str, where: str) -> PathPattern:
    if text != "*":
        if (
            not text.startswith("/")
            or "*" in text[:-1]
            or (text.endswith("*") and not text.endswith("/*"))
        ):
            raise PolicyError(f"{where}: {text!r}: a path is exact ('/a'), a prefix ('/a/*') "
                              "or '*'")  # fmt: skip
        try:
            norm = normalize_path(text[:-2] if text.endswith("/*") else text)
        except PathError as e:
            raise PolicyError(f"{where}: {e}") from None
        if norm != (text[:-2] if text.endswith("/*") else text) and text != "/*":
            raise PolicyError(f"{where}: {text!r} is not in normal form (write {norm!r}): "
                              "requests are judged normalised")  # fmt: skip
    return PathPattern(text)


def _operation(raw: Any, where: str) -> Operation:
    if not isinstance(raw, dict) or not isinstance(raw.get("operation"), dict):
        raise PolicyError(f"{where} must be {{operation: {{...}}}}")
    _only(raw, ("operation",), where)
    op = raw["operation"]
    where = f"{where}.operation"
    keys = ("ports", "notPorts", "methods", "notMethods", "paths", "notPaths", "headers")
    _only(op, keys, where)
    if not any(op.get(k) for k in keys):
        raise PolicyError(f"{where} is empty (omit `to` to match any operation)")

    def ports(key: str) -> frozenset[int]:
        out = set()
        for i, v in enumerate(_list(op.get(key), f"{where}.{key}")):
            text = str(v) if isinstance(v, int | str) and not isinstance(v, bool) else ""
            if not text.isdigit() or not 0 < int(text) < 65536:
                raise PolicyError(f"{where}.{key}[{i}]: {v!r} is not a port number")
            out.add(int(text))
        return frozenset(out)

    def methods(key: str) -> frozenset[str]:
        values = _strings(op.get(key), f"{where}.{key}")
        for i, m in enumerate(values):
            if not _METHOD.match(m):
                raise PolicyError(f"{where}.{key}[{i}]: {m!r} is not an HTTP method")
        return frozenset(values)

    headers = []
    for i, h in enumerate(_list(op.get("headers"), f"{where}.headers")):
        hw = f"{where}.headers[{i}]"
        if not isinstance(h, dict) or not isinstance(h.get("name"), str) \
                or not _HEADER_NAME.match(h["name"]):  # fmt: skip
            raise PolicyError(f"{hw}.name must be a header name")
        _only(h, ("name", "values"), hw)
        values = _strings(h.get("values"), f"{hw}.values")
        if not values:
            raise PolicyError(f"{hw}.values is empty")
        headers.append(HeaderMatch(h["name"].lower(), values))
    return Operation(
        ports=ports("ports") if op.get("ports") else None,
        not_ports=ports("notPorts"),
        methods=methods("methods") if op.get("methods") else None,
        not_methods=methods("notMethods"),
        paths=tuple(_path_pattern(p, f"{where}.paths[{i}]")
                    for i, p in enumerate(_strings(op.get("paths"), f"{where}.paths"))),
        not_paths=tuple(_path_pattern(p, f"{where}.notPaths[{i}]")
                        for i, p in enumerate(_strings(op.get("notPaths"), f"{where}.notPaths"))),
        headers=tuple(headers),
    )  # fmt: skip


def parse_policy(obj: Mapping[str, Any]) -> Policy:
    """An AuthorizationPolicy object; `PolicyError` names the first bad field (the object
    is then rejected whole, and the last good version of it stays in force)."""
    if obj.get("apiVersion") != API_VERSION or obj.get("kind") != KIND:
        raise PolicyError(f"not a {API_VERSION} {KIND}: {obj.get('apiVersion')} {obj.get('kind')}")
    meta = obj.get("metadata") or {}
    name, ns = meta.get("name"), meta.get("namespace") or "default"
    if not isinstance(name, str) or not name:
        raise PolicyError("metadata.name is missing")
    if not isinstance(ns, str) or not _DNS_LABEL.match(ns):
        raise PolicyError(f"metadata.namespace {ns!r} is not a namespace name")
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        raise PolicyError("spec is missing")
    _only(spec, ("selector", "targetRefs", "action", "rules"), "spec")
    action_raw = spec.get("action", "ALLOW")
    try:
        action = Action(action_raw)
    except ValueError:
        raise PolicyError(f"spec.action {action_raw!r} is not ALLOW, DENY or AUDIT") from None
    selector = None
    if spec.get("selector") is not None:
        sel = spec["selector"]
        if not isinstance(sel, dict):
            raise PolicyError("spec.selector must be {matchLabels: {...}}")
        _only(sel, ("matchLabels",), "spec.selector")
        labels = sel.get("matchLabels") or {}
        if not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in labels.items()):  # fmt: skip
            raise PolicyError("spec.selector.matchLabels must map strings to strings")
        selector = dict(labels)
    routes = set()
    for i, ref in enumerate(_list(spec.get("targetRefs"), "spec.targetRefs", 16)):
        where = f"spec.targetRefs[{i}]"
        if not isinstance(ref, dict):
            raise PolicyError(f"{where} is not an object")
        _only(ref, ("group", "kind", "name"), where)
        if ref.get("group") != "gateway.networking.k8s.io" or ref.get("kind") not in (
            "HTTPRoute", "GRPCRoute",
        ):  # fmt: skip
            raise PolicyError(f"{where}: only gateway.networking.k8s.io HTTPRoute/GRPCRoute "
                              "are targets (select workloads with spec.selector)")  # fmt: skip
        if not isinstance(ref.get("name"), str) or not ref["name"]:
            raise PolicyError(f"{where}.name is missing")
        routes.add(f"{ns}/{ref['name']}")
    if routes and selector is not None:
        raise PolicyError("spec: give selector or targetRefs, not both")
    rules = []
    for i, r in enumerate(_list(spec.get("rules"), "spec.rules", MAX_RULES)):
        where = f"spec.rules[{i}]"
        if not isinstance(r, dict):
            raise PolicyError(f"{where} is not an object")
        _only(r, ("from", "to"), where)
        rules.append(Rule(
            sources=tuple(_source(s, ns, f"{where}.from[{j}]")
                          for j, s in enumerate(_list(r.get("from"), f"{where}.from",
                                                      MAX_ENTRIES))),
            operations=tuple(_operation(o, f"{where}.to[{j}]")
                             for j, o in enumerate(_list(r.get("to"), f"{where}.to",
                                                         MAX_ENTRIES))),
        ))  # fmt: skip
    reduced = {"apiVersion": API_VERSION, "kind": KIND,
               "metadata": {"name": name, "namespace": ns}, "spec": spec}  # fmt: skip
    source = json.dumps(reduced, sort_keys=True, separators=(",", ":"))
    return Policy(ns, name, action, tuple(rules), selector, frozenset(routes), source)


def policy_object(policy: Policy) -> dict[str, Any]:
    """The reduced object `parse_policy` made ``policy`` from (for the wire)."""
    obj: dict[str, Any] = json.loads(policy.source)
    return obj
