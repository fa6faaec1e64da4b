"""``weft policy check --kubeconfig``: the same judgement against a cluster, read with a
kubeconfig as kubectl would (here the fake API server, the real wire format): policies,
pods, services and namespaces as the control plane's source models them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml  # type: ignore[import-untyped]  # comes with the kubernetes client
from click.testing import CliRunner

from tests.fakeapi import FakeKubeAPI
from tests.sockets.test_kube_policies import RESOURCE, from_web, policy
from tests.sockets.test_kube_source import TOKEN, seed
from weft.cli.policy import check

pytestmark = pytest.mark.sockets


@pytest.fixture
def fake() -> Iterator[FakeKubeAPI]:
    with FakeKubeAPI(token=TOKEN) as api:
        yield api


def kubeconfig(tmp_path: Path, fake: FakeKubeAPI) -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": fake.url}}],
        "users": [{"name": "me", "user": {"token": TOKEN}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "me"}}],
    }))  # fmt: skip
    return path


def run(*args: str) -> tuple[int, list[dict]]:
    got = CliRunner().invoke(check, [*args, "-o", "json"])
    rows = json.loads(got.stdout) if got.stdout.strip().startswith("[") else []
    return got.exit_code, rows


def test_a_clusters_policies_decide_as_the_agents_would(tmp_path: Path, fake: FakeKubeAPI) -> None:
    seed(fake)  # shop: web-1 (app=web, sa web), web-2; service shop/web on 8080
    fake.create(RESOURCE, policy("web-only", from_web(app="web")))
    cfg = str(kubeconfig(tmp_path, fake))
    code, rows = run("--kubeconfig", cfg, "--from", "shop/web", "--to", "svc/web", "-n", "shop",
                     "--method", "GET", "--path", "/x")  # fmt: skip
    assert code == 0 and rows and all(r["request"]["allowed"] for r in rows), rows
    assert {r["workload"] for r in rows} == {"shop/web-1", "shop/web-2"}
    assert rows[0]["request"]["policy"] == "shop/web-only"
    code, rows = run("--kubeconfig", cfg, "--from", "shop/batch", "--to", "pod/web-1",
                     "-n", "shop")  # fmt: skip
    assert code == 1 and not rows[0]["connection"]["allowed"]
    assert "no rule of shop/web-only allows it" in rows[0]["connection"]["reason"]


def test_an_unreachable_cluster_is_a_clear_error(tmp_path: Path, fake: FakeKubeAPI) -> None:
    cfg = kubeconfig(tmp_path, fake)
    cfg.write_text(cfg.read_text().replace(fake.url, "http://127.0.0.1:9"))
    got = CliRunner().invoke(check, ["--kubeconfig", str(cfg), "--from", "shop/web",
                                     "--to", "svc/web", "-n", "shop"])  # fmt: skip
    assert got.exit_code == 2 and "reading the cluster failed" in got.output
