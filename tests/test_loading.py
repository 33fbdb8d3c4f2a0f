"""minidpo.loading: every supported input read as clean TRL records, rejects returned, the held-out rule shared with
`minidpo convert`."""

import json

import pytest

from helpers import read_jsonl
from records_data import bad_input_lines, line, pair, write_input
from minidpo.convert import convert_file
from minidpo.errors import UserError
from minidpo.loading import detect_format, is_eval, load_trl_records
from minidpo.records import to_trl_record


def test_load_trl_records_reads_every_format(tmp_path):
    lines = bad_input_lines()
    src = tmp_path / "dpo.jsonl"
    write_input(src, lines)
    good = [to_trl_record(json.loads(raw)) for raw, reason in lines if reason is None]

    assert detect_format(src) == "minimind"
    records, rejects = load_trl_records(src)
    assert records == good and len(rejects) == sum(r not in (None, "blank") for _, r in lines)

    convert_file(src, tmp_path / "out", eval_fraction=0.5, seed=1, progress=False)
    assert detect_format(tmp_path / "out") == "convert-dir"
    train, _ = load_trl_records(tmp_path / "out")
    ev, _ = load_trl_records(tmp_path / "out", split="eval")
    assert sorted(map(json.dumps, train + ev)) == sorted(map(json.dumps, good))

    trl = tmp_path / "trl.jsonl"
    trl.write_bytes(b"\n".join(line(r) for r in good) + b"\n" + line(dict(good[0], chosen=[])) + b"\n")
    assert detect_format(trl) == "trl"
    records, rejects = load_trl_records(trl)
    assert records == good and [r["reason"] for r in rejects] == ["bad_type"]

    other = tmp_path / "other.jsonl"
    other.write_text('{"text": "hello"}\n')
    with pytest.raises(UserError, match="cannot tell the format"):
        load_trl_records(other)
    with pytest.raises(UserError, match="without train.jsonl"):
        detect_format(tmp_path)



def test_is_eval_holds_out_what_convert_holds_out(tmp_path):
    """Training's eval_fraction and `convert --eval-fraction` put the same pairs aside for the same seed."""
    lines = bad_input_lines()
    src = tmp_path / "dpo.jsonl"
    write_input(src, lines)
    good = [to_trl_record(json.loads(raw)) for raw, reason in lines if reason is None]
    for seed in (0, 1, 2):
        convert_file(src, tmp_path / f"out{seed}", eval_fraction=0.5, seed=seed, progress=False)
        train = [r for r in good if not is_eval(r, 0.5, seed)]
        evals = [r for r in good if is_eval(r, 0.5, seed)]
        assert train == read_jsonl(tmp_path / f"out{seed}" / "train.jsonl")
        assert evals == read_jsonl(tmp_path / f"out{seed}" / "eval.jsonl")
        assert train and evals


def test_a_file_mixing_minimind_and_trl_lines_loses_none(tmp_path):
    """Each line is read in the format it has; a bad line gets its own format's reason (a TRL line is never
    rejected as a MiniMind line with `no_user_message`)."""
    minimind = [pair(f"q{i}", f"good {i}", f"bad {i}") for i in range(3)]
    trl = [to_trl_record(pair(f"t{i}", f"yes {i}", f"no {i}")) for i in range(3)]
    bad_trl = dict(trl[0], chosen=trl[0]["chosen"] * 2)
    src = tmp_path / "mixed.jsonl"
    src.write_bytes(b"\n".join(line(r) for r in [minimind[0], trl[0], minimind[1], trl[1], bad_trl, minimind[2],
                                                  trl[2]]) + b"\n")
    assert detect_format(src) == "mixed"
    records, rejects = load_trl_records(src)
    assert records == [to_trl_record(minimind[0]), trl[0], to_trl_record(minimind[1]), trl[1],
                       to_trl_record(minimind[2]), trl[2]]
    assert [(r["line"], r["reason"]) for r in rejects] == [(5, "bad_type")]
    assert "exactly one assistant message" in rejects[0]["message"]
    stats = convert_file(src, tmp_path / "out", progress=False)
    assert (stats["converted"], stats["rejected"]) == (6, 1)
    assert read_jsonl(tmp_path / "out" / "train.jsonl") == records
