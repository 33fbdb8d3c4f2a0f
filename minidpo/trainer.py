"""MiniDPOTrainer: TRL's DPOTrainer scoring exactly MiniMind's tokens, with length-averaged log-ratios.

This module is the adapter: each override is a few lines calling plain functions that hold the behaviour
(`minidpo.config`, `pairs`, `scoring`, `ref_cache`, `minimind_recipe`, `distributed`, `training_report`), and it is
the one place that touches TRL / Transformers / Accelerate internals (listed in `minidpo.contracts`).

What changes against stock TRL, and nothing else:
  - tokenization: each pair goes through `minidpo.masking.encode_pair` (MiniMind's assistant-span masks,
    multi-turn included, for conversations; TRL's prompt/completion split for plain text) and a collator pads
    those ids and masks;
  - `length_normalize=True`: every sequence log-prob is the mean over its scored tokens instead of the sum, for
    the policy and the reference alike, so the loss and every logged reward, margin, accuracy and log-prob use
    MiniMind's length-averaged log-ratios. TRL's fused, chunked LM head still computes the per-token log-probs
    (no full-vocabulary logits); we only divide its output rows by their scored-token counts.

Speed, each keeping the loss (tests/test_trainer.py; scripts/bench.py measures them):
  - `share_prompt=True`: chosen and rejected share their prompt, so each pair runs as one row, prompt once, the
    rejected answer attending to the prompt and itself only, for the model families proven exact that way
    (`scoring.PACKED_ROW_FAMILIES`, tests/test_architectures.py); on devices without Triton the LM head projects
    only the scored positions (both in `minidpo.scoring`);
  - `precompute_ref_log_probs=True`: reference log-probs computed once over length-sorted batches and cached on disk
    under `ref_cache_dir`, keyed by the weights and the encoded pairs, so later runs (sweeps) skip them
    (`minidpo.ref_cache`);
  - `train_sampling_strategy="group_by_length"`: batches of pairs of similar length, less padding;
  - no activation checkpointing by default; bf16 autocast also on CPU (`bf16=True` sets `use_cpu`), which pays only
    on CPUs with native bf16 (AVX512-BF16/AMX);
  - on a CPU, `per_device_train_batch_size=1` with gradient accumulation: no padding, a small working set
    (docs/performance.md has the figures).
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset, IterableDataset
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.utils import logging
from trl import DPOTrainer
from trl.models import prepare_deepspeed

from minidpo import distributed, minimind_recipe, ref_cache, training_report
from minidpo.config import MiniDPOConfig
from minidpo.console import say
from minidpo.models import ensure_pad_token, load_tokenizer, use_pad_token
from minidpo.pairs import PAIR_COLUMNS, REF_COLUMNS, PairCollator, encode_dataset, pair_lengths
from minidpo.scoring import (COMPACT_FIELDS, expert_count, install_pair_forward,
                             recorded_outputs)

logger = logging.get_logger(__name__)

# TRL's own length-averaged losses: they divide the log-ratios by the completion length once more.
_TRL_LENGTH_AVERAGED = {"ipo", "sigmoid_norm"}


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
    """`trl.DPOTrainer` on MiniMind-equivalent token masks, with length-averaged log-ratios by default.

    Supports: every preference layout `trl.DPOTrainer` takes (standard or conversational, explicit or implicit
    prompt, `tools` / `chat_template_kwargs` columns, map-style or iterable, dicts of eval datasets) and datasets
    already encoded by `minidpo.masking.encode_pair`; dense and mixture-of-experts models; full fine-tuning or PEFT;
    an explicit `ref_model`, the policy's initial weights or precomputed reference log-probs; every TRL loss option
    (with `length_normalize=True`, those that can be length-averaged, see `MiniDPOConfig`).
    Assumes: a `MiniDPOConfig`; a fast tokenizer, with a chat template for conversational data (its eos token pads
    when it has no pad token).
    Raises: `TypeError` for a plain `DPOConfig`; `ValueError` for a dataset without chosen/rejected, with images, or
    where no pair keeps a scored token at `max_length`; `minidpo.errors.UserError` for a tokenizer with neither pad
    nor eos token.

    `data_source` and `lines_rejected` (set by the caller, e.g. train.py) are shown in the model card.
    """

    _tag_names = ["trl", "dpo", "minidpo"]

    def __init__(self, model, ref_model=None, args: MiniDPOConfig | None = None, data_collator=None,
                 train_dataset=None, eval_dataset=None, processing_class=None, **kwargs):
        if args is None:
            args = MiniDPOConfig(output_dir="minidpo-output")
        elif not isinstance(args, MiniDPOConfig):
            raise TypeError(f"MiniDPOTrainer needs a MiniDPOConfig, got {type(args).__name__}")
        if processing_class is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            # the revision the model is loaded at, as stock TRL reads it (a model passed as an instance has none)
            revision = (args.model_init_kwargs or {}).get("revision") if isinstance(model, str) else None
            processing_class = load_tokenizer(name, revision=revision, trust_remote_code=args.trust_remote_code,
                                              local_only=False)
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        if data_collator is None:
            use_pad_token(tokenizer, args.pad_token)
            data_collator = PairCollator(tokenizer.pad_token_id, args.pad_to_multiple_of)
        else:
            ensure_pad_token(tokenizer)
        if args.ddp_find_unused_parameters is None and not isinstance(model, str):
            # Transformers would ask DDP to look for unused parameters (and warn each run that there were none):
            # only a mixture-of-experts model leaves some unused
            args.ddp_find_unused_parameters = expert_count(model) > 0
        # TRL reads the deprecated `is_gradient_checkpointing` in every reference forward: Transformers' notice is
        # for TRL's authors, not for the person training. One filter, set once (changing the filters each step would
        # make Python show every once-per-place warning again).
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        self.pairs_dropped: dict[str, int] = {}
        self.data_source: str | None = None
        self.lines_rejected = 0
        super().__init__(model, ref_model=ref_model, args=args, data_collator=data_collator,
                         train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, **kwargs)
        if args.pad_token is not None:  # the model agrees with the tokenizer on the pad token, as in stock TRL
            unwrapped = self.accelerator.unwrap_model(self.model)
            unwrapped.config.get_text_config().pad_token_id = tokenizer.pad_token_id
            if getattr(unwrapped, "generation_config", None) is not None:
                unwrapped.generation_config.pad_token_id = tokenizer.pad_token_id
        # After TRL added its fused LM head (and before any precompute ran, see _precompute_ref_logps).
        self._install_pair_forward()
        # TRL's sft term is a mean over tokens; averaged, it is a mean over chosen sequences (compute_loss adds it)
        self.sft_weight = 0.0
        if args.length_normalize and "sft" in self.loss_types:
            weights = list(zip(self.loss_types, self.loss_weights, strict=True))
            self.sft_weight = sum(w for t, w in weights if t == "sft")
            self.loss_types = [t for t, _ in weights if t != "sft"]
            self.loss_weights = [w for t, w in weights if t != "sft"]

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        if distributed.restore_cpu_fsdp2(self.accelerator.state):
            self.is_fsdp_enabled = True

    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        model, train_dataloader = super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
        version = distributed.fsdp_version_asked()
        if version:
            distributed.check_sharded(self.model, version, self.accelerator.num_processes)
        return model, train_dataloader

    def _save(self, output_dir=None, state_dict=None):
        if state_dict and self.is_fsdp_enabled:
            # FSDP gathers a tied LM head as a copy of its own, which Transformers (it finds ties by shared storage)
            # would write as a second tensor: drop it, so the folder is the one a single process saves.
            tied = distributed.tied_duplicates(self.accelerator.unwrap_model(self.model))
            state_dict = {k: v for k, v in state_dict.items() if k not in tied}
        super()._save(output_dir, state_dict=state_dict)

    def _install_pair_forward(self):
        if getattr(self, "_pair_forward_installed", False):
            return
        wrap = functools.partial(install_pair_forward, length_normalize=self.args.length_normalize,
                                 share_prompt=self.args.share_prompt)
        # the fields TRL's DPOTrainer asks of each fused head: the policy's feed its metrics
        policy_outputs = COMPACT_FIELDS + (("log_sum_sq_probs",) if self.use_weighting else ())
        refusal = wrap(self.model.get_base_model() if is_peft_model(self.model) else self.model,
                       outputs=policy_outputs)
        if self.ref_model is not None:
            ref = self.accelerator.unwrap_model(self.ref_model)
            wrap(ref)
            # Accelerate put the reference's forward under autocast when TRL prepared it, but the compact head reaches
            # the model's body past that wrapper: without this the reference of a bf16 run on CPU ran in fp32, unlike
            # the policy (prepared later, so wrapped around the pair forward) and unlike a precomputed reference.
            pair_forward = ref.forward

            @functools.wraps(pair_forward)
            def forward_under_autocast(*args, **kwargs):
                with self.accelerator.autocast():
                    return pair_forward(*args, **kwargs)

            ref.forward = forward_under_autocast
        if self.args.share_prompt:  # which scoring path runs, and why, once per run
            say("scoring: packed pair rows (each pair's prompt once)" if refusal is None
                else f"scoring: two rows per pair, not packed: {refusal}")
        self._pair_forward_installed = True

    def _precompute_ref_logps(self, dataset, name, batch_size):
        """Reference log-probs once, over length-sorted batches shared out across processes, cached on disk by
        content (`minidpo.ref_cache`), so in-memory datasets and later runs find them too."""
        if isinstance(dataset, IterableDataset):
            return super()._precompute_ref_logps(dataset, name, batch_size)  # TRL's refusal, its message
        # TRL precomputes inside its own __init__, before ours can patch the forward: patch first.
        self._install_pair_forward()
        scorer = self.accelerator.unwrap_model(self._precompute_model())
        path = ref_cache.cache_file(self._precompute_model_hash, scorer, dataset, self.args)
        logps = ref_cache.read(path, self.accelerator)
        if logps is not None:
            logger.info(f"{name}: reference log-probs read from {path}")
        else:
            logps = self._compute_ref_logps_sorted(dataset, batch_size)
            ref_cache.write(path, logps, self.accelerator)
        self.accelerator.wait_for_everyone()
        return ref_cache.attach(dataset, logps)

    def _precompute_model(self):
        """The model that scores the reference, as TRL picks it (a DeepSpeed engine places ZeRO parameters)."""
        if self.ref_model is None and self.is_deepspeed_enabled:
            if self._precompute_engine is None:
                self._precompute_engine = prepare_deepspeed(self.model, self.accelerator)
            return self._precompute_engine
        return self.ref_model or self.model

    def _compute_ref_logps_sorted(self, dataset, batch_size) -> torch.Tensor:
        model = self._precompute_model()
        return ref_cache.compute_sorted(dataset, batch_size, self.data_collator,
                                        lambda batch: self.compute_ref_log_probs(model, batch), self.accelerator)

    def get_train_dataloader(self):
        if self.args.empty_think_keep_ratio == 1 or not isinstance(self.train_dataset, Dataset):
            return super().get_train_dataloader()
        return self._get_dataloader(dataset=minimind_recipe.Renders(self.train_dataset), description="Training",
                                    batch_size=self._train_batch_size, sampler_fn=self._get_train_sampler,
                                    is_training=True)

    def _get_train_sampler(self, train_dataset=None):
        train_dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.minimind_data_order and isinstance(train_dataset, (Dataset, minimind_recipe.Renders)):
            think = None
            if isinstance(train_dataset, minimind_recipe.Renders):
                think = minimind_recipe.EmptyThinkDraws(train_dataset.with_blocks(), self.args.empty_think_keep_ratio,
                                        self.args.minimind_num_workers)
            return minimind_recipe.MiniMindOrder(len(train_dataset), self.args.per_device_train_batch_size,
                                 self.accelerator.num_processes, self.accelerator.process_index, think)
        # Transformers' group_by_length looks for an `input_ids` column; a pair's cost is its two sequences.
        if (self.args.train_sampling_strategy == "group_by_length" and isinstance(train_dataset, Dataset)
                and self.args.length_column_name not in train_dataset.column_names):
            return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                        lengths=pair_lengths(train_dataset))
        return super()._get_train_sampler(train_dataset)

    def create_scheduler(self, num_training_steps, optimizer=None):
        if self.args.minimind_lr_schedule is None or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, minimind_recipe.lr_factor(
            self.args.minimind_lr_schedule, num_training_steps, self.args.gradient_accumulation_steps))
        self._created_lr_scheduler = True
        return self.lr_scheduler

    def get_decay_parameter_names(self, model):
        if self.args.decay_all_parameters:
            return minimind_recipe.every_parameter_name(model)
        return super().get_decay_parameter_names(model)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        """`minidpo.pairs.encode_dataset`: every layout TRL's DPOTrainer takes, encoded with MiniMind's masks; the
        pairs dropped (nothing scored at max_length) are counted for the model card."""
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        dataset, dropped = encode_dataset(dataset, tokenizer, args, dataset_name)
        if dropped is not None:
            self.pairs_dropped[dataset_name] = dropped
        return dataset

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = list(PAIR_COLUMNS) + list(REF_COLUMNS) + list(minimind_recipe.NO_THINK_COLUMNS)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.args.length_normalize and _TRL_LENGTH_AVERAGED & set(self.loss_types):
            inputs = {**inputs, "completion_mask": _count_each_sequence_once(inputs["completion_mask"])}
        if not self.sft_weight:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        with recorded_outputs() as seen:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = result[0] if return_outputs else result
        loss = loss + self.sft_weight * self._averaged_sft(seen[0], inputs["completion_mask"][:, 1:])
        return (loss, result[1]) if return_outputs else loss

    def _averaged_sft(self, policy, mask):
        """TRL's sft term on length-averaged log-probs: minus the mean over chosen sequences of their averaged
        log-prob, scaled by the mean WPO weight of the pairs as TRL scales it."""
        log_probs = policy.log_probs[:, -mask.size(1):]  # after a prompt-learning adapter's virtual tokens
        chosen = log_probs.sum(dim=1).chunk(2)[0]
        sft = -chosen.mean()
        if self.use_weighting:
            with torch.no_grad():
                aligned = (log_probs - policy.log_sum_sq_probs[:, -mask.size(1):]) * mask
                weights = torch.exp(aligned.sum(dim=1) / mask.sum(dim=1).clamp_min(1))
                chosen_weights, rejected_weights = weights.chunk(2)
            sft = sft * (chosen_weights * rejected_weights).mean()
        return sft

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        """TRL's card (base model, framework versions, citation) plus minidpo's data, configuration, metrics and plots.

        Trainer calls this for every checkpoint (so checkpoint pushes carry it) and in `push_to_hub`; train.py once
        more after the final evaluation. A local dataset path never goes into the card's `datasets:` metadata.
        """
        if dataset_name is not None and Path(str(dataset_name)).exists():
            dataset_name = None
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        if self.is_world_process_zero():
            card = Path(self.args.output_dir) / "README.md"
            card.write_text(training_report.fix_card_base(card.read_text(encoding="utf-8"), self)
                            + training_report.card_sections(self), encoding="utf-8")

    def _issue_warnings_after_load(self, load_result):
        # A tied LM head is saved once, under the embedding's name: its "missing" key is loaded all the same.
        tied = distributed.tied_duplicates(self.accelerator.unwrap_model(self.model))
        missing = [k for k in load_result.missing_keys if k not in tied]
        super()._issue_warnings_after_load(load_result._replace(missing_keys=missing))
