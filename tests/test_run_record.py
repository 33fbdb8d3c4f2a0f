"""A run stays one run: what defines it is kept in its checkpoints and a resume that differs stops (or is accepted
and recorded), summary.json covers every resume and a finished run resumed is left as it is, `overwrite_output_dir`
leaves nothing of the earlier run to resume, numbers that mean nothing are refused when parsed, a run whose
gradients turn non-finite stops and keeps its last good checkpoint, a full disk while checkpointing is one line,
and a launch that formed no process group stops before training. Each: exit code, the one line, the files.

Runs train.py in this process on the embedded tiny model (tests/helpers.py), a few steps each.
"""

import errno
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, SUBPROCESS_TIMEOUT, assert_one_line_error, subprocess_env
from minidpo import embedded, train
from minidpo.resilience import checkpoint_problem


def argv(assets: Path, out: Path, *extra) -> list:
    """train.py arguments over the tiny assets: constant learning rate, a log and a checkpoint every 2 steps."""
    return ["--model_name_or_path", str(assets / "base"), "--dataset_name", str(assets / "dpo.jsonl"),
            "--output_dir", str(out), "--learning_rate", "5e-3", "--lr_scheduler_type", "constant",
            "--per_device_train_batch_size", "8", "--max_length", "128", "--logging_steps", "1",
            "--save_strategy", "steps", "--save_steps", "2", "--report_to", "none", "--disable_tqdm", "true",
            "--dataloader_num_workers", "0", "--seed", "0", *map(str, extra)]


