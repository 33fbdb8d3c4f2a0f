"""`minidpo` command line (the console entry point): picks a subcommand, parses its flags, runs it.

Each subcommand is a module with `make_parser()` and `main(...)` (TRL's script style): `minidpo.train` for
training, `minidpo.commands.*` for the rest. Only the chosen module is imported, so `minidpo convert` never pays
for importing TRL. A `minidpo.errors.UserError` becomes one line on stderr and exit status 2.
"""

import importlib
import sys

from minidpo.errors import exit_status

# name -> the module that runs it
COMMANDS = {
    "quickstart": "minidpo.commands.quickstart",
    "train": "minidpo.train",
    "convert": "minidpo.commands.convert",
    "report-data": "minidpo.commands.report_data",
    "eval": "minidpo.commands.evaluate",
    "import-minimind": "minidpo.commands.import_minimind",
    "export-minimind": "minidpo.commands.export_minimind",
}


def _help(name: str) -> str:
    from minidpo import commands

    # minidpo.train imports TRL (seconds): its help line lives in minidpo.commands instead
    module = COMMANDS[name]
    return commands.TRAIN_HELP if module == "minidpo.train" else importlib.import_module(module).HELP


def _usage() -> str:
    lines = ["usage: minidpo COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<16} {_help(name)}" for name in COMMANDS]
    lines += ["", "Run `minidpo COMMAND --help` for a command's options."]
    return "\n".join(lines)


def _run(module, argv) -> int:
    parser = module.make_parser()
    if hasattr(parser, "parse_args_and_config"):  # TrlParser: dataclass configs, YAML through --config
        return module.main(*parser.parse_args_and_config(args=argv))
    return module.main(parser.parse_args(argv))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"minidpo: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name])
    return exit_status(f"minidpo {name}", lambda: _run(module, rest))


if __name__ == "__main__":
    sys.exit(main())
