"""minidpo.resilience: resume_from_checkpoint resolved to the newest complete checkpoint (half-written ones skipped
and named), clear errors, and launches that would not form one process group refused. The end-to-end kill/resume
and SIGTERM runs are in test_scale.py."""

import json
from pathlib import Path

import pytest

from helpers import assert_one_line_error
from minidpo.errors import UserError
from minidpo.resilience import check_launch, checkpoint_problem, resolve_resume, resume_request


def _fake_checkpoint(folder: Path, step: int, *, state=True, weights_ok=True) -> Path:
    """The files Trainer writes for a checkpoint, in its order (trainer_state.json last), with small contents."""
    import torch
    from safetensors.torch import save_file

    ckpt = folder / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    save_file({"w": torch.zeros(64)}, str(ckpt / "model.safetensors"))
    if not weights_ok:  # killed while writing the weights
        data = (ckpt / "model.safetensors").read_bytes()
        (ckpt / "model.safetensors").write_bytes(data[: len(data) - 100])
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        torch.save({"state": torch.zeros(16)}, ckpt / name)
    if state:
        (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    return ckpt


def _args(output_dir, resume):
    from types import SimpleNamespace

    return SimpleNamespace(output_dir=str(output_dir), resume_from_checkpoint=resume)


def test_resolve_resume_values(tmp_path):

    assert resolve_resume(_args(tmp_path, None)) is None
    assert resolve_resume(_args(tmp_path, "false")) is None
    good = _fake_checkpoint(tmp_path, 4)
    _fake_checkpoint(tmp_path, 2)
    for value in ("true", "True", "TRUE", True):
        assert resolve_resume(_args(tmp_path, value)) == str(good)
    assert resolve_resume(_args(tmp_path / "elsewhere", str(good))) == str(good)  # a path: used as given
    assert resolve_resume(_args(tmp_path / "elsewhere", str(tmp_path))) == str(good)  # a run dir: its newest
    with pytest.raises(UserError, match="does not exist"):
        resolve_resume(_args(tmp_path, str(tmp_path / "checkpoint-99")))
    with pytest.raises(UserError, match="no complete checkpoint"):
        resolve_resume(_args(tmp_path / "empty", "true"))


def test_a_checkpoint_whose_log_history_is_not_a_list_is_incomplete(tiny_assets, tmp_path, capfd):
    """Trainer would stop inside TrainerState with a stack trace: skipped by `true`, one line when named."""
    from minidpo import train

    good = _fake_checkpoint(tmp_path / "out", 2)
    bad = _fake_checkpoint(tmp_path / "out", 4)
    (bad / "trainer_state.json").write_text(json.dumps({"global_step": 4, "log_history": {"loss": 1}}))
    assert checkpoint_problem(bad) == "trainer_state.json's log_history is not a list"
    assert resolve_resume(_args(tmp_path / "out", "true")) == str(good)
    before = sorted(p.name for p in bad.iterdir())
    capfd.readouterr()
    argv = ["--model_name_or_path", str(tiny_assets / "base"), "--dataset_name", str(tiny_assets / "dpo.jsonl"),
            "--output_dir", str(tmp_path / "out"), "--report_to", "none", "--resume_from_checkpoint", str(bad)]
    assert train.run(argv) == 2
    assert_one_line_error(capfd.readouterr().err, f"{bad} is not a complete checkpoint: trainer_state.json's "
                          "log_history is not a list", f"the newest complete one is {good}")
    assert sorted(p.name for p in bad.iterdir()) == before


def test_resolve_resume_skips_half_written_checkpoints(tmp_path, capsys):

    good = _fake_checkpoint(tmp_path, 6)
    no_state = _fake_checkpoint(tmp_path, 8, state=False)          # killed before trainer_state.json
    truncated = _fake_checkpoint(tmp_path, 10, weights_ok=False)     # weights cut short
    bad_json = _fake_checkpoint(tmp_path, 12)
    (bad_json / "trainer_state.json").write_text('{"global_step": 12, "log_hi')  # killed while writing the state
    (tmp_path / "checkpoint-14").mkdir()                              # killed right after mkdir
    assert checkpoint_problem(good) is None
    assert "trainer_state.json" in checkpoint_problem(no_state)
    assert "truncated" in checkpoint_problem(truncated)
    assert "unreadable" in checkpoint_problem(bad_json)

    from transformers.trainer_utils import get_last_checkpoint
    assert get_last_checkpoint(str(tmp_path)).endswith("checkpoint-14")  # Trainer's own pick would be the broken one
    assert resolve_resume(_args(tmp_path, "true")) == str(good)
    assert "skipping" in capsys.readouterr().out
    with pytest.raises(UserError, match="not a complete checkpoint.*newest complete one is .*checkpoint-6"):
        resolve_resume(_args(tmp_path, str(no_state)))
    only_broken = tmp_path / "broken"
    _fake_checkpoint(only_broken, 2, state=False)
    with pytest.raises(UserError, match="1 incomplete skipped"):
        resolve_resume(_args(only_broken, "true"))


def test_multi_process_launch_that_would_not_be_distributed_is_refused(monkeypatch):
    from types import SimpleNamespace


    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="use_cpu: true"):
        check_launch(SimpleNamespace(world_size=1, use_cpu=False))
    check_launch(SimpleNamespace(world_size=2, use_cpu=True))


