"""The agent's tracing settings: ``weft agent --trace-collector/--trace-sample-rate`` (or
their environment variables) into `AgentConfig.tracing`, the agent wiring the tracer and
exporter into the outbound HTTP stage, and an exporter failure costing only tracing."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from nodeagent.agent import Agent, AgentConfig
from tests.agentenv import kube_env
from weft.cli.agent import agent as agent_command
from weft.tracing import TracingConfig


def _config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str],
            **env: str) -> tuple[AgentConfig | None, Any]:  # fmt: skip
    got: list[AgentConfig] = []

    def fake_run(cfg: AgentConfig) -> int:
        got.append(cfg)
        return 0

    monkeypatch.setattr("nodeagent.agent.run", fake_run)
    result = CliRunner().invoke(
        agent_command, ["--kubernetes", *args], env=kube_env(tmp_path, **env)
    )
    return (got[0] if got else None), result


def test_tracing_is_off_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, result = _config(tmp_path, monkeypatch, [])
    assert cfg is not None, result.output
    assert cfg.tracing == TracingConfig() and not cfg.tracing.enabled
    agent = Agent(cfg)
    assert agent.trace_exporter is None and agent.outbound_http.tracer is None


def test_flags_configure_the_collector_and_rate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = ["--trace-collector", "otel-collector.observability:4318", "--trace-sample-rate", "0.25"]
    cfg, result = _config(tmp_path, monkeypatch, args, WEFT_TRACE_QUEUE="100")
    assert cfg is not None, result.output
    assert cfg.tracing.collector == ("otel-collector.observability", 4318)
    assert cfg.tracing.sample_rate == 0.25
    assert cfg.tracing.max_queue == 100  # the exporter's other settings from the environment
    agent = Agent(cfg)
    assert agent.trace_exporter is not None
    assert agent.outbound_http.tracer is agent.tracer and agent.tracer.enabled
    assert agent.outbound_http.record_span == agent.trace_exporter.record


def test_environment_variables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, result = _config(tmp_path, monkeypatch, [], WEFT_TRACE_COLLECTOR="10.0.0.9",
                          WEFT_TRACE_SAMPLE_RATE="1")  # fmt: skip
    assert cfg is not None, result.output
    assert cfg.tracing.collector == ("10.0.0.9", 4318) and cfg.tracing.sample_rate == 1.0


@pytest.mark.parametrize(
    "args",
    [
        ["--trace-collector", "host:notaport"],
        ["--trace-collector", "h:1", "--trace-sample-rate", "2"],
    ],
)
def test_bad_values_are_usage_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str]
) -> None:
    cfg, result = _config(tmp_path, monkeypatch, args)
    assert cfg is None and result.exit_code == 2
    assert "trace" in result.output.lower()


async def test_a_failing_exporter_turns_tracing_off_not_the_agent(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = AgentConfig.for_kubernetes(
        kube_env(tmp_path), tracing=TracingConfig(collector=("127.0.0.1", 9))
    )
    agent = Agent(cfg)
    assert agent.trace_exporter is not None

    async def broken() -> None:
        raise RuntimeError("encoder bug")

    agent.trace_exporter.run = broken  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR, logger="weft.agent"):
        await asyncio.wait_for(agent._export_traces(), 10)  # returns: nothing propagates
    assert not agent.tracer.enabled
    assert "tracing is off on this node" in caplog.text
    with contextlib.suppress(RuntimeError):  # as the agent's shutdown does
        await agent.trace_exporter.close()
