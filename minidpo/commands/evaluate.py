"""`minidpo eval --model DIR --data PATH`: reward accuracy and margins against the reference (minidpo.evaluation)."""

import argparse

from minidpo.commands import new_parser
from minidpo.errors import UserError
from minidpo.masking import MASK_MODES

HELP = "reward accuracy and margins of a trained model against its reference; optional side-by-side answers"


def make_parser(subparsers=None) -> argparse.ArgumentParser:
    parser = new_parser("eval", HELP, subparsers)
    parser.add_argument("--model", required=True, help="trained model folder (full model or LoRA adapter)")
    parser.add_argument("--data", help="held-out pairs: MiniMind dpo.jsonl, TRL jsonl, or a `minidpo convert` "
                                       "directory (its eval split, else train); default: the pairs the run held out "
                                       "(MODEL/eval_pairs.jsonl)")
    parser.add_argument("--ref", help="reference model folder (default: the base model the run was trained from)")
    parser.add_argument("--output", help="directory for eval.json / eval.md (default: MODEL/eval)")
    parser.add_argument("--generate", type=int, default=0, metavar="N",
                        help="answer the first N prompts with the reference and the policy, side by side")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="answer length for --generate")
    parser.add_argument("--max-length", type=int, default=None,
                        help="cut pairs like training did (default: the run's max_length from summary.json, else 1024)")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per forward pass")
    parser.add_argument("--beta", type=float, default=None,
                        help="DPO beta for rewards (default: the run's, from summary.json, else 0.1)")
    parser.add_argument("--mask-mode", choices=MASK_MODES, default=None,
                        help="which tokens are scored (default: the run's, else minimind)")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N pairs")
    parser.add_argument("--seed", type=int, default=0, help="seed set before generating (greedy decoding)")
    return parser


def main(args) -> int:
    from minidpo.evaluation import evaluate

    if args.generate < 0 or args.batch_size < 1:
        raise UserError("--generate must be >= 0 and --batch-size >= 1")
    evaluate(args.model, args.data, args.ref, args.output, args.generate, args.max_new_tokens, args.max_length,
             args.batch_size, args.beta, args.mask_mode, args.limit, args.seed)
    return 0
