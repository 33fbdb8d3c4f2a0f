"""MiniMind's own DPO loop, behaviour by behaviour, as plain functions and samplers `MiniDPOTrainer` plugs in.

  - `lr_factor`: MiniMind's `get_lr`, stepped per batch from 1 (`minimind_lr_schedule`);
  - `MiniMindOrder`: its batch order per epoch, one process or DDP (`minimind_data_order`);
  - `every_parameter_name`: its AdamW decays every parameter (`decay_all_parameters`);
  - `EmptyThinkDraws` and `Renders`: minimind-3's random removal of empty think blocks (`empty_think_keep_ratio`).

docs/minimind.md says which MiniMind version does what; tests/test_minimind_recipe.py checks each against an
independent re-implementation of MiniMind's loop.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
from datasets import Dataset

from minidpo.masking import NO_THINK, SIDES

# MiniMind's get_lr(step, total, lr) / lr, named by its shape: a cosine from 1.1 (MiniMind up to 2025-12-01) or 1.0
# (from 2025-12-06) times lr down to 0.1 times lr
MINIMIND_SCHEDULES = {
    "cosine-1.1-to-0.1": lambda progress: 0.1 + 0.5 * (1 + math.cos(math.pi * progress)),
    "cosine-1.0-to-0.1": lambda progress: 0.1 + 0.45 * (1 + math.cos(math.pi * progress)),
}
# the names of earlier minidpo configs: MiniMind's version dates (2025-10 and 2025-12)
SCHEDULE_ALIASES = {"2510": "cosine-1.1-to-0.1", "2512": "cosine-1.0-to-0.1"}

NO_THINK_COLUMNS = tuple(f"{side}{NO_THINK}_{k}" for side in SIDES for k in ("input_ids", "loss_mask"))


def lr_factor(schedule: str, num_training_steps: int, batches_per_step: int = 1):
    """The multiplier of the base learning rate at each optimizer step (for `LambdaLR`) under MiniMind's `get_lr`.

    MiniMind sets `get_lr(step, total)` before each batch, step counted from 1 over all epochs' batches; an optimizer
    step here is `batches_per_step` (gradient accumulation) of them, so step k applies the rate of its last batch."""
    factor = MINIMIND_SCHEDULES[schedule]
    total = num_training_steps * batches_per_step
    return lambda k: factor(min((k + 1) * batches_per_step, total) / total)


def every_parameter_name(model) -> list[str]:
    """Every parameter, norms and biases included: what MiniMind's `optim.AdamW(model.parameters())` decays."""
    return [name for name, _ in model.named_parameters()]


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
