"""What defines a run, kept inside its checkpoints, and the guards that stop a run going on wrong.

- `RunRecord`: a Trainer callback whose state (Transformers' `ExportableState`) is saved in every checkpoint's
  `trainer_state.json` - the file Trainer writes last, so every complete checkpoint has it. It holds the settings
  that define the run (`run_settings`: the data's content digest, the model, max_length, mask_mode, beta, loss,
  length mode, learning rate), each resume and what it changed, and the run's totals so far (tokens, seconds,
  loss), so that summary.json describes the whole run however often it was resumed.
  `RunRecord.resume(checkpoint, accept)`: a resume whose settings differ from the checkpoint's stops with one line
  naming each difference, unless accepted (`accept_resume_changes`); an accepted learning rate is applied to the
  restored optimizer and schedule, so the run trains at the rate summary.json and the model card record.
- `NonFiniteGuard`: stops training with one line when the gradients (before the optimizer step), the weights about
  to be checkpointed, or a logged training number are not finite; nothing is saved after the last good checkpoint.
- `finished_summary`: summary.json of a run that a resume would not train any further (left untouched).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import weakref
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from minidpo.console import say
from minidpo.errors import UserError
from minidpo.files import file_digest

# The settings that decide what a run optimises: a resume with other values trains a different run.
SETTINGS = ("data", "eval_fraction", "eval_split_seed", "model", "max_length", "mask_mode", "length_normalize",
            "loss_type", "beta", "learning_rate")


def data_digest(path, splits=("train", "eval")) -> str:
    """sha256 of the dataset's content: the file, or the split files of a `minidpo convert` directory."""
    path = Path(path).expanduser()
    files = [path / f"{s}.jsonl" for s in splits if (path / f"{s}.jsonl").is_file()] if path.is_dir() else [path]
    digest = hashlib.sha256()
    for f in files:
        try:
            digest.update(f"{f.name}\0{file_digest(f)}".encode())
        except OSError as e:
            raise UserError(f"dataset_name: cannot read {f}: {e.strerror or e}", code="missing_path") from None
    return digest.hexdigest()


def _model_id(name: str) -> str:
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def run_settings(script_args, training_args, model_args) -> dict:
    """The values of `SETTINGS` for this run (JSON types, as they come back from a checkpoint)."""
    return {
        "data": data_digest(script_args.dataset_name, (script_args.dataset_train_split,
                                                       script_args.dataset_test_split)),
        "eval_fraction": script_args.eval_fraction,
        "eval_split_seed": script_args.eval_split_seed,
        "model": _model_id(model_args.model_name_or_path),
        "max_length": training_args.max_length,
        "mask_mode": training_args.mask_mode,
        "length_normalize": training_args.length_normalize,
        "loss_type": list(training_args.loss_type),
        "beta": training_args.beta,
        "learning_rate": training_args.learning_rate,
    }


def _show(key, value) -> str:
    if key == "data" and isinstance(value, str):
        return f"sha256 {value[:12]}"
    return "none" if value is None else str(value)


def describe_changes(changed: dict, words=("there", "here")) -> str:
    """`beta 0.1 there, 0.2 here; data sha256 3f2a.. there, 8e1d.. here` (the checkpoint's value first)."""
    return "; ".join(f"{k} {_show(k, old)} {words[0]}, {_show(k, new)} {words[1]}" for k, (old, new) in changed.items())


def _saved_record(state: dict) -> dict | None:
    """The RunRecord attributes a checkpoint's trainer_state.json holds, or None (an older minidpo, another tool)."""
    callbacks = state.get("stateful_callbacks")
    saved = callbacks.get(RunRecord.__name__) if isinstance(callbacks, dict) else None
    if isinstance(saved, list):  # Trainer keeps a list when several callbacks share the name
        saved = saved[-1] if saved else None
    attributes = saved.get("attributes") if isinstance(saved, dict) else None
    return attributes if isinstance(attributes, dict) and isinstance(attributes.get("settings"), dict) else None


def _zero_totals() -> dict:
    return {"train_tokens": 0, "train_seconds": 0.0, "wall_seconds": 0.0, "loss_sum": 0.0, "loss_steps": 0}


