"""Train a model with MiniMind's DPO.

    accelerate launch minidpo/train.py --config configs/quickstart.yaml [--key value ...]
    python minidpo/train.py --config ...          # single process
    minidpo train --config ...                    # the same code

Every knob is a field of one of three dataclasses, settable in the YAML file or on the command line:
`ScriptArguments` (data), `MiniDPOConfig` (training: TRL's DPOConfig plus `length_normalize`, `mask_mode`) and
`trl.ModelConfig` (model, dtype, LoRA). Read top to bottom: load, check, train, evaluate, save, push.
"""

import os
import sys

if __name__ == "__main__" and sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    # Run as a file, Python puts minidpo/ itself on the path, where data.py or cli.py would shadow other modules.
    sys.path.pop(0)

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

from trl import ModelConfig, ScriptArguments as TrlScriptArguments, TrlParser

from minidpo.cli import UserError
from minidpo.trainer import MiniDPOConfig, ensure_pad_token


@dataclass
class ScriptArguments(TrlScriptArguments):
    """Data arguments. `dataset_name` is a local path: a MiniMind dpo.jsonl, a TRL-format jsonl (prompt/chosen/
    rejected), or a directory written by `minidpo convert` (its train.jsonl / eval.jsonl)."""

    dataset_train_split: str = field(default="train", metadata={"help": "split of a convert directory to train on"})
    dataset_test_split: str = field(default="eval", metadata={"help": "split of a convert directory to evaluate on"})
    eval_fraction: float = field(
        default=0.0, metadata={"help": "hold out this share of a single-file dataset for evaluation (deterministic)"})
    merge_adapter: bool = field(
        default=False, metadata={"help": "with use_peft: also save the adapter merged into the base model, in "
                                         "output_dir/merged"})
    # Transformers 5 dropped TrainingArguments.overwrite_output_dir; minidpo keeps the guard and the switch.
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "train into an output_dir that already holds another run (its files are "
                                         "overwritten); without it minidpo refuses, unless resume_from_checkpoint"})


# Files that mean an output directory already holds a run (a finished model or a checkpoint of one).
_RUN_MARKERS = ("summary.json", "trainer_state.json", "training_args.bin", "model.safetensors",
                "adapter_model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")


def check_output_dir(script_args: ScriptArguments, training_args: MiniDPOConfig) -> None:
    """Refuse to train over another run, unless resuming it or told to overwrite it."""
    out = Path(training_args.output_dir)
    if not out.is_dir() or script_args.overwrite_output_dir:
        return
    resume = training_args.resume_from_checkpoint
    if resume is not None and str(resume).strip().lower() not in ("", "false", "none", "no", "0"):
        return
    found = [m for m in _RUN_MARKERS if (out / m).exists()] + sorted(p.name for p in out.glob("checkpoint-*"))[:3]
    if found:
        raise UserError(f"output_dir {str(out)!r} already holds a run ({', '.join(found)}): choose another "
                        "output_dir, set resume_from_checkpoint: true to continue it, or overwrite_output_dir: true "
                        "to replace it")


def check_model_path(model_args: ModelConfig) -> None:
    """A missing local folder is named as such (instead of Hugging Face's Hub lookup error)."""
    name = model_args.model_name_or_path
    if not name:
        raise UserError("set model_name_or_path: a local Transformers folder (see `minidpo import-minimind`)")
    path = Path(name).expanduser()
    looks_like_hub_id = not name.startswith((".", "/", "~")) and name.count("/") <= 1
    if not path.exists() and not looks_like_hub_id:
        raise UserError(f"model_name_or_path {name!r} does not exist")


def load_tokenizer(model_args: ModelConfig, trust_remote_code: bool):
    from transformers import AutoTokenizer

    from minidpo.masking import MaskingError, uses_minimind_markers

    path = model_args.model_name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=model_args.model_revision,
                                                  trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        where = "" if Path(path).expanduser().exists() else " (not a local folder, and the Hub lookup failed)"
        raise UserError(f"cannot load a tokenizer from {path!r}{where}: {_first_line(e)}") from None
    try:
        markers = uses_minimind_markers(tokenizer)
    except MaskingError as e:
        raise UserError(e.message) from None
    try:
        padded_with_eos = ensure_pad_token(tokenizer)
    except ValueError as e:
        raise UserError(f"tokenizer {path!r}: {e}") from None
    if padded_with_eos:
        print(f"[minidpo] tokenizer {path} has no pad token: padding with its eos token {tokenizer.eos_token!r} "
              "(padding is masked out of attention and loss)")
    how = "MiniMind's marker search" if markers else "assistant spans from the chat template"
    print(f"[minidpo] tokenizer {path}: {len(tokenizer)} tokens; assistant tokens found by {how}")
    return tokenizer


def load_pairs(script_args: ScriptArguments, tokenizer, training_args: MiniDPOConfig):
    """Train and eval TRL records from whatever `dataset_name` points at; rejects are reported, never dropped."""
    from minidpo import data

    if not script_args.dataset_name:
        raise UserError("set dataset_name: a MiniMind dpo.jsonl, a TRL jsonl, or a `minidpo convert` directory")
    path = Path(script_args.dataset_name).expanduser()
    if not path.exists():
        raise UserError(f"dataset_name {str(path)!r} does not exist (minidpo reads local files only)")
    fmt = data.detect_format(path)
    train, rejects = data.load_trl_records(path, script_args.dataset_train_split, tokenizer)
    evals, eval_rejects = data.load_trl_records(path, script_args.dataset_test_split, tokenizer)
    rejects += eval_rejects
    if not evals and script_args.eval_fraction > 0:
        train, evals = data.split_records(train, script_args.eval_fraction, training_args.seed)
    print(f"[minidpo] dataset {path}: {fmt} format; {len(train)} train / {len(evals)} eval pairs; "
          f"{len(rejects)} rejected")
    if rejects:
        out = Path(training_args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "rejects.jsonl", "w", encoding="utf-8") as f:
            for r in rejects:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        reasons = {}
        for r in rejects:
            reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
        print(f"[minidpo] rejected lines by reason: {reasons}; details in {out / 'rejects.jsonl'}")
    if not train:
        raise UserError(f"no usable training pair in {path}")
    return train, evals, rejects


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [repr(e)])[0]


