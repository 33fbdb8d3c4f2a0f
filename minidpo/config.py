"""`MiniDPOConfig`: TRL's `DPOConfig` plus minidpo's options, their checks and the machine's defaults.

Every check raises `ValueError` at construction with one line naming the option, so a wrong config stops before any
model or data is loaded (train.py turns it into its one-line error).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from trl import DPOConfig

from minidpo.masking import MASK_MODES, TRUNCATION_MODES, check_mask_mode
from minidpo.minimind_recipe import MINIMIND_SCHEDULES, SCHEDULE_ALIASES


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
        metadata={"help": "Packed pair rows: run each pair as one sequence holding the shared prompt once, chosen "
                          "answer then rejected answer, the rejected answer masked from the chosen one, for the model "
                          "families where that is proven exact (others keep two rows). Same loss, fewer tokens."},
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
                          "from 1): 'cosine-1.1-to-0.1' = lr/10 + lr/2*(1+cos(pi*step/total)) (MiniMind up to "
                          "2025-12-01; alias '2510'), 'cosine-1.0-to-0.1' = lr*(0.1+0.45*(1+cos(pi*step/total))) "
                          "(from 2025-12-06; alias '2512'). The floor follows learning_rate.",
                  "choices": [None, *MINIMIND_SCHEDULES, *SCHEDULE_ALIASES]},
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
        self.minimind_lr_schedule = SCHEDULE_ALIASES.get(self.minimind_lr_schedule, self.minimind_lr_schedule)
        if self.minimind_lr_schedule not in (None, *MINIMIND_SCHEDULES):
            raise ValueError(f"minimind_lr_schedule must be one of {list(MINIMIND_SCHEDULES)}, got "
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
