"""MiniDPOTrainer: TRL's DPOTrainer scoring exactly MiniMind's tokens, with length-averaged log-ratios.

What changes against stock TRL, and nothing else:
  - tokenization: each pair goes through `minidpo.masking.encode_pair` (MiniMind's assistant-span masks,
    multi-turn included) instead of TRL's prompt/completion split, and a collator pads those ids and masks;
  - `length_normalize=True`: every sequence log-prob is the mean over its scored tokens instead of the sum, for
    the policy and the reference alike, so the loss and every logged reward, margin, accuracy and log-prob use
    MiniMind's length-averaged log-ratios. TRL's fused, chunked LM head still computes the per-token log-probs
    (no full-vocabulary logits); we only divide its output rows by their scored-token counts.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from accelerate.utils import is_peft_model
from datasets.fingerprint import Hasher
from transformers.utils import logging
from trl import DPOConfig, DPOTrainer
from trl.trainer.utils import pad

from .masking import MASK_MODES, encode_pair

logger = logging.get_logger(__name__)

PAIR_COLUMNS = ("chosen_input_ids", "chosen_loss_mask", "rejected_input_ids", "rejected_loss_mask")
# Losses that read per-token log-probs or completion lengths themselves, which length-averaged rows would skew.
_NOT_WITH_LENGTH_NORMALIZE = {"sft": "its NLL term reads per-token log-probs"}
# TRL's own length-averaged losses: they divide the log-ratios by the completion length once more.
_TRL_LENGTH_AVERAGED = {"ipo", "sigmoid_norm"}


def _default_bf16() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


@dataclass
class MiniDPOConfig(DPOConfig):
    """`trl.DPOConfig` plus MiniMind's scoring. Defaults fit the machine: bf16 only where the GPU supports it."""

    length_normalize: bool = field(
        default=True,
        metadata={"help": "Average each sequence's log-probs over its scored tokens before forming the DPO "
                          "log-ratios (MiniMind's DPO). False sums them, like TRL and newer MiniMind."},
    )
    mask_mode: str = field(
        default="minimind",
        metadata={"help": "Which tokens are scored: 'minimind' (every assistant turn, MiniMind's marker search) or "
                          "'last-turn' (only the final answer, TRL's semantics).", "choices": list(MASK_MODES)},
    )
    # TRL turns checkpointing on by default (under its deprecated name). MiniMind's models are 26M-104M
    # parameters: their activations are cheap to keep and slow to recompute, so it is off unless asked for.
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Deprecated alias of `activation_checkpointing`."})

    def __post_init__(self):
        if self.mask_mode not in MASK_MODES:
            raise ValueError(f"mask_mode must be one of {MASK_MODES}, got {self.mask_mode!r}")
        if self.activation_checkpointing is None and self.gradient_checkpointing is None:
            self.activation_checkpointing = False
        if self.bf16 is None:
            self.bf16 = (not self.fp16) and _default_bf16()
        if self.bf16 and not torch.cuda.is_available():
            # bf16 autocast on CPU is opt-in; Transformers wants use_cpu to allow it.
            self.use_cpu = True
        super().__post_init__()
        if self.length_normalize:
            for loss_type in self.loss_type:
                if loss_type in _NOT_WITH_LENGTH_NORMALIZE:
                    raise ValueError(f"loss_type={loss_type!r} does not work with length_normalize=True: "
                                     f"{_NOT_WITH_LENGTH_NORMALIZE[loss_type]}. Set length_normalize: false.")
            if self.use_weighting or self.ld_alpha is not None:
                raise ValueError("use_weighting and ld_alpha reweight per-token log-probs and do not combine with "
                                 "length_normalize=True. Set length_normalize: false to use them.")


