"""Surviving faults: resuming from checkpoints and stopping cleanly when the scheduler says so.

- `resolve_resume(args)`: `resume_from_checkpoint` is a checkpoint path, or `true` for the newest *complete*
  checkpoint in `output_dir`. Trainer writes a checkpoint in place (weights, then optimizer/scheduler/RNG, then
  trainer_state.json last), so a process killed mid-save leaves a folder that looks like the latest one; it is
  skipped here, never resumed from, and so is one missing its optimizer, scheduler or RNG state.
- `OutputDirLock`: one run at a time per `output_dir`.
- `callbacks(args)`: `PreemptionCallback`. On SIGTERM (what Slurm, Kubernetes and spot-instance schedulers send
  before killing a job) training finishes the current optimizer step, saves a checkpoint and stops; `train.py`
  then exits 0 with the command that resumes.

Trainer itself restores model, optimizer, scheduler, RNG states and the position in the data from a checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import sys
import threading
import time
import zipfile
from pathlib import Path

from transformers import TrainerCallback

from minidpo.console import is_main_process, say
from minidpo.errors import UserError

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_TRUE = {"true", "yes", "1", "latest", "last"}
_FALSE = {"", "false", "no", "0", "none"}
# What a checkpoint's model can be saved as: plain or sharded weights, a LoRA adapter, FSDP's sharded state
# (a folder per model) or DeepSpeed's global_step* folder.
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "adapter_model.safetensors", "adapter_model.bin")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# Trainer's own training state, beside plain (not engine-sharded) weights
_STATE_FILES = ("optimizer.pt", "scheduler.pt")
# Under FSDP with FULL_STATE_DICT, Accelerate saves the model it resumes from and the optimizer as one file each,
# beside the safetensors weights Trainer writes for people
_FSDP_FULL_STATE_FILES = ("pytorch_model_fsdp.bin", "optimizer.bin", "scheduler.pt")


# ---------------------------------------------------------------------------------------------------------
# Resume


def _safetensors_complete(path: Path) -> bool:
    """The file holds its whole header and every tensor the header lists (a truncated write fails this)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if 8 + n > size:
                return False
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        return 8 + n + end <= size
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return False


def _torch_file_complete(path: Path) -> bool:
    """A `torch.save` file (a zip archive) whose central directory, written last, is all there."""
    try:
        with zipfile.ZipFile(path) as archive:
            return bool(archive.infolist())
    except (OSError, zipfile.BadZipFile):
        return False


def _weights_problem(path: Path) -> tuple[str | None, bool]:
    """(why the model weights are not usable or None, whether an engine - FSDP or DeepSpeed - saved them with its
    own optimizer state)."""
    for name in _WEIGHT_FILES:
        if (path / name).is_file():
            if name.endswith(".safetensors") and not _safetensors_complete(path / name):
                return f"{name} is truncated", False
            return None, False
    for name in _WEIGHT_INDEXES:
        if (path / name).is_file():
            try:
                shards = set(json.loads((path / name).read_text(encoding="utf-8"))["weight_map"].values())
            except (OSError, ValueError, KeyError) as e:
                return f"{name} is unreadable ({e.__class__.__name__})", False
            missing = sorted(s for s in shards if not (path / s).is_file())
            return (f"{name} lists missing shards {missing}" if missing else None), False
    if any(p.is_dir() for p in path.glob("pytorch_model_fsdp_*")) or any(p.is_dir() for p in path.glob("global_step*")):
        return None, True
    return "no model weights", False


