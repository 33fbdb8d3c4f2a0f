"""minidpo.convert (`minidpo convert`): every input line converted or rejected with its line number and reason,
counts that add up, a deterministic held-out split, nothing half-written."""

import base64
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import REPO, assert_one_line_error, read_jsonl, shared_path, subprocess_env
from records_data import bad_input_lines, line, minimind_records, pair, write_input
from minidpo.convert import convert_file
from minidpo.errors import UserError
from minidpo.records import to_trl_record


def test_bad_input_file(tmp_path):
    lines = bad_input_lines()
    src = tmp_path / "dpo.jsonl"
    write_input(src, lines)
    stats = convert_file(src, tmp_path / "out", progress=False)

    rejects = {r["line"]: r for r in read_jsonl(tmp_path / "out" / "rejects.jsonl")}
    expected_bad = {n: reason for n, (_, reason) in enumerate(lines, 1) if reason not in (None, "blank")}
    assert {n: r["reason"] for n, r in rejects.items()} == expected_bad
    for n, r in rejects.items():
        assert r["message"]
        if r["reason"] != "invalid_utf8":
            assert r["raw"] == lines[n - 1][0].decode("utf-8")
    utf8 = next(r for r in rejects.values() if r["reason"] == "invalid_utf8")
    assert base64.b64decode(utf8["raw_base64"]) == lines[utf8["line"] - 1][0]

    # Every good line, content preserved exactly, in input order.
    good = [to_trl_record(json.loads(raw)) for raw, reason in lines if reason is None]
    assert read_jsonl(tmp_path / "out" / "train.jsonl") == good
    assert not (tmp_path / "out" / "eval.jsonl").exists()

    n_records = sum(reason != "blank" for _, reason in lines)
    assert stats["lines_read"] == len(lines)
    assert stats["records_read"] == n_records
    assert stats["converted"] == stats["train"] == len(good)
    assert stats["rejected"] == len(expected_bad) == sum(stats["rejected_by_reason"].values())
    assert stats["converted"] + stats["rejected"] == stats["records_read"]
    assert json.loads((tmp_path / "out" / "stats.json").read_text()) == json.loads(json.dumps(stats))
    assert not [p for p in (tmp_path / "out").iterdir() if ".tmp-" in p.name]


def test_eval_split_is_deterministic_disjoint_and_close_to_the_fraction(tmp_path):
    src = tmp_path / "dpo.jsonl"
    src.write_bytes(b"\n".join(line(pair(f"q{i}", f"good {i}", f"bad {i}")) for i in range(2000)) + b"\n")
    runs = []
    for name in ("a", "b"):
        stats = convert_file(src, tmp_path / name, eval_fraction=0.1, seed=3, progress=False)
        runs.append((read_jsonl(tmp_path / name / "train.jsonl"), read_jsonl(tmp_path / name / "eval.jsonl")))
        assert stats["train"] + stats["eval"] == 2000
    assert runs[0] == runs[1]
    train, ev = runs[0]
    assert 150 <= len(ev) <= 250
    keys = lambda rs: {r["prompt"][0]["content"] for r in rs}  # noqa: E731
    assert not keys(train) & keys(ev) and len(keys(train) | keys(ev)) == 2000
    convert_file(src, tmp_path / "c", eval_fraction=0.1, seed=4, progress=False)
    assert keys(read_jsonl(tmp_path / "c" / "eval.jsonl")) != keys(ev)
    # Rerunning without a split removes the old eval.jsonl rather than leaving it to be loaded.
    convert_file(src, tmp_path / "a", progress=False, overwrite=True)
    assert not (tmp_path / "a" / "eval.jsonl").exists()


def test_strict_stops_at_the_first_bad_line_and_writes_nothing(tmp_path):
    src = tmp_path / "dpo.jsonl"
    write_input(src, bad_input_lines())
    with pytest.raises(UserError, match=r"dpo.jsonl:2: invalid_json"):
        convert_file(src, tmp_path / "out", strict=True, progress=False)
    assert list((tmp_path / "out").iterdir()) == []


def test_nothing_converts_or_nothing_to_read_is_an_error(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_bytes(b"nope\n[]\n")
    with pytest.raises(UserError, match="no record converted"):
        convert_file(src, tmp_path / "out", progress=False)
    assert len(read_jsonl(tmp_path / "out" / "rejects.jsonl")) == 2  # kept: they explain the failure
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["rejects.jsonl", "stats.json"]  # no empty output
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"\n\r\n")
    with pytest.raises(UserError, match="no records"):
        convert_file(empty, tmp_path / "out2", progress=False)
    assert not (tmp_path / "out2" / "train.jsonl").exists()


