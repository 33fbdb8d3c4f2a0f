"""Train a model with MiniMind's DPO.

    accelerate launch minidpo/train.py --config configs/quickstart.yaml [--key value ...]
    python minidpo/train.py --config ...          # single process
    minidpo train --config ...                    # the same code

Every knob is a field of one of three dataclasses, settable in the YAML file or on the command line:
`ScriptArguments` (data), `MiniDPOConfig` (training: TRL's DPOConfig plus `length_normalize`, `mask_mode`) and
`trl.ModelConfig` (model, dtype, LoRA). Read `main` top to bottom: check, load, train, evaluate, save, push.
"""

import dataclasses
import json
import math
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from trl import ModelConfig, ScriptArguments as TrlScriptArguments, TrlParser

from minidpo import files, loading, prepared, resilience, run_record, training_report
from minidpo.commands import TRAIN_HELP
from minidpo.console import is_main_process, say
from minidpo.errors import UserError, exit_status
from minidpo.files import atomic_path, is_disk_full, write_text_atomic
from minidpo.masking import check_tokenizer, encode_pair, is_scorable
from minidpo.models import check_vocab, ensure_pad_token, first_line, load_causal_lm, load_tokenizer
from minidpo.trainer import MiniDPOConfig


@dataclass
class ScriptArguments(TrlScriptArguments):
    """Data arguments. `dataset_name` is a local path: a MiniMind dpo.jsonl, a TRL-format jsonl (prompt/chosen/
    rejected), or a directory written by `minidpo convert` (its train.jsonl / eval.jsonl)."""

    dataset_train_split: str = field(default="train", metadata={"help": "split of a convert directory to train on"})
    dataset_test_split: str = field(default="eval", metadata={"help": "split of a convert directory to evaluate on"})
    eval_fraction: float = field(
        default=0.0, metadata={"help": "hold out this share of a single-file dataset for evaluation (deterministic; "
                                       "the pairs are written to output_dir/eval_pairs.jsonl)"})
    dataset_cache_dir: str | None = field(
        default=None, metadata={"help": "where the validated pairs are kept as Arrow files, built once per node and "
                                        "reused by later runs on the same data (default: $MINIDPO_CACHE/prepared "
                                        "or ~/.cache/minidpo/prepared)"})
    eval_split_seed: int = field(
        default=0, metadata={"help": "seed of the eval_fraction split; 0 like `minidpo convert --seed`, so both "
                                     "hold out the same pairs"})
    merge_adapter: bool = field(
        default=False, metadata={"help": "with use_peft: also save the adapter merged into the base model, in "
                                         "output_dir/merged"})
    # Transformers 5 dropped TrainingArguments.overwrite_output_dir; minidpo keeps the guard and the switch.
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "train into an output_dir that already holds another run (its checkpoints "
                                         "are removed, its other files overwritten); without it minidpo refuses, "
                                         "unless resume_from_checkpoint"})
    accept_resume_changes: bool = field(
        default=False, metadata={"help": "resume even though data, model, max_length, mask_mode, beta, loss_type, "
                                         "length_normalize or learning_rate differ from the checkpoint's (the new "
                                         "values apply from the resumed step; summary.json and the card list them)"})

    def __post_init__(self):
        # Refused here, at parse time: out of range, the split would hold out everything (or nothing) and the run
        # would end later in a misleading "no usable training pair".
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")


