"""What people read to see what happens: the data report, training plots, summary.json and the model card.

  - `minidpo report-data INPUT --tokenizer DIR --output DIR`: counts, rejects, token lengths, length bias of
    chosen vs rejected, turns, duplicates and truncation of a preference set, as report.md + report.json + PNGs;
  - `callbacks(args)`: `PlotCallback`, which redraws `output_dir/plots/*.png` from `state.log_history` at each
    save, at the end of training and after the final evaluation;
  - `training_summary` / `write_summary` / `write_model_card`: summary.json (final and best metrics, tokens,
    wall time) and the model card, which links the plots.

Plots use matplotlib's object API on an Agg canvas (no pyplot, no GUI backend, no global state).
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from pathlib import Path

# The options minidpo adds to TRL's, and the TRL options that decide what was optimised.
_CARD_KEYS = ("length_normalize", "mask_mode", "loss_type", "beta", "learning_rate", "max_length",
              "per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "max_steps",
              "lr_scheduler_type", "precompute_ref_log_probs", "bf16", "seed")


def callbacks(args) -> list:
    """Trainer callbacks this module contributes to every run (plots, summaries)."""
    return [_make_plot_callback()()]


# ---------------------------------------------------------------------------------------------------------
# Plots


def _figure(ncols: int = 1, nrows: int = 1, width: float = 6.0, height: float = 3.6):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height * nrows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp)
    os.replace(tmp, path)  # a reader (or a crash) never sees half a PNG
    return path


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
        fig = _figure()
        if _draw_metric(fig.add_subplot(), log_history, title, ylabel, keys):
            written.append(_save(fig, plots_dir / f"{stem}.png"))
            panels.append((title, ylabel, keys))
    if panels:
        ncols = min(3, len(panels))
        nrows = math.ceil(len(panels) / ncols)
        fig = _figure(ncols, nrows, width=4.6, height=3.2)
        for i, (title, ylabel, keys) in enumerate(panels):
            _draw_metric(fig.add_subplot(nrows, ncols, i + 1), log_history, title, ylabel, keys)
        written.append(_save(fig, plots_dir / "overview.png"))
    return written


@functools.cache
def _make_plot_callback():
    from transformers import TrainerCallback

    class PlotCallback(TrainerCallback):
        """Redraws `output_dir/plots/*.png` from `state.log_history`, on the main process only: at each save, at
        the end of training, and after any evaluation run once training is over (the final `evaluate()`)."""

        def __init__(self):
            self.training_over = False
            self.started = None

        def _draw(self, args, state):
            if state.is_world_process_zero and state.log_history:
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

    return PlotCallback


def __getattr__(name):
    # `PlotCallback` subclasses transformers' TrainerCallback; built on first use so that importing this module
    # (e.g. for `minidpo report-data`) does not import transformers.
    if name == "PlotCallback":
        return _make_plot_callback()
    raise AttributeError(name)


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


def training_summary(trainer, eval_metrics: dict, n_rejected: int = 0) -> dict:
    state = trainer.state
    train_runtime = next((e["train_runtime"] for e in reversed(state.log_history) if "train_runtime" in e), None)
    tokens = trainer._total_train_tokens
    args = trainer.args
    plot_cb = next((c for c in trainer.callback_handler.callbacks if type(c).__name__ == "PlotCallback"), None)
    started = getattr(plot_cb, "started", None)
    plots_dir = Path(args.output_dir) / "plots"
    return {
        "final_eval": {k: v for k, v in eval_metrics.items()},
        "final_train": _final(state.log_history, ""),
        "best_eval": best_metrics(state.log_history),
        "global_step": state.global_step,
        "epochs": state.epoch,
        "train_tokens": tokens,  # chosen + rejected tokens fed to the policy (padding excluded), all processes
        "train_seconds": train_runtime,
        "train_tokens_per_second": (tokens / train_runtime) if train_runtime else None,
        # from the start of training to this summary: training, evaluations, checkpoint saves
        "wall_seconds": round(time.time() - started, 2) if started else train_runtime,
        "pairs_dropped_no_scored_token": dict(trainer.pairs_dropped),
        "lines_rejected": n_rejected,
        "base_model": _base_model(trainer),
        "config": {k: getattr(args, k) for k in _CARD_KEYS},
        "output_dir": str(Path(args.output_dir).resolve()),
        "plots": sorted(f"plots/{p.name}" for p in plots_dir.glob("*.png")) if plots_dir.is_dir() else [],
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
    with open(card, "a", encoding="utf-8") as f:
        f.write("\n".join(extra))
    return card


# ---------------------------------------------------------------------------------------------------------
# `minidpo report-data`: what is in a preference set, before training on it

DEFAULT_MAX_LENGTH = 1024  # TRL's DPOConfig default
_LONGEST = 10


def _record_key(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False, sort_keys=True)


def _snippet(text: str, n: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _load_for_report(path: Path, tokenizer) -> tuple[str, dict, list, dict]:
    """(format, {split: records}, rejects, convert stats or {}) through minidpo.data's loaders."""
    from minidpo import data

    fmt = data.detect_format(path)
    splits, rejects = {}, []
    for split in ("train", "eval"):
        records, bad = data.load_trl_records(path, split, tokenizer)
        if records:
            splits[split] = records
        rejects += bad
    convert_stats = {}
    if fmt == "convert-dir":
        # Lines `convert` rejected never reached train.jsonl: count them from its own outputs.
        if (path / "stats.json").is_file():
            convert_stats = json.loads((path / "stats.json").read_text(encoding="utf-8"))
        if (path / "rejects.jsonl").is_file():
            with open(path / "rejects.jsonl", encoding="utf-8") as f:
                rejects += [json.loads(line) for line in f if line.strip()]
    return fmt, splits, rejects, convert_stats


