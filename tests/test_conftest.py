"""The suite's own guard (conftest.py): a run with the slow tests and too little free disk ends at once."""
import shutil
from types import SimpleNamespace

import pytest

import conftest


def _session(tmp_path, slow: bool):
    return SimpleNamespace(
        config=SimpleNamespace(option=SimpleNamespace(collectonly=False),
                               _tmp_path_factory=SimpleNamespace(getbasetemp=lambda: tmp_path)),
        items=[SimpleNamespace(get_closest_marker=lambda name: slow and name == "slow")])


def _free(monkeypatch, tmp_path, gib):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(conftest.shutil, "disk_usage", lambda path: usage._replace(free=gib * 2**30))


def test_slow_tests_without_disk_room_stop_the_session_at_once(tmp_path, monkeypatch):
    _free(monkeypatch, tmp_path, 1)
    with pytest.raises(pytest.exit.Exception, match=r"1\.0 GiB free under .*the slow tests need 7 GiB"):
        conftest.pytest_collection_finish(_session(tmp_path, slow=True))


def test_room_enough_or_no_slow_test_selected_runs(tmp_path, monkeypatch):
    _free(monkeypatch, tmp_path, 8)
    conftest.pytest_collection_finish(_session(tmp_path, slow=True))
    _free(monkeypatch, tmp_path, 1)
    conftest.pytest_collection_finish(_session(tmp_path, slow=False))