class RunRecord(TrainerCallback, ExportableState):
    """The run's defining settings, its resumes and its totals, saved in each checkpoint (see the module doc).

    `totals` are those of the sessions before this one (restored by `resume`); `so_far()` adds this session's. Train
    tokens are TRL's own counter, which starts at zero in every trainer: `attach` carries it over a resume.
    """

    def __init__(self, settings: dict | None = None):
        self.settings = dict(settings or {})
        self.resumes: list[dict] = []  # {"step", "checkpoint", "changed": {key: [before, after]}}
        self.totals = _zero_totals()
        self.trainer = None
        self._resumed = False
        self._session = None  # this session: start time and step, loss over its logged steps

    # -- before training
    def resume(self, checkpoint, accept: bool) -> None:
        """Take over the record of `checkpoint`; UserError naming each setting that differs, unless `accept`."""
        # a complete checkpoint's trainer_state.json (resilience.checkpoint_problem has read it already)
        state = json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))
        saved = _saved_record(state)
        name = Path(checkpoint).name
        if saved is None:
            if not accept:
                raise UserError(f"resume_from_checkpoint: {checkpoint} records no run settings (an older minidpo or "
                                "another tool wrote it), so this resume cannot be checked against it; set "
                                "accept_resume_changes: true to resume from it with the settings given now",
                                code="bad_checkpoint")
            say(f"resuming from {name}, which records no run settings: continuing with the settings given now")
            saved = {"settings": {}, "resumes": [], "totals": {}}
        before = saved["settings"]
        changed = {k: [before[k], v] for k, v in self.settings.items() if k in before and before[k] != v}
        if changed and not accept:
            raise UserError(f"resume_from_checkpoint: {name} belongs to a run with other settings ("
                            f"{describe_changes(changed)}): resume with the checkpoint's settings, start a new run "
                            "in another output_dir, or set accept_resume_changes: true to continue with these "
                            "(summary.json and the model card then record both)", code="bad_checkpoint")
        if changed:
            say(f"resuming from {name} with changed settings, as accepted: {describe_changes(changed)}")
        self._resumed = True
        self.resumes = list(saved.get("resumes") or [])
        totals = saved.get("totals") if isinstance(saved.get("totals"), dict) else {}
        self.totals = {k: totals.get(k, v) for k, v in _zero_totals().items()}
        self.resumes.append({"step": state["global_step"], "checkpoint": str(checkpoint), "changed": changed})

    def attach(self, trainer) -> None:
        """Follow `trainer`'s token counter, continued from the checkpoint's count."""
        global _attached
        self.trainer = trainer
        trainer._total_train_tokens = self.totals["train_tokens"]
        _attached = weakref.ref(self)

    # -- what a checkpoint keeps (ExportableState)
    def state(self) -> dict:
        return {"args": {}, "attributes": {"settings": self.settings, "resumes": self.resumes,
                                           "totals": self.so_far()}}

    def so_far(self) -> dict:
        """The run's totals up to now: the earlier sessions' plus this one's."""
        t = dict(self.totals)
        if self.trainer is not None:
            t["train_tokens"] = self.trainer._total_train_tokens
        s = self._session
        if s:
            now = time.time()
            t["wall_seconds"] += now - s["start"]
            t["train_seconds"] += (s["end"] or now) - s["start"]
            t["loss_sum"] += s["loss_sum"]
            t["loss_steps"] += s["loss_steps"]
        return t

    # -- during training
    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        live = _attached()
        if self.trainer is None and live is not None and live is not self:
            # restore_callback_states_from_checkpoint: Trainer replaced the attached record with a copy built from
            # the checkpoint's, which lacks this resume (its checks, the trainer, the accepted settings)
            self.__dict__.update(live.__dict__)
        self._session = {"start": time.time(), "end": None, "step": state.global_step,
                         "logged": state.global_step, "loss_sum": 0.0, "loss_steps": 0}
        # A checkpoint written without this callback has no entry, and Trainer's save looks the name up
        state.stateful_callbacks.setdefault(type(self).__name__, self.state())
        if self._resumed and optimizer is not None:
            # Trainer has restored the checkpoint's optimizer and schedule, which carry the rate it was started with
            restored = _base_learning_rate(optimizer, lr_scheduler)
            if restored and not math.isclose(restored, args.learning_rate, rel_tol=1e-9):
                _scale_learning_rate(optimizer, lr_scheduler, args.learning_rate / restored)
            self._resumed = False

    def on_log(self, args, state, control, logs=None, **kwargs):
        s, logs = self._session, logs or {}
        if s is None:
            return
        if "train_loss" in logs:  # the end of the session: its mean loss over every step it ran
            steps = state.global_step - s["step"]
            s.update(loss_sum=logs["train_loss"] * steps, loss_steps=steps, end=time.time())
        elif isinstance(logs.get("loss"), (int, float)):  # the mean over the steps since the last log
            window = state.global_step - s["logged"]
            s["loss_sum"] += logs["loss"] * window
            s["loss_steps"] += window
            s["logged"] = state.global_step


