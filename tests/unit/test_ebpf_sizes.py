"""The per-connection map sizes the agent compiles its capture programs with."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from nodeagent.ebpf.loader import DEFAULT_MAP_ENTRIES, CaptureConfig, CaptureError, CapturePrograms
from weft.cli import cli


def test_sockets_maps_are_twice_the_connection_maps():
    cfg = CaptureConfig(pin_dir=Path("/nonexistent"), proxy_ip="10.0.0.1", map_entries=4096)
    assert cfg.map_sizes() == {
        "weft_cookie_dst": 4096,
        "weft_orig_dst": 4096,
        "weft_socks": 8192,
        "weft_sock_keys": 8192,
    }
    assert CaptureConfig(pin_dir=Path("/x"), proxy_ip="10.0.0.1").map_entries == DEFAULT_MAP_ENTRIES


@pytest.mark.parametrize("entries", [0, 1023, (1 << 20) + 1])
def test_out_of_range_size_is_refused_before_compiling(entries: int):
    cfg = CaptureConfig(pin_dir=Path("/nonexistent"), proxy_ip="10.0.0.1", map_entries=entries)
    with pytest.raises(CaptureError, match="--ebpf-map-entries"):
        CapturePrograms.load(cfg)


def test_agent_cli_refuses_a_size_out_of_range():
    result = CliRunner().invoke(
        cli, ["agent", "--lab", "x", "--node", "n", "--ebpf-map-entries", "100"]
    )
    assert result.exit_code == 2
    assert "--ebpf-map-entries" in result.output