class _Parser(TrlParser):
    """TrlParser whose mistakes are one-line `UserError`s: a value that does not parse (argparse's message, without
    the usage), YAML that does not parse (with file and line), a config file that cannot be read, and what TrlParser,
    TrainingArguments and MiniDPOConfig raise (`ValueError`: unknown keys, bad values; their messages already say
    what to change)."""

    def error(self, message):
        raise UserError(message, code="bad_config")

    def set_defaults_with_config(self, **kwargs):
        """YAML values become defaults without argparse's `type` check: a list or mapping where a number belongs
        (`max_steps: [1, 2]`) would reach the dataclasses as is. (Options that take a string or a list, such as
        report_to, have no number type.)"""
        for action in self._actions:
            value = kwargs.get(action.dest)
            if action.type in (int, float) and action.nargs in (None, "?") and isinstance(value, (list, dict)):
                kind = "a whole number" if action.type is int else "a number"
                raise UserError(f"{action.dest} takes {kind}, got {value!r} in the config file", code="bad_config")
        return super().set_defaults_with_config(**kwargs)

    def parse_args_and_config(self, args=None, *rest, **kwargs):
        import yaml

        args = list(sys.argv[1:] if args is None else args)
        config = args[args.index("--config") + 1] if "--config" in args[:-1] else None
        try:
            if rest or kwargs:
                return super().parse_args_and_config(args, *rest, **kwargs)
            *parsed, from_config, from_cli = super().parse_args_and_config(
                args, return_remaining_strings=True, separate_remaining_strings=True)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{config}, line {mark.line + 1}, column {mark.column + 1}" if mark else config
            raise UserError(f"{where}: not valid YAML: {getattr(e, 'problem', None) or e}", code="bad_config") \
                from None
        except (ValueError, FileNotFoundError) as e:
            raise UserError(str(e), code="bad_config") from None
        except OSError as e:
            raise UserError(f"cannot read --config {config}: {e.strerror or e}", code="bad_config") from None
        if from_config or from_cli:
            raise UserError(self._unknown(from_config, config) or self._unknown(from_cli, None), code="bad_config")
        check_numbers(*(p for p in parsed if dataclasses.is_dataclass(p)))
        return tuple(parsed)

    def _unknown(self, leftover: list, config) -> str:
        """The message for options no dataclass has (TrlParser's own advice, to set `fail_with_unknown_args`,
        would ignore a typo and train with the default): each name, the closest real option, where it came from."""
        import dataclasses
        import difflib

        if not leftover:
            return ""
        known = sorted({f.name for dc in self.dataclass_types for f in dataclasses.fields(dc)})
        names = [s[2:].split("=")[0] for s in leftover if s.startswith("--")]
        where = f" in {config}" if config else ""
        if not names:
            return f"unexpected argument(s){where}: {' '.join(leftover)} (options are --name value)"
        hints = [f"{n} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(n, known, n=1)) else n
                 for n in names]
        return (f"unknown option{'s' if len(names) > 1 else ''}{where}: {', '.join(hints)}; "
                "`minidpo train --help` lists every option")


def check_numbers(*configs) -> None:
    """Numbers that parse but mean nothing, refused in one line: any float option that is not finite (inf, NaN), a
    training length of zero (no step would run and the base model would be saved as the result)."""
    for config in configs:
        for f in dataclasses.fields(config):
            value = getattr(config, f.name, None)
            values = value if isinstance(value, (list, tuple)) else [value]
            if any(isinstance(v, float) and not math.isfinite(v) for v in values):
                raise UserError(f"{f.name} must be a finite number, got {value}", code="bad_config")
    for config in configs:
        if not isinstance(config, MiniDPOConfig):
            continue
        if config.max_steps == 0 or config.max_steps < -1:
            raise UserError(f"max_steps must be a positive number of steps, or -1 to train num_train_epochs, got "
                            f"{config.max_steps}", code="bad_config")
        if config.max_steps < 0 and not config.num_train_epochs > 0:
            raise UserError(f"num_train_epochs must be > 0, got {config.num_train_epochs}: no step would run (or "
                            "set max_steps)", code="bad_config")
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps"):
            if getattr(config, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(config, name)}", code="bad_config")


def make_parser(subparsers=None):
    """The parser of `minidpo train` and of this file, in TRL's `make_parser` style."""
    dataclass_types = (ScriptArguments, MiniDPOConfig, ModelConfig)
    if subparsers is not None:
        return subparsers.add_parser("train", help=TRAIN_HELP, dataclass_types=dataclass_types)
    return _Parser(dataclass_types)


def parse(argv=None):
    """(script_args, training_args, model_args) from `argv` (default sys.argv), YAML via `--config`."""
    return make_parser().parse_args_and_config(args=argv)


