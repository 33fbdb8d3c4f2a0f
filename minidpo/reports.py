"""What a run leaves behind for people to read: summary.json and the model card."""

from __future__ import annotations

import json
import os
from pathlib import Path

# The options minidpo adds to TRL's, and the TRL options that decide what was optimised.
_CARD_KEYS = ("length_normalize", "mask_mode", "loss_type", "beta", "learning_rate", "max_length",
              "per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "max_steps",
              "lr_scheduler_type", "precompute_ref_log_probs", "bf16", "seed")


def callbacks(args) -> list:
    """Trainer callbacks this module contributes to every run (plots, summaries)."""
    return []


def _final(log_history: list[dict], prefix: str) -> dict:
    """The last value of every metric whose name starts with `prefix` (train: no prefix, eval: "eval_")."""
    out = {}
    for entry in log_history:
        for k, v in entry.items():
            if isinstance(v, (int, float)) and (k.startswith(prefix) if prefix else not k.startswith("eval_")):
                out[k] = v
    return out


def training_summary(trainer, eval_metrics: dict, n_rejected: int = 0) -> dict:
    state = trainer.state
    train_runtime = next((e["train_runtime"] for e in reversed(state.log_history) if "train_runtime" in e), None)
    tokens = trainer._total_train_tokens
    args = trainer.args
    return {
        "final_eval": {k: v for k, v in eval_metrics.items()},
        "final_train": _final(state.log_history, ""),
        "global_step": state.global_step,
        "epochs": state.epoch,
        "train_tokens": tokens,
        "train_seconds": train_runtime,
        "train_tokens_per_second": (tokens / train_runtime) if train_runtime else None,
        "pairs_dropped_no_scored_token": dict(trainer.pairs_dropped),
        "lines_rejected": n_rejected,
        "config": {k: getattr(args, k) for k in _CARD_KEYS},
        "output_dir": str(Path(args.output_dir).resolve()),
    }


def write_summary(output_dir, summary: dict) -> Path:
    path = Path(output_dir) / "summary.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def _table(rows: dict) -> str:
    lines = ["| key | value |", "| --- | --- |"]
    lines += [f"| `{k}` | {v:.4g} |" if isinstance(v, float) else f"| `{k}` | {v} |" for k, v in rows.items()]
    return "\n".join(lines)


def write_model_card(trainer, output_dir, script_args, summary: dict) -> Path:
    """TRL's model card (base model, framework versions, citation) plus minidpo's data, config and metrics."""
    output_dir = Path(output_dir)
    trainer.create_model_card(model_name=output_dir.name, dataset_name=None)
    card = output_dir / "README.md"
    base = getattr(trainer.accelerator.unwrap_model(trainer.model).config, "_name_or_path", "")
    extra = [
        "", "## minidpo", "",
        f"Trained with [minidpo](https://pypi.org/project/minidpo/) (MiniMind's DPO on TRL): base model `{base}`, "
        f"data `{script_args.dataset_name}`.", "",
        "### Data", "",
        _table({"pairs dropped (no scored token)": summary["pairs_dropped_no_scored_token"],
                "lines rejected on load": summary["lines_rejected"],
                "train tokens seen": summary["train_tokens"]}), "",
        "### Configuration", "", _table(summary["config"]), "",
        "### Final metrics", "", _table({**summary["final_train"], **summary["final_eval"]}), "",
    ]
    with open(card, "a", encoding="utf-8") as f:
        f.write("\n".join(extra))
    return card