def _length_advice(share_longer: float, share_shorter: float, mean_ratio: float) -> str:
    if share_longer >= 0.6 or mean_ratio >= 1.15:
        return ("Chosen answers are systematically longer than rejected ones. With `length_normalize: false` "
                "(summed log-probs, TRL's default) the loss can be lowered by favouring longer answers, so the "
                "model may learn length rather than quality; `length_normalize: true` (MiniMind's mean over "
                "scored tokens, minidpo's default) removes that incentive.")
    if share_shorter >= 0.6 or mean_ratio <= 1 / 1.15:
        return ("Chosen answers are systematically shorter than rejected ones. With `length_normalize: false` "
                "(summed log-probs) the loss can be lowered by favouring shorter answers; `length_normalize: "
                "true` (minidpo's default) averages over scored tokens and removes that incentive.")
    return ("Chosen and rejected answers have similar lengths, so summed and length-averaged log-probs "
            "(`length_normalize`) should not differ much in how they treat length on this data.")


def analyse_records(splits: dict, tokenizer, max_length: int, mask_mode: str = "minimind") -> dict:
    """The numbers of the data report for records already loaded, tokenized with `masking.encode_pair`."""
    from minidpo.data import _LengthStats
    from minidpo.masking import encode_pair, is_scorable, render

    lengths = {k: _LengthStats() for k in ("prompt", "chosen_scored", "rejected_scored", "sequence")}
    per_pair = {"prompt": [], "chosen_scored": [], "rejected_scored": [], "sequence": []}
    turns, seen, prompts_seen = {}, set(), set()
    n = longer = shorter = equal = duplicates = repeated_prompts = 0
    ratios, longest = [], []
    truncated = answer_cut = nothing_to_score = 0
    for split, records in splits.items():
        for i, record in enumerate(records):
            n += 1
            key = _record_key(record)
            duplicates += key in seen
            seen.add(key)
            pkey = _record_key(record["prompt"])
            repeated_prompts += pkey in prompts_seen
            prompts_seen.add(pkey)
            nturn = sum(m["role"] == "user" for m in record["prompt"])
            turns[nturn] = turns.get(nturn, 0) + 1

            full = encode_pair(record, tokenizer, max_length=None, mask_mode=mask_mode)
            prompt_len = len(tokenizer(render(record["prompt"], tokenizer, add_generation_prompt=True),
                                       add_special_tokens=False)["input_ids"])
            c, r = sum(full["chosen_loss_mask"]), sum(full["rejected_loss_mask"])
            seq = max(len(full["chosen_input_ids"]), len(full["rejected_input_ids"]))
            for name, v in (("prompt", prompt_len), ("chosen_scored", c), ("rejected_scored", r), ("sequence", seq)):
                lengths[name].add(v)
                per_pair[name].append(v)
            longer += c > r
            shorter += c < r
            equal += c == r
            if r:
                ratios.append(c / r)
            if seq > max_length:
                truncated += 1
                # Only the long pairs are encoded again, cut exactly as the trainer will cut them.
                cut = encode_pair(record, tokenizer, max_length=max_length, mask_mode=mask_mode)
                if not is_scorable(cut):
                    nothing_to_score += 1
                elif (sum(cut["chosen_loss_mask"]), sum(cut["rejected_loss_mask"])) != (c, r):
                    answer_cut += 1
            last_user = next((m["content"] for m in reversed(record["prompt"]) if m["role"] == "user"), "")
            longest.append((seq, split, i, prompt_len, c, r, _snippet(last_user)))
            longest = sorted(longest, reverse=True)[:_LONGEST]
    share_longer = longer / n if n else 0.0
    share_shorter = shorter / n if n else 0.0
    mean_ratio = sum(ratios) / len(ratios) if ratios else float("nan")
    return {
        "pairs": n,
        "token_lengths": {k: v.summary() for k, v in lengths.items()},
        "length_bias": {
            "chosen_longer": longer, "rejected_longer": shorter, "equal": equal,
            "share_chosen_longer": round(share_longer, 4), "share_rejected_longer": round(share_shorter, 4),
            "mean_length_ratio": round(mean_ratio, 4),
            "advice": _length_advice(share_longer, share_shorter, mean_ratio) if n else "",
        },
        "turns_per_conversation": dict(sorted(turns.items())),
        "duplicates": {"exact_duplicate_pairs": duplicates, "repeated_prompts": repeated_prompts},
        "truncation": {
            "max_length": max_length, "longer_than_max_length": truncated,
            "scored_tokens_cut": answer_cut, "nothing_left_to_score": nothing_to_score,
            "longest": [{"tokens": s, "split": sp, "index": i, "prompt_tokens": p, "chosen_scored": c,
                         "rejected_scored": r, "last_user_message": u} for s, sp, i, p, c, r, u in longest],
        },
        "_per_pair": per_pair,  # for the plots; not written to report.json
    }