_attached = lambda: None  # noqa: E731 -- the RunRecord attached to the running trainer (a weak reference)


def _base_learning_rate(optimizer, scheduler) -> float | None:
    """The learning rate the schedule is relative to (Trainer gives every parameter group the same one)."""
    inner = getattr(scheduler, "scheduler", scheduler)  # Accelerate's wrapper
    base = getattr(inner, "base_lrs", None) or [g.get("initial_lr") for g in optimizer.param_groups]
    return base[0] if base and isinstance(base[0], (int, float)) and base[0] > 0 else None


def _scale_learning_rate(optimizer, scheduler, scale: float) -> None:
    """Multiply the restored learning rates (the optimizer's and the schedule's base) by `scale`: the schedule keeps
    its shape and position, at the accepted rate."""
    for group in optimizer.param_groups:
        group["lr"] *= scale
        if "initial_lr" in group:
            group["initial_lr"] *= scale
    inner = getattr(scheduler, "scheduler", scheduler)  # Accelerate's wrapper
    for name in ("base_lrs", "_last_lr"):
        if isinstance(getattr(inner, name, None), list):
            setattr(inner, name, [lr * scale for lr in getattr(inner, name)])


# ---------------------------------------------------------------------------------------------------------
# Non-finite numbers during training


def _all_finite(tensors) -> bool:
    """Every value of every tensor is finite, on every process (one all-reduce when several train)."""
    import torch
    import torch.distributed as dist

    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]  # FSDP2's DTensor shards
    flags = [torch.isfinite(t).all() for t in local if t.numel()]
    ok = torch.stack([f.to(flags[0].device) for f in flags]).all() if flags else torch.tensor(True)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        from accelerate import PartialState

        flag = ok.to(device=PartialState().device, dtype=torch.int32).reshape(1)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)  # shards differ between processes: all must agree
        return bool(flag.item())
    return bool(ok)


class NonFiniteGuard(TrainerCallback):
    """Stops training with a UserError (one line, exit 2) at the first non-finite gradient (checked before the
    optimizer step, so the weights in memory stay finite), non-finite weights about to be saved, or non-finite
    logged training number (loss, grad_norm, rewards). The newest checkpoint is the last good one."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if args.fp16:
            return  # fp16's loss scaling expects overflowing gradients now and then: it skips the step, lowers the scale
        if model is not None and not _all_finite(p.grad for p in model.parameters() if p.grad is not None):
            raise _stopped(args, state.global_step + 1, "the gradients are not finite (NaN or inf)")

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if control.should_save and model is not None and not _all_finite(p.detach() for p in model.parameters()):
            raise _stopped(args, state.global_step, "the weights are not finite (NaN or inf)")

    def on_log(self, args, state, control, logs=None, **kwargs):
        skip = ("grad_norm",) if args.fp16 else ()  # an overflow step of fp16's loss scaling, skipped by it
        bad = sorted(k for k, v in (logs or {}).items() if isinstance(v, float) and not math.isfinite(v)
                     and not k.startswith("eval_") and k not in skip)
        if bad:
            raise _stopped(args, state.global_step, f"the logged {', '.join(bad)} is not finite")


def _stopped(args, step: int, what: str) -> UserError:
    from minidpo.resilience import latest_checkpoint

    found, _ = latest_checkpoint(args.output_dir)
    keep = (f"the last good checkpoint, {found}, is kept; resume from it with a lower learning_rate (now "
            f"{args.learning_rate:g}) or max_grad_norm and accept_resume_changes: true" if found else
            f"no checkpoint was saved before; start again with a lower learning_rate (now {args.learning_rate:g}) "
            "or max_grad_norm")
    return UserError(f"training stopped at step {step}: {what}; nothing of this step was saved, {keep}",
                     code="non_finite")


# ---------------------------------------------------------------------------------------------------------
# A finished run


def finished_summary(output_dir, training_args) -> dict | None:
    """summary.json of the run in `output_dir` when it finished and these arguments would not train it further
    (max_steps / num_train_epochs not raised); None otherwise."""
    try:
        summary = json.loads((Path(output_dir) / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict):
        return None
    step, total, config = summary.get("global_step"), summary.get("max_steps"), summary.get("config") or {}
    if not (isinstance(step, int) and isinstance(total, int) and step >= total > 0 and isinstance(config, dict)):
        return None
    if training_args.max_steps > 0:
        further = training_args.max_steps > step
    else:
        done_epochs = config.get("num_train_epochs")
        further = (config.get("max_steps", -1) or -1) > 0 or not isinstance(done_epochs, (int, float)) \
            or training_args.num_train_epochs > done_epochs
    return None if further else summary
