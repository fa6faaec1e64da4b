import json

import pytest

from weft.lab.plan import plan_lab
from weft.lab.procs import proc_start_time
from weft.lab.state import LabPaths, LabState, StateError, load_state, write_json_atomic


def _paths(tmp_path):
    return LabPaths(state_dir=tmp_path, cgroup_root=None, bpffs_dir=tmp_path / "pins")


def test_save_then_load(tmp_path):
    state = LabState(
        plan=plan_lab("t", nodes=1, demo=True), phase="creating", paths=_paths(tmp_path)
    )
    state.save()
    loaded = load_state(tmp_path / "state.json")
    assert loaded.plan == state.plan
    assert loaded.phase == "creating"
    assert loaded.pod_cgroup(loaded.pod("echo-1")) is None


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    write_json_atomic(tmp_path / "s.json", {"a": 1})
    write_json_atomic(tmp_path / "s.json", {"a": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["s.json"]
    assert json.loads((tmp_path / "s.json").read_text()) == {"a": 2}


def test_missing_state_says_how_to_make_one(tmp_path):
    with pytest.raises(StateError, match="weft lab up"):
        load_state(tmp_path / "state.json")


def test_corrupt_state_points_at_down(tmp_path):
    (tmp_path / "state.json").write_text("{not json")
    with pytest.raises(StateError, match="weft lab down"):
        load_state(tmp_path / "state.json")


def test_other_schema_version_is_refused(tmp_path):
    state = LabState(plan=plan_lab("t", nodes=1), phase="ready", paths=_paths(tmp_path))
    data = state.to_json()
    data["version"] = 99
    (tmp_path / "state.json").write_text(json.dumps(data))
    with pytest.raises(StateError, match="schema version 99"):
        load_state(tmp_path / "state.json")


def test_unknown_pod_lists_the_known_ones(tmp_path):
    state = LabState(plan=plan_lab("t", nodes=1, demo=True), phase="ready", paths=_paths(tmp_path))
    with pytest.raises(KeyError, match="echo-1, client-1"):
        state.pod("nope")


def test_start_time_of_this_process_is_stable_and_of_a_dead_pid_is_none():
    import os

    assert proc_start_time(os.getpid()) == proc_start_time(os.getpid()) is not None
    assert proc_start_time(2**22 + 1) is None
