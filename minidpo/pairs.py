"""Encoded pairs as training and evaluation hold them: their columns, how a batch is padded, their lengths and hash.

An encoded pair is `minidpo.masking.encode_pair`'s output: `chosen_input_ids`, `chosen_loss_mask`,
`rejected_input_ids`, `rejected_loss_mask` (plain lists, unpadded). A batch is TRL's layout: chosen rows first,
then rejected rows, with the loss masks as `completion_mask`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from trl.trainer.utils import pad

PAIR_COLUMNS = ("chosen_input_ids", "chosen_loss_mask", "rejected_input_ids", "rejected_loss_mask")
REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


@dataclass
class PairCollator:
    """Right-pads chosen then rejected sequences into one batch, with the loss masks as `completion_mask`.

    Precomputed reference log-probs (`ref_chosen_logps`, `ref_rejected_logps`), when the examples carry them, pass
    through as tensors.
    """

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
        for key in REF_COLUMNS:
            if key in examples[0]:
                batch[key] = torch.tensor([e[key] for e in examples])
        return batch


def pair_lengths(dataset) -> list[int]:
    """Tokens of each encoded pair (chosen + rejected), read from the Arrow columns without decoding rows."""
    table = dataset.select_columns(["chosen_input_ids", "rejected_input_ids"]).with_format("arrow")[:]
    return [c + r for c, r in zip(*(table.column(k).combine_chunks().value_lengths().to_pylist()
                                    for k in ("chosen_input_ids", "rejected_input_ids")))]


def content_hash(dataset) -> str:
    """sha256 of the encoded pairs, in order (ids and masks)."""
    h = hashlib.sha256()
    table = dataset.select_columns(list(PAIR_COLUMNS)).with_format("arrow")[:]
    for name in PAIR_COLUMNS:
        column = table.column(name).combine_chunks()
        h.update(name.encode())
        h.update(column.value_lengths().to_numpy(zero_copy_only=False).tobytes())
        h.update(column.flatten().to_numpy(zero_copy_only=False).tobytes())
    return h.hexdigest()
