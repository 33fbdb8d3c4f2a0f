"""minidpo.data_report (`minidpo report-data`): counts, lengths, length bias, duplicates and truncation of a
preference set, as report.md + report.json + plots."""

import json

from helpers import is_png
from minidpo import cli, data_report, embedded


def test_report_data_on_a_convert_dir(small_base, converted, tmp_path, capsys):
    out = tmp_path / "report"
    rc = cli.main(["report-data", str(converted), "--tokenizer", str(small_base[0]), "--output", str(out),
                   "--max-length", "48"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "usable pairs" in printed and "report.md" in printed
    rep = json.loads((out / "report.json").read_text())
    assert rep["format"] == "convert-dir"
    assert rep["counts"]["usable"] == 96 == sum(rep["counts"]["by_split"].values()) == rep["pairs"]
    assert set(rep["token_lengths"]) == {"prompt", "chosen_scored", "rejected_scored", "sequence"}
    lb = rep["length_bias"]
    assert lb["chosen_longer"] + lb["rejected_longer"] + lb["equal"] == 96
    assert 0.8 < lb["mean_length_ratio"] < 1.25  # the generator pairs closings by length
    assert sum(rep["turns_per_conversation"].values()) == 96
    tr = rep["truncation"]
    assert 0 < tr["longer_than_max_length"] < 96 and tr["nothing_left_to_score"] == 0
    assert tr["scored_tokens_cut"] <= tr["longer_than_max_length"] and len(tr["longest"]) == 10
    assert tr["longest"] == sorted(tr["longest"], key=lambda x: -x["tokens"])
    md = (out / "report.md").read_text()
    for name in rep["plots"]:
        assert f"]({name})" in md
        assert is_png(out / name), name
    assert set(rep["plots"]) == {"lengths.png", "length_pairs.png", "sequence_lengths.png", "turns.png"}


def test_report_data_finds_length_bias_duplicates_and_rejects(small_base, tmp_path):
    records = embedded.make_preference_records(40, seed=3)
    for r in records:  # make every chosen answer much longer
        r["chosen"][-1]["content"] += " Here are many more words to make this answer clearly longer than the other."
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    lines += [lines[0], lines[1], "{not json", json.dumps({"chosen": [], "rejected": []})]
    path = tmp_path / "dpo.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    rep = data_report.report_data(path, small_base[1], tmp_path / "r", max_length=512)
    assert rep["format"] == "minimind"
    assert rep["counts"] == {"records_read": 44, "usable": 42, "rejected": 2, "by_split": {"train": 42}}
    assert rep["rejected_by_reason"] == {"invalid_json": 1, "empty_conversation": 1}
    assert rep["duplicates"]["exact_duplicate_pairs"] == 2
    assert rep["length_bias"]["share_chosen_longer"] == 1.0 and rep["length_bias"]["mean_length_ratio"] > 1.5
    assert "systematically longer" in rep["length_bias"]["advice"] and "length_normalize" in rep["length_bias"]["advice"]
    assert rep["truncation"]["longer_than_max_length"] == 0


def test_report_data_counts_pairs_left_with_nothing_to_score(small_base, converted, tmp_path):
    rep = data_report.report_data(converted, small_base[1], tmp_path / "r", max_length=16)
    tr = rep["truncation"]
    assert tr["longer_than_max_length"] == 96 and tr["nothing_left_to_score"] == 96


def test_report_data_counts_pairs_identical_after_truncation(small_base, tmp_path):
    same_start = "The same long start of an answer. " * 8
    records = [{"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": same_start + end}],
                "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": same_start + "bad"}]}
               for end in ("good", "fine")]
    path = tmp_path / "dpo.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    rep = data_report.report_data(path, small_base[1], tmp_path / "r", max_length=40)
    assert rep["truncation"]["identical_after_truncation"] == 2
    assert "2 are identical after truncation" in (tmp_path / "r" / "report.md").read_text()


def test_report_data_errors(small_base, tmp_path, capsys):
    rc = cli.main(["report-data", str(tmp_path / "nope.jsonl"), "--tokenizer", str(small_base[0]), "--output",
                   str(tmp_path / "r")])
    assert rc == 2 and "not found" in capsys.readouterr().err
    odd = tmp_path / "sft.jsonl"
    odd.write_text(json.dumps({"instruction": "hi", "output": "hello"}) + "\n")
    rc = cli.main(["report-data", str(odd), "--tokenizer", str(small_base[0]), "--output", str(tmp_path / "r")])
    assert rc == 2 and "cannot tell the format" in capsys.readouterr().err