def check_output_dir(script_args: ScriptArguments, training_args: MiniDPOConfig) -> None:
    """Refuse to train over another run, unless resuming it or told to overwrite it (not both)."""
    out = Path(training_args.output_dir)
    request = resilience.resume_request(training_args.resume_from_checkpoint)
    if script_args.overwrite_output_dir and request is not False:
        inside = request is True or Path(request).expanduser().resolve().is_relative_to(out.expanduser().resolve())
        if inside:
            raise UserError("overwrite_output_dir replaces the run in output_dir and resume_from_checkpoint "
                            "continues it: set only one of them", code="bad_config")
    if not out.is_dir() or script_args.overwrite_output_dir or request is not False:
        return
    found = resilience.run_files(out)
    if found:
        raise UserError(f"output_dir {str(out)!r} already holds a run ({', '.join(found)}): choose another "
                        "output_dir, set resume_from_checkpoint: true to continue it, or overwrite_output_dir: true "
                        "to replace it", code="output_dir")


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def check_model_path(model_args: ModelConfig) -> None:
    """A missing local folder is named as such, at once: a path that looks local (`./`, `../`, `~`, `/`, more than
    one `/`, or a first part that is an existing folder) or any path when HF_HUB_OFFLINE is set is never looked up
    on the Hub (which retries for a minute and a half offline before its own error)."""
    name = model_args.model_name_or_path
    if not name:
        raise UserError("set model_name_or_path: a local Transformers folder (see `minidpo import-minimind`)",
                        code="bad_config")
    path = Path(name).expanduser()
    if path.exists():
        return
    parts = Path(name).parts
    looks_local = (name.startswith((".", "/", "~")) or len(parts) > 2
                   or (len(parts) == 2 and Path(parts[0]).expanduser().is_dir()))
    if looks_local:
        raise UserError(f"model_name_or_path {name!r} does not exist", code="missing_path")
    if _hub_offline():
        raise UserError(f"model_name_or_path {name!r} is not a local folder, and HF_HUB_OFFLINE is set so the Hub is "
                        "not asked", code="missing_path")


def check_reporting(training_args: MiniDPOConfig) -> None:
    """Each `report_to` integration is installed (Transformers would stop with a stack trace when building the
    trainer)."""
    from transformers.integrations import get_available_reporting_integrations

    available = set(get_available_reporting_integrations())
    missing = [r for r in training_args.report_to or [] if r not in available]
    if missing:
        raise UserError(f"report_to {', '.join(missing)}: not installed here (pip install {' '.join(missing)}), or "
                        "drop it from report_to", code="bad_config")


def check_hub(training_args: MiniDPOConfig) -> None:
    """With push_to_hub, the Hub answers and accepts the token before any training (the token is never shown)."""
    if not training_args.push_to_hub:
        return
    from huggingface_hub import HfApi

    try:
        HfApi().whoami(token=training_args.hub_token)
    except Exception as e:  # noqa: BLE001 -- every failure here means the same thing to the user
        raise UserError(f"push_to_hub: the Hub cannot be reached or does not accept the token ({type(e).__name__}: "
                        f"{first_line(e)}); check the network, HF_ENDPOINT and HF_TOKEN (or `hf auth login`), or "
                        "drop push_to_hub", code="hub") from None


def prepare_tokenizer(model_args: ModelConfig, trust_remote_code: bool):
    """The model's tokenizer, checked to score assistant tokens, with a pad token (eos when it has none)."""
    path = model_args.model_name_or_path
    tokenizer = load_tokenizer(path, revision=model_args.model_revision, trust_remote_code=trust_remote_code,
                               local_only=False)
    markers = check_tokenizer(tokenizer)
    if ensure_pad_token(tokenizer):
        say(f"tokenizer {path} has no pad token: padding with its eos token {tokenizer.eos_token!r} "
            "(padding is masked out of attention and loss)")
    how = "MiniMind's marker search" if markers else "assistant spans from the chat template"
    say(f"tokenizer {path}: {len(tokenizer)} tokens; assistant tokens found by {how}")
    return tokenizer


