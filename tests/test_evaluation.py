"""minidpo.evaluation (`minidpo eval`): the trainer's own eval metrics reproduced from a saved run, answers side by
side, clear errors."""

import json

import pytest

from minidpo import cli, loading


def test_eval_matches_trainer_and_writes_side_by_side(trained, converted, tmp_path, capsys):
    out, summary = trained
    rc = cli.main(["eval", "--model", str(out), "--data", str(converted), "--generate", "2", "--max-new-tokens", "8",
                   "--output", str(tmp_path / "ev")])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "reference" in printed and "policy" in printed and "length_averaged" in printed
    res = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert res["reference"] == summary["base_model"]  # default reference: the base the run recorded
    assert res["beta"] == 0.1 and res["max_length"] == 128
    final = summary["final_eval"]
    avg = res["length_averaged"]
    # Same pairs, same masks, one eval batch in training: the no-grad loop reproduces trainer.evaluate().
    assert res["pairs"] == len(loading.load_trl_records(converted, "eval")[0])
    assert avg["reward_accuracy"] == pytest.approx(final["eval_rewards/accuracies"], abs=1e-6)
    assert avg["reward_margin"] == pytest.approx(final["eval_rewards/margins"], abs=1e-4)
    assert avg["sigmoid_loss"] == pytest.approx(final["eval_loss"], abs=1e-4)
    assert abs(res["summed"]["reward_margin"]) > abs(avg["reward_margin"])  # sums over ~20 tokens
    assert len(res["samples"]) == 2 and all(s["policy"] and s["reference"] for s in res["samples"])
    md = (tmp_path / "ev" / "eval.md").read_text()
    assert "| length averaged |" in md and "| summed |" in md and "Answers side by side" in md


def test_eval_errors(trained, tmp_path, capsys):
    out, _ = trained
    rc = cli.main(["eval", "--model", str(tmp_path / "none"), "--data", str(tmp_path)])
    assert rc == 2 and "not a model folder" in capsys.readouterr().err
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text("{}")
    rc = cli.main(["eval", "--model", str(bare), "--data", str(tmp_path)])
    assert rc == 2 and "--ref" in capsys.readouterr().err


def test_eval_scores_the_pairs_the_run_held_out_by_default(trained, converted, tmp_path):
    out, summary = trained
    held_out = loading.load_trl_records(converted, "eval")[0]
    assert [json.loads(x) for x in (out / "eval_pairs.jsonl").read_text(encoding="utf-8").splitlines()] == held_out
    assert cli.main(["eval", "--model", str(out), "--output", str(tmp_path / "ev")]) == 0
    res = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert res["data"] == str(out / "eval_pairs.jsonl") and res["pairs"] == len(held_out)
    assert res["length_averaged"]["sigmoid_loss"] == pytest.approx(summary["final_eval"]["eval_loss"], abs=1e-4)


def test_eval_without_held_out_pairs_asks_for_data(small_base, tmp_path, capsys):
    rc = cli.main(["eval", "--model", str(small_base[0])])
    assert rc == 2 and "holds no eval_pairs.jsonl" in capsys.readouterr().err
