"""`minidpo convert INPUT --output DIR`: MiniMind dpo.jsonl -> TRL records (minidpo.convert)."""

import argparse

from minidpo.commands import new_parser
from minidpo.masking import MASK_MODES

HELP = "convert MiniMind dpo.jsonl into TRL prompt/chosen/rejected records"


def make_parser(subparsers=None) -> argparse.ArgumentParser:
    parser = new_parser("convert", HELP, subparsers)
    parser.add_argument("input", help="MiniMind dpo.jsonl (one {chosen, rejected} object a line)")
    parser.add_argument("--output", required=True, help="directory for train/eval/rejects.jsonl and stats.json")
    parser.add_argument("--tokenizer", help="local tokenizer directory: also check masking and report token lengths")
    parser.add_argument("--max-length", type=int, help="truncate like training does (needs --tokenizer); "
                                                       "records left with nothing to score are rejected")
    parser.add_argument("--mask-mode", choices=MASK_MODES, default="minimind",
                        help="which assistant tokens are scored (default: minimind, every assistant turn)")
    parser.add_argument("--eval-fraction", type=float, default=0.0, help="share of records for eval.jsonl (0: none)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the deterministic train/eval split")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad record")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the train/eval/rejects.jsonl and stats.json already in --output")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(args) -> int:
    from minidpo.convert import convert_file, format_summary
    from minidpo.models import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    stats = convert_file(args.input, args.output, tokenizer=tokenizer, max_length=args.max_length,
                         mask_mode=args.mask_mode, eval_fraction=args.eval_fraction, seed=args.seed,
                         strict=args.strict, progress=not args.no_progress, overwrite=args.overwrite)
    print(format_summary(stats))
    return 0
