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
    "encoding": {"errors", "files", "console", "markdown", "records", "masking", "embedded", "contracts"},
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


def test_every_mask_mode_option_takes_the_one_list(capsys):
    """Each command that takes a mask mode refuses any other value while parsing (argparse `choices=` from
    `minidpo.masking.MASK_MODES`); the library functions behind them share one check, `check_mask_mode`."""
    from minidpo.errors import RecordError, UserError
    from minidpo.masking import MASK_MODES, check_mask_mode

    takers = []
    for name, module_name in cli.COMMANDS.items():
        parser = importlib.import_module(module_name).make_parser()
        for action in parser._actions:
            if action.dest == "mask_mode":
                takers.append(name)
                assert list(action.choices) == list(MASK_MODES), (name, action.choices)
                with pytest.raises((SystemExit, UserError)) as e:  # train's parser raises UserError
                    parser.parse_args([*action.option_strings[:1], "everything"])
                assert "invalid choice: 'everything'" in (str(e.value) + capsys.readouterr().err), name
    assert {"train", "convert", "report-data", "eval"} <= set(takers), takers
    check_mask_mode("last-turn")
    with pytest.raises(RecordError, match="mask_mode must be one of minimind, last-turn, got 'all'"):
        check_mask_mode("all")
    with pytest.raises(UserError, match="--mask-mode must be one of minimind, last-turn"):
        check_mask_mode("all", user_facing=True)


def test_rank_zero_is_asked_one_way(monkeypatch):
    """`minidpo.console.is_main_process` answers from the launcher's RANK/LOCAL_RANK before Accelerate is set up and
    with Accelerate's (the Trainer's) answer after; outside the console the package asks Accelerate, Trainer or
    TrainingArguments for rank 0 only in trainer.py and ref_cache.py (collectives)."""
    import re as _re

    from minidpo import console

    monkeypatch.setitem(sys.modules, "accelerate.state", None)  # Accelerate not imported yet: the environment
    for env, expected in (({}, True), ({"RANK": "1"}, False), ({"RANK": "0", "LOCAL_RANK": "1"}, False)):
        for key in ("RANK", "LOCAL_RANK"):
            monkeypatch.delenv(key, raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        assert console.is_main_process() is expected, env

    class State:  # once set up, Accelerate's answer wins over the environment
        @staticmethod
        def is_initialized():
            return True

        class PartialState:
            is_main_process = True

    monkeypatch.setitem(sys.modules, "accelerate.state", State)
    assert console.is_main_process() is True  # RANK=0, LOCAL_RANK=1 above, yet Accelerate says rank 0

    others = _re.compile(r"\.is_main_process\b|is_world_process_zero|process_index == 0")
    askers = sorted(p.name for p in PACKAGE.rglob("*.py") if p.name not in ("console.py",)
                    and others.search(p.read_text(encoding="utf-8")))
    assert set(askers) <= {"ref_cache.py", "trainer.py"}, askers