@dataclass
class PairCollator:
    """Right-pads chosen then rejected sequences into one batch, with the loss masks as `completion_mask`."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        ids = [e["chosen_input_ids"] for e in examples] + [e["rejected_input_ids"] for e in examples]
        masks = [e["chosen_loss_mask"] for e in examples] + [e["rejected_loss_mask"] for e in examples]
        to_tensors = lambda rows: [torch.tensor(r, dtype=torch.long) for r in rows]  # noqa: E731
        batch = {
            "input_ids": pad(to_tensors(ids), self.pad_token_id, "right", self.pad_to_multiple_of),
            "attention_mask": pad(to_tensors([[1] * len(r) for r in ids]), 0, "right", self.pad_to_multiple_of),
            "completion_mask": pad(to_tensors(masks), 0, "right", self.pad_to_multiple_of),
        }
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in examples[0]:
                batch[key] = torch.tensor([e[key] for e in examples])
        return batch


def average_over_scored_tokens(model) -> None:
    """Make the fused LM head return per-token log-probs divided by the sequence's scored-token count.

    TRL sums `log_probs` over the sequence, so the sum becomes the mean MiniMind uses. Rows are found from the
    labels TRL passes (-100 = not scored), which are exactly our loss masks.
    """
    fused_forward = model.forward

    @functools.wraps(fused_forward)
    def forward(*args, fused_lm_head=False, labels=None, shift_labels=None, **kwargs):
        out = fused_forward(*args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels, **kwargs)
        if fused_lm_head:
            scored = (shift_labels if shift_labels is not None else labels[:, 1:]) != -100
            out.log_probs = out.log_probs / scored.sum(dim=-1, keepdim=True).clamp(min=1)
        return out

    model.forward = forward


def _count_each_sequence_once(completion_mask: torch.Tensor) -> torch.Tensor:
    """A completion mask whose rows sum to 1 while scoring the same positions.

    TRL's `ipo` and `sigmoid_norm` divide the log-ratios by `completion_mask.sum(1)`; ours are already averaged.
    Position 0 is never a label (the fused head shifts it away, and everything else reads `completion_mask[:, 1:]`),
    so setting it to `1 - count` cancels that second division without touching anything scored.
    """
    mask = completion_mask.clone()
    mask[:, 0] = 1 - mask[:, 1:].sum(dim=1)
    return mask


class MiniDPOTrainer(DPOTrainer):
    """`trl.DPOTrainer` on MiniMind-equivalent token masks, with length-averaged log-ratios by default."""

    _tag_names = ["trl", "dpo", "minidpo"]

    def __init__(self, model, ref_model=None, args: MiniDPOConfig | None = None, data_collator=None,
                 train_dataset=None, eval_dataset=None, processing_class=None, **kwargs):
        if args is None:
            args = MiniDPOConfig(output_dir="minidpo-output")
        elif not isinstance(args, MiniDPOConfig):
            raise TypeError(f"MiniDPOTrainer needs a MiniDPOConfig, got {type(args).__name__}")
        if processing_class is None:
            from transformers import AutoTokenizer

            name = model if isinstance(model, str) else model.config._name_or_path
            processing_class = AutoTokenizer.from_pretrained(name, trust_remote_code=args.trust_remote_code)
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        if tokenizer.pad_token is None:
            # Padding is never scored or attended to, so any id works; TRL makes the same choice.
            tokenizer.pad_token = tokenizer.eos_token
        if data_collator is None:
            data_collator = PairCollator(tokenizer.pad_token_id, args.pad_to_multiple_of)
        self.pairs_dropped: dict[str, int] = {}
        super().__init__(model, ref_model=ref_model, args=args, data_collator=data_collator,
                         train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, **kwargs)
        if args.length_normalize:
            # After TRL added its fused LM head (and before any precompute ran, see _precompute_ref_logps).
            self._install_length_average()

    def _install_length_average(self):
        if getattr(self, "_length_average_installed", False):
            return
        policy = self.model.get_base_model() if is_peft_model(self.model) else self.model
        average_over_scored_tokens(policy)
        if self.ref_model is not None:
            average_over_scored_tokens(self.accelerator.unwrap_model(self.ref_model))
        self._length_average_installed = True

    def _precompute_ref_logps(self, dataset, name, batch_size):
        # TRL precomputes inside its own __init__, before ours can patch the forward: patch first.
        if self.args.length_normalize:
            self._install_length_average()
        return super()._precompute_ref_logps(dataset, name, batch_size)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if set(PAIR_COLUMNS) <= set(dataset.column_names or []):
            return dataset  # already encoded (evaluate() passes prepared datasets through here again)
        first = next(iter(dataset))
        if not all(isinstance(first.get(k), list) for k in ("prompt", "chosen", "rejected")):
            raise ValueError(
                f"{dataset_name} dataset: expected conversational TRL records (prompt/chosen/rejected message lists), "
                f"got columns {sorted(first)}. Convert MiniMind dpo.jsonl with `minidpo convert` or minidpo.data.")
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        # The fingerprint names the cache files of this map and of TRL's precomputed reference log-probs, so it
        # carries every setting those depend on (length_normalize changes the reference values, not the ids).
        fingerprint = Hasher.hash((dataset._fingerprint, tokenizer, args.max_length, args.mask_mode,
                                   args.length_normalize, "minidpo.encode_pair/1"))
        dataset = dataset.map(
            _encode_example,
            fn_kwargs={"tokenizer": tokenizer, "max_length": args.max_length, "mask_mode": args.mask_mode},
            remove_columns=dataset.column_names,
            new_fingerprint=fingerprint,
            num_proc=args.dataset_num_proc,
            desc=f"Encoding {dataset_name} pairs ({args.mask_mode} masks)",
        )
        n = len(dataset)
        dataset = dataset.filter(lambda e: any(e["chosen_loss_mask"]) and any(e["rejected_loss_mask"]),
                                 num_proc=args.dataset_num_proc)
        dropped = n - len(dataset)
        self.pairs_dropped[dataset_name] = dropped
        if dropped:
            logger.warning(f"{dataset_name}: dropped {dropped} of {n} pairs with no scored token after truncation to "
                           f"max_length={args.max_length}. `minidpo convert --tokenizer ... --max-length ...` lists "
                           "them with their line numbers in rejects.jsonl.")
        if len(dataset) == 0:
            raise ValueError(f"{dataset_name} dataset: no pair has a scored token at max_length={args.max_length}.")
        return dataset

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = list(PAIR_COLUMNS) + ["ref_chosen_logps", "ref_rejected_logps"]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.args.length_normalize and _TRL_LENGTH_AVERAGED & set(self.loss_types):
            inputs = {**inputs, "completion_mask": _count_each_sequence_once(inputs["completion_mask"])}
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def _encode_example(example, tokenizer, max_length, mask_mode):
    return encode_pair(example, tokenizer, max_length=max_length, mask_mode=mask_mode)