def _plot_data_report(per_pair: dict, turns: dict, max_length: int, out: Path) -> list[Path]:
    written = []
    c, r = per_pair["chosen_scored"], per_pair["rejected_scored"]

    fig = _figure(2, 1, width=5.2)
    ax1, ax2 = fig.subplots(1, 2)
    top = max(c + r + [1])
    bins = _bins(top)
    ax1.hist(c, bins=bins, alpha=0.55, color="tab:green", label="chosen")
    ax1.hist(r, bins=bins, alpha=0.55, color="tab:red", label="rejected")
    ax1.set(title="Scored answer tokens", xlabel="tokens scored per sequence", ylabel="pairs")
    ax1.legend()
    ax2.hist(per_pair["prompt"], bins=_bins(max(per_pair["prompt"] + [1])), color="tab:blue")
    ax2.set(title="Prompt tokens (template included)", xlabel="tokens", ylabel="pairs")
    written.append(_save(fig, out / "lengths.png"))

    fig = _figure(width=5.0, height=4.6)
    ax = fig.add_subplot()
    ax.scatter(r, c, s=8, alpha=0.35, color="tab:purple")
    ax.plot([0, top], [0, top], color="gray", linestyle="--", label="equal length")
    ax.set(title="Chosen vs rejected scored tokens (one dot per pair)", xlabel="rejected", ylabel="chosen")
    ax.set_xlim(0, top * 1.05)
    ax.set_ylim(0, top * 1.05)
    ax.legend(loc="upper left")
    written.append(_save(fig, out / "length_pairs.png"))

    fig = _figure()
    ax = fig.add_subplot()
    seq = per_pair["sequence"]
    ax.hist(seq, bins=_bins(max(seq + [max_length + 1])), color="tab:gray")
    ax.axvline(max_length, color="tab:red", linestyle="--", label=f"max_length {max_length}")
    over = sum(s > max_length for s in seq)
    ax.set(title=f"Longest side of each pair: {over} of {len(seq)} longer than max_length",
           xlabel="tokens", ylabel="pairs")
    ax.legend()
    written.append(_save(fig, out / "sequence_lengths.png"))

    fig = _figure(width=4.5)
    ax = fig.add_subplot()
    ax.bar([str(k) for k in turns], list(turns.values()), color="tab:cyan")
    ax.set(title="User turns per conversation", xlabel="user turns", ylabel="pairs")
    written.append(_save(fig, out / "turns.png"))
    return written