def checkpoint_problem(path) -> str | None:
    """Why `path` is not a complete Trainer checkpoint (one training can resume from exactly), or None when it is.

    Complete means every file Trainer writes for it is there and readable: the trainer state (written last), the
    model weights, and, unless an engine keeps its own, the optimizer, the scheduler and the RNG states (under FSDP
    with FULL_STATE_DICT, Accelerate's model and optimizer files).
    """
    path = Path(path)
    if not path.is_dir():
        return "not a directory"
    try:
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
            return "trainer_state.json has no global_step"
        if not isinstance(state.get("log_history", []), list):
            return "trainer_state.json's log_history is not a list"
    except FileNotFoundError:
        return "no trainer_state.json (Trainer writes it last: the save was interrupted)"
    except (OSError, ValueError) as e:
        return f"trainer_state.json is unreadable ({e.__class__.__name__}: the save was interrupted)"
    problem, engine = _weights_problem(path)
    if problem or engine:
        return problem
    fsdp = any((path / name).is_file() for name in _FSDP_FULL_STATE_FILES[:2])
    for name in _FSDP_FULL_STATE_FILES if fsdp else _STATE_FILES:
        if not (path / name).is_file():
            return f"no {name} (resuming would restart it from scratch)"
        if not _torch_file_complete(path / name):
            return f"{name} is truncated"
    rng = sorted(path.glob("rng_state*.pth"))
    if not rng:
        return "no rng_state.pth (resuming would not replay the same data order and dropout)"
    bad = [p.name for p in rng if not _torch_file_complete(p)]
    return f"{bad[0]} is truncated" if bad else None


def latest_checkpoint(output_dir) -> tuple[str | None, list[tuple[str, str]]]:
    """The newest complete `checkpoint-N` in `output_dir` (None if there is none), and the newer incomplete ones
    skipped on the way, as (path, reason) pairs."""
    from transformers.trainer_utils import get_last_checkpoint

    folder = Path(output_dir)
    if not folder.is_dir():
        return None, []
    # Trainer's own rule first (the highest step number); below it only when that one is incomplete.
    last = get_last_checkpoint(str(folder))
    if last is None or checkpoint_problem(last) is None:
        return last, []
    skipped = []
    candidates = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := _CHECKPOINT.match(p.name)) and p.is_dir())
    for _, path in reversed(candidates):
        problem = checkpoint_problem(path)
        if problem is None:
            return str(path), skipped
        skipped.append((str(path), problem))
    return None, skipped


# Files that mean an output directory already holds a run (a finished model or a checkpoint of one).
RUN_MARKERS = ("summary.json", "trainer_state.json", "training_args.bin", "model.safetensors",
               "adapter_model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")


