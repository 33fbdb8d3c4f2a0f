"""What a training run leaves for people to read: plots, summary.json and the model card's minidpo sections.

  - `callbacks(args)`: `PlotCallback`, which redraws `output_dir/plots/*.png` from `state.log_history` at each
    save, at the end of training and after the final evaluation;
  - `training_summary` / `write_summary`: summary.json (final and best metrics, tokens, wall time);
  - `card_sections`: the data, configuration, metrics and plots sections `MiniDPOTrainer.create_model_card` appends
    to TRL's card, from the trainer's state (so checkpoint cards have them too).
"""

from __future__ import annotations

import json
import math
import time
from enum import Enum
from pathlib import Path

from transformers import TrainerCallback

from minidpo import markdown
from minidpo.console import is_main_process
from minidpo.files import write_text_atomic
from minidpo.plotting import figure, save

# The options minidpo adds to TRL's, and the TRL options that decide what was optimised.
_CARD_KEYS = ("length_normalize", "mask_mode", "loss_type", "beta", "learning_rate", "max_length",
              "per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "max_steps",
              "lr_scheduler_type", "precompute_ref_log_probs", "bf16", "seed")


def callbacks(args) -> list:
    """Trainer callbacks this module contributes to every run (plots, summaries)."""
    return [PlotCallback()]


# ---------------------------------------------------------------------------------------------------------
# Plots


# One training plot per entry: file stem, title, y label, the logged series it draws (train keys; the eval curve
# of each is the same key with "eval_" in front).
TRAINING_PLOTS = (
    ("loss", "DPO loss", "loss", ("loss",)),
    ("accuracy", "Reward accuracy (chosen reward > rejected)", "share of pairs", ("rewards/accuracies",)),
    ("margins", "Reward margin (chosen - rejected)", "beta * log-ratio", ("rewards/margins",)),
    ("rewards", "Rewards", "beta * log-ratio", ("rewards/chosen", "rewards/rejected")),
    ("logps", "Policy log-probs", "log-prob", ("logps/chosen", "logps/rejected")),
    ("learning_rate", "Learning rate", "learning rate", ("learning_rate",)),
)


def _series(log_history: list[dict], key: str) -> tuple[list, list]:
    """(steps, values) of one logged metric. The end-of-training entry (train_runtime, ...) repeats the last
    step's averages and is skipped."""
    xs, ys = [], []
    for entry in log_history:
        if "train_runtime" in entry or key not in entry or "step" not in entry:
            continue
        v = entry[key]
        if isinstance(v, (int, float)) and math.isfinite(v):
            xs.append(entry["step"])
            ys.append(v)
    return xs, ys


def _draw_metric(ax, log_history, title, ylabel, keys) -> bool:
    drawn = False
    colors = {"chosen": "tab:green", "rejected": "tab:red"}
    for key in keys:
        color = next((c for name, c in colors.items() if key.endswith(name)), None)
        label = key.split("/")[-1] if len(keys) > 1 else key
        xs, ys = _series(log_history, key)
        if xs:
            ax.plot(xs, ys, color=color, marker="." if len(xs) < 30 else None, label=f"train {label}")
            drawn = True
        xs, ys = _series(log_history, "eval_" + key)
        if xs:
            ax.plot(xs, ys, color=color, linestyle="--", marker="o", label=f"eval {label}")
            drawn = True
    if drawn:
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return drawn


def plot_training(log_history: list[dict], plots_dir) -> list[Path]:
    """Draw `plots_dir/<name>.png` for every metric group that has been logged, plus `overview.png` with all of
    them; returns the paths written. Metrics never logged (no eval, no learning rate) are left out."""
    plots_dir = Path(plots_dir)
    written, panels = [], []
    for stem, title, ylabel, keys in TRAINING_PLOTS:
        fig = figure()
        if _draw_metric(fig.add_subplot(), log_history, title, ylabel, keys):
            written.append(save(fig, plots_dir / f"{stem}.png"))
            panels.append((title, ylabel, keys))
    if panels:
        ncols = min(3, len(panels))
        nrows = math.ceil(len(panels) / ncols)
        fig = figure(ncols, nrows, width=4.6, height=3.2)
        for i, (title, ylabel, keys) in enumerate(panels):
            _draw_metric(fig.add_subplot(nrows, ncols, i + 1), log_history, title, ylabel, keys)
        written.append(save(fig, plots_dir / "overview.png"))
    return written


