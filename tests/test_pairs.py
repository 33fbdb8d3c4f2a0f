"""minidpo.pairs: the batch layout training and evaluation share, pair lengths and the content hash."""

import torch
from datasets import Dataset

from minidpo.pairs import PairCollator, content_hash, pair_lengths

PAIRS = [
    {"chosen_input_ids": [5, 6, 7], "chosen_loss_mask": [0, 0, 1], "rejected_input_ids": [5, 6, 8, 9],
     "rejected_loss_mask": [0, 0, 1, 1]},
    {"chosen_input_ids": [4, 3], "chosen_loss_mask": [0, 1], "rejected_input_ids": [4, 2, 2, 2, 2],
     "rejected_loss_mask": [0, 1, 1, 1, 1]},
]


def test_collator_right_pads_chosen_rows_then_rejected_rows():
    batch = PairCollator(pad_token_id=0)(PAIRS)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0, 0], [4, 3, 0, 0, 0], [5, 6, 8, 9, 0], [4, 2, 2, 2, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert batch["completion_mask"].tolist() == [[0, 0, 1, 0, 0], [0, 1, 0, 0, 0], [0, 0, 1, 1, 0],
                                                 [0, 1, 1, 1, 1]]
    assert PairCollator(0, pad_to_multiple_of=8)(PAIRS)["input_ids"].shape == (4, 8)
    with_ref = [dict(p, ref_chosen_logps=-1.0 - i, ref_rejected_logps=-2.0 - i) for i, p in enumerate(PAIRS)]
    batch = PairCollator(0)(with_ref)
    assert torch.equal(batch["ref_chosen_logps"], torch.tensor([-1.0, -2.0]))
    assert torch.equal(batch["ref_rejected_logps"], torch.tensor([-2.0, -3.0]))


def test_lengths_and_content_hash():
    ds = Dataset.from_list(PAIRS)
    assert pair_lengths(ds) == [7, 7]
    assert content_hash(ds) == content_hash(Dataset.from_list([dict(p) for p in PAIRS]))  # content, not identity
    changed = [dict(PAIRS[0], chosen_loss_mask=[0, 1, 1]), PAIRS[1]]  # one mask bit: other scores, other hash
    assert content_hash(Dataset.from_list(changed)) != content_hash(ds)
    assert content_hash(Dataset.from_list(PAIRS[::-1])) != content_hash(ds)  # order matters: values are per row
