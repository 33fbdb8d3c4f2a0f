"""minidpo.loading: every supported input read as clean TRL records, rejects returned, the held-out rule shared with
`minidpo convert`."""

import json

import pytest

from helpers import bad_input_lines, line, read_jsonl, write_input
from minidpo.convert import convert_file
from minidpo.errors import UserError
from minidpo.loading import detect_format, load_trl_records, split_records
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



def test_split_records_holds_out_what_convert_holds_out(tmp_path):
    """Training's eval_fraction and `convert --eval-fraction` put the same pairs aside for the same seed."""
    lines = bad_input_lines()
    src = tmp_path / "dpo.jsonl"
    write_input(src, lines)
    good = [to_trl_record(json.loads(raw)) for raw, reason in lines if reason is None]
    for seed in (0, 1, 2):
        convert_file(src, tmp_path / f"out{seed}", eval_fraction=0.5, seed=seed, progress=False)
        train, evals = split_records(good, 0.5, seed)
        assert train == read_jsonl(tmp_path / f"out{seed}" / "train.jsonl")
        assert evals == read_jsonl(tmp_path / f"out{seed}" / "eval.jsonl")
        assert train and evals