def test_train_reports_a_missing_checkpoint_in_one_line(tiny_assets, tmp_path, capfd):
    from minidpo import train

    argv = ["--model_name_or_path", str(tiny_assets / "base"), "--dataset_name", str(tiny_assets / "dpo.jsonl"),
            "--output_dir", str(tmp_path / "out"), "--report_to", "none", "--resume_from_checkpoint", "true"]
    assert train.run(argv) == 2
    assert_one_line_error(capfd.readouterr().err, "minidpo train: error: resume_from_checkpoint",
                          "no complete checkpoint-N folder", "out")


@pytest.mark.parametrize("value,request_", [(None, False), (False, False), ("", False), ("false", False),
                                             ("None", False), ("no", False), ("0", False), (True, True),
                                             ("true", True), ("True", True), ("latest", True), ("1", True),
                                             ("runs/x/checkpoint-4", "runs/x/checkpoint-4")])
def test_resume_request_reads_what_trlparser_and_python_pass(value, request_):
    assert resume_request(value) == request_




@pytest.mark.parametrize("damage,problem", [
    (lambda c: (c / "optimizer.pt").unlink(), "no optimizer.pt"),
    (lambda c: (c / "scheduler.pt").unlink(), "no scheduler.pt"),
    (lambda c: (c / "rng_state.pth").unlink(), "no rng_state.pth"),
    (lambda c: (c / "optimizer.pt").write_bytes((c / "optimizer.pt").read_bytes()[:-40]), "optimizer.pt is truncated"),
], ids=["no-optimizer", "no-scheduler", "no-rng", "truncated-optimizer"])
def test_a_checkpoint_missing_training_state_is_skipped_or_refused(tmp_path, capsys, damage, problem):
    """Resuming from it would silently restart the optimizer (or scheduler, or data order): true skips it and says
    why; naming it is refused, naming the missing file."""
    good = _fake_checkpoint(tmp_path, 2)
    damaged = _fake_checkpoint(tmp_path, 4)
    damage(damaged)
    assert problem in checkpoint_problem(damaged) and checkpoint_problem(good) is None
    assert resolve_resume(_args(tmp_path, "true")) == str(good)
    assert f"skipping {damaged}: {problem}" in capsys.readouterr().out
    with pytest.raises(UserError, match=f"not a complete checkpoint: {problem}"):
        resolve_resume(_args(tmp_path, str(damaged)))


def _fake_fsdp_checkpoint(folder: Path, step: int) -> Path:
    """What Trainer writes under FSDP with FULL_STATE_DICT: Accelerate's model and optimizer files, no optimizer.pt."""
    import torch

    ckpt = _fake_checkpoint(folder, step)
    (ckpt / "optimizer.pt").unlink()
    for name in ("pytorch_model_fsdp.bin", "optimizer.bin"):
        torch.save({"state": torch.zeros(16)}, ckpt / name)
    return ckpt


@pytest.mark.parametrize("damage,problem", [
    (lambda c: None, None),
    (lambda c: (c / "pytorch_model_fsdp.bin").unlink(), "no pytorch_model_fsdp.bin"),
    (lambda c: (c / "optimizer.bin").write_bytes((c / "optimizer.bin").read_bytes()[:-40]),
     "optimizer.bin is truncated"),
], ids=["complete", "no-fsdp-model", "truncated-optimizer"])
def test_an_fsdp_checkpoint_is_complete_with_accelerates_files(tmp_path, damage, problem):
    ckpt = _fake_fsdp_checkpoint(tmp_path, 2)
    damage(ckpt)
    found = checkpoint_problem(ckpt)
    assert found is None if problem is None else problem in found


def test_output_dir_lock(tmp_path, capsys):
    """One run per output_dir: a live holder stops the second run with one line naming it; a dead holder's lock is
    taken over; another host's lock cannot be checked and stops the run; the lock goes with the run."""
    import json as _json
    import socket
    import subprocess
    import sys

    from minidpo.resilience import LOCK_NAME, OutputDirLock

    out = tmp_path / "run"
    with OutputDirLock(out, command="first") as lock:
        assert (out / LOCK_NAME).is_file() and lock.held
        with pytest.raises(UserError, match=r"in use by another minidpo run \(pid \d+ on ") as e:
            OutputDirLock(out).acquire()
        assert e.value.code == "output_dir"
    assert not (out / LOCK_NAME).exists()

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / LOCK_NAME).write_text(_json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    with OutputDirLock(out):
        assert f"taking over {out / LOCK_NAME}" in capsys.readouterr().out
    (out / LOCK_NAME).write_text(_json.dumps({"pid": 1, "host": "elsewhere", "started": "yesterday"}))
    with pytest.raises(UserError, match="pid 1 on elsewhere, started yesterday.*delete .* if that run is gone"):
        OutputDirLock(out).acquire()
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        OutputDirLock(tmp_path / "file").acquire()


def test_train_refuses_a_named_checkpoint_without_its_optimizer(tiny_assets, tmp_path, capfd):
    from minidpo import train

    ckpt = _fake_checkpoint(tmp_path / "out", 3)
    (ckpt / "optimizer.pt").unlink()
    before = sorted(p.name for p in ckpt.iterdir())
    argv = ["--model_name_or_path", str(tiny_assets / "base"), "--dataset_name", str(tiny_assets / "dpo.jsonl"),
            "--output_dir", str(tmp_path / "out"), "--report_to", "none", "--resume_from_checkpoint", str(ckpt)]
    assert train.run(argv) == 2
    assert_one_line_error(capfd.readouterr().err, f"{ckpt} is not a complete checkpoint: no optimizer.pt")
    assert sorted(p.name for p in ckpt.iterdir()) == before