def files(root: Path) -> dict:
    """Every file under `root` with a digest of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def two_steps(tiny_assets, tmp_path_factory):
    """A finished 2-step run with checkpoint-2 (copy it before changing it)."""
    out = tmp_path_factory.mktemp("two-steps") / "run"
    assert train.run(argv(tiny_assets, out, "--max_steps", 2)) == 0
    return out


@pytest.fixture(scope="module")
def four_steps(tiny_assets, tmp_path_factory):
    """The same run trained to 4 steps in one go: what a 2-step run resumed to 4 must describe."""
    out = tmp_path_factory.mktemp("four-steps") / "run"
    assert train.run(argv(tiny_assets, out, "--max_steps", 4)) == 0
    return out


def copy_run(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


# ---------------------------------------------------------------------------------------------------------
# 2. Resuming: the settings that define the run


def test_a_resume_with_other_settings_stops_naming_each(tiny_assets, two_steps, tmp_path, capfd):
    out = copy_run(two_steps, tmp_path)
    other_data = embedded.write_jsonl(embedded.make_preference_records(160, seed=2), tmp_path / "other.jsonl")
    before = files(tmp_path)
    capfd.readouterr()
    code = train.run(argv(tiny_assets, out, "--max_steps", 4, "--resume_from_checkpoint", "true", "--beta", 0.2,
                          "--learning_rate", 0.5, "--dataset_name", other_data))
    assert code == 2
    assert_one_line_error(capfd.readouterr().err, "checkpoint-2 belongs to a run with other settings",
                          "data sha256", "beta 0.1 there, 0.2 here", "learning_rate 0.005 there, 0.5 here",
                          "accept_resume_changes: true")
    assert files(tmp_path) == before


def test_an_accepted_change_trains_at_the_new_values_and_is_recorded(tiny_assets, two_steps, tmp_path, capfd):
    """The learning rate a resume runs at is the one recorded: the restored schedule is rescaled to it."""
    out = copy_run(two_steps, tmp_path)
    assert train.run(argv(tiny_assets, out, "--max_steps", 4, "--resume_from_checkpoint", "true", "--beta", 0.2,
                          "--learning_rate", 0.001, "--accept_resume_changes", "true")) == 0
    assert "with changed settings, as accepted: beta 0.1 there, 0.2 here" in capfd.readouterr().out
    s = summary(out)
    assert s["config"]["beta"] == 0.2 and s["config"]["learning_rate"] == 0.001
    assert [r["step"] for r in s["resumes"]] == [2]
    assert s["resumes"][0]["changed"] == {"beta": [0.1, 0.2], "learning_rate": [0.005, 0.001]}
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    rates = {e["step"]: e["learning_rate"] for e in state["log_history"] if "learning_rate" in e}
    assert rates[1] == rates[2] == pytest.approx(5e-3) and rates[3] == rates[4] == pytest.approx(1e-3), rates
    assert "step 2: beta 0.1 before, 0.2 after; learning_rate 0.005 before, 0.001 after" in \
        (out / "README.md").read_text(encoding="utf-8")


def test_a_checkpoint_without_run_settings_needs_the_accept_option(tiny_assets, two_steps, tmp_path, capfd):
    out = copy_run(two_steps, tmp_path)
    state_file = out / "checkpoint-2" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["stateful_callbacks"]["RunRecord"]  # as an older minidpo wrote it
    state_file.write_text(json.dumps(state))
    (out / "summary.json").unlink()  # not finished: the resume has steps to train
    before = files(tmp_path)
    capfd.readouterr()
    assert train.run(argv(tiny_assets, out, "--max_steps", 3, "--resume_from_checkpoint", "true")) == 2
    assert_one_line_error(capfd.readouterr().err, "checkpoint-2 records no run settings",
                          "accept_resume_changes: true")
    assert files(tmp_path) == before
    assert train.run(argv(tiny_assets, out, "--max_steps", 3, "--resume_from_checkpoint", "true",
                          "--accept_resume_changes", "true", "--learning_rate", 0.001)) == 0
    assert summary(out)["global_step"] == 3
    # no record to compare with: the rate is read from the restored schedule, and the run trains at the one given
    history = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
    assert [e["learning_rate"] for e in history if e.get("step") == 2] == [pytest.approx(5e-3)]
    assert summary(out)["final_train"]["learning_rate"] == pytest.approx(1e-3)  # step 3's


# ---------------------------------------------------------------------------------------------------------
# 6. summary.json over the whole run; a finished run resumed changes nothing


def test_summary_describes_the_whole_run_across_a_resume(tiny_assets, two_steps, four_steps, tmp_path):
    out = copy_run(two_steps, tmp_path)
    assert train.run(argv(tiny_assets, out, "--max_steps", 4, "--resume_from_checkpoint", "true")) == 0
    resumed, whole = summary(out), summary(four_steps)
    assert resumed["global_step"] == whole["global_step"] == 4
    assert resumed["train_tokens"] == whole["train_tokens"] > summary(two_steps)["train_tokens"] > 0
    assert resumed["final_train"]["num_tokens"] == whole["final_train"]["num_tokens"] == whole["train_tokens"]
    assert resumed["final_train"]["train_loss"] == pytest.approx(whole["final_train"]["train_loss"], abs=1e-4)
    assert resumed["train_seconds"] > summary(two_steps)["train_seconds"] * 0.5
    assert [e["step"] for e in json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
            if "loss" in e] == [1, 2, 3, 4]
    assert [r["step"] for r in resumed["resumes"]] == [2] and resumed["resumes"][0]["changed"] == {}


def test_resuming_a_finished_run_changes_nothing(tiny_assets, two_steps, tmp_path, capfd):
    out = copy_run(two_steps, tmp_path)
    before = files(tmp_path)
    capfd.readouterr()
    assert train.run(argv(tiny_assets, out, "--max_steps", 2, "--resume_from_checkpoint", "true")) == 0
    assert "holds a finished run (step 2 of 2): nothing to train, nothing written" in capfd.readouterr().out
    assert files(tmp_path) == before


# ---------------------------------------------------------------------------------------------------------
# 1. overwrite_output_dir, and the advice when there is nothing to resume


def _earlier_run(out: Path) -> Path:
    """What an earlier run left: a complete-looking checkpoint-4 and a summary."""
    import torch
    from safetensors.torch import save_file

    ckpt = out / "checkpoint-4"
    ckpt.mkdir(parents=True)
    save_file({"w": torch.zeros(4)}, str(ckpt / "model.safetensors"))
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        torch.save({}, ckpt / name)
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 4, "log_history": []}))
    (out / "summary.json").write_text("{}")
    assert checkpoint_problem(ckpt) is None
    return out


def test_overwrite_output_dir_leaves_no_earlier_checkpoint_to_resume(tiny_assets, tmp_path, capfd):
    out = _earlier_run(tmp_path / "run")
    assert train.run(argv(tiny_assets, out, "--max_steps", 1, "--overwrite_output_dir", "true",
                          "--resume_from_checkpoint", "true")) == 2
    assert_one_line_error(capfd.readouterr().err, "overwrite_output_dir", "resume_from_checkpoint",
                          "set only one of them")
    assert (out / "checkpoint-4").is_dir()
    assert train.run(argv(tiny_assets, out, "--max_steps", 1, "--save_strategy", "no",
                          "--overwrite_output_dir", "true")) == 0
    assert f"overwrite_output_dir: removed the earlier run's checkpoint-4 from {out}" in capfd.readouterr().out
    assert not list(out.glob("checkpoint-*")) and summary(out)["global_step"] == 1
    capfd.readouterr()
    assert train.run(argv(tiny_assets, out, "--max_steps", 2, "--resume_from_checkpoint", "true")) == 2
    assert_one_line_error(capfd.readouterr().err, "no complete checkpoint-N folder")


def test_nothing_to_resume_advises_a_start_that_works(tiny_assets, tmp_path, capfd):
    out = tmp_path / "run"
    (out / "checkpoint-3").mkdir(parents=True)  # a save killed before trainer_state.json
    assert train.run(argv(tiny_assets, out, "--max_steps", 1, "--resume_from_checkpoint", "true")) == 2
    line = assert_one_line_error(capfd.readouterr().err, "no complete checkpoint-N folder",
                                 "set overwrite_output_dir: true instead", "checkpoint-3")
    assert "Drop resume_from_checkpoint" not in line
    # following the advice: the same command with overwrite_output_dir instead of resume_from_checkpoint
    assert train.run(argv(tiny_assets, out, "--max_steps", 1, "--save_strategy", "no",
                          "--overwrite_output_dir", "true")) == 0
    assert not (out / "checkpoint-3").exists() and summary(out)["global_step"] == 1


# ---------------------------------------------------------------------------------------------------------
# 3. Numbers: refused when parsed; non-finite during training


PARSE_CASES = {
    "learning-rate-inf": (["--learning_rate", "inf"], {}, "learning_rate must be a finite number, got inf"),
    "beta-inf": (["--beta", "inf"], {}, "beta must be a finite number, got inf"),
    "beta-nan": ([], {"beta": float("nan")}, "beta must be > 0, got nan"),
    "grad-norm-nan": (["--max_grad_norm", "nan"], {}, "max_grad_norm must be a finite number, got nan"),
    "zero-epochs": (["--num_train_epochs", "0"], {}, "num_train_epochs must be > 0, got 0"),
    "zero-max-steps": (["--max_steps", "0"], {}, "max_steps must be a positive number of steps"),
    "yaml-list-for-an-int": ([], {"max_steps": [1, 2]}, "max_steps takes a whole number, got [1, 2]"),
    "yaml-list-for-a-float": ([], {"learning_rate": [1e-3]}, "learning_rate takes a number, got [0.001]"),
}


@pytest.mark.parametrize("case", list(PARSE_CASES))
def test_meaningless_numbers_are_refused_when_parsed(case, tiny_assets, tmp_path, capfd):
    import yaml

    flags, config, needle = PARSE_CASES[case]
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model_name_or_path": str(tiny_assets / "base"), "output_dir": str(tmp_path / "out"),
                                   "dataset_name": str(tiny_assets / "dpo.jsonl"), "report_to": "none", **config}))
    before = files(tmp_path)
    assert train.run(["--config", str(cfg), *flags]) == 2
    assert_one_line_error(capfd.readouterr().err, "minidpo train: error:", needle)
    assert files(tmp_path) == before


def test_gradients_turning_non_finite_stop_the_run_and_keep_the_last_good_checkpoint(tiny_assets, tmp_path, capfd):
    out = tmp_path / "run"
    # a learning rate so large that the first step's weights make the second step's gradients NaN
    assert train.run(argv(tiny_assets, out, "--max_steps", 4, "--save_steps", 1, "--learning_rate", 1e30,
                          "--max_grad_norm", 0)) == 2
    assert_one_line_error(capfd.readouterr().err, "training stopped at step 2: the gradients are not finite",
                          f"the last good checkpoint, {out / 'checkpoint-1'}, is kept", "accept_resume_changes")
    assert checkpoint_problem(out / "checkpoint-1") is None
    assert not (out / "checkpoint-2").exists()
    assert not (out / "model.safetensors").exists() and not (out / "summary.json").exists()


# ---------------------------------------------------------------------------------------------------------
# 8 (resume/train part). A full disk while checkpointing


def test_a_full_disk_while_checkpointing_is_one_line_and_leaves_no_partial_checkpoint(tiny_assets, tmp_path, capfd,
                                                                                    monkeypatch):
    import torch

    real_save = torch.save

    def save(obj, f, *args, **kwargs):  # the disk fills up in the middle of checkpoint-2's optimizer state
        if "checkpoint-2" in str(f):
            Path(f).write_bytes(b"PK\x03\x04 half an archive")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "run"
    assert train.run(argv(tiny_assets, out, "--max_steps", 3, "--save_steps", 1)) == 2
    assert_one_line_error(capfd.readouterr().err, "no space left on the disk of output_dir",
                          "at step 2; removed the incomplete checkpoint-2",
                          f"the newest complete checkpoint is {out / 'checkpoint-1'}")
    assert checkpoint_problem(out / "checkpoint-1") is None
    assert not (out / "checkpoint-2").exists() and not (out / "summary.json").exists()


# ---------------------------------------------------------------------------------------------------------
# 7. Launches that asked for several processes but formed no group


def _launch(cmd: list, tmp_path: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env={**subprocess_env(tmp_path), **env}, capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT)


def test_multi_node_config_with_cpu_stops_before_training(tiny_assets, tmp_path):
    """`accelerate launch --cpu` with the multi-machine template starts plain single processes (MASTER_ADDR set, no
    WORLD_SIZE): each stops with one line before loading anything. Accelerate then exits 1 with its own report."""
    out = tmp_path / "out"
    proc = _launch(["accelerate", "launch", "--config_file", "configs/accelerate/multi_node.yaml", "--cpu",
                    "--quiet", "minidpo/train.py", *argv(tiny_assets, out, "--max_steps", 1)], tmp_path)
    assert proc.returncode != 0
    errors = [x for x in proc.stderr.splitlines() if "minidpo train: error:" in x]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "MASTER_ADDR=10.0.0.1 asks for several processes or machines" in errors[0] and "drop --cpu" in errors[0]
    assert not out.exists()

    proc = _launch([sys.executable, "minidpo/train.py", *argv(tiny_assets, out, "--max_steps", 1)], tmp_path,
                   MASTER_ADDR="10.0.0.1", MASTER_PORT="29500")
    assert proc.returncode == 2
    assert_one_line_error(proc.stderr, "MASTER_ADDR=10.0.0.1", "no WORLD_SIZE", "unset MASTER_ADDR")
    assert not out.exists()


def test_a_world_size_the_process_group_does_not_have_is_refused(monkeypatch):
    from types import SimpleNamespace

    from minidpo.errors import UserError
    from minidpo.resilience import check_launch

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    with pytest.raises(UserError, match=r"4 processes were launched \(OMPI_COMM_WORLD_SIZE=4\) but the process "
                                        r"group has 2"):
        check_launch(SimpleNamespace(world_size=2, use_cpu=True))
    check_launch(SimpleNamespace(world_size=4, use_cpu=True))
    monkeypatch.delenv("OMPI_COMM_WORLD_SIZE")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    check_launch(SimpleNamespace(world_size=1, use_cpu=True))  # a plain single process


def test_the_guard_leaves_fp16_overflow_steps_to_loss_scaling(tmp_path):
    """fp16's GradScaler skips a step whose gradients overflow and lowers its scale: not a reason to stop. Without
    loss scaling the same gradients stop the run."""
    from types import SimpleNamespace

    import torch

    from minidpo.errors import UserError
    from minidpo.run_record import NonFiniteGuard

    model = torch.nn.Linear(2, 2)
    for p in model.parameters():
        p.grad = torch.full_like(p, float("inf"))
    state, control = SimpleNamespace(global_step=6), SimpleNamespace(should_save=False)
    for fp16 in (True, False):
        args = SimpleNamespace(fp16=fp16, output_dir=str(tmp_path), learning_rate=1e-3)
        if fp16:
            NonFiniteGuard().on_pre_optimizer_step(args, state, control, model=model)
            NonFiniteGuard().on_log(args, state, control, logs={"grad_norm": float("inf"), "loss": 0.7})
        else:
            with pytest.raises(UserError, match="training stopped at step 7: the gradients are not finite.*no "
                                                "checkpoint was saved before"):
                NonFiniteGuard().on_pre_optimizer_step(args, state, control, model=model)
            with pytest.raises(UserError, match="the logged grad_norm is not finite"):
                NonFiniteGuard().on_log(args, state, control, logs={"grad_norm": float("inf"), "loss": 0.7})


def test_a_full_disk_during_the_final_save_leaves_no_partial_model(tiny_assets, tmp_path, capfd, monkeypatch):
    import transformers

    real_save_model = transformers.Trainer.save_model
    out = tmp_path / "run"

    def save_model(self, output_dir=None, _internal_call=False):  # the final weights file stops half-way
        if Path(output_dir) != out:
            return real_save_model(self, output_dir, _internal_call)
        (out / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"w\": ")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(transformers.Trainer, "save_model", save_model)
    assert train.run(argv(tiny_assets, out, "--max_steps", 2)) == 2
    assert_one_line_error(capfd.readouterr().err, "no space left on the disk of output_dir",
                          "removed the incomplete model.safetensors",
                          f"the newest complete checkpoint is {out / 'checkpoint-2'}")
    assert not (out / "model.safetensors").exists() and not (out / "summary.json").exists()
    assert checkpoint_problem(out / "checkpoint-2") is None


def test_the_record_survives_transformers_restoring_callback_states(tiny_assets, two_steps, four_steps, tmp_path):
    """restore_callback_states_from_checkpoint makes Trainer rebuild the callback from the checkpoint: the resume
    (its tokens, its entry in resumes) is still counted."""
    out = copy_run(two_steps, tmp_path)
    assert train.run(argv(tiny_assets, out, "--max_steps", 4, "--resume_from_checkpoint", "true",
                          "--restore_callback_states_from_checkpoint", "true")) == 0
    assert summary(out)["train_tokens"] == summary(four_steps)["train_tokens"]
    assert [r["step"] for r in summary(out)["resumes"]] == [2]