class PlotCallback(TrainerCallback):
    """Redraws `output_dir/plots/*.png` from `state.log_history`, on the main process only: at each save, at the end
    of training, and after any evaluation run once training is over (the final `evaluate()`)."""

    def __init__(self):
        self.training_over = False
        self.started = None

    def _draw(self, args, state):
        if is_main_process() and state.log_history:
            plot_training(state.log_history, Path(args.output_dir) / "plots")

    def on_train_begin(self, args, state, control, **kwargs):
        self.training_over = False
        self.started = time.time()

    def on_save(self, args, state, control, **kwargs):
        self._draw(args, state)

    def on_train_end(self, args, state, control, **kwargs):
        self.training_over = True
        self._draw(args, state)

    def on_evaluate(self, args, state, control, **kwargs):
        if self.training_over:
            self._draw(args, state)


def _final(log_history: list[dict], prefix: str) -> dict:
    """The last value of every metric whose name starts with `prefix` (train: no prefix, eval: "eval_")."""
    out = {}
    for entry in log_history:
        for k, v in entry.items():
            if isinstance(v, (int, float)) and (k.startswith(prefix) if prefix else not k.startswith("eval_")):
                out[k] = v
    return out


# Eval metrics whose best value (and the step it was reached at) summary.json records: name -> larger is better.
_BEST = {"eval_rewards/accuracies": True, "eval_rewards/margins": True, "eval_loss": False}


def best_metrics(log_history: list[dict]) -> dict:
    """`{metric: {"value", "step"}}` for each metric of `_BEST` ever logged; the earliest step wins a tie."""
    best = {}
    for key, larger in _BEST.items():
        for entry in log_history:
            v = entry.get(key)
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                continue
            if key not in best or (v > best[key]["value"] if larger else v < best[key]["value"]):
                best[key] = {"value": v, "step": entry.get("step")}
    return best


def _base_model(trainer) -> str:
    model = trainer.accelerator.unwrap_model(trainer.model)
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    name = getattr(model.config, "_name_or_path", "") or ""
    return str(Path(name).resolve()) if name and Path(name).exists() else name


def _plain(value):
    """Enum options (lr_scheduler_type, ...) as the value a config file takes, not `SchedulerType.COSINE`."""
    return value.value if isinstance(value, Enum) else value


def training_summary(trainer, eval_metrics: dict, n_rejected: int = 0) -> dict:
    """summary.json's content: final and best metrics, tokens and time, drops and rejects, base model, config.

    Tokens, seconds and the train loss are the whole run's, over every resume (`run_record.RunRecord` carries them
    in the checkpoints); `resumes` lists each resume and the settings it changed, `config` the settings used last."""
    from minidpo.resilience import find_callback
    from minidpo.run_record import RunRecord

    state = trainer.state
    train_runtime = next((e["train_runtime"] for e in reversed(state.log_history) if "train_runtime" in e), None)
    tokens = trainer._total_train_tokens
    args = trainer.args
    plot_cb = find_callback(trainer, PlotCallback)
    started = getattr(plot_cb, "started", None)
    wall = round(time.time() - started, 2) if started else train_runtime
    final_train = _final(state.log_history, "")
    record = find_callback(trainer, RunRecord)
    resumes, data = [], None
    if record is not None:
        totals = record.so_far()
        tokens, train_runtime, wall = totals["train_tokens"], totals["train_seconds"], round(totals["wall_seconds"], 2)
        resumes, data = record.resumes, record.settings.get("data")
        if totals["loss_steps"] and "train_loss" in final_train:
            final_train.update(train_loss=totals["loss_sum"] / totals["loss_steps"], train_runtime=train_runtime)
    plots_dir = Path(args.output_dir) / "plots"
    return {
        "final_eval": {k: v for k, v in eval_metrics.items()},
        "final_train": final_train,
        "best_eval": best_metrics(state.log_history),
        "global_step": state.global_step,
        "max_steps": state.max_steps,
        "epochs": state.epoch,
        "train_tokens": tokens,  # chosen + rejected tokens fed to the policy (padding excluded), all processes
        "train_seconds": train_runtime,
        "train_tokens_per_second": (tokens / train_runtime) if train_runtime else None,
        # from the start of training to this summary: training, evaluations, checkpoint saves
        "wall_seconds": wall,
        "resumes": resumes,
        "data_sha256": data,
        "pairs_dropped_no_scored_token": dict(trainer.pairs_dropped),
        "lines_rejected": n_rejected,
        "base_model": _base_model(trainer),
        "config": {k: _plain(getattr(args, k)) for k in _CARD_KEYS},
        "output_dir": str(Path(args.output_dir).resolve()),
        "plots": sorted(f"plots/{p.name}" for p in plots_dir.glob("*.png")) if plots_dir.is_dir() else [],
    }