def test_bad_paths_and_options(tmp_path):
    with pytest.raises(UserError, match="not found"):
        convert_file(tmp_path / "missing.jsonl", tmp_path / "out")
    with pytest.raises(UserError, match="directory"):
        convert_file(tmp_path, tmp_path / "out")
    src = tmp_path / "dpo.jsonl"
    src.write_bytes(line(pair()))  # no final newline
    with pytest.raises(UserError, match="eval-fraction"):
        convert_file(src, tmp_path / "out", eval_fraction=1.0)
    with pytest.raises(UserError, match="max-length"):
        convert_file(src, tmp_path / "out", max_length=10)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="must be a directory"):
        convert_file(src, tmp_path / "file")
    assert convert_file(src, tmp_path / "out", progress=False)["converted"] == 1


def _cli(*args):
    # What the `minidpo` console script runs (`minidpo.cli:main`).
    code = "import sys; from minidpo.cli import main; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env=subprocess_env())


def test_cli_exit_codes_and_messages(tmp_path):
    r = _cli("convert", tmp_path / "missing.jsonl", "--output", tmp_path / "out")
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0
    assert "input file not found" in r.stderr

    src = tmp_path / "dpo.jsonl"
    write_input(src, bad_input_lines())
    r = _cli("convert", src, "--output", tmp_path / "out", "--eval-fraction", "0.3", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "converted 7 of 21 records" in r.stdout and "invalid_utf8" in r.stdout and "stats.json" in r.stdout

    r = _cli("convert", src, "--output", tmp_path / "out2", "--strict", "--no-progress")
    assert r.returncode != 0 and "Traceback" not in r.stderr and ":2: invalid_json" in r.stderr


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(minimind_records(), min_size=1, max_size=5))
def test_valid_files_round_trip(recs):
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "dpo.jsonl"
        src.write_bytes(b"\r\n".join(line(r) for r in recs) + b"\r\n")
        stats = convert_file(src, Path(d) / "out", progress=False)
        assert stats["converted"] == len(recs) and stats["rejected"] == 0
        out = read_jsonl(Path(d) / "out" / "train.jsonl")
        assert [o["prompt"] + o["chosen"] for o in out] == [r["chosen"] for r in recs]


@pytest.fixture(scope="module")
def minimind2():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(shared_path("tokenizers", "minimind2")))


def test_tokenizer_path_rejects_records_with_nothing_to_score(tmp_path, minimind2):
    long_prompt = pair(prompt="word " * 200, good="short", bad="brief")
    lines = [(line(pair()), None), (line(long_prompt), "no_scored_tokens"), (line(pair("Q2", "A2", "B2")), None)]
    src = tmp_path / "dpo.jsonl"
    write_input(src, lines, bom=False, crlf=False)
    stats = convert_file(src, tmp_path / "out", tokenizer=minimind2, max_length=64, progress=False)
    rejects = read_jsonl(tmp_path / "out" / "rejects.jsonl")
    assert [(r["line"], r["reason"]) for r in rejects] == [(2, "no_scored_tokens")]
    assert stats["converted"] == 2
    lengths = stats["token_lengths"]
    assert lengths["chosen"]["max"] <= 64 and lengths["chosen_scored"]["min"] > 0


def test_tokenizer_path_seed_record_stats_and_warnings(tmp_path, minimind2):
    src = shared_path("samples", "seed_record.jsonl")
    stats = convert_file(src, tmp_path / "out", tokenizer=minimind2, max_length=1024, progress=False)
    assert stats["token_lengths"]["chosen_scored"]["max"] == 279
    assert stats["token_lengths"]["rejected_scored"]["max"] == 330
    # Cut inside the answers: converted, but flagged with its line number.
    stats = convert_file(src, tmp_path / "cut", tokenizer=minimind2, max_length=100, progress=False)
    assert stats["converted"] == 1 and stats["warnings_by_code"]["answer_truncated"] == 2
    assert {w["line"] for w in stats["warnings"]} == {1}


def test_tokenizer_without_chat_template_is_a_user_error(tmp_path, minimind2):
    import copy

    tok = copy.deepcopy(minimind2)
    tok.chat_template = None
    src = tmp_path / "dpo.jsonl"
    src.write_bytes(line(pair()) + b"\n")
    with pytest.raises(UserError, match="no_chat_template"):
        convert_file(src, tmp_path / "out", tokenizer=tok, progress=False)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------
# Never over its input or outputs it did not make; a failed write leaves nothing


