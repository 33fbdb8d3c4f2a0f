"""The private members of TRL, Transformers, Accelerate and Datasets that minidpo relies on, listed in one place.

They are why pyproject.toml pins `trl`, `transformers` and `accelerate` below their next minor version. `problems()` checks each
entry against the installed packages; tests/test_contracts.py runs it (plus the behaviour behind the two entries a
name cannot prove), so an upgrade that removes or renames one fails there with the member and why minidpo needs
it, not deep inside a training run. Every underscore method `MiniDPOTrainer` defines is listed here (an override
under its base class, a method of minidpo's own under "own"), and tests/test_contracts.py fails on one that is not.

Kinds of entry:
  - "method": a callable on the class taking at least the given parameters (minidpo overrides or calls it);
  - "attribute": an attribute the class's `__init__` assigns (`self.NAME = ...`), which minidpo reads;
  - "calls": the method's source calls the named function (minidpo relies on that call happening);
  - "function": a module-level callable taking at least the given parameters;
  - "field": a dataclass field;
  - "namedtuple": a namedtuple with the given fields (minidpo calls its `_replace`);
  - "class attribute": an attribute the class (or a base) sets in its body, which minidpo overrides;
  - "source": the method's source holds each given text (a keyword argument it passes, a state it copies);
  - "own": a method minidpo's trainer adds under a private name: no base class may define it (or minidpo would
    silently replace TRL's or Transformers' method of the same name).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
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
    # --- added for issue 22: the rest of what minidpo overrides, reads or writes
    # TRL's DPOTrainer
    Member("trl:DPOTrainer", "compute_ref_log_probs", "method", ("model", "inputs"),
           "the sorted reference precompute calls it per batch and reads (chosen, rejected) sums of the fused head's "
           "per-token log-probs (tests/test_contracts.py checks that by behaviour)"),
    Member("trl:DPOTrainer", "compute_loss", "method", ("model", "inputs", "return_outputs", "num_items_in_batch"),
           "length averaging adjusts the completion mask for ipo / sigmoid_norm, then calls TRL's loss"),
    Member("trl:DPOTrainer", "_compute_loss", "source", ("fused_lm_head=True", ".log_probs", ".sum(dim=1)"),
           "TRL sums the fused head's per-token log-probs: minidpo's forward divides them by the scored-token count, "
           "so the sum is MiniMind's mean (checked by behaviour in tests/test_contracts.py)"),
    Member("trl:DPOTrainer", "create_model_card", "method", ("model_name", "dataset_name", "tags"),
           "minidpo's model card is TRL's plus its own sections"),
    Member("trl:DPOTrainer", "_tag_names", "class attribute", (), "MiniDPOTrainer adds the 'minidpo' tag"),
    Member("trl:DPOTrainer", "__init__", "source", ("add_model_tags(self._tag_names)",),
           "the model (and its card) carries the trainer's _tag_names"),
    # Transformers' Trainer
    Member("transformers:Trainer", "get_train_dataloader", "method", (),
           "minimind-3's empty think blocks: the training pairs are drawn through minidpo's Renders"),
    Member("transformers:Trainer", "create_accelerator_and_postprocess", "method", (),
           "the FSDP2-on-CPU repair runs right after the Trainer builds its Accelerator"),
    Member("transformers:Trainer", "__init__", "calls", ("create_accelerator_and_postprocess",),
           "the FSDP2-on-CPU repair runs inside Trainer's construction, before the model is prepared"),
    Member("transformers:Trainer", "_prepare_for_training", "source", ("return model, train_dataloader",),
           "the override passes on the (model, dataloader) pair Trainer's training loop unpacks"),
    Member("transformers:Trainer", "is_fsdp_enabled", "attribute", (),
           "set by the FSDP2-on-CPU repair; _save reads it to drop the gathered copy of a tied LM head"),
    Member("transformers:Trainer", "_issue_warnings_after_load", "source", ("missing_keys",),
           "the override filters load_result.missing_keys before Trainer reads them"),
    Member("torch.nn.modules.module", "_IncompatibleKeys", "namedtuple", ("missing_keys", "unexpected_keys"),
           "the load_result Trainer hands _issue_warnings_after_load: minidpo calls load_result._replace(...)"),
    Member("transformers:PreTrainedModel", "is_activation_checkpointing", "property", (),
           "packed pair rows are not used while checkpointing recomputes layers after the forward"),
    Member("transformers:PretrainedConfig", "_name_or_path", "attribute", (),
           "the tokenizer loaded for a model instance, and the base model named in the card"),
    # the attention modules' call into the pair attention (scoring.pair_attention reads these keywords)
    Member("transformers.models.mistral.modeling_mistral:MistralAttention", "forward", "source",
           ("sliding_window=",), "pair attention applies the layer's sliding window at each token's own position"),
    Member("transformers.models.gemma2.modeling_gemma2:Gemma2Attention", "forward", "source",
           ("sliding_window=", "softcap="), "pair attention applies Gemma 2's logit softcapping"),
    Member("transformers.models.gpt_oss.modeling_gpt_oss:GptOssAttention", "forward", "source",
           ("sliding_window=", "s_aux="), "pair attention applies GPT-OSS's attention sinks"),
    # Accelerate: the FSDP2-on-CPU repair writes its state
    Member("accelerate.state:AcceleratorState", "distributed_type", "attribute", (),
           "the FSDP2-on-CPU repair sets it to FSDP where Accelerate 1.15 leaves MULTI_CPU"),
    Member("accelerate.state:AcceleratorState", "fsdp_plugin", "attribute", (),
           "the FSDP2-on-CPU repair puts back the plugin the launcher configured"),
    Member("accelerate.state:PartialState", "distributed_type", "attribute", (),
           "written too: every later AcceleratorState() copies PartialState's type over"),
    Member("accelerate.state:AcceleratorState", "__init__", "source",
           ("self.__dict__.update(PartialState._shared_state)",),
           "why the repair writes PartialState as well: each AcceleratorState() starts from PartialState's state"),
    # minidpo's own private methods on MiniDPOTrainer: names TRL and Transformers must not take
    Member("trl:DPOTrainer", "_install_pair_forward", "own", (), "wraps the fused heads with minidpo's forward"),
    Member("trl:DPOTrainer", "_pair_forward_installed", "own", (), "set once the forward is wrapped"),
    Member("trl:DPOTrainer", "_precompute_model", "own", (), "the model that scores the reference"),
    Member("trl:DPOTrainer", "_compute_ref_logps_sorted", "own", (), "the sorted, sharded reference precompute"),
    Member("trl:DPOTrainer", "_averaged_sft", "own", (), "TRL's sft term on length-averaged log-probs"),
    Member("trl:DPOTrainer", "sft_weight", "own", (), "the weight of that term, taken out of TRL's loss_weights"),
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
    if member.kind == "own":
        takers = [c.__name__ for c in inspect.getmro(owner) if c is not object
                  and (member.name in vars(c) or re.search(rf"self\.{member.name}\b", _source(c)))]
        return f"is now defined by {', '.join(takers)} too" if takers else None
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
    if member.kind == "namedtuple":
        fields = getattr(target, "_fields", None)
        if fields is None or not hasattr(target, "_replace"):
            return "is not a namedtuple any more"
        missing = [f for f in member.params if f not in fields]
        return f"has no field {', '.join(missing)}" if missing else None
    if member.kind == "class attribute":
        return None if any(member.name in vars(c) for c in inspect.getmro(owner)) else "is no class attribute"
    if member.kind == "source":
        missing = [text for text in member.params if text not in _source(target)]
        return f"no longer has {', '.join(repr(t) for t in missing)}" if missing else None
    return f"unknown contract kind {member.kind!r}"


def problems() -> list[str]:
    """One line per broken contract: the member, what changed and why minidpo needs it."""
    out = []
    for member in PRIVATE_MEMBERS:
        why = problem(member)
        if why:
            out.append(f"{member}: {why} (minidpo relies on it: {member.why})")
    return out
