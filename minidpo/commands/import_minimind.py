"""`minidpo import-minimind CKPT --tokenizer DIR --output DIR`: a MiniMind *.pth as a Transformers folder."""

import argparse

from minidpo.commands import new_parser

HELP = "turn a MiniMind *.pth checkpoint into a Transformers model folder"


def make_parser(subparsers=None) -> argparse.ArgumentParser:
    from minidpo.minimind import VERSIONS

    parser = new_parser("import-minimind", HELP, subparsers)
    parser.add_argument("checkpoint", help="MiniMind checkpoint, e.g. out/full_sft_512.pth")
    parser.add_argument("--tokenizer", required=True,
                        help="MiniMind's tokenizer folder (model/, or model/minimind_tokenizer/ in older MiniMind)")
    parser.add_argument("--output", required=True, help="folder to write the Transformers model to")
    parser.add_argument("--overwrite", action="store_true", help="replace --output when it holds files already")
    parser.add_argument("--version", choices=list(VERSIONS), help="MiniMind version (default: detected from the keys)")
    parser.add_argument("--head-dim", type=int, help="attention head size (default: inferred)")
    parser.add_argument("--rope-theta", type=float, help="RoPE base (default: the version's, 1e6)")
    parser.add_argument("--rms-norm-eps", type=float,
                        help="RMSNorm epsilon (default: 1e-5 MiniMind2, 1e-6 minimind-3)")
    parser.add_argument("--max-position-embeddings", type=int, help="context length (default: 32768)")
    return parser


def main(args) -> int:
    from minidpo.minimind import import_minimind

    s = import_minimind(args.checkpoint, args.tokenizer, args.output, version=args.version, overwrite=args.overwrite,
                        head_dim=args.head_dim, rope_theta=args.rope_theta, rms_norm_eps=args.rms_norm_eps,
                        max_position_embeddings=args.max_position_embeddings)
    how = "given" if args.version else "detected"
    print(f"{how} {s['version']} -> {s['architecture']}: hidden {s['hidden_size']}, {s['num_hidden_layers']} layers, "
          f"{s['num_attention_heads']} heads ({s['num_key_value_heads']} kv, head_dim {s['head_dim']}), "
          f"intermediate {s['intermediate_size']}, vocab {s['vocab_size']}, "
          f"{'tied' if s['tie_word_embeddings'] else 'untied'} embeddings, rms_norm_eps {s['rms_norm_eps']}, "
          f"rope_theta {s['rope_theta']}")
    print(f"wrote {s['output_dir']}")
    return 0
