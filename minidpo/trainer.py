"""MiniDPOTrainer: TRL's DPOTrainer scoring exactly MiniMind's tokens, with length-averaged log-ratios.

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
    rejected answer attending to the prompt and itself only; on devices without Triton the LM head projects only
    the scored positions (both in `minidpo.scoring`);
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
import math
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils import gather_object, is_peft_model
from datasets import Dataset, IterableDataset
from datasets.fingerprint import Hasher
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.utils import logging
from trl import DPOConfig, DPOTrainer
from trl.data_utils import extract_prompt
from trl.models import prepare_deepspeed

from minidpo import distributed, ref_cache, training_report
from minidpo.console import say
from minidpo.errors import RecordError
from minidpo.masking import (MASK_MODES, NO_THINK, SIDES, TRUNCATION_MODES, check_mask_mode, encode_pair,
                             is_scorable)
from minidpo.models import ensure_pad_token, load_tokenizer, use_pad_token
from minidpo.pairs import PAIR_COLUMNS, REF_COLUMNS, PairCollator, pair_lengths
from minidpo.scoring import (COMPACT_FIELDS, SCORING_VERSION, expert_count, install_pair_forward,
                             log_probs_only, recorded_outputs)

logger = logging.get_logger(__name__)

NO_THINK_COLUMNS = tuple(f"{side}{NO_THINK}_{k}" for side in SIDES for k in ("input_ids", "loss_mask"))

# MiniMind's get_lr(step, total, lr) / lr, by the version that introduced it
_MINIMIND_SCHEDULES = {
    "2510": lambda progress: 0.1 + 0.5 * (1 + math.cos(math.pi * progress)),
    "2512": lambda progress: 0.1 + 0.45 * (1 + math.cos(math.pi * progress)),
}
# TRL's own length-averaged losses: they divide the log-ratios by the completion length once more.
_TRL_LENGTH_AVERAGED = {"ipo", "sigmoid_norm"}


def _default_bf16() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def _has_accelerator() -> bool:
    """A device Transformers would train on instead of the CPU (CUDA/ROCm, XPU, Apple MPS)."""
    xpu = getattr(torch, "xpu", None)
    return (torch.cuda.is_available() or bool(xpu is not None and xpu.is_available())
            or torch.backends.mps.is_available())


def _check_ranges(args) -> None:
    """Values that train without an error but not as meant: one line naming the option."""
    if not args.beta > 0:
        raise ValueError(f"beta must be > 0, got {args.beta}: it scales the log-ratios; 0 gives a constant loss and "
                         "no gradient, a negative beta trains the preference backwards")
    if not args.learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0, got {args.learning_rate}")
    if not 0 <= args.label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {args.label_smoothing}: it is the share of "
                         "preference labels assumed flipped")
    if "exo_pair" in args.loss_type and args.label_smoothing == 0:
        raise ValueError("loss_type exo_pair needs label_smoothing > 0 (e.g. 1e-3)")
    if args.max_length is not None and args.max_length < 2:
        raise ValueError(f"max_length must be at least 2 (a token to predict from and one to score), got "
                         f"{args.max_length}")


def _check_empty_think(args) -> None:
    if not 0 <= args.empty_think_keep_ratio <= 1:
        raise ValueError(f"empty_think_keep_ratio must be in [0, 1], got {args.empty_think_keep_ratio}: the share of "
                         "renders that keep their empty think blocks")
    if args.minimind_num_workers < 0:
        raise ValueError(f"minimind_num_workers must be >= 0, got {args.minimind_num_workers}")
    if args.empty_think_keep_ratio == 1:
        return
    if not args.minimind_data_order:
        raise ValueError("empty_think_keep_ratio < 1 draws MiniMind's random numbers along MiniMind's batch order: "
                         "set minimind_data_order: true")
    if args.mask_mode != "minimind":
        raise ValueError("empty_think_keep_ratio < 1 reproduces minimind-3's DPODataset, which scores by MiniMind's "
                         "markers: set mask_mode: minimind")
    if args.precompute_ref_log_probs:
        raise ValueError("empty_think_keep_ratio < 1 renders each pair anew every epoch, while "
                         "precompute_ref_log_probs scores each pair once: set precompute_ref_log_probs: false")


@dataclass
class MiniDPOConfig(DPOConfig):
    """`trl.DPOConfig` plus MiniMind's scoring (`length_normalize`, `mask_mode`) and minidpo's speed levers.

    Supports every DPOConfig field. Defaults fit the machine: bf16 only where the GPU supports it (`bf16: true` on a
    CPU also sets `use_cpu`), `use_cpu` and no pinned memory on a machine without an accelerator, activation
    checkpointing off.
    Raises `ValueError` at construction, one line naming the option, for an unknown `mask_mode` or
    `truncation_mode`, values out of range (`beta` <= 0, `learning_rate` <= 0, `label_smoothing` outside [0, 0.5),
    `max_length` < 2), and for `empty_think_keep_ratio` < 1 without `minimind_data_order` and `mask_mode: minimind`
    or with `precompute_ref_log_probs`.
    """

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
    share_prompt: bool = field(
        default=True,
        metadata={"help": "Run each pair as one sequence holding the shared prompt once, chosen answer then rejected "
                          "answer, the rejected answer masked from the chosen one. Same loss, fewer tokens."},
    )
    ref_cache_dir: str | None = field(
        default=None,
        metadata={"help": "With precompute_ref_log_probs: where reference log-probs are cached across runs, keyed by "
                          "the reference weights and the encoded pairs. Default $MINIDPO_CACHE or ~/.cache/minidpo."},
    )
    # MiniMind's own training loop, option by option (docs/minimind.md says which version uses which)
    minimind_lr_schedule: str | None = field(
        default=None,
        metadata={"help": "MiniMind's get_lr instead of lr_scheduler_type, stepped as MiniMind steps it (per batch, "
                          "from 1): '2510' = lr/10 + lr/2*(1+cos(pi*step/total)) (MiniMind up to 2025-12-01, peak "
                          "1.1*lr), '2512' = lr*(0.1+0.45*(1+cos(pi*step/total))) (from 2025-12-06, peak lr). The "
                          "floor follows learning_rate.", "choices": [None, *_MINIMIND_SCHEDULES]},
    )
    minimind_data_order: bool = field(
        default=False,
        metadata={"help": "MiniMind's batch order (from 2026-01-18): each epoch torch.manual_seed(42 + epoch) then "
                          "torch.randperm, consecutive batches; under several processes, torch's DistributedSampler "
                          "order (seed 0), as MiniMind's DDP runs read it. Default: the Trainer's shuffle."},
    )
    empty_think_keep_ratio: float = field(
        default=1.0,
        metadata={"help": "Keep the chat template's empty '<think>\\n\\n</think>\\n\\n' blocks in this share of "
                          "renders, as minimind-3's DPODataset does (0.2 there): each side of a pair, each time an "
                          "epoch reads it, loses every such block when Python's random.random() > this ratio, with "
                          "MiniMind's draws (its seeds, workers and order; needs minimind_data_order). 1.0 keeps every "
                          "block."},
    )
    minimind_num_workers: int = field(
        default=0,
        metadata={"help": "MiniMind's --num_workers (8 by default there): its DataLoader workers seed the random "
                          "draws of empty_think_keep_ratio, so the same count gives the same draws. minidpo's own "
                          "loading is dataloader_num_workers."},
    )
    decay_all_parameters: bool = field(
        default=False,
        metadata={"help": "Weight decay on every parameter, norms and biases included, as MiniMind's "
                          "optim.AdamW(model.parameters()) applies it. Default: Transformers exempts them."},
    )
    # TRL turns checkpointing on by default (under its deprecated name). MiniMind's models are 26M-104M
    # parameters: their activations are cheap to keep and slow to recompute, so it is off unless asked for.
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Deprecated alias of `activation_checkpointing`."})

    def __post_init__(self):
        check_mask_mode(self.mask_mode)
        if self.minimind_lr_schedule not in (None, *_MINIMIND_SCHEDULES):
            raise ValueError(f"minimind_lr_schedule must be one of {list(_MINIMIND_SCHEDULES)}, got "
                             f"{self.minimind_lr_schedule!r}")
        if self.truncation_mode not in TRUNCATION_MODES:
            raise ValueError(f"truncation_mode must be one of {TRUNCATION_MODES}, got {self.truncation_mode!r}")
        if self.activation_checkpointing is None and self.gradient_checkpointing is None:
            self.activation_checkpointing = False
        if self.bf16 is None:
            self.bf16 = (not self.fp16) and _default_bf16()
        if self.bf16 and not torch.cuda.is_available():
            # bf16 autocast on CPU is opt-in; Transformers wants use_cpu to allow it.
            self.use_cpu = True
        if not _has_accelerator():
            # On a CPU-only machine the processes a launcher starts form one process group only with use_cpu, and
            # pinned memory has no device to copy to.
            self.use_cpu = True
            self.dataloader_pin_memory = False
        super().__post_init__()
        _check_ranges(self)
        _check_empty_think(self)


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

    @torch.no_grad()
    def _compute_ref_logps_sorted(self, dataset, batch_size) -> torch.Tensor:
        """[len(dataset), 2] reference log-probs (chosen, rejected): batches of similar length, dealt round-robin
        to the processes, gathered so every rank holds all of them."""
        model = self._precompute_model()
        lengths = pair_lengths(dataset)
        order = sorted(range(len(dataset)), key=lengths.__getitem__, reverse=True)
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        mine = batches[rank::world]
        # Sharded models (ZeRO-3, FSDP) run every forward collectively: all ranks take the same number of steps,
        # the ones out of batches repeat one whose result is dropped.
        steps = -(-len(batches) // world)
        results = []
        with log_probs_only():  # the policy model scores the reference here: TRL reads nothing but the log-probs
            for step in range(steps):
                idx = mine[step] if step < len(mine) else batches[0]
                batch = self.data_collator([dataset[i] for i in idx])
                batch = {k: v.to(self.accelerator.device) for k, v in batch.items()}
                chosen, rejected = self.compute_ref_log_probs(model, batch)
                if step < len(mine):
                    results.append((idx, torch.stack([chosen, rejected], dim=1).float().cpu()))
        logps = torch.full((len(dataset), 2), float("nan"))
        for idx, values in gather_object(results) if world > 1 else results:
            logps[idx] = values
        return logps

    def get_train_dataloader(self):
        if self.args.empty_think_keep_ratio == 1 or not isinstance(self.train_dataset, Dataset):
            return super().get_train_dataloader()
        return self._get_dataloader(dataset=Renders(self.train_dataset), description="Training",
                                    batch_size=self._train_batch_size, sampler_fn=self._get_train_sampler,
                                    is_training=True)

    def _get_train_sampler(self, train_dataset=None):
        train_dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.minimind_data_order and isinstance(train_dataset, (Dataset, Renders)):
            think = None
            if isinstance(train_dataset, Renders):
                think = EmptyThinkDraws(train_dataset.with_blocks(), self.args.empty_think_keep_ratio,
                                        self.args.minimind_num_workers)
            return MiniMindOrder(len(train_dataset), self.args.per_device_train_batch_size,
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
        # MiniMind sets get_lr(step, total) before each batch, step counted from 1 over all epochs' batches; an
        # optimizer step here is `gradient_accumulation_steps` of them.
        factor = _MINIMIND_SCHEDULES[self.args.minimind_lr_schedule]
        per_step = self.args.gradient_accumulation_steps
        total = num_training_steps * per_step
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer or self.optimizer, lambda k: factor(min((k + 1) * per_step, total) / total))
        self._created_lr_scheduler = True
        return self.lr_scheduler

    def get_decay_parameter_names(self, model):
        if self.args.decay_all_parameters:
            return [name for name, _ in model.named_parameters()]
        return super().get_decay_parameter_names(model)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        """Encode preference records into ids and loss masks (`minidpo.masking.encode_pair`) and drop the pairs left
        with nothing to score. Takes every layout TRL's DPOTrainer takes: standard (text) or conversational records,
        with an explicit prompt or an implicit one (the shared start of chosen and rejected, found as TRL finds it),
        `tools` and `chat_template_kwargs` columns, map-style or iterable. Encoded datasets pass through."""
        columns = list(next(iter(dataset)).keys()) if dataset.column_names is None else dataset.column_names
        if set(PAIR_COLUMNS) <= set(columns):
            return dataset  # already encoded (evaluate() passes prepared datasets through here again)
        if {"image", "images"} & set(columns):
            raise ValueError(f"{dataset_name} dataset: image columns found; MiniDPOTrainer scores text (its masks are "
                             "token masks of chat-rendered text), so train vision-language models with trl.DPOTrainer")
        if not {"chosen", "rejected"} <= set(columns):
            raise ValueError(f"{dataset_name} dataset: expected preference records with chosen and rejected (and an "
                             f"optional prompt), got columns {sorted(columns)}")
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        iterable = isinstance(dataset, IterableDataset)
        # IterableDataset.map/filter take neither num_proc nor desc nor a fingerprint
        map_kwargs = {} if iterable else {"num_proc": args.dataset_num_proc}
        with args.main_process_first(desc=f"encoding the {dataset_name} pairs"):
            if "prompt" not in columns:
                dataset = dataset.map(extract_prompt, **map_kwargs,
                                      **({} if iterable else {"desc": f"Extracting the {dataset_name} prompts"}))
                columns = [c for c in columns if c != "prompt"] + ["prompt"]
            encode_kwargs = dict(map_kwargs)
            no_think = args.empty_think_keep_ratio < 1
            if no_think and iterable:
                raise ValueError(f"{dataset_name} dataset: empty_think_keep_ratio < 1 draws along MiniMind's order, "
                                 "which indexes the pairs: pass a Dataset, not an IterableDataset")
            if not iterable:
                # The fingerprint names the cache files of this map and of TRL's precomputed reference log-probs,
                # so it carries every setting those depend on (length_normalize changes the reference values).
                encode_kwargs.update(
                    new_fingerprint=Hasher.hash((dataset._fingerprint, tokenizer, args.max_length, args.mask_mode,
                                                 args.truncation_mode, args.length_normalize, no_think,
                                                 "minidpo.encode_pair/2", SCORING_VERSION)),
                    desc=f"Encoding {dataset_name} pairs ({args.mask_mode} masks)")
            dataset = dataset.map(
                _encode_example, remove_columns=columns, **encode_kwargs,
                fn_kwargs={"tokenizer": tokenizer, "max_length": args.max_length, "mask_mode": args.mask_mode,
                           "truncation_mode": args.truncation_mode, "no_think": no_think})
            n = None if iterable else len(dataset)
            dataset = dataset.filter(is_scorable, **map_kwargs)
        if n is not None:
            dropped = n - len(dataset)
            self.pairs_dropped[dataset_name] = dropped
            if dropped and args.process_index == 0:
                logger.warning(f"{dataset_name}: dropped {dropped} of {n} pairs with no scored token after truncation "
                               f"to max_length={args.max_length}. `minidpo convert --tokenizer ... --max-length ...` "
                               "lists them with their line numbers in rejects.jsonl.")
            if len(dataset) == 0:
                raise ValueError(f"{dataset_name} dataset: no pair has a scored token at "
                                 f"max_length={args.max_length}.")
        return dataset

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = list(PAIR_COLUMNS) + list(REF_COLUMNS) + list(NO_THINK_COLUMNS)

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


class MiniMindOrder(torch.utils.data.Sampler):
    """The order in which MiniMind's train_dpo.py reads its data (from 2026-01-18), epoch by epoch (`set_epoch`).

    One process: `torch.manual_seed(42 + epoch)` then `torch.randperm(n)`, read in consecutive batches. Several: each
    rank reads what torch's `DistributedSampler` (shuffle, seed 0, padded to equal shares) gives it, as MiniMind's DDP
    runs do; the indices are laid out so that Accelerate, which deals a process every `world`-th batch, hands rank r
    exactly those batches (exactly while a rank's share is whole batches; a last partial batch is split as
    Accelerate splits batches). With `think` (`EmptyThinkDraws`), each index comes with MiniMind's draws for it:
    `(index, drop chosen's empty think blocks, drop rejected's)`, for `Renders`.
    """

    def __init__(self, n: int, batch_size: int, world: int = 1, rank: int = 0, think: EmptyThinkDraws | None = None):
        self.n, self.batch_size, self.world, self.rank, self.think = n, batch_size, world, rank, think
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _shares(self) -> list[list[int]]:
        """Each rank's indices, in the order it reads them."""
        if self.world == 1:
            generator = torch.Generator().manual_seed(42 + self.epoch)
            return [torch.randperm(self.n, generator=generator).tolist()]
        shares = []
        for rank in range(self.world):
            sampler = torch.utils.data.DistributedSampler(range(self.n), num_replicas=self.world, rank=rank,
                                                          shuffle=True, seed=0)
            sampler.set_epoch(self.epoch)
            shares.append(list(sampler))
        return shares

    def __iter__(self):
        b = self.batch_size
        shares = [[share[i:i + b] for i in range(0, len(share), b)] for share in self._shares()]
        if self.think is not None:
            shares = [self.think(batches, self.epoch, self.n) for batches in shares]
        return iter([item for k in range(len(shares[0])) for batches in shares for item in batches[k]])

    def __len__(self) -> int:
        return self.n if self.world == 1 else -(-self.n // self.world) * self.world


@dataclass
class EmptyThinkDraws:
    """minimind-3's random removal of empty think blocks, drawn as its DPODataset draws it (from 2026-03-25).

    MiniMind renders a side, and when the render holds an empty think block, removes them all if
    `random.random() > keep_ratio`: chosen first, then rejected, pair after pair, in the process that loads the
    batch. Without workers that is the training process, whose `random` `setup_seed(42 + epoch)` seeded just before
    the epoch; with N workers, batch k is loaded by worker k % N, whose `random` torch seeded with base_seed + worker
    id, base_seed being the first int64 the DataLoader draws from torch's global generator, right after that epoch's
    `torch.manual_seed(42 + epoch)` and `torch.randperm(len(dataset))`. Under DDP every rank seeds alike and draws
    over its own batches.
    """

    blocks: list[tuple[bool, bool]]  # per pair: do the chosen and the rejected render hold an empty think block
    keep_ratio: float
    num_workers: int

    def __call__(self, batches: list[list[int]], epoch: int, n: int) -> list[list[tuple[int, bool, bool]]]:
        """One rank's batches of one epoch, each index with (drop chosen's blocks, drop rejected's)."""
        if self.num_workers == 0:
            rngs = [random.Random(42 + epoch)]
        else:
            generator = torch.Generator().manual_seed(42 + epoch)
            torch.randperm(n, generator=generator)
            base_seed = torch.empty((), dtype=torch.int64).random_(generator=generator).item()
            rngs = [random.Random(base_seed + worker) for worker in range(self.num_workers)]
        drawn = []
        for k, batch in enumerate(batches):
            rng = rngs[k % len(rngs)]
            # `and` draws only for a render that holds a block, as MiniMind's `in` test before random() does
            drawn.append([(i, self.blocks[i][0] and rng.random() > self.keep_ratio,
                           self.blocks[i][1] and rng.random() > self.keep_ratio) for i in batch])
        return drawn


class Renders(torch.utils.data.Dataset):
    """Encoded pairs read by `(index, drop chosen's empty think blocks, drop rejected's)`: each side is the sequence
    as the template renders it, or the one without its empty think blocks (`encode_pair(..., no_think=True)`)."""

    def __init__(self, pairs: Dataset):
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def with_blocks(self) -> list[tuple[bool, bool]]:
        """Per pair, whether its chosen and its rejected render hold an empty think block."""
        table = self.pairs.select_columns([f"{side}{NO_THINK}_input_ids" for side in SIDES]).with_format("arrow")[:]
        lengths = [table.column(k).combine_chunks().value_lengths().to_pylist() for k in table.column_names]
        return [(c > 0, r > 0) for c, r in zip(*lengths)]

    def __getitem__(self, key: tuple[int, bool, bool]) -> dict:
        index, *drops = key
        row = self.pairs[index]
        for side, drop in zip(SIDES, drops):
            if drop:
                row[f"{side}_input_ids"] = row[f"{side}{NO_THINK}_input_ids"]
                row[f"{side}_loss_mask"] = row[f"{side}{NO_THINK}_loss_mask"]
        return row


def _encode_example(example, tokenizer, max_length, mask_mode, truncation_mode, no_think):
    try:
        return encode_pair(example, tokenizer, max_length=max_length, mask_mode=mask_mode,
                           truncation_mode=truncation_mode, no_think=no_think)
    except RecordError as e:
        if e.code == "no_think_needs_markers":
            raise ValueError(f"empty_think_keep_ratio < 1: {e.message}") from None
        raise