def _bins(top: int) -> list:
    step = max(1, math.ceil((top + 1) / 40))
    return list(range(0, top + step + 1, step))


def _md_table(header, rows) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    out += ["| " + " | ".join(str(x).replace("|", "\\|") for x in row) + " |" for row in rows]
    return out


def _report_markdown(rep: dict) -> str:
    c = rep["counts"]
    lb, tr, tl = rep["length_bias"], rep["truncation"], rep["token_lengths"]
    lines = [f"# Data report: `{rep['input']}`", "",
             f"Format **{rep['format']}**, tokenizer `{rep['tokenizer']}`, mask mode `{rep['mask_mode']}`, "
             f"max_length {tr['max_length']}.", "",
             "## Counts", ""]
    lines += _md_table(["", "pairs"], [["records read", c["records_read"]], ["usable pairs", c["usable"]],
                                       *[[f"  in {k}", v] for k, v in c["by_split"].items()],
                                       ["rejected lines", c["rejected"]]])
    if rep["rejected_by_reason"]:
        lines += ["", "Rejected lines by reason (see `minidpo convert`'s rejects.jsonl for each line):", ""]
        lines += _md_table(["reason", "lines"], rep["rejected_by_reason"].items())
    lines += ["", "## Token lengths", "",
              "Scored tokens are the ones the loss reads (`encode_pair` masks: the assistant answers and their "
              "end-of-turn token); prompt tokens are the rendered prompt with the assistant header.", ""]
    lines += _md_table(["", "min", "mean", "p50", "p90", "p99", "max"],
                       [[k, *(s.get(q, "") for q in ("min", "mean", "p50", "p90", "p99", "max"))]
                        for k, s in tl.items()])
    lines += ["", "![lengths](lengths.png)", "",
              "## Chosen vs rejected length", "",
              f"Chosen is longer in **{lb['share_chosen_longer']:.0%}** of pairs, rejected in "
              f"{lb['share_rejected_longer']:.0%}, equal in {lb['equal']} pairs; mean chosen/rejected ratio of "
              f"scored tokens **{lb['mean_length_ratio']:.2f}**.", "", lb["advice"], "",
              "![length pairs](length_pairs.png)", "",
              "## Turns and duplicates", ""]
    lines += _md_table(["user turns", "pairs"], rep["turns_per_conversation"].items())
    d = rep["duplicates"]
    lines += ["", f"{d['exact_duplicate_pairs']} exact duplicate pairs (extra copies of an identical record), "
                  f"{d['repeated_prompts']} pairs repeat a prompt seen earlier with other answers.", "",
              "![turns](turns.png)", "",
              f"## Truncation at max_length {tr['max_length']}", "",
              f"{tr['longer_than_max_length']} of {rep['pairs']} pairs are longer than max_length: "
              f"{tr['scored_tokens_cut']} lose scored answer tokens, {tr['nothing_left_to_score']} keep nothing "
              "to score and would be dropped by the trainer.", "",
              "![sequence lengths](sequence_lengths.png)", "",
              "Longest pairs:", ""]
    lines += _md_table(["tokens", "split", "#", "prompt", "chosen scored", "rejected scored", "last user message"],
                       [[x["tokens"], x["split"], x["index"], x["prompt_tokens"], x["chosen_scored"],
                         x["rejected_scored"], x["last_user_message"]] for x in tr["longest"]])
    return "\n".join(lines) + "\n"