def dataset_path(script_args: ScriptArguments) -> Path:
    """`dataset_name` as a path that exists; UserError when it is unset or missing."""
    if not script_args.dataset_name:
        raise UserError("set dataset_name: a MiniMind dpo.jsonl, a TRL jsonl, or a `minidpo convert` directory",
                        code="bad_config")
    path = Path(script_args.dataset_name).expanduser()
    if not path.exists():
        raise UserError(f"dataset_name {str(path)!r} does not exist (minidpo reads local files only)",
                        code="missing_path")
    return path


def load_pairs(script_args: ScriptArguments, tokenizer, training_args: MiniDPOConfig):
    """The train and eval pairs (memory-mapped `datasets.Dataset`s, eval None when there is none) of whatever
    `dataset_name` points at, and the number of rejected lines: listed in output_dir/rejects.jsonl, never dropped.

    The first process of each node validates and writes the pairs (`minidpo.prepared`); the others wait, then open
    its files."""
    path = dataset_path(script_args)
    with training_args.main_process_first(local=True, desc="preparing the pairs"):
        data = prepared.prepare(path, tokenizer, splits=(script_args.dataset_train_split,
                                                        script_args.dataset_test_split),
                                eval_fraction=script_args.eval_fraction, seed=script_args.eval_split_seed,
                                cache_root=script_args.dataset_cache_dir)
    n_eval = len(data.eval) if data.eval is not None else 0
    say(f"dataset {path}: {data.fmt} format; {len(data.train)} train / {n_eval} eval pairs; {data.n_rejected} "
        f"rejected (prepared in {data.folder})")
    if data.n_rejected:
        out = Path(training_args.output_dir)
        if is_main_process():
            with atomic_path(out / "rejects.jsonl") as tmp:
                shutil.copyfile(data.rejects_file, tmp)
        say(f"rejected lines by reason: {data.reasons}; details in {out / 'rejects.jsonl'}")
    if not len(data.train):
        why = (f"all {n_eval} usable pairs are held out for evaluation (eval_fraction {script_args.eval_fraction})"
               if n_eval and script_args.eval_fraction else data.why_empty())
        where = f"; every line with its reason in {Path(training_args.output_dir) / 'rejects.jsonl'}"
        raise UserError(f"no usable training pair in {path}: {why}{where if data.n_rejected else ''}",
                        code="bad_data")
    eval_file = (loading.split_path(path, script_args.dataset_test_split, data.fmt) if data.fmt == "convert-dir"
                 else None)
    if script_args.eval_fraction and not n_eval:
        say(f"WARNING: eval_fraction {script_args.eval_fraction} of {len(data.train)} pairs holds out none: there is "
            "no evaluation; raise eval_fraction")
    elif eval_file is not None and not n_eval:  # e.g. `convert --eval-fraction 0.02` of 60 pairs
        say(f"WARNING: {eval_file} holds no usable pair: there is no evaluation")
    return data.train, data.eval, data.n_rejected


