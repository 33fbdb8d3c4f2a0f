"""`minidpo quickstart`: the whole pipeline on the embedded default, nothing downloaded.

Builds the embedded ChatML tokenizer and a tiny Llama, generates a MiniMind-format preference set with a learnable
preference, then runs the real steps: `minidpo convert` (with a held-out split) → `minidpo/train.py` with
configs/quickstart.yaml (same parser, same `main`) → evaluation on the held-out pairs → save.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from minidpo.commands import new_parser
from minidpo.errors import UserError
from minidpo.files import write_text_atomic

HELP = "run the whole pipeline on the embedded tiny model and data (no downloads)"
CONFIG = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"


def make_parser(subparsers=None) -> argparse.ArgumentParser:
    parser = new_parser("quickstart", HELP, subparsers)
    parser.add_argument("--output", default="quickstart-output", help="directory for everything the run writes")
    parser.add_argument("--pairs", type=int, default=1000, help="preference pairs to generate")
    parser.add_argument("--eval-fraction", type=float, default=0.1, help="held-out share of the pairs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated model and data")
    return parser


def quickstart(output="quickstart-output", pairs=1000, eval_fraction=0.1, seed=0, extra_args=()) -> dict:
    """Every step of the pipeline on the embedded default; returns (and writes) OUTPUT/summary.json's content."""
    from minidpo import data_report, embedded, train
    from minidpo.convert import convert_file, format_summary

    if not CONFIG.is_file():
        raise UserError(f"{CONFIG} is missing: run the quickstart from a minidpo checkout", code="missing_path")
    out = Path(output)
    start = time.time()

    print(f"[1/4] embedded tokenizer and tiny Llama -> {out / 'base-model'}")
    tokenizer = embedded.save_base_model(out / "base-model", seed=seed)

    print(f"[2/4] {pairs} MiniMind-format preference pairs -> {out / 'dpo.jsonl'}; converting")
    raw = embedded.write_jsonl(embedded.make_preference_records(pairs, seed=seed), out / "dpo.jsonl")
    stats = convert_file(raw, out / "data", tokenizer=tokenizer, max_length=256, eval_fraction=eval_fraction,
                         seed=seed, progress=False, overwrite=True)  # everything under OUTPUT is regenerated
    print(format_summary(stats))
    report = data_report.report_data(out / "data", tokenizer, out / "report", max_length=256,
                                     tokenizer_name=str(out / "base-model"))
    print(data_report.format_data_report(report, out / "report"))

    print(f"[3/4] training with {CONFIG.name}")
    argv = ["--config", str(CONFIG), "--model_name_or_path", str(out / "base-model"),
            "--dataset_name", str(out / "data"), "--output_dir", str(out / "model"),
            "--overwrite_output_dir", "true", *extra_args]  # everything under OUTPUT is regenerated
    summary = train.main(*train.parse(argv))

    print("[4/4] held-out evaluation")
    result = {
        "eval_pairs": stats["eval"],
        **{k: v for k, v in summary["final_eval"].items() if k.startswith("eval_")},
        "wall_seconds": round(time.time() - start, 1),
        "paths": {
            "base_model": str(out / "base-model"),
            "raw_data": str(raw),
            "converted_data": str(out / "data"),
            "model": str(out / "model"),
            "training_summary": str(out / "model" / "summary.json"),
            "model_card": str(out / "model" / "README.md"),
            "data_report": str(out / "report" / "report.md"),
            "training_plots": str(out / "model" / "plots"),
            "summary": str(out / "summary.json"),
        },
    }
    write_text_atomic(out / "summary.json", json.dumps(result, indent=2) + "\n")
    acc = result.get("eval_rewards/accuracies")
    print(f"held-out reward accuracy: {acc:.3f} on {stats['eval']} pairs "
          f"(margin {result.get('eval_rewards/margins', float('nan')):.4f}); {result['wall_seconds']} s")
    print("wrote:")
    for name, path in result["paths"].items():
        print(f"  {name:<17} {path}")
    return result


def main(args) -> int:
    quickstart(args.output, args.pairs, args.eval_fraction, args.seed)
    return 0
