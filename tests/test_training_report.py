"""minidpo.training_report: plots from the log history, summary.json and the model card's minidpo sections."""

import json

from helpers import is_png
from minidpo import training_report


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
    paths = training_report.plot_training(history, tmp_path / "plots")
    names = {p.name for p in paths}
    assert names == {"loss.png", "accuracy.png", "margins.png", "rewards.png", "logps.png", "learning_rate.png",
                     "overview.png"}
    assert all(is_png(p) for p in paths)
    xs, ys = training_report._series(history, "rewards/accuracies")
    assert xs == list(range(1, 11)) and 0.0 not in ys  # the end-of-training summary entry is not a point
    assert training_report.best_metrics(history) == {"eval_rewards/accuracies": {"value": 0.75, "step": 10},
                                             "eval_loss": {"value": 0.6, "step": 5}}
    assert training_report.plot_training([{"step": 1, "epoch": 0.1}], tmp_path / "empty") == []


def test_training_writes_plots_summary_and_card(trained, small_base):
    out, summary = trained
    plots = out / "plots"
    for name in ("loss", "accuracy", "margins", "rewards", "logps", "learning_rate", "overview"):
        assert is_png(plots / f"{name}.png"), name
    assert (out / "checkpoint-3").is_dir()  # the save that redrew the plots mid-run
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["plots"] == sorted(f"plots/{p.name}" for p in plots.glob("*.png"))
    best = on_disk["best_eval"]
    assert set(best) == {"eval_rewards/accuracies", "eval_rewards/margins", "eval_loss"}
    assert best["eval_loss"]["step"] in (3, 6) and best["eval_loss"]["value"] <= on_disk["final_eval"]["eval_loss"]
    assert on_disk["train_tokens"] > 0 and on_disk["train_tokens_per_second"] > 0
    assert on_disk["wall_seconds"] >= on_disk["train_seconds"] > 0
    assert on_disk["base_model"] == str(small_base[0].resolve())
    assert on_disk["config"]["lr_scheduler_type"] == "linear"  # the config file's word, not SchedulerType.LINEAR
    card = (out / "README.md").read_text()
    assert "![training curves](plots/overview.png)" in card and "(plots/loss.png)" in card
    assert "Best evaluation" in card


def test_plot_callback_only_on_main_process(tmp_path, monkeypatch):
    from types import SimpleNamespace

    cb = training_report.callbacks(None)[0]
    state = SimpleNamespace(log_history=[{"step": 1, "loss": 0.7}])
    args = SimpleNamespace(output_dir=str(tmp_path))
    monkeypatch.setattr(training_report, "is_main_process", lambda: False)  # minidpo.console's one rank-0 test
    cb.on_save(args, state, None)
    assert not (tmp_path / "plots").exists()
    monkeypatch.setattr(training_report, "is_main_process", lambda: True)
    cb.on_evaluate(args, state, None)  # mid-training evaluations wait for the next save
    assert not (tmp_path / "plots").exists()
    cb.on_save(args, state, None)
    assert is_png(tmp_path / "plots" / "loss.png")