def report_data(input_path, tokenizer, output_dir, max_length: int = DEFAULT_MAX_LENGTH,
                mask_mode: str = "minimind", tokenizer_name: str = "") -> dict:
    """Write `report.md`, `report.json` and the PNGs it embeds into `output_dir`; returns report.json's dict."""
    from minidpo.cli import UserError
    from minidpo.masking import MASK_MODES, MaskingError, uses_minimind_markers

    input_path, out = Path(input_path).expanduser(), Path(output_dir)
    if not input_path.exists():
        raise UserError(f"input not found: {input_path}")
    if max_length < 1:
        raise UserError(f"--max-length must be positive, got {max_length}")
    if mask_mode not in MASK_MODES:
        raise UserError(f"--mask-mode must be one of {', '.join(MASK_MODES)}, got {mask_mode!r}")
    try:
        uses_minimind_markers(tokenizer)
    except MaskingError as e:
        raise UserError(f"this tokenizer cannot be used ({e.code}): {e.message}") from None
    fmt, splits, rejects, convert_stats = _load_for_report(input_path, tokenizer)
    usable = sum(len(v) for v in splits.values())
    if not usable:
        raise UserError(f"no usable preference pair in {input_path} ({len(rejects)} lines rejected)")
    reasons = {}
    for r in rejects:
        reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    analysis = analyse_records(splits, tokenizer, max_length, mask_mode)
    per_pair = analysis.pop("_per_pair")
    report = {
        "input": str(input_path), "format": fmt, "tokenizer": tokenizer_name or getattr(tokenizer, "name_or_path", ""),
        "mask_mode": mask_mode,
        "counts": {"records_read": usable + len(rejects), "usable": usable, "rejected": len(rejects),
                   "by_split": {k: len(v) for k, v in splits.items()}},
        "rejected_by_reason": dict(sorted(reasons.items(), key=lambda kv: -kv[1])),
        **analysis,
    }
    if convert_stats.get("records_read"):
        report["counts"]["records_read"] = convert_stats["records_read"]
    out.mkdir(parents=True, exist_ok=True)
    report["plots"] = [p.name for p in _plot_data_report(per_pair, report["turns_per_conversation"], max_length, out)]
    (out / "report.json").write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    (out / "report.md").write_text(_report_markdown(report), encoding="utf-8")
    return report


def add_report_data_arguments(parser):
    from minidpo.masking import MASK_MODES

    parser.add_argument("input", help="MiniMind dpo.jsonl, TRL prompt/chosen/rejected jsonl, or a `minidpo convert` "
                                      "directory")
    parser.add_argument("--tokenizer", required=True, help="local tokenizer directory (the model's)")
    parser.add_argument("--output", required=True, help="directory for report.md, report.json and the plots")
    parser.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH,
                        help=f"the max_length you will train with (default {DEFAULT_MAX_LENGTH}, TRL's)")
    parser.add_argument("--mask-mode", choices=MASK_MODES, default="minimind",
                        help="which assistant tokens are scored (default: minimind, every assistant turn)")


def report_data_command(args) -> int:
    from minidpo import data

    tokenizer = data.load_tokenizer(args.tokenizer)
    report = report_data(args.input, tokenizer, args.output, args.max_length, args.mask_mode, args.tokenizer)
    print(format_data_report(report, Path(args.output)))
    return 0


def format_data_report(report: dict, out: Path) -> str:
    c, lb, tr = report["counts"], report["length_bias"], report["truncation"]
    tl = report["token_lengths"]
    lines = [f"{c['usable']:,} usable pairs ({', '.join(f'{k} {v:,}' for k, v in c['by_split'].items())}), "
             f"{c['rejected']:,} rejected lines"]
    lines += [f"  rejected {k}: {v:,}" for k, v in report["rejected_by_reason"].items()]
    for k, s in tl.items():
        lines.append(f"  tokens {k}: mean {s['mean']} p50 {s['p50']} p90 {s['p90']} max {s['max']}")
    lines.append(f"  chosen longer in {lb['share_chosen_longer']:.0%} of pairs, mean length ratio "
                 f"{lb['mean_length_ratio']:.2f}: {lb['advice']}")
    lines.append(f"  {tr['longer_than_max_length']:,} pairs longer than max_length {tr['max_length']} "
                 f"({tr['nothing_left_to_score']:,} with nothing left to score); "
                 f"{report['duplicates']['exact_duplicate_pairs']:,} exact duplicates")
    lines.append(f"wrote {out / 'report.md'}, {out / 'report.json'} and {len(report['plots'])} plots")
    return "\n".join(lines)
