"""minidpo.cli and the package layout: each command reached by name, its parser built the TRL way, one-line
errors; dependencies point down (CLI -> commands -> library -> encoding), never up to the CLI."""

import ast
import importlib
import subprocess
import sys

import pytest

from helpers import REPO, SUBPROCESS_TIMEOUT, subprocess_env
from minidpo import cli

PACKAGE = REPO / "minidpo"
# Lowest first; a module may import only from its own layer or below.
LAYERS = {
    "encoding": {"errors", "files", "console", "records", "masking", "embedded", "contracts"},
    "library": {"loading", "prepared", "convert", "models", "pairs", "scoring", "ref_cache", "plotting", "training_report",
                "minimind_recipe", "config", "distributed", "trainer", "resilience", "run_record", "data_report",
                "evaluation", "minimind",
                "__init__"},
    "commands": {"train", "commands"},
    "cli": {"cli"},
}
ORDER = list(LAYERS)


def _layer(module: str) -> str:
    top = module.split(".")[0]
    return next(name for name, members in LAYERS.items() if top in members)


def _minidpo_imports(path) -> set:
    """minidpo modules `path` imports (at any depth: lazy imports count too), as names relative to the package."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("minidpo"):
            base = node.module.removeprefix("minidpo").lstrip(".")
            found |= {base} if base else {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level and node.module:  # from .x import y
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("minidpo.") for a in node.names if a.name.startswith("minidpo.")}
    return found


def _modules():
    return sorted(p for p in PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer():
    for path in _modules():
        _layer(str(path.relative_to(PACKAGE).with_suffix("")).replace("/", "."))


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_dependencies_point_down(path):
    name = str(path.relative_to(PACKAGE).with_suffix("")).replace("/", ".")
    mine = ORDER.index(_layer(name))
    for imported in _minidpo_imports(path):
        assert not imported.startswith("cli") or name == "cli", f"{name} imports the CLI"
        assert ORDER.index(_layer(imported)) <= mine, f"{name} ({_layer(name)}) imports {imported} " \
                                                     f"({_layer(imported)}), a layer above it"


def test_no_module_name_shadows_an_installed_one():
    """`python minidpo/train.py` puts minidpo/ first on sys.path: no module there may hide an installed one."""
    names = [p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"] + ["commands"]
    code = "import importlib.util as u, sys; print([n for n in sys.argv[1:] if u.find_spec(n)])"
    out = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, cwd="/",
                         env={k: v for k, v in subprocess_env().items() if k != "PYTHONPATH"}, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_usage_and_unknown_command(capsys):
    assert cli.main(["--help"]) == 0
    usage = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert f"  {name} " in usage
    assert cli.main([]) == 2
    assert cli.main(["trian"]) == 2 and "unknown command 'trian'" in capsys.readouterr().err


@pytest.mark.parametrize("name", [n for n in cli.COMMANDS if n != "train"])
def test_each_command_builds_its_parser_both_ways(name):
    """make_parser() alone (prog `minidpo NAME`) and as a subparser, TRL's make_parser style."""
    import argparse

    module = importlib.import_module(cli.COMMANDS[name])
    assert module.make_parser().prog == f"minidpo {name}"
    sub = argparse.ArgumentParser(prog="minidpo").add_subparsers()
    parser = module.make_parser(sub)
    assert parser.prog == f"minidpo {name}" and module.HELP in parser.description


def test_train_parser_as_a_trl_subparser():
    from trl import TrlParser

    from minidpo import train
    from minidpo.trainer import MiniDPOConfig

    sub = TrlParser(()).add_subparsers()
    parser = train.make_parser(sub)
    assert MiniDPOConfig in parser.dataclass_types


def test_console_script_errors_are_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "minidpo.cli", "convert", str(tmp_path / "missing.jsonl"),
                           "--output", str(tmp_path / "out")], capture_output=True, text=True, cwd=REPO,
                          env=subprocess_env(tmp_path), timeout=SUBPROCESS_TIMEOUT)
    assert proc.returncode == 2
    assert proc.stderr == f"minidpo convert: error: input file not found: {tmp_path / 'missing.jsonl'}\n"
