"""`minidpo` command line: each subcommand is a thin layer over one module's functions.

A subcommand is `(module, add_arguments, run, help)`: `add_arguments(parser)` declares its flags and
`run(args) -> int` does the work. `run` alone (no `add_arguments`) takes the raw argv list instead, for
commands whose flags are dataclass configs parsed by `trl.TrlParser` (training).
Only the chosen subcommand's module is imported, so `minidpo convert` never pays for importing TRL.
"""

import argparse
import importlib
import sys

COMMANDS = {
    "quickstart": ("minidpo.quickstart", "add_arguments", "run",
                   "run the whole pipeline on the embedded tiny model and data (no downloads)"),
    "train": ("minidpo.train", None, "run", "train with MiniDPOTrainer (same as minidpo/train.py)"),
    "convert": ("minidpo.data", "add_convert_arguments", "convert_command",
                "convert MiniMind dpo.jsonl into TRL prompt/chosen/rejected records"),
    "report-data": ("minidpo.reports", "add_report_data_arguments", "report_data_command",
                    "report on a preference set: counts, lengths, length bias, truncation (report.md + plots)"),
    "eval": ("minidpo.evaluate", "add_arguments", "run",
             "reward accuracy and margins of a trained model against its reference; optional side-by-side answers"),
    "import-minimind": ("minidpo.minimind", "add_import_arguments", "import_command",
                        "turn a MiniMind *.pth checkpoint into a Transformers model folder"),
    "export-minimind": ("minidpo.minimind", "add_export_arguments", "export_command",
                        "write a model folder (or LoRA adapter, merged) as a MiniMind *.pth checkpoint"),
}


class UserError(Exception):
    """An error the user can act on: printed as one clear message, never as a stack trace."""


def _usage() -> str:
    lines = ["usage: minidpo COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<16} {spec[3]}" for name, spec in COMMANDS.items()]
    lines += ["", "Run `minidpo COMMAND --help` for a command's options."]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"minidpo: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, add_name, run_name, help_text = COMMANDS[name]
    module = importlib.import_module(module_name)
    try:
        if add_name is None:
            return int(getattr(module, run_name)(rest) or 0)
        parser = argparse.ArgumentParser(prog=f"minidpo {name}", description=help_text)
        getattr(module, add_name)(parser)
        return int(getattr(module, run_name)(parser.parse_args(rest)) or 0)
    except UserError as e:
        print(f"minidpo {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"minidpo {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    # Under `python -m minidpo.cli` this file is `__main__`; run the package's copy so that the UserError the
    # subcommands raise (minidpo.cli.UserError) is the one caught.
    from minidpo.cli import main as _main

    sys.exit(_main())