def run_files(output_dir) -> list[str]:
    """The files and checkpoint folders in `output_dir` that belong to a run (the first three checkpoints)."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    return [m for m in RUN_MARKERS if (out / m).exists()] + sorted(p.name for p in out.glob("checkpoint-*"))[:3]


def remove_checkpoints(output_dir) -> list[str]:
    """Remove every checkpoint-N folder of `output_dir` (overwrite_output_dir: none may be resumed as if it were
    the new run's); returns their names."""
    import shutil

    out = Path(output_dir)
    gone = sorted((p for p in out.glob("checkpoint-*") if p.is_dir() and _CHECKPOINT.match(p.name)),
                  key=lambda p: int(p.name.split("-")[1])) if out.is_dir() else []
    for p in gone:
        shutil.rmtree(p)
    return [p.name for p in gone]


def disk_full(error: BaseException, output_dir, step: int) -> UserError:
    """The one line for a write that found the disk full during training or the final save; the checkpoint being
    written (incomplete) is removed, so only complete ones are left."""
    import shutil

    partial = Path(output_dir) / f"checkpoint-{step}"
    removed = []
    if partial.is_dir() and checkpoint_problem(partial):
        shutil.rmtree(partial, ignore_errors=True)
        removed.append(partial.name)
    for name in ("model.safetensors", "adapter_model.safetensors"):  # the final save, cut short
        weights = Path(output_dir) / name
        if weights.is_file() and not _safetensors_complete(weights):
            weights.unlink()
            removed.append(name)
    removed = f"; removed the incomplete {', '.join(removed)}" if removed else ""
    found, _ = latest_checkpoint(output_dir)
    keep = (f"the newest complete checkpoint is {found}: free space and resume with resume_from_checkpoint: true"
            if found else "no complete checkpoint was saved: free space and start again")
    where = Path(output_dir)
    try:
        free = f" ({shutil.disk_usage(where).free // 2**20} MiB free)"
    except OSError:
        free = ""
    return UserError(f"no space left on the disk of output_dir {str(where)!r}{free} while writing at step {step}"
                     f"{removed}; {keep}", code="disk_full")


def resume_request(value) -> bool | str:
    """What a `resume_from_checkpoint` value asks for: False (start fresh), True (the newest checkpoint in
    output_dir) or a path. TrlParser passes strings ("true", "false", "none", a path); Python callers bools or None."""
    if value is None or value is False or value is True:
        return bool(value)
    text = str(value).strip()
    if text.lower() in _TRUE:
        return True
    if text.lower() in _FALSE:
        return False
    return text


def resolve_resume(args):
    """The checkpoint to resume from, or None to start fresh.

    `resume_from_checkpoint` may be a checkpoint path, a run directory (its newest complete checkpoint), or
    true / "true" / "True" for the newest complete checkpoint in `output_dir` (see `resume_request`).
    """
    request = resume_request(getattr(args, "resume_from_checkpoint", None))
    if request is False:
        return None
    if request is True:
        found, skipped = latest_checkpoint(args.output_dir)
        where = f"output_dir {args.output_dir!r}"
    else:
        text = request
        path = Path(text).expanduser()
        if not path.exists():
            raise UserError(f"resume_from_checkpoint: {text!r} does not exist (give a checkpoint-N folder, or true "
                            f"for the newest checkpoint in output_dir)", code="bad_checkpoint")
        if _CHECKPOINT.match(path.name) or (path / "trainer_state.json").exists():
            problem = checkpoint_problem(path)
            if problem:
                found, _ = latest_checkpoint(path.parent)
                hint = f"; the newest complete one is {found}" if found else ""
                raise UserError(f"resume_from_checkpoint: {text} is not a complete checkpoint: {problem}{hint}",
                                code="bad_checkpoint")
            return str(path)
        found, skipped = latest_checkpoint(path)  # a run directory: its newest complete checkpoint
        where = f"{text!r}"
    for path, problem in skipped:
        say(f"skipping {path}: {problem}")
    if found is None:
        # the way to a fresh start that works: dropping resume_from_checkpoint alone is refused where a run is
        held = run_files(args.output_dir)
        fresh = (f"to start afresh there, set overwrite_output_dir: true instead (it removes {', '.join(held)}), "
                 "or choose another output_dir" if held else "drop resume_from_checkpoint to start fresh")
        raise UserError(f"resume_from_checkpoint: no complete checkpoint-N folder in {where} to resume from"
                        + (f" ({len(skipped)} incomplete skipped)" if skipped else "")
                        + f"; {fresh}, or give a checkpoint path", code="bad_checkpoint")
    say(f"resuming from {found}")
    return found


# The fields that decide the shapes of a model's weights
_SHAPE_FIELDS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "intermediate_size")