def check_max_length(train, tokenizer, training_args: MiniDPOConfig, sample: int = 1000) -> None:
    """Refuse when `max_length` leaves more than half the pairs with nothing to score (the trainer would drop
    them), warn when it drops more than a tenth. Checked on an evenly spread sample of at most `sample` pairs."""
    max_length = training_args.max_length
    if max_length is None or not len(train):
        return
    picked = list(train.select(range(0, len(train), max(1, len(train) // sample))[:sample]))  # evenly spread
    empty = same = 0
    for record in picked:
        enc = encode_pair(record, tokenizer, max_length=max_length, mask_mode=training_args.mask_mode)
        empty += not is_scorable(enc)
        same += is_scorable(enc) and enc["chosen_input_ids"] == enc["rejected_input_ids"]
    if same:
        say(f"WARNING: {same} of {len(picked)} pairs checked are identical after truncation to max_length="
            f"{max_length} (chosen and rejected differ only beyond it): they train at loss ln 2 and teach nothing; "
            "`minidpo convert --tokenizer ... --max-length ...` lists them (identical_after_truncation)")
    share = empty / len(picked)
    if share <= 0.1:
        return
    full = sorted(max(len(e["chosen_input_ids"]), len(e["rejected_input_ids"])) for e in
                  (encode_pair(r, tokenizer, max_length=None, mask_mode=training_args.mask_mode) for r in picked))
    p90 = full[min(len(full) - 1, int(0.9 * len(full)))]
    suggestion = -(-p90 // 64) * 64  # the 90th percentile of full pair lengths, rounded up to a multiple of 64
    what = (f"max_length={max_length} leaves nothing to score in {empty} of {len(picked)} pairs checked "
            f"({share:.0%}: the prompt fills the window)")
    if share > 0.5:
        raise UserError(f"{what}; set max_length to at least {suggestion} (90% of pairs fit), or check the data "
                        "with `minidpo report-data`", code="bad_config")
    say(f"WARNING: {what}; the trainer drops those pairs. max_length {suggestion} fits 90% of pairs.")


def load_model(model_args: ModelConfig, tokenizer, trust_remote_code: bool):
    """The policy to train, in the configured dtype and attention; UserError when the tokenizer does not fit it."""
    model = load_causal_lm(model_args.model_name_or_path, revision=model_args.model_revision,
                           dtype=model_args.dtype, attn_implementation=model_args.attn_implementation,
                           trust_remote_code=trust_remote_code)
    check_vocab(tokenizer, model)
    return model


def check_lora_targets(model, model_args: ModelConfig) -> None:
    """Each name in a `lora_target_modules` list matches a module of the model, as PEFT matches list entries (the
    full name, or its last dotted parts). PEFT refuses only a list of which nothing matches: one typo in a list
    would train adapters on the rest, without a word."""
    targets = model_args.lora_target_modules
    if not model_args.use_peft or not isinstance(targets, (list, tuple)):
        return  # a single name or regex (TrlParser turns a one-item list into it), or "all-linear": PEFT checks
    names = [n for n, _ in model.named_modules()]
    unmatched = [t for t in targets if t != "all-linear" and not any(n == t or n.endswith(f".{t}") for n in names)]
    if unmatched:
        import torch

        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise UserError(f"lora_target_modules: {', '.join(unmatched)} match{'es' if len(unmatched) == 1 else ''} no "
                        f"module of the model (its linear layers: {', '.join(linear)})", code="bad_config")


def main(script_args: ScriptArguments, training_args: MiniDPOConfig, model_args: ModelConfig) -> dict:
    """One training run; returns summary.json's content (or `{"preempted": True, ...}` after SIGTERM). The main
    process holds `output_dir`'s lock for the whole run, so a second run there stops at once."""
    resilience.check_launch(training_args)
    check_model_path(model_args)
    if not is_main_process():
        return _train(script_args, training_args, model_args)
    with resilience.OutputDirLock(training_args.output_dir, command=" ".join(sys.argv)):
        return _train(script_args, training_args, model_args)


def _train(script_args: ScriptArguments, training_args: MiniDPOConfig, model_args: ModelConfig) -> dict:
    from trl import get_peft_config

    from minidpo.trainer import MiniDPOTrainer

    check_output_dir(script_args, training_args)
    check_reporting(training_args)
    check_hub(training_args)
    out = Path(training_args.output_dir)
    if resilience.resume_request(training_args.resume_from_checkpoint) is True:
        done = run_record.finished_summary(out, training_args)
        if done is not None:
            say(f"output_dir {str(out)!r} holds a finished run (step {done['global_step']} of {done['max_steps']}): "
                "nothing to train, nothing written; raise max_steps or num_train_epochs to train it further")
            return done
    checkpoint = resilience.resolve_resume(training_args)
    dataset_path(script_args)  # named before its content is read for the run's record
    with files.digests_shared():  # the record and the prepared pairs' key hash the data: one read
        record = run_record.RunRecord(run_record.run_settings(script_args, training_args, model_args))
        if checkpoint is not None:
            record.resume(checkpoint, accept=script_args.accept_resume_changes)
        tokenizer = prepare_tokenizer(model_args, training_args.trust_remote_code)
        train, evals, n_rejected = load_pairs(script_args, tokenizer, training_args)
    if is_main_process():
        # Every process would reach the same verdict, and reading an evenly spread sample maps hundreds of MB of
        # the memory-mapped pairs into the reader (the kernel reads ahead around each row).
        check_max_length(train, tokenizer, training_args)
    model = load_model(model_args, tokenizer, training_args.trust_remote_code)
    check_lora_targets(model, model_args)

    try:
        trainer = MiniDPOTrainer(
            model,
            args=training_args,
            train_dataset=train,
            eval_dataset=evals,
            processing_class=tokenizer,
            peft_config=get_peft_config(model_args),
            callbacks=(training_report.callbacks(training_args) + resilience.callbacks(training_args)
                       + [record, run_record.NonFiniteGuard()]),
        )
    except ValueError as e:
        # TRL validates option combinations (loss types, PEFT targets, ...) when the trainer is built; errors
        # later, during training, keep their stack trace.
        raise UserError(str(e), code="bad_config") from None
    record.attach(trainer)
    trainer.data_source, trainer.lines_rejected = script_args.dataset_name, n_rejected
    if evals is not None and is_main_process():
        # what `minidpo eval` scores by default: the pairs this run held out, never ones it trained on
        write_text_atomic(out / loading.EVAL_PAIRS,
                          "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in evals))
    resilience.check_checkpoint_fits(checkpoint, trainer.accelerator.unwrap_model(trainer.model))
    if script_args.overwrite_output_dir and is_main_process():
        # The earlier run's checkpoints would otherwise be what a later resume_from_checkpoint: true takes
        gone = resilience.remove_checkpoints(out)
        if gone:
            say(f"overwrite_output_dir: removed the earlier run's {', '.join(gone)} from {out}")
    trainer.accelerator.wait_for_everyone()
    try:
        return _run(trainer, script_args, model_args, checkpoint, n_rejected)
    except Exception as e:
        if isinstance(e, UserError) or not is_disk_full(e):
            raise
        raise resilience.disk_full(e, out, trainer.state.global_step) from None


def _run(trainer, script_args: ScriptArguments, model_args: ModelConfig, checkpoint, n_rejected: int) -> dict:
    """Train, evaluate, save, push: everything that writes the run's results."""
    training_args, tokenizer = trainer.args, trainer.processing_class
    trainer.train(resume_from_checkpoint=checkpoint)
    if resilience.preempted(trainer):
        # Stopped by SIGTERM: a checkpoint is saved and the resume command printed. The run is not finished,
        # so no final evaluation, no model/summary in output_dir as if it were; exit 0.
        return {"preempted": True, "global_step": trainer.state.global_step, "final_eval": {}}
    metrics = trainer.evaluate() if trainer.eval_dataset is not None else {}

    out = Path(training_args.output_dir)
    trainer.save_model(str(out))
    if script_args.merge_adapter and model_args.use_peft and is_main_process():
        # Merge what was just saved (base + adapter, reloaded), not the trained model: that one keeps its adapter
        # for push_to_hub and callers (merge_and_unload works in place), and under FSDP it is sharded over the
        # processes and cannot be copied.
        merged = load_causal_lm(out, dtype=model_args.dtype, trust_remote_code=training_args.trust_remote_code)
        merged.merge_and_unload().save_pretrained(out / "merged")
        tokenizer.save_pretrained(out / "merged")
    summary = training_report.training_summary(trainer, metrics, n_rejected=n_rejected)
    if is_main_process():
        training_report.write_summary(out, summary)
    trainer.create_model_card(model_name=out.name)  # TRL's card plus minidpo's sections, main process only
    if training_args.push_to_hub:
        trainer.push_to_hub()  # rewrites the card through the same create_model_card
    trainer.accelerator.wait_for_everyone()
    return summary


def run(argv=None) -> int:
    """`minidpo train ARGS` and `python minidpo/train.py ARGS`: exit status 0, or 2 with one line for a mistake."""
    return exit_status("minidpo train", lambda: main(*parse(argv)))


if __name__ == "__main__":
    sys.exit(run())
