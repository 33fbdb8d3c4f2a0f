"""What people read: the data report, training plots, summary.json, the model card, and `minidpo eval`."""

import json

import pytest

from minidpo import cli, data, embedded, reports

PNG = b"\x89PNG\r\n\x1a\n"


def _tiny(tmp_path_factory, name="base"):
    d = tmp_path_factory.mktemp(name)
    tok = embedded.build_tokenizer(d)
    embedded.build_tiny_model(tok, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                              intermediate_size=64).save_pretrained(d)
    return d, tok


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return _tiny(tmp_path_factory)


@pytest.fixture(scope="module")
def dataset(base, tmp_path_factory):
    """A convert directory of 96 pairs (about a quarter held out) from the embedded generator."""
    d = tmp_path_factory.mktemp("data")
    raw = embedded.write_jsonl(embedded.make_preference_records(96, seed=1), d / "dpo.jsonl")
    data.convert_file(raw, d / "conv", tokenizer=base[1], max_length=128, eval_fraction=0.25, seed=0,
                      progress=False)
    return d / "conv"


def _is_png(path):
    return path.is_file() and path.read_bytes()[:8] == PNG and path.stat().st_size > 2000


# ---------------------------------------------------------------------------------------------------------
# report-data


def test_report_data_on_a_convert_dir(base, dataset, tmp_path, capsys):
    out = tmp_path / "report"
    rc = cli.main(["report-data", str(dataset), "--tokenizer", str(base[0]), "--output", str(out),
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
        assert _is_png(out / name), name
    assert set(rep["plots"]) == {"lengths.png", "length_pairs.png", "sequence_lengths.png", "turns.png"}


def test_report_data_finds_length_bias_duplicates_and_rejects(base, tmp_path):
    records = embedded.make_preference_records(40, seed=3)
    for r in records:  # make every chosen answer much longer
        r["chosen"][-1]["content"] += " Here are many more words to make this answer clearly longer than the other."
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    lines += [lines[0], lines[1], "{not json", json.dumps({"chosen": [], "rejected": []})]
    path = tmp_path / "dpo.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    rep = reports.report_data(path, base[1], tmp_path / "r", max_length=512)
    assert rep["format"] == "minimind"
    assert rep["counts"] == {"records_read": 44, "usable": 42, "rejected": 2, "by_split": {"train": 42}}
    assert rep["rejected_by_reason"] == {"invalid_json": 1, "empty_conversation": 1}
    assert rep["duplicates"]["exact_duplicate_pairs"] == 2
    assert rep["length_bias"]["share_chosen_longer"] == 1.0 and rep["length_bias"]["mean_length_ratio"] > 1.5
    assert "systematically longer" in rep["length_bias"]["advice"] and "length_normalize" in rep["length_bias"]["advice"]
    assert rep["truncation"]["longer_than_max_length"] == 0


def test_report_data_counts_pairs_left_with_nothing_to_score(base, dataset, tmp_path):
    rep = reports.report_data(dataset, base[1], tmp_path / "r", max_length=16)
    tr = rep["truncation"]
    assert tr["longer_than_max_length"] == 96 and tr["nothing_left_to_score"] == 96


def test_report_data_errors(base, tmp_path, capsys):
    rc = cli.main(["report-data", str(tmp_path / "nope.jsonl"), "--tokenizer", str(base[0]), "--output",
                   str(tmp_path / "r")])
    assert rc == 2 and "not found" in capsys.readouterr().err
    odd = tmp_path / "sft.jsonl"
    odd.write_text(json.dumps({"instruction": "hi", "output": "hello"}) + "\n")
    rc = cli.main(["report-data", str(odd), "--tokenizer", str(base[0]), "--output", str(tmp_path / "r")])
    assert rc == 2 and "cannot tell the format" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# Training plots, summary.json, model card


def test_plot_training_draws_what_was_logged(tmp_path):
    history = []
    for step in range(1, 11):
        history.append({"step": step, "loss": 0.69 - 0.02 * step, "learning_rate": 1e-3 * (1 - step / 10),
                        "rewards/accuracies": min(1.0, 0.5 + 0.05 * step), "rewards/margins": 0.01 * step,
                        "rewards/chosen": 0.005 * step, "rewards/rejected": -0.005 * step,
                        "logps/chosen": -7 + 0.01 * step, "logps/rejected": -7 - 0.05 * step})
        if step % 5 == 0:
            history.append({"step": step, "eval_loss": 0.6, "eval_rewards/accuracies": 0.5 + step / 40})
    history.append({"step": 10, "train_runtime": 1.0, "train_loss": 0.5, "rewards/accuracies": 0.0})
    paths = reports.plot_training(history, tmp_path / "plots")
    names = {p.name for p in paths}
    assert names == {"loss.png", "accuracy.png", "margins.png", "rewards.png", "logps.png", "learning_rate.png",
                     "overview.png"}
    assert all(_is_png(p) for p in paths)
    xs, ys = reports._series(history, "rewards/accuracies")
    assert xs == list(range(1, 11)) and 0.0 not in ys  # the end-of-training summary entry is not a point
    assert reports.best_metrics(history) == {"eval_rewards/accuracies": {"value": 0.75, "step": 10},
                                             "eval_loss": {"value": 0.6, "step": 5}}
    assert reports.plot_training([{"step": 1, "epoch": 0.1}], tmp_path / "empty") == []


@pytest.fixture(scope="module")
def trained(base, dataset, tmp_path_factory):
    from minidpo import train

    out = tmp_path_factory.mktemp("run") / "model"
    argv = ["--model_name_or_path", str(base[0]), "--dataset_name", str(dataset), "--output_dir", str(out),
            "--max_steps", "6", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "64",
            "--learning_rate", "5e-3", "--logging_steps", "1", "--eval_strategy", "steps", "--eval_steps", "3",
            "--save_strategy", "steps", "--save_steps", "3", "--max_length", "128", "--report_to", "none",
            "--disable_tqdm", "true", "--dataloader_num_workers", "0", "--seed", "0"]
    summary = train.main(*train.parse(argv))
    return out, summary


def test_training_writes_plots_summary_and_card(trained, base):
    out, summary = trained
    plots = out / "plots"
    for name in ("loss", "accuracy", "margins", "rewards", "logps", "learning_rate", "overview"):
        assert _is_png(plots / f"{name}.png"), name
    assert (out / "checkpoint-3").is_dir()  # the save that redrew the plots mid-run
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["plots"] == sorted(f"plots/{p.name}" for p in plots.glob("*.png"))
    best = on_disk["best_eval"]
    assert set(best) == {"eval_rewards/accuracies", "eval_rewards/margins", "eval_loss"}
    assert best["eval_loss"]["step"] in (3, 6) and best["eval_loss"]["value"] <= on_disk["final_eval"]["eval_loss"]
    assert on_disk["train_tokens"] > 0 and on_disk["train_tokens_per_second"] > 0
    assert on_disk["wall_seconds"] >= on_disk["train_seconds"] > 0
    assert on_disk["base_model"] == str(base[0].resolve())
    card = (out / "README.md").read_text()
    assert "![training curves](plots/overview.png)" in card and "(plots/loss.png)" in card
    assert "Best evaluation" in card


def test_plot_callback_only_on_main_process(tmp_path):
    from types import SimpleNamespace

    cb = reports.callbacks(None)[0]
    state = SimpleNamespace(is_world_process_zero=False, log_history=[{"step": 1, "loss": 0.7}])
    args = SimpleNamespace(output_dir=str(tmp_path))
    cb.on_save(args, state, None)
    assert not (tmp_path / "plots").exists()
    state.is_world_process_zero = True
    cb.on_evaluate(args, state, None)  # mid-training evaluations wait for the next save
    assert not (tmp_path / "plots").exists()
    cb.on_save(args, state, None)
    assert _is_png(tmp_path / "plots" / "loss.png")


# ---------------------------------------------------------------------------------------------------------
# minidpo eval


def test_eval_matches_trainer_and_writes_side_by_side(trained, dataset, tmp_path, capsys):
    out, summary = trained
    rc = cli.main(["eval", "--model", str(out), "--data", str(dataset), "--generate", "2", "--max-new-tokens", "8",
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
    assert res["pairs"] == len(data.load_trl_records(dataset, "eval")[0])
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
