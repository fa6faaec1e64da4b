"""Sidecar mode in the lab: what ``weft inject``'s init container and sidecar do on a
cluster, done for a lab pod.

A pod is in sidecar mode when its labels (demo pods) or annotations (Deployments) say
``weft.io/mode=sidecar``; `as_sidecar` also makes it declare the tunnel port 15008, as
the injected container does, which is how discovery tells every node agent and sidecar
that the pod serves its own tunnel (`weft.mesh.Workload.sidecar`).

`start` then plays kubelet: runs ``weft sidecar init`` in the pod's network namespace as
root (the nftables capture: the init container's job, NET_ADMIN), and starts
``weft sidecar run`` inside the pod — its netns, its cgroup, its hosts file — as uid
1337 with nothing but the environment the injected container would get.  Credentials:
the trust anchor and the *node's* lab bootstrap token, copied into a directory only the
sidecar's uid can read (on Kubernetes the sidecar presents its pod's own service
account token; see docs/kubernetes.md "Sidecar mode").
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from weft.inject import ADMIN_PORT, PROBES_ENV, SIDECAR_UID, rewrite_probes
from weft.lab import procs
from weft.lab.plan import CONTROLPLANE_IP, TRUST_DOMAIN, LabPlan, PodPlan
from weft.lab.state import LabState, ProcessRecord
from weft.mesh import MODE_KEY, SIDECAR_MODE, SIDECAR_TUNNEL_PORT, sidecar_mode
from weft.nsenter import enter_pod

if TYPE_CHECKING:
    from weft.lab.lab import Lab

READY_TIMEOUT = 60.0
CONTAINER = "weft-sidecar"


def is_sidecar(pod: PodPlan) -> bool:
    return sidecar_mode({**pod.labels, **pod.annotations})


def as_sidecar(pod: PodPlan) -> PodPlan:
    """``pod`` in sidecar mode: the label, and the tunnel port among its ports."""
    ports = pod.ports if SIDECAR_TUNNEL_PORT in pod.ports else (*pod.ports, SIDECAR_TUNNEL_PORT)
    return dataclasses.replace(pod, labels={**pod.labels, MODE_KEY: SIDECAR_MODE}, ports=ports)


def with_sidecars(plan: LabPlan, names: Iterable[str] | None = None) -> LabPlan:
    """``plan`` with the named pods (default: every captured pod) in sidecar mode."""
    wanted = set(names) if names is not None else {p.name for p in plan.pods if plan.captured(p)}
    unknown = wanted - {p.name for p in plan.pods}
    if unknown:
        raise ValueError(f"no pod {', '.join(sorted(unknown))} in the plan")
    pods = tuple(as_sidecar(p) if p.name in wanted else p for p in plan.pods)
    return dataclasses.replace(plan, pods=pods)


def process_name(pod: PodPlan) -> str:
    return f"{pod.name}/{CONTAINER}"


def _credentials(lab: Lab, pod: PodPlan, uid: int) -> Path:
    """The sidecar's directory: its token, the trust anchor, its certificate directory."""
    directory = lab.paths.pod_dir(pod.name) / CONTAINER
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True, mode=0o700)
    token = directory / "token"
    shutil.copyfile(lab.agent_dir(pod.node) / "bootstrap.token", token)
    shutil.copyfile(lab.paths.state_dir / "ca" / "anchor.pem", directory / "ca.crt")
    (directory / "run").mkdir(mode=0o700)
    for path in (directory, token, directory / "ca.crt", directory / "run"):
        os.chown(path, uid, uid)
    os.chmod(token, 0o600)
    return directory


def app_probes_env(pod: PodPlan) -> dict[str, str]:
    """The ``$WEFT_APP_PROBES`` ``weft inject`` would give a demo pod whose app container
    declared a readiness probe ``GET /`` and a liveness probe ``tcpSocket`` on its first
    port: the lab plays kubelet and asks them from the node (tests/lab/test_sidecar.py)."""
    if pod.app is None or not pod.ports or pod.ports[0] == SIDECAR_TUNNEL_PORT:
        return {}
    port = pod.ports[0]
    app = {
        "name": "app",
        "readinessProbe": {"httpGet": {"path": "/", "port": port}, "timeoutSeconds": 2},
        "livenessProbe": {"tcpSocket": {"port": port}},
    }
    return {PROBES_ENV: json.dumps(rewrite_probes([app], {}), sort_keys=True)}


def init(lab: Lab, state: LabState, pod: PodPlan, uid: int = SIDECAR_UID) -> None:
    """The init container: ``weft sidecar init`` in the pod's netns, as root."""
    netns = state.plan.netns(pod.name)
    out = subprocess.run(
        [sys.executable, "-m", "weft.cli", "sidecar", "init", "--uid", str(uid)],
        preexec_fn=lambda: enter_pod(netns, None, None),
        capture_output=True,
        text=True,
        timeout=60,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{pod.name}: weft sidecar init failed: {out.stderr.strip()[-400:]}")


def start(lab: Lab, state: LabState, pod: PodPlan, uid: int = SIDECAR_UID) -> ProcessRecord:
    """Init, then the sidecar process; returns once it says it is ready."""
    init(lab, state, pod, uid)
    directory = _credentials(lab, pod, uid)
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "LANG": "C.UTF-8",
        "HOME": str(directory),
        "POD_NAME": pod.name,
        "POD_NAMESPACE": pod.namespace,
        "POD_IP": pod.ip,
        "NODE_NAME": pod.node,
        "POD_SERVICE_ACCOUNT": pod.service_account,
        "WEFT_CONTROLPLANE": CONTROLPLANE_IP,
        "WEFT_TRUST_DOMAIN": TRUST_DOMAIN,
        "WEFT_TOKEN_FILE": str(directory / "token"),
        "WEFT_TRUST_BUNDLE": str(directory / "ca.crt"),
        "WEFT_CERT_DIR": str(directory / "run" / "certs"),
        # No TokenReview in the lab: the node's token, then a CSR over mTLS (module doc).
        "WEFT_BOOTSTRAP": "node",
        **app_probes_env(pod),
        "WEFT_LOG_LEVEL": os.environ.get("WEFT_LOG_LEVEL", "info"),
    }
    netns, cgroup = state.plan.netns(pod.name), state.pod_cgroup(pod)
    hosts = lab.paths.pod_dir(pod.name) / "hosts"
    name = process_name(pod)
    rec = procs.spawn(
        name=name,
        # Started as root and dropping to ``uid`` itself: the venv's interpreter may live
        # where that uid cannot read it (under /root); a container image has no such issue.
        argv=[sys.executable, "-m", "weft.cli", "sidecar", "run", "--drop-to-uid", str(uid)],
        log_path=lab.paths.log_dir / f"{pod.name}.{CONTAINER}.log",
        where=pod.name,
        preexec=lambda: enter_pod(netns, cgroup, hosts),
        env=env,
        cwd=str(directory),
    )
    state.processes.append(rec)
    state.save()
    wait_ready(state, pod, rec)
    return rec


def wait_ready(state: LabState, pod: PodPlan, rec: ProcessRecord) -> None:
    from weft.lab.lab import LabError, admin_get

    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        answer = admin_get(state.plan.netns(pod.name), "127.0.0.1", ADMIN_PORT, "/ready")
        if answer is not None and answer[0] == 200:
            return
        if not procs.is_alive(rec):
            raise LabError(f"{rec.name} exited; see {rec.log}")
        if time.monotonic() > deadline:
            raise LabError(f"{rec.name} not ready after {READY_TIMEOUT:.0f}s; see {rec.log}")
        time.sleep(0.2)
