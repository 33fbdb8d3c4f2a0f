"""`minidpo export-minimind MODEL_DIR --output FILE.pth`: a model folder (or LoRA adapter, merged) for MiniMind."""

import argparse

from minidpo.commands import new_parser

HELP = "write a model folder (or LoRA adapter, merged) as a MiniMind *.pth checkpoint"


def make_parser(subparsers=None) -> argparse.ArgumentParser:
    parser = new_parser("export-minimind", HELP, subparsers)
    parser.add_argument("model_dir", help="Transformers model folder, or a LoRA adapter folder (merged into its base)")
    parser.add_argument("--output", required=True, help="MiniMind checkpoint to write, e.g. out/dpo_512.pth")
    parser.add_argument("--overwrite", action="store_true", help="replace --output when it exists")
    return parser


def main(args) -> int:
    from minidpo.minimind import export_minimind

    s = export_minimind(args.model_dir, args.output, overwrite=args.overwrite)
    print(f"wrote {s['output_path']}: {s['version']} fp16 state_dict, {s['num_tensors']} tensors, "
          f"{s['num_parameters'] / 1e6:.2f}M parameters")
    return 0