def check_max_length(train: list, tokenizer, training_args: MiniDPOConfig, sample: int = 1000) -> None:
    """Refuse when `max_length` leaves more than half the pairs with nothing to score (the trainer would drop
    them), warn when it drops more than a tenth. Checked on an evenly spread sample of at most `sample` pairs."""
    from minidpo.masking import encode_pair, is_scorable

    max_length = training_args.max_length
    if max_length is None or not train:
        return
    picked = train[:: max(1, len(train) // sample)][:sample]
    empty = 0
    for record in picked:
        enc = encode_pair(record, tokenizer, max_length=max_length, mask_mode=training_args.mask_mode)
        empty += not is_scorable(enc)
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
                        "with `minidpo report-data`")
    print(f"[minidpo] WARNING: {what}; the trainer drops those pairs. max_length {suggestion} fits 90% of pairs.")


def load_model(model_args: ModelConfig, tokenizer, trust_remote_code: bool):
    import torch
    from transformers import AutoModelForCausalLM

    dtype = model_args.dtype if model_args.dtype in (None, "auto") else getattr(torch, model_args.dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_args.model_name_or_path, revision=model_args.model_revision, dtype=dtype,
            attn_implementation=model_args.attn_implementation, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a causal LM from {model_args.model_name_or_path!r}: {_first_line(e)}") from None
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise UserError(f"the tokenizer has {len(tokenizer)} tokens but the model's embedding has {rows} rows: "
                        "they do not belong together (point model_name_or_path at a folder holding both)")
    return model


def main(script_args: ScriptArguments, training_args: MiniDPOConfig, model_args: ModelConfig) -> dict:
    from datasets import Dataset
    from trl import get_peft_config

    from minidpo import reports, resilience
    from minidpo.trainer import MiniDPOTrainer

    check_model_path(model_args)
    check_output_dir(script_args, training_args)
    tokenizer = load_tokenizer(model_args, training_args.trust_remote_code)
    train, evals, rejects = load_pairs(script_args, tokenizer, training_args)
    check_max_length(train, tokenizer, training_args)
    model = load_model(model_args, tokenizer, training_args.trust_remote_code)

    try:
        trainer = MiniDPOTrainer(
            model,
            args=training_args,
            train_dataset=Dataset.from_list(train),
            eval_dataset=Dataset.from_list(evals) if evals else None,
            processing_class=tokenizer,
            peft_config=get_peft_config(model_args),
            callbacks=reports.callbacks(training_args) + resilience.callbacks(training_args),
        )
    except ValueError as e:
        # TRL validates option combinations (loss types, PEFT targets, ...) when the trainer is built; errors
        # later, during training, keep their stack trace.
        raise UserError(str(e)) from None
    trainer.train(resume_from_checkpoint=resilience.resolve_resume(training_args))
    if resilience.preempted(trainer):
        # Stopped by SIGTERM: a checkpoint is saved and the resume command printed. The run is not finished,
        # so no final evaluation, no model/summary in output_dir as if it were; exit 0.
        return {"preempted": True, "global_step": trainer.state.global_step, "final_eval": {}}
    metrics = trainer.evaluate() if evals else {}

    out = Path(training_args.output_dir)
    trainer.save_model(str(out))
    if script_args.merge_adapter and model_args.use_peft and trainer.accelerator.is_main_process:
        # merge_and_unload works in place (it strips the LoRA layers): merge a copy so the trained PEFT model,
        # which push_to_hub saves again and callers may still use, keeps its adapter.
        merged = copy.deepcopy(trainer.accelerator.unwrap_model(trainer.model)).merge_and_unload()
        merged.save_pretrained(out / "merged")
        tokenizer.save_pretrained(out / "merged")
    summary = reports.training_summary(trainer, metrics, n_rejected=len(rejects))
    if trainer.accelerator.is_main_process:
        reports.write_summary(out, summary)
        reports.write_model_card(trainer, out, script_args, summary)
    if training_args.push_to_hub:
        # Trainer.push_to_hub rewrites README.md with TRL's card alone (and would put the local dataset path in
        # its `datasets:` metadata); push the card written above, TRL's plus minidpo's data/config/metrics.
        trainer.create_model_card = lambda *args, **kwargs: None
        trainer.push_to_hub()
    trainer.accelerator.wait_for_everyone()
    return summary


def parse(argv=None):
    parser = TrlParser((ScriptArguments, MiniDPOConfig, ModelConfig))
    return parser.parse_args_and_config(args=argv)


def run(argv=None) -> int:
    """Entry point of `minidpo train` and of this file: clear one-line errors instead of stack traces."""
    try:
        parsed = parse(argv)
    except (ValueError, FileNotFoundError) as e:
        # Config mistakes (unknown keys, bad values, a missing --config file) surface as these from TrlParser,
        # TrainingArguments and MiniDPOConfig; their messages already say what to change.
        print(f"minidpo train: error: {e}", file=sys.stderr)
        return 2
    try:
        main(*parsed)
    except UserError as e:
        print(f"minidpo train: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(run())
