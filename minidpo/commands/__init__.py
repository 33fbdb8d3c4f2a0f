"""The `minidpo` subcommands other than `train` (minidpo/train.py): each module is one command, a thin layer over
the library, with `HELP`, `make_parser()` and `main(args) -> int`. The library imports happen inside `main`, so
`minidpo --help` and `minidpo convert` never pay for importing TRL."""

import argparse

# minidpo/train.py's one-line help, here so that listing the commands does not import TRL.
TRAIN_HELP = "train with MiniDPOTrainer (same as minidpo/train.py)"


def new_parser(name: str, help: str, subparsers=None) -> argparse.ArgumentParser:
    """The parser of `minidpo NAME`: a subparser of `subparsers` when given (TRL's `make_parser` style), or its
    own."""
    if subparsers is not None:
        return subparsers.add_parser(name, help=help, description=help)
    return argparse.ArgumentParser(prog=f"minidpo {name}", description=help)