def check_checkpoint_fits(checkpoint, model) -> None:
    """UserError when `checkpoint` holds weights of another architecture than `model` (resuming would stop inside
    Trainer with a size-mismatch stack trace); nothing to check for a checkpoint without config.json (adapters)."""
    if checkpoint is None or not (Path(checkpoint) / "config.json").is_file():
        return
    try:
        saved = json.loads((Path(checkpoint) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # checkpoint_problem already accepted the weights; Trainer will say more
    config = model.config.get_text_config().to_dict()
    saved = saved.get("text_config", saved)
    differ = [f"{k} {saved[k]} there, {config.get(k)} here" for k in _SHAPE_FIELDS
              if k in saved and saved[k] != config.get(k)]
    if differ:
        raise UserError(f"resume_from_checkpoint: {checkpoint} was saved from another model ({'; '.join(differ)}): "
                        "resume with the model it was trained from, or start fresh", code="bad_checkpoint")


# ---------------------------------------------------------------------------------------------------------
# One run per output_dir

LOCK_NAME = ".minidpo.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


class OutputDirLock:
    """`output_dir/.minidpo.lock`, held by the main process for a whole run, so a second run on the same directory
    stops at once instead of writing the same checkpoints.

    The file records pid, host and start time and is created atomically (`O_EXCL`); it is removed on exit, and a
    lock left by a process that died (same host, pid gone) is taken over with a message. A lock from another host
    cannot be checked and stops the run: the message says how to remove it if that run is gone.
    Raises `UserError` (code "output_dir") for a held lock, an `output_dir` that is a file or cannot be written.
    """

    def __init__(self, output_dir, command: str = ""):
        self.path = Path(output_dir) / LOCK_NAME
        self.command = command
        self.held = False

    def _owner(self) -> dict:
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def acquire(self) -> "OutputDirLock":
        folder = self.path.parent
        if folder.exists() and not folder.is_dir():
            raise UserError(f"output_dir {str(folder)!r} is a file, not a directory", code="output_dir")
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": self.command}
        for _ in range(2):  # a second try after taking over a stale lock
            try:
                folder.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner.get("host") == me["host"] and isinstance(owner.get("pid"), int) and not _alive(owner["pid"]):
                    say(f"taking over {self.path}: its run (pid {owner['pid']}, started {owner.get('started')}) "
                        "is gone")
                    self.path.unlink(missing_ok=True)
                    continue
                who = (f"pid {owner.get('pid')} on {owner.get('host')}, started {owner.get('started')}" if owner
                       else "a run whose lock file cannot be read")
                raise UserError(f"output_dir {str(folder)!r} is in use by another minidpo run ({who}); wait for it, "
                                f"choose another output_dir, or delete {self.path} if that run is gone",
                                code="output_dir") from None
            except OSError as e:
                raise UserError(f"output_dir {str(folder)!r} cannot be written: {e.strerror or e}",
                                code="output_dir") from None
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise UserError(f"could not lock {self.path}", code="output_dir")

    def release(self) -> None:
        if self.held and self._owner().get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False


# ---------------------------------------------------------------------------------------------------------
# Preemption


def resume_command() -> str:
    """The command line that continues this run: the same one, with `--resume_from_checkpoint true`."""
    argv = list(sys.argv)
    for i, a in enumerate(argv):  # drop an earlier --resume_from_checkpoint X / --resume_from_checkpoint=X
        if a == "--resume_from_checkpoint":
            del argv[i:i + 2]
            break
        if a.startswith("--resume_from_checkpoint="):
            del argv[i]
            break
    if argv and argv[0].endswith(".py"):
        multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
        argv = ["accelerate launch [the same launch options]" if multi else "python"] + argv
    elif argv:
        argv[0] = os.path.basename(argv[0])  # the `minidpo` console script
    return " ".join(argv + ["--resume_from_checkpoint", "true"])


class PreemptionCallback(TrainerCallback):
    """On SIGTERM: finish the current optimizer step, save a checkpoint, stop training.

    The signal handler only sets a flag; the save happens in `on_step_end`, at a step boundary, where the
    checkpoint is consistent (no half-accumulated gradients). Under distributed training the flag is combined
    across processes every step (a one-element all-reduce), so if only one rank is signalled all still stop at
    the same step and save together instead of deadlocking. A second SIGTERM while the checkpoint is being saved
    falls back to the default action (terminate at once).
    """

    def __init__(self, signals=(signal.SIGTERM,)):
        self.signals = tuple(signals)
        self.requested = False  # a signal arrived (this process)
        self.preempted = False  # training was stopped for it (all processes agree)
        self.signal_name = None
        self._previous = {}

    # -- signal handling
    def _handler(self, signum, frame):
        if self.requested:  # second signal: stop waiting for the step boundary
            signal.signal(signum, self._previous.get(signum) or signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        print(f"[minidpo] {self.signal_name} received: saving a checkpoint at the end of this step, then stopping",
              flush=True)

    def on_train_begin(self, args, state, control, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be installed from the main thread
        for s in self.signals:
            self._previous[s] = signal.getsignal(s)
            signal.signal(s, self._handler)

    def on_train_end(self, args, state, control, **kwargs):
        for s, previous in self._previous.items():
            signal.signal(s, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    # -- the step boundary
    def _anyone_requested(self) -> bool:
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.requested
        from accelerate import PartialState

        flag = torch.tensor([1 if self.requested else 0], dtype=torch.int32, device=PartialState().device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def on_step_end(self, args, state, control, **kwargs):
        if self._anyone_requested():
            self.preempted = True
            control.should_save = True
            control.should_training_stop = True
        return control


# How launchers tell a process how many were started: torchrun / accelerate (WORLD_SIZE), Open MPI, MPICH / Intel
# MPI, MVAPICH (what Accelerate's MULTI_CPU reads)
_WORLD_SIZE_VARS = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")


def check_launch(args) -> None:
    """Refuse a launch that asked for several processes or machines but formed no process group of that size, before
    anything is loaded: each process would train alone on all the data into one output_dir.

    - MASTER_ADDR set but no world size: the launcher started this process alone (`accelerate launch --cpu` with a
      multi-machine config runs its simple launcher: one plain process per machine);
    - a world size the process group does not have (on a machine without GPUs, torchrun-style launchers start the
      processes, but they only join one group when told to run on CPU)."""
    size_var = next((v for v in _WORLD_SIZE_VARS if os.environ.get(v, "").strip()), None)
    if size_var is None:
        if os.environ.get("MASTER_ADDR", "").strip():
            raise UserError(f"MASTER_ADDR={os.environ['MASTER_ADDR']} asks for several processes or machines, but "
                            "this process was started alone (no WORLD_SIZE) and would train on its own: `accelerate "
                            "launch --cpu` starts one plain process per machine, so drop --cpu (minidpo runs on CPU "
                            "by itself where there is no GPU; see configs/accelerate/cpu_ddp.yaml), or unset "
                            "MASTER_ADDR to train in one process", code="launch")
        return
    try:
        launched = int(os.environ[size_var])
    except ValueError:
        raise UserError(f"{size_var}={os.environ[size_var]!r} is not a number of processes", code="launch") from None
    if launched != args.world_size:
        alone = args.world_size == 1
        raise UserError(f"{launched} processes were launched ({size_var}={launched}) but "
                        + ("each would train on its own: " if alone else
                           f"the process group has {args.world_size}: ")
                        + ("on CPU set `use_cpu: true` in the training config (or --use_cpu true)"
                           if alone and not args.use_cpu else "the process group did not form as launched")
                        + "; see configs/accelerate/cpu_ddp.yaml", code="launch")


def find_callback(trainer, cls):
    """The callback of type `cls` the trainer runs, or None."""
    return next((c for c in trainer.callback_handler.callbacks if isinstance(c, cls)), None)


def callbacks(args) -> list:
    """Trainer callbacks this module contributes to every run."""
    return [PreemptionCallback()]


def preempted(trainer) -> bool:
    """Whether `trainer.train()` returned because of a preemption signal; if so, says on the main process where the
    checkpoint is and how to resume. train.py then exits 0 without its final evaluate/save: the run is not done."""
    cb = find_callback(trainer, PreemptionCallback)
    if cb is None or not cb.preempted:
        return False
    if is_main_process():
        ckpt = Path(trainer.args.output_dir) / f"checkpoint-{trainer.state.global_step}"
        print(f"[minidpo] preempted ({cb.signal_name or 'signal on another process'}) at step "
              f"{trainer.state.global_step}/{trainer.state.max_steps}: checkpoint saved to {ckpt}\n"
              f"[minidpo] to resume, run the same command with --resume_from_checkpoint true:\n"
              f"    {resume_command()}", flush=True)
    return True