def _tree(root: Path) -> dict:
    """Every file under `root`, hidden ones included, with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _run(capsys, *args) -> tuple:
    """`minidpo ARGS` in this process: (exit status, stdout, stderr)."""
    from minidpo.cli import main

    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _source(tmp_path: Path, n: int = 5, name: str = "dpo.jsonl") -> Path:
    src = tmp_path / name
    src.write_bytes(b"".join(line(pair(f"q{i}", f"good {i}", f"bad {i}")) + b"\n" for i in range(n)))
    return src


def test_convert_never_writes_over_its_own_input(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    _source(data, name="train.jsonl")
    before = _tree(tmp_path)
    for extra in ([], ["--overwrite"]):
        rc, _, err = _run(capsys, "convert", data / "train.jsonl", "--output", data, "--no-progress", *extra)
        assert rc == 2
        assert_one_line_error(err, "minidpo convert: error:", f"would overwrite the input {data / 'train.jsonl'} "
                              "itself", "choose another --output")
        assert _tree(tmp_path) == before


def test_convert_replaces_earlier_outputs_only_with_overwrite(tmp_path, capsys):
    src = _source(tmp_path)
    assert _run(capsys, "convert", src, "--output", tmp_path / "out", "--no-progress")[0] == 0
    _source(tmp_path, n=3)
    before = _tree(tmp_path / "out")
    rc, _, err = _run(capsys, "convert", src, "--output", tmp_path / "out", "--no-progress")
    assert rc == 2
    assert_one_line_error(err, "already holds train.jsonl, rejects.jsonl, stats.json", "pass --overwrite")
    assert _tree(tmp_path / "out") == before
    assert _run(capsys, "convert", src, "--output", tmp_path / "out", "--no-progress", "--overwrite")[0] == 0
    assert len(read_jsonl(tmp_path / "out" / "train.jsonl")) == 3


@pytest.fixture
def disk_full(monkeypatch):
    """Writes to convert's output files fail with ENOSPC after the first one, as on a full disk."""
    import errno
    import os

    import minidpo.convert

    class Full:
        def __init__(self, f):
            self.f, self.writes = f, 0

        def write(self, text):
            self.writes += 1
            if self.writes > 1:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(text)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(minidpo.convert, "open", lambda *a, **k: Full(open(*a, **k)), raising=False)


def test_a_full_disk_while_converting_is_one_line_and_leaves_nothing(tmp_path, capsys, disk_full):
    src = _source(tmp_path)
    before = _tree(tmp_path)
    rc, _, err = _run(capsys, "convert", src, "--output", tmp_path / "new" / "out", "--no-progress")
    assert rc == 2
    assert_one_line_error(err, f"cannot write the converted pairs to {tmp_path / 'new' / 'out'}: "
                               "no space left on the device")
    assert _tree(tmp_path) == before and not (tmp_path / "new" / "out").exists()


def test_a_full_disk_while_overwriting_keeps_the_earlier_outputs(tmp_path, capsys, monkeypatch):
    import minidpo.convert

    src = _source(tmp_path)
    assert _run(capsys, "convert", src, "--output", tmp_path / "out", "--no-progress")[0] == 0
    before = _tree(tmp_path)

    def no_space(path, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(minidpo.convert, "open", no_space, raising=False)
    rc, _, err = _run(capsys, "convert", src, "--output", tmp_path / "out", "--no-progress", "--overwrite")
    assert rc == 2
    assert_one_line_error(err, "no space left on the device")
    assert _tree(tmp_path) == before  # the earlier outputs whole, no temporary left


def test_an_empty_eval_split_is_a_warning(tmp_path, capsys):
    from minidpo.records import in_eval_split

    src = _source(tmp_path, n=60)
    lines = [json.dumps(to_trl_record(json.loads(x)), ensure_ascii=False).encode()
             for x in src.read_bytes().split(b"\n") if x]
    seed = next(s for s in range(100) if not any(in_eval_split(x, s, 0.02) for x in lines))
    rc, out, _ = _run(capsys, "convert", src, "--output", tmp_path / "out", "--eval-fraction", "0.02",
                      "--seed", seed, "--no-progress")
    assert rc == 0
    assert "WARNING: --eval-fraction 0.02 of 60 pairs held out none: eval.jsonl is empty; raise it to at least " \
           "0.017" in out
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["eval"] == 0 and stats["warnings_by_code"] == {"empty_eval_split": 1}


def test_pairs_identical_after_truncation_are_counted_with_their_line(tmp_path):
    from minidpo.embedded import build_tokenizer

    src = tmp_path / "dpo.jsonl"
    same_start = "The same long start of an answer. " * 8
    src.write_bytes(line(pair("q", "short good", "short bad")) + b"\n" +
                    line(pair("q", same_start + "good", same_start + "bad")) + b"\n")
    stats = convert_file(src, tmp_path / "out", tokenizer=build_tokenizer(), max_length=40, progress=False)
    assert stats["converted"] == 2 and stats["warnings_by_code"]["identical_after_truncation"] == 1
    [w] = [w for w in stats["warnings"] if w["code"] == "identical_after_truncation"]
    assert w["line"] == 2 and "loss ln 2" in w["message"]


def test_what_a_killed_convert_left_goes_with_the_next_one(tmp_path, capsys):
    """A convert killed mid-write (SIGKILL runs no cleanup) leaves its hidden temporaries; the next convert into
    that folder removes them."""
    import socket

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "out"
    out.mkdir()
    orphan = out / f".train.jsonl.tmp-{socket.gethostname()}-{dead.pid}.jsonl"
    orphan.write_text('{"half": ')
    assert _run(capsys, "convert", _source(tmp_path), "--output", out, "--no-progress")[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["rejects.jsonl", "stats.json", "train.jsonl"]
