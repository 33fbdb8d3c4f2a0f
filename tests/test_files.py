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


def test_remove_orphans_takes_only_what_dead_processes_of_this_host_left(tmp_path):
    """A writer killed mid-write leaves its temporary; the next writer removes it. Temporaries of a live process
    (this one, another one) or of another host sharing the folder are left alone."""
    import os
    import socket
    import subprocess
    import sys

    from minidpo.files import remove_orphans, temp_sibling

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that was ours and is gone
    host = socket.gethostname()
    orphan_file = tmp_path / f".train.jsonl.tmp-{host}-{dead.pid}.jsonl"
    orphan_dir = tmp_path / f".abc123.tmp-{host}-{dead.pid}"
    kept = [temp_sibling(tmp_path / "mine.json", keep_suffix=True),  # this process: alive
            tmp_path / f".x.tmp-{host}-1",  # pid 1: alive
            tmp_path / f".x.tmp-another-host-{dead.pid}",  # another host: its pids mean nothing here
            tmp_path / "train.jsonl"]  # not a temporary
    orphan_file.write_text("half")
    orphan_dir.mkdir()
    (orphan_dir / "train.arrow").write_bytes(b"half")
    for p in kept:
        p.write_text("x")
    assert sorted(remove_orphans(tmp_path)) == sorted([orphan_file, orphan_dir])
    assert sorted(tmp_path.iterdir()) == sorted(kept)
    assert remove_orphans(tmp_path / "missing") == []
    assert os.getpid() != dead.pid


def test_file_digest_reads_a_file_once_inside_digests_shared_and_every_time_outside(tmp_path, monkeypatch):
    import hashlib

    from minidpo import files

    data = tmp_path / "dpo.jsonl"
    data.write_bytes(b'{"a": 1}\n')
    reads = []
    real = hashlib.file_digest
    monkeypatch.setattr(hashlib, "file_digest", lambda *a: reads.append(1) or real(*a))
    expected = hashlib.sha256(b'{"a": 1}\n').hexdigest()
    with files.digests_shared():
        assert files.file_digest(data) == files.file_digest(data) == expected
    assert len(reads) == 1
    assert files.file_digest(data) == files.file_digest(data) == expected
    assert len(reads) == 3
