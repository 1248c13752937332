"""duckling/files.py: the atomic JSON write and the re-entrant run folder lock."""
import json
import subprocess
import sys

import pytest

from duckling.files import FolderBusy, check_unlocked, folder_lock, holder, write_json


def test_write_json_is_valid_json_and_leaves_no_tmp(tmp_path):
    p = tmp_path / "x.json"
    write_json(p, {"a": float("nan"), "b": [1.0, float("inf")], "c": "d"})
    assert json.loads(p.read_text(), parse_constant=lambda c: pytest.fail(c)) == {"a": None, "b": [1.0, None], "c": "d"}
    assert [q.name for q in tmp_path.iterdir()] == ["x.json"]


def test_write_json_failure_keeps_the_old_file_and_no_tmp(tmp_path):
    p = tmp_path / "x.json"
    write_json(p, {"old": 1})
    with pytest.raises(TypeError):
        write_json(p, {"bad": object.__new__(type("T", (), {"__str__": None}))})
    assert json.loads(p.read_text()) == {"old": 1}
    assert [q.name for q in tmp_path.iterdir()] == ["x.json"]


def test_folder_lock_is_reentrant_here_and_refused_elsewhere(tmp_path):
    code = ("import sys; from duckling.files import folder_lock, FolderBusy\n"
            "try:\n    with folder_lock(sys.argv[1]): pass\nexcept FolderBusy as e:\n    print(e.holder); sys.exit(3)")
    with folder_lock(tmp_path):
        with folder_lock(tmp_path):  # the same process: no deadlock, no error
            assert holder(tmp_path) is None
        r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
        assert r.returncode == 3 and "process" in r.stdout
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    check_unlocked(tmp_path)


def test_lock_left_by_a_killed_process_never_blocks(tmp_path):
    p = subprocess.Popen([sys.executable, "-c", "import sys, time; from duckling.files import folder_lock\n"
                          "with folder_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)", str(tmp_path)],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    with pytest.raises(FolderBusy):
        check_unlocked(tmp_path)
    p.kill()
    p.wait()
    with folder_lock(tmp_path):
        pass
