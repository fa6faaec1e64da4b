"""The profile summary of `weft bench profile` (weft.bench.profile.top_frames)."""

from __future__ import annotations

from weft.bench.profile import top_frames

BASE = "<module> (weft/cli.py:1);run (asyncio/base_events.py:600)"
RAW = "\n".join(
    [
        f"{BASE};data_received (nodeagent/proxy/tunnel/session.py:300);"
        "feed (nodeagent/proxy/tunnel/wire.py:500) 60",
        f"{BASE};write (nodeagent/proxy/tunnel/session.py:200) 30",
        f"{BASE} 10",
        "garbage line",
    ]
)


def test_self_and_total_shares_by_frame():
    got = top_frames(RAW)
    assert got["samples"] == 100
    assert got["self"][0] == {"frame": "feed (wire.py)", "percent": 60.0}
    assert {"frame": "write (session.py)", "percent": 30.0} in got["self"]
    total = {e["frame"]: e["percent"] for e in got["total"]}
    assert total["run (base_events.py)"] == 100.0
    assert total["data_received (session.py)"] == 60.0


def test_an_empty_profile_is_empty():
    assert top_frames("") == {"samples": 0, "self": [], "total": []}
