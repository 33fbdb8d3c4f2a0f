"""`minidpo report-data INPUT --tokenizer DIR --output DIR`: what is in a preference set (minidpo.data_report)."""

import argparse

from minidpo.commands import new_parser
from pathlib import Path

from minidpo.masking import DEFAULT_MAX_LENGTH, MASK_MODES

HELP = "report on a preference set: counts, lengths, length bias, truncation (report.md + plots)"


def make_parser(subparsers=None) -> argparse.ArgumentParser:
    parser = new_parser("report-data", HELP, subparsers)
    parser.add_argument("input", help="MiniMind dpo.jsonl, TRL prompt/chosen/rejected jsonl, or a `minidpo convert` "
                                      "directory")
    parser.add_argument("--tokenizer", required=True, help="local tokenizer directory (the model's)")
    parser.add_argument("--output", required=True, help="directory for report.md, report.json and the plots")
    parser.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH,
                        help=f"the max_length you will train with (default {DEFAULT_MAX_LENGTH}, TRL's)")
    parser.add_argument("--mask-mode", choices=MASK_MODES, default="minimind",
                        help="which assistant tokens are scored (default: minimind, every assistant turn)")
    return parser


def main(args) -> int:
    from minidpo.data_report import format_data_report, report_data
    from minidpo.models import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    report = report_data(args.input, tokenizer, args.output, args.max_length, args.mask_mode, args.tokenizer)
    print(format_data_report(report, Path(args.output)))
    return 0
