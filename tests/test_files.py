"""minidpo.files: atomic writes leave the old file or the whole new one, never half; input files checked."""

import pytest

from minidpo.errors import UserError
from minidpo.files import atomic_path, check_input_file, write_text_atomic


def test_atomic_path_replaces_only_on_success(tmp_path):
    path = tmp_path / "sub" / "stats.json"
    write_text_atomic(path, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert path.read_text() == "old"
    with atomic_path(path) as tmp:
        assert tmp.parent == path.parent and tmp.name.startswith(".") and tmp.suffix == path.suffix
        tmp.write_text("new")
        assert path.read_text() == "old"  # not visible before the block ends
    assert path.read_text() == "new"
    assert sorted(p.name for p in path.parent.iterdir()) == ["stats.json"]


def test_check_input_file(tmp_path):
    with pytest.raises(UserError, match="not found") as e:
        check_input_file(tmp_path / "missing.jsonl")
    assert e.value.code == "missing_path"
    with pytest.raises(UserError, match="is a directory"):
        check_input_file(tmp_path)
    (tmp_path / "ok.jsonl").write_text("{}\n")
    check_input_file(tmp_path / "ok.jsonl")
