"""Encoded pairs as training and evaluation hold them: their columns, how a batch is padded, their lengths and hash.

An encoded pair is `minidpo.masking.encode_pair`'s output: `chosen_input_ids`, `chosen_loss_mask`,
`rejected_input_ids`, `rejected_loss_mask` (plain lists, unpadded). A batch is TRL's layout: chosen rows first,
then rejected rows, with the loss masks as `completion_mask`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from datasets import IterableDataset
from datasets.fingerprint import Hasher
from transformers.utils import logging
from trl.data_utils import extract_prompt
from trl.trainer.utils import pad

from minidpo.console import is_main_process
from minidpo.errors import RecordError
from minidpo.masking import encode_pair, is_scorable
from minidpo.scoring import SCORING_VERSION

logger = logging.get_logger(__name__)

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


def encode_dataset(dataset, tokenizer, args, name: str):
    """Encode preference records into ids and loss masks (`minidpo.masking.encode_pair`) and drop the pairs left with
    nothing to score; returns the dataset and how many were dropped (None for an iterable dataset, which is not
    counted).

    Takes every layout TRL's DPOTrainer takes: standard (text) or conversational records, with an explicit prompt or
    an implicit one (the shared start of chosen and rejected, found as TRL finds it), `tools` and
    `chat_template_kwargs` columns, map-style or iterable. Encoded datasets pass through. Runs under
    `args.main_process_first`, so the other processes read the main one's cache files. Raises ValueError (one line)
    for image columns, records without chosen/rejected, and a dataset where no pair keeps a scored token.
    """
    columns = list(next(iter(dataset)).keys()) if dataset.column_names is None else dataset.column_names
    if set(PAIR_COLUMNS) <= set(columns):
        return dataset, None  # already encoded (evaluate() passes prepared datasets through here again)
    if {"image", "images"} & set(columns):
        raise ValueError(f"{name} dataset: image columns found; MiniDPOTrainer scores text (its masks are "
                         "token masks of chat-rendered text), so train vision-language models with trl.DPOTrainer")
    if not {"chosen", "rejected"} <= set(columns):
        raise ValueError(f"{name} dataset: expected preference records with chosen and rejected (and an "
                         f"optional prompt), got columns {sorted(columns)}")
    iterable = isinstance(dataset, IterableDataset)
    # IterableDataset.map/filter take neither num_proc nor desc nor a fingerprint
    map_kwargs = {} if iterable else {"num_proc": args.dataset_num_proc}
    with args.main_process_first(desc=f"encoding the {name} pairs"):
        if "prompt" not in columns:
            dataset = dataset.map(extract_prompt, **map_kwargs,
                                  **({} if iterable else {"desc": f"Extracting the {name} prompts"}))
            columns = [c for c in columns if c != "prompt"] + ["prompt"]
        encode_kwargs = dict(map_kwargs)
        no_think = args.empty_think_keep_ratio < 1
        if no_think and iterable:
            raise ValueError(f"{name} dataset: empty_think_keep_ratio < 1 draws along MiniMind's order, "
                             "which indexes the pairs: pass a Dataset, not an IterableDataset")
        if not iterable:
            # The fingerprint names the cache files of this map and of TRL's precomputed reference log-probs,
            # so it carries every setting those depend on (length_normalize changes the reference values).
            encode_kwargs.update(
                new_fingerprint=Hasher.hash((dataset._fingerprint, tokenizer, args.max_length, args.mask_mode,
                                             args.truncation_mode, args.length_normalize, no_think,
                                             "minidpo.encode_pair/2", SCORING_VERSION)),
                desc=f"Encoding {name} pairs ({args.mask_mode} masks)")
        dataset = dataset.map(
            _encode_example, remove_columns=columns, **encode_kwargs,
            fn_kwargs={"tokenizer": tokenizer, "max_length": args.max_length, "mask_mode": args.mask_mode,
                       "truncation_mode": args.truncation_mode, "no_think": no_think})
        n = None if iterable else len(dataset)
        dataset = dataset.filter(is_scorable, **map_kwargs)
    dropped = None if n is None else n - len(dataset)
    if n is not None:
        if dropped and is_main_process():
            logger.warning(f"{name}: dropped {dropped} of {n} pairs with no scored token after truncation "
                           f"to max_length={args.max_length}. `minidpo convert --tokenizer ... --max-length ...` "
                           "lists them with their line numbers in rejects.jsonl.")
        if len(dataset) == 0:
            raise ValueError(f"{name} dataset: no pair has a scored token at "
                             f"max_length={args.max_length}.")
    return dataset, dropped


def _encode_example(example, tokenizer, max_length, mask_mode, truncation_mode, no_think):
    try:
        return encode_pair(example, tokenizer, max_length=max_length, mask_mode=mask_mode,
                           truncation_mode=truncation_mode, no_think=no_think)
    except RecordError as e:
        if e.code == "no_think_needs_markers":
            raise ValueError(f"empty_think_keep_ratio < 1: {e.message}") from None
        raise