def write_summary(output_dir, summary: dict) -> Path:
    return write_text_atomic(Path(output_dir) / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")


def _table(rows: dict) -> str:
    return "\n".join(markdown.table(["key", "value"], [(f"`{k}`", v) for k, v in rows.items()]))


def fix_card_base(text: str, trainer) -> str:
    """TRL's card names a local base model "None" (it links Hub ids only): name the folder instead, and load the
    model from where it was saved."""
    base = _base_model(trainer)
    where = trainer.hub_model_id or str(Path(trainer.args.output_dir))
    return (text.replace("[None](https://huggingface.co/None)", f"`{base}` (a local model)")
            .replace('model="None"', f"model={where!r}".replace("'", '"')))


def card_sections(trainer) -> str:
    """The markdown minidpo appends to TRL's model card: data, configuration, final and best metrics, plots."""
    summary = training_summary(trainer, _final(trainer.state.log_history, "eval_"), trainer.lines_rejected)
    base = getattr(trainer.accelerator.unwrap_model(trainer.model).config, "_name_or_path", "")
    extra = [
        "", "## minidpo", "",
        f"Trained with [minidpo](https://pypi.org/project/minidpo/) (MiniMind's DPO on TRL): base model `{base}`, "
        f"data `{trainer.data_source}`.", "",
        "### Data", "",
        _table({"pairs dropped (no scored token)": summary["pairs_dropped_no_scored_token"],
                "lines rejected on load": summary["lines_rejected"],
                "train tokens seen": summary["train_tokens"]}), "",
        "### Configuration", "", _table(summary["config"]), "",
        "### Final metrics", "", _table({**summary["final_train"], **summary["final_eval"]}), "",
    ]
    changed = [r for r in summary.get("resumes") or [] if r.get("changed")]
    if changed:
        from minidpo.run_record import describe_changes

        extra += ["### Resumed with other settings", "",
                  "The configuration above holds from the last of these steps on; before each, the earlier values.",
                  "", *(f"- step {r['step']}: {describe_changes(r['changed'], ('before', 'after'))}" for r in changed), ""]
    best = summary.get("best_eval") or {}
    if best:
        extra += ["### Best evaluation", "",
                  _table({f"{k} (step {v['step']})": v["value"] for k, v in best.items()}), ""]
    plots = summary.get("plots") or []
    if plots:
        extra += ["### Training curves", "",
                  "Drawn from the trainer's log history (`plots/`, redrawn at every save); `summary.json` holds the "
                  "numbers.", ""]
        if "plots/overview.png" in plots:
            extra += ["![training curves](plots/overview.png)", ""]
        extra += ["One plot per metric: " + ", ".join(f"[{Path(p).stem}]({p})" for p in plots
                                                      if p != "plots/overview.png"), ""]
    return "\n".join(extra)
