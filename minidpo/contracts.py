"""The private members of TRL, Transformers and Datasets that minidpo relies on, listed in one place.

They are why pyproject.toml pins `trl` and `transformers` below their next minor version. `problems()` checks each
entry against the installed packages; tests/test_contracts.py runs it (plus the behaviour behind the two entries a
name cannot prove), so an upgrade that removes or renames one fails there with the member and why minidpo needs
it, not deep inside a training run.

Kinds of entry:
  - "method": a callable on the class taking at least the given parameters (minidpo overrides or calls it);
  - "attribute": an attribute the class's `__init__` assigns (`self.NAME = ...`), which minidpo reads;
  - "calls": the method's source calls the named function (minidpo relies on that call happening);
  - "function": a module-level callable taking at least the given parameters;
  - "field": a dataclass field.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from dataclasses import dataclass


@dataclass(frozen=True)
class Member:
    """One private member minidpo relies on: where it lives, its name, the kind of contract, the parameters (or
    called functions, or fields) the contract names, and why minidpo needs it."""

    owner: str  # "module:Class" or "module"
    name: str
    kind: str
    params: tuple[str, ...] = ()
    why: str = ""

    def __str__(self):
        return f"{self.owner}.{self.name}"


PRIVATE_MEMBERS = (
    # TRL's DPOTrainer: the surface MiniDPOTrainer subclasses
    Member("trl:DPOTrainer", "_prepare_dataset", "method", ("dataset", "processing_class", "args", "dataset_name"),
           "MiniDPOTrainer encodes pairs with MiniMind's masks instead of TRL's prompt/completion tokenization"),
    Member("trl:DPOTrainer", "_precompute_ref_logps", "method", ("dataset", "name", "batch_size"),
           "MiniDPOTrainer precomputes over length-sorted batches with a content-keyed disk cache"),
    Member("trl:DPOTrainer", "_set_signature_columns_if_needed", "method", (),
           "the encoded pair columns must survive Trainer's remove_unused_columns"),
    Member("trl:DPOTrainer", "_precompute_model_hash", "attribute", (),
           "the reference cache key: TRL hashes the reference weights before sharding them"),
    Member("trl:DPOTrainer", "_precompute_engine", "attribute", (),
           "the DeepSpeed inference engine the reference precompute reuses"),
    Member("trl:DPOTrainer", "_total_train_tokens", "attribute", (),
           "summary.json's train_tokens; run_record sets it on resume so the count continues the checkpoint's"),
    Member("trl:DPOTrainer", "_metrics", "attribute", (), "the logged rewards, margins and log-probs"),
    Member("trl:DPOTrainer", "loss_types", "attribute", (),
           "length averaging adjusts TRL's ipo and sigmoid_norm and takes sft out of TRL's loop to average it"),
    Member("trl:DPOTrainer", "loss_weights", "attribute", (), "read and filtered with loss_types (sft's weight)"),
    Member("trl:DPOTrainer", "use_weighting", "attribute", (), "the policy's fused head computes WPO's field"),
    Member("trl:DPOTrainer", "_save_checkpoint", "calls", ("create_model_card",),
           "checkpoints (and checkpoint pushes) get minidpo's model card through create_model_card"),
    Member("trl:DPOTrainer", "__init__", "calls", ("add_fused_lm_head",),
           "minidpo wraps the fused LM head TRL adds to the policy and the reference"),
    Member("transformers:Trainer", "_get_train_sampler", "method", ("train_dataset",),
           "group_by_length sorts pairs by chosen + rejected length"),
    Member("transformers:Trainer", "_signature_columns", "attribute", (), "set by _set_signature_columns_if_needed"),
    Member("transformers:Trainer", "_get_dataloader", "method",
           ("dataset", "description", "batch_size", "sampler_fn", "is_training"),
           "with empty_think_keep_ratio the training pairs are read through Renders, by the sampler's draws"),
    Member("transformers:Trainer", "_train_batch_size", "attribute", (), "the per-device batch _get_dataloader takes"),
    Member("transformers:Trainer", "create_scheduler", "method", ("num_training_steps", "optimizer"),
           "minimind_lr_schedule builds MiniMind's get_lr here"),
    Member("transformers:Trainer", "_created_lr_scheduler", "attribute", (),
           "set with the scheduler minimind_lr_schedule builds, as Trainer's own create_scheduler sets it"),
    Member("transformers:Trainer", "get_decay_parameter_names", "method", ("model",),
           "decay_all_parameters decays norms and biases as MiniMind's AdamW does"),
    Member("transformers:Trainer", "_issue_warnings_after_load", "method", ("load_result",),
           "a tied LM head is not reported as a missing key on resume"),
    Member("transformers:Trainer", "push_to_hub", "calls", ("create_model_card",),
           "the pushed model card is minidpo's (create_model_card override), not TRL's alone"),
    Member("transformers:Trainer", "_prepare_for_training", "method",
           ("max_steps", "train_dataloader", "resume_from_checkpoint"),
           "the FSDP sharding check reads the model this prepares (and returns with the dataloader)"),
    Member("transformers:Trainer", "_save", "method", ("output_dir", "state_dict"),
           "under FSDP the gathered state dict is written without a second copy of the tied LM head"),
    Member("transformers:Trainer", "save_model", "calls", ("get_state_dict", "_save"),
           "under FSDP, Trainer gathers the full state dict and hands it to _save"),
    # TRL utilities
    Member("trl.trainer.utils", "add_fused_lm_head", "function", ("model", "outputs"),
           "`model(..., labels=, fused_lm_head=True)` gives per-token log-probs without full logits"),
    Member("trl.trainer.utils", "FusedCausalLMOutput", "field", ("loss", "log_probs", "entropy", "mean_logits",
                                                                   "is_top1", "log_sum_sq_probs", "label_mask"),
           "the compact LM head and packed pair rows return TRL's fused-head output"),
    Member("trl.trainer.utils", "pad", "function", ("tensors", "padding_value", "padding_side", "pad_to_multiple_of"),
           "PairCollator pads like TRL's collator"),
    Member("trl.models", "prepare_deepspeed", "function", ("model", "accelerator"),
           "the reference precompute under DeepSpeed"),
    # Transformers internals
    Member("transformers.models.mixtral.modeling_mixtral", "load_balancing_loss_func", "function",
           ("gate_logits", "num_experts", "top_k", "attention_mask"),
           "the compact LM head adds a MoE model's router loss as the model's forward and TRL's head do"),
    Member("transformers.integrations.sdpa_attention", "sdpa_attention_forward", "function",
           ("module", "query", "key", "value", "attention_mask"),
           "the pair attention falls back to Transformers' sdpa outside packed pair rows"),
    Member("transformers.trainer_pt_utils", "LengthGroupedSampler", "function", ("batch_size", "lengths"),
           "group_by_length over pair lengths"),
    Member("transformers:PretrainedConfig", "_attn_implementation", "property", (),
           "packed pair rows switch the attention function for one forward (read by every layer at call time)"),
    # Datasets
    Member("datasets:Dataset", "_fingerprint", "attribute", (), "the cache fingerprint of encoded pairs"),
    Member("datasets.arrow_writer", "ArrowWriter", "function", ("features", "path", "writer_batch_size"),
           "prepared data streams validated pairs into the Arrow files Dataset.from_file maps"),
    Member("datasets.arrow_writer:ArrowWriter", "write", "method", ("example",), "one validated pair at a time"),
    Member("datasets.arrow_writer:ArrowWriter", "finalize", "method", (), "flushes the last batch; returns the rows"),
)


def _resolve(owner: str):
    module_name, _, cls = owner.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, cls) if cls else module


def _has_params(fn, params) -> str | None:
    try:
        names = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return "its signature cannot be read"
    missing = [p for p in params if p not in names]
    return f"takes no {', '.join(missing)} (has {', '.join(names)})" if missing else None


def _source(obj) -> str:
    return inspect.getsource(obj)


def problem(member: Member) -> str | None:
    """Why the installed packages break `member`'s contract, or None when they keep it."""
    try:
        owner = _resolve(member.owner)
    except (ImportError, AttributeError) as e:
        return f"{member.owner} is gone ({e})"
    target = getattr(owner, member.name, None)
    if member.kind == "attribute":
        classes = [c for c in inspect.getmro(owner) if c.__module__.split(".")[0] == owner.__module__.split(".")[0]]
        if not any(f"self.{member.name} =" in _source(c) for c in classes):
            return f"no longer assigned by {owner.__name__}"
        return None
    if target is None:
        return "is gone"
    if member.kind in ("method", "function"):
        return _has_params(target, member.params)
    if member.kind == "calls":
        missing = [f for f in member.params if f"{f}(" not in _source(target)]
        return f"no longer calls {', '.join(missing)}" if missing else None
    if member.kind == "field":
        names = {f.name for f in dataclasses.fields(target)} if dataclasses.is_dataclass(target) else set()
        missing = [f for f in member.params if f not in names]
        return f"has no field {', '.join(missing)}" if missing else None
    if member.kind == "property":
        return None if isinstance(target, property) else "is not a property any more"
    return f"unknown contract kind {member.kind!r}"


def problems() -> list[str]:
    """One line per broken contract: the member, what changed and why minidpo needs it."""
    out = []
    for member in PRIVATE_MEMBERS:
        why = problem(member)
        if why:
            out.append(f"{member}: {why} (minidpo relies on it: {member.why})")
    return out
